"""trainer/losses.py and trainer/lm_head.py against slow, obvious references (full logits, explicit loops),
in float64; the fused head also against the checkpointed one and in bf16/fp32."""

from __future__ import annotations

import math
import statistics
import weakref

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from trainer import lm_head
from trainer.losses import (
    chunked_token_stats,
    fd_loss,
    group_advantages,
    grpo_head_loss,
    grpo_loss,
    k3_kl,
    teacher_topk,
)

F64 = torch.float64
N, H, V, K = 37, 8, 50, 5
CHUNKS = [1, 3, 7, 16, N, 1024]  # 3, 7 and 16 do not divide 37


def _student(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=F64).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=F64).requires_grad_()
    return hidden, weight


def _teacher(seed: int = 1, n: int = N, k: int = K):
    g = torch.Generator().manual_seed(seed)
    hidden = 2 * torch.randn(n, H, generator=g, dtype=F64)  # sharper than the student
    weight = torch.randn(V, H, generator=g, dtype=F64)
    return teacher_topk(hidden, weight, k=k)


def _mask(seed: int = 2, n: int = N):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) < 0.7


# ---------------------------------------------------------------- references


def _softmax_row(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max())
    return e / e.sum()


def _ref_token_stats(hidden, weight, targets):
    logprobs, entropies = [], []
    for i in range(hidden.shape[0]):
        p = _softmax_row(weight @ hidden[i])
        logprobs.append(torch.log(p[targets[i]]))
        entropies.append(-sum(p[v] * torch.log(p[v]) for v in range(p.shape[0])))
    return torch.stack(logprobs), torch.stack(entropies)


def _ref_fd(hidden, weight, ids, probs, mask, *, renormalize=False, kl=False):
    """sum over masked t of -sum_a p_T(a) log p_S(a), or of the top-K KL when kl=True."""
    total = hidden.new_zeros(())
    for t in range(hidden.shape[0]):
        if not mask[t]:
            continue
        log_q = torch.log(_softmax_row(weight @ hidden[t]))
        p = probs[t] / probs[t].sum() if renormalize else probs[t]
        for j in range(ids.shape[1]):
            a = ids[t, j]
            total = total + p[j] * ((torch.log(p[j]) if kl else 0.0) - log_q[a])
    return total


def _ref_grpo(logp, old, ref, adv, mask, clip_eps, kl_coef):
    total = logp.new_zeros(())
    for t in range(logp.shape[0]):
        if not mask[t]:
            continue
        r = torch.exp(logp[t] - old[t])
        r_clipped = min(max(r, torch.tensor(1 - clip_eps, dtype=F64)), torch.tensor(1 + clip_eps, dtype=F64))
        total = total - torch.minimum(r * adv[t], r_clipped * adv[t])
        if ref is not None:
            d = ref[t] - logp[t]
            total = total + kl_coef * (torch.exp(d) - d - 1)
    return total


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ---------------------------------------------------------------- chunked_token_stats


@pytest.mark.parametrize("chunk", CHUNKS)
def test_token_stats_match_reference(chunk):
    hidden, weight = _student()
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    logprobs, entropy = chunked_token_stats(hidden, weight, targets, chunk=chunk)
    ref_logprobs, ref_entropy = _ref_token_stats(hidden, weight, targets)
    assert logprobs.shape == entropy.shape == (N,)
    assert_close(logprobs, ref_logprobs)
    assert_close(entropy, ref_entropy.detach())
    assert not entropy.requires_grad

    upstream = torch.randn(N, dtype=F64, generator=torch.Generator().manual_seed(4))
    got = _grads((logprobs * upstream).sum(), hidden, weight)
    want = _grads((ref_logprobs * upstream).sum(), hidden, weight)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def test_token_stats_differentiate_when_only_hidden_or_only_weight_requires_grad():
    """A frozen LM head (or frozen hidden states) still gets the gradient of the other: the no-grad path
    is for when neither requires one."""
    hidden, weight = _student()
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(N, dtype=F64, generator=torch.Generator().manual_seed(4))
    want = _grads((_ref_token_stats(hidden, weight, targets)[0] * upstream).sum(), hidden, weight)
    for i, (h, w) in enumerate([(hidden, weight.detach()), (hidden.detach(), weight)]):
        logprobs, _ = chunked_token_stats(h, w, targets, chunk=7)
        (got,) = _grads((logprobs * upstream).sum(), (h, w)[i])
        assert_close(got, want[i])


