"""Multi-turn rollouts: generation and tool execution through the Gymnasium env, many episodes at once.

Each episode alternates: generate an assistant turn (until the end-of-turn token) ->
parse its tool calls -> run them in the env (prover checks go to a thread pool, so other
episodes keep generating) -> append the tool outputs' ids -> generate again; until the
problem is solved, the model stops calling tools, or a budget runs out. The token
sequence is built only by appending ids (see `agent.chat`). A failure inside one episode
is recorded in that episode (`finish_reason="error"`) and the others go on.

    python -m agent.rollout --problems P.jsonl --model tiny-qwen3 --prover rocq --n-samples 2 \
        --out episodes.jsonl [--backend transformers|vllm] [--feedback compiler]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.backends.base import GenerationBackend, SamplingParams
from agent.chat import ChatFormat, MalformedCall, parse_tool_calls
from agent.episode import Episode, EpisodeWriter, Feedback, ToolCallRecord
from agent.feedback.base import FeedbackError
from env.gym_env import DONE, ProverEnv
from env.problems import Problem
from env.provers.base import Prover


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = 8192  # generated tokens per attempt, over all turns
    max_prompt_tokens: int = 2048
    max_turns: int = 32  # tool calls per attempt
    temperature: float = 1.0
    top_p: float = 1.0
    check_timeout_s: float = 60.0
    max_concurrent_checks: int = 2
    seed: int = 0
    # Feedback text put in the student's own prompt, framed as the teacher sees constant feedback:
    # how a model behaves *with* a feedback (internalisation is judged against this, without it).
    prompt_feedback: str = ""

    def __post_init__(self) -> None:
        if self.max_concurrent_checks < 1:
            raise ValueError(f"max_concurrent_checks must be at least 1, not {self.max_concurrent_checks}")


class Rollout:
    """Runs episodes of one policy against one prover; `run` is safe to call for many episodes at once."""

    def __init__(self, backend: GenerationBackend, tokenizer: Any, prover: Prover, config: RolloutConfig,
                 *, model_name: str = "", feedback: Any = None) -> None:
        self.backend = backend
        self.prover = prover
        self.config = config
        self.model_name = model_name
        self.feedback = feedback
        self.tokenizer = tokenizer
        self._checks_by_loop: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._chat: ChatFormat | None = None

    @property
    def _checks(self) -> asyncio.Semaphore:
        """The check-concurrency limit of the running event loop (each `asyncio.run` has its own loop)."""
        loop = asyncio.get_running_loop()
        if self._checks_by_loop is None or self._checks_by_loop[0] is not loop:
            self._checks_by_loop = (loop, asyncio.Semaphore(self.config.max_concurrent_checks))
        return self._checks_by_loop[1]

    def chat(self, tools: list[dict]) -> ChatFormat:
        if self._chat is None:
            self._chat = ChatFormat(self.tokenizer, tools)
        return self._chat

    async def run(self, problem: Problem, *, index: int = 0) -> Episode:
        """One episode; never raises for a failure inside the episode."""
        seed = self.config.seed * 1_000_003 + index
        state = _State(problem=problem, seed=seed, policy_version=self.backend.policy_version)
        start = time.monotonic()
        env = ProverEnv([problem], self.prover, max_turns=self.config.max_turns,
                        check_timeout_s=self.config.check_timeout_s)
        try:
            await self._play(env, state)
        except Exception as e:  # noqa: BLE001 - the episode records it; the run goes on
            state.finish_reason, state.error = "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
            state.reward = 0.0
        finally:
            env.close()
        state.timings["total_s"] = time.monotonic() - start
        episode = state.episode(self.model_name, self.prover.name)
        if self.feedback is not None and state.finish_reason != "error":
            try:
                episode.feedback = await self._feedback(episode, state)
            except Exception as e:  # noqa: BLE001 - an episode without feedback is still a valid episode
                episode.error = f"feedback failed: {type(e).__name__}: {e}"
        return episode

    async def _play(self, env: ProverEnv, state: _State) -> None:
        cfg = self.config
        obs, _ = env.reset(seed=state.seed, options={"problem": state.problem})
        chat = self.chat(obs["tools"])
        state.messages = list(obs["messages"])
        if cfg.prompt_feedback:
            from agent.feedback.base import framed, teacher_messages

            state.messages = teacher_messages(state.messages, framed(cfg.prompt_feedback))
        prompt = chat.prompt_ids(state.messages)
        state.append(prompt, generated=False)
        state.prompt_len = len(prompt)
        if len(prompt) > cfg.max_prompt_tokens:
            state.finish_reason = "prompt_too_long"
            return
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, stop_token_ids=chat.stop_token_ids)
        turn = 0
        while True:
            budget = cfg.max_new_tokens - state.num_generated
            if budget <= 0:
                await self._end(env, state, "token_budget")
                return
            t0 = time.monotonic()
            gen = await self.backend.generate(state.token_ids, replace(params, max_new_tokens=budget,
                                                                       seed=state.seed * 7919 + turn))
            state.timings["generation_s"] += time.monotonic() - t0
            state.append(gen.token_ids, generated=True, logprobs=gen.logprobs)
            text = chat.assistant_text(gen.token_ids)
            state.messages.append({"role": "assistant", "content": text})
            calls = parse_tool_calls(text)
            if gen.finish_reason == "length":
                await self._end(env, state, "token_budget")
                return
            if not calls:
                await self._end(env, state, "no_tool_call")
                return
            turn += 1
            tool_messages, over = [], False
            for call in calls:
                message, over = await self._execute(env, state, call, turn)
                tool_messages.append(message)
                if over:
                    break
            state.append(chat.tool_turn_ids(state.messages, tool_messages), generated=False)
            state.messages.extend(tool_messages)
            if over:
                return

    async def _execute(self, env: ProverEnv, state: _State, call: Any, turn: int) -> tuple[dict, bool]:
        """Run one parsed call; returns the tool message and whether the episode is over."""
        if isinstance(call, MalformedCall):
            text = f"Error: {call.error}"
            state.tool_calls.append(ToolCallRecord(turn, "<malformed>", call.raw, text, True, 0.0))
            return {"role": "tool", "name": "<malformed>", "content": text}, False
        t0 = time.monotonic()
        action = {"name": call.name, "arguments": call.arguments}
        async with self._checks:
            obs, reward, terminated, truncated, info = await asyncio.to_thread(env.step, action)
        elapsed = time.monotonic() - t0
        state.timings["tool_s"] += elapsed
        state.timings["check_s"] += info["timings"].get("check_s", 0.0)
        message = obs["messages"][0]
        state.tool_calls.append(ToolCallRecord(turn, call.name, call.arguments, message["content"],
                                               info["tool_error"], elapsed, info["verdict"]))
        if info["verdict"] is not None:
            state.verdict = info["verdict"]
        if terminated or truncated:
            state.reward = reward
            state.finish_reason = "solved" if reward == 1.0 else "turn_budget"
            return message, True
        return message, False

    async def _end(self, env: ProverEnv, state: _State, reason: str) -> None:
        """The model stopped (or ran out of tokens): the env gives an unchecked last file its final check."""
        async with self._checks:
            _, reward, _, _, info = await asyncio.to_thread(env.step, {"name": DONE})
        state.timings["check_s"] += info["timings"].get("final_check_s", 0.0)
        if info.get("verdict") is not None:
            state.verdict = info["verdict"]
        state.reward = reward
        state.finish_reason = "solved" if reward == 1.0 else reason

    async def _feedback(self, episode: Episode, state: _State) -> Feedback:
        from agent.feedback import teacher_messages
        from agent.feedback.base import Attempt

        solution = next((c.arguments.get("content") for c in reversed(episode.tool_calls)
                         if isinstance(c.arguments, dict) and c.name == self.prover.tools.write), None)
        final_output = next((c.output for c in reversed(episode.tool_calls) if c.verdict is not None), "")
        attempt = Attempt(problem=state.problem, transcript=transcript(episode.messages[2:]),
                          final_output=final_output, solved=episode.solved,
                          solution=solution if episode.solved else None, language=self.prover.language)
        t0 = time.monotonic()
        text = await self.feedback.feedback(attempt)
        teacher = teacher_messages(episode.messages[:2], text)
        assert self._chat is not None
        return Feedback(source=self.feedback.name, text=text, teacher_messages=teacher,
                        teacher_prompt_ids=self._chat.prompt_ids(teacher), elapsed_s=time.monotonic() - t0)


@dataclass
class _State:
    problem: Problem
    seed: int
    policy_version: int

    def __post_init__(self) -> None:
        self.messages: list[dict] = []
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_len = 0
        self.num_generated = 0
        self.tool_calls: list[ToolCallRecord] = []
        self.verdict: dict | None = None
        self.reward = 0.0
        self.finish_reason = "error"
        self.error: str | None = None
        self.timings = {"generation_s": 0.0, "tool_s": 0.0, "check_s": 0.0}

    def append(self, ids: Sequence[int], *, generated: bool, logprobs: Sequence[float] | None = None) -> None:
        self.token_ids.extend(ids)
        self.loss_mask.extend([int(generated)] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        if generated:
            self.num_generated += len(ids)

    def episode(self, model: str, prover: str) -> Episode:
        return Episode(
            episode_id=uuid.uuid4().hex, problem=self.problem.to_dict(), prover=prover, model=model,
            policy_version=self.policy_version, messages=self.messages, prompt_len=self.prompt_len,
            token_ids=self.token_ids, loss_mask=self.loss_mask, logprobs=self.logprobs, tool_calls=self.tool_calls,
            verdict=self.verdict, reward=self.reward, finish_reason=self.finish_reason,  # type: ignore[arg-type]
            seeds={"episode": self.seed}, timings=self.timings, num_generated=self.num_generated, error=self.error)


def transcript(messages: list[dict]) -> str:
    """The attempt as text for a feedback model: assistant turns and tool outputs, in order."""
    parts = []
    for m in messages:
        label = "assistant" if m["role"] == "assistant" else f"tool output ({m.get('name', 'tool')})"
        parts.append(f"[{label}]\n{m['content']}")
    return "\n\n".join(parts)


PROGRESS_INTERVAL_S = 1.0  # how often the progress bar reads the backend's token count


async def rollout_many(rollout: Rollout, problems: Sequence[Problem], n_samples: int,
                       writer: EpisodeWriter | None = None, *, progress: bool = True) -> list[Episode]:
    """`n_samples` episodes per problem, all concurrently; each is written as soon as it ends.

    The progress bar counts finished episodes and, refreshed every `PROGRESS_INTERVAL_S` while
    they run, the tokens generated so far and their rate (an episode can take minutes to end).
    """
    from tqdm.auto import tqdm

    jobs = [(p, k) for p in problems for k in range(n_samples)]
    bar = tqdm(total=len(jobs), desc="episodes", unit="ep", disable=not progress)
    solved, first_token, start = 0, rollout.backend.generated_tokens, time.monotonic()

    def show() -> None:
        tokens = rollout.backend.generated_tokens - first_token
        bar.set_postfix(solved=solved, tokens=tokens, tok_s=f"{tokens / max(time.monotonic() - start, 1e-9):.1f}")

    async def tick() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            show()

    async def one(index: int, problem: Problem) -> Episode:
        nonlocal solved
        episode = await rollout.run(problem, index=index)
        if writer is not None:
            writer.write(episode)
        solved += episode.solved
        bar.update(1)
        show()
        return episode

    ticker = asyncio.create_task(tick()) if progress else None
    try:
        return list(await asyncio.gather(*(one(i, p) for i, (p, _) in enumerate(jobs))))
    finally:
        if ticker is not None:
            ticker.cancel()
        bar.close()


def make_backend(name: str, model: str, *, device: str = "cpu", dtype: str | None = None, seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 enable_sleep_mode: bool = False) -> tuple[GenerationBackend, Any]:
    """(backend, tokenizer) for `transformers` or `vllm`; dtype None: float32 on CPU, bfloat16 on GPU, vLLM's auto.

    The last three arguments are vLLM's (see `VLLMBackend`)."""
    from agent.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    if name == "transformers":
        from agent.backends.hf import TransformersBackend
        from agent.models import load_model

        dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
        return TransformersBackend(load_model(model, dtype=dtype, device=device, seed=seed), tokenizer,
                                   seed=seed), tokenizer
    if name == "vllm":
        from agent.backends.vllm import VLLMBackend
        from agent.models import model_path

        # Rollouts stop on token ids, never on strings, so the engine needs no tokenizer (the named
        # models' directories hold none).
        return VLLMBackend(model_path(model), tensor_parallel_size=tensor_parallel_size, dtype=dtype or "auto",
                           seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                           enable_sleep_mode=enable_sleep_mode, skip_tokenizer_init=True), tokenizer
    raise ValueError(f"unknown backend {name!r}: use 'transformers' or 'vllm'")


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent.rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--problems", required=True, help="problems JSONL")
    parser.add_argument("--model", required=True, help="smollm2 | tiny-qwen3 | tiny-llama | a model directory")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--prover", choices=["rocq", "lean"], default="rocq")
    parser.add_argument("--n-samples", type=int, default=1, help="episodes per problem")
    parser.add_argument("--out", type=Path, required=True, help="episode log (JSONL, appended to)")
    parser.add_argument("--feedback", choices=["claude", "self", "compiler", "ground_truth", "constant"])
    parser.add_argument("--feedback-text", default=None, help="the text of `constant` feedback (default: be concise)")
    parser.add_argument("--feedback-model", default=None, help="the Claude model of `claude` feedback")
    parser.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=RolloutConfig.max_new_tokens)
    parser.add_argument("--max-turns", type=int, default=RolloutConfig.max_turns)
    parser.add_argument("--temperature", type=float, default=RolloutConfig.temperature)
    parser.add_argument("--max-concurrent-checks", type=int, default=RolloutConfig.max_concurrent_checks,
                        help="prover checks running at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU, auto for vLLM")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser()
    args = parser.parse_args(argv)

    from env.problems import load_problems
    from env.provers import make_prover

    problems = [p for p in load_problems(args.problems) if p.prover == args.prover][: args.limit or None]
    if not problems:
        parser.error(f"no {args.prover} problems in {args.problems}")
    try:
        config = RolloutConfig(max_new_tokens=args.max_new_tokens, max_turns=args.max_turns,
                               temperature=args.temperature, max_concurrent_checks=args.max_concurrent_checks,
                               seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    backend, tokenizer = make_backend(args.backend, args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    prover = make_prover(args.prover)
    start = time.monotonic()
    try:
        feedback = _make_feedback(args, backend, tokenizer) if args.feedback else None
        rollout = Rollout(backend, tokenizer, prover, config, model_name=args.model, feedback=feedback)
        episodes = asyncio.run(rollout_many(rollout, problems, args.n_samples, EpisodeWriter(args.out)))
    except FeedbackError as e:  # a feedback source that cannot start (no API key, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        backend.close()
        prover.close()
    elapsed = time.monotonic() - start
    tokens = sum(e.num_generated for e in episodes)
    errors = sum(e.finish_reason == "error" for e in episodes)
    print(json.dumps({"solved": sum(e.solved for e in episodes), "episodes": len(episodes), "errors": errors,
                      "generated_tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1),
                      "wall_s": round(elapsed, 1), "out": str(args.out)}))
    print(f"solved {sum(e.solved for e in episodes)} of {len(episodes)}, {tokens / elapsed:.1f} tokens/s")
    return 0


def _make_feedback(args: argparse.Namespace, backend: GenerationBackend, tokenizer: Any) -> Any:
    """The CLI's feedback source. `self` shares the rollout's backend: here the policy is never updated."""
    from agent.feedback import make_feedback
    from agent.feedback.sources import BE_CONCISE

    if args.feedback == "self":
        sampling = SamplingParams(temperature=args.temperature, max_new_tokens=1024,
                                  stop_token_ids=(tokenizer.eos_token_id,))
        return make_feedback("self", backend=backend, tokenizer=tokenizer, sampling=sampling)
    if args.feedback == "constant":
        return make_feedback("constant", text=args.feedback_text or BE_CONCISE)
    if args.feedback == "claude" and args.feedback_model:
        return make_feedback("claude", model=args.feedback_model)
    return make_feedback(args.feedback)


class ProverUnavailableError(RuntimeError):
    """The prover a run asks for cannot run here; the message says why and how to fix it."""


def resolve_prover(name: str) -> tuple[str, str]:
    """(prover, why): `auto` picks Lean where the pinned Lake project is built (and jailed), else Rocq.

    Asking for `lean` where it cannot run raises ProverUnavailableError with the reason.
    """
    from env.provers.lean import unavailable_reason

    if name == "rocq":
        return name, "chosen in the config"
    reason = unavailable_reason()
    if name == "lean":
        if reason is not None:
            raise ProverUnavailableError(f"prover=lean, but {reason}")
        return name, "chosen in the config"
    if reason is None:
        return "lean", "the pinned Lean project is built"
    return "rocq", f"Lean is unavailable ({reason})"


def load_problem_set(path: str | Path | None, prover: str) -> list[Problem]:
    """The problems of `path` for `prover`; with no path, our own set for that prover."""
    from env.problems import load_problems

    if not path:
        path = Path(__file__).resolve().parents[1] / "data" / f"{prover}_problems.jsonl"
    problems = [p for p in load_problems(path) if p.prover == prover]
    if not problems:
        raise ValueError(f"no {prover} problems in {path}")
    return problems


def make_rollout(backend: GenerationBackend, tokenizer: Any, prover_name: str, config: RolloutConfig, *,
                 model_name: str = "", feedback: Any = None) -> Rollout:
    """A `Rollout` with a fresh prover of the given name (the caller closes `rollout.prover`)."""
    from env.provers import make_prover

    return Rollout(backend, tokenizer, make_prover(prover_name, timeout_s=config.check_timeout_s), config,
                   model_name=model_name, feedback=feedback)


if __name__ == "__main__":
    raise SystemExit(main())
