"""Rocq text handling without a prover: the lexer's view of comments and sentences, the generated
statement check, and the strict parsers of what coqc, coqtop and coqchk print."""

import pytest

from env.problems import Problem
from env.provers.rocq_text import (
    LineIndex,
    check_source,
    header_requires,
    is_stateful,
    open_at_end,
    parse_assumptions,
    parse_context_summary,
    parse_messages,
    parse_toplevel,
    split_sentences,
    statement_prop,
    strip_comments,
    uses_cheat_words,
)


def test_strip_comments_keeps_code_and_lines():
    src = 'Theorem a : True. (* Admitted (* nested *) *)\nProof. idtac "admit". exact I. Qed.'
    stripped = strip_comments(src)
    assert "Admitted" not in stripped and "admit" not in stripped and stripped.count("\n") == 1
    assert "exact I" in stripped and len(stripped) == len(src)


def test_a_string_inside_a_comment_is_lexed_as_coq_does():
    # Coq reads `" *) "` inside the comment as a string, so the comment ends at the second `*)`:
    # `Admitted.` is code. A lexer that ignores strings in comments would hide it in a string.
    src = '(* " *) " *) Admitted.'
    assert "Admitted" in strip_comments(src) and uses_cheat_words(src)
    assert not uses_cheat_words('(* " *) Admitted. " *)')  # here all of it is one comment
    assert not uses_cheat_words('idtac "say ""Admitted"" twice".')  # "" is an escaped quote


def test_open_at_end():
    assert open_at_end("x. (* open") == "a comment"
    assert open_at_end('x. (* " *) ') == "a string"
    assert open_at_end('x "abc') == "a string"
    assert open_at_end('x "a""b" (* (* *) *) y.') == ""


def test_split_sentences():
    src = "Require Import Reals.\nTheorem t : True.\nProof.\n- { exact I. }\n  idtac. Qed."
    chunks = split_sentences(src).chunks
    texts = [src[a:b] for a, b in chunks]
    assert texts == ["Require Import Reals.", "\nTheorem t : True.", "\nProof.", "\n-", " {", " exact I.", " }",
                     "\n  idtac.", " Qed."]
    assert "".join(texts) == src
    braces = "Goal True. exact I. }"
    assert [braces[a:b] for a, b in split_sentences(braces).chunks][-1] == " }"
    assert split_sentences("Check (1, .. , 2). Check Nat.add.").chunks[0] == (0, 18)  # `..` ends nothing
    selected = "split. 2: { exact I. } all: exact I."
    assert [selected[a:b] for a, b in split_sentences(selected).chunks] == \
        ["split.", " 2: {", " exact I.", " }", " all: exact I."]
    assert "final '.'" in split_sentences("Goal True. exact I. Qed").error
    assert "inside a comment" in split_sentences("Goal True. (* exact I.").error
    assert split_sentences('Check "a. b". Check 1.').chunks == ((0, 13), (13, 22))


def test_header_requires():
    header = ("Require Import Reals Lra.\n(* Require Import Nope. *)\nFrom Coquelicot Require Import\n Coquelicot.\n"
              "Open Scope R_scope.\nDefinition f := 1.\n")
    assert header_requires(header) == ("Require Import Reals Lra.", "From Coquelicot Require Import Coquelicot.")


def test_stateful_words_are_found_anywhere():
    assert is_stateful('Cd "/tmp".') and is_stateful('(* Declare ML Module *) Goal True.')
    assert is_stateful('Redirect "x" Print nat.') and not is_stateful("Require Import Reals.\nGoal True. lra.")


PROBLEM = Problem(name="p", prover="rocq", header="Require Import Reals.\nOpen Scope R_scope.\n",
                  formal_statement="Theorem p (x y : R) (h : 0 < x) (* a: comment *) :\n  x * y = y * x.\nProof.")


@pytest.mark.parametrize("statement, prop", [
    (PROBLEM.formal_statement, "forall (x y : R) (h : 0 < x), x * y = y * x"),
    ("Theorem p : forall n : nat, n + 0 = n.\nProof.", "forall n : nat, n + 0 = n"),
    ("Lemma p {A : Type} (l : list A) : length l = length l.\nProof.",
     "forall {A : Type} (l : list A), length l = length l"),
    ("Theorem p (f := fun x : nat => x) : f 0 = 0.\nProof.", "forall (f := fun x : nat => x), f 0 = 0"),
])
def test_statement_prop(statement, prop):
    got = statement_prop(Problem(name="p", prover="rocq", header="", formal_statement=statement))
    assert " ".join(got.split()) == " ".join(prop.split())


def test_statement_prop_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="does not start with"):
        statement_prop(Problem(name="p", prover="rocq", header="", formal_statement="Theorem q : True.\nProof."))
    with pytest.raises(ValueError, match="no ':'"):
        statement_prop(Problem(name="p", prover="rocq", header="", formal_statement="Theorem p True.\nProof."))


