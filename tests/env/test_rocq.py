"""The Rocq backend against real coqtop, coqc and coqchk: feedback, the trusted verdict, worker hygiene, limits.

The adversarial suite (attempts that try to be judged solved without a proof) is in
`test_rocq_adversarial.py`.
"""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from env.problems import Problem
from env.provers.rocq import RocqProver
from env.provers.rocq_text import header_requires
from env.sandbox import EpisodeDir, jail_available
from env.verdict import judge
from tests.conftest import requires_coq

HEADER = "Require Import Reals Lra.\nOpen Scope R_scope.\n\n"
PROBLEM = Problem(name="fd_test_double", prover="rocq", header=HEADER,
                  formal_statement="Theorem fd_test_double (x : R) (h : 1 < x) : x * x > x.\nProof.",
                  formal_proof="\n  nra.\nQed.")
STATEMENT = "Theorem fd_test_double (x : R) (h : 1 < x) : x * x > x.\nProof.\n"
WRONG_TACTIC = HEADER + STATEMENT + "  lia.\nQed.\n"


def check(prover, source, problem=PROBLEM, **kw):
    with EpisodeDir() as d:
        result = prover.check(source, d.root, problem=problem, **kw)
    return result, judge(result, problem, prover) if problem is not None else None


def test_reference_proof_solves_through_the_trusted_check(rocq):
    result, verdict = check(rocq, rocq.render(PROBLEM))
    assert verdict.solved, (verdict, result.messages)
    assert result.trusted and result.trusted_s > 0 and result.unsafe == ()
    assert result.statement.matches and "kernel" in result.statement.detail
    assert result.sandboxed == jail_available()
    assert set(result.axioms) <= rocq.standard_axioms
    assert "Coq.Reals.ClassicalDedekindReals.sig_forall_dec" in result.axioms


def test_extra_imports_before_the_statement_are_fine(rocq):
    source = HEADER + "Require Import Psatz ZArith.\n" + STATEMENT + "  nra.\nQed.\n"
    assert check(rocq, source)[1].solved


def test_feedback_locates_the_first_error_like_coqc(rocq, tmp_path):
    source = WRONG_TACTIC + "Check not_reached.\n"
    result, verdict = check(rocq, source)
    (error,) = result.errors
    assert (error.line, error.column) == (6, 3) and "lia" in error.text
    assert verdict.reason == "does_not_compile" and not result.trusted
    cold = rocq.cold_feedback(source, tmp_path, timeout_s=30)
    assert [(m.line, m.column, m.text) for m in cold.messages if m.severity == "error"] == \
        [(error.line, error.column, error.text)]


def test_feedback_shows_what_the_file_prints(rocq):
    result, _ = check(rocq, HEADER + 'Check Rplus_comm.\nGoal True. idtac "hello". exact I. Qed.\n', problem=None)
    infos = [m for m in result.messages if m.severity == "info"]
    assert any("forall r1 r2 : R" in m.text and m.line == 4 for m in infos)
    assert any(m.text == "hello" and m.line == 5 for m in infos)


@pytest.mark.parametrize("source, text", [
    (HEADER + STATEMENT + "  nra.\nQed", "Syntax error: the file ends in the middle of a command: a sentence needs "
     "its final '.'."),
    (HEADER + STATEMENT + "  nra.\n", "the file ends inside an unfinished proof (fd_test_double): close it with Qed."),
    (HEADER + STATEMENT + "  nra.\n(* Qed.", "Syntax error: the file ends inside a comment: close it."),
])
def test_unfinished_files_do_not_compile(rocq, source, text):
    """The error is placed where the file ends: line 7, the one after the last newline."""
    result, verdict = check(rocq, source)
    assert result.status == "error" and verdict.reason == "does_not_compile"
    assert (result.errors[-1].text, result.errors[-1].line, result.errors[-1].column) == (text, 7, 1)


def test_nothing_leaks_from_one_check_to_the_next(rocq):
    leaky = HEADER + 'Definition leak := 1.\nNotation "\'leaky\'" := 42.\nGlobal Set Implicit Arguments.\n'
    assert check(rocq, leaky, problem=None)[0].status == "ok"
    for probe in ("Check leak.", "Check leaky."):
        result, _ = check(rocq, HEADER + probe + "\n", problem=None)
        assert result.status == "error" and "not found" in result.errors[0].text, (probe, result.messages)
    result, _ = check(rocq, HEADER + "Test Implicit Arguments.\n", problem=None)
    assert "Implicit Arguments is off" in result.messages[-1].text
    assert check(rocq, rocq.render(PROBLEM))[1].solved


def test_a_worker_that_ran_stateful_commands_is_replaced(tmp_path):
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        with prover.pool.worker(()) as first:
            pass
        result, _ = check(prover, 'Cd "/".\nCheck nat.\n', problem=None)
        assert result.status in ("ok", "error")
        with prover.pool.worker(()) as second:
            assert second is not first and second.alive and not first.alive
        assert not (tmp_path / "escaped").exists()
        assert check(prover, prover.render(PROBLEM))[1].solved
    finally:
        prover.close()


def test_workers_serve_concurrent_checks(rocq):
    sources = [rocq.render(PROBLEM), WRONG_TACTIC] * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(lambda s: check(rocq, s)[1].reason, sources))
    assert verdicts == ["solved", "does_not_compile"] * 3


def test_a_header_coqtop_cannot_load_falls_back_to_a_cold_compile(rocq):
    broken = Problem(name="p", prover="rocq", header="Require Import NoSuchLibrary.\n",
                     formal_statement="Theorem p : True.\nProof.")
    result, verdict = check(rocq, rocq.render(broken, "exact I."), problem=broken)
    assert verdict.reason == "does_not_compile" and "NoSuchLibrary" in result.errors[0].text


def test_the_cold_fallback_gets_the_attempt_the_episode_directory_and_the_checks_time(rocq, monkeypatch):
    calls, real = [], rocq.cold_feedback
    monkeypatch.setattr(rocq, "cold_feedback", lambda source, workdir, *, timeout_s: calls.append(
        (source, workdir, timeout_s)) or real(source, workdir, timeout_s=timeout_s))
    broken = Problem(name="p", prover="rocq", header="Require Import NoSuchLibrary.\n",
                     formal_statement="Theorem p : True.\nProof.")
    source = rocq.render(broken, "exact I.")
    with EpisodeDir() as d:
        assert rocq.check(source, d.root, problem=broken, timeout_s=7).status == "error"
    assert calls == [(source, d.root, 7)]


def test_non_terminating_proof_times_out_and_prover_keeps_working(rocq, monkeypatch):
    """The timed-out worker's whole process is killed at once, not left computing."""
    from env.provers.rocq_worker import CoqtopWorker

    real, used = CoqtopWorker.check, []
    monkeypatch.setattr(CoqtopWorker, "check", lambda self, *a, **kw: used.append(self) or real(self, *a, **kw))
    loop = "Goal True. repeat (assert True by exact I). exact I. Qed.\n"
    start = time.monotonic()
    result, verdict = check(rocq, loop, timeout_s=3)
    assert time.monotonic() - start < 20
    assert not used[0].alive and used[0].proc.poll() is not None
    assert result.status == "timeout" and verdict.reason == "timeout", (result.messages, result.raw_output[-500:])
    assert result.errors[-1].text == "the check did not finish within its time limit (3 s)"
    assert check(rocq, rocq.render(PROBLEM))[1].solved


