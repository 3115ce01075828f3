"""trainer.plot on metrics.jsonl files written by the real MetricsLogger."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from trainer.metrics import MetricsLogger
from trainer.plot import PlotError, curves, figure, main, smooth

REPO = Path(__file__).resolve().parents[2]


def write_run(run_dir: Path, rows: dict[int, dict[str, float]]) -> Path:
    with MetricsLogger(run_dir / "metrics.jsonl") as logger:
        for step, metrics in rows.items():
            logger.log(step, metrics)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    """Two seeds of FD (the second lacks step 3 and has a NaN entropy at step 2) and one GRPO run."""
    fd0 = write_run(tmp_path / "fd0", {1: {"train/entropy": 2.0, "train/kl": 0.5},
                                       2: {"train/entropy": 1.5, "train/kl": 0.25},
                                       3: {"train/entropy": 1.0, "train/kl": 0.125}})
    fd1 = write_run(tmp_path / "fd1", {1: {"train/entropy": 3.0, "train/kl": 0.75},
                                       2: {"train/entropy": float("nan"), "train/kl": 0.125}})
    grpo = write_run(tmp_path / "grpo", {1: {"train/entropy": 2.5}, 2: {"train/entropy": 2.25},
                                         3: {"train/entropy": 2.0}})
    return fd0, fd1, grpo


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"metric": r["metric"], "label": r["label"], "step": int(r["step"]), "mean": float(r["mean"]),
             "low": float(r["low"]), "high": float(r["high"]), "n": int(r["n"])} for r in rows]


def row(metric, label, step, mean, low, high, n):
    return {"metric": metric, "label": label, "step": step, "mean": pytest.approx(mean), "low": pytest.approx(low),
            "high": pytest.approx(high), "n": n}


def test_seeds_are_a_mean_with_a_min_max_band(runs, tmp_path):
    fd0, fd1, grpo = runs
    out, table = tmp_path / "fig" / "entropy.png", tmp_path / "entropy.csv"
    rc = main([str(fd0), str(fd1), str(grpo), "--labels", "fd", "fd", "grpo", "--metric", "train/entropy",
               "--metric", "train/kl", "--out", str(out), "--csv", str(table), "--size", "640x480"])
    assert rc == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (640, 480)
    image.verify()
    assert read_csv(table) == [
        # step 1: both seeds; step 2: fd1's entropy is NaN (null in the log), so fd0 alone; step 3: fd0 alone
        row("train/entropy", "fd", 1, (2.0 + 3.0) / 2, 2.0, 3.0, 2),
        row("train/entropy", "fd", 2, 1.5, 1.5, 1.5, 1),
        row("train/entropy", "fd", 3, 1.0, 1.0, 1.0, 1),
        row("train/entropy", "grpo", 1, 2.5, 2.5, 2.5, 1),
        row("train/entropy", "grpo", 2, 2.25, 2.25, 2.25, 1),
        row("train/entropy", "grpo", 3, 2.0, 2.0, 2.0, 1),
        row("train/kl", "fd", 1, (0.5 + 0.75) / 2, 0.5, 0.75, 2),
        row("train/kl", "fd", 2, (0.25 + 0.125) / 2, 0.125, 0.25, 2),  # the first seed is the high one
        row("train/kl", "fd", 3, 0.125, 0.125, 0.125, 1),
        # the GRPO run has no train/kl: nothing drawn for it, no error
    ]


def test_the_figure_has_a_subplot_per_metric_and_a_band_per_seeded_label(runs):
    fd0, fd1, grpo = runs
    data = curves([fd0, fd1, grpo], ["fd", "fd", "grpo"], ["train/entropy", "train/kl"], window=1)
    fig = figure(data, size=(900, 660), title="FD vs GRPO")
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["train/entropy", "train/kl"]
    assert fig.get_suptitle() == "FD vs GRPO"
    entropy, kl = axes
    assert [t.get_text() for t in entropy.get_legend().get_texts()] == \
        ["fd (mean of 2 runs, band min..max)", "grpo"]
    fd_line, grpo_line = entropy.get_lines()
    assert list(fd_line.get_xdata()) == [1, 2, 3] and list(fd_line.get_ydata()) == [2.5, 1.5, 1.0]
    assert list(grpo_line.get_ydata()) == [2.5, 2.25, 2.0]
    band = entropy.collections[0]  # the one band: fd's; grpo is a single run
    assert len(entropy.collections) == 1
    (x0, y0), (x1, y1) = band.get_paths()[0].vertices.min(0), band.get_paths()[0].vertices.max(0)
    assert (x0, x1, y0, y1) == (1, 3, 1.0, 3.0)
    assert [t.get_text() for t in kl.get_legend().get_texts()] == ["fd (mean of 2 runs, band min..max)"]
    assert fig.get_size_inches() * fig.dpi == pytest.approx([900, 660])
    # a band is over the runs that have the metric: grpo has no train/kl
    fig = figure(curves([fd0, fd1, grpo], ["all"] * 3, ["train/kl"], window=1), size=(900, 360), title=None)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["all (mean of 2 runs, band min..max)"]


def test_default_labels_are_directory_names_and_default_size_grows_with_metrics(runs, tmp_path):
    fd0, _, grpo = runs
    out, table = tmp_path / "two.png", tmp_path / "two.csv"
    assert main([str(fd0), str(grpo), "--metric", "train/entropy", "--metric", "train/kl", "--out", str(out),
                 "--csv", str(table)]) == 0
    assert Image.open(out).size == (900, 2 * 300 + 60)
    assert {(r["metric"], r["label"]) for r in read_csv(table)} == {
        ("train/entropy", "fd0"), ("train/entropy", "grpo"), ("train/kl", "fd0")}


def test_smoothing_is_a_trailing_mean_per_run_before_seeds_combine(tmp_path):
    assert smooth([1.0, 3.0, 5.0, 7.0], 1) == [1.0, 3.0, 5.0, 7.0]
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 3.0, 5.0, 7.0], 3) == [1.0, 2.0, 3.0, 5.0]
    assert smooth([1.0, 3.0], 10) == [1.0, 2.0]
    a = write_run(tmp_path / "a", {1: {"m": 1.0}, 2: {"m": 3.0}, 4: {"m": 5.0}})  # no step 3: points, not steps
    b = write_run(tmp_path / "b", {1: {"m": 3.0}, 2: {"m": 5.0}, 3: {"m": 7.0}, 4: {"m": 9.0}})
    table = tmp_path / "s.csv"
    assert main([str(a), str(b), "--labels", "x", "x", "--metric", "m", "--smooth", "2", "--out",
                 str(tmp_path / "s.png"), "--csv", str(table)]) == 0
    # a smoothed: 1, 2, 4 at steps 1, 2, 4; b smoothed: 3, 4, 6, 8
    assert read_csv(table) == [row("m", "x", 1, 2.0, 1.0, 3.0, 2), row("m", "x", 2, 3.0, 2.0, 4.0, 2),
                               row("m", "x", 3, 6.0, 6.0, 6.0, 1), row("m", "x", 4, 6.0, 4.0, 8.0, 2)]


def test_a_live_runs_torn_last_line_is_left_out_a_repeated_step_keeps_its_last_value_nan_is_a_gap(tmp_path):
    run = write_run(tmp_path / "live", {1: {"m": 1.0}, 2: {"m": 2.0}, 3: {"m": 3.0}})
    with (run / "metrics.jsonl").open("a") as f:
        # step 3 again, a NaN (not from MetricsLogger, which writes null), then a record being written
        f.write('{"step": 3, "m": 30.0}\n{"step": 5, "m": NaN}\n{"step": 4, "m": 4')
    table = tmp_path / "live.csv"
    assert main([str(run), "--metric", "m", "--out", str(tmp_path / "live.png"), "--csv", str(table)]) == 0
    assert [(r["step"], r["mean"]) for r in read_csv(table)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m trainer.plot: error: "), err
    return err


def test_errors_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    fd0, fd1, grpo = runs
    out, table = tmp_path / "e.png", tmp_path / "e.csv"
    tail = ["--out", str(out), "--csv", str(table)]
    err = error_of(capsys, [str(fd0), str(tmp_path / "nowhere"), "--metric", "train/entropy", *tail])
    assert f"{tmp_path / 'nowhere'} has no metrics.jsonl" in err
    err = error_of(capsys, [str(fd0), str(grpo), "--metric", "train/entrpy", *tail])
    assert "no run has the metric 'train/entrpy'; the metrics they have, closest first: train/entropy, train/kl" in err
    err = error_of(capsys, [str(fd0), str(grpo), "--metric", "kl", *tail])
    assert err.endswith("no run has the metric 'kl'; the metrics they have, closest first: train/kl, train/entropy\n")
    err = error_of(capsys, [str(fd0), str(fd1), str(grpo), "--labels", "fd", "grpo", "--metric", "train/kl", *tail])
    assert "--labels gives 2 labels for 3 run directories" in err
    bad = write_run(tmp_path / "bad", {1: {"m": 1.0}})
    with (bad / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "m": \n{"step": 3, "m": 3.0}\n')
    err = error_of(capsys, [str(bad), "--metric", "m", *tail])
    assert f"{bad / 'metrics.jsonl'}:2: not JSON" in err
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "metrics.jsonl").write_bytes(b'{"step": 1, "m": 1.0}\n\xff\n')
    assert f"{binary / 'metrics.jsonl'}: not UTF-8 text" in error_of(capsys, [str(binary), "--metric", "m", *tail])
    text = write_run(tmp_path / "text", {1: {"m": "high"}})
    assert "m at step 1 is not a number: 'high'" in error_of(capsys, [str(text), "--metric", "m", *tail])
    assert "cannot write" in error_of(capsys, [str(fd0), "--metric", "train/kl", "--out", str(tmp_path / "e.xyz")])
    for option in (["--smooth", "0"], ["--smooth", "two"], ["--size", "640"], ["--size", "50x50"]):
        with pytest.raises(SystemExit) as exit_:
            main([str(fd0), "--metric", "train/kl", *option, *tail])
        assert exit_.value.code == 2 and f"argument {option[0]}: " in capsys.readouterr().err
    assert not out.exists() and not table.exists()


def test_curves_raise_before_reading_when_labels_do_not_match(runs):
    with pytest.raises(PlotError, match="1 labels for 3 run directories"):
        curves(list(runs), ["fd"], ["train/kl"], window=1)


def test_the_command_line_runs_headless(runs, tmp_path):
    fd0, fd1, _ = runs
    out = tmp_path / "cli.png"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "trainer.plot", str(fd0), str(fd1), "--labels", "fd", "fd",
                             "--metric", "train/kl", "--out", str(out), "--title", "KL"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out}\n"
    assert Image.open(out).size == (900, 360)
    result = subprocess.run([sys.executable, "-m", "trainer.plot", str(tmp_path), "--metric", "x", "--out",
                             str(out)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"python -m trainer.plot: error: {tmp_path} has no metrics.jsonl\n"
