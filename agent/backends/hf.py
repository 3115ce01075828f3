"""Transformers generation backend: CPU or one GPU; concurrent requests are batched.

Requests wait in a queue; a worker thread takes every waiting request (up to
`max_batch_size`), left-pads them into one batch and decodes with a KV cache until each
row has met its stop condition, sampling each row with its own temperature, top-p and
seed. Logprobs are those of the distribution actually sampled from (after temperature
and top-p). Requests that arrive during a batch go into the next one (static batching;
continuous batching is the vLLM backend's job).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agent.backends.base import Generation, SamplingParams


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class TransformersBackend:
    def __init__(self, model: Any, tokenizer: Any = None, *, max_batch_size: int = 16, seed: int = 0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer  # only for stop strings
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.policy_version = 0
        self.generated_tokens = 0  # sampled tokens so far, over all requests (read by progress bars)
        self._pending: list[_Request] = []
        self._cv = threading.Condition()  # guards the queue; held only briefly, also by the event loop
        self._weights = threading.Lock()  # held while a batch runs
        self._closed = False
        self._rng = torch.Generator().manual_seed(seed)
        # transformers renamed `past_key_values` to `cache` (5.2x); use what this version's model takes.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._thread = threading.Thread(target=self._serve, name="hf-generate", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the backend to have a tokenizer")
        loop = asyncio.get_running_loop()
        request = _Request(list(prompt_ids), params, loop.create_future(), loop)
        with self._cv:
            if self._closed:
                raise RuntimeError("the backend is closed")
            self._pending.append(request)
            self._cv.notify()
        return await request.future

    def update_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        with self._weights:  # between batches, never during one
            missing, unexpected = self.model.load_state_dict(dict(state_dict), strict=False)
            if unexpected:
                raise ValueError(f"unknown weights: {sorted(unexpected)[:5]}")
            self.policy_version = version

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)

    # -- worker thread ---------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending:
                    return
                batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size:]
            try:
                with self._weights:
                    results: list[Generation | BaseException] = list(self._run_batch(batch))
            except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
                results = [e] * len(batch)
            for request, result in zip(batch, results, strict=True):
                request.loop.call_soon_threadsafe(_resolve, request.future, result)

    @torch.no_grad()
    def _run_batch(self, batch: list[_Request]) -> list[Generation]:
        n = len(batch)
        width = max(len(r.prompt_ids) for r in batch)
        pad = 0
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [_generator(r.params.seed, self._rng) for r in batch]
        out_ids: list[list[int]] = [[] for _ in batch]
        out_lp: list[list[float]] = [[] for _ in batch]
        finish: list[str | None] = [None] * n
        cache = None
        step_ids, step_pos = ids, positions
        max_new = max(r.params.max_new_tokens for r in batch)
        for _ in range(max_new):
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                             **{self._cache_kw: cache})
            cache = out[self._cache_kw]
            logits = out.logits[:, -1, :].float()
            next_ids = torch.full((n,), pad, dtype=torch.long)
            for i, r in enumerate(batch):
                if finish[i] is not None:
                    continue
                token, logprob = _sample(logits[i], r.params, gens[i])
                self.generated_tokens += 1
                out_ids[i].append(token)
                out_lp[i].append(logprob)
                next_ids[i] = token
                finish[i] = self._finished(r.params, out_ids[i])
            if all(f is not None for f in finish):
                break
            step_ids = next_ids.to(self.device).unsqueeze(1)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], dim=1)
        return [Generation(out_ids[i], out_lp[i], finish[i] or "length") for i in range(n)]

    def _finished(self, params: SamplingParams, ids: list[int]) -> str | None:
        if ids[-1] in params.stop_token_ids:
            return "stop"
        if params.stop_strings:
            tail = self.tokenizer.decode(ids[-16:], skip_special_tokens=False)
            if any(tail.endswith(s) for s in params.stop_strings):
                return "stop"
        if len(ids) >= params.max_new_tokens:
            return "length"
        return None


def _generator(seed: int | None, shared: torch.Generator) -> torch.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=shared))
    return torch.Generator().manual_seed(seed)


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> tuple[int, float]:
    """One token from softmax(logits / T) restricted to the top-p nucleus, with its log-probability."""
    if params.temperature <= 0:  # greedy: the sampling distribution is a point mass
        return int(torch.argmax(logits)), 0.0
    logprobs = torch.log_softmax(logits / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_lp, order = torch.sort(logprobs, descending=True)
        cumulative = sorted_lp.exp().cumsum(-1)
        drop = cumulative - sorted_lp.exp() >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_lp[drop] = float("-inf")
        logprobs = torch.full_like(logprobs, float("-inf")).scatter(0, order, sorted_lp)
        logprobs = torch.log_softmax(logprobs, -1)
    token = int(torch.multinomial(logprobs.exp().cpu(), 1, generator=gen))
    return token, float(logprobs[token])


def _resolve(future: asyncio.Future, result: Generation | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
