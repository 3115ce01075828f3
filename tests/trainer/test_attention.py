"""The packed attention on its own: causal attention within each sequence of a packed row, with the
scale, dropout and grouped KV heads the model passes, transformers' own SDPA outside packed rows,
and no [L, L] mask built for a packed row. (Whole models through it: tests/trainer/test_batches.py.)"""

import copy
import math

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from trainer.algorithms import hidden_states
from trainer.attention import PACKED_SDPA, packed_sdpa, use_packed_attention
from trainer.batches import TrainSequence, student_batch


def qkv(length, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, length, dim, generator=g, dtype=torch.float64),
            torch.randn(1, kv_heads, length, dim, generator=g, dtype=torch.float64),
            torch.randn(1, kv_heads, length, dim, generator=g, dtype=torch.float64))


def reference(q, k, v, seq_lens, scale):
    """Causal softmax attention of each sequence on its own, KV heads shared by groups: [1, L, heads, d]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    outs, start = [], 0
    for n in seq_lens:
        s = slice(start, start + n)
        scores = q[:, :, s] @ k[:, :, s].transpose(-1, -2) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(scores.softmax(-1) @ v[:, :, s])
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.fixture(scope="module")
def attn_module(tiny_model):
    return tiny_model.model.layers[0].self_attn  # a real attention module, as transformers passes it


@pytest.mark.parametrize("seq_lens", [(3, 5, 2), (10,), (1, 1)])  # (1, 1): a row as long as the KV heads count
def test_each_sequence_attends_causally_to_itself_with_the_models_scale(attn_module, seq_lens):
    q, k, v = qkv(sum(seq_lens))
    out, weights = packed_sdpa(attn_module, q, k, v, None, seq_lens=seq_lens, scaling=0.37, dropout=0.0)
    assert weights is None and out.shape == (1, sum(seq_lens), 4, 8)
    torch.testing.assert_close(out, reference(q, k, v, seq_lens, 0.37))
    if max(seq_lens) > 1:  # a one-token sequence's output is its value, whatever the scale
        assert not torch.allclose(out, reference(q, k, v, seq_lens, 1 / math.sqrt(8)))


def test_dropout_reaches_the_kernel(attn_module):
    q, k, v = qkv(6)
    assert packed_sdpa(attn_module, q, k, v, None, seq_lens=(2, 4), dropout=1.0)[0].abs().max() == 0
    no_dropout = packed_sdpa(attn_module, q, k, v, None, seq_lens=(2, 4), dropout=0.0)[0]
    assert no_dropout.abs().max() > 0
    torch.testing.assert_close(packed_sdpa(attn_module, q, k, v, None, seq_lens=(2, 4))[0], no_dropout)  # default


def test_outside_packed_rows_it_is_transformers_sdpa(attn_module):
    q, k, v = qkv(7)  # the module's 4 heads and 2 KV heads
    mask = torch.ones(1, 1, 7, 7, dtype=torch.bool).tril()
    got = packed_sdpa(attn_module, q, k, v, mask, scaling=0.37, dropout=0.0)[0]
    torch.testing.assert_close(got, sdpa_attention_forward(attn_module, q, k, v, mask, scaling=0.37, dropout=0.0)[0])
    torch.testing.assert_close(got, reference(q, k, v, (7,), 0.37))


def test_refuses_what_it_does_not_implement(attn_module):
    q, k, v = qkv(6)
    with pytest.raises(ValueError, match="does not implement sliding-window attention"):
        packed_sdpa(attn_module, q, k, v, None, seq_lens=(6,), sliding_window=4)
    with pytest.raises(ValueError, match=r"a packed row of 6 tokens does not hold sequences of lengths \(3, 4\)"):
        packed_sdpa(attn_module, q, k, v, None, seq_lens=(3, 4))


def test_a_packed_row_builds_no_mask(tiny_model):
    """The lengths carry the boundaries: transformers must not build a dense [L, L] block-diagonal mask from
    the position ids (it would, given no attention mask) for an attention that ignores it."""
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("seq_lens")))
        return packed_sdpa(module, query, key, value, attention_mask, **kwargs)

    model = copy.deepcopy(tiny_model)
    use_packed_attention(model)
    packed = student_batch([TrainSequence(list(range(3, 9)), 2, [0, 0, 1, 1, 1, 1]),
                            TrainSequence(list(range(5, 14)), 3, [0, 0, 0] + [1] * 6)], device="cpu")
    AttentionInterface.register(PACKED_SDPA, spy)
    try:
        hidden_states(model, packed)
    finally:
        AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    assert len(seen) == model.config.num_hidden_layers
    assert all(mask is None and lens == (6, 9) for mask, lens in seen)
