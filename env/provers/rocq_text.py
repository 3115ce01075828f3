"""Rocq (Coq) source and output text: the lexer's view of comments and sentences, the files the
trusted check compiles, and strict parsers for what the provers print.

Nothing here runs a prover. The parsers read untrusted text (an attempt decides much of what
Coq prints), so each runs in time linear in its input and refuses what it does not recognise
rather than guessing.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from env.problems import Problem
from env.provers.base import Message

ATTEMPT = "FdAttempt"  # the attempt's module name in every check
CHECK = "FdCheck"  # the statement-check module of the trusted check
STATEMENT = "__fd_statement__"
FOUND = "__fd_found__"
PROVED = "__fd_check__"
# `Redirect` output files of the statement check, written only when the command before them succeeded
STAGE_FILES = ("fd_statement", "fd_found", "fd_assumptions")

_MASK = "\0"  # stands for a character inside a comment or a string
_CHEAT_WORDS = re.compile(r"\b(Admitted|admit|Abort|give_up)\b")
_BULLETS = re.compile(r"(?:[-+*]+|[{}])")
# Vernacular whose effects outlive a rollback to the header's state (files written, plugins loaded,
# load paths, the working directory, the state machine itself): a warm worker that ran any of
# these words (anywhere, comments included) is restarted before it checks another file.
_STATEFUL = re.compile(r"\b(Declare|ML|Cd|LoadPath|Load|Redirect|Extraction|Extract|Drop|Quit|Back|BackTo|Reset"
                       r"|Undo|Write|Restore|Timeout|Silent)\b")
THEOREM_KEYWORDS = ("Theorem", "Lemma", "Fact", "Remark", "Corollary", "Proposition", "Example")


def mask_comments(source: str) -> str:
    """`source` with every character inside a comment or string literal replaced by NUL (newlines kept).

    Follows Coq's lexer: comments nest, and inside a comment a string literal is lexed too, so
    `*)` within such a string does not close the comment. A comment or string still open at the
    end masks everything after it (see `open_at_end`).
    """
    out = list(source)
    n, i, depth = len(source), 0, 0
    while i < n:
        if source.startswith("(*", i):
            depth += 1
            _mask(out, i, i + 2)
            i += 2
        elif depth and source.startswith("*)", i):
            depth -= 1
            _mask(out, i, i + 2)
            i += 2
        elif source[i] == '"':
            end = _string_end(source, i)
            end = len(source) if end < 0 else end
            _mask(out, i, end)
            i = end
        else:
            if depth:
                _mask(out, i, i + 1)
            i += 1
    return "".join(out)


def _string_end(source: str, start: int) -> int:
    """Index just past the string literal opening at `start` (`""` is an escaped quote), or -1 if it never closes."""
    i = start + 1
    while True:
        j = source.find('"', i)
        if j < 0:
            return -1
        if source.startswith('""', j):
            i = j + 2
            continue
        return j + 1


def _mask(out: list[str], start: int, end: int) -> None:
    for k in range(start, end):
        if out[k] != "\n":
            out[k] = _MASK


def open_at_end(source: str) -> str:
    """'a comment' or 'a string' when the source ends inside one, else ''."""
    n, i, depth = len(source), 0, 0
    while i < n:
        if source.startswith("(*", i):
            depth, i = depth + 1, i + 2
        elif depth and source.startswith("*)", i):
            depth, i = depth - 1, i + 2
        elif source[i] == '"':
            i = _string_end(source, i)
            if i < 0:
                return "a string"
        else:
            i += 1
    return "a comment" if depth else ""


def strip_comments(source: str) -> str:
    """Source without comments and string literals (their characters become spaces), lines kept."""
    return mask_comments(source).replace(_MASK, " ")


def uses_cheat_words(source: str) -> bool:
    """`Admitted`, `admit`, `Abort` or `give_up` outside comments and strings: a quick rejection only."""
    return bool(_CHEAT_WORDS.search(strip_comments(source)))


def is_stateful(source: str) -> bool:
    return bool(_STATEFUL.search(source))


@dataclass(frozen=True)
class Sentences:
    """A file cut into sentences as Coq's lexer sees them."""

    chunks: tuple[tuple[int, int], ...]  # [start, end) spans, one sentence each (with what precedes it)
    error: str = ""  # why the file cannot be fed as it is (unterminated comment, a missing final '.')


# Sentences that need no period: bullets, braces and goal-selector braces (`2: {`).
_BULLET = re.compile(r"[\s\0]*(?:[-+*]+|[{}]|\d+[\s\0]*:[\s\0]*\{)")


def split_sentences(source: str) -> Sentences:
    """One span per sentence: each ends with a sentence-ending period (one followed by a blank or
    the end) or is a bullet or brace. Text left after the last sentence is an unfinished command."""
    opened = open_at_end(source)
    if opened:
        return Sentences((), f"the file ends inside {opened}: close it")
    masked = mask_comments(source)
    chunks: list[tuple[int, int]] = []
    start = 0
    for m in re.finditer(r"\.(?=\s|$)", masked):
        i = m.start()
        if i > 0 and masked[i - 1] == ".":
            continue  # part of `..`
        start = _bullets(masked, start, i, chunks)
        chunks.append((start, i + 1))
        start = i + 1
    start = _bullets(masked, start, len(masked), chunks)
    if masked[start:].replace(_MASK, " ").strip():
        return Sentences(tuple(chunks), "the file ends in the middle of a command: a sentence needs its final '.'")
    return Sentences(tuple(chunks))


