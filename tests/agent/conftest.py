"""Fixtures for the agent tests: real tokenizers and tiny random models, and a scripted backend.

`ScriptedBackend` replays given assistant turns through the real tokenizer. It stands in
for a model whose outputs a test must control (tool-call parsing, the solve path,
budgets); everything else (chat template, env, prover) is real.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.backends.base import Generation, SamplingParams


class ScriptedBackend:
    """`script(prompt_text, turn)` returns the next assistant text; ids come from the real tokenizer.

    Like a model, it does not stop by itself: after the scripted turn and its end-of-turn
    token it would go on (with a made-up user turn), so generation ends only at one of the
    request's `stop_token_ids` or at `max_new_tokens`. Every request's parameters are kept
    in `params` for tests to inspect.
    """

    RAMBLE = "<|im_start|>user\nAnd now a question the model made up itself.<|im_end|>\n"

    def __init__(self, tokenizer, script: Callable[[str, int], str], end_of_turn_id: int) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.end_of_turn_id = end_of_turn_id
        self.policy_version = 0
        self.generated_tokens = 0
        self.calls = 0
        self.params: list[SamplingParams] = []

    async def generate(self, prompt_ids, params: SamplingParams) -> Generation:
        prompt = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
        turn = prompt.count("<|im_start|>assistant")
        self.calls += 1
        self.params.append(params)
        ids = self.tokenizer.encode(self.script(prompt, turn), add_special_tokens=False) + [self.end_of_turn_id]
        ids += self.tokenizer.encode(self.RAMBLE, add_special_tokens=False)
        stop = next((i + 1 for i, t in enumerate(ids) if t in params.stop_token_ids), None)
        if stop is not None and stop <= params.max_new_tokens:
            self.generated_tokens += stop
            return Generation(ids[:stop], [-0.5] * stop, "stop")
        n = min(len(ids), params.max_new_tokens)
        self.generated_tokens += n
        return Generation(ids[:n], [-1.0] * n, "length")

    def update_weights(self, state_dict, version) -> None:
        self.policy_version = version

    def close(self) -> None:
        pass
