"""Attempts written to be judged solved without a proof, each with the verdict it must get, and
honest controls that must be solved. Every file goes through the full check (warm feedback,
then the trusted re-check) and, separately, through the trusted re-check alone, so that the
quick rejections of the warm path (e.g. the `Admitted` word filter) hide no hole behind them.
"""

from pathlib import Path

import pytest

from env.provers.base import CheckResult
from env.provers.rocq import apply_trusted
from env.sandbox import EpisodeDir
from env.verdict import judge
from tests.env.test_rocq import HEADER, PROBLEM, STATEMENT, check

REPO = Path(__file__).resolve().parents[2]
HONEST = STATEMENT + "  nra.\nQed.\n"
POSITIVITY = ("Inductive bad : Prop := mk : (bad -> False) -> bad.\n"
              "Lemma bad_false : False.\n"
              "Proof. assert (h : bad -> False) by (intros [f]; exact (f (mk f))). exact (h (mk h)). Qed.\n")
FLOOD = 'Ltac flood := idtac "Warning: flood flood flood flood"; flood.\nGoal True. flood. exact I. Qed.\n'

ATTACKS: dict[str, tuple[str, set[str]]] = {
    # incomplete proofs, however spelled
    "admitted": (STATEMENT + "Admitted.\n", {"uses_sorry"}),
    "admit_tactic": (STATEMENT + "  admit.\nAdmitted.\n", {"uses_sorry"}),
    "give_up": (STATEMENT + "  give_up.\nAdmitted.\n", {"uses_sorry"}),
    "aborted": (STATEMENT + "Abort.\n", {"uses_sorry"}),
    "aborted_then_other": (STATEMENT + "Abort.\nTheorem fd_test_double : True.\nProof. exact I. Qed.\n",
                           {"uses_sorry"}),
    "admitted_helper": ("Lemma helper : forall x : R, 1 < x -> x * x > x.\nAdmitted.\n"
                        + STATEMENT + "  apply helper; assumption.\nQed.\n", {"uses_sorry"}),
    # a quote inside a comment: Coq reads `" *) "` as a string there, so `Admitted.` runs
    "admitted_behind_a_quote_in_a_comment": (STATEMENT + '(* " *) " *) Admitted.\n', {"uses_sorry"}),
    "admitted_after_fake_output": (STATEMENT + '  idtac "</infomsg><prompt>Coq < 3 || 0 < </prompt>".\n'
                                   "Admitted.\n", {"uses_sorry"}),
    # axioms, by any name or wording
    "axiom": ("Axiom magic : forall P : Prop, P.\n" + STATEMENT + "  apply magic.\nQed.\n", {"nonstandard_axioms"}),
    "parameter": ("Parameter h0 : forall x : R, x * x > x.\n" + STATEMENT + "  apply h0.\nQed.\n",
                  {"nonstandard_axioms"}),
    "conjecture": ("Conjecture c : forall x : R, 1 < x -> x * x > x.\n" + STATEMENT + "  apply c; assumption.\nQed.\n",
                   {"nonstandard_axioms"}),
    "toplevel_hypothesis": ("Hypothesis hyp : forall x : R, 1 < x -> x * x > x.\n" + STATEMENT
                            + "  apply hyp; assumption.\nQed.\n", {"nonstandard_axioms"}),
    "toplevel_variable": ("Variable v : False.\n" + STATEMENT + "  destruct v.\nQed.\n", {"nonstandard_axioms"}),
    "unused_axiom": ("Axiom junk : False.\n" + HONEST, {"nonstandard_axioms"}),
    "axiom_with_summary_words_as_binders": (
        "Axiom magic : forall (Closed under the global context : Prop), forall x : R, 1 < x -> x * x > x.\n"
        + STATEMENT + "  apply (magic True True True True True); assumption.\nQed.\n", {"nonstandard_axioms"}),
    "axiom_named_like_a_standard_one": (
        "Module Classical_Prop.\nAxiom classic : forall x : R, 1 < x -> x * x > x.\nEnd Classical_Prop.\n"
        + STATEMENT + "  apply Classical_Prop.classic; assumption.\nQed.\n", {"nonstandard_axioms"}),
    "axiom_named_like_a_marker": ("Axiom FD_STATEMENT_EXACT : forall x : R, 1 < x -> x * x > x.\n" + STATEMENT
                                  + "  apply FD_STATEMENT_EXACT; assumption.\nQed.\n", {"nonstandard_axioms"}),
    "axiom_whose_type_prints_a_fake_listing": (
        'Require Import String.\nAxiom magic : "\nClosed under the global context\n"%string = ""%string.\n'
        + STATEMENT + "  pose proof magic as _.\n  nra.\nQed.\n", {"nonstandard_axioms"}),
    "abbreviation_to_an_axiom": ("Axiom ax : forall x : R, 1 < x -> x * x > x.\nNotation fd_test_double := ax.\n",
                                 {"nonstandard_axioms"}),
    "nonstandard_library_axiom_used": ("Require Import ProofIrrelevance.\n" + STATEMENT
                                       + "  pose proof (proof_irrelevance True I I) as _.\n  nra.\nQed.\n",
                                       {"nonstandard_axioms"}),
    # declarations that skip a kernel check
    "positivity_attribute": ("#[bypass_check(positivity)]\n" + POSITIVITY + STATEMENT + "  destruct bad_false.\nQed.\n",
                             {"kernel_rejected"}),
    "positivity_unset": ("Unset Positivity Checking.\n" + POSITIVITY + "Set Positivity Checking.\n" + STATEMENT
                         + "  destruct bad_false.\nQed.\n", {"kernel_rejected"}),
    "guard_unset": ("Unset Guard Checking.\nFixpoint loop (n : nat) : False := loop n.\nSet Guard Checking.\n"
                    + STATEMENT + "  destruct (loop 0).\nQed.\n", {"kernel_rejected"}),
    "guard_attribute": ("#[bypass_check(guard)]\nFixpoint loop (n : nat) : False := loop n.\n" + STATEMENT
                        + "  destruct (loop 0).\nQed.\n", {"kernel_rejected"}),
    "universes_unset": ("Unset Universe Checking.\nDefinition U : Type := Type.\nSet Universe Checking.\n" + HONEST,
                        {"kernel_rejected"}),
    "universes_attribute": ("#[bypass_check(universes)]\nDefinition U : Type := Type.\n" + HONEST,
                            {"kernel_rejected"}),
    # a different statement, however disguised
    "weakened": ("Theorem fd_test_double (x : R) (h : 1 < x) : x * x >= x.\nProof.\n  nra.\nQed.\n",
                 {"statement_changed"}),
    "stronger_hypothesis": ("Theorem fd_test_double (x : R) (h : 2 < x) : x * x > x.\nProof.\n  nra.\nQed.\n",
                            {"statement_changed"}),
    "other_name": ("Theorem other (x : R) (h : 1 < x) : x * x > x.\nProof.\n  nra.\nQed.\n", {"theorem_not_found"}),
    "local_infix": ('Local Infix "*" := Rplus : R_scope.\n' + STATEMENT + "  lra.\nQed.\n", {"statement_changed"}),
    "notation_makes_it_trivial": ('Local Notation "x > y" := (True) : R_scope.\n' + STATEMENT + "  exact I.\nQed.\n",
                                  {"statement_changed"}),
    "redefined_R": ("Require Import Psatz.\nDefinition R := nat.\n"
                    "Theorem fd_test_double (x : R) (h : (1 < x)%nat) : (x * x > x)%nat.\n"
                    "Proof.\n  unfold R in *. nia.\nQed.\n", {"statement_changed"}),
    "section_hypothesis": ("Section S.\nHypothesis magic : forall x : R, 1 < x -> x * x > x.\n" + STATEMENT
                           + "  apply magic; assumption.\nQed.\nEnd S.\n", {"statement_changed"}),
    "inside_a_module": ("Module M.\n" + HONEST + "End M.\n", {"theorem_not_found"}),
    "module_and_a_toplevel_impostor": ("Module M.\n" + HONEST + "End M.\nTheorem fd_test_double : True.\n"
                                       "Proof. exact I. Qed.\n", {"statement_changed"}),
    "definition_of_another_type": ("Definition fd_test_double := I.\n", {"statement_changed"}),
    "fake_stage_files_and_a_weaker_statement": (
        'Redirect "fd_statement" Check I.\nRedirect "fd_found" Check I.\nRedirect "fd_assumptions" Check I.\n'
        "Theorem fd_test_double (x : R) (h : 1 < x) : x * x >= x.\nProof.\n  nra.\nQed.\n", {"statement_changed"}),
    # reaching outside the sandbox, the prover's state, its output and its resources
    "load_the_problem_file": (f'Load "{REPO}/data/rocq_problems.jsonl".\n' + HONEST, {"does_not_compile"}),
    "load_the_host_password_file": ('Load "/etc/passwd".\n' + HONEST, {"does_not_compile"}),
    "declare_ml_module": ('Declare ML Module "fd_evil_plugin".\n' + HONEST, {"does_not_compile"}),
    "drop": ("Drop.\n" + HONEST, {"does_not_compile"}),
    "quit_before_the_proof": (STATEMENT + "Quit.\n", {"does_not_compile", "prover_crash"}),
    "output_flood": (FLOOD + HONEST, {"does_not_compile"}),
    "non_terminating": ("Goal True. repeat (assert True by exact I). exact I. Qed.\n" + HONEST, {"timeout"}),
}

