"""Check proof attempts against problems, each in its own sandbox.

    python -m env.verify --problems P.jsonl --attempts A.jsonl [--prover rocq|lean] [--workers N]
    python -m env.verify --problems P.jsonl          # checks the problems' reference proofs

Each attempt line is `{"name": ..., "source": <full file text>}` (other keys are ignored).
Prints one JSON line `{"name", "solved", "reason"}` per attempt, in input order, then
`solved K of N`. Exits 0 whenever it ran, whatever the verdicts; 2 with a one-line reason when the
prover cannot run here (e.g. no Lean toolchain).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from env.problems import Problem, ProblemFormatError, load_problems
from env.provers import make_prover
from env.provers.base import Prover
from env.provers.lean import LeanUnavailableError
from env.sandbox import EpisodeDir
from env.verdict import Verdict, judge


def verify_source(prover: Prover, problem: Problem, source: str, *, timeout_s: float | None = None) -> Verdict:
    """The verdict for one full file, checked in a fresh sandbox."""
    with EpisodeDir(prefix="verify-") as workdir:
        return judge(prover.check(source, workdir.root, problem=problem, timeout_s=timeout_s), problem, prover)


def read_attempts(path: Path) -> Iterator[tuple[str, str | None, str]]:
    """(name, source or None, reason when unusable) per non-empty line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield f"<line {lineno}>", None, "malformed_attempt"
                continue
            name = record.get("name") if isinstance(record, dict) else None
            source = record.get("source") if isinstance(record, dict) else None
            if not isinstance(name, str) or not isinstance(source, str):
                yield str(name) if name is not None else f"<line {lineno}>", None, "malformed_attempt"
                continue
            yield name, source, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m env.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--problems", required=True, help="problems JSONL (or a Hugging Face dataset name)")
    parser.add_argument("--attempts", type=Path, help="attempts JSONL; without it, check the reference proofs")
    parser.add_argument("--prover", choices=["rocq", "lean"], help="default: the problems' prover")
    parser.add_argument("--workers", type=int, default=2, help="checks run in parallel")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per check")
    args = parser.parse_args(argv)

    try:
        problems = {p.name: p for p in load_problems(args.problems)}
    except (ProblemFormatError, FileNotFoundError) as e:
        parser.error(str(e))
    provers = {p.prover for p in problems.values()}
    prover_name = args.prover or (provers.pop() if len(provers) == 1 else None)
    if prover_name is None:
        parser.error("the problems are for several provers; choose one with --prover")
    try:
        prover = make_prover(prover_name, timeout_s=args.timeout)
    except LeanUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.attempts is None:
        jobs = [(p.name, prover.render(p) if p.formal_proof is not None else None,
                 "" if p.formal_proof is not None else "no_reference_proof") for p in problems.values()]
    else:
        jobs = list(read_attempts(args.attempts))

    def run(job: tuple[str, str | None, str]) -> dict:
        name, source, reason = job
        if source is None:
            return {"name": name, "solved": False, "reason": reason}
        problem = problems.get(name)
        if problem is None:
            return {"name": name, "solved": False, "reason": "unknown_problem"}
        if problem.prover != prover.name:
            return {"name": name, "solved": False, "reason": f"problem_is_for_{problem.prover}"}
        verdict = verify_source(prover, problem, source)
        return {"name": name, "solved": verdict.solved, "reason": verdict.reason}

    solved = 0
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
            for row in pool.map(run, jobs):
                solved += row["solved"]
                print(json.dumps(row), flush=True)
    finally:
        prover.close()
    print(f"solved {solved} of {len(jobs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
