"""The prover protocol and the typed results every backend returns.

A backend compiles one source file in a sandbox and reports what the prover said;
it never decides whether a problem is solved (that is `env.verdict`). Infrastructure
failures (timeout, out of memory, crash) are outcomes here, not exceptions, so an
episode can report them to the model and go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from env.problems import Problem

Status = Literal["ok", "error", "timeout", "oom", "crash"]
Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Message:
    """One diagnostic, with 1-based line/column in the checked file (0 when unknown)."""

    severity: Severity
    text: str
    line: int = 0
    column: int = 0

    def render(self, filename: str) -> str:
        where = f"{filename}:{self.line}:{self.column}: " if self.line else ""
        return f"{where}{self.severity}: {self.text}"


@dataclass(frozen=True)
class StatementCheck:
    """Whether the checked file proves the problem's statement, as the prover elaborated it."""

    found: bool  # a declaration with the problem's name exists after the file
    matches: bool  # its elaborated type equals the reference statement's
    detail: str = ""


@dataclass(frozen=True)
class CheckResult:
    """What the prover reported for one file.

    `status` is "ok" when the prover ran to the end with no error message, "error" when it
    ran and reported errors, and "timeout" / "oom" / "crash" when it did not finish.
    `messages` are the model's feedback; nothing in them decides the verdict.
    `uses_sorry` is True when the source text has `sorry`/`admit`/`Admitted` (a quick
    rejection only: a file without these words still needs the trusted re-check).
    `statement`, `axioms` and `unsafe` come from the trusted re-check when `trusted` is
    True: a separate process that ran none of the attempt's code re-checked the compiled
    file with the kernel (Rocq: `coqchk` on the `.vo`; Lean: a kernel replay of the
    `.olean`). Only such a result can be judged solved. `axioms` lists what the problem's
    theorem depends on (None when unknown); `unsafe` lists what the kernel checker
    refused or flagged (declarations that skipped a kernel check, or its failure).
    """

    status: Status
    messages: tuple[Message, ...] = ()
    uses_sorry: bool = False
    axioms: tuple[str, ...] | None = None
    statement: StatementCheck | None = None
    elapsed_s: float = 0.0
    sandboxed: bool = True
    raw_output: str = ""
    trusted: bool = False
    unsafe: tuple[str, ...] = ()
    trusted_s: float = 0.0  # time spent in the trusted re-check (part of elapsed_s)

    @property
    def errors(self) -> tuple[Message, ...]:
        return tuple(m for m in self.messages if m.severity == "error")


@dataclass(frozen=True)
class ToolNames:
    """The names the model sees for the three tools of a prover."""

    write: str
    check: str
    search: str


@dataclass(frozen=True)
class SearchHit:
    path: str  # relative to the library root
    line: int
    text: str


class Prover(Protocol):
    """One proof checker. Implementations: `env.provers.rocq.RocqProver`, `env.provers.lean.LeanProver`."""

    name: str  # "rocq" | "lean"
    file_suffix: str  # ".v" | ".lean"
    tools: ToolNames
    standard_axioms: frozenset[str]  # axioms a solution may depend on
    library_name: str  # what the search tool searches, for its description ("Mathlib")
    language: str  # the proof language as a feedback prompt names it ("Lean 4", "Rocq")

    def render(self, problem: Problem, proof: str | None = None) -> str:
        """Full file text: the header, the statement, then `proof` (or the reference proof)."""
        ...

    def check(
        self, source: str, workdir: Path, *, problem: Problem | None = None, timeout_s: float | None = None
    ) -> CheckResult:
        """Compile `source` (whose file lives in `workdir`) and, given `problem`, check its statement."""
        ...

    def search(self, pattern: str, *, max_hits: int = 50) -> list[SearchHit]:
        """Regex search over the library's sources."""
        ...

    def close(self) -> None: ...