def test_a_statement_check_that_runs_out_of_time_is_a_timeout(rocq):
    """`0 = 0` is the statement `2^30 * 0 = 0` only after a billion reduction steps: the file compiles at
    once, and the kernel's comparison with the problem's statement is what runs out of time."""
    slow = Problem(name="p", prover="rocq", header="", formal_statement="Theorem p : Nat.pow 2 30 * 0 = 0.\nProof.")
    result, verdict = check(rocq, "Theorem p : 0 = 0.\nProof. reflexivity. Qed.\n", problem=slow, timeout_s=6)
    assert result.status == "timeout" and verdict.reason == "timeout" and not result.trusted
    assert "checking the statement" in verdict.detail
    assert check(rocq, rocq.render(PROBLEM))[1].solved


def _trusted_check(source, problem, workdir, jail, coq=None, timeout_s=30):
    """`trusted_check` on its own, as `RocqProver.check` calls it."""
    from env.provers.rocq_install import coq_install
    from env.provers.rocq_trusted import trusted_check

    return trusted_check(source, problem, workdir=workdir, timeout_s=timeout_s, memory_mb=2048, jail=jail,
                         coq=coq or coq_install(), standard_axioms=frozenset())


JAILS = [False, pytest.param(True, marks=pytest.mark.skipif(not jail_available(), reason="needs bubblewrap"))]


@pytest.mark.parametrize("jail", JAILS)
@requires_coq
def test_a_trusted_check_that_stops_early_says_whether_it_was_jailed(tmp_path, jail):
    """Each way the trusted check ends early (the file does not compile; the statement check runs out of
    time) carries the jail setting it ran under, True or False, and leaves no folder behind."""
    failed = _trusted_check(WRONG_TACTIC, PROBLEM, tmp_path, jail)
    assert failed.status == "error" and failed.detail == "the file does not compile with coqc"
    assert failed.jailed is jail and "lia" in failed.messages[0].text
    slow = Problem(name="p", prover="rocq", header="", formal_statement="Theorem p : Nat.pow 2 30 * 0 = 0.\nProof.")
    late = _trusted_check("Theorem p : 0 = 0.\nProof. reflexivity. Qed.\n", slow, tmp_path, jail, timeout_s=4)
    assert late.status == "timeout" and late.detail == "the statement check did not finish"
    assert late.jailed is jail and len(late.messages) == 1
    assert re.fullmatch(r"checking the statement did not finish within its time limit \(\d+\.\d s\)",
                        late.messages[0].text)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("jail", JAILS)
@requires_coq
def test_each_end_of_the_statement_check_in_full(tmp_path, jail):
    """What `trusted_check` returns, field by field, for each way the statement check and the kernel
    re-check can end."""
    from env.provers.base import StatementCheck

    proved = _trusted_check(HEADER + STATEMENT + "  nra.\nQed.\n", PROBLEM, tmp_path, jail)
    assert proved.statement == StatementCheck(True, True, "the kernel accepts it as a proof of the problem's statement")
    assert (proved.status, proved.jailed, proved.unsafe, proved.detail) == ("ok", jail, (), "")
    assert "ClassicalDedekindReals.sig_forall_dec" in proved.axioms  # as printed: no standard names given here

    renamed = _trusted_check(HEADER + STATEMENT.replace("fd_test_double", "other") + "  nra.\nQed.\n", PROBLEM,
                             tmp_path, jail)
    assert renamed.statement == StatementCheck(False, False, "no theorem named fd_test_double in the file")
    assert (renamed.status, renamed.jailed, renamed.axioms) == ("ok", jail, None)

    weaker = HEADER + "Theorem fd_test_double (x : R) (h : 1 < x) : x + 1 > x.\nProof. lra. Qed.\n"
    other = _trusted_check(weaker, PROBLEM, tmp_path, jail)
    assert other.statement == StatementCheck(True, False, "the type of fd_test_double is not the problem's statement")
    assert (other.status, other.jailed, other.axioms) == ("ok", jail, None)

    # a problem whose own statement does not elaborate: coqc's error (long: it names the identifier) ends the detail
    name = "undefined_" + "x" * 600
    broken = Problem(name="q", prover="rocq", header="", formal_statement=f"Theorem q : {name} = 0.\nProof.")
    stopped = _trusted_check("Theorem q : True.\nProof. exact I. Qed.\n", broken, tmp_path, jail)
    prefix = "the problem's own statement did not elaborate: "
    assert (stopped.status, stopped.jailed, stopped.statement) == ("ok", jail, None)
    assert stopped.detail.startswith(prefix) and len(stopped.detail) == len(prefix) + 500
    assert stopped.detail.endswith("was not found in the current environment.")

    # vm_compute makes coqc's check quick (about 1.5 s); coqchk has no virtual machine and reduces it
    # slowly (about 13 s on an idle 2-core machine, 0.9 GB; 2^20 took 6 s, too close to the limit)
    slow = Problem(name="big", prover="rocq", header="",
                   formal_statement="Theorem big : Nat.eqb (Nat.pow 2 21 + 0) (Nat.pow 2 21) = true.\nProof.")
    late = _trusted_check(slow.formal_statement + " vm_compute. reflexivity. Qed.\n", slow, tmp_path, jail,
                          timeout_s=6)
    assert (late.status, late.jailed, late.axioms) == ("timeout", jail, None)
    assert late.statement == StatementCheck(True, True, "the kernel accepts it as a proof of the problem's statement")
    (message,) = late.messages  # the limit it names is what was left of the 6 s after the compile
    assert re.fullmatch(r"the kernel re-check did not finish within its time limit \([\d.]+ s\)", message.text)
    assert list(tmp_path.iterdir()) == []


def _stand_in(tmp_path, program, when, action):
    """Coq's install with a shell script first on its PATH in place of `program`: on a call whose
    arguments end with `when` it runs `action`, every other call goes to the real program. For what
    the real programs cannot be made to do (the tests say which)."""
    return _coq_with_program(tmp_path, program, f'#!/bin/sh\ncase "$*" in *{when}) {action} ;; esac\n'
                                                f'exec {shutil.which(program)} "$@"\n')


def _coq_with_program(tmp_path, program, script):
    """Coq's install with `script` first on its PATH as `program`."""
    from env.provers.rocq_install import coq_install

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / program).write_text(script)
    (bin_dir / program).chmod(0o755)
    coq = coq_install()
    env = dict(coq.variables, PATH=f"{bin_dir}:{coq.environment()['PATH']}")
    return replace(coq, variables=tuple(env.items()))


