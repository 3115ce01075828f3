"""Mutation testing of the core modules with mutmut: how many deliberate small bugs the tests catch.

    python scripts/mutation.py [--modules env/verdict.py agent/episode.py ...] [--show-survivors] [--jobs N]
                               [--only PATTERN ...] [--workdir DIR] [--wall-timeout SECONDS]

mutmut (`pip install mutmut`) makes one mutant per small change (a flipped comparison, a
constant off by one, a dropped argument, a string changed) and runs the tests that reach the
mutated function against each (not those marked `slow`; they must all pass on the unmutated code, or
nothing is judged and this stops with mutmut's output). This runs it in a scratch copy of the repository (mutmut
writes a `mutants/` tree beside the code), then prints per module: killed (a test failed or
timed out: mutmut's limit counts CPU time, so a mutant that deadlocks, using none, is ended
after `--wall-timeout` seconds as a timeout too), survived, not reached by any test, and the
score killed / (killed + survived).
Surviving mutants are either killed by a new test or listed as equivalent in the README's
testing section. It takes minutes for the fast modules and hours for the prover modules,
whose tests run real provers: it is not part of CI.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module -> the tests that exercise it (mutmut then runs, per mutant, those that reach the mutated function)
MODULES = {
    "env/verdict.py": ["tests/env/test_verdict.py"],
    "agent/episode.py": ["tests/agent/test_episode.py"],
    "env/provers/rocq_text.py": ["tests/env/test_rocq_text.py"],
    "trainer/losses.py": ["tests/trainer/test_losses.py"],
    "trainer/batches.py": ["tests/trainer/test_batches.py"],
    "trainer/algorithms.py": ["tests/trainer/test_batches.py"],
    "trainer/attention.py": ["tests/trainer/test_attention.py", "tests/trainer/test_batches.py"],
    "trainer/fused_layers.py": ["tests/trainer/test_fused_layers.py"],
    "agent/rollout.py": ["tests/agent/test_rollout.py", "tests/agent/test_rollout_cli.py",
                         "tests/env/test_lean_unavailable.py"],
    "env/provers/rocq.py": ["tests/env/test_rocq.py", "tests/env/test_rocq_adversarial.py"],
    "env/provers/rocq_trusted.py": ["tests/env/test_rocq.py", "tests/env/test_rocq_adversarial.py"],
    "env/provers/rocq_worker.py": ["tests/env/test_rocq.py", "tests/env/test_rocq_adversarial.py"],
}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # mutmut's progress lines, left out of an error's excerpt
FAST = ["env/verdict.py", "agent/episode.py", "env/provers/rocq_text.py", "trainer/losses.py",
        "trainer/batches.py", "trainer/algorithms.py", "trainer/attention.py", "trainer/fused_layers.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=FAST, choices=sorted(MODULES),
                        help="modules to mutate (default: the ones whose tests need no prover)")
    parser.add_argument("--show-survivors", action="store_true", help="print the diff of each surviving mutant")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="mutants tested at once (default: one per core); the prover modules take hours on "
                        "2 cores and scale with cores")
    parser.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                        help="mutants whose names match (fnmatch), e.g. 'agent.rollout.x_main*': after new tests")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the scratch copy here instead of a temporary folder: a run cut short resumes "
                        "when started again with the same arguments and no --only (mutants with a result are "
                        "not run again), and `mutmut results` / `mutmut show NAME` there read it meanwhile")
    parser.add_argument("--wall-timeout", type=float, default=900, metavar="SECONDS",
                        help="a mutant still running after this long counts as a timeout (default 900): mutmut's "
                        "own limit counts CPU time, which a mutant that deadlocks does not use")
    args = parser.parse_args()
    if shutil.which("mutmut") is None:
        print("error: mutmut is not installed: pip install mutmut", file=sys.stderr)
        return 2
    tests = sorted({t for m in args.modules for t in MODULES[m]})
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return mutate(args, tests, args.workdir.resolve())
    with tempfile.TemporaryDirectory(prefix="fd-mutation-") as scratch:
        return mutate(args, tests, Path(scratch))


def mutate(args: argparse.Namespace, tests: list[str], scratch: Path) -> int:
    """Copy the repository into `scratch`/repo (kept as it is when it is there already: mutmut's
    results beside it), run mutmut there and print the scores."""
    work = scratch / "repo"
    if not work.exists():
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for name in files.splitlines():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
        with (work / "pyproject.toml").open("a") as f:
            f.write("\n[tool.mutmut]\n"
                    f"source_paths = {[str(m) for m in args.modules]!r}\n"
                    f"pytest_add_cli_args_test_selection = {tests!r}\n"
                    # tests marked slow (a real SmolLM2 run, ...) would cost each surviving mutant 20 s more
                    'pytest_add_cli_args = ["-m", "not slow"]\n'
                    # the tests' imports need the rest of the code beside the mutated modules
                    f"also_copy = {['env', 'agent', 'trainer', 'data', 'lean_project', 'configs']!r}\n"
                    # torch's thread pools do not survive a fork of a process that has used them: the
                    # mutants fork from a server that has only imported the tests
                    'process_isolation = "forkserver"\n')
    # one thread per test process: mutmut runs one per core, and more threads only wait on each other
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = scratch / "mutmut-run.log"
    with log.open("w") as out:
        run = subprocess.Popen(["mutmut", "run", "--max-children", str(args.jobs), *args.only], cwd=work, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()
        watcher = threading.Thread(target=end_stuck_mutants, args=(run.pid, log, args.wall_timeout, stop), daemon=True)
        watcher.start()
        run.wait()
        stop.set()
    if run.returncode != 0:  # e.g. a selected test that fails on the unmutated code: no mutant can be judged
        lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        tail = [ln for ln in lines if ln.strip() and ln.lstrip()[0] not in SPINNER][-40:]
        print(f"error: mutmut run failed (exit status {run.returncode}); the end of its output ({log}):\n"
              + "\n".join(tail) + "\nwhere stats failed, a selected test fails on the unmutated code: "
              f"python -m pytest -m 'not slow' {' '.join(tests)}", file=sys.stderr)
        return 1
    results = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, capture_output=True,
                             text=True, check=True).stdout
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for line in results.splitlines():
        m = re.match(r"\s*([\w.]+)\.x[^:]*__mutmut_\d+: (.+)$", line)
        if m is None:
            continue
        module, status = m[1], m[2].strip()
        counts[module][status] += 1
        if status == "survived":
            survivors[module].append(line.strip().split(":")[0])
    print(f"{'module':<28}{'killed':>8}{'survived':>10}{'no tests':>10}{'score':>8}")
    for module in sorted(counts):
        c = counts[module]
        killed = c["killed"] + c["timeout"]
        tested = killed + c["survived"]
        score = killed / tested if tested else float("nan")
        print(f"{module:<28}{killed:>8}{c['survived']:>10}{c['no tests']:>10}{score:>8.1%}")
    if args.show_survivors:
        for module in sorted(survivors):
            for name in survivors[module]:
                diff = subprocess.run(["mutmut", "show", name], cwd=work, capture_output=True, text=True).stdout
                print(f"\n# {name}\n" + "\n".join(ln for ln in diff.splitlines() if ln[:2] in ("- ", "+ ")))
    return 0


def end_stuck_mutants(pid: int, log: Path, limit_s: float, stop: threading.Event, poll_s: float = 5.0) -> None:
    """Send SIGXCPU (the signal of mutmut's own limit, so the mutant counts as a timeout) to each
    mutant that has run `limit_s` seconds, until `stop` is set. A mutant is a grandchild of the
    `mutmut run` process `pid` (its fork server's child); the watch starts only once mutmut logs
    that it runs mutants, as its clean and stats runs are such grandchildren too."""
    seen: dict[int, float] = {}
    started = False
    while not stop.wait(poll_s):
        started = started or "Running mutation testing" in log.read_text(errors="replace")
        if not started:
            continue
        now = time.monotonic()
        for mutant in grandchildren(pid):
            if now - seen.setdefault(mutant, now) > limit_s:
                try:
                    os.kill(mutant, signal.SIGXCPU)
                except ProcessLookupError:
                    pass


def grandchildren(pid: int) -> list[int]:
    """The processes whose parent's parent is `pid`, from /proc (empty where there is none)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    children = {p for p, parent in parents.items() if parent == pid}
    return sorted(p for p, parent in parents.items() if parent in children)


if __name__ == "__main__":
    raise SystemExit(main())
