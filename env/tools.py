"""The three tools an episode offers (write, check, search), their JSON schemas and readable outputs.

Specs follow the function-calling format that chat templates accept
(`{"type": "function", "function": {"name", "description", "parameters"}}`).
Tool misuse (a bad path, a missing argument) is a `ToolError` whose message goes back
to the model; it never ends the episode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from env.problems import Problem
from env.provers.base import CheckResult, Prover, SearchHit
from env.sandbox import EpisodeDir, SandboxError
from env.verdict import Verdict, judge

DEFAULT_OUTPUT_CHARS = 4000
MAX_SEARCH_HITS = 30


class ToolError(ValueError):
    """A tool call the episode refuses; the message is shown to the model."""


@dataclass
class ToolOutput:
    text: str
    is_error: bool = False
    check: CheckResult | None = None
    verdict: Verdict | None = None
    timings: dict[str, float] = field(default_factory=dict)


def cap(text: str, limit: int = DEFAULT_OUTPUT_CHARS) -> str:
    """Keep the head and tail of a long output with a visible note of what was cut."""
    if len(text) <= limit:
        return text
    head, tail = int(limit * 0.7), int(limit * 0.2)
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut; the output was {len(text)} characters ...]\n{text[-tail:]}"


def tool_specs(prover: Prover) -> list[dict]:
    suffix, lib = prover.file_suffix, prover.library_name
    language = "Lean 4" if prover.name == "lean" else "Rocq (Coq)"

    def spec(name: str, description: str, properties: dict[str, dict]) -> dict:
        return {"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(properties)}}}

    path = {"type": "string", "description": f"file path relative to the working directory, e.g. 'Main{suffix}'"}
    return [
        spec(prover.tools.write, f"Write a {language} source file (overwrites it if it exists).",
             {"path": path, "content": {"type": "string", "description": "the whole file content"}}),
        spec(prover.tools.check, f"Compile a {language} file written before and return the compiler output "
             "(errors, warnings, or success) and whether it solves the problem.", {"path": path}),
        spec(prover.tools.search, f"Search the sources of {lib} with a regular expression (ripgrep syntax); "
             "returns matching lines as file:line: text.",
             {"pattern": {"type": "string", "description": "a regular expression, e.g. 'theorem .*sq_nonneg'"}}),
    ]


def parse_arguments(arguments: dict | str | None) -> dict:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(f"arguments are not valid JSON: {e.msg}") from None
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object")
    return arguments


def _string_arg(args: dict, key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise ToolError(f"missing string argument {key!r}")
    return value


def format_check(result: CheckResult, verdict: Verdict, filename: str, limit: int) -> str:
    lines = [m.render(filename) for m in result.messages]
    if result.status == "ok":
        head = f"{filename} compiles with no errors."
    elif result.status == "error":
        head = f"{filename} does not compile."
    else:
        head = f"The check of {filename} failed: {verdict.describe()}."
    tail = ("The file proves the theorem: the problem is solved." if verdict.solved
            else f"Not solved: {verdict.describe().rstrip('.')}.")
    if not result.sandboxed:
        tail += " (The prover ran without the bubblewrap jail.)"
    return cap("\n".join([head, *lines, tail]), limit)


def format_search(hits: list[SearchHit], limit: int) -> str:
    if not hits:
        return "No matches."
    return cap("\n".join(f"{h.path}:{h.line}: {h.text.strip()}" for h in hits), limit)


def run_tool(name: str, arguments: dict | str | None, *, prover: Prover, problem: Problem, workdir: EpisodeDir,
             check_timeout_s: float | None = None, output_chars: int = DEFAULT_OUTPUT_CHARS) -> ToolOutput:
    """Execute one tool call inside `workdir`. Raises ToolError for calls the model got wrong."""
    args = parse_arguments(arguments)
    try:
        if name == prover.tools.write:
            path = workdir.write(_string_arg(args, "path"), _string_arg(args, "content"))
            return ToolOutput(f"Wrote {path.stat().st_size} bytes to {args['path']}.")
        if name == prover.tools.check:
            rel = _string_arg(args, "path")
            source = workdir.read(rel)
            result = prover.check(source, workdir.root, problem=problem, timeout_s=check_timeout_s)
            verdict = judge(result, problem, prover)
            return ToolOutput(format_check(result, verdict, rel, output_chars), check=result, verdict=verdict,
                              timings={"check_s": result.elapsed_s, "trusted_check_s": result.trusted_s})
        if name == prover.tools.search:
            hits = prover.search(_string_arg(args, "pattern"), max_hits=MAX_SEARCH_HITS)
            return ToolOutput(format_search(hits, output_chars))
    except SandboxError as e:
        raise ToolError(str(e)) from None
    known = ", ".join((prover.tools.write, prover.tools.check, prover.tools.search))
    raise ToolError(f"unknown tool {name!r}; the tools are {known}")