def _bullets(masked: str, start: int, stop: int, chunks: list[tuple[int, int]]) -> int:
    """Append the bullets and braces that open the text at `start` as sentences; return where the rest begins."""
    while (m := _BULLET.match(masked, start, stop)) is not None:
        chunks.append((start, m.end()))
        start = m.end()
    return start


class LineIndex:
    """Line numbers of positions in a text, in logarithmic time."""

    def __init__(self, text: str) -> None:
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)

    def column(self, pos: int) -> int:
        return pos - self.starts[self.line(pos) - 1] + 1


def header_requires(header: str) -> tuple[str, ...]:
    """The `Require` sentences of a problem header, in order: what a warm worker loads in advance."""
    out = []
    for start, end in split_sentences(header).chunks:
        code = " ".join(strip_comments(header[start:end]).split())
        if re.match(r"(From\s+\S+\s+)?Require\b", code):
            out.append(code)
    return tuple(out)


# -- the trusted statement check ---------------------------------------------------------------

def statement_prop(problem: Problem) -> str:
    """The problem's statement as one proposition, `forall <binders>, <type>`, from its `Theorem` text."""
    text = strip_comments(problem.formal_statement)
    keywords = "|".join(THEOREM_KEYWORDS)
    m = re.match(rf"\s*(?:{keywords})\s+{re.escape(problem.name)}(?![\w'])(.*)$", text, re.S)
    if m is None:
        raise ValueError(f"the statement of {problem.name} does not start with `Theorem {problem.name}`")
    body = re.sub(r"\s*Proof\s*\.\s*$", "", m[1].rstrip())
    if not body.endswith("."):
        raise ValueError(f"the statement of {problem.name} does not end with '.'")
    body = body[:-1]
    colon = _top_level_colon(body)
    if colon < 0:
        raise ValueError(f"the statement of {problem.name} has no ':' before its type")
    binders, typ = body[:colon].strip(), body[colon + 1:].strip()
    return f"forall {binders}, {typ}" if binders else typ


def _top_level_colon(text: str) -> int:
    """Index of the first ':' outside brackets (binders are bracketed), or -1."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == ":" and depth == 0:
            return i
    return -1


def check_source(problem: Problem) -> str:
    """The statement-check file: it elaborates the statement in the problem's own header *before*
    loading the attempt (whose notations, instances or redefinitions then cannot touch it),
    names the attempt's theorem, asks the kernel to accept it as a proof of that statement, and
    writes the theorem's assumptions. Each `Redirect` file exists only when the commands before
    it succeeded, so the stage reached is read from files, not from what was printed."""
    statement, found, assumptions = STAGE_FILES
    return (
        f"{problem.header}\n"
        f"Definition {STATEMENT} : Prop := {statement_prop(problem)}.\n"
        f'Redirect "{statement}" Check I.\n'
        f"Require {ATTEMPT}.\n"
        f"Definition {FOUND} := @{ATTEMPT}.{problem.name}.\n"
        f'Redirect "{found}" Check I.\n'
        f"Definition {PROVED} : {STATEMENT} := {FOUND}.\n"
        f'Redirect "{assumptions}" Print Assumptions {PROVED}.\n'
    )


def parse_assumptions(text: str) -> tuple[str, ...] | None:
    """Axiom names from `Print Assumptions`, or None for anything but a plain list of axioms.

    An entry starts at column 0 with its name (`name : type` or `name` with the type indented
    below); any other line at column 0 (an unsafe-flag note, an unknown section) refuses.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if lines == ["Closed under the global context"]:
        return ()
    if not lines or lines[0] != "Axioms:":
        return None
    names = []
    for line in lines[1:]:
        if line[0].isspace():
            continue
        m = re.fullmatch(r"([^\W\d][\w'.]*)(?: : .*)?", line)
        if m is None:
            return None
        names.append(m[1])
    return tuple(names)


@dataclass(frozen=True)
class ContextSummary:
    """The context summary `coqchk -o` prints after checking a set of libraries."""

    theory: str
    axioms: tuple[str, ...]
    type_in_type: tuple[str, ...]
    unsafe_fixpoints: tuple[str, ...]
    assumed_positive: tuple[str, ...]

    def unsafe(self) -> list[str]:
        notes = [("relies on type-in-type", self.type_in_type), ("relies on unchecked (co)fixpoints",
                 self.unsafe_fixpoints), ("is an inductive whose positivity was not checked", self.assumed_positive)]
        out = [f"{name} {what}" for what, names in notes for name in names]
        if self.theory != "Set is predicative":
            out.append(f"the checked theory is not the standard one ({self.theory})")
        return out


