"""Prover backends behind the `Prover` protocol of `env.provers.base`."""

from __future__ import annotations

from env.provers.base import CheckResult, Message, Prover, SearchHit, StatementCheck, ToolNames


def make_prover(name: str, **kwargs) -> Prover:
    """`rocq` or `lean`; keyword arguments go to the backend's constructor."""
    if name == "rocq":
        from env.provers.rocq import RocqProver

        return RocqProver(**kwargs)
    if name == "lean":
        from env.provers.lean import LeanProver

        return LeanProver(**kwargs)
    raise ValueError(f"unknown prover {name!r}: use 'rocq' or 'lean'")


__all__ = ["CheckResult", "Message", "Prover", "SearchHit", "StatementCheck", "ToolNames", "make_prover"]