@pytest.mark.parametrize("how", ["nothing", "link"])
@requires_coq
def test_a_compile_that_succeeds_without_a_plain_compiled_file_is_a_crash(tmp_path, how):
    """A coqc that exits 0 but writes no FdAttempt.vo, or writes it as a link (here to a real proof's
    compiled file), is refused before anything reads that file. The real coqc cannot be made to do
    this: a stand-in does it on the attempt's compile."""
    from env.provers.rocq_trusted import ATTEMPT

    proof = tmp_path / "proof"
    proof.mkdir()
    (proof / f"{ATTEMPT}.v").write_text(HEADER + STATEMENT + "  nra.\nQed.\n")
    subprocess.run(["coqc", "-q", "-Q", ".", "", f"{ATTEMPT}.v"], cwd=proof, check=True)
    action = "exit 0" if how == "nothing" else f"ln -s {proof / ATTEMPT}.vo {ATTEMPT}.vo; exit 0"
    coq = _stand_in(tmp_path, "coqc", f"{ATTEMPT}.v", action)
    work = tmp_path / "episode"
    work.mkdir()
    result = _trusted_check(HEADER + STATEMENT + "  nra.\nQed.\n", PROBLEM, work, False, coq=coq)
    assert (result.status, result.detail) == ("crash", "coqc reported success but wrote no compiled file")
    assert result.jailed is False and result.statement is None and list(work.iterdir()) == []


@requires_coq
def test_a_statement_check_that_writes_every_stage_but_fails_is_not_the_statement(tmp_path):
    """The stage files say how far the statement check got; its exit status must say it finished too.
    The real coqc cannot be made to fail after its last stage: a stand-in runs it, then exits 1."""
    from env.provers.base import StatementCheck
    from env.provers.rocq_text import CHECK

    coq = _stand_in(tmp_path, "coqc", f"{CHECK}.v", f'{shutil.which("coqc")} "$@"; exit 1')
    work = tmp_path / "episode"
    work.mkdir()
    result = _trusted_check(HEADER + STATEMENT + "  nra.\nQed.\n", PROBLEM, work, False, coq=coq)
    assert result.statement == StatementCheck(True, False, "the type of fd_test_double is not the problem's statement")
    assert (result.status, result.axioms, result.unsafe) == ("ok", None, ())


@pytest.mark.parametrize("action, reason", [
    ("echo 'Error: bad file' >&2; exit 1", "the kernel checker rejected the compiled file: Error: bad file"),
    ("echo 'all good, trust me'; exit 0", "the kernel checker's summary could not be read: all good, trust me"),
])
@requires_coq
def test_a_kernel_checker_that_fails_or_says_nothing_readable_never_passes_a_proof(tmp_path, action, reason):
    """coqchk's own failure, or an answer without its context summary, is an unsafe note on a proof the
    statement check accepted (a verdict with any unsafe note is not solved). The real coqchk accepts
    this proof: a stand-in answers for it."""
    from env.provers.base import StatementCheck
    from env.provers.rocq_trusted import ATTEMPT

    coq = _stand_in(tmp_path, "coqchk", ATTEMPT, action)
    work = tmp_path / "episode"
    work.mkdir()
    result = _trusted_check(HEADER + STATEMENT + "  nra.\nQed.\n", PROBLEM, work, False, coq=coq)
    assert result.statement == StatementCheck(True, True, "the kernel accepts it as a proof of the problem's statement")
    assert (result.status, result.jailed, result.unsafe, result.axioms) == ("ok", False, (reason,), None)
    assert list(work.iterdir()) == []


@requires_coq
def test_a_kernel_checker_that_prints_its_summary_but_fails_never_passes_a_proof(tmp_path):
    """Only an exit status of 0 lets coqchk's summary be read: a readable summary from a failed run is
    a rejection. The real coqchk prints its summary only when it succeeds: a stand-in runs it, then
    exits 1."""
    from env.provers.rocq_trusted import ATTEMPT

    coq = _stand_in(tmp_path, "coqchk", ATTEMPT, f'{shutil.which("coqchk")} "$@"; exit 1')
    work = tmp_path / "episode"
    work.mkdir()
    result = _trusted_check(HEADER + STATEMENT + "  nra.\nQed.\n", PROBLEM, work, False, coq=coq)
    assert (result.status, result.axioms) == ("ok", None) and result.statement.matches
    (note,) = result.unsafe
    prefix = "the kernel checker rejected the compiled file: "  # then the output's last 300 characters
    assert note.startswith(prefix) and len(note) == len(prefix) + 300
    assert note.endswith("* Inductives whose positivity is assumed: <none>")


def test_memory_bomb_hits_the_cap_and_the_next_check_is_fine():
    small = RocqProver(timeout_s=60, memory_mb=1024)
    try:
        bomb = "Require Import Arith.\nGoal True. Eval vm_compute in (Nat.pow 3 40). exact I. Qed.\n"
        result, verdict = check(small, bomb)
        assert result.status == "oom" and verdict.reason == "out_of_memory"
        assert check(small, small.render(PROBLEM))[1].solved
    finally:
        small.close()


def test_printed_words_do_not_make_out_of_memory(rocq):
    scary = HEADER + 'Goal True. idtac "Error: Out of memory."; idtac "Cannot allocate memory". exact I. Qed.\n'
    assert check(rocq, scary, problem=None)[0].status == "ok"
    failing = HEADER + 'Goal True. idtac "Cannot allocate memory". fail "Out of memory". Qed.\n'
    assert check(rocq, failing, problem=None)[0].status == "error"


def test_output_flood_is_stopped_and_bounded(rocq):
    flood = 'Ltac flood := idtac "Warning: flood flood flood flood flood"; flood.\nGoal True. flood. Qed.\n'
    result, verdict = check(rocq, HEADER + flood)
    assert result.status == "error" and verdict.reason == "does_not_compile"
    assert result.errors[-1].text == "the check printed more output than allowed and was stopped"
    assert len(result.raw_output) < 200_000 and len(result.messages) < 10_000
    assert check(rocq, rocq.render(PROBLEM))[1].solved


@pytest.mark.skipif(not jail_available(), reason="needs bubblewrap: apt-get install bubblewrap")
def test_file_cannot_write_or_read_outside_its_sandbox(rocq, tmp_path):
    target = tmp_path / "escaped.txt"
    secret = tmp_path / "Secret.v"
    secret.write_text("Definition secret := 42.\n")
    for source in (f'Redirect "{target}" Print nat.\n', f'Extraction "{target}" nat.\n'):
        check(rocq, source, problem=None)
    assert list(tmp_path.iterdir()) == [secret]
    result, _ = check(rocq, f'Load "{secret}".\nPrint secret.\n', problem=None)
    # The file's path is in the error message, so look for what Print would show, not for "42".
    assert result.status == "error" and "secret = 42" not in result.raw_output
    check(rocq, 'Redirect "/tmp/fd_escape" Print nat.\n', problem=None)
    assert not any(p.name.startswith("fd_escape") for p in Path("/tmp").iterdir())


@pytest.mark.skipif(not Path("/usr/bin/coqc").exists(),
                    reason="links Debian's /usr/bin Coq programs into a prefix: needs `apt-get install coq`")
