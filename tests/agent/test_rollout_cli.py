"""`python -m agent.rollout` and the helpers around the rollout loop: backends, feedback sources,
problem sets, the transcript a feedback model reads. Real tiny model, real tokenizer, real Rocq."""

import asyncio
import inspect
import json
import re

import pytest
import torch

from agent import rollout as rollout_module
from agent.backends.base import SamplingParams
from agent.episode import read_episodes
from agent.rollout import (
    _make_feedback,
    load_problem_set,
    main,
    make_backend,
    make_rollout,
    resolve_prover,
    transcript,
)
from tests.conftest import DATA, requires_coq


@pytest.fixture
def recorded(monkeypatch):
    """The CLI's real backend, with every request's sampling parameters recorded."""
    params: list[SamplingParams] = []
    real = rollout_module.make_backend

    def make(*args, **kwargs):
        backend, tokenizer = real(*args, **kwargs)
        generate = backend.generate

        async def recording(prompt_ids, p):
            params.append(p)
            return await generate(prompt_ids, p)

        backend.generate = recording
        return backend, tokenizer

    monkeypatch.setattr(rollout_module, "make_backend", make)
    return params


@pytest.fixture
def settings(monkeypatch):
    """What the CLI hands to `make_backend` and to `Rollout` (both still run for real)."""
    seen = {}
    real_make, real_rollout = rollout_module.make_backend, rollout_module.Rollout

    def make(*args, **kwargs):
        seen["backend"] = (args, kwargs)
        return real_make(*args, **kwargs)

    class Recording(real_rollout):
        def __init__(self, *args, **kwargs):
            seen["rollout"] = (args, kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "make_backend", make)
    monkeypatch.setattr(rollout_module, "Rollout", Recording)
    return seen


@requires_coq
def test_cli_runs_episodes_with_its_settings_and_appends_them(tmp_path, capsys, recorded, settings):
    out = tmp_path / "e.jsonl"
    argv = ["--problems", str(DATA / "rocq_problems.jsonl"), "--model", "tiny-qwen3", "--limit", "2",
            "--n-samples", "2", "--max-new-tokens", "12", "--temperature", "0.7", "--seed", "3", "--max-turns", "4",
            "--max-concurrent-checks", "1", "--feedback", "constant", "--feedback-text", "Use lia.",
            "--out", str(out)]
    assert main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    summary = json.loads(first)
    assert (summary["solved"], summary["episodes"], summary["errors"], summary["out"]) == (0, 4, 0, str(out))
    assert summary["generated_tokens"] == 4 * 12 and summary["wall_s"] > 0
    # tokens / wall time, up to the rounding of both to 0.1
    assert abs(summary["tokens_per_s"] * summary["wall_s"] - 48) <= 0.05 * summary["tokens_per_s"] + 0.05 * \
        summary["wall_s"] + 0.01
    assert summary["tokens_per_s"] == round(summary["tokens_per_s"], 1) and summary["wall_s"] == round(
        summary["wall_s"], 1)
    assert re.fullmatch(r"solved 0 of 4, [0-9.]+ tokens/s", second)
    args, kwargs = settings["backend"]
    assert args == ("transformers", "tiny-qwen3") and kwargs == {"device": "cpu", "dtype": None, "seed": 3}
    config = settings["rollout"][0][3]
    assert (config.max_new_tokens, config.max_turns, config.temperature, config.max_concurrent_checks,
            config.seed) == (12, 4, 0.7, 1, 3)
    episodes = list(read_episodes(out))
    assert len(episodes) == 4 and {e.problem["name"] for e in episodes} == {
        json.loads(line)["name"] for line in (DATA / "rocq_problems.jsonl").read_text().splitlines()[:2]}
    assert all(e.num_generated == 12 and e.finish_reason == "token_budget" for e in episodes)
    assert all(e.model == "tiny-qwen3" and e.prover == "rocq" for e in episodes)
    assert all(e.feedback is not None and e.feedback.source == "constant" and "Use lia." in e.feedback.text
               for e in episodes)
    assert sorted(e.seeds["episode"] for e in episodes) == [3 * 1_000_003 + i for i in range(4)]
    assert {p.temperature for p in recorded} == {0.7} and all(p.max_new_tokens <= 12 for p in recorded)
    two = tmp_path / "two.jsonl"
    two.write_text("".join((DATA / "rocq_problems.jsonl").read_text().splitlines(keepends=True)[2:4]))
    assert main(["--problems", str(two), "--model", "tiny-qwen3", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert len(list(read_episodes(out))) == 6  # appended (the earlier episodes kept): every problem, one sample each


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    problems = str(DATA / "rocq_problems.jsonl")
    with pytest.raises(SystemExit) as exit_:
        main(["--problems", problems, "--prover", "lean", "--model", "tiny-qwen3", "--out", str(tmp_path / "e")])
    assert exit_.value.code == 2 and f"no lean problems in {problems}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--problems", problems, "--model", "tiny-qwen3", "--max-concurrent-checks", "0",
              "--out", str(tmp_path / "e")])
    assert "max_concurrent_checks must be at least 1" in capsys.readouterr().err
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert main(["--problems", problems, "--model", "tiny-qwen3", "--limit", "1", "--feedback", "claude",
                 "--out", str(tmp_path / "e")]) == 2
    assert "ANTHROPIC_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() or not (tmp_path / "e").read_text()


