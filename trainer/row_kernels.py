"""Triton kernels for the LM head's work on one chunk of logits besides its matmuls.

A chunk of logits is [c, V] (V = 151,936 for Qwen): each pass over it in bf16 reads 311 MB
per 1,024 rows, so what matters is how many passes there are and how close each comes to
the memory bandwidth. Two kernels:

- `row_stats`: per row, the log-sum-exp, and on request the full-vocabulary entropy and
  the maxima of equal segments of the row (what `lm_head.top_k` ranks), in ONE read of the
  logits: an online softmax (a running maximum m, and sum_v e^(z_v - m) and
  sum_v e^(z_v - m) (z_v - m) rescaled whenever m grows).
- `scaled_softmax`: scale_r * softmax(z)_rv, written in z's dtype (a chunk's logit gradient
  before its top-K correction): one read, one write.

On an H200 the torch.compile'd equivalents (`lm_head._softmax_stats` and friends, read two or three
times per row) reached 0.7 to 1.6 TB/s on [2,048 x 151,936] bf16 chunks (`bench/fd_loss.py`).

Where no GPU exists, the tests run these kernels on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py): the same code, checked against the eager
functions of `lm_head`.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: lm_head then runs its eager functions
    triton = None

AVAILABLE = triton is not None
# Tile sizes and warps: the fastest of a sweep on an H200 over [2,048 x 151,936] bf16 chunks
TILE = 4096  # elements read per loop step of one row (8 KiB of bf16); a tile is SEGS x BLOCK
WARPS = 4
LOWEST = -3.4028234663852886e38  # the running maximum starts here, not at -inf: a row of -inf gets lse -inf, not nan

if AVAILABLE:

    @triton.jit
    def _row_stats_kernel(z_ptr, z_stride, n_cols, seg_len, n_seg, lse_ptr, ent_ptr, max_ptr,
                          ENTROPY: tl.constexpr, MAXIMA: tl.constexpr, SEGS: tl.constexpr,
                          BLOCK: tl.constexpr, LOWEST: tl.constexpr):
        """One program per row; the row is read as n_seg segments of seg_len columns, SEGS of
        them per step ([SEGS, BLOCK] tiles, BLOCK >= seg_len)."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * z_stride
        cols = tl.arange(0, BLOCK)
        m = LOWEST  # running maximum
        s = 0.0  # sum of exp(z - m)
        t = 0.0  # sum of exp(z - m) * (z - m)
        for first in range(0, n_seg, SEGS):
            seg = first + tl.arange(0, SEGS)
            idx = seg[:, None] * seg_len + cols[None, :]
            mask = (cols[None, :] < seg_len) & (idx < n_cols) & (seg[:, None] < n_seg)
            x = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32)
            seg_max = tl.max(x, axis=1)
            if MAXIMA:
                tl.store(max_ptr + row * n_seg + seg, seg_max.to(max_ptr.dtype.element_ty), mask=seg < n_seg)
            m_new = tl.maximum(m, tl.max(seg_max, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(x - m_new)  # 0 where masked (-inf)
            if ENTROPY:  # p > 0: leaves out masked and -inf logits (0 * -inf), which add nothing
                t = alpha * (t + (m - m_new) * s) + tl.sum(tl.sum(p * tl.where(p > 0.0, x - m_new, 0.0), axis=1),
                                                           axis=0)
            s = s * alpha + tl.sum(tl.sum(p, axis=1), axis=0)
            m = m_new
        tl.store(lse_ptr + row, m + tl.log(s))
        if ENTROPY:  # H = lse - E_p[z] = log s - E_p[z - m]: no cancellation of two large terms
            tl.store(ent_ptr + row, tl.log(s) - t / s)

    @triton.jit
    def _scaled_softmax_kernel(z_ptr, z_stride, out_ptr, out_stride, lse_ptr, scale_ptr, n_cols,
                               BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(z_ptr + row * z_stride + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(scale_ptr + row).to(tl.float32) * tl.exp(x - tl.load(lse_ptr + row).to(tl.float32))
        tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def supports(z: Tensor) -> bool:
    """Whether these kernels take `z`: a 2-D bf16/fp16/fp32 tensor of rows (fp64, the tests'
    reference dtype, stays eager)."""
    return AVAILABLE and z.dim() == 2 and z.dtype in (torch.bfloat16, torch.float16, torch.float32)


def row_stats(z: Tensor, *, entropy: bool = False, segments: int = 0) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """[c, V] logits -> (log-sum-exp [c], entropy [c] or None, segment maxima [c, segments] or
    None), in one read of `z`. lse and entropy in fp32; the maxima in z's dtype (exact: maxima
    of its values). `segments` > 0 needs V % segments == 0."""
    c, v = z.shape
    z = z if z.stride(1) == 1 else z.contiguous()
    if segments:
        if v % segments:
            raise ValueError(f"{v} columns do not split into {segments} equal segments")
        seg_len, n_seg = v // segments, segments
        block = triton.next_power_of_2(seg_len)
    else:
        seg_len = block = TILE
        n_seg = triton.cdiv(v, TILE)
    lse = torch.empty(c, device=z.device, dtype=torch.float32)
    ent = torch.empty_like(lse) if entropy else lse  # a placeholder pointer where not written
    maxima = torch.empty(c, max(n_seg, 1), device=z.device, dtype=z.dtype) if segments else z
    if c:
        _row_stats_kernel[(c,)](z, z.stride(0), v, seg_len, n_seg, lse, ent, maxima, ENTROPY=entropy,
                                MAXIMA=bool(segments), SEGS=max(1, TILE // block), BLOCK=block, LOWEST=LOWEST,
                                num_warps=WARPS)
    return lse, ent if entropy else None, maxima if segments else None


def scaled_softmax(z: Tensor, lse: Tensor, scale: Tensor) -> Tensor:
    """scale[:, None] * softmax(z) given the rows' log-sum-exp, in z's dtype."""
    c, v = z.shape
    z = z if z.stride(1) == 1 else z.contiguous()
    out = torch.empty_like(z)
    if c and v:
        _scaled_softmax_kernel[(c, triton.cdiv(v, TILE))](z, z.stride(0), out, out.stride(0), lse.contiguous(),
                                                          scale.contiguous(), v, BLOCK=TILE, num_warps=8)
    return out
