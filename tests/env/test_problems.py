import json

import pytest

from env.problems import Problem, ProblemFormatError, load_problems
from tests.conftest import DATA, SHARED_DATA

RECORD = {"name": "p1", "split": "test", "prover": "rocq", "header": "Require Import Arith.\n",
          "formal_statement": "Theorem p1 : 1 + 1 = 2.\nProof.", "informal_statement": None,
          "formal_proof": "\nreflexivity.\nQed.", "source": "here"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_round_trip(tmp_path):
    (problem,) = load_problems(write_jsonl(tmp_path / "p.jsonl", [RECORD]))
    assert problem.prover == "rocq" and problem.name == "p1"
    assert problem.to_dict() == RECORD


@pytest.mark.parametrize("change, message", [
    ({"prover": "isabelle"}, "unknown prover"),
    ({"formal_statement": "Theorem other : True.\nProof."}, "does not declare a theorem named 'p1'"),
    ({"header": None}, r"missing or non-string keys \['header'\]"),
    ({"name": "bad name"}, "not a valid theorem name"),
    ({"formal_proof": 3}, "formal_proof must be a string or null"),
])
def test_bad_records_are_clear_errors(tmp_path, change, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{**RECORD, **change}])
    with pytest.raises(ProblemFormatError, match=message) as info:
        load_problems(path)
    assert "p.jsonl:1" in str(info.value)


def test_bad_json_and_duplicates(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(RECORD) + "\n{not json\n")
    with pytest.raises(ProblemFormatError, match=r"p.jsonl:2: invalid JSON"):
        load_problems(path)
    with pytest.raises(ProblemFormatError, match="duplicate problem name 'p1'"):
        load_problems(write_jsonl(path, [RECORD, RECORD]))


def test_missing_file_is_not_taken_for_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "absent.jsonl")


def test_our_problem_sets_load():
    rocq = load_problems(DATA / "rocq_problems.jsonl")
    lean = load_problems(DATA / "lean_problems.jsonl")
    assert len(rocq) >= 24 and len(lean) >= 24
    assert {p.prover for p in rocq} == {"rocq"} and {p.prover for p in lean} == {"lean"}
    assert all(p.formal_proof for p in rocq + lean)


@pytest.mark.parametrize("filename, count, prover", [
    ("minif2f_rocq_test.jsonl", 244, "rocq"), ("minif2f_lean4_test.jsonl", 244, "lean"),
    ("leanworkbook_test_256.jsonl", 256, "lean"),
])
def test_shared_benchmarks_load(filename, count, prover):
    path = SHARED_DATA / filename
    if not path.exists():
        pytest.skip(f"{path} is absent; set FD_SHARED_DATA to the benchmark data folder")
    problems = load_problems(path)
    assert len(problems) == count and {p.prover for p in problems} == {prover}
    assert isinstance(problems[0], Problem)


def test_hugging_face_dataset_name(monkeypatch):
    """No hub is reachable in tests: a stand-in `datasets` module returns rows as `load_dataset` would."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: calls.append((name, split)) or [dict(RECORD)]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (problem,) = load_problems("someone/minif2f-rocq", split="test")
    assert calls == [("someone/minif2f-rocq", "test")] and problem.name == "p1"