def test_token_stats_upcast_bf16_logits_to_fp32():
    """The product runs in bf16 (as on GPU tensor cores); the softmax runs in fp32."""
    hidden, weight = _student()
    hb, wb = hidden.detach().bfloat16(), weight.detach().bfloat16()
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    logprobs, entropy = chunked_token_stats(hb, wb, targets, chunk=7)
    assert logprobs.dtype == entropy.dtype == torch.float32
    ref = torch.log_softmax((hb @ wb.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert_close(logprobs, ref)


# ---------------------------------------------------------------- teacher_topk


@pytest.mark.parametrize("chunk", CHUNKS)
def test_teacher_topk_matches_full_softmax(chunk):
    hidden, weight = _student(seed=5)
    ids, probs = teacher_topk(hidden, weight, k=K, chunk=chunk)
    assert ids.shape == probs.shape == (N, K)
    assert ids.dtype == torch.long
    assert not probs.requires_grad and not ids.requires_grad
    for t in range(N):
        p = _softmax_row(weight.detach() @ hidden.detach()[t])
        order = sorted(range(V), key=lambda v, p=p: -p[v].item())[:K]
        assert ids[t].tolist() == order
        assert_close(probs[t], p[order])  # full-vocabulary probabilities, not renormalised
    assert (probs.sum(-1) < 1).all()


def test_teacher_topk_is_fp32_for_bf16_inputs():
    hidden, weight = _student(seed=5)
    _, probs = teacher_topk(hidden.detach().bfloat16(), weight.detach().bfloat16(), k=K, chunk=4)
    assert probs.dtype == torch.float32


@pytest.mark.parametrize("vocab, k, segments", [(151_936, 25, 128), (640, 5, 32), (640, 5, 64), (640, 25, 128)])
def test_segmented_top_k_equals_torchs(vocab, k, segments):
    """Random rows, a row whose top k crowd into its first segment, one whose top k sit in the last."""
    z = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab), dtype=F64)
    z[1, :k] += 100
    z[2, -k:] += 100
    values, ids = lm_head.top_k(z, k, segments)
    want = z.topk(k, dim=-1)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)


def test_segmented_top_k_with_ties_returns_the_top_values():
    """bf16 logits tie often: the values are torch's, each id holds its value, no id twice."""
    z = torch.randint(0, 40, (8, 151_936), generator=torch.Generator().manual_seed(0)).bfloat16()
    values, ids = lm_head.top_k(z, 25)
    assert torch.equal(values, z.topk(25, dim=-1).values) and torch.equal(z.gather(1, ids), values)
    assert all(len(set(row)) == 25 for row in ids.tolist())


@pytest.mark.parametrize("vocab, k, segments", [(50, 5, 16), (640, 5, 5), (320, 25, 16)])
def test_segmented_top_k_falls_back_where_the_row_does_not_split_into_more_than_k_segments(vocab, k, segments):
    z = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.equal(lm_head.top_k(z, k, segments).indices, z.topk(k, dim=-1).indices)


