"""Plot metrics of training runs from their `metrics.jsonl`, overlaid, one subplot per metric.

    python -m trainer.plot RUN_DIR [RUN_DIR ...] --metric train/entropy [--metric ...] --out FILE.png
        [--labels L1 L2 ...] [--smooth N] [--title T] [--size WxH] [--csv FILE]

x is each record's `step`. A run is labelled with its directory's name unless `--labels`
names every run; runs that share a label are seeds of one setting, drawn as their mean with
a shaded band from the lowest to the highest seed (min..max, not a standard deviation: with
two or three seeds that is what one can honestly show). At a step where only some seeds
have the metric, the mean and band are over those (the CSV's `n` says how many).
`--smooth N` replaces each run's value by the mean of its last N points (a trailing
moving average over the steps where the run has the metric; the first N-1 points average
the points so far), before seeds are combined. A null value (what MetricsLogger writes
for a non-finite float) or a NaN is a missing point. `--csv FILE` writes every plotted point
(`metric,label,step,mean,low,high,n`) so a figure can be checked in numbers.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = tuple[list[int], list[float]]  # steps (increasing), values


class PlotError(Exception):
    """Bad input: reported as one line, exit code 2."""


@dataclass(frozen=True)
class Point:
    step: int
    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Curve:
    points: list[Point]
    runs: int  # runs of the label with at least one point


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`. A last line without its newline that does not
    parse is a record still being written (the run is live) and is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PlotError(f"{path}: not UTF-8 text (byte {e.start})") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: being written
                break
            raise PlotError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path}:{number}: not a metrics record (an object with an integer 'step')")
        records.append(record)
    return records


def series(records: Sequence[dict], metric: str, source: str = "") -> Series:
    """The run's (steps, values) of `metric`, by step; a step logged twice keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(metric)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):  # null, or NaN from elsewhere
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PlotError(f"{source}: {metric} at step {record['step']} is not a number: {value!r}")
        by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(values: Sequence[float], n: int) -> list[float]:
    """Trailing moving average: point i is the mean of points max(0, i-n+1) .. i."""
    if n < 1:
        raise ValueError(f"smoothing window must be at least 1, not {n}")
    return [math.fsum(values[max(0, i - n + 1):i + 1]) / min(i + 1, n) for i in range(len(values))]


def combine(runs: Sequence[Series]) -> Curve:
    """Seeds of one setting: at each step any of them has, the mean, min and max over those that have it."""
    at: dict[int, list[float]] = {}
    for steps, values in runs:
        for s, v in zip(steps, values, strict=True):
            at.setdefault(s, []).append(v)
    points = [Point(s, math.fsum(vs) / len(vs), min(vs), max(vs), len(vs)) for s, vs in sorted(at.items())]
    return Curve(points, sum(1 for steps, _ in runs if steps))


def closest(name: str, names: set[str]) -> list[str]:
    """All of `names`, the most similar to `name` first."""
    return sorted(names, key=lambda n: (-difflib.SequenceMatcher(None, name, n).ratio(), n))


def curves(run_dirs: Sequence[Path], labels: Sequence[str], metrics: Sequence[str],
           window: int) -> dict[str, dict[str, Curve]]:
    """metric -> label -> curve, labels in the order they first appear; every error comes before anything is drawn."""
    if len(labels) != len(run_dirs):
        raise PlotError(f"--labels gives {len(labels)} labels for {len(run_dirs)} run directories; give one each")
    records = [read_metrics(d) for d in run_dirs]
    present = {k for rs in records for r in rs for k, v in r.items() if k != "step" and v is not None}
    for metric in metrics:
        if metric not in present:
            known = ", ".join(closest(metric, present)) or "none"
            raise PlotError(f"no run has the metric {metric!r}; the metrics they have, closest first: {known}")
    out: dict[str, dict[str, Curve]] = {}
    for metric in metrics:
        runs: dict[str, list[Series]] = {label: [] for label in labels}
        for run_dir, label, rs in zip(run_dirs, labels, records, strict=True):
            steps, values = series(rs, metric, str(run_dir / "metrics.jsonl"))
            runs[label].append((steps, smooth(values, window)))
        out[metric] = {label: combine(rs) for label, rs in runs.items()}
    return out


def write_csv(path: Path, data: dict[str, dict[str, Curve]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "label", "step", "mean", "low", "high", "n"])
        for metric, by_label in data.items():
            for label, curve in by_label.items():
                writer.writerows([metric, label, p.step, repr(p.mean), repr(p.low), repr(p.high), p.n]
                                 for p in curve.points)


def figure(data: dict[str, dict[str, Curve]], *, size: tuple[int, int], title: str | None) -> Figure:
    """One subplot per metric, a line per label, a min..max band where a label has several runs with points."""
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend renders to files; pyplot (and a display) is never involved
    axes = fig.subplots(len(data), 1, squeeze=False, sharex=True)[:, 0]
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, by_label) in zip(axes, data.items(), strict=True):
        for i, (label, curve) in enumerate(by_label.items()):
            if not curve.points:  # a label without this metric: no legend entry (main prints a note)
                continue
            color, points = colors[i % len(colors)], curve.points  # a label keeps its color in every subplot
            steps = [p.step for p in points]
            name = f"{label} (mean of {curve.runs} runs, band min..max)" if curve.runs > 1 else label
            ax.plot(steps, [p.mean for p in points], color=color, label=name, marker="." if len(points) < 30 else None)
            if curve.runs > 1:
                ax.fill_between(steps, [p.low for p in points], [p.high for p in points], color=color, alpha=0.2,
                                linewidth=0)
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return fig


def save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path)
    except ValueError as e:  # a suffix matplotlib has no writer for
        raise PlotError(f"cannot write {path}: {e}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 900x600, not {text!r}") from None
    if width < 100 or height < 100:
        raise argparse.ArgumentTypeError(f"{text}: width and height must be at least 100 pixels")
    return width, height


def _window(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="directories with a metrics.jsonl")
    p.add_argument("--metric", action="append", required=True,
                   help="metric to plot (e.g. train/entropy); repeat for one subplot per metric")
    p.add_argument("--out", required=True, type=Path, help="image to write; the format follows the suffix (.png)")
    p.add_argument("--labels", nargs="+", help="one label per RUN_DIR (default: the directory names); "
                   "runs with the same label are seeds of one setting")
    p.add_argument("--smooth", type=_window, default=1, metavar="N",
                   help="trailing moving average over N points of each run (default 1: none)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--size", type=_size, metavar="WxH",
                   help="image size in pixels (default: 900 wide, 300 high per metric plus 60)")
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write the plotted points as CSV")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    labels = args.labels or [d.resolve().name for d in args.runs]
    metrics = list(dict.fromkeys(args.metric))
    try:
        data = curves(args.runs, labels, metrics, args.smooth)
        fig = figure(data, size=args.size or (900, 300 * len(metrics) + 60), title=args.title)
        save(fig, args.out)
        if args.csv:
            write_csv(args.csv, data)
    except PlotError as e:
        print(f"python -m trainer.plot: error: {e}", file=sys.stderr)
        return 2
    for metric, by_label in data.items():
        missing = [label for label, curve in by_label.items() if not curve.points]
        if missing:
            print(f"note: no points of {metric} in {', '.join(missing)}", file=sys.stderr)
    print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
