"""Warm Lean REPL workers: one process per import list, with an address-space cap sized for it.

`import Mathlib` takes seconds and gigabytes, so a worker loads one import list (a
problem's header) once and checks every file with those imports on top of it. A worker
never holds two import lists: loading a second Mathlib into the same process under the
same cap is what made honest checks run out of memory. When a check needs imports no
idle worker holds, the least recently used idle worker is restarted with them; a file
whose imports differ from its problem's header gets a one-off worker instead (at most one
at a time, ended after its check), so odd imports never evict a warm header.

Memory: the first worker of an import list runs under the ceiling (`memory_mb`); its
address space once the imports are loaded is that list's footprint, and later workers of
the list get the footprint plus `headroom_mb` (never above the ceiling). A worker is
restarted after `max_checks` checks or when its address space passes 85% of its cap (REPL
environments are never freed), and when its output stops matching its requests.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from env.provers import lean_text
from env.provers.lean_jail import Launch, tree_memory_mb
from env.provers.lean_repl import ReplDesync, ReplFailure, ReplProcess

Launcher = Callable[[Path, int], Launch]  # (scratch directory, memory cap in MB) -> how to start a REPL
IMPORT_TIMEOUT_S = 600.0  # the first `import Mathlib` of a worker, from a cold disk
RECYCLE_FRACTION = 0.85


def worker_memory_mb(footprint_mb: float | None, *, ceiling_mb: int, headroom_mb: int) -> int:
    """The address-space cap of a worker whose imports take `footprint_mb` once loaded (None: not measured yet)."""
    if footprint_mb is None:
        return ceiling_mb
    return min(ceiling_mb, int(footprint_mb) + headroom_mb)


class Worker:
    """One REPL process and the environment of its imports (ids valid only for that process)."""

    def __init__(self, launcher: Launcher, index: int) -> None:
        self.launcher = launcher
        self.scratch = Path(tempfile.mkdtemp(prefix=f"lean-worker-{index}-"))
        self.imports: tuple[str, ...] | None = None
        self.memory_mb = 0
        self.repl: ReplProcess | None = None
        self.base_env = 0
        self.import_messages: list[dict[str, Any]] = []
        self.checks = 0
        self.last_used = 0.0

    def start(self, imports: tuple[str, ...], memory_mb: int, timeout_s: float) -> float:
        """Start a process that loads `imports`; returns its address space (MB) once they are loaded."""
        self.stop()
        self.imports, self.memory_mb = imports, memory_mb
        try:
            self.repl = ReplProcess(self.launcher(self.scratch, memory_mb), self.scratch / "repl.stderr")
        except OSError as e:
            raise ReplFailure("crash", f"the Lean REPL could not be started: {e}") from None
        reply = self.repl.command(lean_text.imports_command(imports), None, timeout_s)
        self.base_env, self.import_messages = reply["env"], reply["messages"]
        return tree_memory_mb(self.repl.pid)[0]

    def run(self, body: str, timeout_s: float) -> dict[str, Any]:
        assert self.repl is not None
        self.checks += 1
        return self.repl.command(body, self.base_env, timeout_s)

    def ready(self, imports: tuple[str, ...]) -> bool:
        return self.imports == imports and self.repl is not None and self.repl.alive()

    def due_for_restart(self, max_checks: int) -> bool:
        if self.repl is None:
            return False
        vm_mb, _ = tree_memory_mb(self.repl.pid)
        return self.checks >= max_checks or vm_mb > RECYCLE_FRACTION * self.memory_mb

    def stop(self) -> None:
        if self.repl is not None:
            self.repl.kill()
        self.repl, self.checks = None, 0

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


class WorkerPool:
    """`workers` warm workers shared by all checks (thread-safe), and one-off workers for odd imports."""

    def __init__(self, launcher: Launcher, *, workers: int, ceiling_mb: int, headroom_mb: int, max_checks: int,
                 import_timeout_s: float = IMPORT_TIMEOUT_S) -> None:
        self.launcher = launcher
        self.ceiling_mb, self.headroom_mb = ceiling_mb, headroom_mb
        self.max_checks, self.import_timeout_s = max_checks, import_timeout_s
        self.footprints: dict[tuple[str, ...], float] = {}  # address space (MB) of each import list, loaded
        self._workers = [Worker(launcher, i) for i in range(workers)]
        self._busy: set[int] = set()
        self._cond = threading.Condition()
        self._one_off = threading.Semaphore(1)
        self._closed = False

    def memory_for(self, imports: tuple[str, ...]) -> int:
        return worker_memory_mb(self.footprints.get(imports), ceiling_mb=self.ceiling_mb, headroom_mb=self.headroom_mb)

    def run(self, imports: tuple[str, ...], body: str, timeout_s: float, *, warm: bool) -> tuple[list, dict]:
        """(messages of the imports, the REPL's reply to `body`); raises ReplFailure.

        `warm`: the imports are a problem's header, checked in a shared warm worker; else a
        one-off worker loads them and is ended after this check.
        """
        if not warm:
            with self._one_off:
                worker = Worker(self.launcher, len(self._workers))
                try:
                    return self._check(worker, imports, body, timeout_s)
                finally:
                    worker.close()
        worker = self._acquire(imports)
        try:
            return self._check(worker, imports, body, timeout_s)
        finally:
            if worker.due_for_restart(self.max_checks):
                worker.stop()
            self._release(worker)

    def _check(self, worker: Worker, imports: tuple[str, ...], body: str, timeout_s: float) -> tuple[list, dict]:
        """One check; when the output gets out of step, once more in a fresh process (the stray output
        may come from code an earlier file left running), then the failure is this file's."""
        for retry in (False, True):
            try:
                if not worker.ready(imports):
                    self._start(worker, imports)
                return worker.import_messages, worker.run(body, timeout_s)
            except ReplDesync:
                worker.stop()
                if retry:
                    raise
            except ReplFailure:
                worker.stop()
                raise
        raise AssertionError("unreachable")

    def _start(self, worker: Worker, imports: tuple[str, ...]) -> None:
        try:
            footprint = worker.start(imports, self.memory_for(imports), self.import_timeout_s)
        except ReplFailure as failure:
            if failure.status == "oom":
                self.footprints.pop(imports, None)  # the sized cap was too small: next time, the ceiling
            raise
        with self._cond:
            self.footprints[imports] = max(footprint, self.footprints.get(imports, 0.0))

    def _acquire(self, imports: tuple[str, ...]) -> Worker:
        """An idle worker: one holding `imports` if any, else the least recently used one."""
        with self._cond:
            while True:
                if self._closed:
                    raise ReplFailure("crash", "the Lean prover is closed")
                idle = [w for i, w in enumerate(self._workers) if i not in self._busy]
                if idle:
                    worker = next((w for w in idle if w.ready(imports)), None) or min(idle, key=lambda w: w.last_used)
                    self._busy.add(self._workers.index(worker))
                    return worker
                self._cond.wait()

    def _release(self, worker: Worker) -> None:
        with self._cond:
            worker.last_used = time.monotonic()
            self._busy.discard(self._workers.index(worker))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.close()
