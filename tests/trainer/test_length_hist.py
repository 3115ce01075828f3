"""`scripts/length_hist.py`: the response-length figure of the constant-feedback evidence."""

import json
import subprocess
import sys

from tests.conftest import REPO


def run(*args):
    return subprocess.run([sys.executable, "scripts/length_hist.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pools_files_filters_by_policy_version_and_draws(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"policy_version": v, "num_generated": n} for v, n in [(0, 10), (1, 20), (2, 30)]])
    b = write(tmp_path / "b.jsonl", [{"policy_version": 2, "num_generated": 50},
                                     {"policy_version": 0, "num_generated": 1}])
    out = tmp_path / "fig.png"
    proc = run(f"all={a}", f"late={a},{b}@2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["all: n=3 mean=20.0 median=20", "late: n=2 mean=40.0 median=40"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_one_line_error(tmp_path):
    no_field = write(tmp_path / "x.jsonl", [{"policy_version": 0}])
    for args, message in [(["nolabel"], "is not LABEL=FILE"), ([f"x={no_field}"], "x.jsonl:1: no num_generated"),
                          ([f"x={tmp_path / 'a.jsonl'}"], "No such file"),
                          ([f"x={write(tmp_path / 'y.jsonl', [{'policy_version': 0, 'num_generated': 3}])}@1"],
                           "no episodes of policy version >= 1")]:
        proc = run(*args, "--out", tmp_path / "f.png")
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "f.png").exists()
