"""The trainer's math and the transformers backend on an NVIDIA GPU (bf16), against CPU float64.

Run where CUDA is available: `python -m pytest -m gpu`.
"""

import asyncio
import copy

import pytest
import torch

from tests.trainer.test_batches import backward, random_sequences, student_and_teacher

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")]


@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
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


def test_transformers_backend_on_gpu(tiny_model, qwen_tokenizer):
    from agent.backends.base import SamplingParams
    from agent.backends.hf import TransformersBackend

    backend = TransformersBackend(copy.deepcopy(tiny_model).cuda(), qwen_tokenizer)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)

    async def together():
        return await asyncio.gather(*(backend.generate(p, params) for p in prompts))

    try:
        batched = asyncio.run(together())
        alone = [asyncio.run(backend.generate(p, params)) for p in prompts]
    finally:
        backend.close()
    for a, b in zip(batched, alone, strict=True):
        assert len(a.token_ids) == 16 and a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
