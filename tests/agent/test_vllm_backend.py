"""The vLLM backend: its pure conversions on any machine, the engine itself where vLLM and a GPU exist.

The unit tests feed `generation_from_completion` plain dataclasses shaped like vLLM's
`CompletionOutput` and `Logprob` (vllm.outputs, vllm.logprobs), and run the backend's
event-loop plumbing over a stand-in `AsyncLLM`, so they need no vLLM.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from agent.backends import vllm as vllm_backend
from agent.backends.base import SamplingParams
from agent.backends.vllm import (
    VLLMBackend,
    VLLMGenerationError,
    generation_from_completion,
    new_request_id,
    to_vllm_sampling_kwargs,
)


@dataclass
class Logprob:  # stand-in for vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


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


def completion(token_ids, finish_reason, stop_reason=None):
    logprobs = [{t: Logprob(-0.1 * (i + 1), rank=1)} for i, t in enumerate(token_ids)]
    return CompletionOutput(token_ids, logprobs, finish_reason, stop_reason)


# --- sampling parameters ---


def test_sampling_kwargs_map_every_field():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, stop_token_ids=(2, 7), seed=5)
    kwargs = to_vllm_sampling_kwargs(params, can_detokenize=True)
    assert kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    assert kwargs["max_tokens"] == 64 and kwargs["seed"] == 5
    assert kwargs["stop_token_ids"] == [2, 7] and kwargs["ignore_eos"] is True  # only our stop tokens stop
    assert kwargs["logprobs"] == 0  # the sampled token's logprob, no other candidates
    assert kwargs["stop"] == [] and kwargs["detokenize"] is False  # nothing to match: ids only


def test_stop_strings_are_kept_and_need_a_tokenizer():
    params = SamplingParams(stop_strings=("</tool_call>",))
    kwargs = to_vllm_sampling_kwargs(params, can_detokenize=True)
    assert kwargs["stop"] == ["</tool_call>"] and kwargs["include_stop_str_in_output"] is True
    assert kwargs["detokenize"] is True and kwargs["skip_special_tokens"] is False
    with pytest.raises(ValueError, match="tokenizer"):
        to_vllm_sampling_kwargs(params, can_detokenize=False)


def test_unseeded_request_leaves_the_seed_to_the_engine():
    assert to_vllm_sampling_kwargs(SamplingParams(), can_detokenize=False)["seed"] is None


# --- completion outputs ---


def test_length_and_logprobs():
    gen = generation_from_completion(completion([11, 12, 13], "length"))
    assert gen.token_ids == [11, 12, 13] and gen.finish_reason == "length"
    assert gen.logprobs == pytest.approx([-0.1, -0.2, -0.3])


@pytest.mark.parametrize("stop_reason", [13, "</tool_call>"], ids=["stop token", "stop string"])
def test_stop_token_or_string_is_stop(stop_reason):
    gen = generation_from_completion(completion([11, 12, 13], "stop", stop_reason))
    assert gen.finish_reason == "stop" and gen.token_ids == [11, 12, 13]


def test_sampled_token_logprob_is_picked_among_candidates():
    out = CompletionOutput([5, 6], [{9: Logprob(-0.01), 5: Logprob(-2.0)}, {6: Logprob(-0.5)}], "length")
    assert generation_from_completion(out).logprobs == [-2.0, -0.5]


def test_logprobs_of_tokens_dropped_after_a_stop_string_are_ignored():
    out = completion([1, 2, 3], "stop", "x")
    out.logprobs.append({4: Logprob(-9.0)})  # a 4th token sampled in the same step, cut by the stop string
    assert generation_from_completion(out).logprobs == pytest.approx([-0.1, -0.2, -0.3])


@pytest.mark.parametrize("reason", ["abort", "error", "repetition", None])
def test_no_result_raises(reason):
    with pytest.raises(VLLMGenerationError, match=repr(reason)):
        generation_from_completion(completion([1, 2], reason))


def test_missing_logprobs_raise():
    with pytest.raises(VLLMGenerationError, match="fewer logprobs"):
        generation_from_completion(CompletionOutput([1, 2], None, "length"))
    with pytest.raises(VLLMGenerationError, match="fewer logprobs"):
        generation_from_completion(CompletionOutput([1, 2], [{1: Logprob(-1.0)}], "length"))
    with pytest.raises(VLLMGenerationError, match="sampled token 2"):
        generation_from_completion(CompletionOutput([1, 2], [{1: Logprob(-1.0)}, {3: Logprob(-1.0)}], "length"))


def test_request_ids_are_unique():
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(isinstance(i, str) for i in ids)


def test_constructor_says_how_to_install_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails, installed or not
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]' on a machine with an NVIDIA GPU"):
        VLLMBackend("any-model")


# --- the backend's plumbing, over a stand-in engine ---


class FakeAsyncLLM:
    """Stand-in for vllm.v1.engine.async_llm.AsyncLLM: answers prompt[-1]+1, +2, ... and records calls."""

    def __init__(self, args):
        self.args = args
        self.calls: list[str] = []
        self.loops: set = set()
        self.started = asyncio.Event()  # set once a request is in flight
        self.block = False  # hold requests until cancelled
        self.fail_on: str | None = None  # a recorded call that raises instead

    @classmethod
    def from_engine_args(cls, args):
        return cls(args)

    async def generate(self, prompt, sampling_params, request_id):
        self.loops.add(asyncio.get_running_loop())
        self.started.set()
        while self.block:
            await asyncio.sleep(0.01)
        n, last = sampling_params.max_tokens, prompt["prompt_token_ids"][-1]
        ids = [last + i + 1 for i in range(n)]
        logprobs = [{t: Logprob(-1.0)} for t in ids]
        yield SimpleNamespace(outputs=[CompletionOutput(ids, logprobs, "length")])

    def __getattr__(self, name):  # init_weight_transfer_engine, pause_generation, ...: record the call
        async def call(*args, **kwargs):
            self.calls.append(name)
            if name == self.fail_on:
                raise RuntimeError(f"{name} failed")

        return call

    def shutdown(self):
        self.calls.append("shutdown")


@pytest.fixture
def fake_vllm(monkeypatch):
    """Installs stand-in `vllm` modules holding just the names the backend imports."""
    names = {
        "vllm": {"SamplingParams": SimpleNamespace, "TokensPrompt": dict},
        "vllm.config": {"WeightTransferConfig": SimpleNamespace},
        "vllm.distributed.weight_transfer.base": {"WeightTransferInitRequest": SimpleNamespace,
                                                  "WeightTransferUpdateRequest": SimpleNamespace},
        "vllm.engine.arg_utils": {"AsyncEngineArgs": SimpleNamespace},
        "vllm.sampling_params": {"RequestOutputKind": SimpleNamespace(FINAL_ONLY="final")},
        "vllm.v1.engine.async_llm": {"AsyncLLM": FakeAsyncLLM},
    }
    for module_name, attributes in names.items():
        module = types.ModuleType(module_name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")  # restored after the test; the backend sets it


def test_engine_settings(fake_vllm):
    backend = VLLMBackend("m", tensor_parallel_size=2, max_model_len=4096, dtype="bfloat16", seed=3)
    args = backend._engine.args
    backend.close()
    assert (args.model, args.tensor_parallel_size, args.max_model_len, args.seed) == ("m", 2, 4096, 3)
    assert args.logprobs_mode == "processed_logprobs" and args.weight_transfer_config.backend == "ipc"
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"  # IPC handles hold torch classes


def test_requests_from_several_event_loops_run_on_the_engine_loop(fake_vllm):
    backend = VLLMBackend("m")
    try:
        first = asyncio.run(backend.generate([1, 2], SamplingParams(max_new_tokens=3)))
        second = asyncio.run(backend.generate([7], SamplingParams(max_new_tokens=2)))
        assert (first.token_ids, second.token_ids) == ([3, 4, 5], [8, 9])
        assert len(backend._engine.loops) == 1
    finally:
        backend.close()


@pytest.fixture
def no_ipc(monkeypatch):
    """CUDA IPC needs a GPU: hand the stand-in engine an empty update."""
    monkeypatch.setattr(vllm_backend, "_ipc_update_info", lambda state_dict, num_gpus: ({"names": []}, []))
    monkeypatch.setattr(vllm_backend, "_release_ipc", lambda keep_alive: None)


def test_weight_update_pauses_loads_and_resumes(fake_vllm, no_ipc):
    backend = VLLMBackend("m")
    engine = backend._engine
    backend.update_weights({})
    backend.close()
    assert backend.policy_version == 1
    assert engine.calls == ["init_weight_transfer_engine", "pause_generation", "start_weight_update",
                            "update_weights", "finish_weight_update", "resume_generation", "shutdown"]


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


def test_failed_weight_update_closes_the_backend(fake_vllm, no_ipc):
    backend = VLLMBackend("m")
    engine = backend._engine
    engine.fail_on = "update_weights"
    with pytest.raises(RuntimeError, match="update_weights failed"):
        backend.update_weights({})
    assert backend.policy_version == 0 and engine.calls[-1] == "shutdown"  # never resumed on mixed weights
    with pytest.raises(RuntimeError, match="closed"):
        backend.update_weights({})


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
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


PROMPT = [1, 2, 3, 4, 5]
TOL = 0.2  # vLLM's bf16 kernels against an fp32 reference of the same bf16 weights


def tiny_qwen3(seed: int):
    """A random 2-layer Qwen3 in bf16, its output layer scaled so that logits lie a few nats apart:
    temperature and weight changes then move logprobs far more than bf16 rounding does."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def reference(model, tokens: list[int], temperature: float) -> tuple[list[float], list[float]]:
    """Per generated token: its logprob at `temperature` and the largest logprob there, in fp32."""
    import torch

    fp32 = copy.deepcopy(model).float()
    with torch.no_grad():
        logits = fp32(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1 : -1]
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(), logprobs.max(dim=-1).values.tolist()


