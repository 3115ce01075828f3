"""The Lean backend against a real toolchain: reference proofs verify, cheats fail, warm checks, timeouts.

These run only where `LeanProver.available()`: `lake` on PATH and the project built
(install elan, then `lake exe cache get && lake build` in the repository root).
"""

from pathlib import Path

import pytest

from env.problems import Problem, load_problems
from env.provers.lean import LeanProver
from env.sandbox import EpisodeDir, jail_available
from env.verdict import judge

DATA = Path(__file__).resolve().parents[2] / "data"
HOW = ("needs a Lean toolchain and the built project: install elan, then run "
       "`lake exe cache get && lake build` in the repository root")
pytestmark = [pytest.mark.lean, pytest.mark.skipif(not LeanProver.available(), reason=HOW)]
PROBLEMS = {p.name: p for p in load_problems(DATA / "lean_problems.jsonl")}
LINEAR = PROBLEMS["fd_lean_linear_eq_1"]  # (x : ℝ) (h₀ : 3 * x + 7 = 22) : x = 5
SQUARES = PROBLEMS["fd_lean_two_sq_ineq"]  # (a b : ℝ) : 2 * a * b ≤ a ^ 2 + b ^ 2
POWER = PROBLEMS["fd_lean_pow_mod_seven"]  # 2 ^ 10 % 7 = 2


def file_with(problem: Problem, before: str = "", statement: str | None = None, proof: str = "") -> str:
    """The problem's file with `before` inserted after the header and the given statement/proof."""
    return problem.header + before + (statement or problem.formal_statement) + proof


# name -> (problem, source, verdict reasons that count as caught)
CHEATS = {
    "sorry": (LINEAR, file_with(LINEAR, proof="\n  sorry"), {"uses_sorry"}),
    "native_decide": (POWER, file_with(POWER, proof="\n  native_decide"), {"nonstandard_axioms"}),
    "added_axiom": (LINEAR, file_with(LINEAR, "axiom magic : ∀ P : Prop, P\n\n", proof="\n  exact magic _"),
                    {"nonstandard_axioms"}),
    "weaker_statement": (LINEAR, file_with(LINEAR, statement=LINEAR.formal_statement.replace("x = 5", "x ≤ 5"),
                                           proof="\n  linarith"), {"statement_changed"}),
    # ℝ read as ℕ: the statement becomes a different (still provable) one; an ambiguity error also stops it
    "notation": (LINEAR, file_with(LINEAR, 'local notation (priority := high) "ℝ" => ℕ\n\n', proof="\n  omega"),
                 {"statement_changed", "does_not_compile"}),
    "local_instance": (SQUARES, file_with(SQUARES, "local instance (priority := high) fakeLE : LE ℝ := "
                                          "⟨fun _ _ => True⟩\n\n", proof="\n  exact True.intro"),
                       {"statement_changed"}),
    "other_name": (LINEAR, file_with(LINEAR, statement=LINEAR.formal_statement.replace("fd_lean_linear_eq_1", "other"),
                                     proof="\n  linarith"), {"theorem_not_found"}),
    "borrows_the_reference": (LINEAR, file_with(LINEAR, proof="\n  exact __fd_reference__ x h₀"),
                              {"uses_sorry", "does_not_compile"}),
    "skips_the_kernel": (LINEAR, file_with(LINEAR, "set_option debug.skipKernelTC true\n\n", proof="\n  linarith"),
                         {"does_not_compile"}),
    "wrong_proof": (LINEAR, file_with(LINEAR, proof="\n  nlinarith [sq_nonneg x]\n  exact rfl"),
                    {"does_not_compile"}),
}


@pytest.fixture(scope="module")
def lean():
    prover = LeanProver(timeout_s=120)
    yield prover
    prover.close()


def check(prover, source, problem, **kw):
    with EpisodeDir() as d:
        result = prover.check(source, d.root, problem=problem, **kw)
    return result, judge(result, problem, prover)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_reference_proofs_verify(lean, name):
    problem = PROBLEMS[name]
    result, verdict = check(lean, lean.render(problem), problem)
    assert result.status == "ok", result.messages
    assert not result.uses_sorry
    assert result.statement is not None and result.statement.matches, result.statement
    assert result.axioms is not None and set(result.axioms) <= lean.standard_axioms
    assert verdict.solved, verdict
    assert result.sandboxed == jail_available()


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_cheats_are_caught(lean, cheat):
    problem, source, reasons = CHEATS[cheat]
    result, verdict = check(lean, source, problem)
    assert not verdict.solved
    assert verdict.reason in reasons, (verdict, result.messages, result.statement, result.axioms)


def test_errors_point_at_the_line_in_the_file(lean):
    source = file_with(LINEAR, proof="\n  nlinarith [sq_nonneg x]\n  exact rfl")
    result, _ = check(lean, source, LINEAR)
    lines = source.split("\n")
    assert result.errors and all(0 < m.line <= len(lines) for m in result.errors)
    assert any(lines[m.line - 1].strip().startswith(("nlinarith", "exact", "theorem")) for m in result.errors)


def test_search_finds_mathlib_lemmas(lean):
    hits = lean.search(r"\bsq_nonneg\b")
    assert hits and all(h.path.startswith("Mathlib/") and h.path.endswith(".lean") for h in hits)


def test_a_warm_check_is_faster_than_the_cold_first_one():
    prover = LeanProver(timeout_s=120, workers=1)
    try:
        cold, _ = check(prover, prover.render(LINEAR), LINEAR)
        warm, verdict = check(prover, prover.render(LINEAR, "nlinarith [h₀]"), LINEAR)
    finally:
        prover.close()
    assert verdict.solved, verdict
    assert warm.elapsed_s < cold.elapsed_s / 2, (warm.elapsed_s, cold.elapsed_s)


def test_a_non_terminating_tactic_times_out_and_the_prover_recovers(lean):
    result, verdict = check(lean, file_with(LINEAR, proof="\n  sleep 600000\n  linarith"), LINEAR, timeout_s=5)
    assert result.status == "timeout" and verdict.reason == "timeout"
    assert result.elapsed_s < 60
    result, verdict = check(lean, lean.render(LINEAR), LINEAR)
    assert verdict.solved, (verdict, result.messages)

