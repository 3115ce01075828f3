"""The Lean backend against a real toolchain: reference proofs verify, warm checks, timeouts, errors, search.

The attacks on the verdict are in test_lean_exploits.py. These run only where
`LeanProver.available()`: `lake` on PATH, the project built (install elan, then
`lake exe cache get && lake build` in the repository root) and bubblewrap working.
"""

import time
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


def file_with(problem: Problem, proof: str = "") -> str:
    return problem.header + problem.formal_statement + proof


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
    assert result.trusted and result.unsafe == () and 0 < result.trusted_s < result.elapsed_s
    assert verdict.solved, verdict
    assert result.sandboxed == jail_available()


def test_errors_point_at_the_line_in_the_file(lean):
    source = file_with(LINEAR, proof="\n  nlinarith [sq_nonneg x]\n  exact rfl")
    result, _ = check(lean, source, LINEAR)
    lines = source.split("\n")
    assert result.errors and all(0 < m.line <= len(lines) for m in result.errors)
    assert any(lines[m.line - 1].strip().startswith(("nlinarith", "exact", "theorem")) for m in result.errors)


def test_search_finds_mathlib_lemmas(lean):
    hits = lean.search(r"\bsq_nonneg\b")
    assert hits and all(h.path.startswith("Mathlib/") and h.path.endswith(".lean") for h in hits)


def test_warm_feedback_is_faster_than_the_cold_first_one():
    prover = LeanProver(timeout_s=120, workers=1)
    try:
        start = time.monotonic()
        cold = prover.feedback(prover.render(LINEAR), LINEAR, 120)  # the worker imports Mathlib first
        middle = time.monotonic()
        warm = prover.feedback(prover.render(LINEAR, "nlinarith [h₀]"), LINEAR, 120)
        end = time.monotonic()
        _, verdict = check(prover, prover.render(LINEAR, "nlinarith [h₀]"), LINEAR)
    finally:
        prover.close()
    assert cold.status == warm.status == "ok" and verdict.solved, verdict
    assert end - middle < (middle - start) / 2, (end - middle, middle - start)


def test_a_non_terminating_tactic_times_out_and_the_prover_recovers(lean):
    result, verdict = check(lean, file_with(LINEAR, proof="\n  sleep 600000\n  linarith"), LINEAR, timeout_s=5)
    assert result.status == "timeout" and verdict.reason == "timeout"
    assert result.elapsed_s < 60
    result, verdict = check(lean, lean.render(LINEAR), LINEAR)
    assert verdict.solved, (verdict, result.messages)

