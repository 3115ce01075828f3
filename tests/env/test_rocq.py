"""The Rocq backend against real coqc: parsing, verdicts on honest and cheating files, escapes, limits."""

import pytest

from env.problems import Problem
from env.provers.rocq import parse_assumptions, parse_messages, strip_comments
from env.sandbox import EpisodeDir, jail_available
from env.verdict import judge

HEADER = "Require Import Reals Lra.\nOpen Scope R_scope.\n\n"
PROBLEM = Problem(name="fd_test_double", prover="rocq", header=HEADER,
                  formal_statement="Theorem fd_test_double (x : R) (h : 1 < x) : x * x > x.\nProof.",
                  formal_proof="\n  nra.\nQed.")
STATEMENT = "Theorem fd_test_double (x : R) (h : 1 < x) : x * x > x.\nProof.\n"

CHEATS = {
    "admitted": (HEADER + STATEMENT + "Admitted.\n", "uses_sorry"),
    "admit": (HEADER + STATEMENT + "  admit.\nAdmitted.\n", "uses_sorry"),
    "aborted": (HEADER + STATEMENT + "Abort.\n", "uses_sorry"),
    "aborted_then_other": (HEADER + STATEMENT + "Abort.\nTheorem fd_test_double : True.\nProof. exact I. Qed.\n",
                           "uses_sorry"),
    "axiom": (HEADER + "Axiom magic : forall P : Prop, P.\n" + STATEMENT + "  apply magic.\nQed.\n",
              "nonstandard_axioms"),
    "parameter": (HEADER + "Parameter h0 : forall x : R, x * x > x.\n" + STATEMENT + "  apply h0.\nQed.\n",
                  "nonstandard_axioms"),
    "weakened": (HEADER + "Theorem fd_test_double (x : R) (h : 1 < x) : x * x >= x.\nProof.\n  nra.\nQed.\n",
                 "statement_changed"),
    "other_name": (HEADER + "Theorem other (x : R) (h : 1 < x) : x * x > x.\nProof.\n  nra.\nQed.\n",
                   "theorem_not_found"),
    "notation": (HEADER + 'Local Infix "*" := Rplus : R_scope.\n' + STATEMENT + "  lra.\nQed.\n",
                 "statement_changed"),
    "redefined_R": (HEADER + "Require Import Psatz.\nDefinition R := nat.\n"
                    "Theorem fd_test_double (x : R) (h : (1 < x)%nat) : (x * x > x)%nat.\n"
                    "Proof.\n  unfold R in *. nia.\nQed.\n", "statement_changed"),
    "does_not_compile": (HEADER + STATEMENT + "  lia.\nQed.\n", "does_not_compile"),
}


def check(rocq, source, problem=PROBLEM, **kw):
    with EpisodeDir() as d:
        result = rocq.check(source, d.root, problem=problem, **kw)
    return result, judge(result, problem, rocq)


def test_reference_proof_solves(rocq):
    result, verdict = check(rocq, rocq.render(PROBLEM))
    assert verdict.solved, verdict
    assert result.statement.detail == "exact" and result.sandboxed == jail_available()
    assert set(result.axioms) <= rocq.standard_axioms


def test_extra_imports_before_the_statement_are_fine(rocq):
    source = HEADER + "Require Import Psatz ZArith.\n" + STATEMENT + "  nra.\nQed.\n"
    assert check(rocq, source)[1].solved


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_cheats_are_rejected(rocq, cheat):
    source, reason = CHEATS[cheat]
    result, verdict = check(rocq, source)
    assert not verdict.solved
    assert verdict.reason == reason, (verdict, result.raw_output[-800:])


def test_messages_carry_positions(rocq):
    result, _ = check(rocq, CHEATS["does_not_compile"][0])
    (error,) = result.errors
    assert error.line == 6 and error.column == 3 and "lia" in error.text


def test_non_terminating_proof_times_out_and_prover_keeps_working(rocq):
    loop = "Goal True. repeat (assert True by exact I). exact I. Qed.\n"
    result, verdict = check(rocq, loop, timeout_s=3)
    assert result.status == "timeout" and verdict.reason == "timeout"
    assert check(rocq, rocq.render(PROBLEM))[1].solved


def test_memory_bomb_hits_the_cap(rocq):
    from env.provers.rocq import RocqProver

    small = RocqProver(timeout_s=60, memory_mb=1024)
    bomb = "Require Import Arith.\nGoal True. Eval vm_compute in (Nat.pow 3 40). exact I. Qed.\n"
    result, verdict = check(small, bomb)
    assert result.status == "oom" and verdict.reason == "out_of_memory"
    assert check(small, small.render(PROBLEM))[1].solved


@pytest.mark.skipif(not jail_available(), reason="needs bubblewrap: apt-get install bubblewrap")
def test_file_cannot_write_or_read_outside_its_sandbox(rocq, tmp_path):
    target = tmp_path / "escaped.txt"
    secret = tmp_path / "Secret.v"
    secret.write_text("Definition secret := 42.\n")
    write = f'Redirect "{target}" Print nat.\n'
    result, _ = check(rocq, write, problem=None)
    assert not target.exists() and not target.with_suffix(".txt.out").exists()
    read = f'Load "{secret}".\nCheck secret.\n'
    result, _ = check(rocq, read, problem=None)
    assert result.status == "error" and "42" not in result.raw_output
    tmp_write = 'Redirect "/tmp/fd_escape" Print nat.\n'
    check(rocq, tmp_write, problem=None)
    assert not any(p.name.startswith("fd_escape") for p in __import__("pathlib").Path("/tmp").iterdir())


def test_search_finds_stdlib_lemmas(rocq):
    hits = rocq.search(r"Lemma Rplus_comm\b")
    assert any(h.path.endswith("Raxioms.v") and "Rplus_comm" in h.text for h in hits)


def test_parse_messages_and_assumptions():
    out = ('File "./FdAttempt.v", line 3, characters 2-5:\nWarning: foo\nbar\n'
           'File "./FdAttempt.v", line 7, characters 0-4:\nError: Syntax error.\n')
    warning, error = parse_messages(out)
    assert (warning.severity, warning.line, warning.column, warning.text) == ("warning", 3, 3, "foo\nbar")
    assert (error.severity, error.line, error.text) == ("error", 7, "Syntax error.")
    assumptions = "Axioms:\nA.x\n  : forall P : Prop, P\nB.y : nat\n"
    assert parse_assumptions(assumptions) == (("A.x", "B.y"), [])
    assert parse_assumptions("Closed under the global context\n") == ((), [])
    assert parse_assumptions("nothing") is None


def test_strip_comments_keeps_code_and_lines():
    src = 'Theorem a : True. (* Admitted (* nested *) *)\nProof. idtac "admit". exact I. Qed.'
    stripped = strip_comments(src)
    assert "Admitted" not in stripped and "admit" not in stripped and stripped.count("\n") == 1
    assert "exact I" in stripped


def test_a_killed_prover_is_a_crash_outcome(rocq):
    from env.sandbox import ProcessOutcome

    killed = ProcessOutcome(returncode=-11, stdout="", stderr="", elapsed_s=0.1, timed_out=False, jailed=True)
    result = rocq._result(killed, "Theorem x : True.")
    assert result.status == "crash" and "exit status -11" in result.errors[0].text
    assert judge(result, PROBLEM, rocq).reason == "prover_crash"
