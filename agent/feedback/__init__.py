"""Feedback sources for Feedback Distillation: what the teacher reads about the student's attempt.

`make_feedback(name, **kwargs)` builds one source; `teacher_messages` puts its text into the student
prompt (see `agent.feedback.base` for where and in which format).
"""

from __future__ import annotations

from typing import Any, Literal

from agent.feedback.base import Attempt, FeedbackError, FeedbackSource, teacher_messages
from agent.feedback.claude import ClaudeFeedback
from agent.feedback.sources import CompilerFeedback, ConstantFeedback, GroundTruthFeedback, SelfFeedback

FeedbackName = Literal["claude", "self", "compiler", "ground_truth", "constant"]

__all__ = ["Attempt", "ClaudeFeedback", "CompilerFeedback", "ConstantFeedback", "FeedbackError", "FeedbackName",
           "FeedbackSource", "GroundTruthFeedback", "SelfFeedback", "make_feedback", "teacher_messages"]


def make_feedback(name: FeedbackName, **kwargs: Any) -> FeedbackSource:
    """The source called `name`, built from `kwargs` (its constructor's arguments)."""
    if name == "claude":
        return ClaudeFeedback(**kwargs)
    if name == "self":
        return SelfFeedback(**kwargs)
    if name == "compiler":
        return CompilerFeedback(**kwargs)
    if name == "ground_truth":
        return GroundTruthFeedback(**kwargs)
    if name == "constant":
        return ConstantFeedback(**kwargs)
    raise ValueError(f"unknown feedback source {name!r}: use claude, self, compiler, ground_truth or constant")