def test_teacher_topk_over_a_segmented_vocabulary_matches_full_softmax():
    """A vocabulary of 128 segments of 32 takes the segmented top k (V = 50 above does not), with
    positions whose top 25 crowd into one segment: the same ids and full-softmax probabilities."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, H, generator=g, dtype=F64), torch.randn(4096, H, generator=g, dtype=F64)
    lead = torch.linspace(4, 5, 25, dtype=F64)[:, None]
    weight[64:89] = lead * hidden[0]  # tokens 64..88 (segment 2) lead at position 0
    weight[4071:] = lead * hidden[1]  # the last 25 lead at position 1
    ids, probs = teacher_topk(hidden, weight, k=25, chunk=4)
    p = torch.softmax(hidden @ weight.T, -1)
    want = p.topk(25, dim=-1)
    assert torch.equal(ids, want.indices) and ids[0].sort().values.tolist() == list(range(64, 89))
    assert ids[1].sort().values.tolist() == list(range(4071, 4096))
    assert_close(probs, want.values)


# ---------------------------------------------------------------- fd_loss


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_fd_loss_matches_reference(chunk, renormalize):
    hidden, weight = _student()
    ids, probs = _teacher()
    mask = _mask()
    loss, stats = fd_loss(hidden, weight, ids, probs, mask, renormalize=renormalize, chunk=chunk)
    ref = _ref_fd(hidden, weight, ids, probs, mask, renormalize=renormalize)
    ref_kl = _ref_fd(hidden, weight, ids, probs, mask, renormalize=renormalize, kl=True)
    assert loss.shape == ()
    assert_close(loss, ref)
    assert stats["tokens"] == mask.sum().item()
    assert stats["fd/kl_topk_sum"] == pytest.approx(ref_kl.item(), rel=1e-10)
    assert stats["fd/teacher_mass_sum"] == pytest.approx(probs[mask].sum().item(), rel=1e-12)
    assert all(isinstance(v, float) for v in stats.values())

    # Same gradient as the top-K KL(teacher || student): they differ by a student-independent constant.
    got = _grads(loss, hidden, weight)
    want = _grads(ref_kl, hidden, weight)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize("renormalize", [False, True])
def test_fd_loss_gradient_wrt_logits_is_top_k_kl_gradient(renormalize):
    """d loss / d z = m softmax(z) - p_T on the top K (m = top-K mass, 1 when renormalised)."""
    ids, probs = _teacher()
    logits = torch.randn(N, V, dtype=F64, generator=torch.Generator().manual_seed(6)).requires_grad_()
    eye = torch.eye(V, dtype=F64)  # hidden = logits, weight = identity: the "hidden" gradient is the logits gradient
    loss, _ = fd_loss(logits, eye, ids, probs, torch.ones(N, dtype=torch.bool), renormalize=renormalize, chunk=4)
    (grad,) = _grads(loss, logits)
    p_t = probs / probs.sum(-1, keepdim=True) if renormalize else probs
    expected = p_t.sum(-1, keepdim=True) * torch.softmax(logits.detach(), -1)
    expected = expected - torch.zeros(N, V, dtype=F64).scatter(-1, ids, p_t)
    assert_close(grad, expected)


def test_fd_loss_no_gradient_reaches_the_teacher():
    hidden, weight = _student()
    t_hidden = torch.randn(N, H, dtype=F64).requires_grad_()
    t_weight = torch.randn(V, H, dtype=F64).requires_grad_()
    ids, probs = teacher_topk(t_hidden, t_weight, k=K, chunk=5)
    assert not probs.requires_grad and not ids.requires_grad
    probs = probs.clone().requires_grad_()  # even a caller's grad-requiring tensor is detached
    loss, _ = fd_loss(hidden, weight, ids, probs, _mask(), chunk=5)
    loss.backward()
    assert t_hidden.grad is None and t_weight.grad is None and probs.grad is None
    assert hidden.grad is not None and weight.grad is not None


def test_fd_loss_masked_positions_contribute_nothing():
    hidden, weight = _student()
    ids, probs = _teacher()
    mask = _mask()
    with torch.no_grad():
        hidden[~mask] = float("nan")  # garbage where the mask is 0 must not leak
    ids = ids.masked_fill(~mask[:, None], 10**6)  # out-of-range ids there too
    loss, stats = fd_loss(hidden, weight, ids, probs, mask, chunk=6)
    ref = _ref_fd(hidden[mask], weight, ids[mask], probs[mask], torch.ones(int(mask.sum()), dtype=torch.bool))
    assert_close(loss, ref)
    assert math.isfinite(stats["fd/kl_topk_sum"])
    loss.backward()
    assert (hidden.grad[~mask] == 0).all()
    assert torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("renormalize", [False, True])
def test_fd_loss_micro_batching_is_exact(renormalize):
    """The trainer's invariant: 1 x 8 == 8 x 1 once the sums are divided by the batch's token count."""
    n = 61
    ids, probs = _teacher(n=n)
    mask = _mask(n=n)
    tokens = mask.sum()

    hidden, weight = _student(n=n)
    loss, stats = fd_loss(hidden, weight, ids, probs, mask, renormalize=renormalize, chunk=5)
    (loss / tokens).backward()
    one = (loss.detach(), stats, hidden.grad.clone(), weight.grad.clone())

    hidden, weight = _student(n=n)
    total, totals = 0.0, {}
    for part in torch.arange(n).tensor_split(8):
        sl = slice(int(part[0]), int(part[-1]) + 1)
        loss, stats = fd_loss(hidden[sl], weight, ids[sl], probs[sl], mask[sl], renormalize=renormalize, chunk=5)
        (loss / tokens).backward()
        total = total + loss.detach()
        totals = {k: totals.get(k, 0.0) + v for k, v in stats.items()}
    assert_close(total, one[0])
    assert totals == pytest.approx(one[1], rel=1e-12)
    assert_close(hidden.grad, one[2])
    assert_close(weight.grad, one[3])


def test_fd_loss_without_tokens_is_zero_and_still_backpropagates():
    hidden, weight = _student()
    ids, probs = _teacher()
    loss, stats = fd_loss(hidden, weight, ids, probs, torch.zeros(N, dtype=torch.bool))
    loss.backward()  # every rank must run backward, even on a micro-batch with nothing to learn
    assert loss.item() == 0.0 and stats["tokens"] == 0.0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("chunk", [1, 7, N])
def test_token_stats_without_gradient_match_reference(chunk):
    """The no-grad path (the GRPO reference) runs the fused row kernels instead of a checkpoint."""
    hidden, weight = _student()
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logprobs, entropy = chunked_token_stats(hidden, weight, targets, chunk=chunk)
    ref_logprobs, ref_entropy = _ref_token_stats(hidden.detach(), weight.detach(), targets)
    assert_close(logprobs, ref_logprobs)
    assert_close(entropy, ref_entropy)


# ---------------------------------------------------------------- the fused head: FD


def _ref_entropy_sum(hidden, weight, mask):
    return sum(float(-(p * p.log()).sum()) for p in torch.softmax(hidden.detach()[mask] @ weight.detach().T, -1))


@pytest.mark.parametrize("chunk", [1, 7, N])
def test_fd_loss_entropy_and_preselected_positions(chunk):
    """The student's entropy comes from the loss pass; mask=None means the positions are already selected."""
    hidden, weight = _student()
    ids, probs = _teacher()
    mask = _mask()
    loss, stats = fd_loss(hidden, weight, ids, probs, mask, chunk=chunk)
    assert stats["entropy_sum"] == pytest.approx(_ref_entropy_sum(hidden, weight, mask), rel=1e-12)
    got = _grads(loss, hidden, weight)

    h = hidden.detach()[mask].requires_grad_()
    loss2, stats2 = fd_loss(h, weight, ids[mask], probs[mask], None, chunk=chunk)
    assert_close(loss2, loss)
    assert stats2 == pytest.approx(stats, rel=1e-12)
    (gh, gw) = _grads(loss2, h, weight)
    assert_close(gh, got[0][mask])
    assert (got[0][~mask] == 0).all()
    assert_close(gw, got[1])


