"""Regex search over a prover library's sources with ripgrep (the `rg` binary of the `ripgrep` package)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from env.provers.base import SearchHit
from env.sandbox import SandboxError

MAX_PATTERN_CHARS = 500


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
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SandboxError(f"search took longer than {timeout_s:.0f} s; use a more specific pattern") from None
    if proc.returncode == 2:
        raise SandboxError(f"invalid pattern: {proc.stderr.decode('utf-8', 'replace').strip()[:300]}")
    hits: list[SearchHit] = []
    for line in proc.stdout.splitlines():
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
