"""Cold vs warm check time per problem: how much a prover gains from work it has already done.

    python bench/prover_check.py [--prover rocq|lean] [--problems FILE] [--repeats 3]

Cold: the first check of a problem's reference proof by a fresh prover object (for Lean
this includes starting a REPL worker and elaborating the header; for Rocq, whose checks
are separate `coqc` runs, only what the OS has not cached yet). Warm: the mean of the
next `--repeats` checks of the same file. Prints one line per problem, then the medians
and their ratio, all measured in this run.
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


def timed_check(prover, problem, source) -> tuple[float, bool]:
    with EpisodeDir(prefix="bench-") as d:
        start = time.perf_counter()
        result = prover.check(source, d.root, problem=problem)
        return time.perf_counter() - start, judge(result, problem, prover).solved


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

    cold, warm = [], []
    print(f"prover={args.prover} problems={len(problems)} repeats={args.repeats}")
    print(f"{'problem':<40} {'cold_s':>8} {'warm_s':>8} {'ratio':>6} solved")
    for problem in problems:
        prover = make_prover(args.prover)
        source = prover.render(problem)
        first, solved = timed_check(prover, problem, source)
        rest = [timed_check(prover, problem, source)[0] for _ in range(args.repeats)]
        prover.close()
        cold.append(first)
        warm.append(statistics.mean(rest))
        print(f"{problem.name:<40} {first:8.3f} {warm[-1]:8.3f} {first / warm[-1]:6.2f} {solved}")
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"median cold {c:.3f} s, median warm {w:.3f} s, cold/warm {c / w:.2f}")


if __name__ == "__main__":
    main()