def test_make_backend_transformers_and_unknown():
    backend, tokenizer = make_backend("transformers", "tiny-qwen3", seed=5)
    try:
        assert next(backend.model.parameters()).dtype.is_floating_point
        assert str(next(backend.model.parameters()).dtype) == "torch.float32"  # float32 on a CPU
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") is not None
    finally:
        backend.close()
    with pytest.raises(ValueError, match="unknown backend 'tgi'"):
        make_backend("tgi", "tiny-qwen3")


def test_make_backend_transformers_loads_as_asked(monkeypatch):
    """What reaches the real `load_model` and `TransformersBackend`; the device is recorded, and the model
    then built on the CPU (no GPU here)."""
    import agent.models
    from agent.backends import hf

    load, backend_class, loads, made = agent.models.load_model, hf.TransformersBackend, [], []

    class Recording(backend_class):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(agent.models, "load_model", lambda model, **kw: loads.append((model, kw)) or load(
        model, **{**kw, "device": "cpu"}))
    monkeypatch.setattr(hf, "TransformersBackend", Recording)
    gpu, tokenizer = make_backend("transformers", "tiny-qwen3", device="cuda:1", seed=7)
    cpu, _ = make_backend("transformers", "tiny-qwen3")
    half, _ = make_backend("transformers", "tiny-qwen3", dtype="bfloat16")
    try:
        assert loads == [("tiny-qwen3", {"dtype": "bfloat16", "device": "cuda:1", "seed": 7}),
                         ("tiny-qwen3", {"dtype": "float32", "device": "cpu", "seed": 0}),
                         ("tiny-qwen3", {"dtype": "bfloat16", "device": "cpu", "seed": 0})]
        assert gpu.tokenizer is tokenizer  # its stop strings need it
        assert [kw.get("seed") for kw in made] == [7, 0, 0] and gpu._rng.initial_seed() == 7
        assert next(half.model.parameters()).dtype == torch.bfloat16
    finally:
        for backend in (gpu, cpu, half):
            backend.close()


def test_make_backend_vllm_arguments(monkeypatch):
    """vLLM needs a GPU: a recorder with `VLLMBackend`'s real signature takes its place."""
    from agent.backends import vllm

    signature, made = inspect.signature(vllm.VLLMBackend), []
    monkeypatch.setattr(vllm, "VLLMBackend", lambda *a, **kw: made.append(signature.bind(*a, **kw).arguments))
    make_backend("vllm", "tiny-qwen3", seed=4, tensor_parallel_size=2, gpu_memory_utilization=0.3,
                 enable_sleep_mode=True)
    make_backend("vllm", "tiny-qwen3", dtype="bfloat16")
    first, second = made
    from agent.models import model_path

    assert first["model"] == model_path("tiny-qwen3") and first["skip_tokenizer_init"] is True
    assert (first["tensor_parallel_size"], first["gpu_memory_utilization"], first["enable_sleep_mode"],
            first["seed"], first["dtype"]) == (2, 0.3, True, 4, "auto")
    assert second["dtype"] == "bfloat16"
    # the defaults: one GPU, vLLM's own share of it, no sleep mode (the trainer sets its own)
    assert (second["tensor_parallel_size"], second["gpu_memory_utilization"], second["enable_sleep_mode"],
            second["seed"]) == (1, 0.9, False, 0)


class Args:
    def __init__(self, feedback, text=None, model=None, temperature=0.9):
        self.feedback, self.feedback_text, self.feedback_model, self.temperature = feedback, text, model, temperature