def test_fd_loss_repeated_teacher_ids_match_autograd():
    """Ids from `teacher_topk` are distinct; a caller's repeated id still gets autograd's gradient (summed)."""
    hidden, weight = _student()
    ids, probs = _teacher()
    ids = ids.clone()
    ids[:, 1] = ids[:, 0]
    ids[::3, 4] = ids[::3, 0]
    mask = _mask()
    loss, _ = fd_loss(hidden, weight, ids, probs, mask, chunk=5)
    ref = _ref_fd(hidden, weight, ids, probs, mask)
    assert_close(loss, ref)
    for g, w in zip(_grads(loss, hidden, weight), _grads(ref, hidden, weight), strict=True):
        assert_close(g, w)


class _MatmulCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss_fn", ["fd", "grpo"])
def test_fused_head_runs_three_matmuls_per_chunk_and_backward_only_scales(loss_fn):
    """Forward: logits, g @ W and g^T h per chunk; backward: no matmul, the stored gradients times
    the upstream gradient. (The checkpointed reference needs four per chunk.)"""
    hidden, weight = _student()
    ids, probs = _teacher()
    targets = ids[:, 0]
    mask, chunk = _mask(), 6
    n_chunks = math.ceil(int(mask.sum()) / chunk)

    def loss_of():
        if loss_fn == "fd":
            return fd_loss(hidden, weight, ids, probs, mask, chunk=chunk)[0]
        adv = torch.linspace(-1, 1, N, dtype=F64)
        return grpo_head_loss(hidden, weight, targets, None, adv, mask, chunk=chunk)[0]

    with _MatmulCounter() as forward:
        loss = loss_of()
    with _MatmulCounter() as backward:
        (2.5 * loss).backward()
    assert forward.count == 3 * n_chunks and backward.count == 0
    scaled = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    loss_of().backward()
    assert_close(scaled[0], 2.5 * hidden.grad)
    assert_close(scaled[1], 2.5 * weight.grad)

    with _MatmulCounter() as reference:
        chunked_token_stats(hidden, weight, targets, chunk=chunk)[0].sum().backward()
    assert reference.count == 4 * math.ceil(N / chunk)


