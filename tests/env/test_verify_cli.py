"""`python -m env.verify` as a user runs it: a real subprocess, real coqc."""

import json
import subprocess
import sys

import pytest

from tests.conftest import DATA, REPO, SHARED_DATA, requires_coq
from tests.env.test_rocq import HEADER, PROBLEM
from tests.env.test_rocq_adversarial import ATTACKS

pytestmark = requires_coq


def run_verify(*args):
    proc = subprocess.run([sys.executable, "-m", "env.verify", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    *rows, last = proc.stdout.strip().splitlines()
    return [json.loads(r) for r in rows], last


def test_attempts_in_input_order(tmp_path):
    from env.provers.rocq import RocqProver

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps(PROBLEM.to_dict()) + "\n")
    good = RocqProver().render(PROBLEM)
    attempts = [
        {"name": PROBLEM.name, "source": HEADER + ATTACKS["weakened"][0]},
        {"name": PROBLEM.name, "source": good, "model": "ignored"},
        {"name": "nobody", "source": good},
        {"name": PROBLEM.name},
        {"name": PROBLEM.name, "source": HEADER + ATTACKS["axiom"][0]},
    ]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(a) for a in attempts) + "\nnot json\n")
    rows, last = run_verify("--problems", problems, "--attempts", path)
    assert [(r["solved"], r["reason"]) for r in rows] == [
        (False, "statement_changed"), (True, "solved"), (False, "unknown_problem"),
        (False, "malformed_attempt"), (False, "nonstandard_axioms"), (False, "malformed_attempt")]
    assert last == "solved 1 of 6"


@pytest.mark.slow
def test_our_rocq_reference_proofs_all_verify():
    rows, last = run_verify("--problems", DATA / "rocq_problems.jsonl")
    assert rows and all(r["solved"] for r in rows), [r for r in rows if not r["solved"]]
    assert last == f"solved {len(rows)} of {len(rows)}"


def test_bad_problem_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "env.verify", "--problems", str(bad)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "missing or non-string keys" in proc.stderr


def test_shared_minif2f_file_runs_through_the_cli(tmp_path):
    path = SHARED_DATA / "minif2f_rocq_test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent; set FD_SHARED_DATA to the benchmark data folder")
    first = json.loads(path.read_text().splitlines()[0])
    attempt = tmp_path / "a.jsonl"
    attempt.write_text(json.dumps({"name": first["name"], "source": first["header"] + first["formal_statement"]
                                   + "\nAdmitted.\n"}) + "\n")
    rows, last = run_verify("--problems", path, "--attempts", attempt)
    assert rows == [{"name": first["name"], "solved": False, "reason": "uses_sorry"}] and last == "solved 0 of 1"
