"""Rocq (Coq) backend: warm `coqtop` workers for the model's feedback, a trusted re-check for the verdict.

A check has two paths (see DESIGN.md, section 3):
- feedback (`rocq_worker`): the file goes through a warm, jailed `coqtop` that has already
  loaded the problem header's libraries; its messages and status are what the model sees.
- verdict (`rocq_trusted`): a file that compiled there and has no `Admitted`/`admit`/`Abort`
  is compiled cold with `coqc`, its statement checked by a file of ours that elaborates the
  reference statement before loading the attempt, and both compiled libraries re-checked by
  `coqchk`. Only this path fills `statement`, `axioms` and `unsafe`, and sets `trusted`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from env.problems import Problem
from env.provers.base import CheckResult, Message, SearchHit, ToolNames
from env.provers.rocq_install import coq_install
from env.provers.rocq_text import ATTEMPT, header_requires, parse_messages, uses_cheat_words
from env.provers.rocq_trusted import TrustedCheck, failure_message, outcome_status, trusted_check
from env.provers.rocq_worker import WarmOutcome, WorkerError, WorkerPool
from env.sandbox import run_jailed
from env.search import rg_search

# Axioms of the standard library's classical reals (and Coquelicot), by full name.
STANDARD_AXIOMS = frozenset({
    "Coq.Reals.ClassicalDedekindReals.sig_forall_dec",
    "Coq.Reals.ClassicalDedekindReals.sig_not_dec",
    "Coq.Logic.FunctionalExtensionality.functional_extensionality_dep",
    "Coq.Logic.Classical_Prop.classic",
    "Coq.Logic.PropExtensionality.propositional_extensionality",
    "Coq.Logic.ClassicalEpsilon.constructive_indefinite_description",
})


class RocqProver:
    name = "rocq"
    file_suffix = ".v"
    tools = ToolNames(write="rocq_write_file", check="rocq_check_file", search="rg_in_stdlib")
    standard_axioms = STANDARD_AXIOMS
    library_name = "the Rocq standard library"
    language = "Rocq"

    def __init__(self, *, timeout_s: float = 60.0, memory_mb: int = 4096, jail: bool = True, workers: int = 2,
                 max_checks_per_worker: int = 200) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.jail = jail
        self.coq = coq_install()
        self.lib_dir = self.coq.lib_dir
        self.pool = WorkerPool(size=workers, memory_mb=memory_mb, jail=jail, coq=self.coq,
                               max_checks=max_checks_per_worker)

    def render(self, problem: Problem, proof: str | None = None) -> str:
        if proof is None:
            proof = problem.formal_proof if problem.formal_proof is not None else "\nAdmitted."
        if not proof.startswith("\n"):
            proof = "\n" + proof
        if not proof.rstrip().endswith(("Qed.", "Defined.", "Admitted.")):
            proof = proof.rstrip() + "\nQed."
        return problem.header + problem.formal_statement + proof + "\n"

    def check(self, source: str, workdir: Path, *, problem: Problem | None = None,
              timeout_s: float | None = None) -> CheckResult:
        timeout = timeout_s or self.timeout_s
        start = time.monotonic()
        warm = self.feedback(source, workdir, problem=problem, timeout_s=timeout)
        result = CheckResult(status=warm.status, messages=warm.messages, uses_sorry=uses_cheat_words(source),
                             elapsed_s=warm.elapsed_s, sandboxed=warm.jailed, raw_output=warm.output)
        if problem is None or warm.status != "ok" or result.uses_sorry:
            return result
        trusted = self.trusted_check(source, workdir, problem=problem, timeout_s=timeout)
        return apply_trusted(result, trusted, time.monotonic() - start)

    def feedback(self, source: str, workdir: Path, *, problem: Problem | None, timeout_s: float) -> WarmOutcome:
        """The model's view of the file, from a warm worker loaded with the problem header's libraries."""
        requires = header_requires(problem.header if problem is not None else source)
        try:
            with self.pool.worker(requires) as worker:
                return worker.check(source, timeout_s)
        except WorkerError:
            return self.cold_feedback(source, workdir, timeout_s=timeout_s)  # a header coqtop cannot preload

    def cold_feedback(self, source: str, workdir: Path, *, timeout_s: float) -> WarmOutcome:
        """The same view from a fresh `coqc` run (slower: the libraries are loaded each time)."""
        scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=".rocq-cold-"))
        try:
            (scratch / f"{ATTEMPT}.v").write_text(source, encoding="utf-8")
            out = run_jailed(["coqc", "-q", "-Q", ".", "", f"{ATTEMPT}.v"], workdir=scratch, readonly=self.coq.mounts,
                             env=self.coq.environment(), timeout_s=timeout_s, memory_mb=self.memory_mb, jail=self.jail)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        status = outcome_status(out)
        messages = parse_messages(out.output)
        if status != "ok" and not any(m.severity == "error" for m in messages):
            messages += (failure_message(status, out),)
        return WarmOutcome(status, messages, out.output, out.elapsed_s, out.jailed)

    def trusted_check(self, source: str, workdir: Path, *, problem: Problem, timeout_s: float) -> TrustedCheck:
        return trusted_check(source, problem, workdir=workdir, timeout_s=timeout_s, memory_mb=self.memory_mb,
                             jail=self.jail, coq=self.coq, standard_axioms=self.standard_axioms)

    def search(self, pattern: str, *, max_hits: int = 50) -> list[SearchHit]:
        return rg_search(self.lib_dir, pattern, glob="*.v", max_hits=max_hits)

    def close(self) -> None:
        self.pool.close()


def apply_trusted(result: CheckResult, trusted: TrustedCheck, elapsed_s: float) -> CheckResult:
    """The feedback result with the trusted re-check's findings (and its messages when it failed)."""
    sandboxed = result.sandboxed and trusted.jailed
    if trusted.status != "ok":
        note = Message("error", f"{trusted.detail or 'the trusted re-check failed'}; its messages follow")
        return replace(result, status=trusted.status, messages=result.messages + (note, *trusted.messages),
                       elapsed_s=elapsed_s, trusted_s=trusted.elapsed_s, sandboxed=sandboxed)
    messages = result.messages + ((Message("error", trusted.detail),) if trusted.detail else ())
    return replace(result, messages=messages, statement=trusted.statement, axioms=trusted.axioms,
                   unsafe=trusted.unsafe, trusted=True, elapsed_s=elapsed_s, trusted_s=trusted.elapsed_s,
                   sandboxed=sandboxed)
