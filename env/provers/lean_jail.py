"""Where Lean's processes run: the toolchain's paths, the jail's mounts, and a capped process runner.

Every Lean process that touches an attempt (the REPL worker, the compile of the attempt)
or decides its verdict (the kernel re-check) runs under bubblewrap and sees only:
the toolchain (`LEAN_SYSROOT`), the built Lake packages (the directories on `LEAN_PATH`),
the one program it runs, and its own scratch directory (the only writable place, seen as
`/sandbox`). Never the repository itself, whose `data/` holds reference proofs:
`LeanToolchain.mounts` refuses any mount that would show a repository file outside its
`.lake/` build directory. The variables come from `lake env`, read once outside the jail.

`Launch.run` reads a process's output through a capped buffer, so a file whose code
prints without end cannot exhaust this process's memory; it caps the address space
(RLIMIT_AS), the size of files written (RLIMIT_FSIZE) and the wall clock (the whole
process group is killed), but not CPU time, since Lean elaborates on several threads.
"""

from __future__ import annotations

import os
import queue
import re
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from env.sandbox import JAIL_ROOT, jail_argv

MAX_FILE_MB = 64  # the largest file a Lean process may write (an attempt's .olean is far smaller)
OUTPUT_CAP = 1 << 20  # bytes of a process's output kept; the rest is read and dropped
_OOM = re.compile(r"out of memory|Cannot allocate memory|std::bad_alloc", re.I)


class JailError(RuntimeError):
    """A mount would show files the jail must hide (the repository, its data)."""


@dataclass(frozen=True)
class LeanToolchain:
    """The paths a Lean process needs, as `lake env` reports them for the project."""

    project_dir: Path
    sysroot: Path
    lean_path: tuple[Path, ...]  # directories of built .olean files, the toolchain's and each package's
    library_path: tuple[Path, ...]  # shared libraries of the toolchain and packages (LD_LIBRARY_PATH)
    jailed: bool

    @property
    def lean(self) -> Path:
        return self.sysroot / "bin" / "lean"

    @property
    def repl(self) -> Path:
        return self.project_dir / ".lake" / "build" / "bin" / "fdrepl"

    @property
    def checker(self) -> Path:
        return self.project_dir / ".lake" / "build" / "bin" / "fdcheck"

    def environment(self, home: str) -> dict[str, str]:
        """The variables a Lean process gets: its search paths, nothing else of ours."""
        return {
            "LEAN_SYSROOT": str(self.sysroot),
            "LEAN_PATH": ":".join(map(str, self.lean_path)),
            "LD_LIBRARY_PATH": ":".join(map(str, self.library_path)),
            "PATH": f"{self.sysroot / 'bin'}:/usr/bin:/bin",
            "HOME": home,
            "LANG": "C.UTF-8",
        }

    def mounts(self, program: Path) -> list[Path]:
        """The read-only mounts of a jail that runs `program`: toolchain, package builds, the program."""
        paths = {self.sysroot, *self.lean_path, *self.library_path}
        if not program.is_relative_to(self.sysroot):
            paths.add(program)
        present = [p for p in paths if p.exists()]
        mounts = sorted(p for p in present if not any(p != q and p.is_relative_to(q) for q in present))
        check_mounts(mounts, self.project_dir)
        return mounts

    def launch(self, argv: Sequence[str], workdir: Path, memory_mb: int) -> Launch:
        """How to start `argv` (its program an absolute path) with `workdir` as its only writable directory.

        Other paths in `argv` must be relative to the working directory (`workdir`, seen as
        /sandbox in the jail).
        """
        if not self.jailed:
            return Launch(list(argv), self.environment(str(workdir)), workdir, memory_mb)
        wrapped = jail_argv(argv, workdir, self.mounts(Path(argv[0])), self.environment(JAIL_ROOT))
        return Launch(wrapped, {"PATH": "/usr/bin:/bin"}, None, memory_mb)


def check_mounts(mounts: Sequence[Path], repo: Path) -> None:
    """Raise JailError if a mount shows the repository, or a repository file outside `.lake/`."""
    repo = repo.resolve()
    for mount in mounts:
        resolved = mount.resolve()
        if repo.is_relative_to(resolved):
            raise JailError(f"mounting {mount} in the jail would show the whole repository {repo}")
        if resolved.is_relative_to(repo) and not resolved.is_relative_to(repo / ".lake"):
            raise JailError(f"mounting {mount} in the jail would show repository files outside {repo / '.lake'}")


