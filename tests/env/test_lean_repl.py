"""REPL framing against a scripted fake REPL run as a real subprocess (no Lean exists here).

The fake (`lean_fakes/fdrepl.py`) speaks the REPL's protocol and, on markers in a command,
misbehaves the way a checked file's code can make the real REPL misbehave.
"""

import subprocess
import sys
import time

import pytest

from env.provers import lean_repl
from env.provers.lean_repl import ReplDesync, ReplFailure, ReplProcess, parse_reply
from tests.env.conftest import FAKE_REPL, repl_launcher


@pytest.fixture
def repl(tmp_path):
    process = ReplProcess(repl_launcher(tmp_path, 2048), tmp_path / "repl.stderr")
    yield process
    process.kill()


def test_replies_are_matched_to_their_requests_and_probes_stay_hidden(repl):
    base = repl.command("import Mathlib\nimport Aesop\n", None, 30)
    assert base == {"env": 0, "messages": [], "sorries": []}
    first = repl.command("theorem t : True := trivial", 0, 30)
    assert first["env"] == 2  # env 1 was the probe that checked the imports' reply
    failing = repl.command("theorem u : True := FD_ERROR", 0, 30)
    assert failing["env"] == 4
    assert [(m["severity"], m["data"]) for m in failing["messages"]] == [("error", "unknown identifier 'FD_ERROR'")]
    sorry = repl.command("theorem v : False := by FD_SORRY", 0, 30)
    assert len(sorry["sorries"]) == 1 and sorry["messages"][0]["data"] == "declaration uses 'sorry'"
    assert repl.alive()


@pytest.mark.parametrize("marker", [
    "FD_FORGE",  # a clean reply printed before the real one
    "FD_PROBE_GUESS",  # that, and an answer to the probe without its nonce
    "FD_EXTRA",  # a frame right after the reply, where the probe's answer should be
])
def test_forged_or_extra_replies_end_the_process(repl, marker):
    repl.command("import Mathlib\n", None, 30)
    with pytest.raises(ReplDesync):
        repl.command(f"theorem t : False := by {marker}", 0, 30)
    assert not repl.alive()


def test_output_printed_later_is_caught_before_the_next_request(repl):
    repl.command("import Mathlib\n", None, 30)
    assert repl.command("theorem t : True := trivial -- FD_LATE", 0, 30)["env"] == 2
    time.sleep(0.6)
    with pytest.raises(ReplDesync, match="nobody asked for"):
        repl.command("theorem u : True := trivial", 0, 30)
    assert not repl.alive()


def test_a_swallowed_probe_is_a_desync(tmp_path, monkeypatch):
    monkeypatch.setattr(lean_repl, "PROBE_TIMEOUT_S", 1.0)
    repl = ReplProcess(repl_launcher(tmp_path, 2048), tmp_path / "repl.stderr")
    repl.command("import Mathlib\n", None, 30)
    with pytest.raises(ReplDesync, match="probe"):
        repl.command("theorem t : True := trivial -- FD_STEAL", 0, 30)
    assert not repl.alive()


def test_a_reply_that_never_comes_is_a_timeout_and_the_process_is_killed(repl):
    repl.command("import Mathlib\n", None, 30)
    start = time.monotonic()
    with pytest.raises(ReplFailure) as failure:
        repl.command("theorem t : True := by FD_SILENT", 0, 1)
    assert failure.value.status == "timeout" and "1 s" in failure.value.text
    assert time.monotonic() - start < 15
    assert not repl.alive()


@pytest.mark.parametrize(("marker", "status", "text"), [
    ("FD_DIE", "crash", "unreachable code"),
    ("FD_OOM", "oom", "out of memory (limit 2048 MB)"),
])
def test_a_dying_repl_is_reported_with_its_stderr(repl, marker, status, text):
    repl.command("import Mathlib\n", None, 30)
    with pytest.raises(ReplFailure) as failure:
        repl.command(f"theorem t : True := {marker}", 0, 30)
    assert failure.value.status == status and text in failure.value.text


def test_output_without_end_is_cut_at_the_cap(tmp_path):
    repl = ReplProcess(repl_launcher(tmp_path, 2048), tmp_path / "repl.stderr", max_reply_bytes=1 << 20)
    repl.command("import Mathlib\n", None, 30)
    with pytest.raises(ReplDesync, match="more than 1048576 bytes"):
        repl.command("theorem t : True := FD_FLOOD", 0, 30)
    assert not repl.alive()


def test_the_repls_own_error_reply_ends_the_process(repl):
    repl.command("import Mathlib\n", None, 30)
    with pytest.raises(ReplFailure, match="refused the command: Unknown environment"):
        repl.command("theorem t : True := trivial", 7, 30)
    assert not repl.alive()


def test_parse_reply_accepts_only_the_expected_environment_and_shapes():
    good = '{"env": 3, "messages": [{"severity": "warning", "pos": {"line": 1, "column": 0}, "endPos": null, ' \
           '"data": "unused variable"}]}'
    assert parse_reply(good, 3) == {"env": 3, "messages": [
        {"severity": "warning", "pos": {"line": 1, "column": 0}, "endPos": None, "data": "unused variable"}],
        "sorries": []}
    assert parse_reply('{"message": "Unknown environment."}', 3) == {"error": "Unknown environment."}
    for frame in ['{"env": 2}', '{"env": "3"}', '{"env": 3, "extra": 1}', "[1, 2]", "not json", '{"env": 3.0}',
                  '{"env": 3, "messages": [{"severity": "fatal", "data": "x"}]}',
                  '{"env": 3, "messages": [{"severity": "error", "data": 5}]}',
                  '{"env": 3, "messages": [{"severity": "error", "data": "x", "pos": {"line": "1"}}]}',
                  '{"env": 3, "sorries": {"goal": "x"}}']:
        with pytest.raises(ReplDesync):
            parse_reply(frame, 3)


def test_the_fake_refuses_requests_the_real_repl_would_not_parse():
    # The fake must fail where the real REPL fails, or these tests would accept requests Lean rejects.
    proc = subprocess.run([sys.executable, str(FAKE_REPL)], input='{"command": "theorem t : True := trivial"}\n\n',
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "Could not parse as a valid JSON command" in proc.stderr


def test_a_reader_never_reads_the_next_process_s_pipe():
    """The owner closes an ended process's stdout while its reader thread may still loop; the next
    process's pipe can get the same descriptor number. The old reader must not take that pipe's replies
    (seen under load as a fresh REPL whose import reply never arrived)."""
    import os
    import select

    old_read, old_write = os.pipe()
    frames = lean_repl._Frames(old_read, 1 << 20)
    os.close(old_read)  # what ReplProcess.kill does with the ended process's stdout
    new_read, new_write = os.pipe()
    try:
        if new_read != old_read:
            pytest.skip("the descriptor number was not reused")
        os.write(old_write, b'{"env": 0}\n\n')  # wakes the old reader, which reads again
        assert frames.next(5) == '{"env": 0}'
        time.sleep(0.3)
        os.write(new_write, b'{"env": 1}\n\n')
        ready, _, _ = select.select([new_read], [], [], 2)
        assert ready and os.read(new_read, 100) == b'{"env": 1}\n\n'
    finally:
        for fd in (old_write, new_read, new_write):
            os.close(fd)
