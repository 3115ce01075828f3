"""`bench/fd_loss.py` runs and prints the head's rows and its top-k against torch's."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_the_head_benchmark_runs_and_compares_the_top_k():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "fd_loss.py"), "--tokens", "64", "--vocab", "2048",
                          "--hidden", "16", "--chunk", "32", "--repeats", "1"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(re.findall(r"^head .* (ours|naive)\s+[\d.]+ ms", out.stdout, re.M)) == {"ours", "naive"}
    assert re.search(r"^top 25 of \[32, 2048\] logits: torch [\d.]+ ms, segments [\d.]+ ms", out.stdout, re.M)