def test_check_source_elaborates_the_statement_before_loading_the_attempt():
    text = check_source(PROBLEM)
    assert text.startswith(PROBLEM.header)
    assert text.index("Definition __fd_statement__") < text.index("Require FdAttempt.")
    assert "Definition __fd_check__ : __fd_statement__ := __fd_found__." in text
    assert "Definition __fd_found__ := @FdAttempt.p." in text
    assert text.count("Redirect") == 3 and "Import FdAttempt" not in text


def test_parse_messages_of_coqc():
    out = ('File "./FdAttempt.v", line 3, characters 2-5:\nWarning: foo\nbar\n'
           'File "./FdAttempt.v", line 7, characters 0-4:\nError: Syntax error.\n')
    warning, error = parse_messages(out)
    assert (warning.severity, warning.line, warning.column, warning.text) == ("warning", 3, 3, "foo\nbar")
    assert (error.severity, error.line, error.text) == ("error", 7, "Syntax error.")
    assert parse_messages("Error: no location\n") == (parse_messages("Error: no location")[0],)
    assert parse_messages("Error: no location")[0].line == 0


def test_parse_messages_is_linear_on_a_flood_of_headers():
    flood = "Warning: x\n" * 40_000  # quadratic parsing took about 50 s on such output
    messages = parse_messages(flood)
    assert len(messages) == 40_000 and messages[-1].text == "x"


SOURCE = "Require Import Reals.\nGoal True.\n\n  (* c *) idtac \"x\"; lia.\nQed."
LINE = '  (* c *) idtac "x"; lia.'
CHUNK_START = SOURCE.index("\n\n  (* c")  # the chunk as fed: it begins right after the previous period


def toplevel_error(offset: int) -> str:
    """What coqtop prints for an error on `lia` reported at `offset` characters."""
    caret = " " * LINE.index("lia") + "^^^"
    return (f"Toplevel input, characters {offset}-{offset + 3}:\n> {LINE}\n> {caret}\n"
            "Error: The reference lia was not found in the current environment.\n\n"
            "<prompt>Unnamed_thm < 4 |Unnamed_thm| 0 < </prompt>")


def test_parse_toplevel_locates_errors_in_the_file():
    offset = SOURCE.index("lia") - CHUNK_START  # coqtop counts from the start of the chunk's first line
    (error,) = parse_toplevel(toplevel_error(offset), SOURCE, CHUNK_START, len(SOURCE) - 4, LineIndex(SOURCE))
    assert (error.severity, error.line) == ("error", 4)
    assert error.text == "The reference lia was not found in the current environment."
    assert SOURCE.splitlines()[error.line - 1][error.column - 1:].startswith("lia")


def test_parse_toplevel_falls_back_to_the_echoed_line():
    (error,) = parse_toplevel(toplevel_error(90), SOURCE, CHUNK_START, len(SOURCE) - 4, LineIndex(SOURCE))
    assert error.line == 4 and SOURCE.splitlines()[3][error.column - 1:].startswith("lia")


def test_parse_toplevel_keeps_printed_output_as_info():
    output = ("<infomsg>hello</infomsg>\n\n<prompt>Coq < 3 || 0 < </prompt>Rplus_comm\n     : forall r1 r2 : R, "
              "r1 + r2 = r2 + r1\n\n<prompt>Coq < 4 || 0 < </prompt>")
    (info,) = parse_toplevel(output, "Check Rplus_comm.", 0, 17, LineIndex("Check Rplus_comm."))
    assert info.severity == "info" and info.text.startswith("hello\n") and "prompt" not in info.text
    forged = "<infomsg>Error: Out of memory.</infomsg>\n<prompt>Coq < 3 || 0 < </prompt>"
    assert [m.severity for m in parse_toplevel(forged, "idtac.", 0, 6, LineIndex("idtac."))] == ["info"]


def test_line_index():
    lines = LineIndex("ab\ncd\n\ne")
    assert [(lines.line(p), lines.column(p)) for p in (0, 1, 2, 3, 6, 7)] == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1),
                                                                             (4, 1)]


def test_parse_assumptions():
    printed = ("Axioms:\nClassicalDedekindReals.sig_forall_dec\n  : forall P : nat -> Prop,\n"
               "    (forall n : nat, {P n} + {~ P n}) -> {n : nat | ~ P n} + {forall n : nat, P n}\n"
               "FdAttempt.magic : False\n")
    assert parse_assumptions(printed) == ("ClassicalDedekindReals.sig_forall_dec", "FdAttempt.magic")
    assert parse_assumptions("Closed under the global context\n") == ()
    assert parse_assumptions("Axioms:\nFdAttempt.bad is assumed to be positive.\nx : nat\n") is None
    assert parse_assumptions("Axioms:\nClosed under the global context\n") is None
    assert parse_assumptions("nothing") is None and parse_assumptions("") is None


