"""Training sequences from episodes, packing, and the micro-batching invariant on a real tiny model."""

import copy

import pytest
import torch

from tests.agent.test_episode import make_episode
from trainer.batches import TrainSequence, micro_batches, student_batch, teacher_batch


def seq(n_prompt, mask_tail, teacher_prompt=None, start=10):
    ids = list(range(start, start + n_prompt + len(mask_tail)))
    return TrainSequence(ids, n_prompt, [0] * n_prompt + mask_tail, teacher_prompt)


def test_student_targets_and_mask_cover_only_generated_tokens():
    s = seq(3, [1, 1, 0, 0, 1])  # two generated, two tool-output tokens, one generated
    packed = student_batch([s], pad_id=0, device="cpu")
    assert packed.targets.tolist() == s.input_ids[3:]
    assert packed.mask.tolist() == [1, 1, 0, 0, 1]
    assert packed.hidden_index.tolist() == [2, 3, 4, 5, 6]  # the position before each target


def test_teacher_positions_line_up_with_the_student():
    s = seq(3, [1, 0, 1], teacher_prompt=[7, 7, 7, 7, 7])
    student = student_batch([s], pad_id=0, device="cpu")
    teacher = teacher_batch([s], pad_id=0, device="cpu")
    assert teacher.targets.tolist() == student.targets.tolist() and teacher.mask.tolist() == student.mask.tolist()
    assert teacher.input_ids[0].tolist() == [7] * 5 + s.response_ids
    assert teacher.hidden_index.tolist() == [4, 5, 6]


def test_padding_and_micro_batches():
    a, b, c = seq(2, [1] * 2), seq(2, [1] * 6), seq(1, [1])
    assert micro_batches([a, b, c], token_budget=16) == [[a, b], [c]]
    assert micro_batches([a, b, c], token_budget=1) == [[a], [b], [c]]
    packed = student_batch([a, b], pad_id=0, device="cpu")
    assert packed.input_ids.shape == (2, 8) and packed.attention_mask[0].tolist() == [1] * 4 + [0] * 4
    assert packed.hidden_index.tolist()[:2] == [1, 2] and packed.hidden_index.tolist()[2] == 8 + 1


def test_from_episode():
    episode = make_episode()
    s = TrainSequence.from_episode(episode, advantage=0.5)
    assert s.input_ids == episode.token_ids and s.prompt_len == 2 and s.num_loss_tokens == 2
    with pytest.raises(ValueError, match="no feedback"):
        TrainSequence.from_episode(episode, with_teacher=True)


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
    results = []
    for budget in (10_000, 1):  # one micro-batch of 8, then 8 of one
        student.zero_grad()
        stats = backward(algorithm, student, teacher, sequences, token_budget=budget, chunk=7)
        results.append((stats, grads(student)))
    (s1, g1), (s8, g8) = results
    assert s1["tokens"] == s8["tokens"] == sum(s.num_loss_tokens for s in sequences)
    assert s1["loss_sum"] == pytest.approx(s8["loss_sum"], rel=1e-9)
    assert len(g1) == len(g8) > 0
    for a, b in zip(g1, g8, strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)
