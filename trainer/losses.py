"""Loss and advantage math for Feedback Distillation (FD) and GRPO: pure tensor functions, no I/O.

Shapes: every per-token tensor is flattened over token positions, N = number of positions.
The trainer selects the positions it needs, calls these functions per micro-batch and
divides the summed losses by the token count of the whole batch, so gradient accumulation
over micro-batches equals one big batch (1 x 8 == 8 x 1).

Memory: full-vocabulary logits for one 8,192-token sequence are 8,192 x 151,936 x 4 bytes
= 5 GB in fp32. Functions that need logits therefore take the final hidden states and the
LM head weight and compute `hidden_chunk @ weight.T` for `chunk` rows at a time, in the
inputs' dtype, upcasting only those logits to fp32 (at least) for the softmax. The two
training losses, `fd_loss` and `grpo_head_loss`, run through `trainer.lm_head.fused_head`:
each chunk's loss gradient is reduced to the hidden and weight gradients in the forward
pass (three head matmuls, nothing of vocabulary size kept), and the entropy comes from the
same pass. `chunked_token_stats` with gradients recomputes each chunk in backward
(activation checkpointing): the plain reference for those two.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trainer.lm_head import (
    chunks,
    compute_dtype,
    fused_head,
    logits,
    scaled_softmax,
    softmax_stats,
    top_k_and_logsumexp,
    upcast,
)


def _select(mask: Tensor | None, *tensors: Tensor) -> list[Tensor]:
    """The rows where `mask` is 1 (all rows for None): masked positions are dropped before any
    logit is computed, so they contribute exactly nothing, even if they hold garbage."""
    if mask is None:
        return list(tensors)
    keep = mask.bool()
    return [t[keep] for t in tensors]


def _token_logprobs(z: Tensor, lse: Tensor, ids: Tensor) -> Tensor:
    """log softmax(z) at `ids` ([c] or [c, K]), in lse's dtype."""
    if ids.dim() == 1:
        return z.gather(-1, ids[:, None]).squeeze(-1).to(lse.dtype) - lse
    return z.gather(-1, ids).to(lse.dtype) - lse[:, None]


