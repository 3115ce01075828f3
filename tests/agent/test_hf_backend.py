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


def reference_sample(model, prompt, params):
    """The straightforward sampler: the whole sequence through the model at each step, the last row's
    distribution on the CPU, `torch.multinomial` with a generator seeded by the request's seed."""
    gen = torch.Generator().manual_seed(params.seed or 0)  # greedy rows draw nothing
    ids, logprobs = list(prompt), []
    for _ in range(params.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        if params.temperature <= 0:
            token, lp = int(logits.argmax()), 0.0
        else:
            lps = torch.log_softmax(logits / params.temperature, -1)
            if params.top_p < 1.0:
                sorted_lp, order = torch.sort(lps, descending=True)
                cumulative = sorted_lp.exp().cumsum(-1)
                sorted_lp[cumulative - sorted_lp.exp() >= params.top_p] = float("-inf")
                lps = torch.log_softmax(torch.full_like(lps, float("-inf")).scatter(0, order, sorted_lp), -1)
            token = int(torch.multinomial(lps.exp(), 1, generator=gen))
            lp = float(lps[token])
        ids.append(token)
        logprobs.append(lp)
        if token in params.stop_token_ids:
            break
    return ids[len(prompt):], logprobs


MIXED = [SamplingParams(temperature=1.0, max_new_tokens=10, seed=1),
         SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=2),
         SamplingParams(temperature=0.0, max_new_tokens=7),
         SamplingParams(temperature=1.3, top_p=0.5, max_new_tokens=9, seed=4)]


def test_a_mixed_batch_samples_what_the_reference_sampler_does(backend, tiny_model):
    """Per-request temperature, top-p and seed in one batch on the device: the reference's tokens and logprobs."""
    prompts = PROMPTS + [[20, 21]]

    async def together():
        return await asyncio.gather(*(backend.generate(p, q) for p, q in zip(prompts, MIXED, strict=True)))

    for gen, prompt, params in zip(run(together()), prompts, MIXED, strict=True):
        want_ids, want_lp = reference_sample(tiny_model, prompt, params)
        assert gen.token_ids == want_ids and len(want_ids) == params.max_new_tokens
        assert gen.logprobs == pytest.approx(want_lp, abs=1e-4)
    other = run(backend.generate(prompts[0], SamplingParams(temperature=1.0, max_new_tokens=10, seed=2)))
    assert other.token_ids != reference_sample(tiny_model, prompts[0], MIXED[0])[0]  # another seed, other tokens


def test_only_the_last_position_gets_logits(backend, tiny_model):
    shapes = []
    hook = tiny_model.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        run(backend.generate(PROMPTS[1], SamplingParams(max_new_tokens=4, seed=0)))
    finally:
        hook.remove()
    assert shapes == [(1, 1, tiny_model.config.vocab_size)] * 4  # the prefill too


def test_stops_are_exact_when_the_host_checks_every_few_steps(backend, qwen_tokenizer):
    """On a GPU the host reads tokens every 8 steps; rows still end exactly at their stop token, stop string
    or length, as when it reads every step (the CPU default)."""
    free = run(backend.generate(PROMPTS[0], SamplingParams(max_new_tokens=20, seed=5)))
    text = qwen_tokenizer.decode(free.token_ids[:6], skip_special_tokens=False)
    params = [SamplingParams(max_new_tokens=20, seed=5, stop_token_ids=(free.token_ids[3],)),
              SamplingParams(max_new_tokens=20, seed=5, stop_strings=(text[-3:],)),
              SamplingParams(max_new_tokens=11, seed=5),
              SamplingParams(max_new_tokens=20, seed=5)]

    async def together():
        return await asyncio.gather(*(backend.generate(PROMPTS[0], p) for p in params))

    every_step = run(together())
    backend._check_every = 8
    windowed = run(together())
    assert windowed == every_step
    stop, string, length, full = windowed
    assert stop.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3]) + 1]
    assert stop.finish_reason == "stop"
    assert string.finish_reason == "stop" and string.token_ids == free.token_ids[: len(string.token_ids)]
    assert len(string.token_ids) <= 6
    assert qwen_tokenizer.decode(string.token_ids, skip_special_tokens=False).endswith(text[-3:])
    assert length.token_ids == free.token_ids[:11] and length.finish_reason == "length"
    assert full.token_ids == free.token_ids and full.finish_reason == "length"
