"""Rocq (Coq) backend: `coqc` in a jail, `Print Assumptions` for axioms, an elaborated statement check.

A check compiles the file as module `FdAttempt`. When it compiles and a problem is given,
a second file elaborates the reference statement in the problem's own header *before*
loading `FdAttempt` (so notations, instances or redefinitions in the attempt cannot
touch it), then compares the two types: syntactic equality first, else conversion
(`unify`), which still rejects any weaker or different statement.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import replace
from functools import cache
from pathlib import Path

from env.problems import Problem
from env.provers.base import CheckResult, Message, SearchHit, StatementCheck, ToolNames
from env.sandbox import ProcessOutcome, run_jailed
from env.search import rg_search

MODULE = "FdAttempt"
REFERENCE = "__fd_reference__"
_MARK = "FD_STATEMENT_"
# Axioms the standard library's classical reals (and Coquelicot) rest on.
STANDARD_AXIOMS = frozenset({
    "ClassicalDedekindReals.sig_forall_dec",
    "ClassicalDedekindReals.sig_not_dec",
    "FunctionalExtensionality.functional_extensionality_dep",
    "Classical_Prop.classic",
    "PropExtensionality.propositional_extensionality",
    "ClassicalEpsilon.constructive_indefinite_description",
})
_LOCATED = re.compile(r'^File "[^"]*", line (\d+), characters (\d+)-\d+:\n(Error|Warning):?\s?', re.M)
_UNLOCATED = re.compile(r"^(Error|Warning):\s?", re.M)
_CHEAT_WORDS = re.compile(r"\b(Admitted|admit|Abort|give_up)\b")


@cache
def coq_lib_dir() -> Path:
    """Root of the installed Coq library (`coqc -where`)."""
    if shutil.which("coqc") is None:
        raise RuntimeError("coqc not found: install Coq (Debian: apt-get install coq libcoq-coquelicot)")
    out = subprocess.run(["coqc", "-where"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@cache
def _ocamlfind_config() -> tuple[Path, ...]:
    """coqc reads ocamlfind's configuration (outside /usr) to locate its plugins."""
    return tuple(p for p in (Path("/etc/ocamlfind.conf"), Path("/etc/ocamlfind.conf.d")) if p.exists())


def strip_comments(source: str) -> str:
    """Source without (nested) Coq comments and string literals, line structure kept."""
    out: list[str] = []
    depth, i, in_string = 0, 0, False
    while i < len(source):
        two = source[i:i + 2]
        ch = source[i]
        if in_string:
            if ch == '"':
                in_string = source[i + 1:i + 2] == '"'
                i += 1 if not in_string else 2
                continue
        elif two == "(*":
            depth += 1
            i += 2
            continue
        elif two == "*)" and depth:
            depth -= 1
            i += 2
            continue
        elif ch == '"' and not depth:
            in_string = True
        elif not depth:
            out.append(ch)
        if ch == "\n" and (depth or in_string):
            out.append("\n")
        i += 1
    return "".join(out)


def parse_messages(output: str) -> tuple[Message, ...]:
    """`coqc` diagnostics as messages; text after a header runs until the next header."""
    heads = [(m.start(), m.end(), int(m[1]), int(m[2]) + 1, m[3].lower()) for m in _LOCATED.finditer(output)]
    located_spans = [(s, e) for s, e, *_ in heads]
    for m in _UNLOCATED.finditer(output):
        if not any(s <= m.start() < e for s, e in located_spans):
            heads.append((m.start(), m.end(), 0, 0, m[1].lower()))
    heads.sort()
    messages = []
    for k, (_, end, line, col, severity) in enumerate(heads):
        stop = heads[k + 1][0] if k + 1 < len(heads) else len(output)
        text = output[end:stop].strip()
        messages.append(Message(severity=severity, text=text, line=line, column=col if line else 0))
    return tuple(messages)


def parse_assumptions(output: str) -> tuple[tuple[str, ...], list[str]] | None:
    """(axioms, other unsafe notes) from `Print Assumptions`, or None when absent."""
    if "Closed under the global context" in output:
        return (), []
    m = re.search(r"^Axioms:\n", output, re.M)
    unsafe = re.findall(r"^(\S.*relying on.*|.*(?:type-in-type|assumed to be guarded|positivity).*)$", output, re.M)
    if m is None:
        return ((), unsafe) if unsafe else None
    axioms = []
    for line in output[m.end():].splitlines():
        if not line.strip():
            break
        if line[0].isspace():
            continue  # continuation of a type
        if not re.match(r"[\w'.]+(\s*:|$)", line):
            break
        axioms.append(line.split(" : ")[0].split(":")[0].strip())
    return tuple(axioms), unsafe


def reference_source(problem: Problem) -> str:
    """The problem's header and statement, renamed to REFERENCE and admitted."""
    stmt = re.sub(rf"\b(Theorem|Lemma)\s+{re.escape(problem.name)}(?![\w'])", f"Theorem {REFERENCE}",
                  problem.formal_statement, count=1)
    stmt = re.sub(r"\s*Proof\.\s*$", "", stmt)
    return f"{problem.header}{stmt}\nAdmitted.\n"


