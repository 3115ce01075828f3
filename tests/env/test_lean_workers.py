"""The worker pool against the fake REPL (a real subprocess): one import list per process, sized memory, restarts."""

import os
import signal
import subprocess
import sys
import time

import pytest

from env.provers.lean_jail import tree_memory_mb
from env.provers.lean_repl import ReplDesync, ReplFailure
from env.provers.lean_workers import WorkerPool, worker_memory_mb
from tests.env.conftest import repl_launcher

HEADER = ("Mathlib", "Aesop")


def test_worker_memory_is_the_footprint_plus_headroom_under_the_ceiling():
    assert worker_memory_mb(None, ceiling_mb=16384, headroom_mb=4096) == 16384
    assert worker_memory_mb(7000.4, ceiling_mb=16384, headroom_mb=4096) == 11096
    assert worker_memory_mb(15000, ceiling_mb=16384, headroom_mb=4096) == 16384


@pytest.fixture
def pool():
    pool = WorkerPool(repl_launcher, workers=1, ceiling_mb=4096, headroom_mb=512, max_checks=100)
    yield pool
    pool.close()


def worker_pid(pool):
    (worker,) = pool._workers
    return worker.repl.pid if worker.repl is not None else None


def test_a_warm_worker_keeps_its_imports_for_later_checks(pool):
    imports, reply = pool.run(HEADER, "theorem t : True := trivial", 30, warm=True)
    assert imports == [] and reply["messages"] == []
    pid = worker_pid(pool)
    _, reply = pool.run(HEADER, "theorem u : True := FD_ERROR", 30, warm=True)
    assert reply["messages"][0]["severity"] == "error"
    assert worker_pid(pool) == pid


def test_a_worker_holds_one_import_list_and_is_restarted_for_another(pool):
    pool.run(HEADER, "theorem t : True := trivial", 30, warm=True)
    pid = worker_pid(pool)
    imports, _ = pool.run(("Missing",), "theorem t : True := trivial", 30, warm=True)
    assert imports[0]["data"] == "unknown module prefix 'Missing'"
    assert worker_pid(pool) != pid
    assert pool._workers[0].imports == ("Missing",)


def test_odd_imports_get_a_one_off_worker_and_leave_the_warm_one_alone(pool):
    pool.run(HEADER, "theorem t : True := trivial", 30, warm=True)
    pid = worker_pid(pool)
    _, reply = pool.run(("Mathlib.Tactic",), "theorem t : True := trivial", 30, warm=False)
    assert reply["messages"] == []
    assert worker_pid(pool) == pid and pool._workers[0].imports == HEADER


def test_the_first_worker_measures_the_imports_and_later_ones_are_capped_to_fit(pool):
    pool.run(("Big300",), "theorem t : True := trivial", 30, warm=True)
    (worker,) = pool._workers
    assert worker.memory_mb == 4096  # not measured yet: the ceiling
    footprint = pool.footprints[("Big300",)]
    assert footprint > 300
    worker.stop()
    pool.run(("Big300",), "theorem t : True := trivial", 30, warm=True)
    assert worker.memory_mb == int(footprint) + 512 < 4096
    with open(f"/proc/{worker.repl.pid}/limits") as limits:
        address_space = next(line for line in limits if line.startswith("Max address space"))
    assert int(address_space.split()[3]) == (int(footprint) + 512) << 20


def test_an_import_list_too_big_for_its_cap_is_out_of_memory_and_the_cap_is_forgotten():
    pool = WorkerPool(repl_launcher, workers=1, ceiling_mb=4096, headroom_mb=64, max_checks=1)
    try:
        pool.footprints[("Big300",)] = 50.0  # measured too small: the sized cap cannot hold the imports
        with pytest.raises(ReplFailure) as failure:
            pool.run(("Big300",), "theorem t : True := trivial", 30, warm=True)
        assert failure.value.status == "oom"
        assert ("Big300",) not in pool.footprints
        pool.run(("Big300",), "theorem t : True := trivial", 30, warm=True)  # under the ceiling again
    finally:
        pool.close()


def test_workers_are_recycled_after_max_checks():
    pool = WorkerPool(repl_launcher, workers=1, ceiling_mb=4096, headroom_mb=512, max_checks=2)
    try:
        pool.run(HEADER, "theorem t : True := trivial", 30, warm=True)
        pid = worker_pid(pool)
        pool.run(HEADER, "theorem t : True := trivial", 30, warm=True)
        assert worker_pid(pool) is None  # stopped after its second check
        pool.run(HEADER, "theorem t : True := trivial", 30, warm=True)
        assert worker_pid(pool) not in (None, pid)
    finally:
        pool.close()


def test_stray_output_left_by_one_check_does_not_fail_the_next(pool):
    pool.run(HEADER, "theorem t : True := trivial -- FD_LATE", 30, warm=True)
    pid = worker_pid(pool)
    time.sleep(0.6)
    _, reply = pool.run(HEADER, "theorem u : True := trivial", 30, warm=True)  # retried in a fresh process
    assert reply["messages"] == [] and worker_pid(pool) != pid


def test_a_file_that_forges_replies_fails_in_a_fresh_process_too(pool):
    with pytest.raises(ReplDesync):
        pool.run(HEADER, "theorem t : False := by FD_FORGE", 30, warm=True)
    _, reply = pool.run(HEADER, "theorem u : True := trivial", 30, warm=True)
    assert reply["messages"] == []


def test_a_crash_is_reported_and_the_next_check_gets_a_new_process(pool):
    with pytest.raises(ReplFailure) as failure:
        pool.run(HEADER, "theorem t : True := FD_DIE", 30, warm=True)
    assert failure.value.status == "crash"
    _, reply = pool.run(HEADER, "theorem u : True := trivial", 30, warm=True)
    assert reply["messages"] == []


def test_tree_memory_reads_the_largest_process_of_a_tree():
    # As under bubblewrap: the big process is not the one we started but one of its descendants.
    grandchild = "import time; b = bytearray(200 << 20); time.sleep(30)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        time.sleep(1.0)
        vm, rss = tree_memory_mb(proc.pid)
        assert vm > 200 and rss > 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert tree_memory_mb(proc.pid) == (0.0, 0.0)
