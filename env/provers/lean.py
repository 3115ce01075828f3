"""Lean 4 + Mathlib backend: a small pool of `lean-interact` REPL workers that keep their imports loaded.

`import Mathlib` takes seconds and gigabytes, so each worker loads a set of imports once
(one REPL environment per distinct import list) and checks every file with those imports
on top of it: a check sends only the file's body. With a problem, the worker also keeps
an environment with the statement-check command defined and, per problem, one in which
the problem's statement is elaborated as a reference (see `env.provers.lean_text`); the
body runs on top of that and is followed by the statement comparison and `#print axioms`.

A check that runs past its time limit kills the worker's REPL (lean-interact does that on
a timeout); a crash or out-of-memory also ends it; the next check starts a fresh one. A
worker is also recycled after `max_checks_per_worker` checks or when its resident memory
passes 85% of `memory_mb`, since REPL environments are never freed.

Sandbox: lean-interact starts the REPL in `LeanServer.start()`, which a subclass may
override, so we start it ourselves: the `repl` binary with the environment `lake env`
gives in the project (captured once, outside the jail), under bubblewrap (via
`env.sandbox`) with no network, a scrubbed environment, the toolchain (elan home), the
project and the REPL build read-only, and a per-worker scratch directory as its only
writable place; its address space is capped at `memory_mb` (RLIMIT_AS, which also counts
the memory-mapped Mathlib `.olean` files, hence the large default). Where bubblewrap is
missing or cannot create namespaces, the REPL runs unjailed with the same limits and
every `CheckResult` says `sandboxed=False`. Only the file's text reaches the REPL (as a
command), never the episode directory, so `workdir` is not mounted.
"""

from __future__ import annotations

import functools
import json
import queue
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from env.problems import Problem
from env.provers import lean_text
from env.provers.base import CheckResult, Message, SearchHit, StatementCheck, Status, ToolNames
from env.sandbox import JAIL_ROOT, jail_argv, jail_available
from env.search import rg_search

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDARD_AXIOMS = frozenset({"propext", "Classical.choice", "Quot.sound"})
IMPORT_TIMEOUT_S = 600.0  # first `import Mathlib` of a worker, from a cold disk
META_TIMEOUT_S = 120.0  # elaborating the reference statement; the statement and axiom check
MAX_IMPORT_SETS = 4  # distinct import lists a worker keeps loaded before it is restarted
RECYCLE_MEMORY_FRACTION = 0.85
_OOM = re.compile(r"out of memory|Cannot allocate memory|std::bad_alloc", re.I)


class LeanUnavailableError(RuntimeError):
    """No Lean toolchain or no built project: the Lean backend cannot run here."""


def unavailable_reason(project_dir: Path = REPO_ROOT) -> str | None:
    """Why the Lean backend cannot run with `project_dir`, with how to fix it; None when it can."""
    fix = ("install elan (https://github.com/leanprover/elan), then run `lake exe cache get && lake build` "
           f"in {project_dir}")
    if shutil.which("lake") is None:
        return f"`lake` is not on PATH: {fix}"
    if not (project_dir / ".lake" / "packages" / "mathlib").is_dir():
        return f"Mathlib is not downloaded in {project_dir}/.lake/packages: {fix}"
    build = project_dir / ".lake" / "build"
    if not build.is_dir() or next(build.rglob("*.olean"), None) is None:
        return f"the project in {project_dir} is not built: {fix}"
    return None


