"""`judge`, the reward's only source, on hand-made check results: each reason, and their precedence."""

from dataclasses import replace

import pytest

from env.problems import Problem
from env.provers.base import CheckResult, Message, StatementCheck
from env.verdict import REASONS, judge


class Prover:
    """The one attribute of a prover that `judge` reads."""

    standard_axioms = frozenset({"Coq.Logic.Classical_Prop.classic"})


PROBLEM = Problem(name="p", prover="rocq", header="", formal_statement="Theorem p : True.\nProof.")
SOLVED = CheckResult(status="ok", statement=StatementCheck(True, True), axioms=("Coq.Logic.Classical_Prop.classic",),
                     trusted=True)


def verdict(**changes):
    return judge(replace(SOLVED, **changes), PROBLEM, Prover())


def test_a_trusted_clean_result_is_solved():
    assert verdict() == judge(SOLVED, PROBLEM, Prover()) and verdict().solved and verdict().reason == "solved"
    assert verdict(axioms=()).solved


@pytest.mark.parametrize("changes, reason", [
    ({"status": "timeout", "messages": (Message("error", "too slow"),)}, "timeout"),
    ({"status": "oom"}, "out_of_memory"),
    ({"status": "crash"}, "prover_crash"),
    ({"status": "error", "messages": (Message("error", "bad", 3, 1),)}, "does_not_compile"),
    ({"uses_sorry": True}, "uses_sorry"),
    ({"trusted": False}, "not_checked"),
    ({"statement": None}, "not_checked"),
    ({"unsafe": ("FdAttempt.loop relies on unchecked (co)fixpoints",)}, "kernel_rejected"),
    ({"statement": StatementCheck(False, False, "no theorem named p")}, "theorem_not_found"),
    ({"statement": StatementCheck(True, False, "differs")}, "statement_changed"),
    ({"axioms": None}, "not_checked"),
    ({"axioms": ("Coq.Logic.Classical_Prop.classic", "FdAttempt.magic")}, "nonstandard_axioms"),
])
def test_each_failure_has_its_reason(changes, reason):
    v = verdict(**changes)
    assert not v.solved and v.reason == reason and reason in REASONS


def test_details_say_what_failed():
    assert verdict(status="error", messages=(Message("error", "bad", 3, 1),)).detail == "line 3: bad"
    assert verdict(axioms=("FdAttempt.magic", "A.b")).detail == "A.b, FdAttempt.magic"
    assert "fixpoints" in verdict(unsafe=("FdAttempt.loop relies on unchecked (co)fixpoints",)).detail


def test_failures_win_over_a_solved_looking_rest():
    """Only the trusted re-check can say solved; any failure anywhere turns the verdict."""
    assert verdict(status="error", trusted=True).reason == "does_not_compile"
    assert verdict(uses_sorry=True, unsafe=("x",)).reason == "uses_sorry"
    assert verdict(unsafe=("x",), statement=StatementCheck(False, False)).reason == "kernel_rejected"
    assert verdict(trusted=False, statement=StatementCheck(True, True), axioms=()).reason == "not_checked"
