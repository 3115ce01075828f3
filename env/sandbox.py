"""Per-episode sandboxes: a scratch directory with validated paths, and a jail for prover processes.

`EpisodeDir` is the only place an episode's files live; it is removed on `close()`.
`run_jailed` runs a prover command under bubblewrap: no network, a scrubbed environment,
read-only toolchain and library paths, and the episode directory as the only writable
place. CPU time and memory are capped with rlimits; the wall clock with a timeout that
kills the whole process group; the output with a capped buffer and a hard limit. Where
bubblewrap is missing or cannot create namespaces, the command still runs with the limits,
and the outcome says `jailed=False`. Out of memory is read from the limits (peak memory
near the cap), never from the process's words.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from env.process import OUTPUT_LIMIT_BYTES, pump

MAX_FILE_BYTES = 256 * 1024
MAX_EPISODE_BYTES = 4 * 1024 * 1024
MAX_PATH_CHARS = 200
JAIL_ROOT = "/sandbox"  # where the episode directory appears inside the jail
_SAFE_PATH = re.compile(r"[A-Za-z0-9_.\-/]+")


class SandboxError(ValueError):
    """A tool asked for something the sandbox refuses (bad path, oversize write, ...)."""


class EpisodeDir:
    """A temporary directory that holds one episode's files; a context manager."""

    def __init__(self, *, prefix: str = "episode-", max_file_bytes: int = MAX_FILE_BYTES,
                 max_total_bytes: int = MAX_EPISODE_BYTES) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        # removed on close, or when the object is collected, or at interpreter exit, whichever comes first
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def resolve(self, rel_path: str) -> Path:
        """The absolute path for a tool-supplied relative path, or SandboxError."""
        if not isinstance(rel_path, str) or not rel_path.strip():
            raise SandboxError("path must be a non-empty relative path such as 'Main.v'")
        if len(rel_path) > MAX_PATH_CHARS:
            raise SandboxError(f"path is longer than {MAX_PATH_CHARS} characters")
        if rel_path.startswith(("/", "~")) or PurePosixPath(rel_path).is_absolute():
            raise SandboxError(f"absolute paths are not allowed ({rel_path!r}); "
                               "use a path relative to the working directory")
        if not _SAFE_PATH.fullmatch(rel_path):
            raise SandboxError(f"path {rel_path!r} may contain only letters, digits, '_', '-', '.' and '/'")
        parts = PurePosixPath(rel_path).parts
        if ".." in parts:
            raise SandboxError(f"'..' is not allowed in paths ({rel_path!r})")
        path = self.root
        for part in parts:
            if part == ".":
                continue
            path = path / part
            if path.is_symlink():
                raise SandboxError(f"path {rel_path!r} goes through a symbolic link")
        if path == self.root:
            raise SandboxError("path names the working directory itself, not a file")
        return path

    def write(self, rel_path: str, content: str) -> Path:
        path = self.resolve(rel_path)
        data = content.encode("utf-8")
        if len(data) > self.max_file_bytes:
            raise SandboxError(f"file is {len(data)} bytes; the limit is {self.max_file_bytes}")
        old = path.stat().st_size if path.is_file() else 0
        if self.used_bytes() - old + len(data) > self.max_total_bytes:
            raise SandboxError(f"the episode's files would exceed {self.max_total_bytes} bytes")
        if path.is_dir():
            raise SandboxError(f"{rel_path!r} is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def read(self, rel_path: str) -> str:
        path = self.resolve(rel_path)
        if not path.is_file():
            raise SandboxError(f"no file {rel_path!r}; write it first")
        return path.read_text(encoding="utf-8", errors="replace")

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not p.is_symlink())

    def close(self) -> None:
        self._remove()

    def __enter__(self) -> EpisodeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


OOM_FRACTION = 0.6  # a failed process whose peak memory reached this share of its cap ran out of memory


@dataclass(frozen=True)
class ProcessOutcome:
    """How a jailed process ended. `output` is stdout and stderr together, capped (head and tail)."""

    returncode: int | None  # None when stopped for the wall-clock timeout or the output limit
    output: str
    elapsed_s: float
    timed_out: bool
    jailed: bool
    output_limited: bool = False  # stopped for printing more than the output limit
    signal: int | None = None  # the signal that ended it, if one did
    peak_rss_mb: float = 0.0
    memory_mb: int | None = None

    @property
    def out_of_memory(self) -> bool:
        """Decided from the limits alone, never from what the process printed."""
        failed = self.returncode != 0 and not self.timed_out and not self.output_limited
        return failed and self.memory_mb is not None and self.peak_rss_mb >= OOM_FRACTION * self.memory_mb


