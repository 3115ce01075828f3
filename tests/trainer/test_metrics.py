import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.episode import Episode, EpisodeWriter, Feedback, ToolCallRecord, read_episodes
from trainer.metrics import (
    EPISTEMIC_WORDS,
    DistinctTracker,
    MetricsLogger,
    epistemic_counts,
    lemmas_and_tactics,
    proof_source,
    rollout_metrics,
)

DATA = Path(__file__).resolve().parents[2] / "data"
SOLVED = {"solved": True, "reason": "solved", "detail": ""}
NOT_COMPILED = {"solved": False, "reason": "does_not_compile",
                "detail": "line 9: linarith failed to find a contradiction"}


def problems(prover: str) -> dict[str, dict]:
    path = DATA / ("lean_problems.jsonl" if prover == "lean" else "rocq_problems.jsonl")
    return {r["name"]: r for r in map(json.loads, path.read_text().splitlines())}


def reference_file(prover: str, name: str) -> str:
    p = problems(prover)[name]
    return p["header"] + p["formal_statement"] + p["formal_proof"]


def write(turn: int, path: str, content: str, prover: str = "lean") -> ToolCallRecord:
    return ToolCallRecord(turn, f"{prover}_write_file", {"path": path, "content": content},
                          f"Wrote {len(content.encode())} bytes to {path}.", False, 0.002)


def check(turn: int, path: str, verdict: dict, prover: str = "lean") -> ToolCallRecord:
    tail = ("The file proves the theorem: the problem is solved." if verdict["solved"]
            else f"Not solved: {verdict['reason'].replace('_', ' ')}: {verdict['detail']}.")
    return ToolCallRecord(turn, f"{prover}_check_file", {"path": path}, f"{path} compiles.\n{tail}", False, 2.5,
                          verdict)


def make_episode(eid: str, calls: list[ToolCallRecord], *, reward: float, finish_reason: str = "no_tool_call",
                 verdict: dict | None = None, thoughts: list[str] | None = None, prover: str = "lean",
                 name: str = "fd_lean_two_sq_ineq", feedback: Feedback | None = None,
                 timings: dict | None = None) -> Episode:
    """An episode as the rollout writes it: one assistant turn per tool-call turn, then the tool outputs."""
    problem = problems(prover)[name]
    messages = [{"role": "system", "content": "You are an expert in formal mathematics."},
                {"role": "user", "content": problem["formal_statement"]}]
    thoughts = thoughts or ["Let me write the proof."] * max(1, len({c.turn for c in calls}))
    token_ids, loss_mask = [7] * 40, [0] * 40
    for turn, thought in enumerate(thoughts, 1):
        blocks = "".join(f"\n<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.arguments})}\n</tool_call>"
                         for c in calls if c.turn == turn)
        text = f"<think>\n{thought}\n</think>{blocks}"
        messages.append({"role": "assistant", "content": text})
        generated = len(text.split())
        token_ids += [11] * generated
        loss_mask += [1] * generated
        for c in calls:
            if c.turn == turn:
                messages.append({"role": "tool", "name": c.name, "content": c.output})
                token_ids += [13] * 6
                loss_mask += [0] * 6
    return Episode(
        episode_id=eid, problem={"name": name, "prover": prover}, prover=prover, model="Qwen/Qwen3-8B",
        policy_version=3, messages=messages, prompt_len=40, token_ids=token_ids, loss_mask=loss_mask,
        logprobs=[-0.5 * m for m in loss_mask], tool_calls=calls, verdict=verdict, reward=reward,
        finish_reason=finish_reason,  # type: ignore[arg-type]
        seeds={"episode": 1}, timings=timings or {"generation_s": 4.0, "tool_s": 2.5, "check_s": 2.4, "total_s": 7.0},
        num_generated=sum(loss_mask), feedback=feedback)


# -- epistemic words ------------------------------------------------------------------------------


def test_epistemic_counts_whole_words_case_insensitive():
    texts = ["Wait, maybe `nlinarith` needs a hint. Hmm... Actually, let me check: WAIT.",
             "It seems that waiting is not checking; rocq_check_file and lean_check_file are tools.",
             "Alternatively, perhaps `sq_nonneg (a - b)` might likely work. Let me double-check."]
    counts = epistemic_counts(texts)
    assert set(counts) == set(EPISTEMIC_WORDS)
    assert counts == {"wait": 2, "hmm": 1, "perhaps": 1, "maybe": 1, "actually": 1, "alternatively": 1,
                      "seems": 1, "might": 1, "likely": 1, "check": 2}
    assert epistemic_counts([]) == dict.fromkeys(EPISTEMIC_WORDS, 0)


