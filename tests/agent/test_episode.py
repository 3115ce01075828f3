import json
import threading

import pytest

from agent.episode import SCHEMA_VERSION, Episode, EpisodeSchemaError, EpisodeWriter, ToolCallRecord, read_episodes


def make_episode(i=0, **changes):
    fields = dict(
        episode_id=f"e{i}", problem={"name": "p"}, prover="rocq", model="tiny", policy_version=0,
        messages=[{"role": "user", "content": "x"}], prompt_len=2, token_ids=[1, 2, 3, 4, 5],
        loss_mask=[0, 0, 1, 1, 0], logprobs=[0.0, 0.0, -0.1, -0.2, 0.0],
        tool_calls=[ToolCallRecord(1, "rocq_check_file", {"path": "a.v"}, "ok", False, 0.5, None)],
        verdict=None, reward=0.0, finish_reason="no_tool_call", seeds={"episode": i}, timings={"total_s": 1.0},
        num_generated=2)
    fields.update(changes)
    return Episode(**fields)


def test_round_trip(tmp_path):
    writer = EpisodeWriter(tmp_path / "ep.jsonl")
    writer.write(make_episode(0))
    writer.write(make_episode(1))
    episodes = list(read_episodes(tmp_path / "ep.jsonl"))
    assert [e.episode_id for e in episodes] == ["e0", "e1"]
    assert episodes[0] == make_episode(0)
    record = json.loads((tmp_path / "ep.jsonl").read_text().splitlines()[0])
    assert record["schema_version"] == SCHEMA_VERSION and len(record["token_ids"]) == len(record["loss_mask"])


@pytest.mark.parametrize("changes, message", [
    ({"loss_mask": [0, 0, 1, 1]}, "differ in length"),
    ({"loss_mask": [1, 0, 1, 1, 0]}, "prompt must be outside"),
    ({"num_generated": 3}, "does not count"),
])
def test_inconsistent_episodes_are_refused(tmp_path, changes, message):
    with pytest.raises(EpisodeSchemaError, match=message):
        EpisodeWriter(tmp_path / "ep.jsonl").write(make_episode(**changes))
    assert not (tmp_path / "ep.jsonl").exists() or (tmp_path / "ep.jsonl").read_text() == ""


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    record = json.loads(make_episode().to_json())
    record["schema_version"] = 999
    (tmp_path / "ep.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(EpisodeSchemaError, match="version 999, but this code reads version 1"):
        list(read_episodes(tmp_path / "ep.jsonl"))


def test_torn_last_line_is_skipped_but_corruption_elsewhere_raises(tmp_path):
    path = tmp_path / "ep.jsonl"
    line = make_episode().to_json()
    path.write_text(line + "\n" + line[: len(line) // 2])
    assert len(list(read_episodes(path))) == 1
    path.write_text(line[:10] + "\n" + line + "\n")
    with pytest.raises(EpisodeSchemaError, match="ep.jsonl:1: not a JSON record"):
        list(read_episodes(path))


def test_concurrent_writers_leave_whole_lines(tmp_path):
    writer = EpisodeWriter(tmp_path / "ep.jsonl")
    threads = [threading.Thread(target=lambda k=k: [writer.write(make_episode(k * 100 + j)) for j in range(20)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.episode_id for e in read_episodes(tmp_path / "ep.jsonl")) == sorted(
        f"e{k * 100 + j}" for k in range(4) for j in range(20))


@pytest.mark.parametrize("torn_bytes", [1, 70_000])  # a short fragment, and one longer than a read block
def test_appending_after_a_torn_last_line_keeps_every_complete_record(tmp_path, torn_bytes):
    path = tmp_path / "ep.jsonl"
    EpisodeWriter(path).write(make_episode(0))
    with path.open("ab") as f:  # a run killed in the middle of its next write
        f.write(make_episode(1, messages=[{"role": "user", "content": "y" * torn_bytes}]).to_json()
                .encode()[:torn_bytes + 20])
    EpisodeWriter(path).write(make_episode(2))  # the next run appends to the same log
    assert [e.episode_id for e in read_episodes(path)] == ["e0", "e2"]
    assert path.read_text().endswith("\n")


def test_a_torn_only_record_is_dropped_whole(tmp_path):
    path = tmp_path / "ep.jsonl"
    path.write_bytes(b'{"episode_id": "e9", "tor')
    EpisodeWriter(path).write(make_episode(0))
    assert [e.episode_id for e in read_episodes(path)] == ["e0"]


@pytest.mark.parametrize("block", [4, 1 << 16])  # tiny blocks make the backwards scan cross many of them
def test_drop_torn_tail(tmp_path, block):
    from agent.episode import drop_torn_tail

    path = tmp_path / "ep.jsonl"
    assert drop_torn_tail(path, block=block) == 0 and not path.exists()
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    assert drop_torn_tail(path, block=block) == 0 and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3, "torn')
    assert drop_torn_tail(path, block=block) == 14 and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(b'{"never": "ended"')
    assert drop_torn_tail(path, block=block) == 17 and path.read_bytes() == b""
    path.write_bytes(b'{"ab":1}\n' + b"x" * 7)  # with 4-byte blocks the newline is the first byte of one
    assert drop_torn_tail(path, block=block) == 7 and path.read_bytes() == b'{"ab":1}\n'


def test_feedback_and_non_ascii_text_round_trip_as_written(tmp_path):
    from agent.episode import Feedback

    feedback = Feedback(source="claude", text="Essayez `nlinarith` — ça marche.",
                        teacher_messages=[{"role": "user", "content": "x\n\nEssayez"}], teacher_prompt_ids=[1, 2, 9],
                        elapsed_s=1.5)
    path = tmp_path / "deep" / "er" / "ep.jsonl"  # the writer makes missing folders
    EpisodeWriter(path).write(make_episode(0, feedback=feedback))
    (episode,) = read_episodes(path)
    assert episode.feedback == feedback and isinstance(episode.feedback, Feedback)
    line = path.read_text(encoding="utf-8")
    assert "ça marche" in line and '", "' not in line  # UTF-8 as is, compact separators


def test_blank_lines_are_skipped_and_bad_records_name_their_line(tmp_path):
    path = tmp_path / "ep.jsonl"
    record = json.loads(make_episode(0).to_json())
    path.write_text(make_episode(0).to_json() + "\n\n" + make_episode(1).to_json() + "\n")
    assert [e.episode_id for e in read_episodes(path)] == ["e0", "e1"]
    path.write_text(make_episode(0).to_json() + "\n" + json.dumps({**record, "surprise": 1}) + "\n")
    with pytest.raises(EpisodeSchemaError, match=r"ep.jsonl:2: unknown episode fields \['surprise'\]"):
        list(read_episodes(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(EpisodeSchemaError, match="ep.jsonl:1: episode schema version None"):
        list(read_episodes(path))
    path.write_text(json.dumps({**record, "tool_calls": [{"turn": 1}]}) + "\n")
    with pytest.raises(EpisodeSchemaError, match=r"ep.jsonl:1: malformed episode record \("):
        list(read_episodes(path))


@pytest.mark.parametrize("prompt_len, ok", [(0, True), (5, True), (6, False), (-1, False)])
def test_the_prompt_may_be_empty_or_the_whole_sequence(tmp_path, prompt_len, ok):
    episode = make_episode(prompt_len=prompt_len, loss_mask=[0] * 5, num_generated=0, logprobs=[0.0] * 5)
    if ok:
        episode.validate()
    else:
        with pytest.raises(EpisodeSchemaError, match="prompt"):
            episode.validate()
