"""`LeanProver` end to end against stand-ins for the toolchain (no Lean exists here): a fake `lake`, REPL,
`lean` and kernel checker laid out as a built project (`conftest.fake_lean`), run as real subprocesses
under the real jail where bubblewrap works. What they cannot show (Lean's own behaviour) is in
test_lean_integration.py and test_lean_exploits.py, which need a toolchain."""

import json

import pytest

from env.problems import Problem
from env.provers import lean as lean_module
from env.provers import lean_text
from env.provers.base import CheckResult, Message, StatementCheck
from env.provers.lean import LeanProver, LeanUnavailableError, feedback_result, unavailable_reason, with_trusted
from env.sandbox import EpisodeDir, jail_available
from env.verdict import judge
from tests.env.conftest import LEAN_HEADER, LEAN_PROBLEM

HEADER, PROBLEM = LEAN_HEADER, LEAN_PROBLEM


@pytest.fixture
def prover(fake_lean):
    prover = LeanProver(fake_lean.project, timeout_s=30, memory_mb=2048)
    yield prover
    prover.close()


def verdict(prover, source, problem=PROBLEM):
    with EpisodeDir() as d:
        result = prover.check(source, d.root, problem=problem)
    return result, judge(result, problem, prover)


def test_the_reference_proof_is_solved_by_the_trusted_re_check(prover):
    result, v = verdict(prover, prover.render(PROBLEM))
    assert v.solved and v.reason == "solved"
    assert result.trusted and result.statement.matches and result.trusted_s > 0
    assert result.sandboxed == jail_available() == prover.toolchain.jailed
    assert result.elapsed_s >= result.trusted_s


@pytest.mark.parametrize(("proof", "reason"), [
    ("FD_ERROR", "does_not_compile"),  # the REPL's error: no re-check
    ("FD_SORRY", "uses_sorry"),
    ("sorry", "uses_sorry"),
    ("linarith -- FD_COMPILE_ERROR", "does_not_compile"),  # elaborated in the REPL, but not when compiled
    ("linarith -- FD_CHECK_REJECT", "kernel_rejected"),
    ("linarith -- FD_CHECK_CRASH", "prover_crash"),
    ("linarith -- FD_CHECK_LIE", "prover_crash"),
    ("native_decide", "nonstandard_axioms"),
    ("linarith -- FD_FORGE", "prover_crash"),  # forged REPL output, seen in a fresh worker too
    ("linarith -- FD_DIE", "prover_crash"),
])
def test_verdicts(prover, proof, reason):
    result, v = verdict(prover, lean_text.render(PROBLEM, proof))
    assert not v.solved and v.reason == reason, (v, result.messages)


def test_blocked_constructs_never_reach_lean(prover, fake_lean):
    source = HEADER + "set_option debug.skipKernelTC true\n" + PROBLEM.formal_statement + "\n  linarith"
    result, v = verdict(prover, source)
    assert v.reason == "does_not_compile" and "debug.skipKernelTC" in result.messages[0].text
    assert prover.pool._workers[0].repl is None and fake_lean.compiles() == 0


def test_statement_changes_and_missing_theorems(prover):
    weaker = HEADER + PROBLEM.formal_statement.replace("x = 5", "x ≤ 5") + "\n  linarith"
    assert verdict(prover, weaker)[1].reason == "statement_changed"
    renamed = HEADER + PROBLEM.formal_statement.replace("fd_lean_linear_eq_1", "other") + "\n  linarith"
    assert verdict(prover, renamed)[1].reason == "theorem_not_found"
    as_def = HEADER + PROBLEM.formal_statement.replace("theorem", "def") + "\n  linarith"
    result, v = verdict(prover, as_def)
    assert v.reason == "statement_changed" and "declared as def" in v.detail


def test_a_forging_file_does_not_disturb_the_next_check(prover):
    verdict(prover, lean_text.render(PROBLEM, "linarith -- FD_LATE"))
    result, v = verdict(prover, prover.render(PROBLEM))
    assert v.solved, (v, result.messages)


def test_odd_imports_are_checked_in_a_one_off_worker(prover):
    verdict(prover, prover.render(PROBLEM))
    warm = prover.pool._workers[0].repl.pid
    odd = "import Mathlib.Tactic\n" + PROBLEM.formal_statement + "\n  linarith"
    result, v = verdict(prover, odd)
    assert v.solved, (v, result.messages)
    assert prover.pool._workers[0].repl.pid == warm


