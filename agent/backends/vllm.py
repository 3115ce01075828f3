"""vLLM generation backend: vLLM's `AsyncLLM` engine (continuous batching) behind `GenerationBackend`.

Tested with vLLM 0.24 (the release for torch 2.11); 0.27 to 0.33 work too. The installed
version is read once (`VLLMApi`); where the calls we make differ, the matching one is used.
What the backend relies on, and why:

- The engine runs on an event loop of its own, in a background thread. `AsyncLLM` binds its
  sockets and output task to the loop it first runs in, while our callers come from several
  loops (`asyncio.run` per rollout batch) and from synchronous code (`update_weights`, `close`).
- Logprobs are those of the sampling distribution (`logprobs_mode="processed_logprobs"`: after
  temperature and top-p), which is what `Generation.logprobs` promises. At temperature 0
  (greedy) vLLM reports the untempered model's logprobs.
- A request's `SamplingParams.seed` reaches vLLM only with `request_seeds=True`. vLLM draws a
  seeded request's noise with a kernel launch of its own at every step (a Python loop over the
  batch), which costs throughput (measured by `bench/vllm_generate.py`; numbers in the README);
  and its bf16 logits depend on the batch a request shares, so a seed does not make a sample
  reproducible anyway. By default the engine's own generator (seeded by `seed`) samples.
- Exactly `SamplingParams.stop_token_ids` end generation (`ignore_eos=True`). Stop tokens and
  stop strings stay in the output.
- New weights go in without ray and without pickle: the trainer packs them into buckets (flat
  byte buffers of `BUCKET_BYTES`, or one tensor's size if larger) on each engine GPU and sends
  each bucket's CUDA IPC handle to the engine's workers, whose `WeightReceiver` (a vLLM worker
  extension, `agent/backends/vllm_worker.py`) hands views of it to the model's own
  `load_weights`. Extra GPU memory during an update: one bucket per engine GPU. Generation is
  paused meanwhile (requests in flight finish first, new ones wait), the prefix cache is reset
  afterwards, and the workers report any parameter that no bucket reached: every token
  generated after `update_weights` returns comes from the new weights.
- Colocation with a trainer: `gpu_memory_utilization` is the share of each engine GPU vLLM
  takes (weights, KV cache, CUDA graphs); it must be free when the engine starts, which is
  checked first, with a message that names the setting. With `enable_sleep_mode`, `sleep()`
  releases the weights and the KV cache (vLLM's level 2) for the training phase, and the next
  `update_weights` wakes the engine, after checking the room is free again.
- Engine GPUs: the current CUDA device and the next `tensor_parallel_size - 1`. Under torchrun
  every rank starts its own engine on its own GPU: the engine process is started with
  CUDA_VISIBLE_DEVICES naming that GPU and without torchrun's variables (with them, its
  one-process torch.distributed group would look for torchrun's store).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
import warnings
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agent.backends.base import Generation, SamplingParams

INSTALL_HINT = "vLLM is not installed: pip install -e '.[vllm]' on a machine with an NVIDIA GPU"
BUCKET_BYTES = 512 << 20  # weights per IPC transfer; bounds the extra GPU memory of an update
CONTEXT_BYTES = 1 << 30  # GPU memory of a process's CUDA context, allowed for the engine process
TESTED = (0, 24)  # the version the GPU tests ran on
NEWEST = (0, 33)  # the newest version whose API this module was checked against
# torchrun's variables, read by torch.distributed in any process that inherits them
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")

_T = TypeVar("_T")


class VLLMGenerationError(RuntimeError):
    """A request ended without a result: aborted (cancelled, engine shut down) or an engine-side error."""


class VLLMMemoryError(RuntimeError):
    """The engine's share of a GPU is not free (the trainer holds it)."""


@dataclass(frozen=True)
class VLLMApi:
    """The calls that differ between the supported vLLM versions, picked once from the installed one."""

    version: tuple[int, int]
    names_weight_versions: bool  # 0.27+: `AsyncLLM.update_weight_version` labels outputs and metrics

    @classmethod
    def of(cls, version: str) -> VLLMApi:
        parts = version.split("+")[0].split(".")
        major_minor = (int(parts[0]), int(parts[1]))
        if major_minor < TESTED:
            raise ImportError(f"vLLM {version} is too old: this backend needs vLLM 0.24 or newer")
        if major_minor > NEWEST:
            warnings.warn(f"vLLM {version} is newer than the newest version this backend was checked against "
                          f"(0.{NEWEST[1]})", stacklevel=3)
        return cls(version=major_minor, names_weight_versions=major_minor >= (0, 27))