# -- the solved file ------------------------------------------------------------------------------


def test_proof_source_is_the_file_the_solved_check_read():
    wrong = reference_file("lean", "fd_lean_two_sq_ineq").replace("sq_nonneg (a - b)", "sq_nonneg (a + b)")
    right = reference_file("lean", "fd_lean_two_sq_ineq")
    scratch = "import Mathlib\n#check sq_nonneg\n"
    calls = [write(1, "Main.lean", wrong), check(1, "Main.lean", NOT_COMPILED),
             write(2, "Scratch.lean", scratch), write(2, "./Main.lean", right), check(2, "Main.lean", SOLVED)]
    episode = make_episode("e1", calls, reward=1.0, finish_reason="solved", verdict=SOLVED)
    assert proof_source(episode) == right


def test_proof_source_after_the_envs_final_check_is_the_last_write():
    right = reference_file("lean", "fd_lean_two_sq_ineq")
    calls = [write(1, "Main.lean", "theorem broken"), check(1, "Main.lean", NOT_COMPILED),
             write(2, "Main.lean", right),
             ToolCallRecord(2, "lean_write_file", {"path": "/etc/x", "content": "no"},
                            "Error: absolute paths are not allowed", True, 0.0)]
    episode = make_episode("e2", calls, reward=1.0, finish_reason="solved", verdict=SOLVED)
    assert proof_source(episode) == right


def test_proof_source_of_unsolved_and_inconsistent_episodes():
    calls = [write(1, "Main.lean", "theorem broken"), check(1, "Main.lean", NOT_COMPILED)]
    assert proof_source(make_episode("e3", calls, reward=0.0, verdict=NOT_COMPILED)) is None
    assert proof_source(make_episode("e4", [], reward=0.0)) is None
    orphan = make_episode("e5", [check(1, "Other.lean", SOLVED)], reward=1.0, finish_reason="solved", verdict=SOLVED)
    with pytest.raises(ValueError, match="e5: the solved check of 'Other.lean' follows no write"):
        proof_source(orphan)


# -- lemmas and tactics ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, lemmas, tactics", [
    ("fd_lean_two_sq_ineq", {"sq_nonneg"}, {"nlinarith"}),
    ("fd_lean_quadratic_roots", {"mul_eq_zero"}, {"have", "linear_combination", "rcases", "left", "right", "linarith"}),
    ("fd_lean_recip_difference", {"div_sub_div"}, {"have", "linarith", "rw", "ring"}),
    ("fd_lean_sqrt_of_square", {"Real.sqrt_sq"}, {"exact"}),
    ("fd_lean_abs_interval", {"abs_lt"}, {"obtain", "constructor", "linarith"}),
    ("fd_lean_max_plus_min", {"le_total", "max_eq_right", "min_eq_left", "max_eq_left", "min_eq_right"},
     {"rcases", "have", "linarith"}),
    ("fd_lean_recip_ge_two", {"mul_one_div_cancel", "sq_nonneg"}, {"have", "nlinarith"}),
    ("fd_lean_amgm_three_products", {"mul_nonneg", "sq_nonneg"}, {"nlinarith"}),
    ("fd_lean_two_pow_ge", set(), {"induction", "norm_num", "have", "ring", "omega"}),
    ("fd_lean_gauss_sum", {"Finset.sum_range_succ"}, {"induction", "simp", "rw", "linarith"}),
    ("fd_lean_even_consecutive", {"Nat.even_mul", "Nat.even_add_one", "Classical.em"}, {"rw", "exact"}),
    ("fd_lean_divides_combination", set(), {"obtain", "exact", "ring"}),
    ("fd_lean_square_mod_four", {"pow_two", "Int.mul_emod"}, {"have", "omega", "rcases", "simp"}),
])
def test_lean_reference_proofs(name, lemmas, tactics):
    assert lemmas_and_tactics(reference_file("lean", name), "lean") == (lemmas, tactics)