def mean_gap(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


@pytest.mark.gpu
@pytest.mark.skipif(not _have_vllm_and_gpu(), reason="needs vLLM and an NVIDIA GPU: pip install -e '.[vllm]'")
def test_engine_generates_and_loads_new_weights(tmp_path):
    old, new = tiny_qwen3(seed=0), tiny_qwen3(seed=1)
    old.save_pretrained(tmp_path)
    backend = VLLMBackend(str(tmp_path), gpu_memory_utilization=0.3, max_model_len=256, dtype="bfloat16",
                          skip_tokenizer_init=True)

    def generate(**kwargs):
        return asyncio.run(backend.generate(PROMPT, SamplingParams(**kwargs)))

    try:
        # Greedy: the argmax at each step, untempered logprobs, stopped by max_new_tokens.
        greedy = generate(temperature=0.0, max_new_tokens=16)
        assert len(greedy.token_ids) == len(greedy.logprobs) == 16 and greedy.finish_reason == "length"
        expected, best = reference(old, greedy.token_ids, 1.0)
        assert greedy.logprobs == pytest.approx(expected, abs=TOL)
        assert all(e >= b - TOL for e, b in zip(expected, best, strict=True))

        # A stop token ends generation at its first occurrence and is kept.
        stop = greedy.token_ids[5]
        stopped = generate(temperature=0.0, max_new_tokens=16, stop_token_ids=(stop,))
        assert stopped.finish_reason == "stop"
        assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop) + 1]

        # Sampling at temperature 2: the logprobs are the tempered distribution's, not the model's.
        hot = generate(temperature=2.0, max_new_tokens=16, seed=7)
        assert all(math.isfinite(x) and x <= 0 for x in hot.logprobs)
        assert hot.logprobs == pytest.approx(reference(old, hot.token_ids, 2.0)[0], abs=TOL)
        assert mean_gap(hot.logprobs, reference(old, hot.token_ids, 1.0)[0]) > 0.5

        # Concurrent requests are batched; a request's seed fixes its sample.
        async def together():
            seeds = (1, 2, 3, 1)
            return await asyncio.gather(*(backend.generate(PROMPT, SamplingParams(max_new_tokens=12, seed=s))
                                          for s in seeds))

        outs = asyncio.run(together())
        assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in outs)
        assert outs[0].token_ids == outs[3].token_ids

        # New weights held on the GPU, as a colocated trainer holds them, replace the old ones.
        backend.update_weights({name: t.cuda() for name, t in new.state_dict().items()})
        assert backend.policy_version == 1
        after = generate(temperature=0.0, max_new_tokens=16)
        assert after.logprobs == pytest.approx(reference(new, after.token_ids, 1.0)[0], abs=TOL)
        assert mean_gap(after.logprobs, reference(old, after.token_ids, 1.0)[0]) > 0.5

        # The old weights, from the CPU this time, bring the first output back.
        backend.update_weights(old.state_dict())
        assert backend.policy_version == 2
        assert generate(temperature=0.0, max_new_tokens=16).token_ids == greedy.token_ids
    finally:
        backend.close()
    backend.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="closed"):
        generate(max_new_tokens=4)
