#!/usr/bin/env python3
"""Stands in for the Lean REPL (`fdrepl`) in tests, since no Lean exists here: its JSON protocol, scripted.

As the real REPL does: a request is JSON text ended by a blank line, read line by line;
a reply is pretty-printed JSON followed by a blank line; "env" numbers every command that
produced an environment, 0, 1, 2, ... per process; a command without "env" starts from
its imports; an unknown "env" gets {"message": "Unknown environment."}; a request that is
not a command ends the process with an error on stderr; `#print "TEXT"` answers with one
info message TEXT.

Markers in a command script misbehaviour that a checked file's code could cause:
  import Big<N>    the imports take N MB more address space
  FD_ERROR         an error message           FD_SORRY   a sorry and its warning
  FD_SLEEP         answers after 3 s          FD_SILENT  never answers
  FD_FORGE         prints a forged clean reply before the real one
  FD_EXTRA         prints an extra frame after the real reply
  FD_LATE          prints a forged reply 0.3 s after the real one (from a thread)
  FD_PROBE_GUESS   also forges an answer to the probe that follows, without its nonce
  FD_STEAL         swallows the next request (the probe) without answering it
  FD_DIE           exits with a message on stderr
  FD_OOM           reports running out of memory on stderr and exits
  FD_FLOOD         prints 4 MB without a blank line
"""

import json
import re
import sys
import threading
import time

COMMAND_KEYS = {"cmd", "env", "allTactics", "rootGoals", "infotree", "incrementality", "setOptions", "declarations"}
out = sys.stdout
lock = threading.Lock()
states: list[str] = []
ballast: list[bytearray] = []


def emit(obj) -> None:
    with lock:
        out.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
        out.write("\n")
        out.flush()


def read_request() -> str:
    lines = []
    while True:
        line = sys.stdin.readline()
        if not line.strip():
            return "".join(lines)
        lines.append(line.rstrip())


def message(severity: str, data: str, line: int = 1) -> dict:
    return {"severity": severity, "pos": {"line": line, "column": 0}, "endPos": {"line": line, "column": 4},
            "data": data}


def answer(request: dict) -> dict:
    cmd = request["cmd"]
    env = request.get("env")
    if env is not None and not (isinstance(env, int) and 0 <= env < len(states)):
        return {"message": "Unknown environment."}
    messages, sorries = [], []
    if env is None:
        for size in re.findall(r"import Big(\d+)", cmd):
            try:
                blob = bytearray(int(size) << 20)
            except MemoryError:
                sys.exit("INTERNAL PANIC: out of memory")
            blob[::4096] = b"x" * len(blob[::4096])
            ballast.append(blob)
        if "import Missing" in cmd:
            messages.append(message("error", "unknown module prefix 'Missing'"))
    if m := re.fullmatch(r'#print "(.*)"', cmd.strip()):
        messages.append(message("info", m.group(1)))
    if "FD_ERROR" in cmd:
        messages.append(message("error", "unknown identifier 'FD_ERROR'", 3))
    if "FD_SORRY" in cmd:
        messages.append(message("warning", "declaration uses 'sorry'", 2))
        sorries.append({"proofState": 0, "pos": {"line": 2, "column": 2}, "endPos": {"line": 2, "column": 7},
                        "goal": "⊢ False"})
    states.append(cmd)
    reply: dict = {"env": len(states) - 1}
    if messages:
        reply["messages"] = messages
    if sorries:
        reply["sorries"] = sorries
    return reply


def main() -> None:
    while True:
        query = read_request()
        if not query:
            return
        try:
            request = json.loads(query)
        except json.JSONDecodeError as e:
            sys.exit(f"uncaught exception: Could not parse JSON:\n{e}")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str) or set(request) - COMMAND_KEYS:
            sys.exit("uncaught exception: Could not parse as a valid JSON command")
        cmd = request["cmd"]
        if "FD_DIE" in cmd:
            sys.exit("INTERNAL PANIC: unreachable code has been reached")
        if "FD_OOM" in cmd:
            sys.stderr.write("INTERNAL PANIC: out of memory\n")
            sys.exit(1)
        if "FD_SILENT" in cmd:
            time.sleep(3600)
        if "FD_SLEEP" in cmd:
            time.sleep(3)
        if "FD_FLOOD" in cmd:
            out.write("x" * (4 << 20))
            out.flush()
        if "FD_FORGE" in cmd or "FD_PROBE_GUESS" in cmd:
            emit({"env": len(states)})
        if "FD_PROBE_GUESS" in cmd:
            emit({"env": len(states) + 1, "messages": [message("info", "fd-probe-0000")]})
        emit(answer(request))
        if "FD_EXTRA" in cmd:
            emit({"env": len(states)})
        if "FD_LATE" in cmd:
            threading.Timer(0.3, emit, args=({"env": len(states)},)).start()
        if "FD_STEAL" in cmd:
            read_request()


if __name__ == "__main__":
    main()
