"""Generation throughput of the transformers backend: concurrent requests on a random-init Qwen3 shape.

    python bench/generate.py --shape 1.7b [--requests 64] [--prompt 256] [--new 64]
    python bench/generate.py --shape tiny                        # runs on a CPU

`--requests` requests of `--prompt` random tokens go to `TransformersBackend.generate` at
once (one batch: `max_batch_size` = requests), each sampling exactly `--new` tokens
(temperature 1, its own seed, no stop token). Prints generated tokens per second of wall
time, the median of `--repeats` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import SHAPES, build  # noqa: E402

from agent.backends.base import SamplingParams  # noqa: E402
from agent.backends.hf import TransformersBackend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build(args.shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32, seed=0).eval()
    model.config.use_cache = True
    backend = TransformersBackend(model, max_batch_size=args.requests)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (args.prompt,), generator=g).tolist()
               for _ in range(args.requests)]

    async def all_at_once(run: int) -> int:
        params = [SamplingParams(temperature=1.0, max_new_tokens=args.new, seed=run * args.requests + i)
                  for i in range(args.requests)]
        gens = await asyncio.gather(*(backend.generate(p, q) for p, q in zip(prompts, params, strict=True)))
        return sum(len(x.token_ids) for x in gens)

    rates = []
    try:
        for run in range(args.repeats + 1):
            start = time.perf_counter()
            tokens = asyncio.run(all_at_once(run))
            if run:  # the first run warms up
                rates.append(tokens / (time.perf_counter() - start))
    finally:
        backend.close()
    print(f"generate {args.shape} {device}: {args.requests} requests x {args.prompt}-token prompts, "
          f"{args.new} new tokens each: {statistics.median(rates):,.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
