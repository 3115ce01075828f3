"""The kernel re-check's Python side: reading the checker's answer, the reference file, and the whole
compile-then-check run with stand-ins for `lean` and `fdcheck` (real subprocesses, jailed where bubblewrap works)."""

import json

import pytest

from env.problems import Problem
from env.provers import lean_text, lean_trusted
from env.provers.base import Message, StatementCheck
from env.provers.lean_jail import read_toolchain
from env.provers.lean_trusted import Answer, TrustedChecker, TrustedFailure, compile_messages, read_answer
from env.sandbox import jail_available
from tests.env.conftest import LEAN_HEADER, LEAN_PROBLEM

HEADER, PROBLEM = LEAN_HEADER, LEAN_PROBLEM
NAME = PROBLEM.name
STANDARD = ["propext", "Classical.choice", "Quot.sound"]


def answer(**fields) -> str:
    return json.dumps({"format": 1, **fields})


# --- reading the checker's answer -------------------------------------------------------------------------------

def test_a_declared_theorem_with_the_reference_statement():
    got = read_answer(0, answer(theorem="declared", same_statement=True, detail="", axioms=STANDARD, replayed=3), NAME)
    assert got == Answer(StatementCheck(True, True, "the elaborated statement equals the problem's"),
                         tuple(STANDARD), ())


def test_a_different_statement_says_what_differs():
    got = read_answer(0, answer(theorem="declared", same_statement=False, detail="Real is not the problem's Real",
                                axioms=STANDARD), NAME)
    assert got.statement.found and not got.statement.matches
    assert "Real is not the problem's Real" in got.statement.detail and got.axioms == tuple(STANDARD)


@pytest.mark.parametrize(("fields", "found", "detail"), [
    ({"theorem": "missing"}, False, "no declaration named fd_lean_linear_eq_1"),
    ({"theorem": "not_declared_by_the_file"}, False, "comes from an import"),
    ({"theorem": "not_a_theorem", "kind": "axiom", "axioms": [NAME]}, True, "declared as axiom, not as a theorem"),
])
def test_a_theorem_the_file_does_not_declare(fields, found, detail):
    got = read_answer(0, answer(**fields), NAME)
    assert got.statement.found is found and not got.statement.matches and detail in got.statement.detail
    assert got.unsafe == ()


def test_a_kernel_rejection_is_unsafe_with_the_kernels_message():
    got = read_answer(2, answer(rejected="(kernel) declaration type mismatch, 'x'"), NAME)
    assert got.unsafe == ("the kernel rejected a declaration: (kernel) declaration type mismatch, 'x'",)
    assert got.axioms is None and not got.statement.matches


@pytest.mark.parametrize(("code", "text", "why"), [
    (1, answer(error="failed to read file 'attempt.olean', invalid header"), "invalid header"),
    (1, None, "no answer (exit status 1): boom"),
    (0, None, "no answer"),
    (0, "{not json", "no answer"),
    (0, json.dumps({"format": 2, "theorem": "declared"}), "no answer"),
    (None, None, "no answer"),
    (0, answer(rejected="x"), "contradicts its exit status 0"),  # a rejection must exit 2
    (2, answer(theorem="declared", same_statement=True, axioms=STANDARD), "contradicts its exit status 2"),
    (0, answer(error="x", theorem="declared", same_statement=True, axioms=STANDARD), "x"),
    (0, answer(theorem="proved"), "contradicts"),
    (0, answer(theorem="declared", same_statement=True), "without the theorem's axioms"),
    (0, answer(theorem="declared", same_statement="yes", axioms=STANDARD), "without the statement comparison"),
    (0, answer(theorem="declared", same_statement=True, axioms=[1, 2]), "without the theorem's axioms"),
])
def test_anything_else_is_a_checker_failure(code, text, why):
    with pytest.raises(TrustedFailure) as failure:
        read_answer(code, text, NAME, output="boom")
    assert failure.value.status == "crash" and why in failure.value.text


def test_compile_messages_keeps_the_errors_lean_printed_as_json():
    output = "\n".join([
        json.dumps({"severity": "warning", "pos": {"line": 3, "column": 0}, "data": "unused variable"}),
        "not json",
        json.dumps({"severity": "error", "pos": {"line": 9, "column": 2}, "endPos": None, "data": "linarith failed"}),
    ])
    assert compile_messages(output) == (Message("error", "linarith failed", 9, 3),)
    assert compile_messages("Segmentation fault\n") == (Message("error", "Segmentation fault"),)