MODEL_PROOF = """import Mathlib
import Aesop

set_option maxHeartbeats 400000

open BigOperators Real Nat Topology Rat

/-- A helper the model wrote; it is not a library lemma. -/
lemma sq_helper (a : ℝ) : 0 ≤ a ^ 2 := by positivity

theorem fd_lean_product_max (a b : ℝ) (h_pos : 0 < a) (h₁ : 0 < b) (h₂ : a + b = 1) :
    a * b ≤ 1 / 4 := by
  -- Wait: maybe nlinarith needs (a - b)^2 ≥ 0 as a hint
  have key_ineq : 0 ≤ (a - b) ^ 2 := sq_nonneg _
  have h_two : (0:ℝ) < 2 := by norm_num
  rcases lt_trichotomy a b with h_lt | h_eq | h_gt
  · nlinarith [mul_pos h_pos h₁, sq_helper (a - b), key_ineq, h_pos.le,
      abs_nonneg (a - b)]
  · subst h_eq
    gcongr ?_ * ?_
    all_goals positivity
  · calc a * b ≤ (a + b) ^ 2 / 4 := by nlinarith [sq_nonneg (a - b)]
      _ = 1 / 4 := by rw [h₂]; norm_num
  exact (show (0:ℝ) ≤ Real.sqrt 2 by exact Real.sqrt_nonneg _).trans le_rfl
  intro x hx_pos
  exact fun y hy_le => mul_le_mul_of_nonneg_left hy_le (le_of_lt hx_pos)
  rw [div_le_div_iff (by positivity) (by positivity), ← two_mul] at h_pos ⊢
  exact abs_lt.mpr ⟨by linarith, by linarith⟩
  first | linarith | nlinarith [sq_abs a]
"""


def test_lean_model_written_proof():
    lemmas, tactics = lemmas_and_tactics(MODEL_PROOF, "lean")
    assert lemmas == {"sq_nonneg", "lt_trichotomy", "mul_pos", "abs_nonneg", "Real.sqrt_nonneg", "le_rfl",
                      "mul_le_mul_of_nonneg_left", "le_of_lt", "div_le_div_iff", "two_mul", "abs_lt", "sq_abs"}
    # gcongr is not in the known list: it counts as a word followed by whitespace at the start of a tactic line
    assert tactics == {"positivity", "have", "norm_num", "rcases", "nlinarith", "subst", "gcongr", "all_goals", "calc",
                       "rw", "exact", "intro", "linarith", "first"}


@pytest.mark.parametrize("name, lemmas, tactics", [
    ("fd_rocq_two_sq_ineq", {"pow2_ge_0"}, {"intros", "assert", "apply", "nra"}),
    ("fd_rocq_quadratic_roots", {"Rmult_integral"},
     {"intros", "assert", "ring_simplify", "lra", "apply", "destruct", "left", "right"}),
    ("fd_rocq_amgm_three_products", {"Rmult_le_pos", "pow2_ge_0"}, {"intros", "assert", "apply", "lra", "nra"}),
    ("fd_rocq_max_plus_min", {"Rle_dec"}, {"intros", "unfold", "destruct", "lra"}),
    ("fd_rocq_sqrt_of_square", {"sqrt_pow2"}, {"intros", "apply", "exact"}),
    ("fd_rocq_two_pow_ge", set(), {"induction", "simpl", "lia"}),
    ("fd_rocq_mod_six_to_three", {"Nat.div_mod", "Nat.mod_add"},
     {"intros", "pose proof", "rewrite", "lia", "replace", "reflexivity"}),
    ("fd_rocq_even_square", {"Nat.even_mul"}, {"intros", "rewrite", "destruct", "reflexivity"}),
    ("fd_rocq_cube_minus_self_div3", {"Zminus_mod", "Z.mul_mod", "Z.mod_pos_bound"},
     {"intros", "replace", "ring", "rewrite", "lia", "assert", "apply", "destruct", "reflexivity"}),
])
def test_rocq_reference_proofs(name, lemmas, tactics):
    assert lemmas_and_tactics(reference_file("rocq", name), "rocq") == (lemmas, tactics)


