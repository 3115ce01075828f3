"""What every feedback source takes and returns, and the one place feedback enters the teacher prompt.

A source turns an `Attempt` into the exact text the teacher sees. Formats:
- `compiler` (failure): "The following is feedback from your unsuccessful earlier attempt: {output}"
- `compiler` (success) and `ground_truth`: "Example of a correct solution:{solution}"
  (both verbatim from section 5.1 of the paper; they carry their own framing);
- `claude`, `self` and `constant`: `FEEDBACK_HEADER` + a newline + the model's directives (or the
  fixed string), since bare directives would not say what they refer to.

`teacher_messages` appends that text, unchanged, to the content of the last user message of the
student prompt, after a blank line ("\\n\\n"): the teacher sequence is the student prompt with the
feedback in the problem statement's own turn, followed by the same response tokens. Sources return the
framed text (not bare directives) so that the episode log records exactly what the teacher read, and
rebuilding a teacher prompt from a log needs no knowledge of which source wrote it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Protocol

from env.problems import Problem

Language = Literal["Lean 4", "Rocq"]
FEEDBACK_HEADER = "Feedback on an earlier attempt at this problem:"


class FeedbackError(RuntimeError):
    """No feedback could be produced (API failure after retries, empty model output, missing key)."""


@dataclass(frozen=True)
class Attempt:
    problem: Problem
    transcript: str  # the whole attempt as text: reasoning, every tool call with arguments, every tool output
    final_output: str  # the last prover output of the attempt
    solved: bool
    solution: str | None  # full source of the checked file that solved it; set exactly when solved
    language: Language  # the prover's language as named to models

    def __post_init__(self) -> None:
        if self.solved and self.solution is None:
            raise ValueError(f"attempt at {self.problem.name!r} is solved but carries no solution")


class FeedbackSource(Protocol):
    name: str

    async def feedback(self, attempt: Attempt) -> str:
        """The text to insert into the teacher prompt (see the module docstring for each format)."""
        ...


def framed(text: str) -> str:
    """Feedback written by a model or fixed by the user, under the header that says what it refers to."""
    return f"{FEEDBACK_HEADER}\n{text}"


def teacher_messages(student_messages: list[dict], feedback: str) -> list[dict]:
    """The student prompt with `feedback` appended to its last user message after a blank line (a new list)."""
    messages = copy.deepcopy(student_messages)
    for message in reversed(messages):
        if message.get("role") == "user":
            if not isinstance(message.get("content"), str):
                raise TypeError("teacher_messages needs the last user message's content to be a string")
            message["content"] = f"{message['content']}\n\n{feedback}"
            return messages
    raise ValueError("the student prompt has no user message to attach feedback to")
