"""Where Lean cannot run, asking for it stops with the one-line reason, not a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from agent.rollout import ProverUnavailableError, resolve_prover
from env.provers.lean import LeanProver, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(LeanProver.available(), reason="Lean can run here; these tests are for where it cannot")


def run(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def test_resolve_prover_falls_back_to_rocq_for_auto_and_refuses_lean():
    prover, why = resolve_prover("auto")
    assert prover == "rocq" and unavailable_reason() in why
    assert resolve_prover("rocq") == ("rocq", "chosen in the config")
    with pytest.raises(ProverUnavailableError, match="prover=lean, but .*lake build"):
        resolve_prover("lean")


def test_verify_with_lean_prints_the_reason_on_one_line(tmp_path):
    proc = run("env.verify", "--problems", "data/lean_problems.jsonl", "--prover", "lean", tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the Lean backend is unavailable: ")
    assert "Traceback" not in proc.stderr


def test_training_with_lean_prints_the_reason_on_one_line(tmp_path):
    proc = run("trainer.run", "prover=lean", f"out_dir={tmp_path / 'run'}", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: prover=lean, but ")
    assert "Traceback" not in proc.stderr
