"""Everything about Lean source text and REPL output that needs no toolchain (pure functions).

`env.provers.lean` sends a checked file to a REPL worker in two pieces: the imports once
per worker (that is what takes seconds), then the body of the file. This module splits
files that way, maps message positions of the body back to the whole file, reads what
the REPL answered, and renders problems (the reference file of the kernel re-check is the
problem's header and statement proved by `sorry`).

`blocked_constructs` refuses metaprogramming hooks before a file reaches the shared REPL
worker. It is hygiene for that shared process (code a file runs there could disturb the
feedback of later checks), not a security boundary: a text filter can always be
bypassed, and the verdict never depends on it (see `env.provers.lean_trusted`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from env.problems import Problem
from env.provers.base import Message, Severity

_IDENT_CHAR = re.compile(r"[\w'!?]")
_MODULE = re.compile(r"import\s+((?:«[^»]*»|[^\s«])+)")
_CHAR_LITERAL = re.compile(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'\n])'")
_SORRY = re.compile(r"(?<![\w'.])(sorry|admit)(?![\w'!?])")
_SORRY_WARNING = re.compile(r"declaration uses ['`]sorry['`]")


def _word(pattern: str, *, qualified: bool = False) -> str:
    """A regex matching `pattern` as a whole Lean token; `qualified` also after a dot (`Lean.Environment.x`)."""
    before = r"(?<![\w'])" if qualified else r"(?<![\w'.])"
    return rf"{before}{pattern}(?![\w'])"


# Attributes that register code Lean runs while it elaborates (tactics, elaborators,
# delaborators, simp procedures, extensions of norm_num and positivity, ...).
_META_ATTRIBUTES = (r"(?:tactic|term_elab|command_elab|delab|app_unexpander|simproc|norm_num|positivity"
                    r"|builtin_\w+|env_linter|code_action_provider|init)")

# Constructs refused before the file reaches the shared REPL worker: each runs code of the
# file inside that process or escapes the kernel (the kernel re-check rejects the latter anyway).
BLOCKED: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), why) for p, why in (
    (_word(r"debug\.skipKernelTC", qualified=True),
     "it turns off the kernel's type checking, so nothing in the file is verified"),
    (_word(r"(?:addDeclWithoutChecking|addDeclCore)", qualified=True),
     "it adds declarations to the environment without kernel checking"),
    (_word(r"(?:implemented_by|extern)"), "it replaces the code the compiler runs, which evaluation trusts"),
    (_word(r"unsafe"), "unsafe definitions escape the kernel's checks"),
    (_word(r"(?:#eval|run_cmd|run_elab|run_meta|run_tac|by_elab)"), "it runs a metaprogram during the check"),
    (_word(r"(?:syntax|macro_rules|macro|elab_rules|elab|declare_syntax_cat|command_elab|d?simproc(?:_decl)?)"),
     "it extends Lean's syntax, elaborators or simplifier with code of the file"),
    (rf"(?:@|\battribute\s*)\[[^\]]*?{_word(_META_ATTRIBUTES)}",
     "the attribute registers code of the file that Lean runs while it elaborates"),
))


def comment_spans(text: str) -> list[tuple[int, int]]:
    """(start, stop) of every comment in `text`, in order.

    Handles nested `/- -/` comments, `--` line comments, and string literals, character
    literals and `«»` identifiers, inside which comment markers do not start comments.
    """
    spans = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("--", i):
            stop = text.find("\n", i)
            stop = n if stop < 0 else stop
            spans.append((i, stop))
            i = stop
        elif text.startswith("/-", i):
            stop = _block_comment_end(text, i)
            spans.append((i, stop))
            i = stop
        elif c == '"':
            i = _string_end(text, i)
        elif c == "«":
            stop = text.find("»", i)
            i = n if stop < 0 else stop + 1
        elif c == "'" and (i == 0 or not _IDENT_CHAR.match(text[i - 1])) and (m := _CHAR_LITERAL.match(text, i)):
            i = m.end()
        else:
            i += 1
    return spans


def mask_comments(text: str) -> str:
    """`text` with every comment replaced by spaces (newlines kept), so positions still match."""
    out = list(text)
    for start, stop in comment_spans(text):
        for k in range(start, stop):
            if out[k] != "\n":
                out[k] = " "
    return "".join(out)


def _block_comment_end(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text):
        if text.startswith("/-", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("-/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(text)


def _string_end(text: str, start: int) -> int:
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return len(text)


@dataclass(frozen=True)
class FileSplit:
    """A Lean file cut after its imports. `line_offset`/`column_offset` place body position 1:0 in the file."""

    imports: tuple[str, ...]
    body: str
    line_offset: int
    column_offset: int

    def file_position(self, line: int, column: int) -> tuple[int, int]:
        """A REPL position in the body (1-based line, 0-based column) as (line, 1-based column) in the file."""
        if line <= 0:
            return 0, 0
        return line + self.line_offset, column + 1 + (self.column_offset if line == 1 else 0)


def split_imports(source: str) -> FileSplit:
    """Split off the leading `import` lines (and the blank lines and comments around them).

    The header ends at the first thing that is not an import, a blank or a comment; doc
    comments (`/--`, `/-!`) belong to the body since they are part of commands.
    """
    comments = {start: stop for start, stop in comment_spans(source)}
    masked = mask_comments(source)
    imports: list[str] = []
    end = i = 0
    while i < len(source):
        if i in comments and not source.startswith(("/--", "/-!"), i):
            i = comments[i]
        elif source[i].isspace():
            i += 1
        elif m := _MODULE.match(masked, i):
            imports.append(m.group(1).replace("«", "").replace("»", ""))
            end = i = m.end()
        else:
            break
    head = source[:end]
    return FileSplit(tuple(imports), source[end:], head.count("\n"), end - (head.rfind("\n") + 1))


def imports_command(imports: Iterable[str]) -> str:
    """The REPL command that loads `imports` (a comment when there are none: commands cannot be empty)."""
    lines = [f"import {m}" for m in imports]
    return "\n".join(lines) + "\n" if lines else "-- no imports\n"


def format_proof(proof: str) -> str:
    """A proof in the `formal_proof` convention: it starts with a newline, and tactics are indented."""
    if proof.startswith("\n"):
        return proof
    lines = proof.strip("\n").split("\n")
    return "".join("\n" + (f"  {line}" if line.strip() else "") for line in lines)


def render(problem: Problem, proof: str | None = None) -> str:
    """`header + formal_statement + proof`; the reference proof when `proof` is None, else `sorry`."""
    if proof is None:
        proof = problem.formal_proof if problem.formal_proof is not None else "sorry"
    return problem.header + problem.formal_statement + format_proof(proof)


def declares(statement: str, name: str) -> bool:
    """Whether a formal statement declares `theorem name` (or `lemma name`), outside comments."""
    return re.search(rf"\b(?:theorem|lemma)\s+{re.escape(name)}(?![\w'.])", mask_comments(statement)) is not None


def text_uses_sorry(source: str) -> bool:
    """`sorry` or `admit` as a whole word outside comments."""
    return bool(_SORRY.search(mask_comments(source)))


def uses_sorry(source: str, sorries: Iterable[Any], messages: Iterable[Mapping[str, Any]]) -> bool:
    """Whether the REPL saw a `sorry` (in `sorries`, or a "declaration uses 'sorry'" warning) or the text has one."""
    return (any(True for _ in sorries) or any(_SORRY_WARNING.search(str(m.get("data", ""))) for m in messages)
            or text_uses_sorry(source))


@dataclass(frozen=True)
class Block:
    """A construct the checker refuses, with its 1-based position in the file."""

    construct: str
    reason: str
    line: int
    column: int

    def message(self) -> Message:
        return Message("error", f"`{self.construct}` is not allowed in a checked file: {self.reason}.",
                       self.line, self.column)


def blocked_constructs(source: str) -> list[Block]:
    """Kernel escapes and metaprogramming hooks in `source`, first occurrence of each kind.

    Comments are ignored only when the file has no string literal: an interpolated string
    can hold code, and a lexer that misread it could hide a construct inside what it took
    for a comment. `«»` quotes are dropped first, since `«unsafe»`-style names reach the
    same options and attributes.
    """
    text = mask_comments(source) if '"' not in source else source
    kept = [i for i, c in enumerate(text) if c not in "«»"]
    plain = "".join(text[i] for i in kept)
    blocks = []
    for pattern, reason in BLOCKED:
        m = pattern.search(plain)
        if m is None:
            continue
        start = kept[m.start()]
        line = source.count("\n", 0, start) + 1
        column = start - (source.rfind("\n", 0, start) + 1) + 1
        blocks.append(Block(m.group(0), reason, line, column))
    return sorted(blocks, key=lambda b: (b.line, b.column))


_SEVERITIES: dict[str, Severity] = {"error": "error", "warning": "warning", "info": "info", "trace": "info"}


def message_from_repl(message: Mapping[str, Any], split: FileSplit | None = None) -> Message:
    """A REPL message dict (`severity`, `pos`, `endPos`, `data`) as a `Message` placed in the whole file."""
    pos = message.get("pos") or {}
    line, column = int(pos.get("line", 0)), int(pos.get("column", 0))
    if split is not None:
        line, column = split.file_position(line, column)
    elif line > 0:
        column += 1
    else:
        column = 0
    severity = _SEVERITIES.get(str(message.get("severity", "error")), "error")
    return Message(severity, str(message.get("data", "")).strip(), line, column)
