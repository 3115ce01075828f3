"""Lean 4 + Mathlib backend: warm REPL workers for feedback, a kernel re-check of the compiled file for the verdict.

A check has two paths (the principle: "solved" never comes from a process that ran the
file's code, nor from text that code could print):
- feedback: the file's body runs in a warm REPL worker that has already loaded the
  problem header's imports (`env.provers.lean_workers`, framing in
  `env.provers.lean_repl`). Its messages are what the model sees; errors or a `sorry`
  end the check there.
- verdict: a file that elaborated cleanly is compiled to `.olean` in a fresh jailed
  process and re-checked by our kernel checker, a Lean program of this project
  (`lean_project/FdCheck.lean`, via `env.provers.lean_trusted`). Only that check fills
  `statement`, `axioms` and `unsafe` and sets `trusted`.

Everything runs under bubblewrap (`env.provers.lean_jail`): no network, a scrubbed
environment, read-only toolchain and built packages, one scratch directory. The
repository and its `data/` are never visible. Without bubblewrap the prover refuses to
start unless `allow_unjailed=True` (the file's code could then read the reference proofs
and overwrite the checker's answer), and says so on stderr and in every result
(`sandboxed=False`).

Nothing is fetched at run time: `lake build` builds the REPL (a pinned requirement of
the Lake project), the checker and the header's imports.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from env.problems import Problem
from env.provers import lean_text
from env.provers.base import CheckResult, Message, SearchHit, ToolNames
from env.provers.lean_jail import LeanToolchain, read_toolchain
from env.provers.lean_repl import ReplFailure
from env.provers.lean_trusted import TrustedChecker
from env.provers.lean_workers import WorkerPool
from env.sandbox import jail_available
from env.search import rg_search

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDARD_AXIOMS = frozenset({"propext", "Classical.choice", "Quot.sound"})
HEADROOM_MB = 6144  # address space a worker may add to its imports' footprint while checking
NO_JAIL_WARNING = ("WARNING: bubblewrap is unavailable; Lean checks run WITHOUT a jail. The checked files' code can "
                   "read and write anything this user can, including the problems' reference proofs and the kernel "
                   "checker's answers. Do not train like this.")


class LeanUnavailableError(RuntimeError):
    """No Lean toolchain, no built project, or no jail: the Lean backend cannot run here."""


def unavailable_reason(project_dir: Path = REPO_ROOT, *, allow_unjailed: bool = False) -> str | None:
    """Why the Lean backend cannot run with `project_dir`, with how to fix it; None when it can."""
    fix = ("install elan (https://github.com/leanprover/elan), then run `lake exe cache get && lake build` "
           f"in {project_dir}")
    build = project_dir / ".lake" / "build"
    if shutil.which("lake") is None:
        return f"`lake` is not on PATH: {fix}"
    if not (project_dir / ".lake" / "packages" / "mathlib").is_dir():
        return f"Mathlib is not downloaded in {project_dir}/.lake/packages: {fix}"
    missing = [p.name for p in (build / "lib" / "lean" / "FdHeader.olean", build / "bin" / "fdrepl",
                                build / "bin" / "fdcheck") if not p.exists()]
    if missing:
        return f"the project in {project_dir} is not built (no {', '.join(missing)}): {fix}"
    if not allow_unjailed and not jail_available():
        return ("bubblewrap cannot run here (apt-get install bubblewrap), and without its jail a checked file's "
                "code could read the reference proofs and forge the kernel check's answer; pass "
                "allow_unjailed=True to run anyway")
    return None


class LeanProver:
    """The `Prover` for Lean 4 + Mathlib; thread-safe, a check waits for a free worker."""

    name = "lean"
    file_suffix = ".lean"
    tools = ToolNames(write="lean_write_file", check="lean_check_file", search="rg_in_mathlib")
    standard_axioms = STANDARD_AXIOMS
    library_name = "Mathlib"
    language = "Lean 4"

    @classmethod
    def available(cls, project_dir: Path = REPO_ROOT) -> bool:
        """True when `lake` is on PATH, the project is built and bubblewrap works."""
        return unavailable_reason(project_dir) is None

    def __init__(self, project_dir: Path = REPO_ROOT, *, timeout_s: float = 60.0, memory_mb: int = 16384,
                 workers: int = 1, max_checks_per_worker: int = 200, allow_unjailed: bool = False) -> None:
        reason = unavailable_reason(project_dir, allow_unjailed=allow_unjailed)
        if reason is not None:
            raise LeanUnavailableError(f"the Lean backend is unavailable: {reason}")
        self.sandboxed = jail_available()
        if not self.sandboxed:
            print(NO_JAIL_WARNING, file=sys.stderr, flush=True)
        try:
            self.toolchain: LeanToolchain = read_toolchain(project_dir.resolve(), jailed=self.sandboxed)
        except (RuntimeError, ValueError, OSError) as e:
            raise LeanUnavailableError(f"the Lean backend is unavailable: {e}") from None
        self.project_dir = self.toolchain.project_dir
        self.timeout_s = timeout_s
        self.pool = WorkerPool(lambda scratch, mb: self.toolchain.launch([str(self.toolchain.repl)], scratch, mb),
                               workers=workers, ceiling_mb=memory_mb, headroom_mb=HEADROOM_MB,
                               max_checks=max_checks_per_worker)
        self.trusted = TrustedChecker(self.toolchain, memory_mb=memory_mb, slots=workers)
        self._closed = False

    def render(self, problem: Problem, proof: str | None = None) -> str:
        return lean_text.render(problem, proof)

    def check(self, source: str, workdir: Path, *, problem: Problem | None = None,
              timeout_s: float | None = None) -> CheckResult:
        """Feedback from a warm worker; with a problem, a file that elaborated cleanly is then re-checked.

        `workdir` is not read: the REPL gets the text, and the re-check compiles a copy.
        """
        start = time.monotonic()
        timeout_s = timeout_s or self.timeout_s
        blocks = lean_text.blocked_constructs(source)
        if blocks:
            result = CheckResult(status="error", messages=tuple(b.message() for b in blocks),
                                 uses_sorry=lean_text.text_uses_sorry(source), sandboxed=self.sandboxed)
        else:
            result = self.feedback(source, problem, timeout_s)
            if problem is not None and result.status == "ok" and not result.uses_sorry:
                result = with_trusted(result, self.trusted_check(source, problem, timeout_s))
        return replace(result, elapsed_s=time.monotonic() - start)

    def feedback(self, source: str, problem: Problem | None, timeout_s: float) -> CheckResult:
        """What the REPL says about `source` (never trusted). The problem's header imports pick the warm worker."""
        split = lean_text.split_imports(source)
        header = lean_text.split_imports(problem.header).imports if problem is not None else split.imports
        try:
            import_messages, reply = self.pool.run(split.imports, split.body if split.body.strip() else "\n",
                                                   timeout_s, warm=split.imports == header)
        except ReplFailure as failure:
            return CheckResult(status=failure.status, messages=(Message("error", failure.text),),
                               uses_sorry=lean_text.text_uses_sorry(source), sandboxed=self.sandboxed,
                               raw_output=failure.text)
        return feedback_result(source, split, import_messages, reply, sandboxed=self.sandboxed)

    def trusted_check(self, source: str, problem: Problem, timeout_s: float) -> CheckResult:
        """The kernel re-check alone (no REPL, no filter): the verdict fields, or a failure status."""
        return self.trusted.check(source, problem, timeout_s)

    def search(self, pattern: str, *, max_hits: int = 50) -> list[SearchHit]:
        root = self.project_dir / ".lake" / "packages" / "mathlib" / "Mathlib"
        if not root.is_dir():
            raise FileNotFoundError(f"Mathlib sources not found at {root}: run `lake exe cache get && lake build` "
                                    f"in {self.project_dir}")
        return [replace(hit, path=f"Mathlib/{hit.path}")
                for hit in rg_search(root, pattern, glob="*.lean", max_hits=max_hits)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pool.close()
        self.trusted.close()


def feedback_result(source: str, split: lean_text.FileSplit, import_messages: list[dict], reply: dict, *,
                    sandboxed: bool) -> CheckResult:
    """The REPL's reply as a `CheckResult`: messages placed in the whole file, status, sorry."""
    messages = tuple(Message("error", f"in the imports: {m['data']}")
                     for m in import_messages if m["severity"] == "error")
    messages += tuple(lean_text.message_from_repl(m, split) for m in reply["messages"])
    return CheckResult(
        status="error" if any(m.severity == "error" for m in messages) else "ok", messages=messages,
        uses_sorry=lean_text.uses_sorry(source, reply["sorries"], reply["messages"]), sandboxed=sandboxed,
        raw_output=json.dumps({"messages": reply["messages"], "sorries": reply["sorries"]}, ensure_ascii=False))


def with_trusted(feedback: CheckResult, trusted: CheckResult) -> CheckResult:
    """The REPL's feedback with the verdict fields of the re-check; a failed re-check adds its status and messages."""
    if trusted.status != "ok":
        return replace(feedback, status=trusted.status, messages=feedback.messages + trusted.messages,
                       trusted_s=trusted.trusted_s, raw_output=trusted.raw_output)
    return replace(feedback, trusted=trusted.trusted, statement=trusted.statement, axioms=trusted.axioms,
                   unsafe=trusted.unsafe, trusted_s=trusted.trusted_s,
                   uses_sorry=feedback.uses_sorry or trusted.uses_sorry)