@functools.cache
def jail_available() -> bool:
    """True when bubblewrap exists and can create its namespaces here."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False
    probe = [bwrap, "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def jail_argv(argv: Sequence[str], workdir: Path, readonly: Sequence[Path], env: dict[str, str], *,
              as_pid_1: bool = False) -> list[str]:
    """The bubblewrap command line that runs `argv` with `workdir` as its only writable directory.

    `as_pid_1` runs the command itself as the namespace's first process (no reaper), so that
    it is bubblewrap's own child, whose memory the caller can watch (`PeakMemory`).
    """
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session",
           "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if as_pid_1:
        cmd.append("--as-pid-1")
    for link in ("bin", "lib", "lib64", "sbin"):  # merged-/usr systems keep these as links
        target = Path("/") / link
        if target.is_symlink():
            cmd += ["--symlink", os.readlink(target), f"/{link}"]
        elif target.is_dir():
            cmd += ["--ro-bind", str(target), f"/{link}"]
    for path in readonly:
        cmd += ["--ro-bind", str(path), str(path)]
    cmd += ["--bind", str(workdir), JAIL_ROOT, "--chdir", JAIL_ROOT, "--clearenv"]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    return cmd + ["--", *argv]


def jailed_command(argv: Sequence[str], *, workdir: Path, readonly: Sequence[Path] = (),
                   env: dict[str, str] | None = None, jail: bool = True) -> tuple[list[str], Path | None, dict, bool]:
    """(command, cwd, environment, jailed) for running `argv` in the jail, or unjailed where it cannot be."""
    env = {"PATH": "/usr/bin:/bin", "HOME": JAIL_ROOT, "LANG": "C.UTF-8", **(env or {})}
    if jail and jail_available():
        return jail_argv(argv, workdir, readonly, env, as_pid_1=True), None, {"PATH": "/usr/bin:/bin"}, True
    return list(argv), workdir, {**env, "HOME": str(workdir)}, False


def rlimits(*, cpu_s: int | None, memory_mb: int | None):
    """A `preexec_fn` that caps CPU time and address space in the child before it execs."""

    def limit() -> None:
        if cpu_s is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        if memory_mb is not None:
            cap = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return limit


class PeakMemory:
    """The peak resident memory of the process a command runs (the prover, inside the jail),
    polled from the kernel while it runs.

    The rusage that `wait4` reports cannot be used: a child forked from a large Python
    process (a trainer holds gigabytes) carries the parent's resident size until it execs,
    and the kernel keeps that as the child's peak.
    """

    def __init__(self, proc: subprocess.Popen, jailed: bool) -> None:
        self.proc, self.jailed = proc, jailed
        self.pid: int | None = None if jailed else proc.pid
        self.peak_mb = 0.0

    def poll(self) -> float:
        if self.pid is None:  # with --as-pid-1 the prover is bubblewrap's only child
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                children = []
            self.pid = int(children[0]) if children else None
        if self.pid is not None:
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return self.peak_mb
            m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
            if m is not None:
                self.peak_mb = max(self.peak_mb, int(m[1]) / 1024)
        return self.peak_mb


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_jailed(argv: Sequence[str], *, workdir: Path, readonly: Sequence[Path] = (), timeout_s: float,
               memory_mb: int | None, env: dict[str, str] | None = None, jail: bool = True,
               output_limit: int = OUTPUT_LIMIT_BYTES) -> ProcessOutcome:
    """Run `argv` with `workdir` as its only writable directory (seen as JAIL_ROOT when jailed).

    Paths in `argv` that point into the episode must be given relative to the working
    directory, since its absolute path differs inside the jail. The output is read through a
    capped buffer; past `output_limit` bytes the process group is killed.
    """
    cmd, cwd, run_env, jailed = jailed_command(argv, workdir=workdir, readonly=readonly, env=env, jail=jail)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=run_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=rlimits(cpu_s=max(1, int(timeout_s) + 1), memory_mb=memory_mb))
    assert proc.stdout is not None
    memory = PeakMemory(proc, jailed)
    try:
        pumped = pump(None, proc.stdout.fileno(), deadline=start + timeout_s, limit=output_limit, tick=memory.poll)
        if pumped.ending != "eof":
            kill_group(proc)
    finally:
        proc.stdout.close()
    code = proc.wait()
    stopped = pumped.ending in ("timeout", "limit")
    sig = None if stopped else killed_by(code, jailed)
    timed_out = pumped.ending == "timeout" or sig in (signal.SIGXCPU, signal.SIGKILL)
    return ProcessOutcome(None if stopped else code, pumped.output.text(), time.monotonic() - start, timed_out,
                          jailed, output_limited=pumped.ending == "limit", signal=sig,
                          peak_rss_mb=memory.peak_mb, memory_mb=memory_mb)


def killed_by(code: int, jailed: bool) -> int | None:
    """The signal that ended the process, if one did (bubblewrap reports a child's signal N as 128 + N)."""
    if code < 0:
        return -code
    if jailed and code > 128:
        return code - 128
    return None