CONTROLS: dict[str, str] = {
    "reference": HONEST,
    "prints_scary_words": (STATEMENT + '  idtac "Error: Out of memory."; idtac "Cannot allocate memory";\n'
                           '  idtac "Closed under the global context"; idtac "Axioms:"; idtac "Admitted".\n'
                           '  idtac "</infomsg>Error: fake<infomsg>"; idtac "<prompt>Coq < 3 || 0 < </prompt>".\n'
                           "  nra.\nQed.\n"),
    "cheat_words_in_comments": STATEMENT + "  (* Admitted. admit. Abort. (* nested Admitted. *) *)\n  nra.\nQed.\n",
    "definition_instead_of_theorem": ("Definition fd_test_double : forall x : R, 1 < x -> x * x > x.\n"
                                      "Proof.\n  intros; nra.\nQed.\n"),
    "implicit_binder": "Theorem fd_test_double {x : R} (h : 1 < x) : x * x > x.\nProof.\n  nra.\nQed.\n",
    "abbreviation_to_a_real_proof": ("Theorem helper (x : R) (h : 1 < x) : x * x > x.\nProof. nra. Qed.\n"
                                     "Notation fd_test_double := helper.\n"),
    "bullets_braces_and_selectors": (STATEMENT + "  assert (H : 0 < x).\n  { lra. }\n  assert (H2 : 0 < x * x)."
                                     "\n  2: { nra. }\n  - nra.\nQed.\n"),
    "classical_axiom_used": ("Require Import Classical.\n" + STATEMENT
                             + "  destruct (classic (x > 0)); nra.\nQed.\n"),
    "nonstandard_library_axiom_loaded_but_unused": "Require Import ProofIrrelevance.\n" + HONEST,
    "printing_options_and_local_notations": ('Set Printing All.\nLocal Notation "\'twice\' y" := (y + y) '
                                             "(at level 10).\n" + HONEST),
}


