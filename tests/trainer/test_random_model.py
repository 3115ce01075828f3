"""`bench/random_model.py`: the directory it writes is a model the trainer loads and trains as it is."""

import json
import subprocess
import sys

from tests.conftest import REPO, requires_coq


@requires_coq
def test_random_model_directory_trains(tmp_path):
    out = tmp_path / "model"
    subprocess.run([sys.executable, str(REPO / "bench" / "random_model.py"), "--shape", "tiny", "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    from agent.models import load_tokenizer

    config = json.loads((out / "config.json").read_text())
    tokenizer = load_tokenizer(str(out))
    assert config["vocab_size"] == len(tokenizer) and config["num_hidden_layers"] == 2
    assert "<tool_call>" in tokenizer.chat_template  # the tool-call template travels with the tokenizer
    run = subprocess.run([sys.executable, "-m", "trainer.run", f"model={out}", "prover=rocq", "steps=1",
                          "prompts_per_step=2", "max_new_tokens=16", f"out_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["last_step"]["train/loss_tokens"] > 0
