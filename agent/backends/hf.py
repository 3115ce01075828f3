"""Transformers generation backend: CPU or one GPU; concurrent requests are batched.

Requests wait in a queue; a worker thread takes every waiting request (up to
`max_batch_size`), left-pads them into one batch and decodes with a KV cache until each
row has met its stop condition, sampling each row with its own temperature, top-p and
seed. Logprobs are those of the distribution actually sampled from (after temperature
and top-p). Requests that arrive during a batch go into the next one (static batching;
continuous batching is the vLLM backend's job).

Everything per step stays on the model's device: only the last position's logits are
computed, the whole batch is sampled at once (`_Sampler`, one generator per request), and
the host reads the new tokens of all rows in one transfer to check stop conditions.
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
    def __init__(self, model: Any, tokenizer: Any = None, *, max_batch_size: int | None = None,
                 seed: int = 0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer  # only for stop strings
        self.device = next(model.parameters()).device
        # A decoding step costs about the same for 1 row as for 64 on a GPU (launch-bound), and a batch
        # runs until its longest row ends: one step's episodes in one batch, not several in a row.
        self.max_batch_size = max_batch_size or (16 if self.device.type == "cpu" else 64)
        self.policy_version = 0
        self.generated_tokens = 0  # sampled tokens so far, over all requests (read by progress bars)
        self._pending: list[_Request] = []
        self._cv = threading.Condition()  # guards the queue; held only briefly, also by the event loop
        self._weights = threading.Lock()  # held while a batch runs
        self._closed = False
        self._rng = torch.Generator().manual_seed(seed)  # seeds for requests without one
        # On a GPU the host reads the sampled tokens every 8 steps, so later steps queue up behind the
        # running one; on the CPU nothing runs ahead, and a finished batch stops at once.
        self._check_every = 1 if self.device.type == "cpu" else 8
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
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        sampler = _Sampler([r.params for r in batch], [self._generator(r.params.seed) for r in batch], self.device)
        max_new = max(r.params.max_new_tokens for r in batch)
        tokens = torch.zeros((n, max_new), dtype=torch.long, device=self.device)
        logprobs = torch.zeros((n, max_new), dtype=torch.float32, device=self.device)
        out_ids: list[list[int]] = [[] for _ in batch]
        out_lp: list[list[float]] = [[] for _ in batch]
        finish: list[str | None] = [None] * n
        cache, step_ids, step_pos, seen = None, ids, positions, 0
        for step in range(max_new):
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
            cache = out[self._cache_kw]
            tokens[:, step], logprobs[:, step] = sampler(out.logits[:, -1, :])
            if (step + 1) % self._check_every == 0 or step + 1 == max_new:
                # The one host round trip: the new tokens of every row. Rows go on past their end until
                # here; what they sample then is dropped and changes no other row.
                for i, (row_ids, row_lp) in enumerate(zip(tokens[:, seen: step + 1].tolist(),
                                                          logprobs[:, seen: step + 1].tolist(), strict=True)):
                    for token, lp in zip(row_ids, row_lp, strict=True):
                        if finish[i] is None:
                            self.generated_tokens += 1
                            out_ids[i].append(token)
                            out_lp[i].append(lp)
                            finish[i] = self._finished(batch[i].params, out_ids[i])
                seen = step + 1
                if all(f is not None for f in finish):
                    break
            step_ids = tokens[:, step: step + 1]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], dim=1)
        return [Generation(out_ids[i], out_lp[i], finish[i] or "length") for i in range(n)]

    def _generator(self, seed: int | None) -> torch.Generator:
        """A request's own generator, on the model's device: its tokens depend on its seed alone."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        return torch.Generator(device=self.device).manual_seed(seed)

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


class _Sampler:
    """One token per row from softmax(logits / T) restricted to the top-p nucleus, for the whole batch on
    the device, with each row's log-probability under that distribution; greedy rows (T <= 0) take the
    argmax with log-probability 0.

    A row samples by the exponential race: argmax(p / E) with E ~ Exp(1) drawn over the vocabulary from
    the row's own generator, which is how `torch.multinomial` draws one sample; so on the CPU the tokens
    are those of `torch.multinomial(p, 1, generator)` for the same seed, and on a GPU they follow the
    seed through the GPU's generator.
    """

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator], device: torch.device):
        self.greedy = torch.tensor([p.temperature <= 0 for p in params], device=device)
        self.temperature = torch.tensor([[p.temperature if p.temperature > 0 else 1.0] for p in params],
                                        device=device)
        self.top_p = torch.tensor([[p.top_p] for p in params], device=device)
        self.nucleus = torch.tensor([[p.top_p < 1.0] for p in params], device=device)
        self.any_nucleus = any(p.top_p < 1.0 and p.temperature > 0 for p in params)
        self.draws = [(i, g) for i, (p, g) in enumerate(zip(params, generators, strict=True)) if p.temperature > 0]

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, V] logits -> tokens [n] and their log-probabilities [n], on the device."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits / self.temperature, -1)
        if self.any_nucleus:
            sorted_lp, order = torch.sort(logprobs, descending=True)
            p = sorted_lp.exp()
            drop = p.cumsum(-1) - p >= self.top_p  # keep the smallest prefix reaching top_p
            kept = torch.full_like(logprobs, float("-inf"))
            kept.scatter_(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
            logprobs = torch.where(self.nucleus, torch.log_softmax(kept, -1), logprobs)
        race = torch.ones_like(logprobs)
        for i, generator in self.draws:
            race[i].exponential_(1, generator=generator)
        tokens = torch.where(self.greedy, logits.argmax(-1), (logprobs.exp() / race).argmax(-1))
        return tokens, logprobs.gather(-1, tokens[:, None])[:, 0].masked_fill(self.greedy, 0.0)


def _resolve(future: asyncio.Future, result: Generation | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
