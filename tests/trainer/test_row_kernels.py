"""trainer/row_kernels.py (the head's Triton kernels) against lm_head's eager functions.

Without a GPU these run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); tests/trainer/test_gpu.py runs them compiled on CUDA.
"""

import pytest
import torch
from torch.testing import assert_close

from trainer import lm_head, row_kernels

pytestmark = pytest.mark.skipif(not row_kernels.AVAILABLE, reason="needs Triton: pip install triton")


def logits(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (4 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).to(dtype)


# cols: one tile, several tiles with a ragged last one, fewer than a tile
@pytest.mark.parametrize("cols", [4096, 5000, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_stats_match_the_eager_log_sum_exp_and_entropy(cols, dtype):
    z = logits(7, cols, dtype)
    z[2] += 60  # a row far from 0: the running maximum, not a fixed shift
    z[3, cols // 2] = 90  # one dominant logit after many small ones: the rescaling of the sums
    lse, entropy, maxima = row_kernels.row_stats(z, entropy=True)
    # against float64: the entropy is summed relative to the running maximum, so a row near 60
    # keeps its precision (the eager fp32 lse - E[z] loses about 1e-4 there)
    want_lse, want_entropy = lm_head._softmax_stats(z.double())
    assert lse.dtype == entropy.dtype == torch.float32 and maxima is None
    assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)
    assert_close(entropy.double(), want_entropy, rtol=1e-6, atol=2e-6)
    alone, none, _ = row_kernels.row_stats(z)
    assert none is None and torch.equal(alone, lse)


def test_row_stats_with_minus_infinity_logits():
    """Masked-out logits (-inf) add nothing: the log-sum-exp and entropy of the other columns."""
    z = logits(3, 5000, torch.float32)
    z[0, ::3] = float("-inf")
    z[1, :4500] = float("-inf")  # whole tiles of -inf before the first finite logit
    z[2] = float("-inf")  # nothing but -inf: log-sum-exp -inf, as torch's
    lse, entropy, _ = row_kernels.row_stats(z, entropy=True)
    assert_close(lse, torch.logsumexp(z, -1), rtol=1e-6, atol=1e-5)
    assert lse[2] == float("-inf")
    for r in range(2):
        finite = z[r][z[r] > float("-inf")][None]
        assert_close(entropy[r].double(), lm_head._softmax_stats(finite.double())[1][0], rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize(("segments", "length"), [(16, 300), (13, 100), (128, 37)])
def test_segment_maxima_are_exact_and_feed_the_same_top_k(segments, length):
    z = logits(5, segments * length, torch.bfloat16, seed=segments)
    lse, _, maxima = row_kernels.row_stats(z, segments=segments)
    assert maxima.dtype == z.dtype and maxima.shape == (5, segments)
    assert torch.equal(maxima, z.view(5, segments, length).amax(-1))
    assert_close(lse, lm_head._logsumexp(z), rtol=1e-6, atol=1e-5)
    k = min(5, segments - 1)
    got = lm_head.top_k(z, k, segments, maxima=maxima)
    assert torch.equal(got.values if hasattr(got, "values") else got[0], z.topk(k, dim=-1).values)
    assert torch.equal(z.gather(1, got[1]), got[0])


def test_segments_must_split_the_row_evenly():
    with pytest.raises(ValueError, match="5000 columns do not split into 3 equal segments"):
        row_kernels.row_stats(logits(2, 5000, torch.float32), segments=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_softmax_matches_eager(dtype):
    z = logits(6, 5000, dtype)
    lse, scale = lm_head._logsumexp(z), torch.rand(6, generator=torch.Generator().manual_seed(1)) - 0.5
    got = row_kernels.scaled_softmax(z, lse, scale)
    want = lm_head._scaled_softmax(z, lse, scale)
    assert got.dtype == dtype
    assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)


def test_strided_rows_and_no_rows():
    wide = logits(4, 6000, torch.float32)
    z = wide[:, 500:5500]  # rows 6,000 apart: the kernels read with the row stride
    assert_close(row_kernels.row_stats(z)[0], torch.logsumexp(z, -1), rtol=1e-6, atol=1e-5)
    lse = torch.logsumexp(z, -1)
    assert_close(row_kernels.scaled_softmax(z, lse, torch.ones(4)), torch.softmax(z, -1), rtol=1e-5, atol=1e-8)
    empty = z[:0]
    lse, entropy, maxima = row_kernels.row_stats(empty, entropy=True, segments=10)
    assert lse.shape == entropy.shape == (0,) and maxima.shape == (0, 10)
    assert row_kernels.scaled_softmax(empty, lse, lse).shape == (0, 5000)


def test_only_gpu_rows_outside_autograd_take_the_kernels():
    z = logits(2, 300, torch.float32)
    assert not lm_head._fast(z)  # CPU tensors: the eager functions
    assert not row_kernels.supports(z.double())
    assert row_kernels.supports(z) and row_kernels.supports(z.bfloat16())