def test_feedback_sources_of_the_cli(qwen_tokenizer, monkeypatch):
    from agent.feedback.sources import BE_CONCISE

    own = _make_feedback(Args("self"), backend="the rollout's backend", tokenizer=qwen_tokenizer)
    assert own.name == "self" and own.backend == "the rollout's backend" and own.tokenizer is qwen_tokenizer
    assert own.sampling.stop_token_ids == (qwen_tokenizer.eos_token_id,) and own.sampling.temperature == 0.9
    assert own.sampling.max_new_tokens == 1024
    assert _make_feedback(Args("constant"), None, qwen_tokenizer).text == BE_CONCISE
    assert _make_feedback(Args("constant", text="Shorter."), None, qwen_tokenizer).text == "Shorter."
    assert _make_feedback(Args("compiler"), None, qwen_tokenizer).name == "compiler"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    assert _make_feedback(Args("claude", model="claude-x"), None, qwen_tokenizer).model == "claude-x"
    assert _make_feedback(Args("claude"), None, qwen_tokenizer).model == "claude-opus-4-6"


def test_transcript_labels_turns_and_tool_outputs():
    text = transcript([{"role": "assistant", "content": "I will check."},
                       {"role": "tool", "name": "rocq_check_file", "content": "Error: no."},
                       {"role": "tool", "content": "bare"}])
    assert text == ("[assistant]\nI will check.\n\n[tool output (rocq_check_file)]\nError: no.\n\n"
                    "[tool output (tool)]\nbare")


def test_problem_sets(tmp_path):
    ours = load_problem_set(None, "rocq")
    assert len(ours) == len((DATA / "rocq_problems.jsonl").read_text().splitlines()) and \
        all(p.prover == "rocq" for p in ours)
    assert [p.name for p in load_problem_set(str(DATA / "rocq_problems.jsonl"), "rocq")] == [p.name for p in ours]
    with pytest.raises(ValueError, match="no lean problems in"):
        load_problem_set(str(DATA / "rocq_problems.jsonl"), "lean")


@requires_coq
def test_make_rollout_gives_the_prover_the_check_timeout(qwen_tokenizer):
    config = rollout_module.RolloutConfig(check_timeout_s=7.5)
    made = make_rollout("backend", qwen_tokenizer, "rocq", config, model_name="m", feedback="fb")
    plain = make_rollout("backend", qwen_tokenizer, "rocq", config)
    try:
        assert made.prover.name == "rocq" and made.prover.timeout_s == 7.5
        assert (made.backend, made.model_name, made.feedback) == ("backend", "m", "fb")
        assert made.tokenizer is qwen_tokenizer and made.config is config
        assert (plain.model_name, plain.feedback) == ("", None)
    finally:
        made.prover.close()
        plain.prover.close()


def test_rocq_is_taken_as_asked_and_lean_where_its_project_is_built(monkeypatch):
    assert resolve_prover("rocq") == ("rocq", "chosen in the config")
    from env.provers import lean

    monkeypatch.setattr(lean, "unavailable_reason", lambda: None)  # as where `lake build` has run
    assert resolve_prover("lean") == ("lean", "chosen in the config")
    assert resolve_prover("auto") == ("lean", "the pinned Lean project is built")


def test_rollout_config_refuses_no_check_slots():
    with pytest.raises(ValueError, match="at least 1, not 0"):
        rollout_module.RolloutConfig(max_concurrent_checks=0)
    assert rollout_module.RolloutConfig(max_concurrent_checks=1).max_concurrent_checks == 1


def test_a_progress_bar_unless_asked_not_to(qwen_tokenizer, capsys):
    from tests.agent.test_rollout import make_rollout as scripted

    class NoProver:
        name = "rocq"

    rollout = scripted(qwen_tokenizer, NoProver(), lambda prompt, turn: "x")
    assert asyncio.run(rollout_module.rollout_many(rollout, [], 1)) == []
    assert re.search(r"episodes: .*0ep", capsys.readouterr().err)  # the default: a bar counting episodes
    assert asyncio.run(rollout_module.rollout_many(rollout, [], 1, progress=False)) == []
    assert "episodes" not in capsys.readouterr().err


