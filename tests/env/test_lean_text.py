"""Lean source handling and REPL output parsing, with no toolchain (`env.provers.lean_text`)."""

import subprocess
import sys
from pathlib import Path

import pytest

from env.problems import Problem
from env.provers import lean_text as lt
from env.provers.base import Message
from tests.env.conftest import LEAN_HEADER, LEAN_PROBLEM

HEADER, PROBLEM = LEAN_HEADER, LEAN_PROBLEM


# --- comments -----------------------------------------------------------------------------------------------------

def test_mask_comments_blanks_line_and_nested_block_comments_keeping_positions():
    text = "a -- note\nb /- x /- nested -/ still -/ c\nd"
    masked = lt.mask_comments(text)
    assert len(masked) == len(text) and masked.count("\n") == 2
    assert masked.split() == ["a", "b", "c", "d"]


def test_comment_markers_inside_strings_chars_and_guillemets_are_not_comments():
    text = 's := "-- not /- a comment" ++ \'-\' ++ «--x» -- real'
    masked = lt.mask_comments(text)
    assert '"-- not /- a comment"' in masked and "«--x»" in masked and "'-'" in masked
    assert "real" not in masked
    assert lt.comment_spans("h' -- c\n") == [(3, 7)]  # a prime in a name is not a char literal


def test_unterminated_block_comment_runs_to_the_end():
    assert lt.mask_comments("x /- open\nforever").strip() == "x"


# --- imports and positions ------------------------------------------------------------------------------------------

def test_split_imports_of_a_problem_file():
    source = lt.render(PROBLEM)
    split = lt.split_imports(source)
    assert split.imports == ("Mathlib", "Aesop")
    assert source == "import Mathlib\nimport Aesop" + split.body
    assert (split.line_offset, split.column_offset) == (1, 12)
    # body line 3 is "set_option ..." at file line 4; REPL columns are 0-based, ours 1-based
    assert split.body.split("\n")[2].startswith("set_option")
    assert split.file_position(3, 0) == (4, 1)
    assert split.file_position(1, 2) == (2, 15)  # the rest of the last import line
    assert split.file_position(0, 0) == (0, 0)


def test_split_imports_skips_leading_comments_and_blank_lines():
    source = ("-- a comment\n/- block\ncomment -/\n\nimport Mathlib.Tactic  -- trailing\nimport «Aesop»\n"
              "theorem t : True := trivial\n")
    split = lt.split_imports(source)
    assert split.imports == ("Mathlib.Tactic", "Aesop")
    assert split.body == "\ntheorem t : True := trivial\n"
    assert split.line_offset == 5


def test_split_imports_without_imports_and_with_a_module_doc_first():
    assert lt.split_imports("theorem t : True := trivial") == lt.FileSplit((), "theorem t : True := trivial", 0, 0)
    doc_first = "/-! module doc -/\nimport Mathlib\n"
    assert lt.split_imports(doc_first).imports == ()  # Lean rejects this order; the REPL will say so
    assert lt.split_imports("importance\n").imports == ()


def test_imports_command():
    assert lt.imports_command(("Mathlib", "Aesop")) == "import Mathlib\nimport Aesop\n"
    assert lt.imports_command(()) == "-- no imports\n"


# --- rendering ------------------------------------------------------------------------------------------------------

def test_render_uses_the_reference_proof_or_sorry():
    assert lt.render(PROBLEM) == HEADER + PROBLEM.formal_statement + "\n  linarith"
    bare = Problem(PROBLEM.name, "lean", HEADER, PROBLEM.formal_statement)
    assert lt.render(bare).endswith(":= by\n  sorry")


def test_render_indents_a_model_proof_like_formal_proof():
    assert lt.render(PROBLEM, "nlinarith [sq_nonneg x]\n\nlinarith").endswith(
        ":= by\n  nlinarith [sq_nonneg x]\n\n  linarith")
    assert lt.render(PROBLEM, "\n  norm_num") == HEADER + PROBLEM.formal_statement + "\n  norm_num"
    assert lt.format_proof("constructor\n· simp\n· ring") == "\n  constructor\n  · simp\n  · ring"