def test_coq_installed_outside_usr_runs_in_the_jail(monkeypatch, tmp_path):
    """opam and hand-unpacked prefixes: the jail must show their binaries and get their variables."""
    import os

    from env.provers import rocq_install

    prefix = tmp_path / "coq" / "bin"
    prefix.mkdir(parents=True)
    for name in rocq_install.PROGRAMS:
        try:
            os.link(f"/usr/bin/{name}", prefix / name)
        except OSError:
            shutil.copy2(f"/usr/bin/{name}", prefix / name)
    plugins = tmp_path / "ocamlpath"
    plugins.mkdir()
    monkeypatch.setenv("PATH", f"{prefix}:{os.environ['PATH']}")
    monkeypatch.setenv("OCAMLPATH", f"{plugins}:/usr/lib/ocaml")
    rocq_install.coq_install.cache_clear()
    try:
        coq = rocq_install.coq_install()
        assert prefix in coq.mounts and plugins in coq.mounts and not any(m.is_relative_to("/usr") for m in coq.mounts)
        env = coq.environment()
        assert env["PATH"].startswith(f"{prefix}:") and env["OCAMLPATH"].startswith(str(plugins))
        prover = RocqProver(timeout_s=30, memory_mb=2048)
        try:
            assert check(prover, prover.render(PROBLEM))[1].solved
        finally:
            prover.close()
    finally:
        rocq_install.coq_install.cache_clear()


def test_a_library_on_coqpath_reaches_every_process_of_the_check(monkeypatch, tmp_path):
    """A problem that needs a library found through COQPATH (an opam package, say) is solved only if the
    feedback check, the trusted re-compile, the statement check and coqchk all get Coq's variables."""
    from env.provers import rocq_install

    lib = tmp_path / "contrib" / "FdExtra"
    lib.mkdir(parents=True)
    (lib / "Extra.v").write_text("Definition fd_extra := 3.\n")
    subprocess.run(["coqc", "-q", "-Q", str(lib), "FdExtra", str(lib / "Extra.v")], check=True, cwd=tmp_path)
    monkeypatch.setenv("COQPATH", str(tmp_path / "contrib"))
    problem = Problem(name="fd_extra_is_three", prover="rocq", header="From FdExtra Require Import Extra.\n",
                      formal_statement="Theorem fd_extra_is_three : fd_extra = 3.\nProof.",
                      formal_proof="\n  reflexivity.\nQed.")
    rocq_install.coq_install.cache_clear()
    try:
        assert "COQPATH" in rocq_install.coq_install().environment()
        prover = RocqProver(timeout_s=30, memory_mb=2048)
        try:
            result = check(prover, prover.render(problem), problem=problem)[1]
            assert result.solved, result.raw_output
            # the feedback came from a warm worker that loaded the library, not from the cold fallback
            assert [w.requires for w in prover.pool._idle] == [("From FdExtra Require Import Extra.",)]
            assert not check(prover, prover.render(problem, "\n  Admitted."), problem=problem)[1].solved
        finally:
            prover.close()
    finally:
        rocq_install.coq_install.cache_clear()


def test_a_cold_compile_failure_reports_coqs_own_error_and_the_checks_time(rocq):
    """The trusted re-check called on its own with a file that does not compile: Coq's message at the
    failing line (not only ours), and an elapsed time within the call's."""
    with EpisodeDir() as d:
        start = time.monotonic()
        trusted = rocq.trusted_check(WRONG_TACTIC, d.root, problem=PROBLEM, timeout_s=30)
        wall = time.monotonic() - start
    assert trusted.status == "error" and trusted.detail == "the file does not compile with coqc"
    errors = [m for m in trusted.messages if m.severity == "error"]
    lia_line = WRONG_TACTIC.splitlines().index("  lia.") + 1
    assert len(errors) == 1 and errors[0].line == lia_line and "compiling the file" not in errors[0].text
    assert 0 < trusted.elapsed_s <= wall


def test_a_cold_compile_that_runs_out_of_time_says_so(rocq):
    source = HEADER + "Goal True. repeat (assert True by exact I). exact I. Qed.\n" + rocq.render(PROBLEM)
    with EpisodeDir() as d:
        trusted = rocq.trusted_check(source, d.root, problem=PROBLEM, timeout_s=2)
    assert trusted.status == "timeout" and [m.severity for m in trusted.messages] == ["error"]
    assert trusted.messages[0].text.startswith("compiling the file did not finish within its time limit")


@pytest.mark.parametrize("jail", [True, False])
def test_the_warm_and_trusted_checks_run_jailed_as_configured(jail):
    if jail and not jail_available():
        pytest.skip("needs bubblewrap: apt-get install bubblewrap")
    prover = RocqProver(timeout_s=30, memory_mb=2048, jail=jail, workers=1)
    try:
        with EpisodeDir() as d:
            trusted = prover.trusted_check(prover.render(PROBLEM), d.root, problem=PROBLEM, timeout_s=30)
            warm = prover.feedback(prover.render(PROBLEM), d.root, problem=PROBLEM, timeout_s=30)
        assert trusted.status == "ok" and trusted.statement.matches and trusted.jailed is jail
        assert warm.status == "ok" and warm.jailed is jail  # the warm worker too
    finally:
        prover.close()


def test_search_finds_stdlib_lemmas(rocq):
    hits = rocq.search(r"Lemma Rplus_comm\b")
    assert any(h.path.endswith("Raxioms.v") and "Rplus_comm" in h.text for h in hits)


def test_search_of_everything_is_cut_short(rocq):
    from env.sandbox import SandboxError

    assert len(rocq.search(".", max_hits=30)) == 30  # ripgrep is stopped once enough output has come
    assert len(rocq.search(".")) == 50  # the default
    with pytest.raises(SandboxError, match="invalid pattern"):
        rocq.search("(")


def test_workers_outlive_the_threads_that_asked_for_them():
    """bubblewrap kills a jail when the thread that started it ends; checks often run in short-lived threads."""
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        asker = threading.Thread(target=check, args=(prover, prover.render(PROBLEM)))
        asker.start()
        asker.join()
        (worker,) = prover.pool._idle
        time.sleep(0.5)
        assert worker.proc.poll() is None
        with EpisodeDir() as d:
            assert prover.feedback(WRONG_TACTIC, d.root, problem=PROBLEM, timeout_s=30).status == "error"
        assert prover.pool._idle == [worker]
    finally:
        prover.close()


