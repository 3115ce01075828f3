"""The trusted re-check: the attempt compiled to `.olean`, then replayed through the kernel by our checker.

A "solved" verdict never comes from a process that ran the attempt's code, nor from text
that code could print. Three jailed processes, each started fresh:
1. `lean -o` compiles the attempt (this runs its code, so its output only ever turns a
   check into a failure) into an `.olean` in a directory of its own;
2. the reference: the problem's header and statement, proved by `sorry`, compiled the same
   way from the problem alone (once per problem, never with anything of an attempt);
3. `fdcheck` (`lean_project/FdCheck.lean`), in a new directory holding copies of the two
   `.olean` files: it reads them without importing either (no initializer, attribute or
   extension of the attempt runs), imports their imports, replays every declaration of
   the attempt through the kernel, compares the theorem with the reference, collects its
   axioms, and writes its answer to `result.json`. The attempt's processes are gone by
   then, and the directory is new, so nothing of the attempt can write that file.
The answer is the checker's exit status and that file, read through a capped buffer and
checked for consistency (`read_answer`); anything else is a `crash`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from env.problems import Problem
from env.provers import lean_text
from env.provers.base import CheckResult, Message, StatementCheck, Status
from env.provers.lean_jail import LeanToolchain, Outcome

IMPORT_ALLOWANCE_S = 180.0  # a fresh process's `import Mathlib`, on top of the check's own time limit
REFERENCE_TIMEOUT_S = 600.0
CHECKER_TIMEOUT_S = 600.0
ANSWER_CAP = 1 << 16  # bytes of result.json read
FORMAT = 1
ATTEMPT, REFERENCE = "FdAttempt", "FdReference"


class TrustedFailure(Exception):
    """The re-check could not give an answer; `status` says how that is reported (error, timeout, oom, crash)."""

    def __init__(self, status: Status, text: str, messages: tuple[Message, ...] = ()) -> None:
        super().__init__(text)
        self.status, self.text = status, text
        self.messages = messages or (Message("error", text),)


@dataclass(frozen=True)
class Answer:
    """What the kernel checker found: the verdict fields of a trusted `CheckResult`."""

    statement: StatementCheck
    axioms: tuple[str, ...] | None
    unsafe: tuple[str, ...]


def read_answer(returncode: int | None, text: str | None, name: str, output: str = "") -> Answer:
    """The checker's answer from its exit status and result file; TrustedFailure("crash") if it gave none.

    Exit 0 with a theorem report, or exit 2 with `rejected` (the kernel refused a
    declaration of the attempt); exit 1, a missing or malformed file, or a file that
    contradicts the exit status is a failure of the checker, reported with its message.
    """
    def fail(why: str) -> TrustedFailure:
        return TrustedFailure("crash", f"the kernel re-check failed: {why}")

    try:
        answer: Any = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or answer.get("format") != FORMAT:
        raise fail(f"no answer (exit status {returncode}){': ' + output.strip()[-500:] if output.strip() else ''}")
    if returncode == 1 or "error" in answer:
        raise fail(str(answer.get("error") or output.strip()[-500:] or "exit status 1"))
    if returncode == 2 and isinstance(answer.get("rejected"), str):
        return Answer(StatementCheck(False, False, "not compared: the kernel rejected the file"), None,
                      (f"the kernel rejected a declaration: {answer['rejected'][:1000]}",))
    theorem = answer.get("theorem")
    if returncode != 0 or "rejected" in answer or theorem not in _THEOREM:
        raise fail(f"an answer that contradicts its exit status {returncode}")
    if theorem in ("missing", "not_declared_by_the_file"):
        return Answer(StatementCheck(False, False, _THEOREM[theorem].format(name=name)), None, ())
    axioms = answer.get("axioms")
    if not (isinstance(axioms, list) and all(isinstance(a, str) for a in axioms)):
        raise fail("an answer without the theorem's axioms")
    if theorem == "not_a_theorem":
        detail = _THEOREM[theorem].format(name=name, kind=str(answer.get("kind", "?")))
        return Answer(StatementCheck(True, False, detail), tuple(axioms), ())
    same = answer.get("same_statement")
    if not isinstance(same, bool):
        raise fail("an answer without the statement comparison")
    detail = ("the elaborated statement equals the problem's" if same else
              f"the statement of {name} differs from the problem's: {str(answer.get('detail', ''))[:500]}")
    return Answer(StatementCheck(True, same, detail), tuple(axioms), ())


_THEOREM = {
    "declared": "",
    "missing": "no declaration named {name} in the file",
    "not_declared_by_the_file": "{name} is not declared by the file (it comes from an import)",
    "not_a_theorem": "{name} is declared as {kind}, not as a theorem",
}


def compile_messages(output: str) -> tuple[Message, ...]:
    """The errors `lean --json` printed (one JSON object per line); the output's tail when none parse."""
    errors = []
    for line in output.splitlines():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(message, dict) and message.get("severity") == "error":
            errors.append(lean_text.message_from_repl(message))
    return tuple(errors) or (Message("error", output.strip()[-1000:] or "lean failed without a message"),)


def reference_source(problem: Problem) -> str:
    """The file the reference is compiled from: the problem's header and statement, proved by `sorry`."""
    if not lean_text.declares(problem.formal_statement, problem.name):
        raise TrustedFailure("crash", f"the problem's formal statement does not declare `theorem {problem.name}`")
    return lean_text.render(problem, "sorry")


