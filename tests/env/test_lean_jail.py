"""The Lean jail's mounts (unit tests and real bubblewrap), `lake env` parsing, the capped process runner."""

import sys
import time
from pathlib import Path

import pytest

from env.provers.lean_jail import JailError, Launch, LeanToolchain, check_mounts, parse_lake_env, read_toolchain
from env.sandbox import jail_available

needs_jail = pytest.mark.skipif(not jail_available(), reason="needs bubblewrap: apt-get install bubblewrap")


def toolchain(root: Path, *, jailed: bool) -> LeanToolchain:
    project, sysroot = root / "repo", root / "elan" / "toolchains" / "lean-v4.26.0"
    lib = project / ".lake" / "packages" / "mathlib" / ".lake" / "build" / "lib" / "lean"
    own = project / ".lake" / "build" / "lib" / "lean"
    for d in (lib, own, sysroot / "lib" / "lean", sysroot / "bin", project / "data"):
        d.mkdir(parents=True, exist_ok=True)
    (project / "data" / "lean_problems.jsonl").write_text("reference proofs\n")
    (lib / "Mathlib.olean").write_text("olean")
    return LeanToolchain(project, sysroot, (sysroot / "lib" / "lean", lib, own), (sysroot / "lib",), jailed)


def test_parse_lake_env_resolves_relative_paths_and_drops_foreign_ones(tmp_path):
    project = tmp_path / "repo"
    output = "\0".join([
        "LEAN_SYSROOT=/elan/toolchains/v4.26.0", "LAKE=/elan/toolchains/v4.26.0/bin/lake",
        "LEAN_PATH=/elan/toolchains/v4.26.0/lib/lean:.lake/packages/mathlib/.lake/build/lib/lean:"
        f"{project}/.lake/build/lib/lean:/home/someone/other/lib",
        "LD_LIBRARY_PATH=/elan/toolchains/v4.26.0/lib:/usr/local/cuda/lib64",
        f"LEAN_SRC_PATH={project}/lean_project", "PATH=/usr/bin",
    ]) + "\0"
    chain = parse_lake_env(output, project, jailed=True)
    assert chain.sysroot == Path("/elan/toolchains/v4.26.0")
    assert chain.lean_path == (Path("/elan/toolchains/v4.26.0/lib/lean"),
                               project / ".lake/packages/mathlib/.lake/build/lib/lean",
                               project / ".lake/build/lib/lean")
    assert chain.library_path == (Path("/elan/toolchains/v4.26.0/lib"),)
    with pytest.raises(ValueError, match="LEAN_SYSROOT"):
        parse_lake_env("LEAN_PATH=/x\0", project, jailed=True)


def test_read_toolchain_runs_lake_env_in_the_project(fake_lean):
    chain = read_toolchain(fake_lean.project, jailed=False)
    assert chain.sysroot == fake_lean.sysroot and chain.lean.is_file()
    assert fake_lean.project / ".lake/packages/mathlib/.lake/build/lib/lean" in chain.lean_path
    assert all(not str(p).startswith("/opt/elsewhere") for p in chain.library_path)


def test_mounts_are_the_toolchain_the_package_builds_and_the_program(tmp_path):
    chain = toolchain(tmp_path, jailed=True)
    program = chain.project_dir / ".lake" / "build" / "bin" / "fdrepl"
    program.parent.mkdir(parents=True)
    program.write_text("")
    mounts = chain.mounts(program)
    assert mounts == sorted([chain.sysroot, chain.lean_path[1], chain.lean_path[2], program])  # no nested duplicates
    assert not any(chain.project_dir / "data" == m or (chain.project_dir / "data").is_relative_to(m) for m in mounts)


@pytest.mark.parametrize(("mount", "why"), [
    ("repo", "whole repository"),
    (".", "whole repository"),  # an ancestor of the repository
    ("repo/data", "outside"),
    ("repo/lean_project", "outside"),
])
def test_mounts_that_would_show_the_repository_are_refused(tmp_path, mount, why):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "lean_project").mkdir()
    with pytest.raises(JailError, match=why):
        check_mounts([tmp_path / mount], repo)
    check_mounts([repo / ".lake" / "build", tmp_path / "elan"], repo)  # build outputs and the toolchain are fine


