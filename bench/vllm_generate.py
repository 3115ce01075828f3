"""Generation throughput of `VLLMBackend` against vLLM's own `AsyncLLM.generate` (goal: >= 90%).

    python bench/vllm_generate.py [--requests 64] [--prompt-tokens 256] [--new-tokens 512] [--rounds 3]
        [--tensor-parallel 1] [--hf-new-tokens 64]

A random model of Qwen3-1.7B's shape (bf16, tied embeddings) is written to a temporary
directory and one engine is started the way the trainer starts it (sleep mode on). The same
requests (random prompts, exactly `--new-tokens` new tokens each, all at once) then run
round after round through
  raw: `AsyncLLM.generate` on that engine with vLLM's leanest settings (final output only,
       no detokenization, no logprobs, no seeds);
  raw+logprobs, raw+seeds: the same with the sampled token's logprob (vLLM's default format: a
       dict and an object per token), or a seed per request;
  raw+flat: with the sampled token's logprob in vLLM's flat format (`flat_logprobs=True`);
  ours: `VLLMBackend.generate` from another event loop, with our sampling parameters (the
       sampled token's logprob, flat; each request's seed left to the engine, the default);
  ours+seeds: the same with `request_seeds=True`.
Then: one weight update of the whole model (bucketed CUDA IPC), a sleep and a wake-up with
new weights, and, with `--hf-new-tokens N`, the transformers backend on the same prompts
with N new tokens each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agent.backends.base import SamplingParams  # noqa: E402
from agent.backends.vllm import VLLMBackend, new_request_id  # noqa: E402


def qwen3_1_7b_shape(path: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


async def raw(backend: VLLMBackend, prompts: list[list[int]], new_tokens: int, *, logprobs: bool = False,
              flat: bool = False, seeds: bool = False) -> int:
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    async def one(index: int, prompt: list[int]) -> int:
        params = VLLMSamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False,
                                    output_kind=RequestOutputKind.FINAL_ONLY, logprobs=0 if logprobs else None,
                                    flat_logprobs=flat, seed=index if seeds else None)
        outputs = [o async for o in backend._engine.generate(TokensPrompt(prompt_token_ids=prompt), params,
                                                             new_request_id())]
        return len(outputs[-1].outputs[0].token_ids)

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def ours(backend, prompts: list[list[int]], new_tokens: int) -> int:
    async def one(index: int, prompt: list[int]) -> int:
        return len((await backend.generate(prompt, SamplingParams(max_new_tokens=new_tokens, seed=index))).token_ids)

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def ours_seeded(backend: VLLMBackend, prompts: list[list[int]], new_tokens: int) -> int:
    backend._request_seeds = True  # as if started with request_seeds=True (a second engine would take a minute)
    try:
        return asyncio.run(ours(backend, prompts, new_tokens))
    finally:
        backend._request_seeds = False


def timed(run) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--hf-new-tokens", type=int, default=0, help="0: skip the transformers backend")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tensor-parallel", type=int, default=1, help="GPUs of the engine")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="qwen3-1.7b-shape-"))
    qwen3_1_7b_shape(folder)
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 151936, (args.requests, args.prompt_tokens), generator=generator).tolist()
    start = time.perf_counter()
    backend = VLLMBackend(str(folder), tensor_parallel_size=args.tensor_parallel, gpu_memory_utilization=0.8,
                          enable_sleep_mode=True, dtype="bfloat16", max_model_len=args.prompt_tokens + args.new_tokens,
                          skip_tokenizer_init=True)
    print(f"engine start {time.perf_counter() - start:.1f} s", flush=True)
    asyncio.run(ours(backend, prompts[:8], 16))  # warm-up
    n = args.new_tokens
    variants = {
        "raw": lambda: backend._run(raw(backend, prompts, n)),
        "raw+logprobs": lambda: backend._run(raw(backend, prompts, n, logprobs=True)),
        "raw+flat": lambda: backend._run(raw(backend, prompts, n, logprobs=True, flat=True)),
        "raw+seeds": lambda: backend._run(raw(backend, prompts, n, seeds=True)),
        "ours": lambda: asyncio.run(ours(backend, prompts, n)),
        "ours+seeds": lambda: ours_seeded(backend, prompts, n),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            tokens, seconds = timed(run)
            rates[name].append(tokens / seconds)
        print("  ".join(f"{name} {rate[-1]:.0f}" for name, rate in rates.items()) + " tok/s", flush=True)

    from safetensors.torch import load_file

    weights = {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file, "cuda").items()}
    _, update_s = timed(lambda: backend.update_weights(weights, version=1))
    _, sleep_s = timed(backend.sleep)
    _, wake_s = timed(lambda: backend.update_weights(weights, version=2))
    tokens, seconds = timed(lambda: asyncio.run(ours(backend, prompts, args.new_tokens)))
    backend.close()
    print(f"weight update {update_s:.2f} s, sleep {sleep_s:.2f} s, wake-up with new weights {wake_s:.2f} s; "
          f"after it {tokens / seconds:.0f} tok/s")
    best = {name: max(rate) for name, rate in rates.items()}
    median = {name: statistics.median(rate) for name, rate in rates.items()}
    for name in variants:
        print(f"{name:>13}: best {best[name]:6.0f} tok/s, median {median[name]:6.0f}; / raw: best "
              f"{best[name] / best['raw']:.3f}, median {median[name] / median['raw']:.3f}")
    print(f"VLLMBackend / vLLM = {best['ours'] / best['raw']:.3f} (best of {args.rounds}; median "
          f"{median['ours'] / median['raw']:.3f}; {args.requests} requests x {args.new_tokens} new tokens from "
          f"{args.prompt_tokens}-token prompts)")
    if args.hf_new_tokens:
        from agent.backends.hf import TransformersBackend
        from agent.models import load_model

        del weights
        model = load_model(str(folder), dtype="bfloat16", device="cuda")
        hf = TransformersBackend(model)
        asyncio.run(ours(hf, prompts[:2], 4))  # warm-up
        tokens, seconds = timed(lambda: asyncio.run(ours(hf, prompts, args.hf_new_tokens)))
        hf.close()
        print(f"transformers backend: {tokens / seconds:.0f} tok/s ({args.requests} requests x {args.hf_new_tokens} "
              f"new tokens); VLLMBackend / transformers = {best['ours'] / (tokens / seconds):.0f}x")


if __name__ == "__main__":
    main()