def test_fused_head_keeps_no_graph_to_retain():
    hidden, weight = _student()
    ids, probs = _teacher()
    loss, _ = fd_loss(hidden, weight, ids, probs, _mask(), chunk=7)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_fused_head_computes_only_the_gradients_asked_for():
    hidden, weight = _student()
    ids, probs = _teacher()
    mask = _mask()
    frozen = weight.detach()
    loss, _ = fd_loss(hidden, frozen, ids, probs, mask, chunk=7)
    (gh,) = _grads(loss, hidden)
    assert_close(gh, _grads(_ref_fd(hidden, frozen, ids, probs, mask), hidden)[0])
    with _MatmulCounter() as counter:  # no gradient wanted: the logits alone, no gradient products
        with torch.no_grad():
            value, _ = fd_loss(hidden, weight, ids, probs, mask, chunk=7)
    assert not value.requires_grad and counter.count == math.ceil(int(mask.sum()) / 7)
    assert_close(value, loss.detach())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fd_loss_in_low_precision_is_close_to_float64(dtype, tol):
    """bf16 logits and gradient chunks (as on GPU), fp32 softmax: within bf16 rounding of the float64 values."""
    hidden, weight = _student()
    ids, probs = _teacher()
    mask = _mask()
    ref, _ = fd_loss(hidden, weight, ids, probs, mask, chunk=7)
    want = _grads(ref, hidden, weight)
    h, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
    loss, _ = fd_loss(h, w, ids, probs.float(), mask, chunk=7)
    assert loss.dtype == torch.float32 and h.dtype == dtype
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    for g, x, wnt in zip(_grads(loss, h, w), (h, w), want, strict=True):
        assert g.dtype == x.dtype
        assert float((g.double() - wnt).norm() / wnt.norm()) < tol


def test_fd_loss_upcasts_low_precision_teacher_probabilities_before_summing():
    """A bf16 teacher's probabilities count as the same values in fp32: no bf16 sums in the loss, its
    gradient or the statistics."""
    hidden, weight = _student()
    ids, probs = _teacher()
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    low = probs.bfloat16()
    for renormalize in (False, True):
        loss, stats = fd_loss(h, w, ids, low, _mask(), renormalize=renormalize, chunk=7)
        want, want_stats = fd_loss(h, w, ids, low.float(), _mask(), renormalize=renormalize, chunk=7)
        assert loss.item() == want.item() and stats == want_stats
        for got, expected in zip(_grads(loss, h, w), _grads(want, h, w), strict=True):
            assert torch.equal(got, expected)


# ---------------------------------------------------------------- the fused head: GRPO


def _ref_grpo_head(hidden, weight, targets, ref, adv, mask, chunk=5):
    logprobs, entropy = chunked_token_stats(hidden, weight, targets, chunk=chunk)
    loss, stats = grpo_loss(logprobs, logprobs.detach(), ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    return loss, {**stats, "entropy_sum": float(entropy[mask.bool()].sum())}


@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_grpo_head_loss_matches_unfused(chunk, with_ref):
    hidden, weight = _student()
    g = torch.Generator().manual_seed(12)
    targets = torch.randint(0, V, (N,), generator=g)
    ref = -3 * torch.rand(N, generator=g, dtype=F64) if with_ref else None
    adv = torch.randn(N, generator=g, dtype=F64)
    mask = _mask()
    loss, stats = grpo_head_loss(hidden, weight, targets, ref, adv, mask, clip_eps=0.2, kl_coef=0.1, chunk=chunk)
    want, want_stats = _ref_grpo_head(hidden, weight, targets, ref, adv, mask)
    assert_close(loss, want)
    assert stats == pytest.approx(want_stats, rel=1e-12)
    assert ("grpo/kl_sum" in stats) == with_ref
    for got, expected in zip(_grads(loss, hidden, weight), _grads(want, hidden, weight), strict=True):
        assert_close(got, expected)


def test_grpo_head_loss_without_gradient_gives_the_same_value_and_stats():
    """Under no_grad (an evaluation of the loss) the head computes no gradient and the value is unchanged."""
    hidden, weight = _student()
    g = torch.Generator().manual_seed(12)
    targets = torch.randint(0, V, (N,), generator=g)
    ref, adv = -3 * torch.rand(N, generator=g, dtype=F64), torch.randn(N, generator=g, dtype=F64)
    want, want_stats = grpo_head_loss(hidden, weight, targets, ref, adv, _mask(), kl_coef=0.1, chunk=7)
    with torch.no_grad():
        loss, stats = grpo_head_loss(hidden, weight, targets, ref, adv, _mask(), kl_coef=0.1, chunk=7)
    assert not loss.requires_grad
    assert loss.item() == want.item() and stats == want_stats


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grpo_head_loss_in_low_precision_is_close_to_float64(dtype, tol):
    """bf16 logits and gradient chunks (as on GPU), fp32 log-probabilities: within bf16 rounding of float64."""
    hidden, weight = _student()
    g = torch.Generator().manual_seed(12)
    targets = torch.randint(0, V, (N,), generator=g)
    ref, adv = -3 * torch.rand(N, generator=g, dtype=F64), torch.randn(N, generator=g, dtype=F64)
    want, _ = grpo_head_loss(hidden, weight, targets, ref, adv, _mask(), kl_coef=0.1, chunk=7)
    want_grads = _grads(want, hidden, weight)
    h, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
    loss, _ = grpo_head_loss(h, w, targets, ref.float(), adv.float(), _mask(), kl_coef=0.1, chunk=7)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), rel=tol)
    for got, x, expected in zip(_grads(loss, h, w), (h, w), want_grads, strict=True):
        assert got.dtype == x.dtype
        assert float((got.double() - expected).norm() / expected.norm()) < tol