def test_cli_help_and_required_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m agent.rollout ")
    assert "Multi-turn rollouts: generation and tool execution through the Gymnasium env" in text  # the description
    for option in ["--problems PROBLEMS problems JSONL --model",
                   "--model MODEL smollm2 | tiny-qwen3 | tiny-llama | a model directory --backend",
                   "--backend {transformers,vllm} --prover {rocq,lean} --n-samples",
                   "--n-samples N_SAMPLES episodes per problem --out",
                   "--out OUT episode log (JSONL, appended to) --feedback {claude,self,compiler,ground_truth,constant}",
                   "--feedback-text FEEDBACK_TEXT the text of `constant` feedback (default: be concise) --feedback-",
                   "--feedback-model FEEDBACK_MODEL the Claude model of `claude` feedback --limit",
                   "--limit LIMIT only the first N problems (0: all) --max-new-tokens",
                   "--max-concurrent-checks MAX_CONCURRENT_CHECKS prover checks running at once --seed",
                   "--dtype DTYPE default: float32 on CPU, bfloat16 on GPU, auto for vLLM"]:
        assert option in text, option
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "the following arguments are required: --problems, --model, --out" in capsys.readouterr().err


def test_cli_defaults_are_the_rollout_config_defaults():
    from pathlib import Path

    from agent.rollout import RolloutConfig, cli_parser

    args = cli_parser().parse_args(["--problems", "p.jsonl", "--model", "m", "--out", "o.jsonl"])
    assert (args.backend, args.prover, args.n_samples, args.limit, args.feedback, args.feedback_text,
            args.feedback_model, args.seed, args.device, args.dtype) == ("transformers", "rocq", 1, 0, None, None,
                                                                         None, 0, "cpu", None)
    assert args.out == Path("o.jsonl") and args.problems == "p.jsonl" and args.model == "m"
    defaults = RolloutConfig()
    assert (args.max_new_tokens, args.max_turns, args.temperature, args.max_concurrent_checks) == (
        defaults.max_new_tokens, defaults.max_turns, defaults.temperature, defaults.max_concurrent_checks)
    typed = cli_parser().parse_args(["--problems", "p", "--model", "m", "--out", "o", "--n-samples", "3", "--limit",
                                     "2", "--max-new-tokens", "9", "--max-turns", "4", "--temperature", "0.5",
                                     "--max-concurrent-checks", "6", "--seed", "8"])
    assert (typed.n_samples, typed.limit, typed.max_new_tokens, typed.max_turns, typed.temperature,
            typed.max_concurrent_checks, typed.seed) == (3, 2, 9, 4, 0.5, 6, 8)


@requires_coq
def test_cli_self_feedback_is_written_by_the_rollout_s_own_model(tmp_path):
    out = tmp_path / "e.jsonl"
    assert main(["--problems", str(DATA / "rocq_problems.jsonl"), "--model", "tiny-qwen3", "--limit", "1",
                 "--max-new-tokens", "4", "--feedback", "self", "--out", str(out)]) == 0
    [episode] = read_episodes(out)
    assert episode.error is None and episode.feedback.source == "self" and episode.feedback.text


@requires_coq
def test_cli_summary_counts_crashed_episodes(tmp_path, capsys, monkeypatch):
    """The real backend, made to fail every request of one problem of three: its episodes end in `error`
    and the summary counts them; the other problems' episodes are kept."""
    real = rollout_module.make_backend
    problems = [json.loads(line) for line in (DATA / "rocq_problems.jsonl").read_text().splitlines()[:3]]

    def make(*args, **kwargs):
        backend, tokenizer = real(*args, **kwargs)
        generate = backend.generate

        async def failing(prompt_ids, p):
            if problems[1]["name"] in tokenizer.decode(prompt_ids):
                raise RuntimeError("engine died")
            return await generate(prompt_ids, p)

        backend.generate = failing
        return backend, tokenizer

    monkeypatch.setattr(rollout_module, "make_backend", make)
    out = tmp_path / "e.jsonl"
    assert main(["--problems", str(DATA / "rocq_problems.jsonl"), "--model", "tiny-qwen3", "--limit", "3",
                 "--n-samples", "3", "--max-new-tokens", "4", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (summary["episodes"], summary["errors"], summary["solved"]) == (9, 3, 0)
    assert summary["generated_tokens"] == 6 * 4  # the crashed episodes generated nothing
    episodes = list(read_episodes(out))
    assert sorted((e.problem["name"], e.finish_reason) for e in episodes) == sorted(
        [(problems[0]["name"], "token_budget")] * 3 + [(problems[1]["name"], "error")] * 3
        + [(problems[2]["name"], "token_budget")] * 3)
