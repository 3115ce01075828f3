#!/usr/bin/env python3
"""Stands in for `lean` in tests (no Lean exists here): only the call the re-check makes, `lean --json -o OUT FILE`.

It "compiles" FILE by writing its text, after a header line, to OUT (the fake checker reads
it back). Markers in FILE script the outcomes a real compile can have:
  FD_COMPILE_ERROR     an error message (as `--json` prints it) and exit status 1
  FD_COMPILE_HANG      never finishes
  FD_COMPILE_OOM       runs out of memory
  FD_COMPILE_NO_OLEAN  exits 0 without writing OUT
When it may, it appends one line per call to calls.log beside itself (tests count compiles).
"""

import json
import sys
import time
from pathlib import Path

args = sys.argv[1:]
if len(args) != 4 or args[:2] != ["--json", "-o"]:
    sys.exit(f"fake lean: unexpected arguments {args}")
out, source = Path(args[2]), Path(args[3]).read_text(encoding="utf-8")
try:
    with (Path(__file__).resolve().parent / "calls.log").open("a") as log:
        log.write(f"{args[3]}\n")
except OSError:
    pass  # read-only inside the jail
if "FD_COMPILE_HANG" in source:
    time.sleep(3600)
if "FD_COMPILE_OOM" in source:
    sys.exit("INTERNAL PANIC: out of memory")
if "FD_COMPILE_ERROR" in source:
    line = next(i for i, text in enumerate(source.splitlines(), 1) if "FD_COMPILE_ERROR" in text)
    print(json.dumps({"severity": "error", "pos": {"line": line, "column": 2}, "endPos": None,
                      "fileName": args[3], "caption": "", "data": "unknown tactic"}))
    sys.exit(1)
if "FD_COMPILE_NO_OLEAN" not in source:
    out.write_text("fake olean\n" + source, encoding="utf-8")
