"""`bench/rollout.py`'s forced turns: each turn generates its tool call's length plus the reasoning length,
equal for every turn or drawn from a spread."""

import asyncio
import sys

import pytest

from tests.conftest import REPO, requires_coq

sys.path.insert(0, str(REPO / "bench"))
from rollout import ForcedTurns  # noqa: E402


def _requested_thinking(spread, think=16, turns=8):
    from agent.backends.base import SamplingParams
    from agent.rollout import make_backend
    from env.problems import load_problems
    from env.provers import make_prover

    problems = load_problems(REPO / "data/rocq_problems.jsonl")[:3]
    prover = make_prover("rocq", workers=1)
    backend, tokenizer = make_backend("transformers", "tiny-qwen3")
    try:
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        forced = ForcedTurns(backend, tokenizer, prover, problems, end, think_tokens=think, think_spread=spread)
        thinking = []
        for i in range(turns):
            problem = problems[i % 3]
            prompt = tokenizer.encode(f"<|im_start|>user\n{problem.name}<|im_end|>\n<|im_start|>assistant\n")
            turn = asyncio.run(forced.generate(prompt, SamplingParams(max_new_tokens=10_000)))
            thinking.append(forced.requests[-1][3] - len(turn.token_ids))  # new tokens asked beyond the tool call
        assert forced.generated_tokens == sum(r[3] for r in forced.requests)
        return thinking
    finally:
        backend.close()
        prover.close()


@requires_coq
def test_every_turn_thinks_as_long_without_a_spread():
    assert _requested_thinking(0.0) == [16] * 8


@requires_coq
def test_a_spread_draws_each_turns_thinking_within_its_range():
    thinking = _requested_thinking(0.5)
    assert all(8 <= t <= 24 for t in thinking) and len(set(thinking)) > 4
    assert _requested_thinking(0.5) == thinking  # seeded: the same lengths every run


def test_a_spread_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="think_spread"):
        ForcedTurns(None, None, None, [], 0, think_tokens=10, think_spread=1.5)
