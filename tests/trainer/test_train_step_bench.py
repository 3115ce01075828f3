"""`bench/train_step.py --profile`: the phases of a real step and the reading of a profiler trace."""

import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from train_step import PHASES, summarize_trace  # noqa: E402


def test_profile_shows_every_phase_of_a_real_step(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--shape", "tiny", "--seq-len", "128",
                          "--trained", "96", "--seqs", "4", "--micro-batch-tokens", "1024", "--warmup", "0",
                          "--steps", "1", "--algorithm", "fd", "grpo", "--profile", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    for algorithm in ("fd", "grpo"):
        report = out.stdout.split(f"{algorithm} profile")[1]
        for phase in PHASES:  # each phase ran and took time
            assert float(re.search(rf"{phase}\s+host\s+([\d,.]+) ms", report)[1].replace(",", "")) > 0
        with gzip.open(tmp_path / f"{algorithm}-tiny-fused-rank0.json.gz", "rt") as f:
            names = {e["name"] for e in json.load(f)["traceEvents"]}
        assert set(PHASES) <= names


def test_trace_summary_counts_overlapping_kernels_once():
    """A hand-written trace in the layout torch's Chrome export gives a CUDA step (no GPU here)."""
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "step.forward", "ts": 0, "dur": 400},
        {"ph": "X", "cat": "user_annotation", "name": "step.forward", "ts": 500, "dur": 100},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "step.forward", "ts": 100, "dur": 300},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "step.forward", "ts": 300, "dur": 300},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 100, "dur": 200},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 150, "dur": 100},  # inside the first: another stream
        {"ph": "X", "cat": "kernel", "name": "softmax", "ts": 700, "dur": 100},
        # communication: 100 us under the first gemm, 100 us alone
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather_RING_LL", "ts": 200, "dur": 200},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},
        {"ph": "i", "name": "marker", "ts": 5000},  # not a timed event
    ]}
    text = summarize_trace(trace)
    assert "1.0 ms from first to last event" in text
    assert "step.scoring" not in text and "step.backward" not in text  # phases the trace does not hold
    assert re.search(r"step.forward\s+host\s+0.5 ms, GPU span 0.5 ms", text)
    assert "GPU busy 0.4 ms of 1.0 ms (40%)" in text
    assert "communication kernels 0.2 ms, 0.1 ms of it with no other kernel running" in text
    gemm, softmax = (re.search(rf"([\d.]+) ms\s+([\d.]+)% x(\d+)\s+{name}", text) for name in ("gemm", "softmax"))
    assert gemm.groups() == ("0.3", "50.0", "2") and softmax.groups() == ("0.1", "16.7", "1")
    assert text.index("gemm") < text.index("softmax")
    assert summarize_trace({"traceEvents": []}) == "the trace holds no timed events"


def test_eager_and_fused_layers_in_one_run_with_one_micro_batch_by_default(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--shape", "tiny", "--seq-len", "64",
                          "--trained", "48", "--seqs", "3", "--feedback", "5", "--warmup", "0", "--steps", "1",
                          "--algorithm", "grpo", "fd", "--layers", "fused", "eager"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^(fd|grpo)\s+tiny .* layers=(\w+) .* micro_batch_tokens=(\d+): ([\d.]+) s", out.stdout, re.M)
    # eager first (fusing replaces the family's rotary embedding for the process), all sequences in one micro-batch
    assert [r[:3] for r in rows] == [("grpo", "eager", "207"), ("fd", "eager", "207"), ("grpo", "fused", "207"),
                                     ("fd", "fused", "207")]
    seconds = {(a, layers): float(s) for a, layers, _, s in rows}
    for algorithm in ("fd", "grpo"):
        ratio = float(re.search(rf"^{algorithm}\s+fused layers: ([\d.]+)x eager's speed", out.stdout, re.M)[1])
        assert ratio == pytest.approx(seconds[algorithm, "eager"] / seconds[algorithm, "fused"], rel=0.03, abs=0.01)