def test_the_reference_is_the_header_and_statement_proved_by_sorry():
    source = lean_trusted.reference_source(PROBLEM)
    assert source == HEADER + PROBLEM.formal_statement + "\n  sorry"
    assert "linarith" not in source
    lemma = Problem("Foo.bar", "lean", "import Mathlib\n", "lemma Foo.bar : (1 : ℕ) + 1 = 2 := by")
    assert lean_trusted.reference_source(lemma).endswith("lemma Foo.bar : (1 : ℕ) + 1 = 2 := by\n  sorry")
    for wrong in ("theorem other : True := by", "-- theorem t : True\ntheorem t2 : True := by"):
        with pytest.raises(TrustedFailure, match="does not declare `theorem t`"):
            lean_trusted.reference_source(Problem("t", "lean", "import Mathlib\n", wrong))


# --- the whole re-check, with stand-ins for lean and fdcheck --------------------------------------------------------

@pytest.fixture
def checker(fake_lean, request):
    jailed = getattr(request, "param", jail_available())
    trusted = TrustedChecker(read_toolchain(fake_lean.project, jailed=jailed), memory_mb=2048, slots=2)
    yield trusted
    trusted.close()


def check(checker, proof: str, problem: Problem = PROBLEM, timeout_s: float = 30):
    return checker.check(lean_text.render(problem, proof), problem, timeout_s)


def test_a_clean_file_gets_a_trusted_answer(checker):
    result = check(checker, "linarith")
    assert result.status == "ok" and result.trusted and result.trusted_s > 0
    assert result.statement.matches and result.axioms == tuple(STANDARD) and result.unsafe == ()
    assert result.sandboxed == checker.toolchain.jailed
    assert json.loads(result.raw_output)["theorem"] == "declared"


def test_the_checkers_findings_reach_the_result(checker):
    sorry = check(checker, "sorry")
    assert sorry.trusted and sorry.uses_sorry and "sorryAx" in sorry.axioms
    weaker = HEADER + PROBLEM.formal_statement.replace("x = 5", "x ≤ 5") + "\n  linarith"
    changed = checker.check(weaker, PROBLEM, 30)
    assert changed.trusted and not changed.statement.matches
    rejected = check(checker, "linarith -- FD_CHECK_REJECT")
    assert rejected.trusted and rejected.unsafe and "declaration type mismatch" in rejected.unsafe[0]


@pytest.mark.parametrize(("marker", "status", "text"), [
    ("FD_COMPILE_ERROR", "error", "unknown tactic"),
    ("FD_COMPILE_OOM", "oom", "ran out of memory"),
    ("FD_COMPILE_NO_OLEAN", "crash", "produced no .olean"),
    ("FD_CHECK_CRASH", "crash", "invalid header"),
    ("FD_CHECK_LIE", "crash", "contradicts"),
    ("FD_CHECK_SILENT", "crash", "no answer"),
    ("FD_CHECK_HUGE", "crash", "no answer"),
])
def test_a_re_check_without_an_answer_is_never_trusted(checker, marker, status, text):
    result = check(checker, f"linarith -- {marker}")
    assert result.status == status and not result.trusted and result.statement is None
    assert any(text in m.text for m in result.messages), result.messages


def test_a_compile_error_points_at_its_line(checker):
    result = check(checker, "nlinarith\n  FD_COMPILE_ERROR")
    (message,) = result.messages
    assert message.line == lean_text.render(PROBLEM, "nlinarith\n  FD_COMPILE_ERROR").count("\n") + 1


def test_hanging_compiles_and_checks_are_timeouts(checker, monkeypatch):
    monkeypatch.setattr(lean_trusted, "IMPORT_ALLOWANCE_S", 0.0)
    result = check(checker, "linarith -- FD_COMPILE_HANG", timeout_s=1)
    assert result.status == "timeout" and "longer than 1 s" in result.messages[0].text
    monkeypatch.setattr(lean_trusted, "CHECKER_TIMEOUT_S", 1.0)
    result = check(checker, "linarith -- FD_CHECK_HANG")
    assert result.status == "timeout" and "did not finish within 1 s" in result.messages[0].text


@pytest.mark.parametrize("checker", [False], indirect=True)  # unjailed: the fake lean can log its calls
def test_the_reference_is_compiled_once_per_problem_and_a_broken_one_is_remembered(checker, fake_lean):
    check(checker, "linarith")
    check(checker, "nlinarith [h₀]")
    assert fake_lean.compiles() == 3  # the reference once, each attempt once
    broken = Problem("t", "lean", HEADER, "theorem t : True := by FD_COMPILE_ERROR")
    for _ in range(2):
        result = check(checker, "trivial", broken)
        assert result.status == "crash" and "the problem's statement does not compile" in result.raw_output
    assert fake_lean.compiles() == 4  # the broken reference was compiled once; no attempt was


def test_the_work_directories_are_removed(checker):
    check(checker, "linarith")
    check(checker, "linarith -- FD_CHECK_CRASH")
    assert [p.name for p in checker._root.iterdir()] == [next(checker._root.glob("reference-*")).name]