class LeanProver:
    """The `Prover` for Lean 4 + Mathlib; thread-safe, a check waits for a free worker."""

    name = "lean"
    file_suffix = ".lean"
    tools = ToolNames(write="lean_write_file", check="lean_check_file", search="rg_in_mathlib")
    standard_axioms = STANDARD_AXIOMS
    library_name = "Mathlib"

    @classmethod
    def available(cls, project_dir: Path = REPO_ROOT) -> bool:
        """True when `lake` is on PATH and the project has been built."""
        return unavailable_reason(project_dir) is None

    def __init__(self, project_dir: Path = REPO_ROOT, *, timeout_s: float = 60.0, memory_mb: int = 16384,
                 workers: int = 1, max_checks_per_worker: int = 200, jail: bool = True) -> None:
        reason = unavailable_reason(project_dir)
        if reason is not None:
            raise LeanUnavailableError(f"the Lean backend is unavailable: {reason}")
        from lean_interact import LeanREPLConfig, LocalProject

        self.project_dir = project_dir.resolve()
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_checks_per_worker = max_checks_per_worker
        self.sandboxed = jail and jail_available()
        # Clones and builds the REPL for the project's Lean version on first use (needs the network once).
        self.config = LeanREPLConfig(project=LocalProject(directory=str(self.project_dir), auto_build=False),
                                     memory_hard_limit_mb=memory_mb)
        self._lean_env = _lake_env(self.project_dir)
        self._workers = [_Worker(self, i) for i in range(workers)]
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()  # the most recently used worker is the warmest
        for worker in self._workers:
            self._idle.put(worker)
        self._closed = False

    def render(self, problem: Problem, proof: str | None = None) -> str:
        return lean_text.render(problem, proof)

    def check(self, source: str, workdir: Path, *, problem: Problem | None = None,
              timeout_s: float | None = None) -> CheckResult:
        """Check `source` in a warm worker; `workdir` is not read (the REPL gets the text)."""
        start = time.monotonic()
        blocks = lean_text.blocked_constructs(source)
        if blocks:
            return CheckResult(status="error", messages=tuple(b.message() for b in blocks),
                               uses_sorry=lean_text.text_uses_sorry(source), elapsed_s=time.monotonic() - start,
                               sandboxed=self.sandboxed)
        worker = self._idle.get()  # time spent waiting for a free worker is not the check's
        try:
            return worker.check(source, problem, timeout_s or self.timeout_s)
        finally:
            self._idle.put(worker)

    def search(self, pattern: str, *, max_hits: int = 50) -> list[SearchHit]:
        root = self.project_dir / ".lake" / "packages" / "mathlib" / "Mathlib"
        if not root.is_dir():
            raise FileNotFoundError(f"Mathlib sources not found at {root}: run `lake exe cache get && lake build` "
                                    f"in {self.project_dir}")
        return [replace(hit, path=f"Mathlib/{hit.path}")
                for hit in rg_search(root, pattern, glob="*.lean", max_hits=max_hits)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.close()

    def _launch(self, scratch: Path) -> _Launch:
        """How a worker starts its REPL: the argv, environment and working directory."""
        repl = Path(self.config.cache_repl_dir) / ".lake" / "build" / "bin" / "repl"
        if not self.sandboxed:
            env = {**self._lean_env, "HOME": str(scratch), "LANG": "C.UTF-8"}
            return _Launch([str(repl)], env, scratch, self.memory_mb)
        elan_home = Path(self._lean_env.get("ELAN_HOME") or Path.home() / ".elan")
        sysroot = self._lean_env.get("LEAN_SYSROOT")
        readonly = [p for p in {elan_home, self.project_dir, Path(self.config.cache_repl_dir),
                                *([Path(sysroot)] if sysroot else [])} if p.exists()]
        env = {**self._lean_env, "HOME": JAIL_ROOT, "LANG": "C.UTF-8"}
        argv = jail_argv([str(repl)], scratch, sorted(readonly), env)
        return _Launch(argv, {"PATH": "/usr/bin:/bin"}, None, self.memory_mb)


def _lake_env(project_dir: Path) -> dict[str, str]:
    """The variables `lake env` sets in the project (LEAN_PATH, LD_LIBRARY_PATH, ...), read once."""
    proc = subprocess.run(["lake", "env", "env", "-0"], cwd=project_dir, capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise LeanUnavailableError(f"`lake env` failed in {project_dir}: "
                                   f"{proc.stderr.decode('utf-8', 'replace').strip()[-1000:]}")
    out = proc.stdout.decode("utf-8", "replace")
    pairs = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    env = {k: v for k, v in pairs.items() if k.startswith(("LEAN", "LAKE", "ELAN")) or k in ("PATH", "LD_LIBRARY_PATH")}
    # Lake may give search paths relative to the project; the REPL runs elsewhere (its scratch directory).
    for key in ("LEAN_PATH", "LEAN_SRC_PATH", "LD_LIBRARY_PATH", "PATH"):
        if key in env:
            env[key] = ":".join(str(project_dir / p) if p and not p.startswith("/") else p for p in env[key].split(":"))
    return env


@dataclass(frozen=True)
class _Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: Path | None
    memory_mb: int

    def spawn(self, stderr_path: Path) -> subprocess.Popen:
        """Start the REPL with pipes as `LeanServer` expects them; stderr goes to a file, read after a crash.

        The process is started from a thread that lives as long as it does: bubblewrap's
        `--die-with-parent` (PR_SET_PDEATHSIG) can end the jail when the *thread* that started
        it exits (seen here), and checks may run on short-lived threads (`asyncio.to_thread`).
        """
        cap = self.memory_mb * 1024 * 1024

        def limit() -> None:  # runs in the child before exec
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        started: queue.Queue[subprocess.Popen | OSError] = queue.Queue(maxsize=1)

        def keeper() -> None:
            try:
                with stderr_path.open("w") as stderr:
                    proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=stderr, encoding="utf-8", text=True,
                                            bufsize=1, start_new_session=True, preexec_fn=limit)
            except OSError as e:
                started.put(e)
                return
            started.put(proc)
            proc.wait()

        threading.Thread(target=keeper, name="lean-repl", daemon=True).start()
        proc = started.get()
        if isinstance(proc, OSError):
            raise proc
        return proc


@functools.cache
def _server_class() -> type:
    """`LeanServer` whose process start is ours (lean_interact is imported only when a prover is built)."""
    from lean_interact import LeanServer

    class OwnLaunchServer(LeanServer):
        def __init__(self, config: Any, launch: _Launch, stderr_path: Path) -> None:
            self._launch, self._stderr_path = launch, stderr_path
            super().__init__(config)  # calls start()

        def start(self) -> None:
            self._proc = self._launch.spawn(self._stderr_path)
            if not self.is_alive():
                raise ChildProcessError(f"the Lean REPL did not start: {self.stderr_tail()}")

        def stderr_tail(self) -> str:
            try:
                return self._stderr_path.read_text(encoding="utf-8", errors="replace")[-2000:].strip()
            except OSError:
                return ""

    return OwnLaunchServer


class _Failure(Exception):
    """The REPL did not answer a command; `status` is timeout, oom or crash."""

    def __init__(self, status: Status, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class _Worker:
    """One REPL process and the environments it has built (ids valid only for that process)."""

    def __init__(self, prover: LeanProver, index: int) -> None:
        self.prover = prover
        self.scratch = Path(tempfile.mkdtemp(prefix=f"lean-worker-{index}-"))
        self.server: Any = None
        self.envs: dict[tuple, tuple[int, list[dict]]] = {}
        self.checks = 0

    def check(self, source: str, problem: Problem | None, timeout_s: float) -> CheckResult:
        """Check one file; recycling the REPL afterwards (if due) is not counted in `elapsed_s`."""
        start = time.monotonic()
        result = self._check(source, problem, timeout_s)
        result = replace(result, elapsed_s=time.monotonic() - start)
        self._after_check()
        return result

    def _check(self, source: str, problem: Problem | None, timeout_s: float) -> CheckResult:
        split = lean_text.split_imports(source)
        sorry_in_text = lean_text.text_uses_sorry(source)
        if self.server is not None and not self.server.is_alive():
            self.stop()  # it died while idle: its cached environment ids are gone with it
        try:
            base, import_messages = self._env(("imports", split.imports), lean_text.imports_command(split.imports),
                                              None, IMPORT_TIMEOUT_S)
            reference_errors = ""
            if problem is not None:
                base, _ = self._env(("checker", split.imports), lean_text.CHECKER_COMMAND, base, META_TIMEOUT_S)
                command = lean_text.reference_command(problem)
                base, reference_messages = self._env(("reference", split.imports, command), command, base,
                                                     META_TIMEOUT_S)
                reference_errors = "; ".join(m["data"] for m in reference_messages if m["severity"] == "error")
            body = self._run(split.body if split.body.strip() else "\n", base, timeout_s)
        except _Failure as failure:
            return CheckResult(status=failure.status, messages=(Message("error", failure.text),),
                               uses_sorry=sorry_in_text, sandboxed=self.prover.sandboxed, raw_output=failure.text)
        messages = tuple(Message("error", f"in the imports: {m['data']}")
                         for m in import_messages if m["severity"] == "error")
        messages += tuple(lean_text.message_from_repl(m, split) for m in body["messages"])
        result = CheckResult(
            status="error" if any(m.severity == "error" for m in messages) else "ok", messages=messages,
            uses_sorry=lean_text.uses_sorry(source, body["sorries"], body["messages"]),
            sandboxed=self.prover.sandboxed,
            raw_output=json.dumps({"messages": body["messages"], "sorries": body["sorries"]}, ensure_ascii=False))
        if problem is not None:
            result = self._check_statement(result, problem, body["env"], reference_errors)
        return result

    def _check_statement(self, result: CheckResult, problem: Problem, env: int, reference_errors: str) -> CheckResult:
        try:
            checked = self._run(lean_text.check_command(problem.name), env, META_TIMEOUT_S)
        except _Failure as failure:
            note = Message("error", f"{failure.text} (while checking the statement)")
            return replace(result, status=failure.status, messages=result.messages + (note,))
        texts = [m["data"] for m in checked["messages"]]
        statement = lean_text.parse_statement(texts, problem.name, reference_errors) or StatementCheck(
            False, False, "the statement could not be checked: " + "; ".join(texts)[:500])
        axioms = lean_text.parse_axioms(texts, problem.name)
        return replace(result, statement=statement, axioms=axioms,
                       uses_sorry=result.uses_sorry or (axioms is not None and "sorryAx" in axioms))

    def _env(self, key: tuple, command: str, parent: int | None, timeout_s: float) -> tuple[int, list[dict]]:
        """The environment after `command` on `parent`, built once per REPL process."""
        if key not in self.envs:
            if key[0] == "imports" and sum(k[0] == "imports" for k in self.envs) >= MAX_IMPORT_SETS:
                self.stop()
            response = self._run(command, parent, timeout_s)
            self.envs[key] = (response["env"], response["messages"])
        return self.envs[key]

    def _run(self, command: str, env: int | None, timeout_s: float) -> dict:
        """One REPL command; a response dict with `env`, `messages` and `sorries`, or `_Failure`."""
        from lean_interact import Command
        from lean_interact.interface import LeanError

        if self.server is None or not self.server.is_alive():
            self._start()
        try:
            response = self.server.run(Command(cmd=command, env=env), timeout=timeout_s)
        except TimeoutError:
            self.stop()
            raise _Failure("timeout", f"the check did not finish within its time limit ({timeout_s:.0f} s)") from None
        except (OSError, ValueError):  # ConnectionAbortedError, ChildProcessError, broken JSON, an invalid response
            tail = self.server.stderr_tail() if self.server is not None else ""
            self.stop()
            if _OOM.search(tail):
                raise _Failure("oom", f"Lean ran out of memory (limit {self.prover.memory_mb} MB)") from None
            raise _Failure("crash", "the Lean REPL stopped unexpectedly" + (f": {tail}" if tail else "")) from None
        if isinstance(response, LeanError):
            self.stop()  # e.g. "Unknown environment.": this process's environment ids are no longer trusted
            raise _Failure("crash", f"the Lean REPL refused the command: {response.message}")
        data = response.model_dump(by_alias=True)
        return {"env": data["env"], "messages": data.get("messages", []), "sorries": data.get("sorries", [])}

    def _start(self) -> None:
        self.stop()
        try:
            self.server = _server_class()(self.prover.config, self.prover._launch(self.scratch),
                                          self.scratch / "repl.stderr")
        except (ChildProcessError, OSError) as e:
            self.server = None
            raise _Failure("crash", f"the Lean REPL could not be started: {e}") from None

    def _after_check(self) -> None:
        self.checks += 1
        if self.server is None:
            return
        limit = RECYCLE_MEMORY_FRACTION * self.prover.memory_mb
        if self.checks >= self.prover.max_checks_per_worker or self.server.get_memory_usage() > limit:
            self.stop()

    def stop(self) -> None:
        """End the REPL process; its environments go with it."""
        if self.server is not None:
            self.server.kill()
        self.server = None
        self.envs.clear()
        self.checks = 0

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)
