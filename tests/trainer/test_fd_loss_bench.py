"""`bench/fd_loss.py` runs and prints the head's rows per chunk size, its kernels, and a profile."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_the_head_benchmark_runs_per_chunk_and_times_each_kernel(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "fd_loss.py"), "--tokens", "64", "--vocab", "2048",
                          "--hidden", "16", "--chunk", "32", "16", "--repeats", "1", "--profile", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^head .* chunk=(\d+) .* (ours|naive)\s+[\d.]+ ms", out.stdout, re.M)
    assert sorted(rows) == [("16", "naive"), ("16", "ours"), ("32", "naive"), ("32", "ours")]
    for chunk in ("32", "16"):
        kernels = re.findall(rf"^\[{chunk}, 2048\] logits: (.+?)\s+[\d.]+ ms\s+[\d.]+ TB/s$", out.stdout, re.M)
        assert kernels == ["top-k torch", "top-k segments", "top-k + lse", "log-sum-exp", "softmax stats",
                           "scaled softmax"]
        assert re.search(rf"^head chunk={chunk} profile \(trace .*\):\nprofiled step: [\d.,]+ ms", out.stdout, re.M)
        assert (tmp_path / f"head-H16-chunk{chunk}.json.gz").stat().st_size > 0
