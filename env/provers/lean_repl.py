"""A client for the Lean REPL's JSON protocol in which each reply is matched to its request.

The REPL reads a JSON request ended by a blank line and prints a JSON reply ended by a
blank line. Code in a checked file runs inside the REPL process and can print to the same
stdout (messages are formatted, and user delaborators run, outside the REPL's captured
streams), so a file could print a reply of its own and leave the client one reply behind,
handing its feedback to the next episode. So each request is followed, once its reply has
arrived, by a probe `#print "<nonce>"` with a fresh random nonce, run in the request's
parent environment (which holds none of the file's code); the reply counts only if the
next frame is the probe's answer. The environment ids must also be the ones the REPL
assigns (0, 1, 2, ... per process, one per command that produced an environment).
Output nobody asked for, a frame that is not a well-formed reply, an oversized or a
missing reply ends the process (`ReplDesync`, `ReplFailure`).

This catches a file that prints stray or forged replies; code that takes over the whole
process could still answer probes. That is why nothing read here decides a verdict: the
REPL is the model's feedback, and "solved" comes from the kernel re-check of the compiled
file in a process that ran none of the file's code (`env.provers.lean_trusted`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from env.provers.base import Status
from env.provers.lean_jail import Launch

MAX_REPLY_BYTES = 16 << 20
PROBE_TIMEOUT_S = 60.0
_SEVERITIES = frozenset({"error", "warning", "info", "trace"})
_OOM = re.compile(r"out of memory|Cannot allocate memory|std::bad_alloc", re.I)


class ReplFailure(Exception):
    """The REPL did not answer as it should; `status` is timeout, oom or crash. Its process is ended."""

    def __init__(self, status: Status, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class ReplDesync(ReplFailure):
    """What the REPL printed does not match what was asked (stray, forged or malformed output)."""

    def __init__(self, text: str) -> None:
        super().__init__("crash", text)


def parse_reply(frame: str, expected_env: int) -> dict[str, Any]:
    """A command reply as `{"env", "messages", "sorries"}`, or `{"error": text}` for the REPL's own error reply.

    Raises ReplDesync for anything else: not one JSON object, unknown keys, an environment
    id other than `expected_env`, messages or sorries of the wrong shape.
    """
    try:
        reply = json.loads(frame)
    except json.JSONDecodeError:
        raise ReplDesync(f"the REPL printed something that is not a reply: {frame[:200]!r}") from None
    if not isinstance(reply, dict):
        raise ReplDesync(f"the REPL printed something that is not a reply: {frame[:200]!r}")
    if set(reply) == {"message"} and isinstance(reply["message"], str):
        return {"error": reply["message"]}
    env = reply.get("env")
    if not set(reply) <= {"env", "messages", "sorries"} or type(env) is not int or env != expected_env:
        raise ReplDesync(f"expected the reply for environment {expected_env}, got {frame[:200]!r}")
    messages, sorries = reply.get("messages", []), reply.get("sorries", [])
    if not (isinstance(messages, list) and all(_is_message(m) for m in messages)
            and isinstance(sorries, list) and all(isinstance(s, dict) for s in sorries)):
        raise ReplDesync(f"malformed messages or sorries in the reply: {frame[:200]!r}")
    return {"env": expected_env, "messages": messages, "sorries": sorries}


def _is_message(m: Any) -> bool:
    if not (isinstance(m, dict) and m.get("severity") in _SEVERITIES and isinstance(m.get("data"), str)):
        return False
    pos = m.get("pos")
    return pos is None or (isinstance(pos, dict) and all(type(pos.get(k)) is int for k in ("line", "column")))


def probe_command(nonce: str) -> str:
    return f'#print "{nonce}"'


def is_probe_answer(reply: dict[str, Any], nonce: str) -> bool:
    """Whether a parsed reply is the probe's: one info message whose text is the nonce, no sorries."""
    messages = reply.get("messages", [])
    return (not reply.get("sorries") and len(messages) == 1 and messages[0]["severity"] == "info"
            and messages[0]["data"].strip() == nonce)