_SECTIONS = {
    "Theory": "theory",
    "Axioms": "axioms",
    "Constants/Inductives relying on type-in-type": "type_in_type",
    "Constants/Inductives relying on unsafe (co)fixpoints": "unsafe_fixpoints",
    "Inductives whose positivity is assumed": "assumed_positive",
}


def parse_context_summary(text: str) -> ContextSummary | None:
    """The summary's sections, or None when the text is not exactly such a summary."""
    head = "CONTEXT SUMMARY\n===============\n"
    at = text.find(head)
    if at < 0:
        return None
    fields: dict[str, list[str] | str] = {}
    current: list[str] | None = None
    for line in text[at + len(head):].splitlines():
        if not line.strip():
            continue
        if line.startswith("* "):
            title, _, value = line[2:].partition(":")
            key = _SECTIONS.get(title.strip())
            if key is None or key in fields:
                return None
            value = value.strip()
            if key == "theory":
                fields[key], current = value, None
            elif value == "<none>":
                fields[key], current = [], None
            elif value == "":
                fields[key] = current = []
            else:
                return None
        elif line.startswith("    ") and current is not None and re.fullmatch(r"[^\W\d][\w'.]*", line.strip()):
            current.append(line.strip())
        else:
            return None
    if set(fields) != set(_SECTIONS.values()):
        return None
    return ContextSummary(**{k: (v if k == "theory" else tuple(v)) for k, v in fields.items()})


# -- prover messages ---------------------------------------------------------------------------

_COQC_HEAD = re.compile(r'^(?:File "[^"\n]*", line (\d+), characters (\d+)-\d+:\n)?(Error|Warning):?[ \t]?', re.M)


def parse_messages(output: str) -> tuple[Message, ...]:
    """`coqc` diagnostics: each header (located or not) starts a message that runs to the next one."""
    heads = list(_COQC_HEAD.finditer(output))
    messages = []
    for k, m in enumerate(heads):
        stop = heads[k + 1].start() if k + 1 < len(heads) else len(output)
        line = int(m[1]) if m[1] else 0
        messages.append(Message(severity=m[3].lower(), text=output[m.end():stop].strip(), line=line,
                                column=int(m[2]) + 1 if line else 0))
    return tuple(messages)


_PROMPT = re.compile(r"<prompt>.*?</prompt>")
_INFO = re.compile(r"<infomsg>(.*?)</infomsg>", re.S)
_TOP_HEAD = re.compile(r"^(?:Toplevel input, characters (\d+)-\d+:\n((?:>.*\n)*))?(Error|Warning):?[ \t]?", re.M)


def parse_toplevel(output: str, source: str, start: int, end: int, lines: LineIndex) -> tuple[Message, ...]:
    """Messages of one sentence fed to `coqtop -emacs` (the span [start, end) of `source`).

    What the sentence printed (`<infomsg>` blocks: `idtac`, ...) is info whatever it says; the
    rest is coqtop's own: `Toplevel input, characters A-B:` headers, the echoed line with
    carets, then `Error:` or `Warning:`. coqtop counts A from the start of the input line the
    command began on; a sentence is always fed from a fresh line, so the offsets are relative
    to `start`, and where that does not land on the echoed line, the echo and its carets give
    the position. Whether the sentence failed is not read from here (see `rocq_worker`).
    """
    first = re.compile(r"\s*").match(source, start, end).end()
    here = (lines.line(first), lines.column(first) if first < end else 1)
    printed, messages = [], []
    pieces = _INFO.split(_PROMPT.sub("", output))
    for k, piece in enumerate(pieces):
        if k % 2:
            printed.append(piece.strip())
            continue
        heads = list(_TOP_HEAD.finditer(piece))
        printed.append((piece[:heads[0].start()] if heads else piece).strip())
        for i, m in enumerate(heads):
            stop = heads[i + 1].start() if i + 1 < len(heads) else len(piece)
            where = _locate(m[1], m[2] or "", source, start, end, lines) if m[1] else here
            messages.append(Message(m[3].lower(), piece[m.end():stop].strip(), *where))
    info = "\n".join(p for p in printed if p)
    return ((Message("info", info, *here),) if info else ()) + tuple(messages)


def _locate(offset: str, echo: str, source: str, start: int, end: int, lines: LineIndex) -> tuple[int, int]:
    echoed = [e[1:].removeprefix(" ") for e in echo.splitlines()]
    carets = [e for e in echoed if e.strip() and set(e.strip()) == {"^"}]
    shown = next((e for e in echoed if e not in carets), None)
    pos = min(start + int(offset), len(source))
    line = lines.line(pos)
    fed_start = max(lines.starts[line - 1], start)  # the chunk's first line was fed from `start`
    line_end = lines.starts[line] - 1 if line < len(lines.starts) else len(source)
    if shown is None or source[fed_start:line_end].rstrip() == shown.rstrip():
        return line, lines.column(pos)
    at = source.find(shown, start, end) if shown.strip() else -1
    if at < 0:
        return lines.line(start), 1
    return lines.line(at), lines.column(at) + (carets[0].index("^") if carets else 0)
