"""Time per check of each path a prover has, on the reference proofs of a problem set.

    python bench/prover_check.py [--prover rocq|lean] [--problems FILE] [--repeats 3] [--limit N]

Rocq, per problem (all measured in this run, on the same file):
- cold: one `coqc` compile of the file in the jail, loading its libraries from scratch (what
  each check cost before warm workers; the old check ran two such compiles);
- warm: the mean of `--repeats` feedback checks through a warm `coqtop` worker that has the
  problem header's libraries loaded (the first, which starts the worker, is not counted);
- trusted: the trusted re-check that decides "solved" (cold compile, statement check,
  `coqchk`), run only for files the warm check passed;
- full: `check()` end to end, warm feedback then the trusted re-check.
Lean: cold is the first check by a fresh prover object (a REPL worker is started and the
header elaborated), warm the mean of the next `--repeats` checks.
Prints one line per problem, then the medians and the cold/warm ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from env.problems import load_problems  # noqa: E402
from env.provers import make_prover  # noqa: E402
from env.sandbox import EpisodeDir  # noqa: E402
from env.verdict import judge  # noqa: E402

DEFAULT_PROBLEMS = {"rocq": "data/rocq_problems.jsonl", "lean": "data/lean_problems.jsonl"}


def timed(fn) -> tuple[float, object]:
    with EpisodeDir(prefix="bench-") as d:
        start = time.perf_counter()
        out = fn(d.root)
        return time.perf_counter() - start, out


def rocq_row(prover, problem, repeats: int) -> dict[str, float | bool]:
    source = prover.render(problem)
    timeout = prover.timeout_s
    cold, _ = timed(lambda d: prover.cold_feedback(source, d, timeout_s=timeout))
    timed(lambda d: prover.feedback(source, d, problem=problem, timeout_s=timeout))  # starts the worker
    warm = statistics.mean(timed(lambda d: prover.feedback(source, d, problem=problem, timeout_s=timeout))[0]
                           for _ in range(repeats))
    trusted, _ = timed(lambda d: prover.trusted_check(source, d, problem=problem, timeout_s=timeout))
    full, result = timed(lambda d: prover.check(source, d, problem=problem))
    return {"cold": cold, "warm": warm, "trusted": trusted, "full": full,
            "solved": judge(result, problem, prover).solved}


def lean_row(problem, repeats: int) -> dict[str, float | bool]:
    prover = make_prover("lean")
    source = prover.render(problem)
    try:
        cold, result = timed(lambda d: prover.check(source, d, problem=problem))
        warm = statistics.mean(timed(lambda d: prover.check(source, d, problem=problem))[0] for _ in range(repeats))
    finally:
        prover.close()
    return {"cold": cold, "warm": warm, "solved": judge(result, problem, prover).solved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prover", choices=["rocq", "lean"], default="rocq")
    parser.add_argument("--problems", help="problems JSONL (default: our own set for the prover)")
    parser.add_argument("--repeats", type=int, default=3, help="warm checks per problem")
    parser.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all)")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    problems = load_problems(args.problems or root / DEFAULT_PROBLEMS[args.prover])
    problems = problems[: args.limit or None]

    columns = ["cold", "warm", "trusted", "full"] if args.prover == "rocq" else ["cold", "warm"]
    print(f"prover={args.prover} problems={len(problems)} repeats={args.repeats} (seconds per check)")
    print(f"{'problem':<40}" + "".join(f"{c + '_s':>10}" for c in columns) + "  solved")
    rows = []
    prover = make_prover("rocq") if args.prover == "rocq" else None
    try:
        for problem in problems:
            row = rocq_row(prover, problem, args.repeats) if prover else lean_row(problem, args.repeats)
            rows.append(row)
            print(f"{problem.name:<40}" + "".join(f"{row[c]:10.3f}" for c in columns) + f"  {row['solved']}")
    finally:
        if prover is not None:
            prover.close()
    medians = {c: statistics.median(r[c] for r in rows) for c in columns}
    solved = sum(bool(r["solved"]) for r in rows)
    print("median " + ", ".join(f"{c} {v:.3f} s" for c, v in medians.items())
          + f"; cold/warm {medians['cold'] / medians['warm']:.1f}x; solved {solved} of {len(rows)}")


if __name__ == "__main__":
    main()
