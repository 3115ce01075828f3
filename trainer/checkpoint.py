"""Checkpoints: the policy in Hugging Face format (loadable by transformers and vLLM) plus the
state an exact resume needs: optimizer, scheduler, teacher, RNG, data position, and the
byte lengths of the episode and metrics logs at that step.

Layout: `out_dir/checkpoints/step-000007/{model/, trainer_state.pt}` and
`out_dir/checkpoints/latest` naming the newest complete one. Under torchrun (N processes)
each rank also writes its own optimizer shard and RNG state, `trainer_state.rank{r}.pt`,
and a resume needs the same N. A checkpoint is written
into a temporary directory and renamed into place, and `latest` is replaced atomically,
so a run killed at any moment leaves the previous checkpoint intact. On resume the logs
are cut back to their recorded lengths: the step that was interrupted is redone, and no
episode or metrics record is lost or written twice.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer import distributed


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model: Any, tokenizer: Any, state: dict[str, Any],
                    rank_state: dict[str, Any], *, weights: dict[str, torch.Tensor] | None = None,
                    keep: int = 0) -> Path:
    """Rank 0 writes the model (`weights`: its full state dict, when sharded), the tokenizer and
    `state`; `rank_state` is each rank's own (with one process it goes into `state`).
    With `keep` > 0, older checkpoints beyond the newest `keep` are removed once `latest` names
    the new one. Called by every rank; returns once the checkpoint is complete."""
    rank, world = distributed.rank(), distributed.world_size()
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    if world > 1:
        torch.save(rank_state, tmp / f"trainer_state.rank{rank}.pt")
    if rank == 0:
        model.save_pretrained(tmp / "model", state_dict=weights)
        tokenizer.save_pretrained(tmp / "model")
        torch.save(state if world > 1 else {**state, **rank_state}, tmp / "trainer_state.pt")
    distributed.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        if keep > 0:
            for old in sorted(root.glob("step-*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(out_dir) / "latest"
    if not pointer.exists():
        return None
    path = checkpoint_root(out_dir) / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def load_state(path: Path) -> dict[str, Any]:
    """The saved state, with this rank's own part; the caller checks `world_size`."""
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    state.setdefault("world_size", 1)
    if state["world_size"] > 1 and state["world_size"] == distributed.world_size():
        # onto the device it was saved from: the optimizer's sharded state keeps its placement
        state.update(torch.load(path / f"trainer_state.rank{distributed.rank()}.pt", weights_only=False))
    return state


def truncate_log(path: Path, length: int) -> None:
    """Cut a log back to `length` bytes (what it held at the checkpoint)."""
    if path.exists() and path.stat().st_size > length:
        with path.open("r+b") as f:
            f.truncate(length)


def log_length(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