class _Logprob(Protocol):
    logprob: float


class FlatLogprobsLike(Protocol):
    """The fields of `vllm.logprobs.FlatLogprobs` this adapter reads: every position's candidates in one
    list per field, position i's in [start_indices[i], end_indices[i]), the sampled token's first."""

    start_indices: Sequence[int]
    end_indices: Sequence[int]
    token_ids: Sequence[int]
    logprobs: Sequence[float]

    def __len__(self) -> int: ...


class CompletionOutputLike(Protocol):
    """The fields of `vllm.outputs.CompletionOutput` this adapter reads."""

    token_ids: Sequence[int]
    # with flat_logprobs (what we ask for) a FlatLogprobs; otherwise one dict per generated token
    logprobs: FlatLogprobsLike | Sequence[Mapping[int, _Logprob]] | None
    finish_reason: str | None  # "stop", "length", "abort", "error", "repetition"; None while unfinished


def to_vllm_sampling_kwargs(params: SamplingParams, *, can_detokenize: bool, request_seeds: bool) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` that implement our `SamplingParams`.

    `can_detokenize` is False when the engine has no tokenizer; stop strings, which vLLM matches
    on decoded text, would then be ignored silently, so they are refused here instead.
    `request_seeds` False leaves sampling to the engine's generator (see the module's notes).
    """
    if params.stop_strings and not can_detokenize:
        raise ValueError("stop strings need the model's tokenizer, but this engine skips it (skip_tokenizer_init)")
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "seed": params.seed if request_seeds else None,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": True,  # only the caller's stop tokens end generation
        "stop": list(params.stop_strings),
        "include_stop_str_in_output": True,
        # Text is decoded only to find stop strings (we return ids), over every token, special ones included.
        "detokenize": bool(params.stop_strings),
        "skip_special_tokens": False,
        "logprobs": 0,  # no extra candidates: vLLM always returns the sampled token's own logprob
        # the logprobs in a few flat lists per request instead of a dict and an object per token: less for
        # the engine's output loop to allocate and for the garbage collector to walk while it generates
        "flat_logprobs": True,
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
        logprob = _sampled_logprob(output.logprobs, position, token_id)
        if logprob is None:
            raise VLLMGenerationError(f"vLLM returned no logprob for the sampled token {token_id} at {position}")
        logprobs.append(logprob)
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=reason)


def _sampled_logprob(logprobs: FlatLogprobsLike | Sequence[Mapping[int, _Logprob]], position: int,
                     token_id: int) -> float | None:
    """The logprob of `token_id` among the candidates at `position`, or None when it is not one of them."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: read the flat lists, build nothing
        for i in range(logprobs.start_indices[position], logprobs.end_indices[position]):
            if logprobs.token_ids[i] == token_id:
                return float(logprobs.logprobs[i])
        return None
    candidates = logprobs[position]
    return float(candidates[token_id].logprob) if token_id in candidates else None


def new_request_id() -> str:
    """A request id unique across backends and processes (vLLM rejects or mixes up duplicates)."""
    return f"fd-{uuid.uuid4().hex}"


def group_buckets(items: Iterable[tuple[str, Any]], limit: int) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive (name, tensor) pairs in groups that `pack` lays out in at most `limit` bytes; a
    larger tensor goes alone. Reads `items` lazily: one group (and one tensor) is held at a time."""
    from agent.backends.vllm_worker import bucket_bytes

    group: list[tuple[str, Any]] = []
    size = 0
    for name, tensor in items:
        if group and size + bucket_bytes(tensor) > limit:
            yield group
            group, size = [], 0
        group.append((name, tensor))
        size += bucket_bytes(tensor)
    if group:
        yield group


def current_gpu() -> int:
    import torch

    return torch.cuda.current_device()


def gpu_memory(gpu: int) -> tuple[int, int]:
    """(free, total) bytes of a GPU, counting every process's use."""
    import torch

    return torch.cuda.mem_get_info(gpu)


def release_cached_memory() -> None:
    import torch

    torch.cuda.empty_cache()


def check_free_memory(free: int, total: int, utilization: float, gpu: int) -> None:
    """vLLM takes `utilization * total` bytes of a GPU and refuses to start unless that much is free
    once its engine process has made its CUDA context (`CONTEXT_BYTES`, counted here beforehand)."""
    if utilization * total + CONTEXT_BYTES > free:
        gib = 1 << 30
        raise VLLMMemoryError(
            f"vLLM's gpu_memory_utilization={utilization:.2f} asks for {utilization * total / gib:.1f} GiB of "
            f"GPU {gpu} ({total / gib:.1f} GiB), but only {free / gib:.1f} GiB are free (the trainer's model copies "
            f"hold the rest): lower it to at most {max((free - CONTEXT_BYTES) / total - 0.01, 0):.2f} "
            "(trainer config: vllm_gpu_memory_utilization), or free memory on that GPU")


class VLLMBackend:
    """`GenerationBackend` over a vLLM `AsyncLLM` engine on the current CUDA device (and the next ones for TP)."""

    policy_version: int
    generated_tokens: int

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        enable_sleep_mode: bool = False,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        skip_tokenizer_init: bool = False,
        request_seeds: bool = False,
    ) -> None:
        """Start the engine (a minute or more: weights, compilation, CUDA graphs).

        model: a Hugging Face model directory or hub name. gpu_memory_utilization: the share of
        each engine GPU vLLM may take (weights + KV cache + CUDA graphs); it must be free now.
        enable_sleep_mode: allow `sleep()`. enforce_eager: no CUDA graphs or compilation, so the
        engine starts in seconds rather than a minute and generates slower. max_model_len: prompt +
        generated tokens; None takes the model config's. skip_tokenizer_init: for model directories
        without a tokenizer; stop strings are then refused. request_seeds: pass each request's
        seed to vLLM (slower; see the module's notes); otherwise `seed` seeds the engine's sampling.
        """
        try:
            import vllm
            from vllm import SamplingParams as VLLMSamplingParams
            from vllm import TokensPrompt
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as error:
            raise ImportError(INSTALL_HINT) from error

        self.api = VLLMApi.of(vllm.__version__)
        self._vllm_sampling_params = VLLMSamplingParams
        self._tokens_prompt = TokensPrompt
        self._final_only = RequestOutputKind.FINAL_ONLY  # one output per request, not a stream
        self._can_detokenize = not skip_tokenizer_init
        self._request_seeds = request_seeds
        self._sleep_mode = enable_sleep_mode
        self._asleep_free: dict[int, int] | None = None  # while asleep: the bytes each GPU must have to wake
        self.policy_version = 0
        self.generated_tokens = 0  # all requests' sampled tokens so far, counted per engine step

        first = current_gpu()
        self._gpus = list(range(first, first + tensor_parallel_size))
        for gpu in self._gpus:
            check_free_memory(*gpu_memory(gpu), gpu_memory_utilization, gpu)
        args = AsyncEngineArgs(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            skip_tokenizer_init=skip_tokenizer_init,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="agent.backends.vllm_worker.WeightReceiver",
        )
        counter = self._token_counter()

        async def start() -> Any:
            return AsyncLLM.from_engine_args(args, stat_loggers=[counter])

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-backend-loop", daemon=True)
        self._thread.start()
        self._tasks: set[asyncio.Task[Any]] = set()  # in-flight requests, cancelled by close()
        self._engine: Any = None
        try:
            with _engine_process_environment(self._gpus):
                self._engine = self._run(start())
        except BaseException:
            self._stop_loop()
            raise

    def _token_counter(self) -> type:
        """A vLLM stat logger (one per engine) that adds each engine step's sampled tokens to `generated_tokens`."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        backend = self

        class TokenCounter(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if iteration_stats is not None:
                    backend.generated_tokens += iteration_stats.num_generation_tokens

            def log_engine_initialized(self) -> None:
                pass

        return TokenCounter

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        """Sample one continuation of `prompt_ids`; concurrent calls are batched by the engine."""
        self._check_open()
        if self._asleep_free is not None:
            raise RuntimeError("the engine is asleep (its weights are released): update_weights wakes it")
        kwargs = to_vllm_sampling_kwargs(params, can_detokenize=self._can_detokenize,
                                         request_seeds=self._request_seeds)
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

    def sleep(self) -> None:
        """Release the engine's weights and KV cache (after requests in flight finish) until `update_weights`."""
        self._check_open()
        if not self._sleep_mode:
            raise RuntimeError("sleep() needs the engine started with enable_sleep_mode=True")
        if self._asleep_free is not None:
            return
        before = {gpu: gpu_memory(gpu)[0] for gpu in self._gpus}
        self._run(self._engine.sleep(level=2, mode="wait"))
        self._asleep_free = {gpu: gpu_memory(gpu)[0] - free for gpu, free in before.items()}

    def update_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Load `state_dict` (Hugging Face names, any dtype, any device) in place; blocks until loaded.

        Reads `state_dict` once, in order (a lazy mapping that gathers each tensor on access is
        fine). Requests in flight finish on the old weights first; requests made meanwhile wait.
        A sleeping engine is woken. A failed update may leave a mix of old and new weights, so it
        closes the backend before re-raising.
        """
        self._check_open()
        engine = self._engine
        asleep = self._asleep_free is not None
        if asleep:
            self._check_room_to_wake()  # before anything changes: the engine stays usable after this error
        try:
            if asleep:
                self._run(engine.wake_up(tags=["weights"]))
            else:
                self._run(engine.pause_generation(mode="wait", clear_cache=True))
            self._run(engine.collective_rpc("fd_begin_update"))
            for group in group_buckets(state_dict.items(), BUCKET_BYTES):
                self._load_bucket(group)
            missing = sorted({name for names in self._run(engine.collective_rpc("fd_finish_update"))
                              for name in names})
            if missing:
                raise ValueError(f"the update left {len(missing)} of the engine's parameters stale "
                                 f"(no tensor of these names was sent): {missing[:5]}")
            if asleep:
                self._run(engine.wake_up(tags=["kv_cache"]))  # fully awake: vLLM resumes scheduling
                self._asleep_free = None
            elif not self._run(engine.reset_prefix_cache()):
                raise RuntimeError("vLLM could not reset its prefix cache after the weight update")
            else:
                self._run(engine.resume_generation())
            if self.api.names_weight_versions:
                self._run(engine.update_weight_version(str(version)))
        except BaseException:
            self.close()
            raise
        self.policy_version = version

    def _load_bucket(self, group: list[tuple[str, Any]]) -> None:
        buffers, handles, entries = self._share(group)
        counts = self._run(self._engine.collective_rpc("fd_load_bucket", args=(handles, entries)))
        del buffers  # the workers have let go of them: one bucket per engine GPU exists at a time
        if counts != [len(entries)] * len(counts):
            raise RuntimeError(f"the engine's workers loaded {counts} tensors of a bucket of {len(entries)}")

    def _share(self, group: list[tuple[str, Any]]) -> tuple[list[Any], dict[str, list[Any]], list[Any]]:
        """The bucket packed on each engine GPU: (buffers, IPC handle per GPU UUID, entries). The
        caller keeps the buffers alive until the workers have loaded them: a handle does not own memory."""
        import torch

        from agent.backends.vllm_worker import gpu_uuid, ipc_handle, pack

        buffer, entries = pack(group, torch.device("cuda", self._gpus[0]))
        buffers = [buffer] + [buffer.to(torch.device("cuda", gpu)) for gpu in self._gpus[1:]]
        for gpu in self._gpus:
            torch.cuda.synchronize(gpu)  # another process reads the buffers next
        torch.cuda.ipc_collect()  # free earlier buckets, which only the workers' mappings kept alive
        return buffers, {gpu_uuid(gpu): ipc_handle(b) for gpu, b in zip(self._gpus, buffers, strict=True)}, entries

    def _check_room_to_wake(self) -> None:
        assert self._asleep_free is not None
        release_cached_memory()  # the trainer's cached but unused blocks go back to the GPU
        for gpu, needed in self._asleep_free.items():
            free = gpu_memory(gpu)[0]
            if free < needed:
                gib = 1 << 30
                raise VLLMMemoryError(
                    f"waking vLLM needs the {needed / gib:.1f} GiB it released on GPU {gpu}, but only "
                    f"{free / gib:.1f} GiB are free: the trainer holds more than when the engine started "
                    "(optimizer state, activations); lower vllm_gpu_memory_utilization or micro_batch_tokens")

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


@contextmanager
def _engine_process_environment(gpus: list[int]) -> Iterator[None]:
    """The environment vLLM's engine process inherits: our GPUs only, no torchrun variables."""
    saved = dict(os.environ)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",") if visible else [str(index) for index in range(max(gpus) + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical[gpu] for gpu in gpus)
    for name in list(os.environ):
        if name in TORCHRUN_VARIABLES or name.startswith("TORCHELASTIC_"):
            del os.environ[name]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