def test_a_check_without_a_problem_is_feedback_only(prover, fake_lean):
    with EpisodeDir() as d:
        result = prover.check(prover.render(PROBLEM), d.root)
    assert result.status == "ok" and not result.trusted and result.statement is None
    assert fake_lean.compiles() == 0


def test_a_problem_whose_statement_is_broken_is_a_clear_crash(prover):
    broken = Problem("t", "lean", HEADER, "theorem t : True := by FD_COMPILE_ERROR", formal_proof="\n  trivial")
    result, v = verdict(prover, prover.render(broken).replace("FD_COMPILE_ERROR", ""), broken)
    assert v.reason == "prover_crash" and "the problem's statement does not compile" in v.detail
    missing = Problem("t", "lean", HEADER, "theorem t2 : True := by", formal_proof="\n  trivial")
    result, v = verdict(prover, prover.render(missing), missing)
    assert v.reason == "prover_crash" and "does not declare `theorem t`" in v.detail


def test_feedback_result_places_messages_in_the_file_and_reads_sorry():
    source = lean_text.render(PROBLEM, "nlinarith")
    split = lean_text.split_imports(source)
    reply = {"env": 4, "messages": [{"severity": "error", "pos": {"line": 8, "column": 2}, "endPos": None,
                                     "data": "linarith failed"}], "sorries": []}
    result = feedback_result(source, split, [{"severity": "error", "data": "unknown module Foo"}], reply,
                             sandboxed=True)
    assert result.status == "error" and not result.trusted
    assert result.messages == (Message("error", "in the imports: unknown module Foo"),
                               Message("error", "linarith failed", 9, 3))
    assert json.loads(result.raw_output)["messages"] == reply["messages"]
    clean = feedback_result(source, split, [], {"env": 4, "messages": [], "sorries": [{"goal": "⊢ False"}]},
                            sandboxed=False)
    assert clean.status == "ok" and clean.uses_sorry and not clean.sandboxed


def test_with_trusted_takes_the_verdict_fields_only_from_the_re_check():
    feedback = CheckResult(status="ok", messages=(Message("warning", "unused variable"),),
                           statement=StatementCheck(True, True), axioms=("propext",))  # as a forged reply could say
    answer = CheckResult(status="ok", statement=StatementCheck(True, False, "differs"), axioms=("sorryAx",),
                         uses_sorry=True, trusted=True, trusted_s=2.5)
    merged = with_trusted(feedback, answer)
    assert merged.trusted and merged.statement == answer.statement and merged.axioms == ("sorryAx",)
    assert merged.uses_sorry and merged.trusted_s == 2.5 and merged.messages == feedback.messages
    failed = with_trusted(feedback, CheckResult(status="crash", messages=(Message("error", "checker died"),)))
    assert failed.status == "crash" and not failed.trusted
    assert failed.messages == feedback.messages + (Message("error", "checker died"),)


# --- availability ---------------------------------------------------------------------------------------------------

def test_unavailable_reasons_say_how_to_fix_them(fake_lean, tmp_path, monkeypatch):
    assert unavailable_reason(fake_lean.project, allow_unjailed=True) is None
    assert "not built (no fdcheck)" in unavailable_reason(_without(fake_lean.project / ".lake/build/bin/fdcheck"))
    assert "Mathlib is not downloaded" in unavailable_reason(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "`lake` is not on PATH" in unavailable_reason(fake_lean.project)


def _without(path):
    path.unlink()
    return path.parents[3]


def test_without_bubblewrap_the_prover_refuses_unless_allowed_and_then_warns(fake_lean, monkeypatch, capsys):
    monkeypatch.setattr(lean_module, "jail_available", lambda: False)
    reason = unavailable_reason(fake_lean.project)
    assert "bubblewrap" in reason and "allow_unjailed=True" in reason
    with pytest.raises(LeanUnavailableError, match="bubblewrap"):
        LeanProver(fake_lean.project)
    prover = LeanProver(fake_lean.project, allow_unjailed=True, timeout_s=30, memory_mb=2048)
    try:
        assert "WITHOUT a jail" in capsys.readouterr().err
        result, v = verdict(prover, prover.render(PROBLEM))
        assert v.solved and not result.sandboxed
    finally:
        prover.close()


def test_constructing_the_prover_without_a_toolchain_says_how_to_enable_it(tmp_path):
    assert not LeanProver.available(tmp_path)
    assert "lake exe cache get && lake build" in unavailable_reason(tmp_path)
    with pytest.raises(LeanUnavailableError, match="lake exe cache get && lake build"):
        LeanProver(tmp_path)