class _Frames:
    """Reads a pipe on its own thread; hands out blank-line-terminated frames, at most `limit` bytes each."""

    def __init__(self, fd: int, limit: int) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes already searched for the delimiter, so reading stays linear
        self._eof = self._overflow = False
        self._limit = limit
        self._cond = threading.Condition()
        # The thread reads its own duplicate of the pipe: the owner closes `fd` when it ends the
        # process, and a new process's pipe can get the same number before this thread's next read.
        threading.Thread(target=self._pump, args=(os.dup(fd),), name="lean-repl-reader", daemon=True).start()

    def _pump(self, fd: int) -> None:
        try:
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except OSError:
                    chunk = b""
                with self._cond:
                    if not chunk:
                        self._eof = True
                    elif len(self._buffer) + len(chunk) > self._limit:
                        self._overflow = True  # stop reading: the writer blocks until its process is ended
                    else:
                        self._buffer += chunk
                    self._cond.notify_all()
                    if self._eof or self._overflow:
                        return
        finally:
            os.close(fd)

    def pending(self) -> bool:
        with self._cond:
            return bool(self._buffer) or self._overflow

    def next(self, timeout_s: float) -> str:
        """The next frame, without its trailing blank line; TimeoutError, EOFError or ReplDesync."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                end = self._buffer.find(b"\n\n", max(0, self._scanned - 1))
                if end >= 0:
                    frame = bytes(self._buffer[:end])
                    del self._buffer[:end + 2]
                    self._scanned = 0
                    try:
                        return frame.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ReplDesync("the REPL printed bytes that are not UTF-8") from None
                self._scanned = len(self._buffer)
                if self._overflow:
                    raise ReplDesync(f"the REPL printed more than {self._limit} bytes without ending a reply")
                if self._eof:
                    raise EOFError
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self._cond.wait(remaining)


class ReplProcess:
    """One REPL process. `command` returns a validated reply or raises ReplFailure (and ends the process)."""

    def __init__(self, launch: Launch, stderr_path: Path, *, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.memory_mb = launch.memory_mb
        self.stderr_path = stderr_path
        self._proc = launch.spawn(stderr_path)
        self._frames = _Frames(self._proc.stdout.fileno(), max_reply_bytes)
        self._next_env = 0

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def command(self, cmd: str, env: int | None, timeout_s: float) -> dict[str, Any]:
        """Run `cmd` on environment `env` (None: a fresh one, for imports); `{"env", "messages", "sorries"}`.

        The REPL's own error reply (e.g. "Unknown environment.") also ends the process: its
        environment ids no longer match ours.
        """
        if self._frames.pending():
            raise self._end(ReplDesync("the REPL printed output nobody asked for"))
        request: dict[str, Any] = {"cmd": cmd} if env is None else {"cmd": cmd, "env": env}
        reply = self._exchange(request, timeout_s)
        if "env" in reply:
            self._next_env += 1
        nonce = f"fd-probe-{secrets.token_hex(16)}"
        # The probe runs where the request started (no code of the file there), or, after an
        # error reply, in a fresh environment.
        probe_env = None if "error" in reply else env if env is not None else reply["env"]
        probe: dict[str, Any] = {"cmd": probe_command(nonce)}
        if probe_env is not None:
            probe["env"] = probe_env
        try:
            answer = self._exchange(probe, PROBE_TIMEOUT_S)
        except ReplFailure as failure:
            if failure.status != "timeout":
                raise
            raise ReplDesync(f"the REPL did not answer a probe within {PROBE_TIMEOUT_S:.0f} s") from None
        if "env" not in answer or not is_probe_answer(answer, nonce):
            raise self._end(ReplDesync("the REPL's replies are out of step with its requests "
                                       "(the checked file printed to the REPL's output?)"))
        self._next_env += 1
        if "error" in reply:
            raise self._end(ReplFailure("crash", f"the Lean REPL refused the command: {reply['error']}"))
        return reply

    def _exchange(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            self._proc.stdin.write(json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n\n")
            self._proc.stdin.flush()
        except OSError:
            raise self._end(self._death()) from None
        try:
            return parse_reply(self._frames.next(timeout_s), self._next_env)
        except TimeoutError:
            raise self._end(ReplFailure("timeout", f"the check did not finish within its time limit "
                                                   f"({timeout_s:.0f} s)")) from None
        except EOFError:
            raise self._end(self._death()) from None
        except ReplDesync as e:
            raise self._end(e) from None

    def _death(self) -> ReplFailure:
        """Why the process stopped, from its stderr."""
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # its output is closed but it still runs: `_end` kills it
        tail = self.stderr_tail()
        if _OOM.search(tail):
            return ReplFailure("oom", f"Lean ran out of memory (limit {self.memory_mb} MB)")
        return ReplFailure("crash", "the Lean REPL stopped unexpectedly" + (f": {tail}" if tail else ""))

    def _end(self, failure: ReplFailure) -> ReplFailure:
        self.kill()
        return failure

    def stderr_tail(self, chars: int = 2000) -> str:
        try:
            with self.stderr_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def kill(self) -> None:
        """End the process and everything it started (its own session)."""
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # unkillable (stuck in the kernel): nothing more to do from here
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
