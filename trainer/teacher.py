"""The FD teacher: an exponential moving average of the student's weights.

Every `every` optimizer steps, mu <- alpha * mu + (1 - alpha) * theta (paper: alpha = 0.9,
every 5 steps). alpha = 1 keeps the teacher frozen at the initial policy.
"""

from __future__ import annotations

import copy

import torch


class EmaTeacher:
    def __init__(self, student: torch.nn.Module, *, alpha: float, every: int) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"ema alpha must be in [0, 1], got {alpha}")
        if every < 1:
            raise ValueError(f"ema every must be >= 1, got {every}")
        self.alpha, self.every = alpha, every
        self.model = copy.deepcopy(student).eval().requires_grad_(False)

    @torch.no_grad()
    def maybe_update(self, student: torch.nn.Module, optimizer_step: int) -> bool:
        """Apply the EMA after optimizer step `optimizer_step` (1-based) when it is due; True if applied."""
        if optimizer_step % self.every or self.alpha == 1.0:
            return False
        student_params = dict(student.named_parameters())
        for name, mu in self.model.named_parameters():
            mu.lerp_(student_params[name].detach().to(mu.dtype), 1.0 - self.alpha)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