def chunked_token_stats(
    hidden: Tensor, weight: Tensor, target_ids: Tensor, *, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """Log-probability of each target token and the full-vocabulary entropy, per position.

    Args:
        hidden: [N, H] final hidden states (after the final norm).
        weight: [V, H] LM head weight.
        target_ids: [N] long, the token whose log-probability is wanted at each position
            (for a causal LM: the next token).
        chunk: rows of logits computed at once.

    Returns:
        logprobs: [N], differentiable w.r.t. `hidden` and `weight` (each chunk is recomputed
            in backward); without gradients (the GRPO reference), one pass of fused kernels.
        entropy: [N], detached, `-sum_v p(v) log p(v)` over the whole vocabulary.
    Both in the compute dtype (fp32, or fp64 for fp64 inputs).
    """

    def one_chunk(h: Tensor, w: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(upcast(logits(h, w)), dim=-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy

    def no_grad_chunk(h: Tensor, w: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        z = logits(h, w)
        lse, entropy = softmax_stats(z)
        return _token_logprobs(z, lse, ids), entropy

    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logprobs, entropies = [], []
    for sl in chunks(hidden.shape[0], chunk):
        args = (hidden[sl], weight, target_ids[sl])
        lp, ent = checkpoint(one_chunk, *args, use_reentrant=False) if differentiable else no_grad_chunk(*args)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs), torch.cat(entropies).detach()


@torch.no_grad()
def teacher_topk(hidden: Tensor, weight: Tensor, *, k: int = 25, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The teacher's k most likely tokens per position and their probabilities.

    The top k of the logits are those of the log-softmax, so the chunk's logits are ranked
    in their own dtype (`top_k`: within the segments of the row with the largest maxima) and
    only the log-sum-exp reads them upcast: no fp32 [c, V] copy.

    Args:
        hidden: [N, H] teacher final hidden states at the positions aligned with the student's.
        weight: [V, H] teacher LM head weight.
        k: how many tokens to keep (the paper uses 25).
        chunk: rows of logits computed at once.

    Returns:
        ids: [N, k] long, in decreasing probability.
        probs: [N, k], probabilities under the FULL-vocabulary softmax (not renormalised, so
            a row sums to the top-k mass <= 1), in the compute dtype (fp32, or fp64 for fp64
            inputs). Neither carries gradient.
    """
    ids, probs = [], []
    for sl in chunks(hidden.shape[0], chunk):
        top_z, top_ids, lse = top_k_and_logsumexp(logits(hidden[sl], weight), k)
        ids.append(top_ids)
        probs.append(torch.exp(top_z.to(compute_dtype(hidden, weight)) - lse[:, None]))
    return torch.cat(ids), torch.cat(probs)


def fd_loss(
    hidden: Tensor,
    weight: Tensor,
    topk_ids: Tensor,
    topk_probs: Tensor,
    mask: Tensor | None,
    *,
    renormalize: bool = False,
    chunk: int = 1024,
) -> tuple[Tensor, dict[str, float]]:
    """Feedback Distillation loss: the top-K truncated teacher-student cross-entropy, summed.

    loss = sum_{t: mask_t = 1} -sum_{a in topK_t} p_T(a | t) log p_S(a | t)

    The gradient w.r.t. the student (its logits, hence `hidden` and `weight`) equals that of
    the top-K restricted KL, sum_{a in topK} p_T(a) (log p_T(a) - log p_S(a)): the two differ
    by sum_a p_T(a) log p_T(a), which does not depend on the student (paper, appendix B).
    Per position, d loss / d z_v = m p_S(v) - p_T(v) [v in topK], with m the teacher's
    top-K mass (1 when renormalised). The loss is therefore minimised by p_S = p_T / m on the top K and 0
    elsewhere, with or without renormalisation: renormalising only reweights position t
    by 1 / m_t. That gradient is computed in the forward pass, chunk by chunk
    (`trainer.lm_head.fused_head`), together with the student's entropy.

    Args:
        hidden: [N, H] student final hidden states.
        weight: [V, H] student LM head weight.
        topk_ids: [N, K] long, the teacher's top-K token ids (see `teacher_topk`).
        topk_probs: [N, K] their teacher probabilities; detached here, no gradient reaches
            the teacher.
        mask: [N] bool or 0/1: 1 on the model-generated tokens that are trained on; None when
            every position is. Other positions are dropped before any logit is computed, so
            they contribute exactly nothing to the value or the gradient.
        renormalize: renormalise p_T over the top K first (off in the paper).
        chunk: rows of logits computed at once.

    Returns:
        loss: scalar SUM over masked positions (the caller divides by the token count of
            the whole batch, so micro-batching is exact).
        stats: floats, sums over masked positions:
            `fd/kl_topk_sum`: sum_a p_T(a) (log p_T(a) - log p_S(a)) over the top K, with
                p_T renormalised when `renormalize`. Not a true divergence: it can be
                negative when the student puts more mass on the top K than the teacher.
            `fd/teacher_mass_sum`: the teacher's top-K mass (before any renormalisation).
            `entropy_sum`: the student's full-vocabulary entropy.
            `tokens`: the number of masked positions.
    """
    h, ids, mass = _select(mask, hidden, topk_ids, topk_probs.detach())
    mass = mass.to(compute_dtype(hidden, weight))
    p_t = mass / mass.sum(-1, keepdim=True) if renormalize else mass

    def rows(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        ids_c, p_c = ids[sl], p_t[sl]
        lse, entropy = softmax_stats(z)
        logq = _token_logprobs(z, lse, ids_c)  # [c, K] student log-probs of the teacher's top K
        grad = None
        if want_grad:  # m p_S - p_T on the top K; a repeated id gets the sum of its p_T, as autograd would
            m = p_c.sum(-1)
            grad = scaled_softmax(z, lse, m)
            same = ids_c[:, :, None] == ids_c[:, None, :]
            top = m[:, None] * logq.exp() - (same * p_c[:, None, :]).sum(-1)
            grad.scatter_(1, ids_c, top.to(grad.dtype))
        return -(p_c * logq).sum(), grad, (entropy,)

    loss, entropy = fused_head(h, weight, rows, chunk=chunk)
    # KL = cross-entropy - teacher entropy over the top K; xlogy makes 0 log 0 = 0.
    stats = {
        "fd/kl_topk_sum": float(loss.detach() + torch.xlogy(p_t, p_t).sum()),
        "fd/teacher_mass_sum": float(mass.sum()),
        "entropy_sum": float(entropy.sum()),
        "tokens": float(h.shape[0]),
    }
    return loss, stats


def group_advantages(rewards: Tensor, *, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: each reward minus its group's mean, over the group's std if asked.

    Uses the unbiased std (Bessel's correction, divisor S - 1), like `torch.std`'s
    default and the GRPO implementations in TRL and verl; A = (r - mean) / (std + eps).
    A constant group (e.g. all proofs failed), and so a group of one sample, gets
    advantage exactly 0: no NaN, no rounding residue divided by eps.

    Args:
        rewards: [G, S], G groups (prompts) of S samples each.
        normalize_std: divide by the group std.
        eps: added to the std.

    Returns:
        [G, S] advantages, same dtype as `rewards`.
    """
    adv = rewards - rewards.mean(-1, keepdim=True)
    if normalize_std:
        # max(S - 1, 1): a lone sample has std 0 (then advantage 0) rather than torch.std's NaN.
        std = (adv.square().sum(-1, keepdim=True) / max(rewards.shape[-1] - 1, 1)).sqrt()
        adv = adv / (std + eps)
    constant = rewards.amax(-1, keepdim=True) == rewards.amin(-1, keepdim=True)
    return adv.masked_fill(constant, 0.0)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || ref) on samples from the policy (Schulman, 2020).

    k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, zero iff logp == ref; unbiased, and its
    gradient w.r.t. logp is 1 - exp(ref - logp).

    Args:
        logprobs: [N] policy log-probabilities of the sampled tokens.
        ref_logprobs: [N] reference-policy log-probabilities of the same tokens.

    Returns:
        [N] k3 values.
    """
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d  # expm1 keeps precision when d is small


def _grpo_terms(
    logp: Tensor, old: Tensor, ref: Tensor | None, adv: Tensor, clip_eps: float, kl_coef: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The clipped policy-gradient loss with its k3 penalty, summed, on already selected tokens,
    and the tensors of its statistics: (loss, clipped count, ratio sum, k3 sum or None)."""
    adv = adv.to(logp.dtype)
    ratio = torch.exp(logp - old.detach())
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped).sum()
    kl = None
    if ref is not None:
        kl = k3_kl(logp, ref.detach())
        loss = loss + kl_coef * kl.sum()
        kl = kl.detach().sum()
    return loss, (clipped < unclipped).sum(), ratio.detach().sum(), kl


def _grpo_stats(clipped: Tensor, ratio: Tensor, kl: Tensor | None, tokens: int) -> dict[str, float]:
    stats = {"grpo/clip_frac_sum": float(clipped), "grpo/ratio_sum": float(ratio), "tokens": float(tokens)}
    if kl is not None:
        stats["grpo/kl_sum"] = float(kl)
    return stats


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    kl_coef: float = 0.001,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with a k3 KL penalty, summed over tokens.

    loss = sum_{t: mask_t = 1} -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) + kl_coef k3_t,
    r_t = exp(logp_t - old_t). Summing over tokens (the caller divides by the batch's total
    token count) is the DAPO-style token-level mean: long responses weigh per token, not
    per sequence. Where the clipped term is the smaller one (A > 0 and r > 1 + eps, or
    A < 0 and r < 1 - eps) the policy-gradient term has zero gradient.

    Args:
        logprobs: [N] current policy log-probabilities of the sampled tokens (differentiable).
        old_logprobs: [N] log-probabilities of the policy that sampled them.
        ref_logprobs: [N] reference (initial) policy log-probabilities, or None for no KL term.
        advantages: [N] per-token advantages (the sequence's advantage, broadcast).
        mask: [N] bool or 0/1: 1 on model-generated tokens; other positions are dropped
            first and contribute nothing to the value or the gradient.
        clip_eps: the PPO clip range.
        kl_coef: weight of the k3 penalty.

    Returns:
        loss: scalar SUM over masked tokens.
        stats: floats, sums over masked tokens: `grpo/clip_frac_sum` (tokens whose clipped
            term is active), `grpo/ratio_sum`, `grpo/kl_sum` (k3, only when `ref_logprobs`
            is given), `tokens`.
    """
    logp, old, adv = _select(mask, logprobs, old_logprobs, advantages)
    ref = None if ref_logprobs is None else _select(mask, ref_logprobs)[0]
    loss, clipped, ratio, kl = _grpo_terms(logp, old, ref, adv, clip_eps, kl_coef)
    return loss, _grpo_stats(clipped, ratio, kl, logp.shape[0])


def grpo_head_loss(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor | None,
    *,
    clip_eps: float = 0.2,
    kl_coef: float = 0.001,
    chunk: int = 1024,
) -> tuple[Tensor, dict[str, float]]:
    """`grpo_loss` of the policy's own log-probabilities, computed from the hidden states with
    the LM head fused in (`trainer.lm_head.fused_head`): the value and gradient of
    `grpo_loss(lp, lp.detach(), ref_logprobs, advantages, mask)` with
    `lp = chunked_token_stats(hidden, weight, target_ids)[0]`, i.e. the "old" policy is the
    current one, as in a single update per rollout batch.

    The loss is a sum of per-token terms f_t(logp_t), so per chunk d loss / d z_t =
    f_t'(logp_t) (onehot(target_t) - p_t): f_t' comes from autograd on the chunk's [c]
    log-probabilities, and the [c, V] part is reduced to the hidden and weight gradients in
    the forward pass like FD's.

    Args:
        hidden: [N, H] policy final hidden states.
        weight: [V, H] policy LM head weight.
        target_ids: [N] long, the sampled tokens.
        ref_logprobs: [N] reference-policy log-probabilities of them, or None for no KL term.
        advantages: [N] per-token advantages.
        mask: [N] 1 on trained tokens, or None when every position is.

    Returns:
        loss: scalar SUM over masked tokens.
        stats: as `grpo_loss`'s, plus `entropy_sum`, the policy's full-vocabulary entropy.
    """
    h, targets, adv = _select(mask, hidden, target_ids, advantages)
    ref = None if ref_logprobs is None else _select(mask, ref_logprobs)[0]

    def rows(z: Tensor, sl: slice, want_grad: bool) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        lse, entropy = softmax_stats(z)
        logp = _token_logprobs(z, lse, targets[sl])
        with torch.enable_grad():
            leaf = logp.detach().requires_grad_(want_grad)
            loss, clipped, ratio, kl = _grpo_terms(leaf, leaf.detach(), None if ref is None else ref[sl], adv[sl],
                                                   clip_eps, kl_coef)
            slope = torch.autograd.grad(loss, leaf)[0] if want_grad else None
        grad = None
        if want_grad:  # slope (onehot - p): -slope p everywhere, slope (1 - p) at the target
            grad = scaled_softmax(z, lse, -slope)
            grad.scatter_(1, targets[sl, None], (slope * -torch.expm1(logp)).to(grad.dtype)[:, None])
        extra = () if kl is None else (kl[None],)
        return loss.detach(), grad, (entropy, clipped[None], ratio[None], *extra)

    loss, entropy, clipped, ratio, *kl = fused_head(h, weight, rows, chunk=chunk)
    stats = _grpo_stats(clipped.sum(), ratio.sum(), kl[0].sum() if kl else None, h.shape[0])
    stats["entropy_sum"] = float(entropy.sum())
    return loss, stats
