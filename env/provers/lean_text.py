"""Everything about Lean source text and REPL output that needs no toolchain (pure functions).

`env.provers.lean` sends a checked file to a REPL worker in pieces: the imports once per
worker (that is what takes seconds), the statement-check command and the problem's
reference statement once per problem, then the body of the file, then the statement and
axiom check. This module builds those commands, maps message
positions of the body back to the whole file, and reads what the REPL answered.

The reference is the problem's statement renamed to `__fd_reference__` and proved by
`sorry`, elaborated in the problem's header before the attempt, so nothing the attempt
declares (a notation, a local instance, a redefinition) can change it. After the attempt
the `#fd_check_statement` command, also defined before the attempt, compares the two
elaborated types as `Expr`s; `#print axioms` then lists the theorem's axioms, so a proof
that borrows the reference shows `sorryAx`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from env.problems import Problem
from env.provers.base import Message, Severity, StatementCheck

REFERENCE = "__fd_reference__"
STATEMENT_MARK = "FD_STATEMENT"
_IDENT_CHAR = re.compile(r"[\w'!?]")
_MODULE = re.compile(r"import\s+((?:«[^»]*»|[^\s«])+)")
_CHAR_LITERAL = re.compile(r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'\n])'")
_SORRY = re.compile(r"(?<![\w'.])(sorry|admit)(?![\w'!?])")
_SORRY_WARNING = re.compile(r"declaration uses ['`]sorry['`]")
_AXIOMS = re.compile(r"'(?P<name>.+?)' (?:depends on axioms: \[(?P<axioms>[^\]]*)\]|does not depend on any axioms)")


def _word(pattern: str) -> str:
    """A regex matching `pattern` as a whole Lean token (not part of a longer name)."""
    return rf"(?<![\w'.]){pattern}(?![\w'])"


# Constructs refused before the file reaches Lean: each can make the kernel accept, or the
# checker report, something that `#print axioms` and the statement check would not reveal.
BLOCKED: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(_word(p)), why) for p, why in (
    (r"debug\.skipKernelTC", "it turns off the kernel's type checking, so nothing in the file is verified"),
    (r"(?:addDeclWithoutChecking|addDeclCore)", "it adds declarations to the environment without kernel checking"),
    (r"(?:implemented_by|extern)", "it replaces the code the compiler runs, which `decide`-by-evaluation trusts"),
    (r"unsafe", "unsafe definitions escape the kernel's checks"),
    (r"(?:#eval|run_cmd|run_elab|run_meta|run_tac|by_elab)",
     "it runs a metaprogram during the check, which can change the environment the checker inspects"),
    (r"(?:syntax|macro_rules|macro|elab_rules|elab|declare_syntax_cat|command_elab)",
     "it extends Lean's syntax or elaborators, which could redefine the commands the checker runs after the file"),
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


def reference_name(name: str) -> str:
    """The reserved name of the reference, in the namespace of `name` (the statement resolves names there)."""
    prefix, _, _ = name.rpartition(".")
    return f"{prefix}.{REFERENCE}" if prefix else REFERENCE


def quote_name(name: str) -> str:
    """`name` as an identifier that no notation can turn into a keyword: «A».«b»."""
    return ".".join(f"«{part}»" for part in name.split("."))


def reference_command(problem: Problem) -> str:
    """Elaborates the problem's statement as the reference, on top of `CHECKER_COMMAND`.

    The statement sits in a `section` with the rest of the problem's header, so its `open`s
    and options apply to it and are gone again for the attempt, which brings its own header.
    """
    header_rest = split_imports(problem.header).body
    statement, found = re.subn(rf"\b(theorem|lemma)\s+{re.escape(problem.name)}(?![\w'.])",
                               f"theorem {quote_name(reference_name(problem.name))}", problem.formal_statement,
                               count=1)
    if not found:
        raise ValueError(f"the formal statement of {problem.name} does not declare `theorem {problem.name}`")
    return f"section\n{header_rest.strip()}\n\n{statement}\n  sorry\n\nend\n"


# Defines `#fd_check_statement` before any attempt runs, so the attempt cannot redefine what it uses.
CHECKER_COMMAND = f"""\
open Lean in
/-- The kind of a declaration, for the statement check's report. -/
def «__fd_kind__» : ConstantInfo → String
  | .thmInfo _ => "theorem"
  | .axiomInfo _ => "axiom"
  | .defnInfo _ => "def"
  | .opaqueInfo _ => "opaque"
  | _ => "other"

open Lean Elab Command in
/-- Reports whether `user` has exactly the elaborated type (and universe names) of `ref`. -/
elab "#fd_check_statement " user:ident ref:ident : command => do
  let env ← getEnv
  match env.find? user.getId, env.find? ref.getId with
  | some u, some r =>
    let same := if u.levelParams == r.levelParams && u.type == r.type then "yes" else "no"
    logInfo m!"{STATEMENT_MARK} found kind={{«__fd_kind__» u}} same={{same}}\\nexpected: {{r.type}}\\nfound: {{u.type}}"
  | none, _ => logInfo m!"{STATEMENT_MARK} missing"
  | _, none => logInfo m!"{STATEMENT_MARK} noref"
"""


def check_command(name: str) -> str:
    """Run after the attempt: the statement comparison, then the theorem's axioms."""
    quoted = quote_name(name)
    return (f"#fd_check_statement {quoted} {quote_name(reference_name(name))}\n"
            f"#print axioms _root_.{quoted}\n")


def parse_statement(texts: Iterable[str], name: str, reference_errors: str = "") -> StatementCheck | None:
    """The statement check from the messages of `check_command`, or None when its marker is absent."""
    for text in texts:
        if not text.startswith(STATEMENT_MARK):
            continue
        first, _, rest = text.partition("\n")
        words = dict(w.split("=", 1) for w in first.split()[2:] if "=" in w)
        if first.split()[1:2] == ["missing"]:
            return StatementCheck(False, False, f"no declaration named {name} in the file")
        if first.split()[1:2] == ["noref"]:
            detail = "the problem's statement did not elaborate with this file's imports"
            return StatementCheck(True, False, detail + (f": {reference_errors}" if reference_errors else ""))
        kind, same = words.get("kind", "?"), words.get("same") == "yes"
        if kind != "theorem":
            return StatementCheck(True, False, f"{name} is declared as {kind}, not as a theorem")
        if not same:
            return StatementCheck(True, False, f"the statement of {name} differs from the problem's:\n{rest}")
        return StatementCheck(True, True, "the elaborated statement equals the problem's")
    return None


def parse_axioms(texts: Iterable[str], name: str) -> tuple[str, ...] | None:
    """The axioms `#print axioms` reported for `name`, or None when it reported nothing for it.

    Accepts "'x' depends on axioms: [propext, Classical.choice, Quot.sound]" (the list may
    wrap over lines) and "'x' does not depend on any axioms".
    """
    for text in texts:
        for m in _AXIOMS.finditer(text):
            if _unquote(m.group("name")) != name:
                continue
            listed = m.group("axioms")
            if listed is None:
                return ()
            return tuple(_unquote(a.strip()) for a in listed.split(",") if a.strip())
    return None


def _unquote(name: str) -> str:
    return name.replace("«", "").replace("»", "")


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
