"""`python -m trainer.evaluate` on miniF2F-rocq (real Rocq), and GRPO started from an FD checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, SHARED_DATA
from tests.trainer.test_run import TINY, metrics, run_trainer


def run_evaluate(*args):
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    return proc


def test_pass_at_k_on_minif2f_rocq(tmp_path):
    path = SHARED_DATA / "minif2f_rocq_test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent; set FD_SHARED_DATA to the benchmark data folder")
    proc = run_evaluate("--model", "tiny-qwen3", "--problems", path, "--prover", "rocq", "--n", 3, "--k", "1,2",
                        "--limit", 2, "--max-new-tokens", 12, "--out", tmp_path / "eval.jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[0])
    assert result["problems"] == 2 and result["n"] == 3 and result["errors"] == 0
    assert set(result["pass_at_k"]) == {"pass@1", "pass@2"}
    assert result["pass_at_k"]["pass@1"] == 0.0  # a random 2-layer model proves nothing
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 6


def test_k_larger_than_n_is_an_error():
    proc = run_evaluate("--model", "tiny-qwen3", "--problems", "data/rocq_problems.jsonl", "--n", 2, "--k", "1,8")
    assert proc.returncode == 2 and "every k must be <= n=2" in proc.stderr


def test_grpo_over_fd_starts_from_the_fd_checkpoint(tmp_path):
    run_trainer(tmp_path / "fd", "algorithm=fd", "steps=1")
    checkpoint = tmp_path / "fd" / "checkpoints" / "step-000001" / "model"
    overrides = [o for o in TINY if not o.startswith("model=")]
    proc = subprocess.run([sys.executable, "-m", "trainer.run", *overrides, f"model={checkpoint}", "algorithm=grpo",
                           "samples_per_prompt=2", "steps=1", f"out_dir={tmp_path / 'grpo'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model: {checkpoint}" in proc.stdout.splitlines()[0]
    assert [r["step"] for r in metrics(tmp_path / "grpo")] == [1]
    evaluated = run_evaluate("--model", checkpoint, "--problems", "data/rocq_problems.jsonl", "--prover", "rocq",
                             "--n", 1, "--limit", 1, "--max-new-tokens", 8)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "pass@1" in json.loads(evaluated.stdout.splitlines()[0])["pass_at_k"]
    # the GRPO policy and its KL reference both start as the FD checkpoint, not as the base model
    from transformers import AutoModelForCausalLM

    from agent.models import load_model
    from trainer.config import load_config
    from trainer.run import Trainer

    trainer = Trainer(load_config(None, [*overrides, f"model={checkpoint}", "algorithm=grpo", "kl_coef=0.001",
                                         f"out_dir={tmp_path / 'grpo2'}"]))
    try:
        saved = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
        base = load_model("tiny-qwen3", dtype="float32", device="cpu", seed=0).state_dict()
        for model in (trainer.policy, trainer.reference):
            weights = model.state_dict()
            assert all(torch.equal(weights[k], saved[k]) for k in saved)
            assert any(not torch.equal(weights[k], base[k]) for k in saved)
    finally:
        trainer.close()


def test_prompt_feedback_goes_into_the_prompt_and_lengths_are_reported(tmp_path):
    """--prompt-feedback: the model sees the constant feedback as the FD teacher does; the lengths are the episodes'."""
    from agent.episode import read_episodes
    from agent.feedback.base import FEEDBACK_HEADER

    args = ["--model", "tiny-qwen3", "--problems", "data/rocq_problems.jsonl", "--prover", "rocq", "--n", 2,
            "--limit", 2, "--max-new-tokens", 10]
    plain = run_evaluate(*args, "--out", tmp_path / "plain.jsonl")
    told = run_evaluate(*args, "--out", tmp_path / "told.jsonl", "--prompt-feedback", "Answer in one line.")
    assert plain.returncode == 0 and told.returncode == 0, told.stderr[-2000:]
    for proc, path, with_feedback in [(plain, "plain.jsonl", False), (told, "told.jsonl", True)]:
        episodes = list(read_episodes(tmp_path / path))
        result = json.loads(proc.stdout.splitlines()[0])
        lengths = sorted(e.num_generated for e in episodes)
        assert result["response_tokens_mean"] == sum(lengths) / 4 and result["response_tokens_median"] == lengths[2]
        assert result["token_budget_hit"] == sum(e.finish_reason == "token_budget" for e in episodes) / 4
        user = episodes[0].messages[1]["content"]
        assert user.endswith(f"\n\n{FEEDBACK_HEADER}\nAnswer in one line.") == with_feedback
    plain_eps, told_eps = list(read_episodes(tmp_path / "plain.jsonl")), list(read_episodes(tmp_path / "told.jsonl"))
    assert told_eps[0].prompt_len > plain_eps[0].prompt_len  # the feedback's tokens are in the prompt itself
