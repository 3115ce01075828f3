"""Fixtures for the agent tests: real tokenizers and tiny random models, and a scripted backend.

`ScriptedBackend` replays given assistant turns through the real tokenizer. It stands in
for a model whose outputs a test must control (tool-call parsing, the solve path,
budgets); everything else (chat template, env, prover) is real.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.backends.base import Generation, SamplingParams


class ScriptedBackend:
    """`script(prompt_text, turn)` returns the next assistant text; ids come from the real tokenizer."""

    def __init__(self, tokenizer, script: Callable[[str, int], str], end_of_turn_id: int) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.end_of_turn_id = end_of_turn_id
        self.policy_version = 0
        self.generated_tokens = 0
        self.calls = 0

    async def generate(self, prompt_ids, params: SamplingParams) -> Generation:
        prompt = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
        turn = prompt.count("<|im_start|>assistant")
        self.calls += 1
        ids = self.tokenizer.encode(self.script(prompt, turn), add_special_tokens=False) + [self.end_of_turn_id]
        self.generated_tokens += min(len(ids), params.max_new_tokens)
        if len(ids) > params.max_new_tokens:
            return Generation(ids[: params.max_new_tokens], [-1.0] * params.max_new_tokens, "length")
        return Generation(ids, [-0.5] * len(ids), "stop")

    def update_weights(self, state_dict, version) -> None:
        self.policy_version = version

    def close(self) -> None:
        pass
