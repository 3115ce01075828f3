"""The verdict: whether a checked file solves its problem. This is the reward's only source."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from env.problems import Problem
from env.provers.base import CheckResult, Prover

REASONS = (
    "solved", "does_not_compile", "timeout", "out_of_memory", "prover_crash", "uses_sorry",
    "theorem_not_found", "statement_changed", "nonstandard_axioms", "kernel_rejected", "not_checked",
)


@dataclass(frozen=True)
class Verdict:
    solved: bool
    reason: str  # one of REASONS
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return self.reason.replace("_", " ") + (f": {self.detail}" if self.detail else "")


def judge(result: CheckResult, problem: Problem, prover: Prover) -> Verdict:
    """Solved iff the file compiled cleanly, proves the unchanged statement, and uses no sorry or extra axiom.

    Every fact behind a "solved" comes from the trusted re-check (`result.trusted`); the
    prover's messages only ever turn a verdict into a failure.
    """
    if result.status == "timeout":
        return Verdict(False, "timeout", result.errors[-1].text if result.errors else "")
    if result.status == "oom":
        return Verdict(False, "out_of_memory")
    if result.status == "crash":
        return Verdict(False, "prover_crash", result.errors[-1].text if result.errors else "")
    if result.status == "error":
        first = result.errors[0] if result.errors else None
        return Verdict(False, "does_not_compile", f"line {first.line}: {first.text[:200]}" if first else "")
    if result.uses_sorry:
        return Verdict(False, "uses_sorry", "the proof is incomplete (sorry, admit, Admitted or Abort)")
    if not result.trusted or result.statement is None:
        return Verdict(False, "not_checked", "the file was not re-checked by the trusted kernel checker")
    if result.unsafe:
        return Verdict(False, "kernel_rejected", "; ".join(result.unsafe)[:500])
    if not result.statement.found:
        return Verdict(False, "theorem_not_found", result.statement.detail or f"no theorem named {problem.name}")
    if not result.statement.matches:
        return Verdict(False, "statement_changed", result.statement.detail)
    if result.axioms is None:
        return Verdict(False, "not_checked", "the axioms of the theorem could not be determined")
    extra = sorted(set(result.axioms) - prover.standard_axioms)
    if extra:
        return Verdict(False, "nonstandard_axioms", ", ".join(extra))
    return Verdict(True, "solved")
