import pytest
import torch

from trainer.teacher import EmaTeacher


def test_ema_schedule_and_formula():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    teacher = EmaTeacher(student, alpha=0.9, every=5)
    start = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    applied = [teacher.maybe_update(student, step) for step in range(1, 11)]
    assert applied == [False] * 4 + [True] + [False] * 4 + [True]
    for name, theta in student.state_dict().items():
        once = 0.9 * start[name] + 0.1 * theta
        expected = 0.9 * once + 0.1 * theta
        assert torch.allclose(teacher.model.state_dict()[name], expected, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_alpha_one_freezes_the_teacher():
    student = torch.nn.Linear(3, 2)
    teacher = EmaTeacher(student, alpha=1.0, every=1)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        student.weight.add_(1.0)
    assert not teacher.maybe_update(student, 1)
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())


@pytest.mark.parametrize("alpha, every", [(1.5, 5), (0.9, 0)])
def test_bad_settings(alpha, every):
    with pytest.raises(ValueError):
        EmaTeacher(torch.nn.Linear(1, 1), alpha=alpha, every=every)
