"""MetricsLogger through the real wandb package, offline: no network, no account.

The run is read back from wandb's own offline file (`run-<id>.wandb`, what `wandb sync`
uploads): a LevelDB-style log of 32 KiB blocks after a 7-byte header (":W&B", magic
0xBEE1, version 0), each chunk `crc32 | length | type | data`, the chunks of a record
joined and parsed as wandb's `Record` protobuf.
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from trainer.metrics import MetricsLogger

wandb = pytest.importorskip("wandb", reason="needs wandb: pip install -e '.[wandb]'")
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK, _CHUNK_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path, timeout_s: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The run's records once its exit record is on disk: `finish()` returns before wandb's service
    process has written everything (seen under load), so wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _parse(path.read_bytes())
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _parse(data: bytes) -> list[wandb_internal_pb2.Record]:
    if len(data) < 7:
        return []
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    records, parts, pos = [], [], 7
    while pos + _CHUNK_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER:  # a block's zero trailer
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
        chunk = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        if len(chunk) < length:  # still being written
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {pos}"
        pos += _CHUNK_HEADER + length
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        else:
            assert kind in (_FIRST, _MIDDLE), kind
    return records  # a record still being written (parts left over) is not returned


def history(records: list[wandb_internal_pb2.Record]) -> list[dict]:
    """The logged rows, keys as logged (`train/loss`), values decoded from their JSON."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline, with everything it writes (run files, cache, settings) under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, sub in [("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data")]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_logger_writes_a_real_offline_wandb_run(offline):
    path = offline / "fd_seed0" / "metrics.jsonl"
    with MetricsLogger(path, wandb_project="fd-prover", config={"lr": 1e-5, "algorithm": "fd"}) as logger:
        logger.log(3, {"train/accuracy": 0.25, "train/loss": np.float32(1.5), "train/grad_norm": float("nan")})
        logger.log(4, {"train/accuracy": 0.5, "distinct_lemmas": 3})
    runs = list((offline / "fd_seed0" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "one offline run, beside metrics.jsonl"
    records = read_records(runs[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0  # finish() ran

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "fd-prover" and run.display_name == "fd_seed0"
    config = {i.key: json.loads(i.value_json) for i in run.config.update if not i.key.startswith("_")}
    assert config == {"lr": 1e-5, "algorithm": "fd"}

    rows = history(records)
    assert [row["_step"] for row in rows] == [3, 4]  # wandb's step is the log's step
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    assert logged[1] == {"train/accuracy": 0.5, "distinct_lemmas": 3}
    assert logged[0].keys() == {"train/accuracy", "train/loss", "train/grad_norm"}
    assert logged[0]["train/accuracy"] == 0.25 and logged[0]["train/loss"] == 1.5
    assert math.isnan(logged[0]["train/grad_norm"])  # wandb keeps NaN; the JSONL has null
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 3, "train/accuracy": 0.25, "train/loss": 1.5, "train/grad_norm": None},
        {"step": 4, "train/accuracy": 0.5, "distinct_lemmas": 3}]


def test_a_second_logger_in_the_same_process_is_a_second_run(offline):
    """A resumed run (or a test) opens the log again in the same process: a new wandb run, the old one untouched."""
    path = offline / "run" / "metrics.jsonl"
    for step in (1, 2):
        with MetricsLogger(path, wandb_project="fd-prover") as logger:
            logger.log(step, {"train/accuracy": step / 4})
    files = sorted((offline / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    steps = sorted(row["_step"] for f in files for row in history(read_records(f)))
    assert steps == [1, 2]


def test_a_run_that_raises_is_marked_failed_in_wandb(offline):
    path = offline / "crashed" / "metrics.jsonl"
    with pytest.raises(RuntimeError), MetricsLogger(path, wandb_project="fd-prover") as logger:
        logger.log(1, {"train/accuracy": 0.0})
        raise RuntimeError("the step failed")
    (run,) = (offline / "crashed" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_records(run)
    assert records[-1].WhichOneof("record_type") == "exit" and records[-1].exit.exit_code == 1
