"""The trusted Rocq re-check: the only source of a "solved" verdict.

1. The attempt is compiled cold with `coqc` in the jail (in a directory of its own).
2. Only its `FdAttempt.vo` is copied into a fresh directory, beside a statement-check file
   we generate (`rocq_text.check_source`): the problem's header, the statement elaborated
   *before* the attempt is loaded, then `Definition __fd_check__ : <statement> :=
   @FdAttempt.<name>` and the theorem's assumptions written with `Redirect`. Compiling it
   runs none of the attempt's sentences (loading a compiled library replays declarations,
   it does not execute commands). Which stage it reached is read from the files its
   `Redirect`s wrote, which only that compilation can write.
3. `coqchk`, Coq's standalone kernel checker, re-typechecks the attempt's compiled library
   in a process that runs no attempt code (at the same time as step 2), and prints a
   context summary: axioms, and every declaration that relies on type-in-type, unchecked
   (co)fixpoints or assumed positivity.

Nothing the attempt prints takes part: every answer is an exit status, a file written by a
process that ran no attempt code, or `coqchk`'s summary, parsed strictly.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from env.problems import Problem
from env.provers.base import Message, StatementCheck, Status
from env.provers.rocq_install import CoqInstall
from env.provers.rocq_text import (
    ATTEMPT,
    CHECK,
    STAGE_FILES,
    check_source,
    parse_assumptions,
    parse_context_summary,
    parse_messages,
)
from env.sandbox import ProcessOutcome, run_jailed

MAX_STAGE_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TrustedCheck:
    status: Status  # of the cold compile of the attempt, or of a later step that did not finish
    messages: tuple[Message, ...] = ()  # coqc's messages when the cold compile failed
    statement: StatementCheck | None = None
    axioms: tuple[str, ...] | None = None
    unsafe: tuple[str, ...] = ()
    detail: str = ""  # why the check stopped early, when it did
    elapsed_s: float = 0.0
    jailed: bool = True


def outcome_status(out: ProcessOutcome) -> Status:
    """From the exit status and the limits alone."""
    if out.timed_out:
        return "timeout"
    if out.out_of_memory:
        return "oom"
    if out.output_limited:
        return "error"
    if out.signal is not None:
        return "crash"
    return "ok" if out.returncode == 0 else "error"


def failure_message(status: Status, out: ProcessOutcome, what: str = "the check") -> Message:
    if status == "timeout":
        return Message("error", f"{what} did not finish within its time limit ({out.elapsed_s:.1f} s)")
    if status == "oom":
        return Message("error", f"{what} ran out of memory ({out.peak_rss_mb:.0f} MB of {out.memory_mb} MB)")
    if out.output_limited:
        return Message("error", f"{what} printed more output than allowed and was stopped")
    return Message("error", f"{what} crashed (exit status {out.returncode})")


def trusted_check(source: str, problem: Problem, *, workdir: Path, timeout_s: float, memory_mb: int, jail: bool,
                  coq: CoqInstall, standard_axioms: frozenset[str]) -> TrustedCheck:
    start = time.monotonic()
    deadline = start + timeout_s
    compile_dir = Path(tempfile.mkdtemp(dir=workdir, prefix=".rocq-compile-"))
    check_dir = Path(tempfile.mkdtemp(dir=workdir, prefix=".rocq-trusted-"))

    def run(argv: list[str], where: Path) -> ProcessOutcome:
        return run_jailed(argv, workdir=where, readonly=coq.mounts, env=coq.environment(),
                          timeout_s=max(1.0, deadline - time.monotonic()), memory_mb=memory_mb, jail=jail)

    def done(status: Status, jailed: bool, **kw) -> TrustedCheck:
        return TrustedCheck(status, elapsed_s=time.monotonic() - start, jailed=jailed, **kw)

    try:
        (compile_dir / f"{ATTEMPT}.v").write_text(source, encoding="utf-8")
        compiled = run(["coqc", "-q", "-Q", ".", "", f"{ATTEMPT}.v"], compile_dir)
        status = outcome_status(compiled)
        if status != "ok":
            messages = parse_messages(compiled.output) if status == "error" else ()
            if not any(m.severity == "error" for m in messages):
                messages += (failure_message(status, compiled, "compiling the file"),)
            return done(status, compiled.jailed, messages=messages, detail="the file does not compile with coqc")
        vo = compile_dir / f"{ATTEMPT}.vo"
        if vo.is_symlink() or not vo.is_file():
            return done("crash", compiled.jailed, detail="coqc reported success but wrote no compiled file")
        shutil.copyfile(vo, check_dir / vo.name)
        shutil.rmtree(compile_dir, ignore_errors=True)

        (check_dir / f"{CHECK}.v").write_text(check_source(problem), encoding="utf-8")
        with ThreadPoolExecutor(max_workers=1) as pool:  # the kernel re-check runs beside the statement check
            rechecked = pool.submit(run, ["coqchk", "-silent", "-o", "-Q", ".", "", "-norec", ATTEMPT], check_dir)
            checked = run(["coqc", "-q", "-Q", ".", "", f"{CHECK}.v"], check_dir)
            kernel = rechecked.result()
        stage = [_read_stage(check_dir / f"{name}.out") for name in STAGE_FILES]
        if checked.timed_out or checked.out_of_memory:
            status = outcome_status(checked)
            return done(status, checked.jailed, messages=(failure_message(status, checked, "checking the statement"),),
                        detail="the statement check did not finish")
        if stage[0] is None:
            return done("ok", checked.jailed, detail="the problem's own statement did not elaborate: "
                        + checked.output.strip()[-500:])
        if stage[1] is None:
            statement = StatementCheck(False, False, f"no theorem named {problem.name} in the file")
            return done("ok", checked.jailed, statement=statement)
        if stage[2] is None or checked.returncode != 0:
            statement = StatementCheck(True, False, f"the type of {problem.name} is not the problem's statement")
            return done("ok", checked.jailed, statement=statement)
        statement = StatementCheck(True, True, "the kernel accepts it as a proof of the problem's statement")
        printed = parse_assumptions(stage[2])
        if kernel.timed_out or kernel.out_of_memory:
            status = outcome_status(kernel)
            return done(status, kernel.jailed, statement=statement,
                        messages=(failure_message(status, kernel, "the kernel re-check"),))
        summary = parse_context_summary(kernel.output) if kernel.returncode == 0 else None
        if summary is None:
            reason = ("the kernel checker rejected the compiled file" if kernel.returncode != 0
                      else "the kernel checker's summary could not be read")
            return done("ok", kernel.jailed, statement=statement, unsafe=(f"{reason}: {kernel.output.strip()[-300:]}",))
        own = tuple(a for a in summary.axioms if a.split(".")[0] == ATTEMPT)
        axioms = None if printed is None else tuple(dict.fromkeys(
            [full_name(p, standard_axioms) for p in printed] + list(own)))
        return done("ok", kernel.jailed, statement=statement, axioms=axioms, unsafe=tuple(summary.unsafe()))
    finally:
        shutil.rmtree(compile_dir, ignore_errors=True)
        shutil.rmtree(check_dir, ignore_errors=True)


def full_name(printed: str, standard: frozenset[str]) -> str:
    """The standard axiom a printed (possibly shortened) name stands for, or the name as printed.

    Only library axioms reach here under a short name: an axiom the attempt declared prints
    as `FdAttempt.<name>` (the check file never imports the attempt), and `coqchk` lists
    those separately.
    """
    for name in standard:
        if name == printed or name.endswith("." + printed):
            return name
    return printed


def _read_stage(path: Path) -> str | None:
    if path.is_symlink() or not path.is_file():
        return None
    with path.open("rb") as f:
        return f.read(MAX_STAGE_FILE_BYTES).decode("utf-8", "replace")