# --- the reference's statement ------------------------------------------------------------------------------------

def test_declares_finds_the_theorem_name_outside_comments():
    assert lt.declares(PROBLEM.formal_statement, "fd_lean_linear_eq_1")
    assert lt.declares("lemma Foo.bar : (1 : ℕ) + 1 = 2 := by", "Foo.bar")
    assert lt.declares("theorem t' : True := by", "t'")
    assert not lt.declares("theorem t' : True := by", "t")
    assert not lt.declares("theorem t2 : True := by", "t")
    assert not lt.declares("theorem t.sub : True := by", "t")
    assert not lt.declares("-- theorem t : True\ndef t : Prop := True", "t")


# --- sorry ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "expected"), [
    ("theorem t : 1 = 1 := by\n  sorry", True),
    ("theorem t : 1 = 1 := by\n  admit", True),
    ("theorem t : 1 = 1 := by exact (sorry)", True),
    ("theorem t : 1 = 1 := by\n  rfl -- no sorry here", False),
    ("theorem t : 1 = 1 := by\n  /- sorry, admit -/ rfl", False),
    ("theorem t : 1 = 1 := by\n  exact sorry_free_lemma", False),
    ("theorem t : 1 = 1 := by\n  exact h.admits", False),
])
def test_text_uses_sorry(source, expected):
    assert lt.text_uses_sorry(source) is expected


def test_uses_sorry_from_repl_sorries_and_warnings():
    clean = "theorem t : 1 = 1 := by\n  rfl"
    sorry_entry = {"pos": {"line": 2, "column": 2}, "endPos": {"line": 2, "column": 7}, "goal": "⊢ 1 = 1",
                   "proofState": 0}
    warning = {"severity": "warning", "pos": {"line": 1, "column": 8}, "endPos": {"line": 1, "column": 9},
               "data": "declaration uses 'sorry'"}
    assert lt.uses_sorry(clean, [sorry_entry], [])
    assert lt.uses_sorry(clean, [], [warning])
    assert lt.uses_sorry(clean, [], [{**warning, "data": "declaration uses `sorry`"}])
    assert not lt.uses_sorry(clean, [], [{**warning, "data": "unused variable `h`"}])


# --- blocked constructs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("line", "construct"), [
    ("set_option debug.skipKernelTC true in", "debug.skipKernelTC"),
    ("set_option «debug».«skipKernelTC» true", "debug.skipKernelTC"),
    ("run_cmd Lean.addDeclWithoutChecking decl", "run_cmd"),
    ("@[implemented_by myImpl] def f (n : ℕ) : Bool := true", "implemented_by"),
    ('@[extern "lean_nat_add"] def g (n : ℕ) : ℕ := n', "extern"),
    ("unsafe def h : ℕ := unsafeCast ()", "unsafe"),
    ("#eval 2 ^ 10", "#eval"),
    ("#eval! 2 ^ 10", "#eval"),
    ("example : True := by run_tac pure ()", "run_tac"),
    ('macro "trivial" : tactic => `(tactic| sorry)', "macro"),
    ("elab (priority := high) \"#print\" \"axioms\" : command => pure ()", "elab"),
    ("syntax \"#print\" : command", "syntax"),
    ("attribute [command_elab Lean.Parser.Command.print] fake", "attribute [command_elab"),
    ("run_cmd Lean.modifyEnv (Lean.Environment.addDeclCore · 0 d none false |>.toOption.get!)", "run_cmd"),
    ("#check (Lean.Environment.addDeclCore)", "addDeclCore"),  # a qualified name is still the name
    ("@[tactic Lean.Parser.Tactic.decide] def fdDecide : Lean.Elab.Tactic.Tactic := fun _ => pure ()", "@[tactic"),
    ("@[simp, delab app.Nat.succ] def fdDelab : Lean.PrettyPrinter.Delaborator.Delab := failure",
     "@[simp, delab"),
    ("attribute [norm_num Nat.add _ _] myExt", "attribute [norm_num"),
    ("@[positivity Real.sqrt _] def fdPos : Mathlib.Meta.Positivity.PositivityExt := sorry", "@[positivity"),
    ("simproc fdProc (Nat.succ _) := fun _ => pure .continue", "simproc"),
])
def test_blocked_constructs_are_found_with_their_position(line, construct):
    source = HEADER + line + "\n" + PROBLEM.formal_statement + "\n  linarith"
    blocks = lt.blocked_constructs(source)
    assert [b.construct for b in blocks][:1] == [construct]
    block = blocks[0]
    assert block.line == HEADER.count("\n") + 1
    assert line.replace("«", "").replace("»", "")[block.column - 1:].startswith(construct) or "«" in line
    message = block.message()
    assert message.severity == "error" and construct in message.text and "not allowed" in message.text


