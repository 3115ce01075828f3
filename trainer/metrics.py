"""Training metrics read off episode logs, and the metrics log itself.

Everything here is a pure function of `agent.episode.Episode` records (the trainer never
imports `env/` or vLLM), except `MetricsLogger`, which appends one JSON line per step and
mirrors it to wandb when asked. What the paper reports and how we compute it:
- accuracy, response length, tool calls, finish reasons, reward statistics, phase timings:
  `rollout_metrics`;
- epistemic verbalization (appendix C.4): occurrences of ten uncertainty words in the
  assistant turns, here per 1,000 generated tokens so that runs with different response
  lengths compare;
- distinct lemmas and tactics in correct proofs (figure 3): `DistinctTracker`, with the
  names pulled out of the solved file by `lemmas_and_tactics`, a documented heuristic
  (no Lean or Rocq parser runs in the trainer).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, get_args

from agent.episode import Episode, FinishReason

EPISTEMIC_WORDS = ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might", "likely", "check")
_EPISTEMIC = re.compile(r"\b(" + "|".join(EPISTEMIC_WORDS) + r")\b", re.IGNORECASE)


def epistemic_counts(texts: Iterable[str]) -> dict[str, int]:
    """Case-insensitive whole-word counts of EPISTEMIC_WORDS ("Wait," counts; "waiting" and "rocq_check_file" don't)."""
    counts = dict.fromkeys(EPISTEMIC_WORDS, 0)
    for text in texts:
        for m in _EPISTEMIC.finditer(text):
            counts[m[1].lower()] += 1
    return counts


def assistant_texts(episode: Episode) -> list[str]:
    """The text of the episode's assistant turns (thinking, prose and tool-call blocks as generated)."""
    return [m["content"] for m in episode.messages if m.get("role") == "assistant"]


# -- the solved file -------------------------------------------------------------------------------


def _path_key(path: str) -> tuple[str, ...]:
    return tuple(p for p in PurePosixPath(path).parts if p != ".")  # "./Main.lean" is "Main.lean"


def proof_source(episode: Episode) -> str | None:
    """The content of the file that solved the episode, or None when it is unsolved.

    That is the last successful write (any tool named `*_write_file`) of the path that the
    solved check read; when the env's final check solved it (a solved `episode.verdict`
    with no solved check call), the last successful write, which is the file the env checks.
    """
    written: dict[tuple[str, ...], str] = {}
    last: str | None = None
    for call in episode.tool_calls:
        if call.is_error or not isinstance(call.arguments, dict):
            continue
        path = call.arguments.get("path")
        if call.name.endswith("_write_file"):
            content = call.arguments.get("content")
            if isinstance(path, str) and isinstance(content, str):
                written[_path_key(path)] = last = content
        elif call.verdict is not None and call.verdict.get("solved"):
            key = _path_key(path) if isinstance(path, str) else None
            if key not in written:
                raise ValueError(f"episode {episode.episode_id}: the solved check of {path!r} follows no write "
                                 "of that file")
            return written[key]
    if episode.verdict is not None and episode.verdict.get("solved"):
        if last is None:
            raise ValueError(f"episode {episode.episode_id}: solved by the final check, but no file was written")
        return last
    return None


# -- lemmas and tactics: a heuristic -----------------------------------------------------------

_OPEN, _CLOSE = "([{⟨⦃", ")]}⟩⦄"
_IDENT = re.compile(r"(?<![\w'.])[^\W\d][\w']*(?:\.(?:[^\W\d][\w']*|\d+))*")

_LEAN_TACTICS = frozenset("""
abel absurd aesop all_goals and_intros any_goals apply apply_fun apply_mod_cast apply_rules assumption
assumption_mod_cast bound by_cases by_contra by_contra! calc cancel_denoms case case' cases cases' casesm change
choose clear congr constructor contradiction contrapose contrapose! conv conv_lhs conv_rhs decide dsimp erw exact
exact? exact_mod_cast exacts exfalso exists existsi ext field_simp fin_cases first focus fun_prop funext gcongr
generalize group have induction induction' infer_instance injection interval_cases intro intros iterate left let
lift linarith linarith! linear_combination match mod_cases native_decide next nlinarith nlinarith! nofun nomatch
norm_cast norm_num norm_num1 nth_rewrite nth_rw obtain omega on_goal polyrith positivity push_cast push_neg qify
rcases refine refine' rel rename_i repeat repeat' revert rfl right ring ring1 ring_nf rintro rw rw_mod_cast rwa
rewrite set show simp simp? simp_all simp_arith simp_rw simpa specialize split split_ifs subst subst_vars suffices
symm tauto trans trivial try unfold use wlog zify
""".split())
_LEAN_COMBINATORS = frozenset({"try", "all_goals", "any_goals", "repeat", "repeat'", "iterate", "focus"})
_LEAN_KEYWORDS = frozenset("""
fun λ by at with from using only in if then else do let have show match this generalizing True False true false
Type Prop Sort sorry
""".split())
_PROJECTIONS = frozenset({"mp", "mpr", "1", "2", "symm", "le", "lt", "ne", "ne'", "trans", "elim"})

_LEAN_DECL = re.compile(r"^[ \t]*(?:@\[[^\]\n]*\]\s*)?(?:(?:private|protected|noncomputable|nonrec)\s+)*"
                        r"(theorem|lemma|example|def|abbrev|instance)\b[ \t]*([^\s(:{\[⦃]*)", re.M)
_LEAN_COMMAND = re.compile(r"^(?:#\w+|(?:end|namespace|section|open|set_option|variable|attribute|universe|import)\b)",
                           re.M)
_TYPE_KEYWORD = re.compile(r"(?<![\w'.])(?:show|change|calc)(?![\w'!?])")
_TYPE_END = re.compile(r":=|=>|<;>|;|(?<![\w'.])(?:by|from|at|using)(?![\w'!?])")
_CALC_STEP = re.compile(r"^([ \t]*_)[ \t][^\n]*?(?=:=)", re.M)
_LEAN_SEPARATOR = re.compile(r"(<;>|;|·|•|=>|\|\||\||\n|(?<![\w'.])(?:by|then|else)(?![\w'!?]))")
_TACTIC_NAME = re.compile(r"([^\W\d][\w']*[!?]?)(?![\w'.])")


def _depth(text: str, depth: int = 0) -> int:
    for c in text:
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(depth - 1, 0)
    return depth


def _top_level_assign(text: str) -> int:
    """Index of the first `:=` outside brackets (where a declaration's statement ends), or -1."""
    depth = 0
    for i, c in enumerate(text):
        if depth == 0 and text.startswith(":=", i):
            return i
        depth = _depth(c, depth)
    return -1


def _type_end(text: str, i: int, *, in_brackets: bool) -> int:
    """Where a type that starts at `i` ends: `:=`, `=>`, `by`, `from`, `at`, `using`, `;`, or its closing bracket."""
    depth = 0
    while i < len(text):
        if depth == 0 and (_TYPE_END.match(text, i) or (in_brackets and text[i] == ",")):
            return i
        if text[i] in _OPEN:
            depth += 1
        elif text[i] in _CLOSE:
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return i


def _strip_types(text: str) -> str:
    """Drop types so that only terms remain: `(e : T)`, `have h : T :=`, `show T`, `change T`, calc relations."""
    text = _CALC_STEP.sub(r"\1 ", text)
    out, i, depth = [], 0, 0
    while i < len(text):
        if text.startswith((":=", "::"), i):
            out.append(text[i:i + 2])
            i += 2
            continue
        keyword = _TYPE_KEYWORD.match(text, i)
        if keyword or text[i] == ":":
            out.append(keyword[0] + " " if keyword else " ")
            i = _type_end(text, keyword.end() if keyword else i + 1, in_brackets=depth > 0)
            continue
        depth = _depth(text[i], depth)
        out.append(text[i])
        i += 1
    return "".join(out)


def _continues(line: str, depth: int) -> bool:
    """Whether the next physical line continues this one: open brackets, or a line ending in `:=`, `,`, an operator."""
    s = line.rstrip()
    if depth > 0:
        return True
    if s.endswith("=>"):  # `fun x =>` continues; `| succ k ih =>` opens a tactic block
        return re.search(r"(?:\bfun\b|λ)[^=]*=>$", s) is not None
    return s.endswith((":=", ":", ",", "calc", "from", "←", "→", "↔", "∧", "∨", "=", "≤", "<", "≥", ">", "≠",
                       "+", "-", "*", "/", "^", "∣"))


def _logical_lines(body: str) -> list[str]:
    lines, current, depth = [], "", 0
    for raw in body.split("\n"):
        current = f"{current}\n{raw}" if current else raw
        depth = _depth(raw, depth)
        if not _continues(raw, depth):
            lines.append(current)
            current = ""
    return [*lines, current] if current else lines


def _idents(text: str) -> list[str]:
    return _IDENT.findall(text)


def _lean_locals(header: str, lines: list[str]) -> set[str]:
    """Names bound in the theorem's binders or by the proof (intro, obtain, rcases ... with, have name, fun x =>)."""
    names = {n for m in re.finditer(r"[({\[⦃]\s*([^:(){}\[\]⦃⦄]+?)\s*:(?!=)", header) for n in _idents(m[1])}
    for line in lines:
        for m in re.finditer(r"\bwith\b(.*?)(?=<;>|;|=>|:=|$)", line, re.S):
            names.update(_idents(m[1]))
        for m in re.finditer(r"\|([^|\n]*?)=>", line):  # `| succ k ih =>` binds k and ih
            names.update(_idents(m[1])[1:])
        for m in re.finditer(r"(?:\bfun\b|λ)(.*?)=>", line, re.S):
            names.update(_idents(m[1]))
        for m in re.finditer(r"\b(?:intro|intros|rintro|ext|funext|rename_i|case|next)\b(.*?)(?=<;>|;|=>|\n|$)", line):
            names.update(_idents(m[1]))
        for m in re.finditer(r"\b(?:have|let|set|suffices|by_cases|by_contra!?|obtain|generalize|choose|wlog|lift)"
                             r"(?![\w'])(.*?)(?=:=|<;>|;|\busing\b|\bwith\b|\bby\b|\n|$)", line):
            names.update(_idents(m[1]))
    return names


def _lemma_name(ident: str, local: set[str], excluded: frozenset[str] | set[str]) -> str | None:
    """`ident` as a library lemma, or None: qualified or snake_case, not a local (nor a projection of one)."""
    parts = ident.removeprefix("_root_.").split(".")
    if parts[0] in local:  # h₀.ne', hx.le: a hypothesis, not a lemma
        return None
    while len(parts) > 1 and parts[-1] in _PROJECTIONS:  # mul_eq_zero.mp is mul_eq_zero
        parts.pop()
    name = ".".join(parts)
    if name in excluded or not any(c.isalpha() for c in name):
        return None
    return name if len(parts) > 1 or "_" in parts[-1].strip("_") else None


def _lean_piece(text: str, line_start: bool, local: set[str], tactics: set[str], terms: list[str]) -> None:
    text = text.lstrip(" \t([{")  # a bracket at the start opens a tactic group: (simp; ring), <;> [a; b]
    m = _TACTIC_NAME.match(text)
    if m:
        name, rest = m[1], text[m.end():]
        unknown_ok = (line_start and name[0].isascii() and name[0].islower() and name not in local
                      and name not in _LEAN_KEYWORDS and (not rest or rest[0].isspace()))
        if name in _LEAN_TACTICS or unknown_ok:
            tactics.add(name)
            if name in _LEAN_COMBINATORS:  # `all_goals positivity`, `iterate 2 rw [h]`
                _lean_piece(re.sub(r"^\s*\d+", "", rest), line_start, local, tactics, terms)
            else:
                terms.append(rest)
            return
    terms.append(text)


def _lean_lemmas_and_tactics(source: str) -> tuple[set[str], set[str]]:
    source = re.sub(r"--[^\n]*", "", source)
    previous = None
    while previous != source:  # nested block comments, innermost first
        previous, source = source, re.sub(r"/-(?:(?!/-|-/).)*-/", " ", source, flags=re.S)
    source = re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', source)
    decls = list(_LEAN_DECL.finditer(source))
    declared = {m[2] for m in decls if m[2]}
    lemmas: set[str] = set()
    tactics: set[str] = set()
    for d, nxt in zip(decls, [*decls[1:], None], strict=True):
        if d[1] not in ("theorem", "lemma", "example"):
            continue
        chunk = source[d.end():nxt.start() if nxt else len(source)]
        assign = _top_level_assign(chunk)
        if assign < 0:
            continue
        header, body = chunk[:assign], chunk[assign + 2:]
        command = _LEAN_COMMAND.search(body)
        body = body[:command.start()] if command else body
        tactic_mode = body.lstrip().startswith("by")
        lines = [_strip_types(line) for line in _logical_lines(body)]
        local = _lean_locals(header, lines)
        terms: list[str] = []
        for line in lines:
            line_start = tactic_mode
            for piece in _LEAN_SEPARATOR.split(line):
                if piece in ("·", "•"):
                    continue  # a focusing dot keeps the next piece at the start of the tactic line
                if _LEAN_SEPARATOR.fullmatch(piece):
                    line_start = False
                elif piece.strip():
                    _lean_piece(piece, line_start, local, tactics, terms)
                    line_start = False
        excluded = _LEAN_KEYWORDS | _LEAN_TACTICS | declared
        lemmas.update(n for t in terms for i in _idents(t) if (n := _lemma_name(i, local, excluded)))
    return lemmas, tactics


_ROCQ_TACTICS = frozenset("""
apply assert assumption auto autorewrite case case_eq cbn cbv change clear compute congruence constructor
contradiction cut decide destruct discriminate do eapply eassumption eauto easy econstructor eexact eexists elim
enough epose erewrite exact exfalso exists f_equal field field_simplify first firstorder fold generalize hnf
induction injection intro intros intuition inversion inversion_clear lazy left lia lra nia now nra omega pattern
pose progress psatz red refine reflexivity remember rename repeat replace revert rewrite right ring ring_simplify
set setoid_rewrite simpl solve specialize split subst symmetry tauto transitivity trivial try unfold vm_compute
""".split())
_ROCQ_TWO_WORDS = re.compile(r"(pose proof|epose proof|simple apply|simple eapply)(?![\w'])")
_ROCQ_TACTICALS = frozenset({"try", "repeat", "now", "progress", "do", "solve", "first", "abstract", "timeout"})
# Tactics whose argument names the lemma it uses (up to `in`, `as`, `at`, `by`, `with`, `eqn:`, `using`).
_ROCQ_LEMMA_TACTICS = frozenset({"apply", "eapply", "simple apply", "simple eapply", "exact", "eexact", "refine",
                                 "rewrite", "erewrite", "setoid_rewrite", "pose proof", "epose proof", "specialize",
                                 "destruct", "case", "elim", "induction"})
_ROCQ_CASE_TACTICS = frozenset({"destruct", "case", "elim", "induction"})
_ROCQ_KEYWORDS = frozenset("in as at by with eqn using fun forall exists let match end if then else".split())
_ROCQ_IDENT = re.compile(r"(?<![\w'.])[A-Za-z_][\w']*(?:\.[A-Za-z_][\w']*)*")
_ROCQ_PROOF = re.compile(r"\bProof\b[^.]*\.(?=\s)(.*?)\b(?:Qed|Defined|Admitted|Abort)\s*\.", re.S)
_ROCQ_DECL = re.compile(r"\b(?:Theorem|Lemma|Fact|Remark|Corollary|Proposition|Example|Definition|Fixpoint)\s+([\w']+)")
_ROCQ_SEPARATOR = re.compile(r"(;|\|\||\||(?<![\w'.])by(?![\w']))")
_ROCQ_ARGS_END = re.compile(r"(?<![\w'.])(?:in|as|at|by|with|eqn|using)(?![\w'])")


def _rocq_locals(statement: str, proof: str) -> set[str]:
    names = {n for m in re.finditer(r"[({]\s*([^:(){}]+?)\s*:(?!=)", statement) for n in _ROCQ_IDENT.findall(m[1])}
    for m in re.finditer(r"\b(?:forall|exists|fun)\b(.*?)(?:,|=>)", statement, re.S):
        names.update(_ROCQ_IDENT.findall(re.sub(r":[^()]*", "", m[1])))
    for m in re.finditer(r"\b(?:intros?|as)(?![\w'])([^.;]*)", proof):  # `intros x H`, `as [x Hx]`
        names.update(_ROCQ_IDENT.findall(_ROCQ_ARGS_END.split(m[1])[0]))
    names.update(re.findall(r"\beqn:\s*([\w']+)", proof))
    names.update(re.findall(r"\b(?:assert|set|pose|enough|cut)\s*\(\s*([\w']+)\s*:", proof))
    return names - _ROCQ_KEYWORDS


def _rocq_piece(text: str, sentence_start: bool, local: set[str], tactics: set[str], lemmas: set[str],
                excluded: frozenset[str] | set[str]) -> None:
    text = text.lstrip(" \t\n([")
    m = _ROCQ_TWO_WORDS.match(text) or re.match(r"([a-z_][\w']*)(?![\w'.])", text)
    if not m or not (m[1] in _ROCQ_TACTICS or m[1] in _ROCQ_LEMMA_TACTICS or sentence_start):
        return
    name, rest = m[1], text[m.end():]
    tactics.add(name)
    if name in _ROCQ_TACTICALS:  # `now apply foo`, `do 2 rewrite H`
        _rocq_piece(re.sub(r"^\s*\d+", "", rest), sentence_start, local, tactics, lemmas, excluded)
        return
    args = [_ROCQ_ARGS_END.split(rest)[0]] if name in _ROCQ_LEMMA_TACTICS else []
    args += [u[1] for u in re.finditer(r"\busing\b(.*?)(?=\bwith\b|$)", rest, re.S)]  # auto using foo, bar
    names = {n for a in args for i in _ROCQ_IDENT.findall(a) if (n := _lemma_name(i, local, excluded))}
    if name in _ROCQ_CASE_TACTICS:  # `destruct (Rle_dec a b)` uses a lemma, `destruct (Nat.even n)` a function
        names = {n for n in names if "_" in n.rsplit(".", 1)[-1]}
    lemmas.update(names)


def _rocq_lemmas_and_tactics(source: str) -> tuple[set[str], set[str]]:
    previous = None
    while previous != source:  # nested comments, innermost first
        previous, source = source, re.sub(r"\(\*(?:(?!\(\*|\*\)).)*\*\)", " ", source, flags=re.S)
    source = re.sub(r'"[^"]*"', '""', source)
    decls = list(_ROCQ_DECL.finditer(source))
    excluded = _ROCQ_KEYWORDS | _ROCQ_TACTICS | {m[1] for m in decls}
    lemmas: set[str] = set()
    tactics: set[str] = set()
    for proof in _ROCQ_PROOF.finditer(source):
        start = max((d.start() for d in decls if d.start() < proof.start()), default=0)
        local = _rocq_locals(source[start:proof.start()], proof[1])
        for sentence in re.split(r"\.(?=\s|$)", proof[1]):
            # goal selectors (`all:`, `2:`) and bullets (`-`, `+`, `*`, braces) are not tactics
            sentence = re.sub(r"^[\s\-+*{}]*(?:(?:all|\d+)\s*:(?!=))?", "", sentence)
            sentence_start = True
            for piece in _ROCQ_SEPARATOR.split(sentence):
                if _ROCQ_SEPARATOR.fullmatch(piece):
                    sentence_start = False
                elif piece.strip():
                    _rocq_piece(piece, sentence_start, local, tactics, lemmas, excluded)
                    sentence_start = False
    return lemmas, tactics


def lemmas_and_tactics(source: str, prover: str) -> tuple[set[str], set[str]]:
    """(lemmas, tactics) named in a proof file: a transparent heuristic, not a parser; expect some noise.

    Lean (`prover="lean"`), per `theorem`/`lemma`/`example`, after dropping comments:
    - tactic steps are the pieces of the proof split on newlines (lines with open brackets
      or ending in `:=`, `,` or an operator continue on the next), `;`, `<;>`, `·`, `=>`,
      `|`, `by`; a step's tactic is its first identifier if it is a known Lean 4/Mathlib
      tactic, or, at the start of a tactic line, any lowercase identifier followed by
      whitespace that is not a local name; `try`/`all_goals`/`repeat`... count with the
      tactic they wrap;
    - lemmas are the qualified (`Nat.succ_le_iff`) or snake_case (`sq_nonneg`) identifiers
      in the terms of the proof (tactic arguments, `exact`/`apply` terms, `nlinarith [...]`
      hints, simp and rw lists), types removed (`have h : T :=`, `(e : T)`, `show T`, calc
      relations), less local names (theorem binders, `intro`, `obtain`, `rcases ... with`,
      `have name`, `fun x =>`...), projections of locals (`h.le`), keywords, tactic names
      and names declared in the file; `.mp`, `.mpr`, `.1`, `.symm`... are cut off
      (`abs_lt.mp` is `abs_lt`). Definitions used as terms (`Real.sqrt` in `simp [Real.sqrt]`)
      count too: without Mathlib we cannot tell a lemma from a definition.

    Rocq (`prover="rocq"`), inside `Proof. ... Qed.` (or `Defined.`):
    - tactics are the first word of each sentence (after bullets and goal selectors) and
      the known tactics after `;`, `|`, `||` and `by` (`assert (H : ...) by lra`); two-word
      tactics `pose proof` and `simple apply` count as one; tacticals count with what they wrap;
    - lemmas are the qualified or snake_case identifiers in the arguments of `apply`,
      `exact`, `rewrite`, `pose proof`, `specialize`, `destruct`, ... (up to `in`, `as`,
      `by`, ...) and in `using` lists (`auto using foo`), less hypotheses named by `intros`,
      `as`, `assert (H : ...)` and the statement's binders. (`lra` and `nra` take no hints.)
    """
    if prover == "lean":
        return _lean_lemmas_and_tactics(source)
    if prover == "rocq":
        return _rocq_lemmas_and_tactics(source)
    raise ValueError(f"unknown prover {prover!r}; expected 'lean' or 'rocq'")


class DistinctTracker:
    """Cumulative distinct lemmas and tactics over the correct proofs seen so far (the paper's figure 3)."""

    def __init__(self) -> None:
        self.lemmas: set[str] = set()
        self.tactics: set[str] = set()

    def update(self, episodes: Iterable[Episode]) -> dict[str, int]:
        for episode in episodes:
            source = proof_source(episode) if episode.solved else None
            if source is not None:
                lemmas, tactics = lemmas_and_tactics(source, episode.prover)
                self.lemmas |= lemmas
                self.tactics |= tactics
        return {"distinct_lemmas": len(self.lemmas), "distinct_tactics": len(self.tactics)}

    def state_dict(self) -> dict[str, list[str]]:
        return {"lemmas": sorted(self.lemmas), "tactics": sorted(self.tactics)}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        self.lemmas, self.tactics = set(state["lemmas"]), set(state["tactics"])


# -- per-step rollout metrics ---------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def rollout_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Means over one step's episodes; epistemic counts are per 1,000 generated tokens of the whole batch.

    `train/turns` and `train/tool_errors` are tool calls and failed tool calls per episode;
    `train/finish/<reason>` is the fraction of episodes that ended for that reason (every
    reason is reported, so charts have no gaps); `time/<phase>` is the mean of each phase
    the episodes timed, and `time/feedback_s` that of the episodes that got feedback.
    """
    if not episodes:
        raise ValueError("rollout_metrics needs at least one episode")
    rewards = [e.reward for e in episodes]
    mean_reward = _mean(rewards)
    tokens = sum(e.num_generated for e in episodes)
    out = {
        "train/accuracy": mean_reward,
        "train/reward_mean": mean_reward,
        "train/reward_std": math.sqrt(_mean([(r - mean_reward) ** 2 for r in rewards])),
        "train/response_tokens": tokens / len(episodes),
        "train/turns": _mean([len(e.tool_calls) for e in episodes]),
        "train/tool_errors": _mean([sum(c.is_error for c in e.tool_calls) for e in episodes]),
    }
    reasons = dict.fromkeys([*get_args(FinishReason), *(e.finish_reason for e in episodes)])
    out.update({f"train/finish/{r}": _mean([e.finish_reason == r for e in episodes]) for r in reasons})
    counts = epistemic_counts(t for e in episodes for t in assistant_texts(e))
    per_1k = 1000.0 / tokens if tokens else 0.0
    out.update({f"epistemic/{w}": n * per_1k for w, n in counts.items()})
    out["epistemic/total"] = sum(counts.values()) * per_1k
    for phase in sorted({k for e in episodes for k in e.timings}):
        out[f"time/{phase}"] = _mean([e.timings[phase] for e in episodes if phase in e.timings])
    feedback = [e.feedback.elapsed_s for e in episodes if e.feedback is not None]
    if feedback:
        out["time/feedback_s"] = _mean(feedback)
    return out


# -- the metrics log ------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN or Infinity
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


class MetricsLogger:
    """One JSON line `{"step": step, **metrics}` per `log` call, appended and flushed; optionally wandb too.

    The JSONL file is the record that nothing else depends on; non-finite floats are
    written as null. With `wandb_project`, the same metrics go to a wandb run (offline
    unless `wandb_mode="online"`) kept beside the file.
    """

    def __init__(self, path: str | Path, *, wandb_project: str | None = None, wandb_mode: str = "offline",
                 config: dict | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._run = None
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise ImportError("wandb logging was asked for (wandb_project is set) but wandb is not installed: "
                                  "pip install wandb, or leave wandb_project unset") from None
            # named after the run directory, as in `trainer.plot`, so that synced runs are recognisable
            self._run = wandb.init(project=wandb_project, mode=wandb_mode, config=config or {},
                                   dir=str(self.path.parent), name=self.path.parent.name)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if "step" in metrics:
            raise ValueError("'step' is the log's own key; pass the step as the first argument")
        record = _json_value({"step": int(step), **metrics})
        self._file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()
        if self._run is not None:
            self._run.log(dict(metrics), step=int(step))

    def close(self, exit_code: int = 0) -> None:
        """`exit_code` != 0 marks the wandb run as failed (a crashed training run does not look finished)."""
        if not self._file.closed:
            self._file.close()
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
