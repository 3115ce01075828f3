"""The LM head over chunks of positions, with the loss gradient fused into the forward pass.

Full-vocabulary logits for 8,192 positions are 8,192 x 151,936 x 4 bytes = 5 GB in fp32, so
the head runs `chunk` rows at a time. `fused_head` computes each chunk's logits once, asks
a row function for the loss, its gradient w.r.t. the logits and per-row statistics, and at
once turns that gradient into the gradients of the hidden states (g @ W) and of the head
weight (g^T h, accumulated over chunks). Backward only scales those two stored tensors.

Why this variant: storing each chunk's [c, V] logit gradient for backward would cost
c x V per chunk for the whole batch (the full logits again); recomputing the logits in
backward (activation checkpointing) costs a fourth head matmul. Reducing the gradient to
[c, H] and [V, H] inside the forward pass needs exactly three head matmuls per chunk
(logits, g @ W, g^T h) and keeps what outlives a chunk to one [N, H] hidden gradient and
one [V, H] weight gradient: the sizes backward would produce anyway. The weight gradient
is accumulated in the inputs' dtype, as autograd accumulates per-chunk gradients.

The elementwise work on a chunk (log-sum-exp, entropy, the teacher's segment maxima, the
scaled softmax) is one or two passes over [c, V]. On CUDA it runs as Triton kernels
(`trainer.row_kernels`: one read of the bf16 logits per pass, no fp32 copy); elsewhere, and
whenever autograd must see it, it runs the eager functions below: the reference those
kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer import row_kernels


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 inputs (tests) stay fp64."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def chunks(n: int, chunk: int) -> list[slice]:
    """Row slices of at most `chunk` rows; one empty slice when n == 0, so a micro-batch
    without tokens still builds a graph that reaches `hidden` and `weight` (zero loss,
    zero gradients) and backward runs on every rank."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [slice(s, s + chunk) for s in range(0, max(n, 1), chunk)]


def logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """[c, H] @ [V, H]^T in the hidden states' dtype (bf16 on GPU: tensor cores, fp32
    accumulation, no fp32 copy of the head)."""
    return F.linear(hidden, weight.to(hidden.dtype))


# ---------------------------------------------------------------- row math on one chunk of logits


def upcast(z: Tensor) -> Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _logsumexp(z: Tensor) -> Tensor:
    """[c, V] -> [c]."""
    return torch.logsumexp(upcast(z), -1)


def _softmax_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """[c, V] logits -> log-sum-exp [c] and full-vocabulary entropy [c] (H = lse - E_p[z])."""
    zf = upcast(z)
    lse = torch.logsumexp(zf, -1)
    return lse, lse - (torch.exp(zf - lse[:, None]) * zf).sum(-1)


def _scaled_softmax(z: Tensor, lse: Tensor, scale: Tensor) -> Tensor:
    """scale[:, None] * softmax(z), in z's dtype: a chunk's logit gradient before its top-K correction."""
    return (scale[:, None] * torch.exp(upcast(z) - lse[:, None])).to(z.dtype)


def _fast(z: Tensor) -> bool:
    """Whether `z` goes through the Triton kernels of `trainer.row_kernels`: CUDA rows that
    autograd does not track (the eager functions above are the reference, and what autograd sees)."""
    return z.is_cuda and row_kernels.supports(z) and not (torch.is_grad_enabled() and z.requires_grad)


def logsumexp(z: Tensor) -> Tensor:
    return row_kernels.row_stats(z)[0] if _fast(z) else _logsumexp(z)


def softmax_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    if _fast(z):
        lse, entropy, _ = row_kernels.row_stats(z, entropy=True)
        return lse, entropy
    return _softmax_stats(z)


def scaled_softmax(z: Tensor, lse: Tensor, scale: Tensor) -> Tensor:
    return row_kernels.scaled_softmax(z, lse, scale) if _fast(z) else _scaled_softmax(z, lse, scale)


