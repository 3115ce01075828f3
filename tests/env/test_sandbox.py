import os
import sys
import time

import pytest

from env.sandbox import JAIL_ROOT, EpisodeDir, SandboxError, jail_available, run_jailed

needs_jail = pytest.mark.skipif(not jail_available(), reason="needs bubblewrap: apt-get install bubblewrap")


@pytest.fixture
def box():
    with EpisodeDir() as d:
        yield d


def test_write_read_and_cleanup():
    d = EpisodeDir()
    d.write("sub/Main.v", "Theorem x : True.")
    assert d.read("sub/Main.v") == "Theorem x : True."
    root = d.root
    d.close()
    d.close()  # safe twice
    assert not root.exists()


@pytest.mark.parametrize("path, message", [
    ("/etc/passwd", "absolute paths are not allowed"),
    ("../escape.v", "'..' is not allowed"),
    ("a/../../escape.v", "'..' is not allowed"),
    ("~/x.v", "absolute paths are not allowed"),
    ("", "non-empty relative path"),
    ("a b.v", "may contain only"),
    (".", "names the working directory"),
    ("x" * 300, "longer than"),
])
def test_bad_paths_are_refused(box, path, message):
    with pytest.raises(SandboxError, match=message):
        box.write(path, "x")
    assert list(box.root.iterdir()) == []


def test_symlinks_are_refused(box, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (box.root / "link").symlink_to(outside)
    with pytest.raises(SandboxError, match="symbolic link"):
        box.write("link/x.v", "x")
    assert list(outside.iterdir()) == []


def test_size_caps():
    with EpisodeDir(max_file_bytes=100, max_total_bytes=150) as d:
        with pytest.raises(SandboxError, match="limit is 100"):
            d.write("big.v", "x" * 101)
        d.write("a.v", "x" * 100)
        d.write("a.v", "y" * 100)  # overwriting does not count twice
        with pytest.raises(SandboxError, match="would exceed 150 bytes"):
            d.write("b.v", "x" * 60)
        assert d.read("a.v") == "y" * 100


def test_read_missing_file(box):
    with pytest.raises(SandboxError, match="no file 'Main.v'"):
        box.read("Main.v")


@needs_jail
def test_jail_sees_only_its_workdir(box, tmp_path, monkeypatch):
    monkeypatch.setenv("FD_TEST_SECRET", "1")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    script = (f"import os, pathlib; print(os.getcwd()); print(pathlib.Path({str(secret)!r}).exists()); "
              f"print(sorted(os.environ)); open('out.txt', 'w').write('ok')")
    out = run_jailed([sys.executable, "-c", script], workdir=box.root, timeout_s=30, memory_mb=None,
                     readonly=[_python_prefix()])
    assert out.jailed and out.returncode == 0, out.output
    cwd, seen, env = out.output.splitlines()
    assert cwd == JAIL_ROOT and seen == "False"
    assert "FD_TEST_SECRET" not in env
    assert (box.root / "out.txt").read_text() == "ok"


@needs_jail
def test_jail_has_no_network(box):
    """Only a loopback interface exists inside the jail (checked without sending any traffic)."""
    script = "import socket; print(sorted(name for _, name in socket.if_nameindex()))"
    out = run_jailed([sys.executable, "-c", script], workdir=box.root, timeout_s=30, memory_mb=None,
                     readonly=[_python_prefix()])
    assert out.output.strip() == "['lo']", out.output


def test_timeout_kills_the_process(box):
    out = run_jailed([sys.executable, "-c", "while True: pass"], workdir=box.root, timeout_s=1.5, memory_mb=None,
                     readonly=[_python_prefix()])
    assert out.timed_out and out.elapsed_s < 10


@pytest.mark.parametrize("jail", [pytest.param(True, marks=needs_jail), False])
def test_timeout_kills_everything_the_process_started(box, jail):
    late = "import time; time.sleep(2); open('late.txt', 'w').write('x')"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {late!r}]); time.sleep(60)"
    out = run_jailed([sys.executable, "-c", script], workdir=box.root, timeout_s=1, memory_mb=None,
                     readonly=[_python_prefix()], jail=jail)
    assert out.timed_out and out.returncode is None and out.jailed == jail
    time.sleep(3)
    assert not (box.root / "late.txt").exists()


def test_out_of_memory_comes_from_the_limit_not_the_words(box):
    said = run_jailed([sys.executable, "-c", "import sys; print('MemoryError: Cannot allocate memory'); sys.exit(1)"],
                      workdir=box.root, timeout_s=30, memory_mb=512, readonly=[_python_prefix()])
    assert said.returncode == 1 and not said.out_of_memory
    grew = run_jailed([sys.executable, "-c", "x = [bytearray(1024 * 1024) for _ in range(2000)]"],
                      workdir=box.root, timeout_s=30, memory_mb=512, readonly=[_python_prefix()])
    assert grew.returncode != 0 and grew.out_of_memory and grew.peak_rss_mb > 0.6 * 512


def test_memory_cap(box):
    out = run_jailed([sys.executable, "-c", "x = bytearray(2 * 1024**3)"], workdir=box.root, timeout_s=30,
                     memory_mb=512, readonly=[_python_prefix()])
    assert out.returncode != 0 and "MemoryError" in out.output


def _python_prefix():
    """The interpreter's install tree, which the jail must see read-only for these tests."""
    from pathlib import Path

    return Path(os.path.realpath(sys.base_prefix))
