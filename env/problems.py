"""Problems: the `Problem` type and loaders for JSONL files or Hugging Face datasets.

The JSONL schema (one object per line) has the keys `name`, `split`, `prover`
(`lean4` or `rocq`), `header`, `formal_statement`, `informal_statement`,
`formal_proof` and `source`. `formal_proof` is the text that follows the statement:
for Lean the tactics after `:= by`, for Rocq the tactics between `Proof.` and `Qed.`
(our own sets may end it with `Qed.`; rendering adds it only when missing).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

ProverName = Literal["lean", "rocq"]
_PROVER_ALIASES: dict[str, ProverName] = {"lean4": "lean", "lean": "lean", "rocq": "rocq", "coq": "rocq"}
_REQUIRED = ("name", "prover", "header", "formal_statement")


class ProblemFormatError(ValueError):
    """A problem file or record does not follow the schema."""


@dataclass(frozen=True)
class Problem:
    name: str
    prover: ProverName
    header: str
    formal_statement: str
    informal_statement: str | None = None
    formal_proof: str | None = None
    split: str | None = None
    source: str | None = None

    @classmethod
    def from_dict(cls, record: dict, *, where: str = "record") -> Problem:
        if not isinstance(record, dict):
            raise ProblemFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in _REQUIRED if not isinstance(record.get(k), str)]
        if missing:
            raise ProblemFormatError(f"{where}: missing or non-string keys {missing}")
        prover = _PROVER_ALIASES.get(record["prover"].lower())
        if prover is None:
            raise ProblemFormatError(f"{where}: unknown prover {record['prover']!r} (use lean4 or rocq)")
        name = record["name"]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'.]*", name):
            raise ProblemFormatError(f"{where}: {name!r} is not a valid theorem name")
        if not re.search(rf"\b(theorem|lemma|Theorem|Lemma)\s+{re.escape(name)}(?![\w'])", record["formal_statement"]):
            raise ProblemFormatError(f"{where}: formal_statement does not declare a theorem named {name!r}")
        optional = {k: record.get(k) for k in ("informal_statement", "formal_proof", "split", "source")}
        for key, value in optional.items():
            if value is not None and not isinstance(value, str):
                raise ProblemFormatError(f"{where}: {key} must be a string or null")
        return cls(name=name, prover=prover, header=record["header"],
                   formal_statement=record["formal_statement"], **optional)

    def to_dict(self) -> dict:
        record = asdict(self)
        record["prover"] = "lean4" if self.prover == "lean" else "rocq"
        return record


def load_problems(source: str | Path, *, split: str | None = None) -> list[Problem]:
    """Load problems from a JSONL path, or from a Hugging Face dataset name when no such file exists."""
    path = Path(source)
    if path.exists():
        return _load_jsonl(path)
    if str(source).endswith(".jsonl"):
        raise FileNotFoundError(f"problem file not found: {source}")
    return _load_hf(str(source), split=split or "train")


def _load_jsonl(path: Path) -> list[Problem]:
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProblemFormatError(f"{where}: invalid JSON ({e.msg})") from None
            problems.append(Problem.from_dict(record, where=where))
    _check_unique(problems, str(path))
    return problems


def _load_hf(name: str, *, split: str) -> list[Problem]:
    try:
        import datasets
    except ImportError as e:
        raise ProblemFormatError(f"{name!r} is not a file, and loading it as a Hugging Face dataset "
                                 "needs the `datasets` package") from e
    rows: Iterable[dict] = datasets.load_dataset(name, split=split)
    problems = [Problem.from_dict(dict(r), where=f"{name}[{i}]") for i, r in enumerate(rows)]
    _check_unique(problems, name)
    return problems


def _check_unique(problems: list[Problem], where: str) -> None:
    seen: set[str] = set()
    for p in problems:
        if p.name in seen:
            raise ProblemFormatError(f"{where}: duplicate problem name {p.name!r}")
        seen.add(p.name)