def test_rocq_model_written_proof():
    source = """Require Import Reals Lra.
Open Scope R_scope.

(* a helper (* with a nested comment: apply Rle_refl *) *)
Lemma sq_helper : forall a : R, 0 <= a * a.
Proof. intros a. apply Rle_0_sqr. Qed.

Theorem fd_rocq_demo : forall (x y : R) (H_pos : 0 < x), x * y <= x * y + x.
Proof.
  intros x y H_pos.
  assert (H_sq : 0 <= y * y) by (apply sq_helper).
  { now apply Rplus_le_compat_l. }
  all: try (rewrite <- Rplus_0_r at 1; apply Rplus_le_compat_l; lra).
  pose proof (Rmult_le_pos x x (Rlt_le _ _ H_pos) (Rlt_le _ _ H_pos)) as H_xx.
  destruct (Req_dec x 0) as [Hx0 | Hx0]; [subst; lra | ].
  eauto using Rle_trans, Rlt_le.
  do 2 rewrite Rmult_comm.
  specialize (H_sq 0).
Qed.
"""
    lemmas, tactics = lemmas_and_tactics(source, "rocq")
    assert lemmas == {"Rle_0_sqr", "Rplus_le_compat_l", "Rplus_0_r", "Rmult_le_pos", "Rlt_le", "Req_dec",
                      "Rle_trans", "Rmult_comm"}
    assert tactics == {"intros", "apply", "assert", "now", "try", "rewrite", "lra", "pose proof", "destruct", "subst",
                       "eauto", "do", "specialize"}


def test_unknown_prover_is_an_error():
    with pytest.raises(ValueError, match="unknown prover 'lean4'"):
        lemmas_and_tactics("theorem x : True := trivial", "lean4")


# -- distinct lemmas and tactics ------------------------------------------------------------------


def solved_episode(eid: str, prover: str, name: str) -> Episode:
    source = reference_file(prover, name)
    ext = "lean" if prover == "lean" else "v"
    calls = [write(1, f"Main.{ext}", source, prover), check(1, f"Main.{ext}", SOLVED, prover)]
    return make_episode(eid, calls, reward=1.0, finish_reason="solved", verdict=SOLVED, prover=prover, name=name)


def test_distinct_tracker_counts_correct_proofs_cumulatively_and_resumes():
    tracker = DistinctTracker()
    unsolved = make_episode("u", [write(1, "Main.lean", reference_file("lean", "fd_lean_gauss_sum")),
                                  check(1, "Main.lean", NOT_COMPILED)], reward=0.0, verdict=NOT_COMPILED)
    step1 = tracker.update([solved_episode("a", "lean", "fd_lean_two_sq_ineq"), unsolved])
    assert step1 == {"distinct_lemmas": 1, "distinct_tactics": 1}  # sq_nonneg; nlinarith
    step2 = tracker.update([solved_episode("b", "lean", "fd_lean_three_sq_ineq"),
                            solved_episode("c", "lean", "fd_lean_max_plus_min")])
    assert step2 == {"distinct_lemmas": 6, "distinct_tactics": 4}
    state = json.loads(json.dumps(tracker.state_dict()))
    resumed = DistinctTracker()
    resumed.load_state_dict(state)
    assert resumed.update([solved_episode("d", "lean", "fd_lean_sqrt_of_square")]) == \
        {"distinct_lemmas": 7, "distinct_tactics": 5}
    assert "Real.sqrt_sq" in resumed.lemmas and resumed.update([]) == {"distinct_lemmas": 7, "distinct_tactics": 5}


# -- rollout metrics ------------------------------------------------------------------------------