def test_grpo_head_loss_micro_batching_and_empty_batches():
    n = 61
    hidden, weight = _student(n=n)
    g = torch.Generator().manual_seed(13)
    targets = torch.randint(0, V, (n,), generator=g)
    ref, adv, mask = -3 * torch.rand(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64), _mask(n=n)
    tokens = mask.sum()
    loss, stats = grpo_head_loss(hidden, weight, targets, ref, adv, mask, chunk=4)
    one = _grads(loss / tokens, hidden, weight)
    totals, grads = {}, [torch.zeros_like(hidden), torch.zeros_like(weight)]
    for part in torch.arange(n).tensor_split(8):
        sl = slice(int(part[0]), int(part[-1]) + 1)
        loss_p, stats_p = grpo_head_loss(hidden[sl], weight, targets[sl], ref[sl], adv[sl], mask[sl], chunk=4)
        for acc, gr in zip(grads, _grads(loss_p / tokens, hidden, weight), strict=True):
            acc += gr
        totals = {k: totals.get(k, 0.0) + v for k, v in stats_p.items()}
    assert totals == pytest.approx(stats, rel=1e-12)
    for a, b in zip(grads, one, strict=True):
        assert_close(a, b)

    loss, stats = grpo_head_loss(hidden, weight, targets, ref, adv, torch.zeros(n, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and stats["tokens"] == 0.0 and stats["entropy_sum"] == 0.0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


# ---------------------------------------------------------------- memory: the head sees at most `chunk` rows


class _LogitProbe(TorchDispatchMode):
    """Watches every [rows, V]-sized tensor that an op produces, forward or backward: the most rows
    of one tensor, and the most rows alive at once (through weak references)."""

    def __init__(self, v: int, h: int):
        super().__init__()
        self.v, self.h, self.max_rows, self.max_live_rows, self._refs = v, h, 0, 0, []

    def live_rows(self) -> int:
        return sum(t.numel() // self.v for ref in self._refs if (t := ref()) is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            # The weight, its transpose and its gradient are [V, H]-sized and exempt.
            if isinstance(t, torch.Tensor) and self.v in t.shape and sorted(t.shape) != sorted((self.v, self.h)):
                self.max_rows = max(self.max_rows, t.numel() // self.v)
                self._refs.append(weakref.ref(t))
        self.max_live_rows = max(self.max_live_rows, self.live_rows())
        return out


@pytest.mark.parametrize("chunk", [1, 7])
def test_logits_are_bounded_by_chunk_rows(chunk):
    """No op sees more than `chunk` rows of logits, none outlive the forward pass (checkpointing),
    and backward recomputes one chunk at a time."""
    n, h, v, k = 40, 6, 53, 5  # all distinct, so a [rows, V] tensor is recognisable
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    ids, probs = teacher_topk(hidden, weight, k=k, chunk=chunk)
    mask = torch.ones(n, dtype=torch.bool)

    with _LogitProbe(v, h) as probe:  # the probe itself: one chunk of all rows is seen
        teacher_topk(hidden, weight, k=k, chunk=n)
    assert probe.max_rows == n

    for call in (
        lambda: teacher_topk(hidden, weight, k=k, chunk=chunk)[1].sum(),
        lambda: chunked_token_stats(hidden, weight, targets, chunk=chunk)[0].sum(),
        lambda: chunked_token_stats(hidden, weight.detach(), targets, chunk=chunk)[0].sum(),  # a frozen head
        lambda: fd_loss(hidden, weight, ids, probs, mask, chunk=chunk)[0],
    ):
        with _LogitProbe(v, h) as probe:
            loss = call()
            assert probe.live_rows() == 0  # nothing of vocabulary size is kept for backward
            if loss.requires_grad:
                loss.backward()
        assert 0 < probe.max_rows <= chunk
        assert probe.max_live_rows <= 4 * chunk < n  # logits, log-softmax and their gradients: one chunk's worth


# ---------------------------------------------------------------- group_advantages


def test_group_advantages_hand_built():
    rewards = torch.tensor([[1.0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0.3, 0.3, 0.3, 0.3, 0.3]], dtype=F64)
    adv = group_advantages(rewards)
    row = [1.0, 0, 0, 0, 0]
    mean, std = statistics.mean(row), statistics.stdev(row)  # stdev: the unbiased (n - 1) std
    assert std == pytest.approx(math.sqrt(0.2))
    assert adv[0].tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in row], rel=1e-12)
    assert adv[0, 0].item() == pytest.approx(0.8 / math.sqrt(0.2), rel=1e-5)  # not 0.8 / sqrt(0.16)
    assert (adv[1:] == 0).all()  # constant groups: exactly 0, no NaN, no rounding residue
    assert_close(adv.sum(-1), torch.zeros(4, dtype=F64))


def test_group_advantages_constant_groups_are_exactly_zero():
    for dtype in (torch.float32, F64):
        rewards = torch.rand(500, 1, generator=torch.Generator().manual_seed(11), dtype=dtype).expand(500, 5)
        assert (rewards - rewards.mean(-1, keepdim=True)).ne(0).any()  # the mean does not round-trip exactly...
        assert group_advantages(rewards).eq(0).all()  # ...yet no residue / eps survives
        assert group_advantages(rewards, normalize_std=False).eq(0).all()


def test_group_advantages_without_std_and_matches_reference():
    rewards = torch.rand(6, 5, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert_close(group_advantages(rewards, normalize_std=False), rewards - rewards.mean(-1, keepdim=True))
    adv = group_advantages(rewards, eps=0.0)
    for gi in range(6):
        row = rewards[gi].tolist()
        want = [(r - statistics.mean(row)) / statistics.stdev(row) for r in row]
        assert adv[gi].tolist() == pytest.approx(want, rel=1e-10)
    pair = group_advantages(torch.tensor([[1.0, 0.0]], dtype=F64), eps=0.0)  # std sqrt(0.5 / 1), not / 2
    assert pair[0].tolist() == pytest.approx([math.sqrt(0.5), -math.sqrt(0.5)], rel=1e-12)
    lone = torch.tensor([[1.0], [0.0]])  # a group of one sample has no baseline to beat
    assert group_advantages(lone).eq(0).all() and group_advantages(lone, normalize_std=False).eq(0).all()


# ---------------------------------------------------------------- k3_kl and grpo_loss


def test_k3_kl():
    g = torch.Generator().manual_seed(9)
    logp, ref = -3 * torch.rand(100, generator=g, dtype=F64), -3 * torch.rand(100, generator=g, dtype=F64)
    k3 = k3_kl(logp, ref)
    assert (k3 >= 0).all()
    assert_close(k3, torch.exp(ref - logp) - (ref - logp) - 1)
    assert (k3_kl(logp, logp) == 0).all()
    assert k3_kl(torch.tensor([0.0], dtype=F64), torch.tensor([math.log(2)], dtype=F64)).item() == pytest.approx(
        1 - math.log(2)
    )
    assert k3_kl(torch.tensor([0.0], dtype=F64), torch.tensor([1e-9], dtype=F64)).item() == pytest.approx(5e-19)


# (ratio, advantage) -> (loss, d loss / d logp, clipped?) with clip_eps = 0.2
CLIP_CASES = [
    (1.5, 1.0, -1.2, 0.0, True),  # A > 0, r above 1 + eps: clipped, no gradient
    (1.5, -1.0, 1.5, 1.5, False),  # A < 0, r above: the unclipped term is the min
    (0.5, -1.0, 0.8, 0.0, True),  # A < 0, r below 1 - eps: clipped, no gradient
    (0.5, 1.0, -0.5, -0.5, False),  # A > 0, r below: unclipped
    (1.1, 2.0, -2.2, -2.2, False),  # inside the range
    (1.5, 0.0, 0.0, 0.0, False),  # zero advantage
]


@pytest.mark.parametrize(("ratio", "adv", "loss_want", "grad_want", "clipped"), CLIP_CASES)
def test_grpo_clipping_hand_built(ratio, adv, loss_want, grad_want, clipped):
    logp = torch.tensor([math.log(ratio)], dtype=F64, requires_grad=True)
    old = torch.zeros(1, dtype=F64)
    loss, stats = grpo_loss(logp, old, None, torch.tensor([adv], dtype=F64), torch.ones(1), clip_eps=0.2)
    (grad,) = _grads(loss, logp)
    assert loss.item() == pytest.approx(loss_want)
    assert grad.item() == pytest.approx(grad_want)
    assert stats["grpo/clip_frac_sum"] == float(clipped)
    assert stats["grpo/ratio_sum"] == pytest.approx(ratio)
    assert stats["tokens"] == 1.0


def _grpo_inputs(seed: int = 10, n: int = N):
    g = torch.Generator().manual_seed(seed)
    logp = (-2 * torch.rand(n, generator=g, dtype=F64)).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(n, generator=g, dtype=F64)  # ratios on both sides of the clip range
    ref = logp.detach() + 0.3 * torch.randn(n, generator=g, dtype=F64)
    adv = torch.randn(n, generator=g, dtype=F64)
    return logp, old, ref, adv, _mask(seed, n)


def test_grpo_loss_matches_reference():
    logp, old, ref, adv, mask = _grpo_inputs()
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    want = _ref_grpo(logp, old, ref, adv, mask, 0.2, 0.1)
    assert_close(loss, want)
    assert_close(_grads(loss, logp)[0], _grads(want, logp)[0])
    r = torch.exp(logp.detach() - old)[mask]
    a = adv[mask]
    assert 0 < stats["grpo/clip_frac_sum"] < mask.sum().item()
    assert stats["grpo/clip_frac_sum"] == ((a > 0) & (r > 1.2) | (a < 0) & (r < 0.8)).sum().item()
    assert stats["grpo/ratio_sum"] == pytest.approx(r.sum().item())
    assert stats["grpo/kl_sum"] == pytest.approx(k3_kl(logp.detach(), ref)[mask].sum().item())
    assert stats["tokens"] == mask.sum().item()


def test_grpo_without_reference_drops_the_kl():
    logp, old, ref, adv, mask = _grpo_inputs()
    without, stats = grpo_loss(logp, old, None, adv, mask, kl_coef=0.1)
    with_kl, _ = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.1)
    no_coef, _ = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.0)
    assert "grpo/kl_sum" not in stats
    assert_close(without, no_coef)
    assert_close(with_kl - without, 0.1 * k3_kl(logp, ref)[mask].sum())
    assert_close(without, _ref_grpo(logp, old, None, adv, mask, 0.2, 0.1))


def test_grpo_masked_positions_contribute_nothing():
    logp, old, ref, adv, mask = _grpo_inputs()
    old = old.masked_fill(~mask, -1e4)  # exp overflows to inf where the mask is 0
    loss, stats = grpo_loss(logp, old, ref, adv, mask)
    assert math.isfinite(loss.item()) and math.isfinite(stats["grpo/ratio_sum"])
    (grad,) = _grads(loss, logp)
    assert (grad[~mask] == 0).all() and torch.isfinite(grad).all()


def test_grpo_micro_batching_is_exact():
    logp, old, ref, adv, mask = _grpo_inputs(n=61)
    tokens = mask.sum()
    loss, stats = grpo_loss(logp, old, ref, adv, mask)
    (grad_one,) = _grads(loss / tokens, logp)
    total, totals, grad = 0.0, {}, torch.zeros_like(grad_one)
    for sl in torch.arange(61).tensor_split(8):
        part, part_stats = grpo_loss(logp[sl], old[sl], ref[sl], adv[sl], mask[sl])
        grad += _grads(part / tokens, logp)[0]
        total = total + part.detach()
        totals = {k: totals.get(k, 0.0) + v for k, v in part_stats.items()}
    assert_close(total, loss.detach())
    assert totals == pytest.approx(stats, rel=1e-12)
    assert_close(grad, grad_one)


def test_grpo_without_tokens_is_zero_and_still_backpropagates():
    logp, old, ref, adv, _ = _grpo_inputs()
    loss, stats = grpo_loss(logp, old, ref, adv, torch.zeros(N))
    (grad,) = _grads(loss, logp)
    assert loss.item() == 0.0 and stats["tokens"] == 0.0 and (grad == 0).all()