SUMMARY = """
CONTEXT SUMMARY
===============

* Theory: Set is predicative
  
* Axioms:
    Coq.Logic.Classical_Prop.classic
    FdAttempt.magic
  
* Constants/Inductives relying on type-in-type: <none>
  
* Constants/Inductives relying on unsafe (co)fixpoints:
    FdAttempt.loop
  
* Inductives whose positivity is assumed: <none>
  
"""


def test_parse_context_summary():
    summary = parse_context_summary(SUMMARY)
    assert summary.axioms == ("Coq.Logic.Classical_Prop.classic", "FdAttempt.magic")
    assert summary.unsafe_fixpoints == ("FdAttempt.loop",) and summary.type_in_type == ()
    assert summary.unsafe() == ["FdAttempt.loop relies on unchecked (co)fixpoints"]


@pytest.mark.parametrize("broken", [
    SUMMARY.replace("* Inductives whose positivity is assumed: <none>\n", ""),  # a section missing
    SUMMARY.replace("    FdAttempt.magic", "    FdAttempt.magic is fine"),  # not a name
    SUMMARY.replace("* Theory: Set is predicative", "* Theory: Set is predicative\n* Theory: again"),
    SUMMARY + "something else\n",
    "no summary at all",
])
def test_parse_context_summary_refuses_anything_else(broken):
    assert parse_context_summary(broken) is None


def test_a_different_theory_is_unsafe():
    summary = parse_context_summary(SUMMARY.replace("Set is predicative", "Set is impredicative"))
    assert any("not the standard one" in note for note in summary.unsafe())


M = "\0"  # how a masked character reads


@pytest.mark.parametrize("source, masked", [
    ("(*a*)b", M * 5 + "b"),
    ("(**)x", M * 4 + "x"),
    ("x(*(*y*)z*)w", "x" + M * 10 + "w"),  # comments nest
    ("(*\n*)", M * 2 + "\n" + M * 2),  # lines are kept
    ('"" x', M * 2 + " x"),
    ('"a""b" c', M * 6 + " c"),  # "" is an escaped quote
    ('"a""" x', M * 5 + " x"),
    ('"a" x "b"', M * 3 + " x " + M * 3),
    ('(* "*)" *)x', M * 10 + "x"),  # a string inside a comment hides its *)
    ('a"b', "a" + M * 2),  # a string that never closes masks the rest
])
def test_mask_comments(source, masked):
    from env.provers.rocq_text import mask_comments

    assert mask_comments(source) == masked


def test_open_at_end_follows_nesting_and_escapes():
    assert open_at_end("(* (* *)") == "a comment" and open_at_end('""') == "" and open_at_end('"a""') == "a string"
    assert open_at_end('(* "*) ') == "a string" and open_at_end("(* *) *)") == ""


def test_split_sentences_edges():
    assert split_sentences(".. x.").chunks == ((0, 5),)  # `..` is no period
    assert split_sentences(". a.").chunks == ((0, 1), (1, 4))
    tail = split_sentences("Check x. (* a comment at the end *)")
    assert tail.error == "" and tail.chunks == ((0, 8),)
    assert split_sentences("Check x. y").chunks == ((0, 8),)


@pytest.mark.parametrize("statement, prop", [
    ("Theorem p: True.\nProof.", "True"),
    ("Theorem p :True.\nProof.", "True"),
    ("Theorem p (f : (nat -> nat)) (h : f 0 = 0) : f 0 = 0.\nProof.",
     "forall (f : (nat -> nat)) (h : f 0 = 0), f 0 = 0"),
])
def test_statement_prop_edges(statement, prop):
    assert statement_prop(Problem(name="p", prover="rocq", header="", formal_statement=statement)) == prop


def test_statement_prop_needs_the_final_period():
    with pytest.raises(ValueError, match="the statement of p does not end with '.'"):
        statement_prop(Problem(name="p", prover="rocq", header="", formal_statement="Theorem p : True\nProof."))


def test_one_letter_axiom_names_are_entries():
    assert parse_assumptions("Axioms:\nA : nat\nB\n  : nat\n") == ("A", "B")


def test_every_unsafe_kind_is_named():
    summary = parse_context_summary(SUMMARY.replace(
        "type-in-type: <none>", "type-in-type:\n    FdAttempt.U").replace(
        "positivity is assumed: <none>", "positivity is assumed:\n    FdAttempt.bad"))
    assert summary.unsafe() == ["FdAttempt.U relies on type-in-type",
                                "FdAttempt.loop relies on unchecked (co)fixpoints",
                                "FdAttempt.bad is an inductive whose positivity was not checked"]
