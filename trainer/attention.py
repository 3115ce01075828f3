"""Attention over sequences packed end to end in one row: the trainer's padding-free micro-batches.

A packed micro-batch is a single row holding several sequences, with position ids that
restart at 0 at each sequence (so rotary embeddings see each sequence's own positions).
Transformers reads such a row correctly through any attention implementation: called with
`attention_mask=None`, it finds the boundaries in `position_ids` and builds a
block-diagonal causal mask (sdpa, eager, flex) or makes varlen calls (flash-attention).
With SDPA that dense [L, L] mask costs attention over the whole row, though: 8 sequences
of 2,048 tokens packed into 16,384 would cost 8 times the per-sequence attention, and the
fused flash kernels refuse masks.

So `use_packed_attention` switches a model from `sdpa` to `packed_sdpa`: given the
sequence lengths as host integers (`seq_lens`, no device sync to find them), it runs
causal SDPA on each sequence (flash kernels on GPU, no mask at all); in every other call
(generation with a KV cache, padded batches) it is transformers' own `sdpa`, with the
same masks. Other implementations are left as they are: they read packed rows through
`position_ids` already.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

PACKED_SDPA = "packed_sdpa"


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, *, seq_lens: tuple[int, ...] | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, heads, L, d], key/value [1, kv_heads, L, d] of one packed row -> [1, L, heads, d]."""
    if seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("packed_sdpa does not implement sliding-window attention")
    if query.shape[0] != 1 or sum(seq_lens) != query.shape[2]:
        raise ValueError(f"a packed row of {query.shape[2]} tokens does not hold sequences of lengths {seq_lens}")
    gqa = query.shape[1] != key.shape[1]
    # split, not slices: its backward is one concatenation per tensor, where each slice's backward
    # would write a zero-filled gradient of the whole row, all of them then summed
    outs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=kwargs.get("dropout", 0.0),
                                           scale=kwargs.get("scaling"), enable_gqa=gqa).transpose(1, 2)
            for q, k, v in zip(*(t.split(seq_lens, dim=2) for t in (query, key, value)), strict=True)]
    return torch.cat(outs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # outside packed rows, sdpa's masks


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a model that uses `sdpa` to `packed_sdpa` (idempotent; every other call behaves as before)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(PACKED_SDPA)


def packed_kwargs(model: torch.nn.Module, seq_lens: tuple[int, ...], length: int,
                  device: torch.device) -> dict[str, Any]:
    """The decoder's keyword arguments for one packed row, besides input and position ids.

    With `packed_sdpa`: the lengths, and an all-ones mask, which tells transformers there is
    no padding and no packing to detect, so it builds no mask (the lengths carry the
    boundaries). Otherwise no mask: transformers then finds the boundaries in the position ids.
    """
    if model.config._attn_implementation == PACKED_SDPA:
        return {"seq_lens": seq_lens, "attention_mask": torch.ones((1, length), dtype=torch.long, device=device)}
    return {"attention_mask": None}
