"""The trainer's math and the transformers backend on an NVIDIA GPU (bf16), against CPU float64.

Run where CUDA is available: `python -m pytest -m gpu`. These cover what only a GPU runs: the
compiled row kernels of the fused LM head, the packed attention on flash kernels, sampling
with CUDA generators and the host reading tokens every few steps.
"""

import asyncio
import copy

import pytest
import torch

from tests.conftest import requires_smollm2
from tests.trainer.test_batches import backward, grads, padded_backward, random_sequences, student_and_teacher

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")]


@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
@requires_smollm2
def test_bf16_gpu_step_matches_float64_cpu(tiny_model, algorithm):
    student, teacher = student_and_teacher(tiny_model)
    sequences = random_sequences(student.config.vocab_size)
    losses = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.bfloat16)):
        s, t = copy.deepcopy(student).to(device, dtype), copy.deepcopy(teacher).to(device, dtype)
        stats = backward(algorithm, s, t, sequences, token_budget=64, chunk=16)
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in s.parameters() if p.grad is not None))
        losses.append((stats["loss_sum"], float(grad_norm)))
    (cpu_loss, cpu_norm), (gpu_loss, gpu_norm) = losses
    assert gpu_loss == pytest.approx(cpu_loss, rel=3e-2, abs=1e-3)
    assert gpu_norm == pytest.approx(cpu_norm, rel=5e-2, abs=1e-4)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each Triton kernel wrapper of trainer/row_kernels.py."""
    from trainer import row_kernels

    calls = {"row_stats": 0, "scaled_softmax": 0}

    def counting(name):
        fn = getattr(row_kernels, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    for name in calls:
        monkeypatch.setattr(row_kernels, name, counting(name))
    return calls


@pytest.mark.parametrize("loss_fn", ["fd", "grpo"])
def test_fused_head_on_gpu_matches_float64(loss_fn, kernel_calls):
    """bf16 logits and gradient chunks through the Triton row kernels, against the float64 CPU value."""
    from trainer.losses import fd_loss, grpo_head_loss, teacher_topk

    g = torch.Generator().manual_seed(0)
    n, h, v = 3000, 64, 5000  # three chunks, the last one shorter
    hidden, weight = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g,
                                                                                   dtype=torch.float64) / 4
    ids, probs = teacher_topk(hidden + 0.3 * torch.randn(n, h, generator=g, dtype=torch.float64), weight, k=25)
    targets, adv = ids[:, 3], torch.randn(n, generator=g, dtype=torch.float64)
    results = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.bfloat16)):
        x = hidden.detach().to(device, dtype).requires_grad_()
        w = weight.detach().to(device, dtype).requires_grad_()
        if loss_fn == "fd":
            loss, stats = fd_loss(x, w, ids.to(device), probs.to(device), None, chunk=1024)
        else:
            loss, stats = grpo_head_loss(x, w, targets.to(device), None, adv.to(device), None, chunk=1024)
        loss.backward()
        results.append((float(loss), stats["entropy_sum"], x.grad.double().cpu(), w.grad.double().cpu()))
    assert kernel_calls == {"row_stats": 3, "scaled_softmax": 3}  # the CUDA run's three chunks took the kernels
    (loss64, ent64, gx64, gw64), (loss16, ent16, gx16, gw16) = results
    assert loss16 == pytest.approx(loss64, rel=2e-2) and ent16 == pytest.approx(ent64, rel=2e-2)
    assert float((gx16 - gx64).norm() / gx64.norm()) < 3e-2
    assert float((gw16 - gw64).norm() / gw64.norm()) < 3e-2


def test_teacher_topk_on_gpu_matches_torchs_top_k_and_softmax(kernel_calls):
    """bf16 logits over a vocabulary of 128 segments: the segmented top k and the log-sum-exp from
    one Triton read per chunk, against torch's top k and fp32 log-sum-exp of the same logits."""
    from trainer import lm_head
    from trainer.losses import teacher_topk

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1024, 256, generator=g, device="cuda").bfloat16()
    weight = (torch.randn(128 * 400, 256, generator=g, device="cuda") / 8).bfloat16()
    ids, probs = teacher_topk(hidden, weight, k=25, chunk=1024)
    assert kernel_calls == {"row_stats": 1, "scaled_softmax": 0}
    z = lm_head.logits(hidden, weight)
    values, _ = z.topk(25, dim=-1)
    assert torch.equal(z.gather(1, ids), values)
    want = torch.exp(values.float() - torch.logsumexp(z.float(), -1, keepdim=True))
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_kernels_compiled_on_gpu_match_float64(dtype):
    """The kernels at the head's real size (a [1,024 x 151,936] chunk), compiled, against float64."""
    from trainer import lm_head, row_kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    z = (4 * torch.randn(1024, 151936, generator=g, device="cuda")).to(dtype)
    z[::7] += 50
    lse, entropy, _ = row_kernels.row_stats(z, entropy=True)
    want_lse, want_entropy = lm_head._softmax_stats(z.double())
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-5, atol=2e-5)
    lse2, _, maxima = row_kernels.row_stats(z, segments=128)
    torch.testing.assert_close(lse2, lse, rtol=1e-6, atol=1e-5)  # another tiling: another order of the sums
    assert torch.equal(maxima, z.view(1024, 128, -1).amax(-1))
    scale = torch.rand(1024, generator=g, device="cuda")
    got = row_kernels.scaled_softmax(z, lse, scale)
    want = scale.double()[:, None] * torch.exp(z.double() - want_lse[:, None])
    torch.testing.assert_close(got.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
@requires_smollm2
def test_packed_equals_padded_on_gpu(tiny_model, algorithm):
    """The packed attention's per-sequence SDPA against padded rows, on CUDA kernels (fp32: tight tolerance)."""
    student, teacher = student_and_teacher(tiny_model)
    student, teacher = student.to("cuda", torch.float32), teacher.to("cuda", torch.float32)
    sequences = random_sequences(student.config.vocab_size)
    want_loss = padded_backward(algorithm, student, teacher, sequences)
    want = grads(student)
    student.zero_grad()
    stats = backward(algorithm, student, teacher, sequences, token_budget=10_000, chunk=16)
    assert stats["loss_sum"] == pytest.approx(want_loss, rel=1e-4)
    for a, b in zip(grads(student), want, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


@requires_smollm2
def test_transformers_backend_on_gpu(tiny_model, qwen_tokenizer):
    """Batched == alone for the same seeds; other seeds, other tokens; stops exact though the host reads the
    tokens every 8 steps; greedy as `generate`."""
    from agent.backends.base import SamplingParams
    from agent.backends.hf import TransformersBackend

    model = copy.deepcopy(tiny_model).cuda()
    backend = TransformersBackend(model, qwen_tokenizer)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)

    async def together(ps):
        return await asyncio.gather(*(backend.generate(p, q) for p, q in ps))

    try:
        assert backend._check_every == 8
        batched = asyncio.run(together([(p, params) for p in prompts]))
        alone = [asyncio.run(backend.generate(p, params)) for p in prompts]
        other = asyncio.run(backend.generate(prompts[0], SamplingParams(temperature=1.0, max_new_tokens=16, seed=4)))
        stop = batched[0].token_ids[2]
        stopped, short = asyncio.run(together([
            (prompts[0], SamplingParams(temperature=1.0, max_new_tokens=16, seed=3, stop_token_ids=(stop,))),
            (prompts[0], SamplingParams(temperature=1.0, max_new_tokens=5, seed=3))]))
        greedy = asyncio.run(backend.generate(prompts[1], SamplingParams(temperature=0.0, max_new_tokens=6)))
    finally:
        backend.close()
    for a, b in zip(batched, alone, strict=True):
        assert len(a.token_ids) == 16 and a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
    assert other.token_ids != batched[0].token_ids
    first = batched[0].token_ids.index(stop)
    assert stopped.token_ids == batched[0].token_ids[: first + 1] and stopped.finish_reason == "stop"
    assert short.token_ids == batched[0].token_ids[:5] and short.finish_reason == "length"
    with torch.no_grad():
        want = model.generate(torch.tensor([prompts[1]], device="cuda"), max_new_tokens=6, do_sample=False)
    assert greedy.token_ids == want[0, 6:].tolist()


@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
def test_fused_layers_on_gpu_are_as_accurate_as_eager(algorithm, monkeypatch):
    """The norms, rotary embedding and SwiGLU as compiled Triton kernels (trainer.fused_layers) and as
    transformers' modules, both bf16 on CUDA, against float64 on the CPU: the fused step's loss and gradient
    are no further from float64 than the eager step's. (bf16 alone puts FD's small gradients on this model
    about 20% from float64, so the eager step is the measure.) A 2-layer Qwen3 built from its config."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.models.qwen3 import modeling_qwen3

    from trainer import fused_layers

    rope = modeling_qwen3.apply_rotary_pos_emb  # fusing replaces it for the family: transformers' own until then
    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", getattr(rope, "original", rope))
    config = Qwen3Config(vocab_size=4096, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    student, teacher = student_and_teacher(AutoModelForCausalLM.from_config(config))
    sequences = random_sequences(config.vocab_size)
    results = []
    for device, dtype, fused in (("cpu", torch.float64, False), ("cuda", torch.bfloat16, False),
                                 ("cuda", torch.bfloat16, True)):
        s, t = copy.deepcopy(student).to(device, dtype), copy.deepcopy(teacher).to(device, dtype)
        if fused:
            assert fused_layers.fuse_layers(s) and fused_layers.fuse_layers(t)
        stats = backward(algorithm, s, t, sequences, token_budget=64, chunk=16)
        results.append((stats["loss_sum"], torch.cat([p.grad.double().cpu().flatten() for p in s.parameters()])))
    assert {"rms_norm", "rotary", "swiglu"} <= set(fused_layers._compiled)  # the CUDA run compiled them
    (loss64, grad64), (loss_eager, grad_eager), (loss_fused, grad_fused) = results
    error = {"eager": float((grad_eager - grad64).norm() / grad64.norm()),
             "fused": float((grad_fused - grad64).norm() / grad64.norm())}
    assert error["fused"] <= 1.25 * error["eager"] + 1e-3, error
    assert abs(loss_fused - loss64) <= 1.25 * abs(loss_eager - loss64) + 1e-3 * abs(loss64)
