"""Regex search over a prover library's sources with ripgrep (the `rg` binary of the `ripgrep` package)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from env.process import CappedBuffer, pump
from env.provers.base import SearchHit
from env.sandbox import SandboxError

MAX_PATTERN_CHARS = 500
OUTPUT_BYTES = 2 * 1024 * 1024  # of ripgrep's JSON: thousands of matches, far more than are shown


def rg_binary() -> str:
    """Path of `rg`: next to this interpreter (the `ripgrep` wheel), else on PATH."""
    local = Path(sys.executable).parent / "rg"
    found = str(local) if local.exists() else shutil.which("rg")
    if found is None:
        raise RuntimeError("ripgrep is not installed: `pip install ripgrep` provides the `rg` binary")
    return found


def rg_search(root: Path, pattern: str, *, glob: str, max_hits: int = 50,
              timeout_s: float = 20.0) -> list[SearchHit]:
    """Lines under `root` matching the regex `pattern` in files matching `glob`, paths relative to `root`."""
    if not isinstance(pattern, str) or not pattern:
        raise SandboxError("pattern must be a non-empty regular expression")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SandboxError(f"pattern is longer than {MAX_PATTERN_CHARS} characters")
    cmd = [rg_binary(), "--json", "--sort", "path", "--max-columns", "300", "--max-count", str(max_hits),
           "--glob", glob, "--regexp", pattern, "."]
    proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    kept = CappedBuffer(head=OUTPUT_BYTES, tail=0)  # the first matches are all we show
    try:
        ending = pump(None, proc.stdout.fileno(), deadline=time.monotonic() + timeout_s, limit=OUTPUT_BYTES,
                      output=kept).ending
    finally:
        proc.kill()
        error = proc.stderr.read(2000).decode("utf-8", "replace")
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if ending == "timeout":
        raise SandboxError(f"search took longer than {timeout_s:.0f} s; use a more specific pattern")
    if ending == "eof" and proc.returncode == 2:
        raise SandboxError(f"invalid pattern: {error.strip()[:300]}")
    complete = bytes(kept.head)
    if ending == "limit":
        complete = complete[: complete.rfind(b"\n") + 1]
    hits: list[SearchHit] = []
    for line in complete.splitlines():
        event = json.loads(line)
        if event["type"] != "match":
            continue
        data = event["data"]
        path = data["path"].get("text", "").removeprefix("./")
        text = data["lines"].get("text", "").rstrip("\n")
        hits.append(SearchHit(path=path, line=data["line_number"], text=text))
        if len(hits) >= max_hits:
            break
    return hits