class TrustedChecker:
    """Runs the re-check; thread-safe, at most `slots` at a time (each imports Mathlib twice)."""

    def __init__(self, toolchain: LeanToolchain, *, memory_mb: int, slots: int) -> None:
        self.toolchain = toolchain
        self.memory_mb = memory_mb
        self._root = Path(tempfile.mkdtemp(prefix="lean-trusted-"))
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._references: dict[str, Path | TrustedFailure] = {}
        self._reference_locks: dict[str, threading.Lock] = {}

    def check(self, source: str, problem: Problem, timeout_s: float) -> CheckResult:
        """A `CheckResult` whose verdict fields come from the checker (`trusted=True`), or a failure status."""
        start = time.monotonic()
        try:
            with self._slots:
                reference = self._reference(problem)
                answer, raw = self._check(source, reference, problem.name, timeout_s)
        except TrustedFailure as failure:
            return CheckResult(status=failure.status, messages=failure.messages, sandboxed=self.toolchain.jailed,
                               raw_output=failure.text, trusted_s=time.monotonic() - start)
        return CheckResult(status="ok", uses_sorry=answer.axioms is not None and "sorryAx" in answer.axioms,
                           axioms=answer.axioms, statement=answer.statement, unsafe=answer.unsafe, trusted=True,
                           trusted_s=time.monotonic() - start, sandboxed=self.toolchain.jailed, raw_output=raw)

    def _check(self, source: str, reference: Path, name: str, timeout_s: float) -> tuple[Answer, str]:
        compiled = Path(tempfile.mkdtemp(prefix="compile-", dir=self._root))
        checked = Path(tempfile.mkdtemp(prefix="check-", dir=self._root))
        try:
            olean = self._compile(compiled, ATTEMPT, source, timeout_s + IMPORT_ALLOWANCE_S, "the file")
            shutil.copyfile(olean, checked / "attempt.olean")
            shutil.copyfile(reference, checked / "reference.olean")
            argv = [str(self.toolchain.checker), "attempt.olean", "reference.olean", name, "result.json"]
            outcome = self.toolchain.launch(argv, checked, self.memory_mb).run(CHECKER_TIMEOUT_S)
            if outcome.timed_out:
                raise TrustedFailure("timeout", f"the kernel re-check did not finish within {CHECKER_TIMEOUT_S:.0f} s")
            if outcome.out_of_memory:
                raise TrustedFailure("oom", f"the kernel re-check ran out of memory (limit {self.memory_mb} MB)")
            text = _read_capped(checked / "result.json", ANSWER_CAP)
            return read_answer(outcome.returncode, text, name, outcome.output), text or ""
        finally:
            shutil.rmtree(compiled, ignore_errors=True)
            shutil.rmtree(checked, ignore_errors=True)

    def _compile(self, workdir: Path, module: str, source: str, timeout_s: float, what: str) -> Path:
        """`lean --json -o MODULE.olean MODULE.lean` in a jail whose only writable place is `workdir`."""
        (workdir / f"{module}.lean").write_text(source, encoding="utf-8")
        argv = [str(self.toolchain.lean), "--json", "-o", f"{module}.olean", f"{module}.lean"]
        outcome: Outcome = self.toolchain.launch(argv, workdir, self.memory_mb).run(timeout_s)
        if outcome.timed_out:
            raise TrustedFailure("timeout", f"compiling {what} for the kernel re-check took longer than "
                                            f"{timeout_s:.0f} s")
        if outcome.out_of_memory:
            raise TrustedFailure("oom", f"compiling {what} ran out of memory (limit {self.memory_mb} MB)")
        olean = workdir / f"{module}.olean"
        if outcome.returncode != 0:
            raise TrustedFailure("error", f"{what} does not compile", compile_messages(outcome.output))
        if not olean.is_file():
            raise TrustedFailure("crash", f"compiling {what} produced no .olean")
        return olean

    def _reference(self, problem: Problem) -> Path:
        """The reference `.olean` of `problem`, compiled once (a failure is remembered too)."""
        key = hashlib.sha256("\0".join((problem.name, problem.header, problem.formal_statement)).encode()).hexdigest()
        with self._lock:
            lock = self._reference_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._references:
                workdir = self._root / f"reference-{key[:16]}"
                workdir.mkdir(exist_ok=True)
                try:
                    self._references[key] = self._compile(workdir, REFERENCE, reference_source(problem),
                                                          REFERENCE_TIMEOUT_S, "the problem's statement")
                except TrustedFailure as failure:
                    if failure.status not in ("error", "crash"):
                        raise  # a timeout or out of memory may pass: compile it again next time
                    # The compiler's messages, then what they mean (the last error is the verdict's detail).
                    messages = tuple(m for m in failure.messages if m.text != failure.text)
                    self._references[key] = TrustedFailure("crash", failure.text,
                                                           messages + (Message("error", failure.text),))
            found = self._references[key]
        if isinstance(found, TrustedFailure):
            raise found
        return found

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)


def _read_capped(path: Path, cap: int) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read(cap + 1)
    except OSError:
        return None
    return data[:cap].decode("utf-8", "replace") if len(data) <= cap else None
