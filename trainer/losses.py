"""Loss and advantage math for Feedback Distillation (FD) and GRPO: pure tensor functions, no I/O.

Shapes: every per-token tensor is flattened over token positions, N = number of positions.
The trainer selects the positions it needs, calls these functions per micro-batch and
divides the summed losses by the token count of the whole batch, so gradient accumulation
over micro-batches equals one big batch (1 x 8 == 8 x 1).

Memory: full-vocabulary logits for one 8,192-token sequence are 8,192 x 151,936 x 4 bytes
= 5 GB in fp32. Functions that need logits therefore take the final hidden states and the
LM head weight and compute `hidden_chunk @ weight.T` for `chunk` rows at a time, in the
inputs' dtype, upcasting only those logits to fp32 (at least) for the softmax. With
gradients, each chunk runs under non-reentrant activation checkpointing, so backward
recomputes one chunk's logits at a time instead of keeping all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 inputs (tests) stay fp64."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def _chunks(n: int, chunk: int) -> list[slice]:
    """Row slices of at most `chunk` rows; one empty slice when n == 0, so a micro-batch
    without tokens still builds a graph that reaches `hidden` and `weight` (zero loss,
    zero gradients) and backward runs on every rank."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [slice(s, s + chunk) for s in range(0, max(n, 1), chunk)]


def _log_softmax_chunk(hidden: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """[c, H], [V, H] -> [c, V] log-probabilities in `dtype`.

    The product runs in the inputs' own dtype (bf16 on GPU: tensor cores, fp32 accumulation,
    no fp32 copy of the head); only the [c, V] logits are upcast before the softmax."""
    return torch.log_softmax(F.linear(hidden, weight.to(hidden.dtype)).to(dtype), dim=-1)


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
        logprobs: [N], differentiable w.r.t. `hidden` and `weight`.
        entropy: [N], detached, `-sum_v p(v) log p(v)` over the whole vocabulary.
    Both in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    dtype = _compute_dtype(hidden, weight)

    def one_chunk(h: Tensor, w: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        logp = _log_softmax_chunk(h, w, dtype)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy

    logprobs, entropies = [], []
    for sl in _chunks(hidden.shape[0], chunk):
        lp, ent = checkpoint(one_chunk, hidden[sl], weight, target_ids[sl], use_reentrant=False)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs), torch.cat(entropies).detach()


@torch.no_grad()
def teacher_topk(hidden: Tensor, weight: Tensor, *, k: int = 25, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The teacher's k most likely tokens per position and their probabilities.

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
    dtype = _compute_dtype(hidden, weight)
    ids, probs = [], []
    for sl in _chunks(hidden.shape[0], chunk):
        top_logp, top_ids = _log_softmax_chunk(hidden[sl], weight, dtype).topk(k, dim=-1)
        ids.append(top_ids)
        probs.append(top_logp.exp())
    return torch.cat(ids), torch.cat(probs)


def fd_loss(
    hidden: Tensor,
    weight: Tensor,
    topk_ids: Tensor,
    topk_probs: Tensor,
    mask: Tensor,
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
    by 1 / m_t.

    Args:
        hidden: [N, H] student final hidden states.
        weight: [V, H] student LM head weight.
        topk_ids: [N, K] long, the teacher's top-K token ids (see `teacher_topk`).
        topk_probs: [N, K] their teacher probabilities; detached here, no gradient reaches
            the teacher.
        mask: [N] bool or 0/1: 1 on the model-generated tokens that are trained on. Other
            positions are dropped before any logit is computed, so they contribute
            exactly nothing to the value or the gradient.
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
            `tokens`: the number of masked positions.
    """
    keep = mask.bool()
    h = hidden[keep]
    ids = topk_ids[keep]
    mass = topk_probs.detach()[keep].to(_compute_dtype(hidden, weight))
    p_t = mass / mass.sum(-1, keepdim=True) if renormalize else mass

    def one_chunk(h_c: Tensor, w: Tensor, ids_c: Tensor, p_c: Tensor) -> Tensor:
        logq = _log_softmax_chunk(h_c, w, p_c.dtype).gather(-1, ids_c)
        return -(p_c * logq).sum()

    loss = sum(
        checkpoint(one_chunk, h[sl], weight, ids[sl], p_t[sl], use_reentrant=False)
        for sl in _chunks(h.shape[0], chunk)
    )
    # KL = cross-entropy - teacher entropy over the top K; xlogy makes 0 log 0 = 0.
    stats = {
        "fd/kl_topk_sum": float(loss.detach() + torch.xlogy(p_t, p_t).sum()),
        "fd/teacher_mass_sum": float(mass.sum()),
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
    keep = mask.bool()
    logp = logprobs[keep]
    adv = advantages[keep].to(logp.dtype)
    ratio = torch.exp(logp - old_logprobs[keep].detach())
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped).sum()
    stats = {
        "grpo/clip_frac_sum": float((clipped < unclipped).sum()),
        "grpo/ratio_sum": float(ratio.detach().sum()),
        "tokens": float(logp.shape[0]),
    }
    if ref_logprobs is not None:
        kl = k3_kl(logp, ref_logprobs[keep].detach())
        loss = loss + kl_coef * kl.sum()
        stats["grpo/kl_sum"] = float(kl.detach().sum())
    return loss, stats
