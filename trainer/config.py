"""The one flat config of `python -m trainer.run`: every field with a help line.

YAML files in `configs/` set these fields (a YAML file is just a mapping of them);
`key=value` arguments on the command line override them. An unknown key or a value of
the wrong type is a `ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit `TrainConfig`."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    algorithm: Literal["fd", "grpo"] = _f("fd", "fd: Feedback Distillation; grpo: GRPO "
                                             "(started from an FD checkpoint: GRPO over FD)")
    model: str = _f("smollm2", "smollm2 | tiny-qwen3 | tiny-llama | a Hugging Face model directory or checkpoint")
    backend: Literal["transformers", "vllm"] = _f("transformers", "generation backend for rollouts")
    vllm_gpu_memory_utilization: float = _f(0.5, "vLLM: share of each GPU its engine takes (weights, KV cache, "
                                                 "CUDA graphs); must be free at start, beside the trainer's models")
    vllm_enforce_eager: bool = _f(False, "vLLM: no CUDA graphs or compilation: the engine starts in seconds, not "
                                         "a minute, and generates slower (tests, small runs)")
    vllm_sleep: bool = _f(True, "vLLM: release the engine's weights and KV cache while training (sleep mode); "
                                "the weight sync after each step brings them back")
    vllm_request_seeds: bool = _f(False, "vLLM: sample each episode from its own seed (slower: vLLM launches a "
                                         "sampling kernel per seeded request and step); else the engine's seed")
    prover: Literal["auto", "lean", "rocq"] = _f("auto", "auto: Lean where the pinned Lake project is built, else Rocq")
    problems: str = _f("", "training problems (JSONL); default: our own set for the prover")
    # feedback (FD)
    feedback: Literal["claude", "self", "compiler", "ground_truth", "constant"] = _f("compiler", "FD feedback source")
    feedback_model: str = _f("claude-opus-4-6", "Claude model for `claude` feedback")
    feedback_prompt: int = _f(4, "feedback prompt (1)-(4) of the paper's appendix C.3")
    feedback_text: str = _f("Be concise", "the text of `constant` feedback")
    feedback_failures: Literal["fail", "skip"] = _f(
        "fail", "on a feedback error (e.g. the API failing after its retries): stop the run with the error (fail), "
        "or train on the other episodes and count it in train/feedback_failures (skip)")
    # schedule and batch
    steps: int = _f(3, "optimizer steps (one rollout batch each)")
    prompts_per_step: int = _f(4, "problems per step (paper: 128)")
    samples_per_prompt: int = _f(1, "episodes per problem (paper: FD 1, GRPO 5)")
    lr: float = _f(1e-5, "AdamW learning rate (paper: FD 1e-5, GRPO 1e-7)")
    warmup_steps: int = _f(50, "linear learning-rate warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient-norm clipping threshold")
    micro_batch_tokens: int = _f(4096, "tokens per micro-batch (sequences are packed up to this budget)")
    # FD
    top_k: int = _f(25, "FD: teacher top-K tokens per position")
    renormalize_top_k: bool = _f(False, "FD: renormalise teacher probabilities over the top K")
    ema_alpha: float = _f(0.9, "FD: teacher <- alpha*teacher + (1-alpha)*student; 1.0 freezes the teacher")
    ema_every: int = _f(5, "FD: optimizer steps between teacher EMA updates")
    # GRPO
    kl_coef: float = _f(0.001, "GRPO: k3 KL-to-initial-policy coefficient (0 disables the reference model)")
    clip_eps: float = _f(0.2, "GRPO: ratio clipping range")
    normalize_advantage_std: bool = _f(True, "GRPO: divide group-centred rewards by the group std")
    # rollouts
    max_new_tokens: int = _f(256, "generated tokens per attempt, over all turns (paper: 8192)")
    max_prompt_tokens: int = _f(2048, "longest prompt")
    max_turns: int = _f(32, "tool calls per attempt")
    temperature: float = _f(1.0, "sampling temperature")
    check_timeout_s: float = _f(60.0, "seconds per prover check")
    max_concurrent_checks: int = _f(2, "prover checks running at once on each rank (a process and a CPU core each; "
                                       "the others' generation goes on meanwhile)")
    # numerics and memory
    device: str = _f("auto", "auto: cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16"] = _f("auto", "auto: bfloat16 on GPU, float32 on CPU")
    gradient_checkpointing: bool = _f(True, "recompute activations in the backward pass")
    checkpoint_mode: Literal["full", "selective"] = _f(
        "full", "with gradient checkpointing: recompute each layer (full, least memory) or keep the matmul and "
        "attention outputs and recompute only elementwise ops (selective, almost no extra FLOPs)")
    fused_layers: bool = _f(True, "on CUDA, run the norms, rotary embedding and SwiGLU of Llama-family models as "
                                  "compiled fused kernels (the same math; trainer/fused_layers.py)")
    logit_chunk: int = _f(1024, "token positions per chunk when computing vocabulary logits")
    # evaluation, logging, checkpoints
    eval_problems: str = _f("", "evaluation problems (JSONL); empty: no periodic evaluation")
    eval_every: int = _f(0, "steps between evaluations (0: never)")
    eval_samples: int = _f(1, "samples per evaluation problem (n of pass@k)")
    out_dir: str = _f("runs/default", "episodes, metrics, checkpoints and the summary go here")
    checkpoint_every: int = _f(1, "steps between checkpoints")
    keep_checkpoints: int = _f(0, "keep only the newest N checkpoints (0: keep all)")
    resume: bool = _f(False, "continue from the last checkpoint in out_dir")
    wandb_project: str = _f("", "log to this wandb project too (offline unless wandb_mode=online)")
    wandb_mode: Literal["offline", "online"] = _f("offline", "wandb mode")
    seed: int = _f(0, "seed for sampling, problem order and initialisation")

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "samples_per_prompt", "micro_batch_tokens", "top_k", "ema_every",
                     "max_new_tokens", "max_turns", "max_concurrent_checks", "logit_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "kl_coef", "lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization is a share of a GPU, in (0, 1], "
                              f"not {self.vllm_gpu_memory_utilization}")
        if not 0 <= self.ema_alpha <= 1:
            raise ConfigError(f"ema_alpha must lie in [0, 1], not {self.ema_alpha}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def help_text() -> str:
    lines = []
    for f in fields(TrainConfig):
        lines.append(f"  {f.name} = {f.default!r}\n      {f.metadata['help']}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file's fields, then `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file is a mapping of TrainConfig fields")
        for key, value in (loaded or {}).items():
            values[key] = _coerce(str(key), value, source=str(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        values[key.strip()] = _coerce(key.strip(), yaml.safe_load(raw) if raw else "", source="command line",
                                      raw=raw)
    return TrainConfig(**values)


def _coerce(key: str, value: Any, *, source: str, raw: str | None = None) -> Any:
    known = {f.name: f for f in fields(TrainConfig)}
    if key not in known:
        raise ConfigError(f"{source}: unknown config key {key!r}; run `python -m trainer.run --help` for the keys")
    hint = typing.get_type_hints(TrainConfig)[key]
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{source}: {key} must be one of {list(typing.get_args(hint))}, not {value!r}")
        return value
    if hint is str:
        return raw if raw is not None else (value if isinstance(value, str) else _bad(key, value, "a string", source))
    if hint is bool:
        return value if isinstance(value, bool) else _bad(key, value, "true or false", source)
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _bad(key, value, "an integer",
                                                                                        source)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:  # YAML reads 1e-5 (no dot) as a string
            return float(value) if isinstance(value, str) else _bad(key, value, "a number", source)
        except ValueError:
            return _bad(key, value, "a number", source)
    raise AssertionError(f"unhandled type {hint} for {key}")


def _bad(key: str, value: Any, expected: str, source: str) -> Any:
    raise ConfigError(f"{source}: {key} must be {expected}, not {value!r}")