def test_honest_files_and_comments_are_not_blocked():
    assert lt.blocked_constructs(lt.render(PROBLEM)) == []
    commented = HEADER + "-- no unsafe code, no #eval, no macro\n" + PROBLEM.formal_statement + "\n  linarith"
    assert lt.blocked_constructs(commented) == []
    names = HEADER + "open Lean.Elab in\n" + PROBLEM.formal_statement + "\n  exact unsafe_free h₀"
    assert lt.blocked_constructs(names) == []


def test_comments_are_scanned_too_when_the_file_has_strings():
    # an interpolated string can hold code, so a misread comment boundary must not hide anything
    source = 'example : True := by\n  trivial\n#check s!"{"--"}" -- unsafe\n'
    assert [b.construct for b in lt.blocked_constructs(source)] == ["unsafe"]


# --- REPL messages --------------------------------------------------------------------------------------------------

def test_message_from_repl_shifts_body_positions_to_the_file():
    split = lt.split_imports(lt.render(PROBLEM))
    repl = {"severity": "error", "pos": {"line": 8, "column": 2}, "endPos": {"line": 8, "column": 10},
            "data": "linarith failed to find a contradiction\ncase a\nx : ℝ\nh₀ : 3 * x + 7 = 22\na✝ : x < 5\n⊢ False"}
    message = lt.message_from_repl(repl, split)
    assert message == Message("error", repl["data"], 9, 3)
    assert lt.render(PROBLEM).split("\n")[message.line - 1] == "  linarith"
    assert message.render("Main.lean").startswith("Main.lean:9:3: error: linarith failed")


def test_message_from_repl_severities_and_missing_positions():
    trace = {"severity": "trace", "pos": {"line": 1, "column": 0}, "endPos": None, "data": "[Meta.synthInstance] ✅"}
    assert lt.message_from_repl(trace).severity == "info"
    info = {"severity": "info", "pos": {"line": 2, "column": 4}, "endPos": {"line": 2, "column": 10},
            "data": "'t' depends on axioms: [propext]\n"}
    assert lt.message_from_repl(info) == Message("info", "'t' depends on axioms: [propext]", 2, 5)
    assert lt.message_from_repl({"severity": "error", "data": "oops"}) == Message("error", "oops", 0, 0)


def test_ordinary_attributes_are_not_blocked():
    source = (HEADER + "@[simp] lemma tactic_free (n : ℕ) : n + 0 = n := rfl\n" + PROBLEM.formal_statement
              + "\n  positivity")
    assert lt.blocked_constructs(source) == []


def test_importing_the_prover_module_needs_no_lean_interact():
    code = ("import sys, env.provers.lean as lean; assert 'lean_interact' not in sys.modules; "
            "assert lean.LeanProver.standard_axioms == {'propext', 'Classical.choice', 'Quot.sound'}")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
