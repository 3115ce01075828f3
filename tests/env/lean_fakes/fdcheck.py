#!/usr/bin/env python3
"""Stands in for the kernel checker `fdcheck` in tests (no Lean exists here), with its command line and answers.

`fdcheck ATTEMPT.olean REFERENCE.olean THEOREM RESULT.json`, reading what the fake `lean`
wrote. Instead of the kernel it compares text: THEOREM must be declared by a line
`theorem THEOREM ...` of the attempt (a `def` of that name is "not a theorem"), its
statement is the same when that line up to `:=` equals the reference's, and its axioms
are the standard three, plus sorryAx for `sorry`, Lean.ofReduceBool for `native_decide`,
and any `axiom NAME` the file declares. Markers script the checker's other answers:
  FD_CHECK_REJECT  the kernel rejects a declaration (exit 2)
  FD_CHECK_CRASH   the checker fails (exit 1, `error`)
  FD_CHECK_LIE     exit 0 with a rejection (an answer contradicting its status)
  FD_CHECK_SILENT  exit 0 without a result file
  FD_CHECK_HUGE    a result file of 1 MB
  FD_CHECK_HANG    never finishes
"""

import json
import re
import sys
import time
from pathlib import Path

STANDARD = ["propext", "Classical.choice", "Quot.sound"]


def statement(text: str, name: str) -> tuple[str, str] | None:
    m = re.search(rf"^(theorem|lemma|def)\s+{re.escape(name)}\b(.*?):=", text, re.M | re.S)
    return (m.group(1), " ".join(m.group(2).split())) if m else None


def main(args: list[str]) -> int:
    if len(args) != 4:
        print("usage: fdcheck ATTEMPT.olean REFERENCE.olean THEOREM RESULT.json", file=sys.stderr)
        return 1
    attempt, reference = (Path(a).read_text(encoding="utf-8") for a in args[:2])
    name, result = args[2], Path(args[3])
    if not (attempt.startswith("fake olean\n") and reference.startswith("fake olean\n")):
        return 1
    ref = statement(reference, name)
    if ref is None or "sorry" not in reference:
        answer = {"error": f"the reference does not declare {name}"}
        code = 1
    elif "FD_CHECK_HANG" in attempt:
        time.sleep(3600)
        return 0
    elif "FD_CHECK_SILENT" in attempt:
        return 0
    elif "FD_CHECK_HUGE" in attempt:
        result.write_text(json.dumps({"format": 1, "pad": "x" * (1 << 20)}))
        return 0
    elif "FD_CHECK_CRASH" in attempt:
        answer, code = {"error": "failed to read file 'attempt.olean', invalid header"}, 1
    elif "FD_CHECK_REJECT" in attempt or "FD_CHECK_LIE" in attempt:
        answer = {"rejected": "(kernel) declaration type mismatch, 'fd_bogus' has type\n  True\nbut it is expected "
                              "to have type\n  False"}
        code = 0 if "FD_CHECK_LIE" in attempt else 2
    else:
        found, code = statement(attempt, name), 0
        axioms = STANDARD + ["sorryAx"] * ("sorry" in attempt) + ["Lean.ofReduceBool"] * ("native_decide" in attempt)
        axioms += re.findall(r"^axiom\s+(\S+)", attempt, re.M)
        if found is None:
            answer = {"theorem": "missing"}
        elif found[0] == "def":
            answer = {"theorem": "not_a_theorem", "kind": "def", "axioms": axioms}
        else:
            same = found[1] == ref[1]
            answer = {"theorem": "declared", "same_statement": same, "axioms": axioms,
                      "detail": "" if same else f"{name} is not the problem's {name}"}
    result.write_text(json.dumps({"format": 1, **answer}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
