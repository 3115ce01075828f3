"""scripts/mutation.py's watch over stuck mutants, with real processes (mutmut itself is not run here)."""

import importlib.util
import os
import signal
import subprocess
import sys
import threading

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("mutation", REPO / "scripts" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)

# a process, its child and its grandchild (`sleep`), shaped like mutmut, its fork server and a mutant;
# each parent exits with its child's exit status (a signal -n as 256 - n)
INNER = "import subprocess, sys; sys.exit(subprocess.run(['sleep', sys.argv[1]]).returncode % 256)"
OUTER = ("import subprocess, sys; "
         "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]]).returncode % 256)")


def run_watched(tmp_path, log_text, sleep_s, limit_s):
    log = tmp_path / "mutmut-run.log"
    log.write_text(log_text)
    proc = subprocess.Popen([sys.executable, "-c", OUTER, INNER, str(sleep_s)])
    stop = threading.Event()
    watcher = threading.Thread(target=mutation.end_stuck_mutants, args=(proc.pid, log, limit_s, stop, 0.05))
    watcher.start()
    try:
        return proc.wait(timeout=60)
    finally:
        stop.set()
        watcher.join()
        proc.kill()


def test_a_mutant_past_the_wall_clock_limit_ends_as_a_timeout(tmp_path):
    """SIGXCPU (24), the signal mutmut's own limit sends, reaches the grandchild and nothing else."""
    assert run_watched(tmp_path, "Running mutation testing\n", sleep_s=30, limit_s=0.5) == 256 - 24


def test_nothing_is_ended_before_mutmut_runs_mutants(tmp_path):
    """Its clean and stats runs are grandchildren too, and may take longer than a mutant."""
    assert run_watched(tmp_path, "Running clean tests\n", sleep_s=2, limit_s=0.2) == 0


def test_grandchildren_are_found_from_proc(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", OUTER, INNER, "30"])
    found = []
    try:
        for _ in range(200):
            found = mutation.grandchildren(proc.pid)
            if found:
                break
            threading.Event().wait(0.05)
        (pid,) = found
        assert open(f"/proc/{pid}/comm").read().strip() == "sleep"
        assert mutation.grandchildren(pid) == []
    finally:
        for pid in found:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
