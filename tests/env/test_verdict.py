"""`judge`, the reward's only source, on hand-made check results: each reason, and their precedence."""

from dataclasses import replace

import pytest

from env.problems import Problem
from env.provers.base import CheckResult, Message, StatementCheck
from env.verdict import REASONS, Verdict, judge


class Prover:
    """The one attribute of a prover that `judge` reads."""

    standard_axioms = frozenset({"Coq.Logic.Classical_Prop.classic"})


PROBLEM = Problem(name="p", prover="rocq", header="", formal_statement="Theorem p : True.\nProof.")
SOLVED = CheckResult(status="ok", statement=StatementCheck(True, True), axioms=("Coq.Logic.Classical_Prop.classic",),
                     trusted=True)


def verdict(**changes):
    return judge(replace(SOLVED, **changes), PROBLEM, Prover())


def test_a_trusted_clean_result_is_solved():
    assert verdict() == Verdict(True, "solved", "") and verdict(axioms=()) == Verdict(True, "solved", "")


NOT_RECHECKED = "the file was not re-checked by the trusted kernel checker"
LONG = "x" * 300


@pytest.mark.parametrize("changes, reason, detail", [
    ({"status": "timeout", "messages": (Message("error", "a"), Message("error", "b"), Message("error", "too slow"))},
     "timeout", "too slow"),
    ({"status": "timeout"}, "timeout", ""),
    ({"status": "oom"}, "out_of_memory", ""),
    ({"status": "crash", "messages": (Message("error", "a"), Message("error", "b"), Message("error", "exit 139"))},
     "prover_crash", "exit 139"),
    ({"status": "crash"}, "prover_crash", ""),
    ({"status": "error", "messages": (Message("info", "hi"), Message("error", LONG, 3, 1), Message("error", "2nd"))},
     "does_not_compile", f"line 3: {'x' * 200}"),
    ({"status": "error"}, "does_not_compile", ""),
    ({"uses_sorry": True}, "uses_sorry", "the proof is incomplete (sorry, admit, Admitted or Abort)"),
    ({"trusted": False}, "not_checked", NOT_RECHECKED),
    ({"statement": None}, "not_checked", NOT_RECHECKED),
    ({"unsafe": ("a relies on type-in-type", "b " + "y" * 600)}, "kernel_rejected",
     ("a relies on type-in-type; b " + "y" * 600)[:500]),
    ({"statement": StatementCheck(False, False, "no theorem named p in the file")}, "theorem_not_found",
     "no theorem named p in the file"),
    ({"statement": StatementCheck(False, False)}, "theorem_not_found", "no theorem named p"),
    ({"statement": StatementCheck(True, False, "differs")}, "statement_changed", "differs"),
    ({"axioms": None}, "not_checked", "the axioms of the theorem could not be determined"),
    ({"axioms": ("Coq.Logic.Classical_Prop.classic", "FdAttempt.magic", "A.b")}, "nonstandard_axioms",
     "A.b, FdAttempt.magic"),
])
def test_each_failure_has_its_reason(changes, reason, detail):
    assert verdict(**changes) == Verdict(False, reason, detail) and reason in REASONS


def test_a_verdict_describes_itself():
    v = Verdict(False, "statement_changed", "differs")
    assert v.to_dict() == {"solved": False, "reason": "statement_changed", "detail": "differs"}
    assert v.describe() == "statement changed: differs" and Verdict(True, "solved").describe() == "solved"


def test_failures_win_over_a_solved_looking_rest():
    """Only the trusted re-check can say solved; any failure anywhere turns the verdict."""
    assert verdict(status="error", trusted=True).reason == "does_not_compile"
    assert verdict(uses_sorry=True, unsafe=("x",)).reason == "uses_sorry"
    assert verdict(unsafe=("x",), statement=StatementCheck(False, False)).reason == "kernel_rejected"
    assert verdict(trusted=False, statement=StatementCheck(True, True), axioms=()).reason == "not_checked"
