"""Where Coq is installed, what a jail must show of it, and the variables its programs need.

Debian's packages put everything under /usr, which every jail shows. Coq installed
elsewhere (opam's switch under the home directory, or a prefix unpacked by hand) also
needs its binaries, its library, its OCaml plugin directories and the ocamlfind
configuration mounted read-only, and the variables that point there (`COQLIB`,
`OCAMLPATH`, `OCAMLFIND_CONF`, `COQPATH`) passed into the jail's scrubbed environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PASSED_VARIABLES = ("COQLIB", "COQPATH", "OCAMLPATH", "OCAMLFIND_CONF")
PROGRAMS = ("coqc", "coqtop", "coqchk")


@dataclass(frozen=True)
class CoqInstall:
    lib_dir: Path  # `coqc -where`: the standard library's root
    mounts: tuple[Path, ...]  # read-only paths a jail needs beyond /usr
    variables: tuple[tuple[str, str], ...]  # environment of Coq's programs (PATH first)

    def environment(self) -> dict[str, str]:
        return dict(self.variables)


@cache
def coq_install() -> CoqInstall:
    """The Coq on PATH, or a clear error naming what is missing."""
    found = {name: shutil.which(name) for name in PROGRAMS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: install Coq 8.16 or later "
                           "(Debian: apt-get install coq libcoq-coquelicot)")
    bin_dirs = list(dict.fromkeys(Path(p).resolve().parent for p in found.values() if p is not None))
    out = subprocess.run(["coqc", "-where"], capture_output=True, text=True, check=True)
    lib_dir = Path(out.stdout.strip())
    passed = {k: os.environ[k] for k in PASSED_VARIABLES if os.environ.get(k)}
    candidates = [*bin_dirs, lib_dir]
    candidates += [Path(p) for p in passed.get("OCAMLPATH", "").split(":") + passed.get("COQPATH", "").split(":") if p]
    if "OCAMLFIND_CONF" in passed:
        candidates.append(Path(passed["OCAMLFIND_CONF"]))
    else:  # Debian's findlib reads its configuration from /etc, outside what a jail shows
        candidates += [p for p in (Path("/etc/ocamlfind.conf"), Path("/etc/ocamlfind.conf.d")) if p.exists()]
    return CoqInstall(lib_dir, outside_usr(candidates),
                      (("PATH", ":".join([*map(str, bin_dirs), "/usr/bin", "/bin"])), *passed.items()))


def outside_usr(paths: list[Path]) -> tuple[Path, ...]:
    """The existing paths not under /usr (which every jail shows), without any inside another."""
    present = {p.resolve() for p in paths if p.exists()}
    present = {p for p in present if not p.is_relative_to("/usr")}
    return tuple(sorted(p for p in present if not any(p != q and p.is_relative_to(q) for q in present)))
