"""Response-length distributions of episode logs, overlaid as cumulative distributions.

    python scripts/length_hist.py "initial, no feedback=RUN/initial-nofeedback/lengths.jsonl" \\
        "trained, last step=RUN/const-one-sentence-s0/lengths.jsonl@6" --out lengths.png

Each argument is LABEL=FILE[,FILE...][@V] (several files: seeds pooled). FILE is JSONL with
`num_generated` on every line (an episode log or the `lengths.jsonl` of docs/runs); `@V` keeps
the episodes of policy version V and later (those generated after V optimizer steps). Prints
each label's count, mean and median, and plots the fraction of episodes at or below each length
(a cap shows as the jump at the end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(spec: str) -> tuple[str, list[int]]:
    label, sep, rest = spec.partition("=")
    if not sep or not label:
        raise ValueError(f"{spec!r} is not LABEL=FILE[@V]")
    paths, _, version = rest.partition("@")
    since = int(version) if version else None
    lengths = []
    for path in paths.split(","):
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "num_generated" not in record:
                raise ValueError(f"{path}:{number}: no num_generated")
            if since is None or record.get("policy_version", 0) >= since:
                lengths.append(int(record["num_generated"]))
    if not lengths:
        raise ValueError(f"{paths}: no episodes" + (f" of policy version >= {since}" if since is not None else ""))
    return label, lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="+", metavar="LABEL=FILE[,FILE...][@V]")
    parser.add_argument("--out", required=True, type=Path, help="the figure (PNG)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        series = [load(s) for s in args.series]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    for label, lengths in series:
        xs = sorted(lengths)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)}, median {statistics.median(xs):.0f})")
        print(f"{label}: n={len(xs)} mean={statistics.mean(xs):.1f} median={statistics.median(xs):.0f}")
    ax.set_xlabel("response tokens")
    ax.set_ylabel("fraction of episodes <= length")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
