"""Stand-ins for the Lean toolchain, which these machines lack: a fake project whose programs are Python scripts.

`tests/env/lean_fakes/` holds a fake REPL (`fdrepl`), `lean` and kernel checker (`fdcheck`)
that copy the real command lines and protocols; `fake_lean` lays them out as a built
project (with a `data/` the jail must hide) plus a `lake` that answers `lake env`.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from env.problems import Problem
from env.provers.lean_jail import Launch

LEAN_HEADER = ("import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 400000\n\n"
               "open BigOperators Real Nat Topology Rat\n\n")
LEAN_PROBLEM = Problem(name="fd_lean_linear_eq_1", prover="lean", header=LEAN_HEADER,
                       formal_statement="theorem fd_lean_linear_eq_1 (x : ℝ) (h₀ : 3 * x + 7 = 22) : x = 5 := by",
                       formal_proof="\n  linarith")
FAKES = Path(__file__).resolve().parent / "lean_fakes"
FAKE_REPL = FAKES / "fdrepl.py"


def repl_launcher(scratch: Path, memory_mb: int) -> Launch:
    """Starts the fake REPL unjailed (the REPL framing and the pool do not depend on the jail)."""
    return Launch([sys.executable, str(FAKE_REPL)], {"PATH": "/usr/bin:/bin"}, scratch, memory_mb)


@dataclass(frozen=True)
class FakeLean:
    project: Path
    sysroot: Path
    secret: Path  # a file under the project's data/ that no Lean process may see

    @property
    def calls_log(self) -> Path:
        return self.sysroot / "bin" / "calls.log"

    def compiles(self) -> int:
        return len(self.calls_log.read_text().splitlines()) if self.calls_log.exists() else 0


def _install(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o755)


@pytest.fixture
def fake_lean(tmp_path, monkeypatch) -> FakeLean:
    project, sysroot, bin_dir = tmp_path / "project", tmp_path / "toolchain", tmp_path / "bin"
    secret = project / "data" / "lean_problems.jsonl"
    secret.parent.mkdir(parents=True)
    secret.write_text('{"formal_proof": "the reference proof"}\n')
    for olean in (project / ".lake/packages/mathlib/.lake/build/lib/lean/Mathlib.olean",
                  project / ".lake/build/lib/lean/FdHeader.olean", sysroot / "lib/lean/Init.olean"):
        olean.parent.mkdir(parents=True, exist_ok=True)
        olean.write_bytes(b"olean")
    _install(FAKES / "fdrepl.py", project / ".lake/build/bin/fdrepl")
    _install(FAKES / "fdcheck.py", project / ".lake/build/bin/fdcheck")
    _install(FAKES / "lean.py", sysroot / "bin/lean")
    lake = bin_dir / "lake"
    lake.parent.mkdir()
    # `lake env` prints package paths relative to the project, and passes the caller's LD_LIBRARY_PATH on.
    pairs = {"LEAN_SYSROOT": sysroot, "LEAN_PATH": f"{sysroot}/lib/lean:.lake/packages/mathlib/.lake/build/lib/lean:"
             f"{project}/.lake/build/lib/lean", "LD_LIBRARY_PATH": f"{sysroot}/lib:/opt/elsewhere/lib",
             "LEAN_SRC_PATH": f"{project}/lean_project", "PATH": f"{sysroot}/bin:/usr/bin"}
    lake.write_text("#!/usr/bin/env python3\nimport sys\n"
                    "if sys.argv[1:] != ['env', 'env', '-0']:\n    sys.exit('fake lake: unexpected arguments')\n"
                    f"sys.stdout.write({''.join(f'{k}={v}' + chr(0) for k, v in pairs.items())!r})\n")
    lake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return FakeLean(project, sysroot, secret)