def test_nothing_is_left_in_tmp_by_a_process_that_never_closed_its_prover(tmp_path):
    code = ("import sys; from env.provers.rocq import RocqProver; from env.sandbox import EpisodeDir; "
            "p = RocqProver(); d = EpisodeDir(); print(d.root, p.pool._root); "
            "sys.exit(p.check('Goal True. exact I. Qed.', d.root).status != 'ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    episode, scratch = map(Path, proc.stdout.split())
    assert not episode.exists() and not scratch.exists()


def test_close_stops_the_workers():
    prover = RocqProver(timeout_s=30, memory_mb=2048)
    check(prover, prover.render(PROBLEM))
    workers = list(prover.pool._idle)
    assert workers and all(w.alive for w in workers)
    prover.close()
    assert not any(w.alive or w.proc.poll() is None for w in workers)
    with pytest.raises(RuntimeError, match="closed"):
        check(prover, prover.render(PROBLEM))


def test_a_killed_worker_is_a_crash_outcome(rocq):
    def kill_when_busy():
        for _ in range(500):
            busy = list(rocq.pool._busy)
            if busy:
                time.sleep(0.3)
                busy[0].proc.kill()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    result, verdict = check(rocq, "Goal True. repeat (assert True by exact I). exact I. Qed.\n", timeout_s=20)
    killer.join()
    assert result.status == "crash" and verdict.reason == "prover_crash", result.messages
    assert result.errors[-1].text == "the prover crashed (exit status -9)"
    assert check(rocq, rocq.render(PROBLEM))[1].solved


# --- the pieces of RocqProver that are plain functions ---


def test_render_completes_a_proof_into_a_file():
    render = RocqProver.render
    bare = Problem(name="p", prover="rocq", header="H.\n", formal_statement="Theorem p : True.\nProof.")
    assert render(None, PROBLEM) == HEADER + PROBLEM.formal_statement + "\n  nra.\nQed.\n"  # the reference proof
    assert render(None, bare) == "H.\nTheorem p : True.\nProof.\nAdmitted.\n"  # none known: admitted
    assert render(None, bare, "  exact I.") == "H.\nTheorem p : True.\nProof.\n  exact I.\nQed.\n"
    assert render(None, bare, "\nexact I.\nDefined.  ") == "H.\nTheorem p : True.\nProof.\nexact I.\nDefined.  \n"
    assert render(None, bare, "exact I.\nAdmitted.") == "H.\nTheorem p : True.\nProof.\nexact I.\nAdmitted.\n"
    assert render(None, bare, "exact I.  \n") == "H.\nTheorem p : True.\nProof.\nexact I.\nQed.\n"


def test_apply_trusted_keeps_feedback_and_takes_the_trusted_findings():
    from env.provers.base import CheckResult, Message
    from env.provers.rocq import apply_trusted
    from env.provers.rocq_trusted import TrustedCheck

    warm = CheckResult(status="ok", messages=(Message("info", "printed"),), elapsed_s=0.1, sandboxed=True)
    ok = TrustedCheck(status="ok", statement="the statement", axioms=("A",), unsafe=("U",), elapsed_s=2.0,
                      jailed=True)
    result = apply_trusted(warm, ok, 2.5)
    assert result.trusted and result.status == "ok" and result.messages == warm.messages
    assert (result.statement, result.axioms, result.unsafe) == ("the statement", ("A",), ("U",))
    assert (result.elapsed_s, result.trusted_s, result.sandboxed) == (2.5, 2.0, True)
    assert apply_trusted(warm, replace(ok, detail="kernel says no"), 2.5).messages[-1] == \
        Message("error", "kernel says no")
    assert apply_trusted(warm, replace(ok, jailed=False), 2.5).sandboxed is False
    assert apply_trusted(replace(warm, sandboxed=False), ok, 2.5).sandboxed is False

    failed = TrustedCheck(status="error", messages=(Message("error", "coqc: bad"),), detail="cold compile failed",
                          elapsed_s=1.0, jailed=True)
    result = apply_trusted(warm, failed, 1.5)
    assert result.status == "error" and not result.trusted and result.statement is None
    assert result.messages == (Message("info", "printed"), Message("error", "cold compile failed; its messages follow"),
                               Message("error", "coqc: bad"))
    assert (result.elapsed_s, result.trusted_s, result.sandboxed) == (1.5, 1.0, True)
    assert apply_trusted(warm, replace(failed, detail=""), 1.5).messages[1].text.startswith(
        "the trusted re-check failed")
    assert apply_trusted(warm, replace(failed, jailed=False), 1.5).sandboxed is False


def test_only_a_clean_file_of_a_known_problem_gets_the_trusted_check(rocq, monkeypatch):
    calls = []
    real = rocq.trusted_check
    monkeypatch.setattr(rocq, "trusted_check", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    with EpisodeDir() as d:
        assert not rocq.check(rocq.render(PROBLEM), d.root).trusted  # no problem: feedback only
        assert rocq.check(WRONG_TACTIC, d.root, problem=PROBLEM).status == "error"
        admitted = rocq.check(rocq.render(PROBLEM, "  nra.\nAdmitted."), d.root, problem=PROBLEM)
        assert admitted.uses_sorry and not admitted.trusted
        assert calls == []
        solved = rocq.check(rocq.render(PROBLEM), d.root, problem=PROBLEM, timeout_s=45)
    assert solved.trusted and len(calls) == 1 and calls[0]["timeout_s"] == 45


def test_stage_files_are_read_within_a_bound_and_never_raise(tmp_path):
    """What the statement check's `Redirect`s wrote: at most MAX_STAGE_FILE_BYTES, undecodable bytes
    replaced; a link, a folder or no file at all reads as not written."""
    from env.provers.rocq_trusted import MAX_STAGE_FILE_BYTES, _read_stage

    big = tmp_path / "big.out"
    big.write_bytes(b"\xff" + b"x" * (MAX_STAGE_FILE_BYTES + 100))
    text = _read_stage(big)
    assert text.startswith("\ufffdx") and len(text) == MAX_STAGE_FILE_BYTES
    (tmp_path / "link.out").symlink_to(big)
    (tmp_path / "folder.out").mkdir()
    assert [_read_stage(tmp_path / n) for n in ("link.out", "folder.out", "none.out")] == [None, None, None]
    (tmp_path / "empty.out").write_bytes(b"")
    assert _read_stage(tmp_path / "empty.out") == ""  # written, with nothing in it


def test_the_trusted_check_works_inside_the_episode_directory_and_leaves_nothing(rocq, monkeypatch, tmp_path):
    """Every process of the re-check runs in a folder of the episode's own directory (removed with it if
    the run dies), with the prover's memory cap; none of those folders is left afterwards."""
    from env.provers import rocq_trusted

    real, runs = rocq_trusted.run_jailed, []

    def recording(argv, **kwargs):
        runs.append((argv[0], kwargs["workdir"], kwargs["memory_mb"], list(Path(kwargs["workdir"]).iterdir())))
        return real(argv, **kwargs)

    monkeypatch.setattr(rocq_trusted, "run_jailed", recording)
    episode = tmp_path / "episode"
    episode.mkdir()
    result = rocq.check(rocq.render(PROBLEM), episode, problem=PROBLEM)
    assert result.trusted and judge(result, PROBLEM, rocq).solved
    assert sorted(r[0] for r in runs) == ["coqc", "coqc", "coqchk"]
    assert all(r[1].parent == episode and r[2] == rocq.memory_mb for r in runs)
    compile_dir = next(r[1] for r in runs if r[0] == "coqc" and any(p.name == "FdAttempt.v" for p in r[3]))
    assert {r[1] for r in runs} - {compile_dir}  # the compiled file is checked in a folder of its own
    assert list(episode.iterdir()) == []


@pytest.mark.parametrize("peak_share, status, text", [
    (0.95, "oom", "the check ran out of memory"),
    (0.6, "oom", "the check ran out of memory"),  # the share at which the sandbox calls it out of memory
    (0.5, "crash", "the prover crashed (exit status -9)"),
])
def test_a_worker_that_died_near_its_memory_cap_ran_out_of_memory(peak_share, status, text):
    """A worker killed mid-check (an OCaml runtime past its address-space cap can die without a message):
    out of memory when its peak resident memory came within OOM_FRACTION of the cap, else a crash."""
    from env.provers.rocq_worker import OOM_FRACTION

    assert OOM_FRACTION == 0.6
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        with prover.pool.worker(()) as worker:
            worker.proc.kill()
            worker.proc.wait()
            worker.memory.peak_mb = peak_share * worker.memory_mb
            messages = []
            assert worker._failure("eof", messages, 30) == status
            assert [(m.severity, m.text) for m in messages] == [("error", text)]
    finally:
        prover.close()


@requires_coq
def test_a_worker_that_grows_past_its_out_of_memory_share_and_dies_mid_check_ran_out_of_memory(tmp_path):
    """The peak resident memory is polled while a sentence runs: a process that has died has none left
    to read. The real coqtop cannot be made to die on cue: a stand-in passes everything to it, and on
    the sentence naming `fd_memory_bomb` fills 70% of the cap, holds it half a second, and exits
    without a word."""
    from env.provers.base import Message
    from env.provers.rocq_worker import WorkerPool

    coq = _coq_with_program(
        tmp_path, "coqtop",
        f"#!{sys.executable}\n"
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen([{shutil.which('coqtop')!r}, *sys.argv[1:]], stdin=subprocess.PIPE)\n"
        "while line := sys.stdin.buffer.readline():\n"
        "    if b'fd_memory_bomb' in line:\n"
        "        block = b'x' * (1434 << 20)\n"
        "        time.sleep(0.5)\n"
        "        child.kill()\n"
        "        os._exit(3)\n"
        "    child.stdin.write(line)\n"
        "    child.stdin.flush()\n")
    pool = WorkerPool(size=1, memory_mb=2048, jail=False, coq=coq)
    try:
        with pool.worker(()) as worker:
            outcome = worker.check("Check nat.\nCheck fd_memory_bomb.\n", 30)
        assert outcome.status == "oom" and worker.memory.peak_mb >= 1400
        assert outcome.messages[-1] == Message("error", "the check ran out of memory")
    finally:
        pool.close()


@pytest.mark.parametrize("jail", [True, False])
def test_the_cold_feedback_compiles_in_the_episode_directory_as_configured(monkeypatch, tmp_path, jail):
    """The fallback for a header no worker can load: coqc in a folder of the episode's directory (removed
    afterwards), with Coq's variables, the prover's memory cap and jail setting; what the model sees is
    coqc's output, with the compile's time and whether it was jailed."""
    from env.provers import rocq as rocq_module
    from env.provers.rocq_text import ATTEMPT

    if jail and not jail_available():
        pytest.skip("needs bubblewrap: apt-get install bubblewrap")
    real, runs = rocq_module.run_jailed, []

    def recording(argv, **kwargs):
        runs.append((argv[0], kwargs, sorted(p.name for p in Path(kwargs["workdir"]).iterdir())))
        return real(argv, **kwargs)

    monkeypatch.setattr(rocq_module, "run_jailed", recording)
    episode = tmp_path / "episode"
    episode.mkdir()
    prover = RocqProver(timeout_s=30, memory_mb=1536, jail=jail, workers=1)
    try:
        start = time.monotonic()
        out = prover.cold_feedback(HEADER + "Check Rplus_comm.\n", episode, timeout_s=30)
        wall = time.monotonic() - start
        ((program, kwargs, files),) = runs
        assert program == "coqc" and Path(kwargs["workdir"]).parent == episode and files == [f"{ATTEMPT}.v"]
        assert kwargs["memory_mb"] == 1536 and kwargs["jail"] is jail and kwargs["env"] == prover.coq.environment()
        assert list(episode.iterdir()) == []
        assert out.status == "ok" and not any(m.severity == "error" for m in out.messages), out.messages
        assert "forall r1 r2 : R" in out.output and out.jailed is jail and 0 < out.elapsed_s <= wall
    finally:
        prover.close()


def test_a_cold_feedback_that_runs_out_of_time_says_so(rocq, tmp_path):
    out = rocq.cold_feedback("Goal True. repeat (assert True by exact I). exact I. Qed.\n", tmp_path, timeout_s=2)
    assert out.status == "timeout"
    assert [(m.severity, m.text) for m in out.messages] == \
        [("error", f"the check did not finish within its time limit ({out.elapsed_s:.1f} s)")]


@pytest.mark.parametrize("max_checks", [1, 2])
def test_a_worker_is_replaced_after_its_share_of_checks(monkeypatch, max_checks):
    from env.provers.rocq_worker import CoqtopWorker

    real, seen = CoqtopWorker.check, []
    monkeypatch.setattr(CoqtopWorker, "check", lambda self, *a, **kw: seen.append(self) or real(self, *a, **kw))
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1, max_checks_per_worker=max_checks)
    try:
        for _ in range(2 * max_checks):
            assert check(prover, "Check nat.\n", problem=None)[0].status == "ok"
        assert seen == [seen[0]] * max_checks + [seen[-1]] * max_checks and seen[-1] is not seen[0]
        assert not seen[0].alive and not seen[0].scratch.exists()
        assert prover.pool._count == 0 and prover.pool._idle == []  # the last one too reached its share
    finally:
        prover.close()


def test_a_pool_closed_during_a_check_lets_it_finish_then_removes_its_folder():
    """Closing stops idle workers at once; a busy one (jailed: bubblewrap ends it with the thread that
    started it) finishes its check, and the pool's folder goes with the last of them."""
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    root = prover.pool._root
    slow = "Eval lazy in Nat.eqb (Nat.pow 2 17 + 0) (Nat.pow 2 17).\n"  # a few seconds
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(check, prover, slow, problem=None)
        for _ in range(600):
            if prover.pool._busy:
                break
            time.sleep(0.05)
        prover.close()
        assert root.exists()  # the check still runs in it
        assert running.result()[0].status == "ok"
    assert not root.exists() and prover.pool._busy == set()


@pytest.mark.parametrize("start", ["fails", "succeeds"])
@requires_coq
def test_a_pool_closed_while_a_worker_starts_does_not_wait_for_it_and_refuses_its_check(tmp_path, start):
    """close() returns at once while a worker is still starting (the start can take up to two minutes);
    the check that was waiting for it is refused as on a closed pool, whether the start then fails
    (close removed the worker's folder) or succeeds (the worker is stopped), and its slot is given
    back. The real coqtop starts too fast to close the pool in between: a stand-in waits for a gate
    file first, then runs it in its own folder, or, to succeed, in one close leaves alone."""
    from env.provers.rocq_worker import WorkerPool

    gate, started = tmp_path / "gate", tmp_path / "started"
    move = f"; cd {tmp_path}" if start == "succeeds" else ""
    coq = _stand_in(tmp_path, "coqtop", "",
                    f"echo $$ > {started}; while [ ! -e {gate} ]; do sleep 0.05; done{move}")
    pool = WorkerPool(size=1, memory_mb=2048, jail=False, coq=coq)
    with ThreadPoolExecutor(1) as ex:
        acquiring = ex.submit(pool._acquire, ())
        for _ in range(600):
            if started.exists():
                break
            time.sleep(0.05)
        closer = threading.Thread(target=pool.close)
        closer.start()
        closer.join(timeout=20)
        closed_at_once = not closer.is_alive()
        gate.touch()
        closer.join()
        assert closed_at_once
        with pytest.raises(RuntimeError, match="^the prover was closed$"):
            acquiring.result(timeout=120)
    assert (pool._count, pool._busy, pool._idle, pool._root.exists()) == (0, set(), [], False)
    with pytest.raises(ProcessLookupError):  # the stand-in's process became coqtop: stopped and reaped
        os.kill(int(started.read_text()), 0)


def test_workers_keep_their_scratch_in_the_pools_folder_removed_at_close():
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    root = prover.pool._root
    check(prover, "Check nat.\n", problem=None)
    (worker,) = prover.pool._idle
    assert worker.scratch.parent == root and root.name.startswith("fd-coqtop-")
    prover.close()
    assert not worker.alive and not worker.scratch.exists() and not root.exists()
    with pytest.raises(RuntimeError, match="^the prover was closed$"):
        check(prover, "Check nat.\n", problem=None)


def test_by_default_every_check_is_jailed_with_a_memory_cap():
    prover = RocqProver()
    try:
        assert (prover.jail, prover.memory_mb, prover.timeout_s) == (True, 4096, 60.0)
        pool = prover.pool
        assert (pool.jail, pool.memory_mb, pool.size, pool.max_checks) == (True, 4096, 2, 200)
    finally:
        prover.close()


@pytest.mark.parametrize("jail", [True, False])
def test_a_worker_sees_none_of_the_trainers_environment(monkeypatch, jail):
    """coqtop gets Coq's variables and nothing else of the process that started it (an API key, say); unjailed,
    it runs in its own scratch folder, with that folder as its home."""
    if jail and not jail_available():
        pytest.skip("needs bubblewrap: apt-get install bubblewrap")
    monkeypatch.setenv("FD_TEST_SECRET", "do-not-leak")
    prover = RocqProver(timeout_s=30, memory_mb=2048, jail=jail, workers=1)
    try:
        with prover.pool.worker(()) as worker:
            worker.memory.poll()  # finds coqtop's pid, inside the jail's namespace or not
            pid = worker.memory.pid
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if v)
            assert Path(f"/proc/{pid}/exe").resolve().name.startswith("coqtop")
            assert "FD_TEST_SECRET" not in environ and "FD_TEST_SECRET" not in Path(
                f"/proc/{worker.proc.pid}/environ").read_text()
            assert environ["PATH"].split(":")[:1] == [str(prover.coq.environment()["PATH"]).split(":")[0]]
            if not jail:
                assert Path(f"/proc/{pid}/cwd").resolve() == worker.scratch.resolve()
                assert environ["HOME"] == str(worker.scratch)
    finally:
        prover.close()


