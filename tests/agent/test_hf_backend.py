"""The transformers backend with a tiny random Qwen3 model: batching, sampling, logprobs, stops, weights."""

import asyncio

import pytest
import torch

from agent.backends.base import SamplingParams
from agent.backends.hf import TransformersBackend


@pytest.fixture
def backend(tiny_model, qwen_tokenizer):
    b = TransformersBackend(tiny_model, qwen_tokenizer)
    yield b
    b.close()


def run(coro):
    return asyncio.run(coro)


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]


def test_batched_equals_one_at_a_time(backend):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=11)

    async def together():
        return await asyncio.gather(*(backend.generate(p, params) for p in PROMPTS))

    batched = run(together())
    alone = [run(backend.generate(p, params)) for p in PROMPTS]
    for a, b in zip(batched, alone, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_logprobs_are_the_sampling_distribution(backend, tiny_model):
    params = SamplingParams(temperature=0.7, max_new_tokens=8, seed=3)
    gen = run(backend.generate(PROMPTS[1], params))
    assert len(gen.token_ids) == len(gen.logprobs) == 8 and gen.finish_reason == "length"
    ids = torch.tensor([PROMPTS[1] + gen.token_ids])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0, len(PROMPTS[1]) - 1:-1].float()
    expected = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
    assert gen.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_greedy_and_top_p(backend, tiny_model):
    greedy = run(backend.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=5)))
    with torch.no_grad():
        out = tiny_model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=5, do_sample=False)
    assert greedy.token_ids == out[0, 3:].tolist()
    nucleus = run(backend.generate(PROMPTS[0], SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=5, seed=1)))
    assert nucleus.token_ids == greedy.token_ids and nucleus.logprobs == pytest.approx([0.0] * 5, abs=1e-5)


def test_stop_token_ends_generation_and_is_kept(backend):
    free = run(backend.generate(PROMPTS[0], SamplingParams(max_new_tokens=10, seed=5)))
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    stopped = run(backend.generate(PROMPTS[0], SamplingParams(max_new_tokens=10, seed=5, stop_token_ids=(stop,))))
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"


def test_update_weights_changes_outputs_and_version(backend, tiny_model):
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = run(backend.generate(PROMPTS[1], params))
    original = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    try:
        torch.manual_seed(0)
        backend.update_weights({k: v + 0.5 * torch.randn_like(v) for k, v in original.items()}, version=3)
        assert backend.policy_version == 3  # the caller's step count, not a count of updates
        after = run(backend.generate(PROMPTS[1], params))
        assert after.token_ids != before.token_ids
        with pytest.raises(ValueError, match="unknown weights"):
            backend.update_weights({"not.a.weight": torch.zeros(1)}, version=4)
        assert backend.policy_version == 3
    finally:
        tiny_model.load_state_dict(original)


def test_generated_tokens_count_every_sampled_token(backend):
    start = backend.generated_tokens
    params = SamplingParams(max_new_tokens=7, seed=1)

    async def together():
        return await asyncio.gather(*(backend.generate(p, params) for p in PROMPTS))

    gens = run(together())
    assert backend.generated_tokens - start == sum(len(g.token_ids) for g in gens)


def test_empty_prompt_is_an_error(backend):
    with pytest.raises(ValueError, match="empty"):
        run(backend.generate([], SamplingParams()))