def statement_check_source(problem: Problem) -> str:
    return (
        f"{reference_source(problem)}"
        f"Require {MODULE}.\n"
        "Goal True.\n"
        f"  let t := type of {REFERENCE} in let u := type of {MODULE}.{problem.name} in\n"
        f'  first [ constr_eq t u; idtac "{_MARK}EXACT" | unify t u; idtac "{_MARK}CONVERTIBLE"\n'
        f'        | idtac "{_MARK}MISMATCH" ].\n'
        "  exact I.\nQed.\n"
        f"Print Assumptions {MODULE}.{problem.name}.\n"
    )


class RocqProver:
    name = "rocq"
    file_suffix = ".v"
    tools = ToolNames(write="rocq_write_file", check="rocq_check_file", search="rg_in_stdlib")
    standard_axioms = STANDARD_AXIOMS
    library_name = "the Rocq standard library"

    def __init__(self, *, timeout_s: float = 60.0, memory_mb: int = 4096, jail: bool = True) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.jail = jail
        self.lib_dir = coq_lib_dir()

    def render(self, problem: Problem, proof: str | None = None) -> str:
        if proof is None:
            proof = problem.formal_proof if problem.formal_proof is not None else "\nAdmitted."
        if not proof.startswith("\n"):
            proof = "\n" + proof
        if not re.search(r"\b(Qed|Defined|Admitted)\.\s*$", proof):
            proof = proof.rstrip() + "\nQed."
        return problem.header + problem.formal_statement + proof + "\n"

    def check(self, source: str, workdir: Path, *, problem: Problem | None = None,
              timeout_s: float | None = None) -> CheckResult:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        scratch = workdir / ".rocq-check"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            (scratch / f"{MODULE}.v").write_text(source, encoding="utf-8")
            compiled = self._coqc(f"{MODULE}.v", scratch, deadline)
            result = self._result(compiled, source)
            if problem is None or result.status != "ok":
                return result
            (scratch / "FdCheck.v").write_text(statement_check_source(problem), encoding="utf-8")
            checked = self._coqc("FdCheck.v", scratch, deadline)
            return self._with_statement(result, checked, problem)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _coqc(self, filename: str, scratch: Path, deadline: float) -> ProcessOutcome:
        remaining = max(1.0, deadline - time.monotonic())
        return run_jailed(["coqc", "-q", "-Q", ".", "", filename], workdir=scratch, readonly=_ocamlfind_config(),
                          timeout_s=remaining, memory_mb=self.memory_mb, jail=self.jail)

    def _result(self, out: ProcessOutcome, source: str) -> CheckResult:
        text = out.stdout + out.stderr
        messages = parse_messages(text)
        if out.timed_out:
            status = "timeout"
        elif out.out_of_memory:
            status = "oom"
        elif out.returncode is not None and out.returncode < 0:
            status = "crash"
        elif out.returncode != 0 or any(m.severity == "error" for m in messages):
            status = "error"
        else:
            status = "ok"
        if status in ("timeout", "oom", "crash") and not any(m.severity == "error" for m in messages):
            messages += (Message("error", _failure_text(status, out)),)
        uses_sorry = bool(_CHEAT_WORDS.search(strip_comments(source)))
        return CheckResult(status=status, messages=messages, uses_sorry=uses_sorry, elapsed_s=out.elapsed_s,
                           sandboxed=out.jailed, raw_output=text)

    def _with_statement(self, result: CheckResult, out: ProcessOutcome, problem: Problem) -> CheckResult:
        text = out.stdout + out.stderr
        elapsed = result.elapsed_s + out.elapsed_s
        if out.timed_out or out.out_of_memory:
            status = "timeout" if out.timed_out else "oom"
            msg = Message("error", f"{_failure_text(status, out)} (while checking the statement)")
            return replace(result, status=status, messages=result.messages + (msg,), elapsed_s=elapsed)
        if f"{_MARK}EXACT" in text or f"{_MARK}CONVERTIBLE" in text:
            statement = StatementCheck(True, True, "exact" if f"{_MARK}EXACT" in text else "convertible")
        elif f"{_MARK}MISMATCH" in text:
            statement = StatementCheck(True, False, f"the type of {problem.name} differs from the problem's statement")
        elif re.search(rf"\b{MODULE}\.{re.escape(problem.name)}\b.*not found|was not found", text):
            statement = StatementCheck(False, False, f"no theorem named {problem.name} in the file")
        else:
            statement = StatementCheck(False, False, "the statement could not be checked: " + text.strip()[:500])
        parsed = parse_assumptions(text)
        axioms, unsafe = parsed if parsed is not None else (None, [])
        if unsafe:
            axioms = (axioms or ()) + tuple(f"unsafe: {u}" for u in unsafe)
        return replace(result, statement=statement, axioms=axioms, elapsed_s=elapsed,
                        uses_sorry=result.uses_sorry or bool(axioms and f"{MODULE}.{problem.name}" in axioms))

    def search(self, pattern: str, *, max_hits: int = 50) -> list[SearchHit]:
        return rg_search(self.lib_dir, pattern, glob="*.v", max_hits=max_hits)

    def close(self) -> None:
        pass


def _failure_text(status: str, out: ProcessOutcome) -> str:
    if status == "timeout":
        return f"the check did not finish within its time limit ({out.elapsed_s:.1f} s)"
    if status == "oom":
        return "the check ran out of memory"
    return f"the prover crashed (exit status {out.returncode})"
