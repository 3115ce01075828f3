"""Feedback sources that need no external API: the prover's output, a reference proof, a fixed string,
and a frozen copy of the initial policy (Self-Feedback Distillation, section 5.1 of the paper).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent.backends.base import GenerationBackend, SamplingParams
from agent.feedback.base import Attempt, FeedbackError, framed
from agent.feedback.prompts import DEFAULT_PROMPT, system_prompt, user_message

COMPILER_FAILURE = "The following is feedback from your unsuccessful earlier attempt: {output}"
CORRECT_SOLUTION = "Example of a correct solution:{solution}"

# The two fixed strings of section 5.3's internalisation experiment (run there with a frozen teacher).
BE_CONCISE = "Be concise"
THINK_CAREFULLY = "Think carefully before answering. Verify that the solution is correct."

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


class CompilerFeedback:
    """The attempt's last prover output; on success the proof it found (section 5.1 of the paper)."""

    name = "compiler"

    async def feedback(self, attempt: Attempt) -> str:
        if attempt.solved:
            assert attempt.solution is not None  # Attempt guarantees it
            return CORRECT_SOLUTION.format(solution=attempt.solution)
        return COMPILER_FAILURE.format(output=attempt.final_output)


class GroundTruthFeedback:
    """The problem's reference proof as a full file, whatever the attempt did."""

    name = "ground_truth"

    async def feedback(self, attempt: Attempt) -> str:
        problem = attempt.problem
        if problem.formal_proof is None:
            raise ValueError(f"ground_truth feedback needs a reference proof, and problem {problem.name!r} has "
                             "none (formal_proof is null): train on a set with known proofs")
        return CORRECT_SOLUTION.format(solution=problem.header + problem.formal_statement + problem.formal_proof)


class ConstantFeedback:
    """The same string after every attempt: shows that feedback is internalised into the weights."""

    name = "constant"

    def __init__(self, text: str) -> None:
        if not text.strip():
            raise ValueError("constant feedback needs a non-empty text")
        self.text = text

    async def feedback(self, attempt: Attempt) -> str:
        return framed(self.text)


class SelfFeedback:
    """Feedback written by a frozen copy of the initial policy, served by a generation backend of its own."""

    name = "self"

    def __init__(self, backend: GenerationBackend, tokenizer: Any, sampling: SamplingParams, *,
                 prompt: int = DEFAULT_PROMPT) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.system = system_prompt(prompt)

    async def feedback(self, attempt: Attempt) -> str:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user_message(attempt)}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        generation = await self.backend.generate(list(ids), self.sampling)
        text = strip_thinking(self.tokenizer.decode(generation.token_ids, skip_special_tokens=True))
        if not text:
            raise FeedbackError(f"the feedback model wrote nothing after its reasoning for {attempt.problem.name!r} "
                                f"(finish_reason={generation.finish_reason}; raise max_new_tokens if 'length')")
        return framed(text)


def strip_thinking(text: str) -> str:
    """The text without `<think>...</think>` blocks; an unclosed block (out of tokens) leaves nothing after it."""
    text = _THINK.sub("", text)
    if "<think>" in text:
        text = text[: text.index("<think>")]
    return text.strip()
