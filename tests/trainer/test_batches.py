"""Training sequences from episodes, packing, balanced micro-batches, and the invariants on a real tiny model:
1 x 8 == 8 x 1, packed == padded."""

import copy

import pytest
import torch

from agent.episode import Feedback
from tests.agent.test_episode import make_episode
from trainer.attention import PACKED_SDPA
from trainer.batches import TrainSequence, micro_batches, student_batch, teacher_batch


def seq(n_prompt, mask_tail, teacher_prompt=None, start=10):
    ids = list(range(start, start + n_prompt + len(mask_tail)))
    return TrainSequence(ids, n_prompt, [0] * n_prompt + mask_tail, teacher_prompt)


def test_student_targets_cover_only_generated_tokens():
    s = seq(3, [1, 1, 0, 0, 1])  # two generated, two tool-output tokens, one generated
    packed = student_batch([s], device="cpu")
    assert packed.input_ids.tolist() == [s.input_ids] and packed.position_ids.tolist() == [list(range(8))]
    assert packed.targets.tolist() == [s.input_ids[3], s.input_ids[4], s.input_ids[7]]
    assert packed.hidden_index.tolist() == [2, 3, 6]  # the position before each target
    assert packed.seq_lens == (8,) and packed.seq_index.tolist() == [0, 0, 0]


def test_teacher_positions_line_up_with_the_student():
    s = seq(3, [1, 0, 1], teacher_prompt=[7, 7, 7, 7, 7])
    student = student_batch([s], device="cpu")
    teacher = teacher_batch([s], device="cpu")
    assert teacher.targets.tolist() == student.targets.tolist() == [s.input_ids[3], s.input_ids[5]]
    assert teacher.input_ids[0].tolist() == [7] * 5 + s.response_ids
    assert teacher.hidden_index.tolist() == [4, 6]


def test_sequences_are_packed_end_to_end():
    a, b = seq(2, [1, 1], start=10), seq(3, [0, 1, 1, 1], start=20)
    packed = student_batch([a, b], device="cpu")
    assert packed.input_ids.tolist() == [a.input_ids + b.input_ids]  # no padding
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]]
    assert packed.seq_lens == (4, 7)
    assert packed.hidden_index.tolist() == [1, 2, 4 + 3, 4 + 4, 4 + 5]
    assert packed.targets.tolist() == [12, 13, 24, 25, 26] and packed.seq_index.tolist() == [0, 0, 1, 1, 1]
    teacher = teacher_batch([seq(2, [1, 1], [5], start=10), seq(3, [0, 1, 1, 1], [6, 6], start=20)], device="cpu")
    assert teacher.input_ids.tolist() == [[5, 12, 13, 6, 6, 23, 24, 25, 26]]
    assert teacher.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5]] and teacher.seq_lens == (3, 6)
    assert teacher.hidden_index.tolist() == [0, 1, 3 + 2, 3 + 3, 3 + 4]


def lengths(batches):
    return [[s.length for s in b] for b in batches]


def test_micro_batches_are_balanced_by_tokens():
    s = [seq(1, [1] * (n - 1), start=i * 100) for i, n in enumerate([3, 9, 4, 6, 2, 8])]  # 32 tokens
    assert lengths(micro_batches(s, token_budget=32)) == [[3, 9, 4, 6, 2, 8]]  # packed: the total counts
    assert lengths(micro_batches(s, token_budget=16)) == [[3, 9, 4], [6, 2, 8]]  # 16 + 16, in input order
    assert lengths(micro_batches(s, token_budget=11)) == [[9, 2], [3, 8], [4, 6]]
    assert lengths(micro_batches(s, token_budget=1)) == [[9], [8], [6], [4], [3], [2]]  # too long: alone
    for budget in range(1, 40):
        batches = micro_batches(s, budget)
        assert sorted(id(x) for b in batches for x in b) == sorted(id(x) for x in s)
        assert all(sum(x.length for x in b) <= budget or len(b) == 1 for b in batches)
    same = [seq(1, [1, 1], start=i * 10) for i in range(4)]
    assert lengths(micro_batches(same, token_budget=10)) == [[3, 3], [3, 3]]  # balanced, not filled in turn
    tight = [seq(1, [1] * (n - 1), start=i * 10) for i, n in enumerate([6, 6, 5, 1])]  # 2 x 10 cannot hold them
    assert lengths(micro_batches(tight, token_budget=10)) == [[6], [6], [5, 1]]  # a third, then the least filled
    assert micro_batches([], 16) == []
    with pytest.raises(ValueError, match="token_budget"):
        micro_batches(s, 0)
    with_teacher = seq(2, [1], teacher_prompt=[7] * 9)  # a sequence costs its longer row: the teacher's here
    assert with_teacher.length == 10 and lengths(micro_batches([with_teacher, s[0]], 12)) == [[10], [3]]


