"""Warm `coqtop` workers: fast compiler feedback for the model, never a verdict.

A cold `coqc` spends most of a check loading the libraries a file requires. A worker is a
long-lived, jailed `coqtop -emacs` that has already loaded the `Require`s of a problem's
header; a check feeds the file one sentence at a time, each followed by a sentinel command
that names a fresh random identifier, and reads the output up to that sentinel's error. The
attempt cannot know the identifier, so it cannot fake the end of a reply; what it prints is
only its own feedback. Like `coqc`, a check stops at the first error. Afterwards the worker
goes back to the header's state (`BackTo`) and the prompt must show that state again; a
worker that ran commands whose effects outlive `BackTo` (files, plugins, load paths, the
working directory), timed out, printed too much, came near its memory cap, or has done its
share of checks is killed and replaced.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from env.process import OUTPUT_LIMIT_BYTES, CappedBuffer, pump
from env.provers.base import Message, Status
from env.provers.rocq_install import CoqInstall
from env.provers.rocq_text import LineIndex, is_stateful, parse_toplevel, split_sentences
from env.sandbox import OOM_FRACTION, PeakMemory, jailed_command, kill_group, rlimits

START_TIMEOUT_S = 120.0
RESET_TIMEOUT_S = 30.0
_PROMPT = re.compile(r"<prompt>(\S+) < (\d+) \|([^|]*)\| \d+ < </prompt>")


class WorkerError(RuntimeError):
    """A worker could not start or load its header."""


@dataclass(frozen=True)
class WarmOutcome:
    status: Status
    messages: tuple[Message, ...]
    output: str  # what the checked file made coqtop print, capped
    elapsed_s: float
    jailed: bool


@dataclass
class _Reply:
    ending: str  # "markers" when the sentinel was seen, else why not ("timeout", "limit", "eof")
    text: str  # output before the sentinel's own
    prompt: re.Match | None  # the prompt coqtop printed after the sentinel
    size: int


class CoqtopWorker:
    def __init__(self, requires: tuple[str, ...], *, memory_mb: int, jail: bool, coq: CoqInstall, scratch_root: Path,
                 output_limit: int = OUTPUT_LIMIT_BYTES) -> None:
        self.requires = requires
        self.memory_mb = memory_mb
        self.output_limit = output_limit
        self.checks = 0
        self.scratch = Path(tempfile.mkdtemp(prefix="worker-", dir=scratch_root))
        cmd, cwd, env, self.jailed = jailed_command(["coqtop", "-q", "-emacs", "-Q", ".", ""], workdir=self.scratch,
                                                    readonly=coq.mounts, env=coq.environment(), jail=jail)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=rlimits(cpu_s=None, memory_mb=memory_mb))
        self.alive = True
        self.memory = PeakMemory(self.proc, self.jailed)
        # Loaded means each Require moved coqtop's state, as a check judges its sentences; a message
        # alone could hide (an error that swallows the sentinel is cut from the reply).
        deadline = time.monotonic() + START_TIMEOUT_S
        reply = self._send("Set Silent.", deadline)
        moved = True
        for sentence in requires:
            if reply.prompt is None or not moved:
                break
            before = int(reply.prompt[2])
            reply = self._send(sentence, deadline)
            moved = reply.prompt is not None and int(reply.prompt[2]) > before
        if reply.prompt is None or reply.prompt[3].strip():
            self.close()
            raise WorkerError(f"coqtop could not load {' '.join(requires) or 'the prelude'}: {reply.text[-500:]}")
        if not moved:
            self.close()
            raise WorkerError(f"the header's requires failed in coqtop: {reply.text.strip()[-500:]}")
        self.state = reply.prompt[2]

    # -- one check -------------------------------------------------------------------------
    def check(self, source: str, timeout_s: float) -> WarmOutcome:
        """Feed `source` sentence by sentence until the end or the first error; then reset.

        A sentence failed exactly when coqtop's state number did not move: the prompt that
        tells it comes after the sentinel, so the attempt cannot print it. The error text is
        parsed only to show it.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        self.checks += 1
        sentences = split_sentences(source)
        lines = LineIndex(source)
        messages: list[Message] = []
        shown = CappedBuffer()
        status: Status = "ok"
        budget = self.output_limit
        state, last = int(self.state), None
        for begin, end in sentences.chunks:
            last = self._send(source[begin:end], deadline, budget)
            budget -= last.size
            shown.feed(last.text.encode())
            said = parse_toplevel(last.text, source, begin, end, lines)
            if last.ending != "markers" or last.prompt is None:
                messages.extend(said)
                status = self._failure(last.ending, messages, timeout_s)
                break
            failed = int(last.prompt[2]) <= state
            state = int(last.prompt[2])
            if not failed:
                messages.extend(replace(m, severity="info") if m.severity == "error" else m for m in said)
                continue
            messages.extend(said)
            if not any(m.severity == "error" for m in said):
                messages.append(Message("error", "this command failed", lines.line(begin), 1))
            status = "oom" if self._near_memory_cap() else "error"
            break
        else:
            end_line = lines.line(len(source))
            if sentences.error:
                messages.append(Message("error", f"Syntax error: {sentences.error}.", end_line, 1))
                status = "error"
            elif last is not None and last.prompt is not None and last.prompt[3].strip():
                pending = " ".join(last.prompt[3].split())
                messages.append(Message("error", f"the file ends inside an unfinished proof ({pending}): "
                                        "close it with Qed.", end_line, 1))
                status = "error"
        if self.alive and status in ("ok", "error") and not is_stateful(source) and not self._near_memory_cap(0.5):
            self._reset()
        else:
            self.close()
        self._clear_scratch()
        return WarmOutcome(status, tuple(messages), shown.text(), time.monotonic() - start, self.jailed)

    def _failure(self, ending: str, messages: list[Message], timeout_s: float) -> Status:
        if ending == "timeout":
            messages.append(Message("error", f"the check did not finish within its time limit ({timeout_s:.0f} s)"))
            return "timeout"
        if ending == "limit":
            messages.append(Message("error", "the check printed more output than allowed and was stopped"))
            return "error"
        oom = self.memory.peak_mb >= OOM_FRACTION * self.memory_mb
        messages.append(Message("error", "the check ran out of memory" if oom else
                                f"the prover crashed (exit status {self.proc.returncode})"))
        return "oom" if oom else "crash"

    def _reset(self) -> None:
        reply = self._send(f"BackTo {self.state}.", time.monotonic() + RESET_TIMEOUT_S)
        prompt = reply.prompt
        if reply.ending != "markers" or prompt is None or prompt[2] != self.state or prompt[3].strip():
            self.close()

    # -- the wire ----------------------------------------------------------------------------
    def _send(self, text: str, deadline: float, limit: int | None = None) -> _Reply:
        """Send `text` then a sentinel; read up to the prompt that follows the sentinel's error."""
        if not self.alive:
            return _Reply("eof", "", None, 0)
        nonce = f"fd_nonce_{secrets.token_hex(12)}"
        data = f"{text}\nCheck {nonce}.\n".encode()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        pumped = pump(self.proc.stdin.fileno(), self.proc.stdout.fileno(), send=data,
                      markers=(nonce.encode(), b"</prompt>"), deadline=deadline,
                      limit=self.output_limit if limit is None else max(0, limit), tick=self.memory.poll, tick_s=0.05)
        out = pumped.output.text()
        if pumped.ending != "markers":
            self.close()
            return _Reply(pumped.ending, out, None, pumped.output.total)
        at = out.find(nonce)
        header = out.rfind("Toplevel input", 0, at)
        cut = header if 0 <= at - header < 200 else out.rfind("\n", 0, at) + 1
        prompts = list(_PROMPT.finditer(out, at))
        return _Reply("markers", out[:cut], prompts[-1] if prompts else None, pumped.output.total)

    # -- health -------------------------------------------------------------------------------
    def _near_memory_cap(self, fraction: float = OOM_FRACTION) -> bool:
        """Peak resident memory (from the kernel) against the cap: how out-of-memory is told apart."""
        return self.memory.poll() >= fraction * self.memory_mb

    def _clear_scratch(self) -> None:
        for path in self.scratch.iterdir() if self.scratch.exists() else ():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.alive:
            self.alive = False
            kill_group(self.proc)
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self.proc.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


