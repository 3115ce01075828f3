"""Shared fixtures. Paths to the benchmark data beside the repository come from FD_SHARED_DATA."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SHARED_DATA = Path(os.environ.get("FD_SHARED_DATA", REPO.parent / "shared" / "data"))

requires_coq = pytest.mark.skipif(shutil.which("coqc") is None,
                                  reason="needs coqc: apt-get install coq libcoq-coquelicot")


@pytest.fixture(scope="session")
def rocq():
    if shutil.which("coqc") is None:
        pytest.skip("needs coqc: apt-get install coq libcoq-coquelicot")
    from env.provers.rocq import RocqProver

    return RocqProver(timeout_s=30, memory_mb=2048)


@pytest.fixture(scope="session")
def rocq_problems():
    from env.problems import load_problems

    return load_problems(DATA / "rocq_problems.jsonl")
