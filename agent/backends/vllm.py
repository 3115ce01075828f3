"""vLLM generation backend: the V1 `AsyncLLM` engine (continuous batching) behind `GenerationBackend`.

Written against vLLM 0.33. What it relies on, and why:

- The engine runs on an event loop of its own, in a background thread. `AsyncLLM` binds its
  sockets and output task to the loop it first runs in, while our callers come from several
  loops (`asyncio.run` per rollout batch) and from synchronous code (`update_weights`, `close`).
  `generate` hands each request to that loop and awaits the result from the caller's loop.
- Logprobs are those of the sampling distribution (`logprobs_mode="processed_logprobs"`: after
  temperature and top-p), which is what `Generation.logprobs` promises. vLLM's default,
  `raw_logprobs`, would give the untempered model's. At temperature 0 (greedy) vLLM reports the
  untempered model's logprobs.
- Exactly `SamplingParams.stop_token_ids` end generation (`ignore_eos=True`): the model's EOS is
  not added behind the caller's back. Stop tokens and stop strings stay in the output.
- New weights go in through vLLM's weight-transfer API with its CUDA IPC backend: the engine
  reads the trainer's tensors in place on the same GPU(s), inside a `pause_generation("keep")`
  window that also drops the KV and prefix caches, so every token sampled afterwards comes from
  the new weights. The IPC handles hold torch classes and dtypes, which vLLM's msgpack channel
  to its engine process carries only with `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (pickle); the
  constructor sets it, as vLLM's own IPC example does. That channel is a local socket between
  this process and the engine processes it starts.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from agent.backends.base import Generation, SamplingParams

INSTALL_HINT = "vLLM is not installed: pip install -e '.[vllm]' on a machine with an NVIDIA GPU"

_T = TypeVar("_T")


class VLLMGenerationError(RuntimeError):
    """A request ended without a result: aborted (cancelled, engine shut down) or an engine-side error."""


class _Logprob(Protocol):
    logprob: float


class CompletionOutputLike(Protocol):
    """The fields of `vllm.outputs.CompletionOutput` this adapter reads."""

    token_ids: Sequence[int]
    logprobs: Sequence[Mapping[int, _Logprob]] | None  # one dict per generated token, sampled token included
    finish_reason: str | None  # "stop", "length", "abort", "error", "repetition"; None while unfinished


def to_vllm_sampling_kwargs(params: SamplingParams, *, can_detokenize: bool) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` that implement our `SamplingParams`.

    `can_detokenize` is False when the engine has no tokenizer; stop strings, which vLLM matches
    on decoded text, would then be ignored silently, so they are refused here instead.
    """
    if params.stop_strings and not can_detokenize:
        raise ValueError("stop strings need the model's tokenizer, but this engine skips it (skip_tokenizer_init)")
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "seed": params.seed,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": True,  # only the caller's stop tokens end generation
        "stop": list(params.stop_strings),
        "include_stop_str_in_output": True,
        # Text is decoded only to find stop strings (we return ids), over every token, special ones included.
        "detokenize": bool(params.stop_strings),
        "skip_special_tokens": False,
        "logprobs": 0,  # no extra candidates: vLLM always returns the sampled token's own logprob
    }


def generation_from_completion(output: CompletionOutputLike) -> Generation:
    """Our `Generation` from a finished vLLM completion: ids, the sampled tokens' logprobs, finish reason.

    vLLM reports a stop token or a stop string as "stop" and max_tokens (or max_model_len) as
    "length"; anything else means there is no result, and is raised rather than returned.
    """
    reason = output.finish_reason
    if reason not in ("stop", "length"):
        raise VLLMGenerationError(
            f"vLLM finished the request with reason {reason!r}, not 'stop' or 'length' "
            "('abort': cancelled or the engine shut down; 'error': an engine-side failure)"
        )
    token_ids = [int(token_id) for token_id in output.token_ids]
    # A stop string can drop tokens sampled after it in the same step; their logprobs stay, so take a prefix.
    if output.logprobs is None or len(output.logprobs) < len(token_ids):
        raise VLLMGenerationError("vLLM returned fewer logprobs than tokens: was the request made with logprobs=0?")
    logprobs = []
    for position, token_id in enumerate(token_ids):
        candidates = output.logprobs[position]
        if token_id not in candidates:
            raise VLLMGenerationError(f"vLLM returned no logprob for the sampled token {token_id} at {position}")
        logprobs.append(float(candidates[token_id].logprob))
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=reason)


def new_request_id() -> str:
    """A request id unique across backends and processes (vLLM rejects or mixes up duplicates)."""
    return f"fd-{uuid.uuid4().hex}"


