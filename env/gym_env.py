"""`ProverEnv`: a Gymnasium environment in which an agent proves one theorem per episode with tools.

Observation: `{"messages": [...], "tools": [...]}`: at reset the system and user chat
messages that pose the problem, after each step the tool's reply as one `tool` message;
`tools` always holds the tool specs. Action: `{"name": <tool name>, "arguments": <dict or
JSON string>}`, or `{"name": "done"}` when the agent ends its attempt.
Reward is 1.0 exactly when a checked file solves the problem. `terminated` on a solve or
on "done"; `truncated` when the turn budget runs out. When an episode ends unsolved, the
last written file that was not checked since it was written gets one final check, so a
correct file the agent forgot to check still counts.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from env.problems import Problem, load_problems
from env.provers import make_prover
from env.provers.base import Prover
from env.sandbox import EpisodeDir
from env.tools import DEFAULT_OUTPUT_CHARS, ToolError, ToolOutput, run_tool, tool_specs
from env.verdict import Verdict

DONE = "done"

SYSTEM_PROMPT = (
    "You are an expert in formal mathematics and {language}. Prove the theorem you are given. "
    "Use the tools: write a complete {language} file with `{write}`, compile it with `{check}` and fix it "
    "from the compiler output, and search {library} with `{search}` to find lemmas. The problem is solved "
    "when a checked file compiles and proves the theorem exactly as stated, under its name, without "
    "{sorry} and without new axioms. Stop calling tools when you are done."
)
USER_PROMPT = ("{informal}Prove the following theorem. Keep the header and the statement unchanged."
               "\n\n```{fence}\n{text}\n```")


class JsonSpace(spaces.Space[Any]):
    """Any JSON-serialisable value of the given Python type (chat messages, tool specs, tool calls)."""

    def __init__(self, kind: type, sample_fn=None, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)
        self.kind = kind
        self._sample_fn = sample_fn

    def contains(self, x: Any) -> bool:
        try:
            return isinstance(x, self.kind) and json.dumps(x) is not None
        except (TypeError, ValueError):
            return False

    def sample(self, mask: Any = None, probability: Any = None) -> Any:
        if self._sample_fn is None:
            raise NotImplementedError("this space cannot be sampled")
        return self._sample_fn(self.np_random)

    @property
    def is_np_flattenable(self) -> bool:
        return False


class ProverEnv(gymnasium.Env):
    metadata = {"render_modes": []}

    def __init__(self, problems: Sequence[Problem] | str | Path, prover: Prover | str = "rocq", *,
                 max_turns: int = 32, check_timeout_s: float | None = None,
                 output_chars: int = DEFAULT_OUTPUT_CHARS) -> None:
        self.problems = list(load_problems(problems) if isinstance(problems, str | Path) else problems)
        if not self.problems:
            raise ValueError("ProverEnv needs at least one problem")
        self.prover = make_prover(prover) if isinstance(prover, str) else prover
        self._owns_prover = isinstance(prover, str)
        wrong = [p.name for p in self.problems if p.prover != self.prover.name]
        if wrong:
            raise ValueError(f"problems {wrong[:5]} are for another prover than {self.prover.name!r}")
        self.max_turns = max_turns
        self.check_timeout_s = check_timeout_s
        self.output_chars = output_chars
        self._specs = tool_specs(self.prover)
        names = [s["function"]["name"] for s in self._specs] + [DONE]
        self.action_space = JsonSpace(dict, sample_fn=lambda rng: _random_call(rng, names))
        self.observation_space = spaces.Dict({"messages": JsonSpace(list), "tools": JsonSpace(list)})
        self.problem: Problem | None = None
        self.workdir: EpisodeDir | None = None
        self._turn = 0
        self._unchecked: str | None = None
        self._over = True

    # -- Gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._close_workdir()
        self.problem = self._pick(options or {})
        self.workdir = EpisodeDir(prefix=f"episode-{self.problem.name[:40]}-")
        self._turn, self._unchecked, self._over = 0, None, False
        return self._obs(self.prompt_messages(self.problem)), {"problem": self.problem.name, "turn": 0}

    def step(self, action: dict) -> tuple[dict, float, bool, bool, dict]:
        if self._over or self.problem is None or self.workdir is None:
            raise RuntimeError("call reset() before step(), and again after an episode ends")
        self._turn += 1
        name = action.get("name") if isinstance(action, dict) else None
        if name == DONE:
            return self._finish(terminated=True, text="Episode ended by the agent.")
        start = time.monotonic()
        try:
            out = run_tool(str(name), action.get("arguments") if isinstance(action, dict) else None,
                           prover=self.prover, problem=self.problem, workdir=self.workdir,
                           check_timeout_s=self.check_timeout_s, output_chars=self.output_chars)
        except ToolError as e:
            out = ToolOutput(f"Error: {e}", is_error=True)
        tool_s = time.monotonic() - start
        if name == self.prover.tools.write and not out.is_error:
            self._unchecked = action_path(action)
        elif out.check is not None and action_path(action) == self._unchecked:
            self._unchecked = None
        info = self._info(name, out, {**out.timings, "tool_s": tool_s} if not out.is_error else {})
        solved = bool(out.verdict and out.verdict.solved)
        if solved:
            self._over = True
            return self._obs([self._tool_message(name, out.text)]), 1.0, True, False, info
        if self._turn >= self.max_turns:
            return self._finish(terminated=False, text=out.text, tool_name=name, info=info)
        return self._obs([self._tool_message(name, out.text)]), 0.0, False, False, info

    def close(self) -> None:
        self._close_workdir()
        if self._owns_prover:
            self.prover.close()

    # -- helpers -------------------------------------------------------------------------
    def prompt_messages(self, problem: Problem) -> list[dict]:
        lean = self.prover.name == "lean"
        system = SYSTEM_PROMPT.format(
            language="Lean 4" if lean else "Rocq (Coq)", write=self.prover.tools.write,
            check=self.prover.tools.check, search=self.prover.tools.search, library=self.prover.library_name,
            sorry="`sorry`" if lean else "`Admitted`")
        informal = f"Informal statement: {problem.informal_statement}\n\n" if problem.informal_statement else ""
        text = (problem.header + problem.formal_statement).strip()
        user = USER_PROMPT.format(informal=informal, fence="lean4" if lean else "coq", text=text)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _pick(self, options: dict) -> Problem:
        chosen = options.get("problem")
        if isinstance(chosen, Problem):
            if chosen.prover != self.prover.name:
                raise ValueError(f"problem {chosen.name!r} is for {chosen.prover}, not {self.prover.name}")
            return chosen
        if isinstance(chosen, str):
            for p in self.problems:
                if p.name == chosen:
                    return p
            raise ValueError(f"no problem named {chosen!r}")
        if "index" in options:
            return self.problems[int(options["index"])]
        return self.problems[int(self.np_random.integers(len(self.problems)))]

    def _finish(self, *, terminated: bool, text: str, tool_name: str | None = None,
                info: dict | None = None) -> tuple[dict, float, bool, bool, dict]:
        """End the episode; a written but unchecked file gets its final check here."""
        assert self.problem is not None and self.workdir is not None
        self._over = True
        info = info or self._info(tool_name, None, {})
        if self._unchecked is not None:
            final = run_tool(self.prover.tools.check, {"path": self._unchecked}, prover=self.prover,
                             problem=self.problem, workdir=self.workdir, check_timeout_s=self.check_timeout_s,
                             output_chars=self.output_chars)
            info["final_check"] = {"path": self._unchecked, **_verdict_dict(final.verdict)}
            info["verdict"] = _verdict_dict(final.verdict)
            info["timings"]["final_check_s"] = final.timings.get("check_s", 0.0)
            if final.verdict is not None and final.verdict.solved:
                return self._obs([self._tool_message(tool_name or DONE, text)]), 1.0, True, False, info
        return self._obs([self._tool_message(tool_name or DONE, text)]), 0.0, terminated, not terminated, info

    def _info(self, tool_name: str | None, out: ToolOutput | None, timings: dict) -> dict:
        return {
            "problem": self.problem.name if self.problem else None,
            "turn": self._turn,
            "tool": tool_name,
            "tool_error": bool(out and out.is_error),
            "verdict": _verdict_dict(out.verdict) if out else None,
            "sandboxed": out.check.sandboxed if out and out.check else None,
            "timings": dict(timings),
        }

    def _obs(self, messages: list[dict]) -> dict:
        return {"messages": messages, "tools": copy.deepcopy(self._specs)}

    @staticmethod
    def _tool_message(name: str | None, text: str) -> dict:
        return {"role": "tool", "name": str(name), "content": text}

    def _close_workdir(self) -> None:
        if self.workdir is not None:
            self.workdir.close()
            self.workdir = None


def action_path(action: dict) -> str | None:
    args = action.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return args.get("path") if isinstance(args, dict) else None


def _verdict_dict(verdict: Verdict | None) -> dict | None:
    return verdict.to_dict() if verdict else None


def _random_call(rng: np.random.Generator, names: list[str]) -> dict:
    """A random, usually invalid, tool call: what `action_space.sample()` returns."""
    letters = np.array(list("abcxyz_./ "))
    junk = "".join(rng.choice(letters, size=int(rng.integers(1, 12))))
    return {"name": str(rng.choice(names[:-1] + ["unknown_tool"])), "arguments": {"path": junk}}