def _in_time(fn, seconds=60):
    """fn() in a thread, failing (not hanging) if it does not return in time."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"no result within {seconds} s (a pool slot never freed?)"
    return out[0]


def test_a_failed_worker_start_frees_its_slot():
    """Headers coqtop cannot load, more of them than the pool has slots: each falls back to a cold compile,
    and a later check still gets a warm worker."""
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    broken = Problem(name="p", prover="rocq", header="Require Import NoSuchLibrary.\n",
                     formal_statement="Theorem p : True.\nProof.")
    try:
        for _ in range(2):
            result = _in_time(lambda: check(prover, prover.render(broken, "exact I."), problem=broken)[0])
            assert result.status == "error" and "NoSuchLibrary" in result.errors[0].text
        assert _in_time(lambda: check(prover, prover.render(PROBLEM))[1].solved)
        assert prover.pool._count == 1 and [w.requires for w in prover.pool._idle] == [header_requires(HEADER)]
    finally:
        prover.close()


def test_a_full_pool_replaces_an_idle_worker_of_another_header_and_a_dead_one():
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        assert check(prover, prover.render(PROBLEM))[1].solved
        (reals,) = prover.pool._idle
        assert _in_time(lambda: check(prover, "Check nat.\n", problem=None)[0].status) == "ok"  # another header
        (bare,) = prover.pool._idle
        assert bare.requires == () and not reals.alive and prover.pool._count == 1
        bare.proc.kill()
        bare.proc.wait()
        assert _in_time(lambda: check(prover, "Check nat.\n", problem=None)[0].status) == "ok"
        (fresh,) = prover.pool._idle
        assert fresh is not bare and fresh.alive and prover.pool._count == 1
    finally:
        prover.close()


@pytest.mark.parametrize("peak_share, kept", [(0.45, True), (0.5, False), (0.55, False)])
def test_a_worker_past_half_its_memory_cap_is_replaced_after_its_check(peak_share, kept):
    """A worker that has held half of its cap or more is not trusted with another check (the next one could
    run out of memory for the previous one's sake)."""
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        assert check(prover, "Check nat.\n", problem=None)[0].status == "ok"
        (worker,) = prover.pool._idle
        worker.memory.peak_mb = max(worker.memory.poll(), peak_share * worker.memory_mb)
        assert check(prover, "Check nat.\n", problem=None)[0].status == "ok"
        assert (prover.pool._idle == [worker]) is kept and worker.alive is kept
    finally:
        prover.close()


def test_a_closed_worker_answers_a_check_as_a_crash_without_output():
    """A worker whose coqtop is gone sends nothing: the check ends at its first sentence as a crash,
    with no output of its own, and the worker stays closed."""
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        with prover.pool.worker(()) as worker:
            worker.close()
            out = worker.check("Check nat.\nCheck bool.\n", 10)
        assert (out.status, out.output) == ("crash", "")
        assert [(m.severity, m.text) for m in out.messages] == [("error", "the prover crashed (exit status -9)")]
        assert not worker.alive and out.elapsed_s < 5
    finally:
        prover.close()


def test_a_worker_is_kept_after_a_check_that_found_an_error_in_the_attempt():
    """Only the attempt failed: the worker goes back to the header's state and serves the next check."""
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        assert check(prover, "Check nat.\n", problem=None)[0].status == "ok"
        (worker,) = prover.pool._idle
        assert check(prover, "Check nat.\nCheck fd_no_such_lemma.\n", problem=None)[0].status == "error"
        assert prover.pool._idle == [worker] and worker.alive
        assert check(prover, "Check nat.\n", problem=None)[0].status == "ok" and prover.pool._idle == [worker]
    finally:
        prover.close()


def test_a_kept_worker_starts_each_check_with_an_empty_scratch_folder():
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        assert check(prover, "Check nat.\n", problem=None)[0].status == "ok"
        (worker,) = prover.pool._idle
        (worker.scratch / "left.txt").write_text("from an attempt")
        (worker.scratch / "folder").mkdir()
        (worker.scratch / "folder" / "inside.v").write_text("x")
        (worker.scratch / "link").symlink_to(worker.scratch / "folder")
        assert check(prover, "Check nat.\n", problem=None)[0].status == "ok"
        assert prover.pool._idle == [worker] and list(worker.scratch.iterdir()) == []
    finally:
        prover.close()


def test_the_output_limit_holds_over_the_whole_file_not_per_sentence(tmp_path):
    """Many sentences, each printing far less than the limit, together more: stopped like one flood."""
    from env.provers.rocq_install import coq_install
    from env.provers.rocq_worker import CoqtopWorker

    worker = CoqtopWorker((), memory_mb=2048, jail=jail_available(), coq=coq_install(), scratch_root=tmp_path,
                          output_limit=4000)
    try:
        quiet = worker.check('Goal True. idtac "0123456789". exact I. Qed.\n' * 3, timeout_s=30)
        assert quiet.status == "ok" and worker.alive
        loud = worker.check('Goal True. idtac "0123456789012345678901234567890123456789". exact I. Qed.\n' * 200,
                            timeout_s=30)
        assert loud.status == "error" and not worker.alive
        assert loud.messages[-1].text == "the check printed more output than allowed and was stopped"
        assert len(loud.output) < 8000
    finally:
        worker.close()


def test_a_warm_worker_has_its_headers_libraries_loaded(rocq):
    """What makes it warm: the header's Requires ran before the check, so a file that uses the libraries
    without requiring them compiles there."""
    with rocq.pool.worker(header_requires(HEADER)) as worker:
        out = worker.check("Check Rplus_comm.\nGoal (1 < 2)%R. lra. Qed.\n", 30)
    assert out.status == "ok", out.messages


@pytest.mark.parametrize("requires", [("Require Import Reals Lra.XX",), ("Require Import Reals.", "Fail.")])
def test_a_worker_whose_requires_did_not_all_run_is_refused(tmp_path, requires):
    """A Require that fails, even one whose error swallows the reply's sentinel (a name run into the next
    line), or a sentence that moves no state: the worker is not started, and checks fall back to coqc."""
    from env.provers.rocq_install import coq_install
    from env.provers.rocq_worker import CoqtopWorker, WorkerError

    with pytest.raises(WorkerError, match="^the header's requires failed in coqtop: ") as failed:
        CoqtopWorker(requires, memory_mb=2048, jail=jail_available(), coq=coq_install(), scratch_root=tmp_path)
    if requires[-1] == "Fail.":  # coqtop's own message comes with it
        assert "Error" in str(failed.value)


@pytest.mark.parametrize("requires, memory_mb, what", [((), 20, "the prelude"),
                                                        (("Require Import Reals.",), 60, "Require Import Reals.")])
def test_a_worker_that_cannot_start_says_what_it_could_not_load(tmp_path, requires, memory_mb, what):
    from env.provers.rocq_install import coq_install
    from env.provers.rocq_worker import CoqtopWorker, WorkerError

    with pytest.raises(WorkerError, match=f"^coqtop could not load {re.escape(what)}: ") as failed:
        CoqtopWorker(requires, memory_mb=memory_mb, jail=jail_available(), coq=coq_install(), scratch_root=tmp_path)
    if requires:  # coqtop got far enough to say why
        assert "Out of memory" in str(failed.value)
    assert list(tmp_path.iterdir()) == []  # its scratch folder is removed


def test_a_worker_that_does_not_get_back_to_the_headers_state_is_closed():
    """After each check the worker goes back (`BackTo`) to the state the header left; if the prompt then
    shows any other state, the worker is not reused."""
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    try:
        with prover.pool.worker(()) as worker:
            assert worker.check("Check nat.\n", 30).status == "ok" and worker.alive  # back where it was
            worker.state = str(int(worker.state) + 50)  # a state it cannot reach
            worker.check("Check nat.\n", 30)  # (judged against that state too: an error)
            assert not worker.alive
    finally:
        prover.close()


# ---------------------------------------------------------------- how a failed process is reported

_ENDED = {  # how the process ended: (ProcessOutcome fields, status, the message's text)
    "timeout": (dict(returncode=None, timed_out=True, elapsed_s=12.34), "timeout",
                "compiling the file did not finish within its time limit (12.3 s)"),
    "oom": (dict(returncode=137, peak_rss_mb=1950.4, memory_mb=2048), "oom",
            "compiling the file ran out of memory (1950 MB of 2048 MB)"),
    "flood": (dict(returncode=None, output_limited=True), "error",
              "compiling the file printed more output than allowed and was stopped"),
    "signal": (dict(returncode=-11, signal=11), "crash", "compiling the file crashed (exit status -11)"),
    "exit": (dict(returncode=3), "error", "compiling the file crashed (exit status 3)"),
}


@pytest.mark.parametrize("ended", sorted(_ENDED))
def test_a_failed_process_gets_its_status_and_one_error_message(ended):
    from env.provers.rocq_trusted import failure_message, outcome_status
    from env.sandbox import ProcessOutcome

    fields, status, text = _ENDED[ended]
    out = ProcessOutcome(**{"output": "", "elapsed_s": 1.0, "timed_out": False, "jailed": True, **fields})
    assert outcome_status(out) == status
    message = failure_message(status, out, "compiling the file")
    assert (message.severity, message.text) == ("error", text)
    assert failure_message(status, out).text.startswith("the check ")


def test_a_process_that_exits_zero_is_ok():
    from env.provers.rocq_trusted import outcome_status
    from env.sandbox import ProcessOutcome

    assert outcome_status(ProcessOutcome(returncode=0, output="", elapsed_s=0.1, timed_out=False, jailed=True)) == "ok"


@pytest.mark.parametrize("jail", [True, False])
def test_a_checks_result_carries_the_feedbacks_output_time_and_jail(jail):
    """What `check` passes on from the warm feedback (a failing file) and from the whole check (a
    solved one): coqtop's output, the time it took, whether it ran jailed."""
    if jail and not jail_available():
        pytest.skip("bubblewrap cannot create its namespaces here: apt-get install bubblewrap")
    prover = RocqProver(timeout_s=30, memory_mb=2048, jail=jail, workers=1)
    try:
        with EpisodeDir() as d:
            start = time.monotonic()
            failed = prover.check(WRONG_TACTIC, d.root, problem=PROBLEM)
            middle = time.monotonic()
            solved = prover.check(prover.render(PROBLEM), d.root, problem=PROBLEM)
            end = time.monotonic()
    finally:
        prover.close()
    assert failed.status == "error" and not failed.trusted
    assert "Error: The reference lia was not found" in failed.raw_output
    assert 0 < failed.elapsed_s <= middle - start
    assert failed.sandboxed is jail and solved.sandboxed is jail
    assert solved.trusted and 0 < solved.trusted_s < solved.elapsed_s <= end - middle


def test_the_warm_worker_is_chosen_by_the_problems_header_not_the_attempts_imports():
    """An attempt's own `Require`s run in the worker of its problem's header (one warm worker per
    problem, whatever each attempt imports); without a problem, the file's own header decides."""
    prover = RocqProver(timeout_s=30, memory_mb=2048, workers=1)
    extra = HEADER + "Require Import Psatz ZArith.\n" + STATEMENT + "  nra.\nQed.\n"
    try:
        assert check(prover, extra)[1].solved
        assert [w.requires for w in prover.pool._idle] == [header_requires(HEADER)]
        assert check(prover, extra, problem=None)[0].status == "ok"
        assert [w.requires for w in prover.pool._idle] == [header_requires(extra)] != [header_requires(HEADER)]
    finally:
        prover.close()
