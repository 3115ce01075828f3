"""One optimisation step's loss and gradients for FD and GRPO, over micro-batches.

Both accumulate gradients over token-budgeted micro-batches and divide every
micro-batch's summed loss by the token count of the whole step (over all ranks, under
torchrun), so the gradient does not depend on how the step is split (tested: 1 x 8 ==
8 x 1, and 2 ranks == 1). A micro-batch is packed end to end in one row without padding
(`trainer.batches`); the models it runs through are switched from `sdpa` to the packed
attention on first use (`trainer.attention`; every other call of theirs behaves as
before). Only trained positions (loss_mask 1) reach the LM head, whose loss gradient is
computed in its forward pass (`trainer.lm_head`).

How this differs from the paper's setup: one optimizer step per rollout batch, so GRPO's
"old" policy is the current one (ratio 1 at the update; clipping matters only if a
caller takes several steps per batch), and the reference policy for the KL term is the
initial model.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch.profiler import record_function
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from trainer import distributed
from trainer.attention import packed_kwargs, use_packed_attention
from trainer.batches import Packed, TrainSequence, micro_batches, student_batch, teacher_batch
from trainer.losses import chunked_token_stats, fd_loss, grpo_head_loss, teacher_topk


def hidden_states(model: torch.nn.Module, packed: Packed) -> torch.Tensor:
    """Final hidden states at the trained positions, [N, H]; the LM head is applied later, in chunks."""
    length = packed.input_ids.shape[1]
    out = model.get_decoder()(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                              **packed_kwargs(model, packed.seq_lens, length, packed.input_ids.device))
    return out.last_hidden_state[0].index_select(0, packed.hidden_index)


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.get_output_embeddings().weight


aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps: the matmuls and attention, nearly all of a layer's FLOPs.
_KEPT = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_dot_product_flash_attention.default,
         aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default,
         aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_activations(model: torch.nn.Module, mode: Literal["full", "selective"]) -> None:
    """Recompute activations in backward, per decoder layer. `full` keeps only each layer's input
    (least memory; the layers' forward runs twice: 8 N FLOPs per token instead of 6 N).
    `selective` also keeps the outputs of the matmuls and attention and recomputes only the
    elementwise ops (norms, activation, rotary embedding): almost no FLOPs run twice, for
    less activation memory than no checkpointing, more than `full`."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def plan(sequences: Sequence[TrainSequence], token_budget: int, pad_id: int) -> tuple[list[list[TrainSequence]], int]:
    """The micro-batches of this rank and the loss-token count of the whole step over all ranks.

    A rank with fewer micro-batches than another gets empty ones (a single pad token, no
    loss position): they still run forward and backward, as FSDP's collectives need.
    """
    batches = micro_batches(sequences, token_budget)
    total = distributed.reduce_int(sum(s.num_loss_tokens for s in sequences), "sum")
    count = distributed.reduce_int(len(batches), "max")
    empty = TrainSequence([pad_id], 1, [0], [pad_id])
    return batches + [[empty]] * (count - len(batches)), total


class ScoringTimer:
    """Adds up the time of code blocks (the teacher's or reference's scoring) without synchronising the
    GPU: CUDA events, read once at the end; wall time on a CPU. Each block is also the profiler range
    `step.scoring` (the step's other ranges: `step.forward`, `step.head`, `step.backward`)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[Any, Any]] = []
        self.cpu_seconds = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with record_function("step.scoring"), self._timed():
            yield

    @contextmanager
    def _timed(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.cpu_seconds += time.perf_counter() - t0

    def seconds(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
        return self.cpu_seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1000


def fd_backward(student: torch.nn.Module, teacher: torch.nn.Module, sequences: Sequence[TrainSequence], *,
                top_k: int, renormalize: bool, token_budget: int, chunk: int, pad_id: int) -> dict[str, float]:
    """Accumulate the FD gradient of `sequences` into `student`; returns summed statistics."""

    def micro_loss(batch: list[TrainSequence], s: Packed, scoring: ScoringTimer) -> tuple[torch.Tensor,
                                                                                           dict[str, float]]:
        with torch.no_grad(), scoring():
            t = teacher_batch(batch, device=s.input_ids.device)
            ids, probs = teacher_topk(hidden_states(teacher, t), lm_head_weight(teacher), k=top_k, chunk=chunk)
        with record_function("step.forward"):
            hidden = hidden_states(student, s)
        with record_function("step.head"):
            return fd_loss(hidden, lm_head_weight(student), ids, probs, None, renormalize=renormalize, chunk=chunk)

    use_packed_attention(teacher)
    return _accumulate(student, sequences, micro_loss, token_budget=token_budget, pad_id=pad_id)


def grpo_backward(policy: torch.nn.Module, reference: torch.nn.Module | None, sequences: Sequence[TrainSequence], *,
                  clip_eps: float, kl_coef: float, token_budget: int, chunk: int, pad_id: int) -> dict[str, float]:
    """Accumulate the GRPO gradient; each sequence carries its (group-normalised) advantage."""

    def micro_loss(batch: list[TrainSequence], s: Packed, scoring: ScoringTimer) -> tuple[torch.Tensor,
                                                                                           dict[str, float]]:
        ref = None
        if reference is not None and kl_coef > 0:
            with torch.no_grad(), scoring():
                ref, _ = chunked_token_stats(hidden_states(reference, s), lm_head_weight(reference), s.targets,
                                             chunk=chunk)
        advantages = torch.tensor([b.advantage for b in batch], dtype=torch.float32)
        advantages = advantages.to(s.input_ids.device, non_blocking=True)[s.seq_index]
        with record_function("step.forward"):
            hidden = hidden_states(policy, s)
        with record_function("step.head"):
            return grpo_head_loss(hidden, lm_head_weight(policy), s.targets, ref, advantages, None,
                                  clip_eps=clip_eps, kl_coef=kl_coef, chunk=chunk)

    if reference is not None:
        use_packed_attention(reference)
    return _accumulate(policy, sequences, micro_loss, token_budget=token_budget, pad_id=pad_id)


MicroLoss = Callable[[list[TrainSequence], Packed, ScoringTimer], tuple[torch.Tensor, dict[str, float]]]


def _accumulate(model: torch.nn.Module, sequences: Sequence[TrainSequence], micro_loss: MicroLoss, *,
                token_budget: int, pad_id: int) -> dict[str, float]:
    """Run `micro_loss` on each micro-batch, backpropagate its sum over the step's token count, add up stats
    (and `scoring_seconds`: the time of the teacher's or reference's scoring, which `micro_loss` times)."""
    use_packed_attention(model)
    device = lm_head_weight(model).device
    batches, total = plan(sequences, token_budget, pad_id)
    stats: dict[str, float] = defaultdict(float)
    if total == 0:
        return dict(stats)
    scoring = ScoringTimer(device)
    for batch in batches:
        loss, batch_stats = micro_loss(batch, student_batch(batch, device=device), scoring)
        with record_function("step.backward"):
            (loss / total).backward()
        stats["loss_sum"] += float(loss.detach())
        for key, value in batch_stats.items():
            stats[key] += value
    stats["tokens"] = float(sum(seq.num_loss_tokens for seq in sequences))  # this rank's
    stats["scoring_seconds"] = scoring.seconds()
    return dict(stats)