def parse_lake_env(output: str, project_dir: Path, *, jailed: bool) -> LeanToolchain:
    """The toolchain from `lake env env -0` output (NUL-separated NAME=VALUE pairs).

    Relative search paths are taken relative to the project (Lake may print them so);
    entries that Lake did not add (the caller's own LD_LIBRARY_PATH) are dropped, since
    the jail would not show them anyway.
    """
    pairs = dict(item.split("=", 1) for item in output.split("\0") if "=" in item)
    if "LEAN_SYSROOT" not in pairs or "LEAN_PATH" not in pairs:
        raise ValueError("`lake env` did not report LEAN_SYSROOT and LEAN_PATH")
    project_dir = project_dir.resolve()
    sysroot = Path(pairs["LEAN_SYSROOT"])

    def paths(key: str) -> tuple[Path, ...]:
        found = []
        for entry in pairs.get(key, "").split(":"):
            if not entry:
                continue
            path = Path(entry) if entry.startswith("/") else project_dir / entry
            if path.is_relative_to(sysroot) or path.is_relative_to(project_dir / ".lake"):
                found.append(path)
        return tuple(dict.fromkeys(found))

    return LeanToolchain(project_dir, sysroot, paths("LEAN_PATH"), paths("LD_LIBRARY_PATH"), jailed)


def read_toolchain(project_dir: Path, *, jailed: bool) -> LeanToolchain:
    """Run `lake env` once in the project (outside any jail: it runs none of an attempt's code)."""
    proc = subprocess.run(["lake", "env", "env", "-0"], cwd=project_dir, capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"`lake env` failed in {project_dir}: "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()[-1000:]}")
    return parse_lake_env(proc.stdout.decode("utf-8", "replace"), project_dir, jailed=jailed)


@dataclass(frozen=True)
class Outcome:
    """How a one-shot Lean process ended; `output` is its stdout and stderr, capped."""

    returncode: int | None  # None when killed at the wall-clock limit
    output: str
    elapsed_s: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def out_of_memory(self) -> bool:
        """It failed, saying it ran out of memory (a process that succeeded may print those words itself)."""
        return self.returncode not in (0, None) and bool(_OOM.search(self.output))


@dataclass(frozen=True)
class Launch:
    """A command ready to start: argv (possibly wrapped in bubblewrap), environment, working directory."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path | None
    memory_mb: int

    def _limits(self) -> None:  # runs in the child before exec
        cap = self.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_MB << 20, MAX_FILE_MB << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def run(self, timeout_s: float, *, output_cap: int = OUTPUT_CAP) -> Outcome:
        """Run to the end (or the wall-clock limit), keeping the first `output_cap` bytes of output."""
        start = time.monotonic()
        proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=self._limits)
        kept = bytearray()

        def drain() -> None:
            while chunk := proc.stdout.read1(65536):
                kept.extend(chunk[:max(0, output_cap - len(kept))])

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        reader.join(timeout=5)
        proc.stdout.close()
        return Outcome(code, kept.decode("utf-8", "replace"), time.monotonic() - start)

    def spawn(self, stderr_path: Path) -> subprocess.Popen:
        """Start a long-lived process with binary pipes for stdin/stdout; stderr goes to a file.

        The process is started from a thread that lives as long as it does: bubblewrap's
        `--die-with-parent` (PR_SET_PDEATHSIG) ends the jail when the *thread* that started
        it exits, and checks may run on short-lived threads (`asyncio.to_thread`).
        """
        started: queue.Queue[subprocess.Popen | OSError] = queue.Queue(maxsize=1)

        def keeper() -> None:
            try:
                with stderr_path.open("wb") as stderr:
                    proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=stderr, bufsize=0,
                                            start_new_session=True, preexec_fn=self._limits)
            except OSError as e:
                started.put(e)
                return
            started.put(proc)
            proc.wait()

        threading.Thread(target=keeper, name="lean-process", daemon=True).start()
        proc = started.get()
        if isinstance(proc, OSError):
            raise proc
        return proc


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(address space, resident set) in MB of the largest process in the tree under `pid`.

    Under bubblewrap the Lean process is a grandchild of `pid`; the jail's own processes
    are tiny, so the largest one is Lean. (0, 0) when the process is gone.
    """
    best = (0.0, 0.0)
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        vm = int(fields.get("VmSize", "0 kB").split()[0]) / 1024
        rss = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
        best = max(best, (vm, rss))
    return best
