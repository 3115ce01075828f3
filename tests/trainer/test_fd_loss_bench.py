"""`bench/fd_loss.py`'s candidate top-k (`segment_topk`) equals torch's one-stage top-k, and the benchmark runs."""

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from fd_loss import segment_topk  # noqa: E402


@pytest.mark.parametrize("vocab, k, segments", [(151_936, 25, 128), (640, 5, 32), (640, 5, 64)])
def test_segment_topk_equals_torchs(vocab, k, segments):
    """Random rows, a row whose top k crowd into its first segment, one whose top k sit in the last."""
    z = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab), dtype=torch.float64)
    z[1, :k] += 100
    z[2, -k:] += 100
    values, ids = segment_topk(z, k, segments)
    want = z.topk(k, dim=-1)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)


def test_segment_topk_with_ties_returns_the_top_values():
    """bf16 logits tie often: the values are torch's, each id holds its value, no id twice."""
    z = torch.randint(0, 40, (8, 151_936), generator=torch.Generator().manual_seed(0)).bfloat16()
    values, ids = segment_topk(z, 25)
    assert torch.equal(values, z.topk(25, dim=-1).values) and torch.equal(z.gather(1, ids), values)
    assert all(len(set(row)) == 25 for row in ids.tolist())


@pytest.mark.parametrize("vocab, k, segments", [(50, 5, 16), (640, 5, 5), (320, 25, 16)])
def test_segment_topk_falls_back_where_segments_cannot_hold_the_top_k(vocab, k, segments):
    z = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(segment_topk(z, k, segments).indices, z.topk(k, dim=-1).indices)


def test_the_head_benchmark_runs_and_compares_the_top_k():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "fd_loss.py"), "--tokens", "64", "--vocab", "2048",
                          "--hidden", "16", "--chunk", "32", "--repeats", "1"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(re.findall(r"^head .* (ours|naive)\s+[\d.]+ ms", out.stdout, re.M)) == {"ours", "naive"}
    assert re.search(r"^top 25 of \[32, 2048\] logits: torch [\d.]+ ms, segments [\d.]+ ms", out.stdout, re.M)
