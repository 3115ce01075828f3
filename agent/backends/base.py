"""The generation interface every backend implements: token ids in, token ids + logprobs out.

Backends never see text or chat messages (that is `agent.chat`), so the sequence a
rollout builds is exactly the ids the model produced: nothing is re-tokenized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (it is kept)
    stop_strings: tuple[str, ...] = ()  # ... or once the decoded output ends with one of these (kept)
    seed: int | None = None  # per-request seed; None draws from the backend's generator


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each generated token under the sampling distribution
    finish_reason: FinishReason  # "stop": a stop token or string ended it; "length": max_new_tokens


class GenerationBackend(Protocol):
    """Implementations: `agent.backends.hf.TransformersBackend`, `agent.backends.vllm.VLLMBackend`."""

    policy_version: int  # optimizer steps behind the current weights: the `version` of the last update_weights
    generated_tokens: int  # tokens sampled so far over all requests, growing while they run (for progress)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        """Sample one continuation of `prompt_ids`; safe to call concurrently."""
        ...

    def update_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Load new policy weights in place (names as in the Hugging Face model's state dict), made by
        `version` optimizer steps; `policy_version` becomes `version`."""
        ...

    def close(self) -> None: ...