def test_from_episode():
    episode = make_episode()
    s = TrainSequence.from_episode(episode, advantage=0.5)
    assert s.input_ids == episode.token_ids and s.prompt_len == 2 and s.num_loss_tokens == 2
    assert s.advantage == 0.5 and s.teacher_prompt_ids is None and s.loss_mask == episode.loss_mask
    with pytest.raises(ValueError, match="no feedback"):
        TrainSequence.from_episode(episode, with_teacher=True)
    feedback = Feedback("compiler", "error at line 1", [{"role": "user", "content": "y"}], [7, 8, 9, 10])
    s = TrainSequence.from_episode(make_episode(feedback=feedback), advantage=-1.5, with_teacher=True)
    assert s.teacher_prompt_ids == [7, 8, 9, 10] and s.advantage == -1.5
    assert teacher_batch([s], device="cpu").input_ids.tolist() == [[7, 8, 9, 10, 3, 4, 5]]


def random_sequences(vocab, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = 4 + i % 3, 5 + (i * 3) % 7
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        mask = [0] * p + [int(torch.rand(1, generator=g) > 0.3) for _ in range(r)]
        teacher = torch.randint(3, vocab, (p + 2,), generator=g).tolist()
        out.append(TrainSequence(ids, p, mask, teacher, advantage=float(torch.randn(1, generator=g))))
    return out


def student_and_teacher(tiny_model):
    """A float64 copy of the tiny model and a slightly perturbed copy of it as the teacher."""
    torch.manual_seed(0)
    student = copy.deepcopy(tiny_model).double().train()
    teacher = copy.deepcopy(student).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def backward(algorithm, student, teacher, sequences, *, token_budget, chunk):
    """One step's FD or GRPO gradient into `student` (the teacher doubles as GRPO's reference)."""
    from trainer.algorithms import fd_backward, grpo_backward

    if algorithm == "fd":
        return fd_backward(student, teacher, sequences, top_k=5, renormalize=False, token_budget=token_budget,
                           chunk=chunk, pad_id=0)
    return grpo_backward(student, teacher, sequences, clip_eps=0.2, kl_coef=0.1, token_budget=token_budget,
                         chunk=chunk, pad_id=0)


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
def test_one_by_eight_equals_eight_by_one(tiny_model, algorithm):
    """Accumulated gradients do not depend on how a step is split into micro-batches."""
    student, teacher = student_and_teacher(tiny_model)
    sequences = random_sequences(student.config.vocab_size)
    s = sequences[3]  # all prompt and tool output: alone, a micro-batch with no trained position
    sequences[3] = TrainSequence(s.input_ids, s.prompt_len, [0] * len(s.loss_mask), s.teacher_prompt_ids, s.advantage)
    results = []
    for budget in (10_000, 1):  # one micro-batch of 8, then 8 of one
        student.zero_grad()
        stats = backward(algorithm, student, teacher, sequences, token_budget=budget, chunk=7)
        results.append((stats, grads(student)))
    (s1, g1), (s8, g8) = results
    assert s1["tokens"] == s8["tokens"] == sum(s.num_loss_tokens for s in sequences)
    assert s1.pop("scoring_seconds") > 0 and s8.pop("scoring_seconds") > 0  # the teacher's or reference's, timed
    assert s1 == pytest.approx(s8, rel=1e-9)  # every statistic is summed over the micro-batches
    tokens = s1["tokens"]
    if algorithm == "fd":
        assert 0 < s1["fd/teacher_mass_sum"] <= tokens and s1["entropy_sum"] > 0
    else:  # the old policy is the current one: every ratio is 1
        assert s1["grpo/ratio_sum"] == pytest.approx(tokens) and s1["grpo/kl_sum"] > 0 and s1["entropy_sum"] > 0
    assert len(g1) == len(g8) > 0
    for a, b in zip(g1, g8, strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
def test_a_step_without_trained_tokens_changes_nothing(tiny_model, algorithm):
    """Only prompt and tool-output tokens: no statistics and no gradient (not 0 / 0 = NaN)."""
    student, teacher = student_and_teacher(tiny_model)
    sequences = [TrainSequence(s.input_ids, s.prompt_len, [0] * len(s.loss_mask), s.teacher_prompt_ids, s.advantage)
                 for s in random_sequences(student.config.vocab_size, n=2)]
    assert backward(algorithm, student, teacher, sequences, token_budget=10_000, chunk=7) == {}
    assert grads(student) == []


def padded_hidden(model, rows, starts, masks):
    """The layout before packing: right-padded rows with an attention mask; the hidden states at trained positions."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=model.device)
    attn = torch.zeros_like(ids)
    index = []
    for b, (row, start, m) in enumerate(zip(rows, starts, masks, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        attn[b, : len(row)] = 1
        index += [b * width + t - 1 for t in range(max(start, 1), len(row)) if m[t - start]]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[index]


def padded_backward(algorithm, student, teacher, sequences, kl_coef=0.1, renormalize=False):
    """The reference step: padded rows, full-vocabulary logits, the unfused GRPO loss; loss_sum, and the gradient."""
    from trainer.losses import chunked_token_stats, grpo_loss

    total = sum(s.num_loss_tokens for s in sequences)
    masks = [s.loss_mask[s.prompt_len:] for s in sequences]
    hidden = padded_hidden(student, [s.input_ids for s in sequences], [s.prompt_len for s in sequences], masks)
    targets = torch.tensor([t for s in sequences for t, m in zip(s.response_ids, s.loss_mask[s.prompt_len:],
                                                                   strict=True) if m], device=student.device)
    if algorithm == "fd":
        with torch.no_grad():
            t_hidden = padded_hidden(teacher, [s.teacher_prompt_ids + s.response_ids for s in sequences],
                                     [len(s.teacher_prompt_ids) for s in sequences], masks)
            probs, ids = torch.softmax(t_hidden @ teacher.lm_head.weight.T, -1).topk(5, dim=-1)
            if renormalize:
                probs = probs / probs.sum(-1, keepdim=True)
        logq = torch.log_softmax(hidden @ student.lm_head.weight.T, -1).gather(-1, ids)
        loss = -(probs * logq).sum()
    else:
        with torch.no_grad():  # the reference scores the student's own rows
            ref_hidden = padded_hidden(teacher, [s.input_ids for s in sequences], [s.prompt_len for s in sequences],
                                       masks)
            ref, _ = chunked_token_stats(ref_hidden, teacher.lm_head.weight, targets)
        logprobs, _ = chunked_token_stats(hidden, student.lm_head.weight, targets)
        adv = torch.tensor([s.advantage for s in sequences for m in s.loss_mask[s.prompt_len:] if m],
                           dtype=torch.float64, device=student.device)
        loss, _ = grpo_loss(logprobs, logprobs.detach(), ref, adv, torch.ones(total, device=student.device),
                            clip_eps=0.2, kl_coef=kl_coef)
    (loss / total).backward()
    return float(loss.detach())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
def test_packed_equals_padded(tiny_model, algorithm, attention):
    """One packed row (student and teacher) gives the padded batch's loss and gradient: through the packed
    attention (models on sdpa are switched to it) and through transformers' own reading of packed position ids."""
    student, teacher = student_and_teacher(tiny_model)
    for model in (student, teacher):
        model.set_attn_implementation(attention)
    sequences = random_sequences(student.config.vocab_size)
    want_loss = padded_backward(algorithm, student, teacher, sequences)
    want = grads(student)
    student.zero_grad()
    stats = backward(algorithm, student, teacher, sequences, token_budget=10_000, chunk=7)
    expected = PACKED_SDPA if attention == "sdpa" else attention
    assert student.config._attn_implementation == teacher.config._attn_implementation == expected
    assert stats["loss_sum"] == pytest.approx(want_loss, rel=1e-10)
    got = grads(student)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_fd_renormalized_equals_padded(tiny_model):
    """renormalize=True reaches the loss: the padded step with the teacher's top K renormalised."""
    from trainer.algorithms import fd_backward

    student, teacher = student_and_teacher(tiny_model)
    sequences = random_sequences(student.config.vocab_size)
    want_loss = padded_backward("fd", student, teacher, sequences, renormalize=True)
    want = grads(student)
    student.zero_grad()
    stats = fd_backward(student, teacher, sequences, top_k=5, renormalize=True, token_budget=10_000, chunk=7, pad_id=0)
    assert stats["loss_sum"] == pytest.approx(want_loss, rel=1e-10)
    for a, b in zip(grads(student), want, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_grpo_without_a_reference_or_a_kl_coefficient_has_no_kl_term(tiny_model):
    """No reference model, or kl_coef 0 (then the reference is not even run): the padded step's loss and
    gradient without the KL term, and no KL statistic."""
    from trainer.algorithms import grpo_backward

    student, teacher = student_and_teacher(tiny_model)
    sequences = random_sequences(student.config.vocab_size)
    want_loss = padded_backward("grpo", student, teacher, sequences, kl_coef=0.0)
    want = grads(student)
    for reference, kl_coef in ((None, 0.1), (teacher, 0.0)):
        student.zero_grad()
        stats = grpo_backward(student, reference, sequences, clip_eps=0.2, kl_coef=kl_coef, token_budget=10_000,
                              chunk=7, pad_id=0)
        assert "grpo/kl_sum" not in stats
        assert stats["loss_sum"] == pytest.approx(want_loss, rel=1e-10)
        for a, b in zip(grads(student), want, strict=True):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
def test_the_lm_heads_see_at_most_chunk_rows_of_logits(tiny_model, algorithm):
    """`chunk` bounds the logits of every head the step runs: the student's, the teacher's, the reference's."""
    from tests.trainer.test_losses import _LogitProbe

    student, teacher = student_and_teacher(tiny_model)
    sequences = random_sequences(student.config.vocab_size)
    assert sum(s.num_loss_tokens for s in sequences) > 7
    with _LogitProbe(student.config.vocab_size, student.config.hidden_size) as probe:
        backward(algorithm, student, teacher, sequences, token_budget=10_000, chunk=7)
    assert 0 < probe.max_rows <= 7


def test_packed_attention_leaves_other_calls_unchanged(tiny_model):
    """A model switched to the packed attention generates as before (left padding, KV cache); a row that
    does not hold the given lengths is refused."""
    from trainer.attention import use_packed_attention

    packed = copy.deepcopy(tiny_model)
    use_packed_attention(packed)
    assert packed.config._attn_implementation == PACKED_SDPA and tiny_model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = packed.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match="does not hold sequences of lengths"):
            packed.get_decoder()(input_ids=ids[:1], position_ids=torch.arange(5)[None], seq_lens=(2, 2),
                                 attention_mask=torch.ones(1, 5, dtype=torch.long))


class MatmulCount(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = self.elementwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        self.elementwise += func.overloadpacket in (torch.ops.aten.rsqrt, torch.ops.aten.silu)  # norms, activation
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_no_matmul(tiny_model):
    """Full checkpointing runs every layer's matmuls again in backward; selective keeps their outputs and
    recomputes only elementwise ops. All three give the same gradient."""
    from trainer.algorithms import checkpoint_activations

    sequences = random_sequences(tiny_model.config.vocab_size)
    results = {}
    for mode in ("none", "full", "selective"):
        student, teacher = student_and_teacher(tiny_model)
        if mode != "none":
            checkpoint_activations(student, mode)
        with MatmulCount() as counter:
            backward("fd", student, teacher, sequences, token_budget=10_000, chunk=7)
        results[mode] = (counter.count, grads(student), counter.elementwise)
    # q, k, v, o, gate and up again per layer; not down: recomputation stops once backward has what it needs
    assert results["full"][0] == results["none"][0] + 6 * tiny_model.config.num_hidden_layers
    assert results["selective"][0] == results["none"][0]
    assert results["selective"][2] > results["none"][2]  # the elementwise ops do run again: less is kept
    for mode in ("full", "selective"):
        for a, b in zip(results[mode][1], results["none"][1], strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