def batch() -> list[Episode]:
    right = reference_file("lean", "fd_lean_two_sq_ineq")
    wrong = right.replace("nlinarith [sq_nonneg (a - b)]", "linarith")
    solved = make_episode(
        "s", [write(1, "Main.lean", wrong), check(1, "Main.lean", NOT_COMPILED), write(2, "Main.lean", right),
              check(2, "Main.lean", SOLVED)],
        reward=1.0, finish_reason="solved", verdict=SOLVED,
        thoughts=["Hmm, maybe linarith is enough. Let me check.", "Wait, it failed. Perhaps I need sq_nonneg."],
        feedback=Feedback("claude", "1. Do supply sq_nonneg hints.", [], [1, 2, 3], elapsed_s=3.0))
    bad_call = ToolCallRecord(1, "lean_check_file", {"path": "Nope.lean"}, "Error: no file 'Nope.lean'; write it first",
                              True, 0.001)
    failed = make_episode("f", [bad_call, write(2, "Main.lean", wrong), check(2, "Main.lean", NOT_COMPILED)],
                          reward=0.0, finish_reason="turn_budget", verdict=NOT_COMPILED,
                          thoughts=["Actually I should write the file first.", "It seems linarith might work."],
                          feedback=Feedback("claude", "1. Don't check before writing.", [], [1], elapsed_s=5.0),
                          timings={"generation_s": 6.0, "tool_s": 1.0, "check_s": 0.6, "total_s": 8.0})
    silent = make_episode("n", [], reward=0.0, finish_reason="no_tool_call", thoughts=["I cannot do this."],
                          timings={"generation_s": 2.0, "tool_s": 0.0, "check_s": 0.0, "total_s": 2.0})
    return [solved, failed, silent]


def test_rollout_metrics_on_a_batch(tmp_path):
    writer = EpisodeWriter(tmp_path / "episodes.jsonl")
    for episode in batch():
        writer.write(episode)  # the trainer reads the log, not the objects the rollout built
    episodes = list(read_episodes(tmp_path / "episodes.jsonl"))
    m = rollout_metrics(episodes)
    assert m["train/accuracy"] == pytest.approx(1 / 3) and m["train/reward_mean"] == pytest.approx(1 / 3)
    assert m["train/reward_std"] == pytest.approx(math.sqrt(2) / 3)
    tokens = sum(e.num_generated for e in episodes)
    assert m["train/response_tokens"] == pytest.approx(tokens / 3)
    assert m["train/turns"] == pytest.approx((4 + 3 + 0) / 3)
    assert m["train/tool_errors"] == pytest.approx(1 / 3)
    assert m["train/finish/solved"] == m["train/finish/turn_budget"] == m["train/finish/no_tool_call"] == \
        pytest.approx(1 / 3)
    assert m["train/finish/token_budget"] == m["train/finish/error"] == m["train/finish/prompt_too_long"] == 0.0
    assert sum(v for k, v in m.items() if k.startswith("train/finish/")) == pytest.approx(1.0)
    # hmm, maybe, check | wait, perhaps | actually | seems, might: 8 words
    assert m["epistemic/total"] == pytest.approx(8 * 1000 / tokens)
    assert m["epistemic/check"] == pytest.approx(1000 / tokens) and m["epistemic/alternatively"] == 0.0
    assert m["time/generation_s"] == pytest.approx(4.0) and m["time/check_s"] == pytest.approx(1.0)
    assert m["time/tool_s"] == pytest.approx(3.5 / 3) and m["time/total_s"] == pytest.approx(17 / 3)
    assert m["time/feedback_s"] == pytest.approx(4.0)  # the mean over episodes that got feedback
    assert all(isinstance(v, float) for v in m.values())


def test_rollout_metrics_without_feedback_or_episodes():
    m = rollout_metrics([batch()[2]])
    assert "time/feedback_s" not in m and m["train/accuracy"] == 0.0 and m["train/reward_std"] == 0.0
    with pytest.raises(ValueError, match="at least one episode"):
        rollout_metrics([])


# -- the metrics log ------------------------------------------------------------------------------


def test_logger_appends_valid_jsonl_across_instances(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLogger(path) as logger:
        logger.log(1, {"train/accuracy": 0.25, "train/loss": np.float32(1.5), "train/grad_norm": float("nan")})
        assert len(path.read_text().splitlines()) == 1  # flushed at once
    logger = MetricsLogger(path)
    logger.log(2, {"train/accuracy": 0.5, "distinct_lemmas": 3})
    logger.close()
    logger.close()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
            for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "train/accuracy": 0.25, "train/loss": 1.5, "train/grad_norm": None},
                    {"step": 2, "train/accuracy": 0.5, "distinct_lemmas": 3}]
    with MetricsLogger(path) as logger, pytest.raises(ValueError, match="'step' is the log's own key"):
        logger.log(3, {"step": 3})


def test_logger_without_wandb_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path / "metrics.jsonl", wandb_project="fd-prover")
    MetricsLogger(tmp_path / "metrics.jsonl").close()  # without a project, wandb is never imported