class WorkerPool:
    """At most `size` workers, kept warm per header; thread-safe.

    Workers are started from one thread that lives as long as the pool: bubblewrap's
    `--die-with-parent` kills the jail when the *thread* that started it ends, and checks
    often run in short-lived threads.
    """

    def __init__(self, *, size: int, memory_mb: int, jail: bool, coq: CoqInstall, max_checks: int = 200) -> None:
        self.size, self.memory_mb, self.jail, self.coq = size, memory_mb, jail, coq
        self.max_checks = max_checks
        self._cond = threading.Condition()
        self._idle: list[CoqtopWorker] = []
        self._busy: set[CoqtopWorker] = set()
        self._count = 0
        self._closed = False
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coqtop-spawner")
        self._root = Path(tempfile.mkdtemp(prefix="fd-coqtop-"))  # the workers' scratch directories
        self._remove = weakref.finalize(self, shutil.rmtree, str(self._root), True)

    @contextmanager
    def worker(self, requires: tuple[str, ...]) -> Iterator[CoqtopWorker]:
        w = self._acquire(requires)
        try:
            yield w
        finally:
            self._release(w)

    def _acquire(self, requires: tuple[str, ...]) -> CoqtopWorker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the prover was closed")
                for dead in [w for w in self._idle if w.proc.poll() is not None]:
                    self._idle.remove(dead)
                    dead.close()
                    self._count -= 1
                match = next((w for w in self._idle if w.requires == requires), None)
                if match is not None:
                    self._idle.remove(match)
                    self._busy.add(match)
                    return match
                if self._count < self.size:
                    self._count += 1
                    break
                if self._idle:
                    self._idle.pop(0).close()
                    self._count -= 1
                    continue
                self._cond.wait()
        try:
            w = self._spawner.submit(CoqtopWorker, requires, memory_mb=self.memory_mb, jail=self.jail,
                                     coq=self.coq, scratch_root=self._root).result()
        except BaseException as error:
            if self._forget_start():
                raise RuntimeError("the prover was closed") from error
            raise
        with self._cond:
            if not self._closed:
                self._busy.add(w)
                return w
        # closed while the worker started: close() did not wait for it, and the spawner thread's end kills it
        w.close()
        self._forget_start()
        raise RuntimeError("the prover was closed")

    def _forget_start(self) -> bool:
        """Give back the slot of a worker that will not be used; whether the pool was closed meanwhile."""
        with self._cond:
            self._count -= 1
            self._cond.notify_all()
            return self._closed

    def _release(self, w: CoqtopWorker) -> None:
        keep = w.alive and w.checks < self.max_checks and not self._closed
        if not keep:
            w.close()
        with self._cond:
            self._busy.discard(w)
            if keep:
                self._idle.append(w)
            else:
                self._count -= 1
            self._cond.notify_all()
            if self._closed and not self._busy:
                self._finish()

    def close(self) -> None:
        """Stop the idle workers now; a busy one finishes its check, then stops with the last of them."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for w in idle:
            w.close()
        if not self._busy:
            self._finish()

    def _finish(self) -> None:
        # the spawner thread ends only now: its end would kill every jailed worker it started, busy ones too
        self._spawner.shutdown(wait=False)
        self._remove()