class VLLMBackend:
    """`GenerationBackend` over a vLLM `AsyncLLM` engine on the GPUs cuda:0 .. tensor_parallel_size-1."""

    policy_version: int

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        skip_tokenizer_init: bool = False,
    ) -> None:
        """Start the engine (a minute or more: weights, compilation, CUDA graphs).

        model: a Hugging Face model directory or hub name. gpu_memory_utilization: the share of
        each GPU's memory vLLM may take (weights + KV cache); leave room for a colocated trainer.
        max_model_len: prompt + generated tokens; None takes the model config's. skip_tokenizer_init:
        for model directories without a tokenizer; stop strings are then refused.
        """
        try:
            from vllm import SamplingParams as VLLMSamplingParams
            from vllm import TokensPrompt
            from vllm.config import WeightTransferConfig
            from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as error:
            raise ImportError(INSTALL_HINT) from error

        self._vllm_sampling_params = VLLMSamplingParams
        self._tokens_prompt = TokensPrompt
        self._update_request = WeightTransferUpdateRequest
        self._final_only = RequestOutputKind.FINAL_ONLY  # one output per request, not a stream
        self._can_detokenize = not skip_tokenizer_init
        self._num_gpus = tensor_parallel_size
        self.policy_version = 0

        # Read by vLLM's processes when they start, so it must be set before the engine is.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        args = AsyncEngineArgs(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            skip_tokenizer_init=skip_tokenizer_init,
            logprobs_mode="processed_logprobs",
            weight_transfer_config=WeightTransferConfig(backend="ipc"),
        )

        async def start() -> Any:
            engine = AsyncLLM.from_engine_args(args)
            await engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info={}))
            return engine

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-backend-loop", daemon=True)
        self._thread.start()
        self._tasks: set[asyncio.Task[Any]] = set()  # in-flight requests, cancelled by close()
        self._engine: Any = None
        try:
            self._engine = self._run(start())
        except BaseException:
            self._stop_loop()
            raise

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        """Sample one continuation of `prompt_ids`; concurrent calls are batched by the engine."""
        self._check_open()
        kwargs = to_vllm_sampling_kwargs(params, can_detokenize=self._can_detokenize)
        sampling_params = self._vllm_sampling_params(**kwargs, output_kind=self._final_only)
        prompt = self._tokens_prompt(prompt_token_ids=list(prompt_ids))
        future = asyncio.run_coroutine_threadsafe(self._generate(prompt, sampling_params), self._loop)
        try:
            # Cancelling the caller's task cancels the request on the engine's loop, which aborts it in vLLM.
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._engine is None and task is not None and not task.cancelling():
                raise VLLMGenerationError("the backend was closed while this request was in flight") from None
            raise

    async def _generate(self, prompt: Any, sampling_params: Any) -> Generation:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            # FINAL_ONLY: the stream holds one output, the finished request.
            outputs = [out async for out in self._engine.generate(prompt, sampling_params, new_request_id())]
            if not outputs:
                raise VLLMGenerationError("vLLM returned no output for the request")
            return generation_from_completion(outputs[-1].outputs[0])
        finally:
            self._tasks.discard(task)

    def update_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Load `state_dict` (Hugging Face names, any dtype, on any device) in place; blocks until loaded.

        Tensors already on the engine's GPU are read where they are (CUDA IPC); others are copied
        to each engine GPU first, so that copy of the weights exists for the duration of the call.
        Requests in flight are frozen meanwhile and continue with the new weights (vLLM marks
        their tokens' weight versions in `CompletionOutput.weight_versions`). A failed update may
        leave a mix of old and new weights, so it closes the backend before re-raising.
        """
        self._check_open()
        update_info, keep_alive = _ipc_update_info(state_dict, self._num_gpus)
        version = self.policy_version + 1
        try:
            self._run(self._load_weights(update_info, str(version)))
        except BaseException:
            self.close()
            raise
        finally:
            _release_ipc(keep_alive)
        self.policy_version = version

    async def _load_weights(self, update_info: dict[str, Any], version: str) -> None:
        engine = self._engine
        await engine.pause_generation(mode="keep", clear_cache=True)
        await engine.start_weight_update()
        await engine.update_weights(self._update_request(update_info=update_info))
        await engine.finish_weight_update(weight_version=version)
        await engine.resume_generation()

    def close(self) -> None:
        """Cancel requests in flight, shut the engine down and stop its loop; safe to call twice."""
        if self._engine is None:
            return
        engine, self._engine = self._engine, None

        async def shutdown() -> None:
            in_flight = list(self._tasks)
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            engine.shutdown()
            await asyncio.sleep(0)  # let the engine's own tasks take their cancellation before the loop stops

        try:
            self._run(shutdown())
        finally:
            self._stop_loop()

    def _check_open(self) -> None:
        if self._engine is None:
            raise RuntimeError("this VLLMBackend is closed")

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the engine's loop and wait for it (never call from that loop)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _ipc_update_info(state_dict: Mapping[str, Any], num_gpus: int) -> tuple[dict[str, Any], list[Any]]:
    """The `update_info` of vLLM's IPC weight transfer, and the tensors it points into.

    Each engine worker looks up its own GPU (by UUID) in every handle, so each tensor needs a
    copy on each of cuda:0 .. num_gpus-1 (none is made where it already lies). The returned
    tensors must stay alive until the engine has loaded them: the handles do not own the memory.
    """
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    uuids = [str(torch.cuda.get_device_properties(index).uuid) for index in range(num_gpus)]
    names: list[str] = []
    dtype_names: list[str] = []
    shapes: list[list[int]] = []
    ipc_handles: list[dict[str, tuple[Any, ...]]] = []
    keep_alive: list[Any] = []
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        handles = {}
        for index, gpu_uuid in enumerate(uuids):
            on_gpu = tensor.to(torch.device("cuda", index)).contiguous()
            keep_alive.append(on_gpu)
            handles[gpu_uuid] = reduce_tensor(on_gpu)[1]
        names.append(name)
        dtype_names.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
        ipc_handles.append(handles)
    for index in range(num_gpus):
        torch.cuda.synchronize(index)  # the copies are asynchronous; another process reads them next
    update_info = {"names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles": ipc_handles}
    return update_info, keep_alive


def _release_ipc(keep_alive: list[Any]) -> None:
    """Drop our references once the engine has dropped its views, and free what only IPC kept alive."""
    import torch

    keep_alive.clear()
    torch.cuda.ipc_collect()