def top_k_and_logsumexp(z: Tensor, k: int, segments: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """`top_k(z, k, segments)` and `logsumexp(z)`; on CUDA one read of `z` gives both the
    log-sum-exp and the segment maxima that `top_k` ranks."""
    if _fast(z) and z.shape[1] % segments == 0 and segments > k:
        lse, _, maxima = row_kernels.row_stats(z, segments=segments)
        return (*top_k(z, k, segments, maxima=maxima), lse)
    return (*top_k(z, k, segments), logsumexp(z))


def top_k(z: Tensor, k: int, segments: int = 128, maxima: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`z.topk(k, dim=-1)` of [c, V] logits, found within the k of the row's `segments` equal
    segments that have the largest maxima.

    Exact: an element of the row's top k that lay in another segment would be smaller than
    the maxima of those k segments, k elements of the row. One max pass over the row and a
    top-k over k / segments of it: on an H200, half the time of torch's top-k over a
    [1,024 x 151,936] bf16 chunk (0.63 vs 1.26 ms, `bench/fd_loss.py`). Where values tie at the k-th place,
    which of the tied ids fill the last places may differ from torch's choice (same values).
    Rows that do not split into more than k equal segments take torch's top-k. `maxima`:
    the segments' maxima [c, segments] where already known (`row_kernels.row_stats`).

    Returns:
        values: [c, k] in decreasing order; ids: [c, k] their columns in `z`.
    """
    c, v = z.shape
    if v % segments or segments <= k:
        return z.topk(k, dim=-1)
    length = v // segments
    seg = z.view(c, segments, length)
    maxima = seg.amax(-1) if maxima is None else maxima
    best = maxima.topk(k, dim=-1).indices  # [c, k] the segments with the largest maxima
    candidates = seg.gather(1, best[:, :, None].expand(c, k, length)).reshape(c, k * length)
    values, where = candidates.topk(k, dim=-1)
    return values, best.gather(1, where // length) * length + where % length


# ---------------------------------------------------------------- the fused head

# rows(logits [c, V] in the hidden dtype, the chunk's slice, whether a gradient is wanted)
#   -> (the chunk's summed loss, d loss / d logits [c, V] in the logits' dtype or None, per-row tensors)
Rows = Callable[[Tensor, slice, bool], tuple[Tensor, Tensor | None, tuple[Tensor, ...]]]


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, chunk: int, rows: Rows, grad_hidden: bool,
                grad_weight: bool) -> tuple[Tensor, ...]:
        w = weight.to(hidden.dtype)
        d_hidden = torch.empty_like(hidden) if grad_hidden else None
        d_weight = torch.zeros_like(w) if grad_weight else None
        losses, outs = [], []
        for sl in chunks(hidden.shape[0], chunk):
            h = hidden[sl]
            loss, grad, out = rows(F.linear(h, w), sl, grad_hidden or grad_weight)
            losses.append(loss)
            outs.append(out)
            if grad_hidden:
                torch.mm(grad, w, out=d_hidden[sl])
            if grad_weight:
                d_weight.addmm_(grad.T, h)
            del grad
        ctx.grads = (d_hidden, None if d_weight is None else d_weight.to(weight.dtype))
        per_row = tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
        ctx.mark_non_differentiable(*per_row)
        return (torch.stack(losses).sum(), *per_row)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("backward ran twice through the fused LM head; it keeps no graph to retain")
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        for g in (d_hidden, d_weight):  # the stored buffers are ours: scale in place, no second copy
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return d_hidden, d_weight, None, None, None, None


def fused_head(hidden: Tensor, weight: Tensor, rows: Rows, *, chunk: int) -> tuple[Tensor, ...]:
    """Apply the head to `hidden` [N, H] in chunks; returns the summed loss (differentiable
    w.r.t. `hidden` and `weight`) and each per-row tensor of `rows`, concatenated (detached)."""
    grad = torch.is_grad_enabled()
    return _FusedHead.apply(hidden, weight, chunk, rows, grad and hidden.requires_grad, grad and weight.requires_grad)
