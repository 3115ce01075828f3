"""pass@k of a model on a problem set, with the unbiased estimator 1 - C(n-c, k) / C(n, k).

    python -m trainer.evaluate --model DIR --problems P.jsonl --n 32 --k 1,8,32 [--prover rocq|lean]

Runs n episodes per problem through the agent loop (the same tools and budgets as
training) and prints one JSON line with pass@k for each k and the response lengths, then
`pass@k: ...`. `--prompt-feedback TEXT` puts a constant feedback in the model's own prompt,
framed as the FD teacher reads it: how the model behaves *with* that feedback, the target
that constant-feedback FD should make the model reach without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.episode import EpisodeWriter
from agent.rollout import (
    ProverUnavailableError,
    Rollout,
    RolloutConfig,
    load_problem_set,
    make_backend,
    make_rollout,
    resolve_prover,
)
from trainer.passk import pass_at_k_table


async def evaluate(rollout: Rollout, problems: Sequence[Any], *, n: int, ks: Sequence[int],
                   writer: EpisodeWriter | None = None, progress: bool = True) -> dict[str, Any]:
    """pass@k for each k, with n samples per problem, plus the per-problem counts."""
    from agent.rollout import rollout_many

    if max(ks) > n:
        raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem, got n={n}")
    episodes = await rollout_many(rollout, problems, n, writer, progress=progress)
    results: dict[str, list[bool]] = defaultdict(list)
    for episode in episodes:
        results[episode.problem["name"]].append(episode.solved)
    table = pass_at_k_table(results, ks)
    lengths = sorted(e.num_generated for e in episodes)
    return {"pass_at_k": {f"pass@{k}": v for k, v in table.items()}, "problems": len(results), "n": n,
            "solved_any": sum(any(v) for v in results.values()),
            "errors": sum(e.finish_reason == "error" for e in episodes),
            "response_tokens_mean": sum(lengths) / len(lengths), "response_tokens_median": lengths[len(lengths) // 2],
            "token_budget_hit": sum(e.finish_reason == "token_budget" for e in episodes) / len(episodes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint's model/ directory, or a named model")
    parser.add_argument("--problems", required=True, help="problems JSONL (miniF2F, LeanWorkbook, ours)")
    parser.add_argument("--n", type=int, default=1, help="samples per problem")
    parser.add_argument("--k", default="1", help="comma-separated k values, each <= n")
    parser.add_argument("--prover", choices=["auto", "lean", "rocq"], default="auto")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--max-new-tokens", type=int, default=RolloutConfig.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=RolloutConfig.temperature)
    parser.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all)")
    parser.add_argument("--out", type=Path, help="also write the episodes here (JSONL)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-feedback", default="", metavar="TEXT",
                        help="constant feedback put in the prompt (as the FD teacher reads it)")
    args = parser.parse_args(argv)
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        parser.error(f"--k must be comma-separated integers, got {args.k!r}")
    if max(ks) > args.n:
        parser.error(f"every k must be <= n={args.n}")
    try:
        prover, why = resolve_prover(args.prover)
    except ProverUnavailableError as e:
        parser.exit(2, f"error: {e}\n")
    problems = load_problem_set(args.problems, prover)[: args.limit or None]
    from trainer.distributed import resolve_device

    backend, tokenizer = make_backend(args.backend, args.model, device=resolve_device(args.device), seed=args.seed)
    config = replace(RolloutConfig(), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     seed=args.seed, prompt_feedback=args.prompt_feedback)
    rollout = make_rollout(backend, tokenizer, prover, config, model_name=args.model)
    start = time.monotonic()
    try:
        result = asyncio.run(evaluate(rollout, problems, n=args.n, ks=ks,
                                      writer=EpisodeWriter(args.out) if args.out else None))
    finally:
        backend.close()
        rollout.prover.close()
    result.update(prover=prover, model=args.model, wall_s=round(time.monotonic() - start, 1))
    print(json.dumps(result))
    print("  ".join(f"{k}: {v:.3f}" for k, v in result["pass_at_k"].items()) + f"  ({prover}: {why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