def test_a_toolchain_whose_search_path_is_the_repository_is_refused(tmp_path):
    chain = toolchain(tmp_path, jailed=True)
    bad = LeanToolchain(chain.project_dir, chain.sysroot, (*chain.lean_path, chain.project_dir), (), True)
    with pytest.raises(JailError):
        bad.launch([str(bad.lean), "--version"], tmp_path, 1024)


@needs_jail
def test_a_jailed_process_sees_the_builds_read_only_its_directory_and_not_the_repository(tmp_path):
    chain = toolchain(tmp_path, jailed=True)
    work = tmp_path / "work"
    work.mkdir()
    lib = chain.lean_path[1]
    script = (f"cat {lib}/Mathlib.olean; echo; "
              f"test -e {chain.project_dir}/data/lean_problems.jsonl && echo SEES-DATA; "
              f"ls {chain.project_dir}; "
              f"touch {lib}/new 2>/dev/null && echo WROTE-LIB; "
              "echo made > /sandbox/out && echo WROTE-SANDBOX")
    outcome = chain.launch(["/bin/sh", "-c", script], work, 1024).run(30)
    assert outcome.returncode is not None
    lines = outcome.output.split()
    assert "olean" in lines and "WROTE-SANDBOX" in lines
    assert "SEES-DATA" not in lines and "WROTE-LIB" not in lines and "data" not in lines
    assert (work / "out").read_text() == "made\n"
    assert not (lib / "new").exists()


def test_the_unjailed_launch_runs_in_the_work_directory_with_the_lean_variables(tmp_path):
    chain = toolchain(tmp_path, jailed=False)
    launch = chain.launch(["/bin/sh", "-c", "pwd; echo $LEAN_PATH; echo $HOME"], tmp_path, 1024)
    out = launch.run(30).output.split()
    assert out[0] == str(tmp_path) and out[1] == ":".join(map(str, chain.lean_path)) and out[2] == str(tmp_path)


def test_run_keeps_only_the_start_of_endless_output(tmp_path):
    flood = Launch([sys.executable, "-c", "import sys\nfor _ in range(50): sys.stdout.write('y' * (1 << 20))"],
                   {}, tmp_path, 2048)
    outcome = flood.run(60, output_cap=1000)
    assert outcome.returncode == 0 and outcome.output == "y" * 1000


def test_run_kills_the_whole_process_group_at_the_time_limit(tmp_path):
    marker = tmp_path / "still-running"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).write_text('x')"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    start = time.monotonic()
    outcome = Launch([sys.executable, "-c", code], {}, tmp_path, 2048).run(1)
    assert outcome.timed_out and time.monotonic() - start < 10
    time.sleep(3.5)
    assert not marker.exists()  # the child it started was killed with it


def test_run_caps_the_files_a_process_writes(tmp_path):
    code = "open('big', 'wb').write(b'x' * (100 << 20))"
    outcome = Launch([sys.executable, "-c", code], {}, tmp_path, 2048).run(60)
    assert outcome.returncode != 0 and (tmp_path / "big").stat().st_size <= 64 << 20


def test_spawn_gives_binary_pipes_and_sends_stderr_to_a_file(tmp_path):
    code = "import sys; sys.stderr.write('to the file'); sys.stdout.buffer.write(sys.stdin.buffer.read(3))"
    proc = Launch([sys.executable, "-c", code], {}, tmp_path, 2048).spawn(tmp_path / "err")
    out, _ = proc.communicate(b"abc", timeout=30)
    assert out == b"abc" and (tmp_path / "err").read_text() == "to the file"


def test_out_of_memory_is_a_failure_that_says_so(tmp_path):
    said = Launch([sys.executable, "-c", "print('INTERNAL PANIC: out of memory')"], {}, tmp_path, 2048).run(30)
    assert not said.out_of_memory  # it exited 0: a file may print those words
    failed = Launch([sys.executable, "-c", "import sys; sys.exit('INTERNAL PANIC: out of memory')"], {}, tmp_path,
                    2048).run(30)
    assert failed.out_of_memory
    assert not Launch([sys.executable, "-c", "import sys; sys.exit('boom')"], {}, tmp_path, 2048).run(30).out_of_memory