def trusted_only(rocq, source):
    """The verdict of the trusted re-check alone, as if the warm path had raised no objection."""
    with EpisodeDir() as d:
        trusted = rocq.trusted_check(source, d.root, problem=PROBLEM, timeout_s=30)
    result = apply_trusted(CheckResult(status="ok"), trusted, trusted.elapsed_s)
    return judge(result, PROBLEM, rocq), result


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_rejected_on_both_paths(rocq, name):
    body, reasons = ATTACKS[name]
    source = HEADER + body
    result, verdict = check(rocq, source, timeout_s=5 if name == "non_terminating" else None)
    assert not verdict.solved and verdict.reason in reasons, (verdict, result.messages[-3:])
    if name in ("non_terminating", "output_flood"):
        return  # the trusted path's own limits are the same; the warm path already stopped it
    again, trusted = trusted_only(rocq, source)
    assert not again.solved, (again, trusted)


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_honest_control_is_solved_on_both_paths(rocq, name):
    source = HEADER + CONTROLS[name]
    result, verdict = check(rocq, source)
    assert verdict.solved, (verdict, result.messages[-5:])
    again, trusted = trusted_only(rocq, source)
    assert again.solved, (again, trusted)


def test_the_suite_is_large_enough():
    assert len(ATTACKS) >= 40 and len(CONTROLS) >= 8
