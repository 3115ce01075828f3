"""`python -m trainer.run` end to end on real Rocq episodes: tiny FD and GRPO runs, resume after SIGKILL,
and the embedded default (slow)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from agent.episode import read_episodes
from tests.conftest import REPO

TINY = ["model=tiny-qwen3", "prover=rocq", "prompts_per_step=2", "max_new_tokens=24", "micro_batch_tokens=2048",
        "warmup_steps=1", "gradient_checkpointing=false"]


def run_trainer(out_dir, *overrides, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "trainer.run", *TINY, f"out_dir={out_dir}", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm, extra", [
    ("fd", ["feedback=compiler", "ema_every=1"]),
    ("grpo", ["samples_per_prompt=2", "lr=1e-4"]),
])
def test_two_steps_end_to_end(tmp_path, algorithm, extra):
    out = tmp_path / algorithm
    eval_problems = tmp_path / "eval.jsonl"
    lines = (REPO / "data" / "rocq_problems.jsonl").read_text().splitlines()[:2]
    eval_problems.write_text("\n".join(lines) + "\n")
    proc = run_trainer(out, f"algorithm={algorithm}", "steps=2", *extra, f"eval_problems={eval_problems}",
                       "eval_every=2")
    assert proc.stdout.splitlines()[0].startswith("prover: rocq (chosen in the config)")
    episodes = list(read_episodes(out / "episodes.jsonl"))
    per_step = 2 * (2 if algorithm == "grpo" else 1)
    assert len(episodes) == 2 * per_step and len({e.episode_id for e in episodes}) == len(episodes)
    if algorithm == "fd":
        assert all(e.feedback is not None and e.feedback.source == "compiler" for e in episodes)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert "eval/pass@1" not in rows[0] and rows[1]["eval/pass@1"] == 0.0  # evaluated at step 2 only
    for r in rows:
        assert r["train/loss_tokens"] > 0 and r["train/entropy"] > 0 and r["time/rollout_s"] > 0
        assert 0.0 <= r["train/accuracy"] <= 1.0
    if algorithm == "fd":
        assert rows[0]["fd/kl_topk"] >= 0 and rows[1]["train/ema_update"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["checkpoint"].endswith("step-000002/model")
    # the checkpoint is a Hugging Face model directory
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    assert model.config.num_hidden_layers == 2
    from agent.models import load_model

    initial = load_model("tiny-qwen3")
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), initial.state_dict().values(),
                                                        strict=True))
    if algorithm == "fd":
        assert changed  # distillation moves the policy even when nothing is solved
    else:  # a tiny random model solves nothing: equal rewards, zero advantages, no policy-gradient signal
        assert rows[0]["grpo/advantage_abs_mean"] == 0.0 and not changed


def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL during step 3; resuming gives the same episodes and weights as an uninterrupted run."""
    args = ["algorithm=fd", "steps=4", "ema_every=2"]
    run_trainer(tmp_path / "straight", *args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.run", *TINY, f"out_dir={killed}", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-000002" / "trainer_state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()

    run_trainer(killed, *args, "resume=true")
    straight_eps = [e.token_ids for e in read_episodes(tmp_path / "straight" / "episodes.jsonl")]
    resumed_eps = [e.token_ids for e in read_episodes(killed / "episodes.jsonl")]
    assert len(resumed_eps) == 8 and resumed_eps == straight_eps
    assert [r["step"] for r in metrics(killed)] == [1, 2, 3, 4]
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoints" / "step-000004" / "model")
    b = AutoModelForCausalLM.from_pretrained(killed / "checkpoints" / "step-000004" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), name


@pytest.mark.slow
def test_embedded_default_completes(tmp_path):
    """`python -m trainer.run` with no arguments (out_dir moved into the test's folder)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trainer.run", f"out_dir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("prover: ")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["model"] == "smollm2"
    assert len(list(read_episodes(tmp_path / "episodes.jsonl"))) == 12
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    print(f"embedded default: {time.monotonic() - start:.0f} s")
