"""Two training processes on CPU (torchrun, gloo, FSDP2): the step's gradient equals the one-process gradient,
and `trainer.run` under torchrun logs every episode once, checkpoints, and resumes exactly.

The gradient test runs this module under torchrun (`python -m torch.distributed.run --nproc_per_node 2 -m
tests.trainer.test_distributed ALGORITHM OUT`); each rank takes an uneven share of the sequences, so the
ranks run different numbers of micro-batches and the short one is padded with empty ones.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from agent.episode import read_episodes
from tests.conftest import REPO, requires_coq, requires_smollm2
from tests.trainer.test_batches import backward, random_sequences, student_and_teacher
from tests.trainer.test_run import TINY, metrics

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SPLIT = 5  # rank 0 trains on sequences[:5], rank 1 on sequences[5:]: 5 and 3 micro-batches of one
MAX_NORM = 1e-4  # below the gradient norm, so clipping scales the gradient


def models(device="cpu"):
    from agent.models import load_model

    student, teacher = student_and_teacher(load_model("tiny-qwen3"))
    return student.to(device), teacher.to(device)


def train_step(algorithm, sequences, *, token_budget, device="cpu"):
    """One optimizer step as `trainer.run` takes it (under torchrun, on this rank's sequences):
    the stats, the gradient norm, the clipped full gradients and the full weights after AdamW."""
    from trainer import distributed

    student, teacher = models(device)
    if algorithm == "grpo":  # as trainer.run does by default; FSDP recomputes the sharded layers
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    distributed.shard(student)
    distributed.shard(teacher)
    stats = distributed.sum_stats(backward(algorithm, student, teacher, sequences, token_budget=token_budget,
                                           chunk=3))
    distributed.reduce_replicated_grads(student)
    norm = float(distributed.clip_grad_norm_(student, MAX_NORM))
    grads = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
             for name, p in student.named_parameters()}
    optimizer = torch.optim.AdamW(distributed.param_groups(student), lr=1e-3)
    optimizer.step()
    return {"stats": stats, "norm": norm, "grads": grads, "weights": distributed.full_state_dict(student)}


two_gpus = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs"),
            requires_smollm2]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=two_gpus)])  # gloo, NCCL
@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
def test_two_ranks_give_the_one_process_gradient(tmp_path, algorithm, device):
    out = tmp_path / "ranks.pt"
    proc = subprocess.run([*TORCHRUN, "-m", "tests.trainer.test_distributed", algorithm, device, str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(out, map_location="cpu", weights_only=False)
    # NCCL's protocol is set for NCCL only, and a user's choice stays
    assert two["nccl_proto"] == os.environ.get("NCCL_PROTO", "Simple" if device == "cuda" else None)
    sequences = random_sequences(models()[0].config.vocab_size)
    one = train_step(algorithm, sequences, token_budget=10_000, device=device)  # CPU and CUDA round differently
    assert two["stats"]["tokens"] == one["stats"]["tokens"] == sum(s.num_loss_tokens for s in sequences)
    assert two["stats"]["loss_sum"] == pytest.approx(one["stats"]["loss_sum"], rel=1e-9)
    assert two["norm"] == pytest.approx(one["norm"], rel=1e-9) and one["norm"] > MAX_NORM
    assert two["grads"].keys() == one["grads"].keys()
    for name, g in one["grads"].items():
        assert torch.allclose(two["grads"][name], g.cpu(), rtol=1e-7, atol=1e-12), name
    for name, w in one["weights"].items():
        assert torch.allclose(two["weights"][name], w.cpu(), rtol=1e-7, atol=1e-10), name


def test_nccl_defaults_fill_in_what_the_user_left_unset():
    from trainer import distributed

    env = {"NCCL_DEBUG": "INFO"}
    distributed.nccl_defaults(env)
    assert env == {"NCCL_DEBUG": "INFO", "NCCL_PROTO": "Simple"}
    env = {"NCCL_PROTO": "LL128"}
    distributed.nccl_defaults(env)
    assert env == {"NCCL_PROTO": "LL128"}


def run_torchrun(out_dir, *overrides, timeout=600):
    proc = subprocess.run([*TORCHRUN, "-m", "trainer.run", *TINY, f"out_dir={out_dir}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@requires_coq
@pytest.mark.parametrize("algorithm, extra", [
    ("fd", ["feedback=compiler", "ema_every=1"]),
    ("grpo", ["samples_per_prompt=2"]),
])
def test_torchrun_two_steps_end_to_end(tmp_path, algorithm, extra):
    """prompts_per_step=2: each rank runs the episodes of one problem."""
    out = tmp_path / algorithm
    proc = run_torchrun(out, f"algorithm={algorithm}", "steps=2", *extra)
    assert proc.stdout.splitlines()[0].startswith("prover: rocq")
    assert sum(line.startswith("{") for line in proc.stdout.splitlines()) == 1  # rank 0 alone prints the summary
    episodes = list(read_episodes(out / "episodes.jsonl"))
    per_step = 2 * (2 if algorithm == "grpo" else 1)
    assert len(episodes) == 2 * per_step
    assert len({e.episode_id for e in episodes}) == len({e.seeds["episode"] for e in episodes}) == len(episodes)
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert all(r["train/loss_tokens"] > 0 for r in metrics(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["checkpoint"].endswith("step-000002/model")
    step = out / "checkpoints" / "step-000002"
    assert {p.name for p in step.glob("trainer_state*.pt")} == {"trainer_state.pt", "trainer_state.rank0.pt",
                                                                 "trainer_state.rank1.pt"}
    from transformers import AutoModelForCausalLM

    from agent.models import load_model

    model = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    initial = load_model("tiny-qwen3")
    assert model.state_dict().keys() == initial.state_dict().keys()
    if algorithm == "fd":  # distillation moves every weight, sharded or replicated
        assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)


@requires_coq
def test_torchrun_resume_continues_exactly(tmp_path):
    """2 steps, then a resumed third, equal 3 straight steps (episodes and weights); another world size is refused."""
    args = ["algorithm=fd", "ema_every=2"]
    run_torchrun(tmp_path / "straight", *args, "steps=3")
    run_torchrun(tmp_path / "resumed", *args, "steps=2")
    run_torchrun(tmp_path / "resumed", *args, "steps=3", "resume=true")
    straight = [e.token_ids for e in read_episodes(tmp_path / "straight" / "episodes.jsonl")]
    resumed = [e.token_ids for e in read_episodes(tmp_path / "resumed" / "episodes.jsonl")]
    assert len(resumed) == 6 and resumed == straight
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [1, 2, 3]
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoints" / "step-000003" / "model")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "checkpoints" / "step-000003" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name

    proc = subprocess.run([sys.executable, "-m", "trainer.run", *TINY, f"out_dir={tmp_path / 'resumed'}", *args,
                           "steps=4", "resume=true"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "written by 2 process(es)" in proc.stderr


if __name__ == "__main__":  # one rank of the gradient test, under torchrun
    from trainer import distributed

    algorithm, device, out = sys.argv[1:]
    device = distributed.setup(device)
    sequences = random_sequences(models()[0].config.vocab_size)
    mine = sequences[:SPLIT] if distributed.rank() == 0 else sequences[SPLIT:]
    result = train_step(algorithm, mine, token_budget=1, device=device)
    result["nccl_proto"] = os.environ.get("NCCL_PROTO")
    if distributed.is_main():
        torch.save(result, out)
    distributed.close()
