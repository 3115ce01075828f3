/-
The kernel re-check of one compiled attempt; `lake build` links it as `.lake/build/bin/fdcheck`.

    fdcheck ATTEMPT.olean REFERENCE.olean THEOREM RESULT.json

ATTEMPT.olean is the attempt compiled by `lean -o` (in a jail: its code ran there, so
nothing in this file is trusted); REFERENCE.olean is the problem's header and statement
proved by `sorry`, compiled from the problem alone. The answer is the exit status and
RESULT.json (the caller, `env/provers/lean_trusted.py`, reads both):
* 0: the file was replayed; it says whether THEOREM is a theorem the attempt declares,
  whether its statement is the reference's, and the axioms it depends on;
* 2: the kernel rejected a declaration of the attempt (`rejected`);
* 1: the check could not be done (`error`, also on stderr).

How, in the manner of lean4checker and SafeVerify:
* Neither module is imported: their constants are read from the files
  (`readModuleData`), so no initializer, attribute or environment extension of the
  attempt runs. Only their imports are imported: modules of the toolchain and of the
  built packages, found on LEAN_PATH.
* The attempt's imports and the reference's are imported together, so every name the
  statement uses means here what it means in the reference (a second declaration of an
  imported name is an error, in the import or in the kernel).
* Every constant the attempt declares is replayed through the kernel
  (`Environment.replay`): a declaration that was added without a kernel check
  (`debug.skipKernelTC`, `addDeclCore`, an edited environment) is rejected here. Unsafe and
  partial constants are not replayed (nor usable by a theorem: its replay would fail).
* THEOREM must be a theorem that the attempt itself declares, with the reference's type and
  universe parameters, and every constant that type rests on must be the same
  declaration in both (imported, or declared identically, e.g. a `match` auxiliary of the
  statement). Types are compared as `Expr`s (`==`: equal up to binder names and annotations).
* Its axioms come from `CollectAxioms` on the replayed environment; the caller compares
  them with propext, Classical.choice and Quot.sound.

This program has never been run on the machines it was written on (they have no Lean);
it was written against the Lean v4.26.0 APIs as lean4checker and SafeVerify use them.
-/
import Lean

open Lean

namespace FdCheck

/-- A module's constants by name, read from its data. -/
def constantsOf (mod : ModuleData) : Std.HashMap Name ConstantInfo := Id.run do
  let mut map : Std.HashMap Name ConstantInfo := {}
  for name in mod.constNames, info in mod.constants do
    map := map.insert name info
  return map

/-- Whether two declarations of one name say the same thing. Theorems are compared by
statement only: proofs are irrelevant, and the attempt's proof is replayed anyway. -/
def sameDeclaration : ConstantInfo → ConstantInfo → Bool
  | .thmInfo r, .thmInfo a => r.type == a.type && r.levelParams == a.levelParams
  | .defnInfo r, .defnInfo a =>
    r.type == a.type && r.levelParams == a.levelParams && r.value == a.value && r.safety == a.safety
  | .opaqueInfo r, .opaqueInfo a =>
    r.type == a.type && r.levelParams == a.levelParams && r.value == a.value && r.isUnsafe == a.isUnsafe
  | .axiomInfo r, .axiomInfo a => r.type == a.type && r.levelParams == a.levelParams && r.isUnsafe == a.isUnsafe
  | .inductInfo r, .inductInfo a =>
    r.type == a.type && r.levelParams == a.levelParams && r.numParams == a.numParams &&
      r.numIndices == a.numIndices && r.all == a.all && r.ctors == a.ctors && r.isUnsafe == a.isUnsafe
  | .ctorInfo r, .ctorInfo a =>
    r.type == a.type && r.levelParams == a.levelParams && r.induct == a.induct && r.cidx == a.cidx &&
      r.numParams == a.numParams && r.numFields == a.numFields
  | .recInfo r, .recInfo a => r.type == a.type && r.levelParams == a.levelParams
  | _, _ => false

/-- The constants a declaration's meaning rests on: those of its type, and of its value
unless it is a theorem (a proof does not change what is proved); an inductive's constructors. -/
def dependencies : ConstantInfo → List Name
  | .thmInfo v => v.type.getUsedConstants.toList
  | .defnInfo v => (v.type.getUsedConstants ++ v.value.getUsedConstants).toList
  | .opaqueInfo v => (v.type.getUsedConstants ++ v.value.getUsedConstants).toList
  | .inductInfo v => v.type.getUsedConstants.toList ++ v.ctors
  | info => info.type.getUsedConstants.toList

/-- The first way in which what the reference says differs in `env`, if any. Starting from
`todo` (the theorem), every constant reached must be declared the same way in `env` when the
reference module declares it, and must be imported (not declared by the attempt) when the
reference takes it from its imports. -/
partial def difference (env : Environment) (reference : Std.HashMap Name ConstantInfo)
    (todo : List Name) (seen : NameSet := {}) : Option String :=
  match todo with
  | [] => none
  | name :: rest =>
    if seen.contains name then difference env reference rest seen else
    let seen := seen.insert name
    match reference[name]?, env.find? name with
    | _, none => some s!"{name} is not available with the file's imports"
    | none, some _ =>
      if (env.getModuleIdxFor? name).isSome then difference env reference rest seen
      else some s!"the file declares {name} itself, where the statement uses the imported one"
    | some r, some a =>
      if sameDeclaration r a then difference env reference (dependencies r ++ rest) seen
      else some s!"{name} is not the problem's {name}"

def kindOf : ConstantInfo → String
  | .axiomInfo _ => "axiom"
  | .defnInfo _ => "def"
  | .thmInfo _ => "theorem"
  | .opaqueInfo _ => "opaque"
  | .quotInfo _ => "quot"
  | .inductInfo _ => "inductive"
  | .ctorInfo _ => "constructor"
  | .recInfo _ => "recursor"

/-- A module the attempt imports must be named like one on the search path, not like a path
(a component such as `..` would point the import outside the built packages). -/
def plainModule (module : Name) : Bool :=
  !module.isAnonymous && module.components.all fun
    | .str _ s => !s.isEmpty && !s.contains '/' && s != "." && s != ".."
    | _ => false

def answer (fields : List (String × Json)) : Json :=
  Json.mkObj (("format", toJson (1 : Nat)) :: fields)

def names (xs : Array Name) : Json :=
  Json.arr (xs.map fun n => Json.str (n.toString (escape := false)))

/-- What the replayed environment says about `thm`. `fresh` holds the attempt's constants. -/
def report (env : Environment) (fresh reference : Std.HashMap Name ConstantInfo) (thm : Name) :
    List (String × Json) :=
  match env.find? thm with
  | none => [("theorem", Json.str "missing")]
  | some info =>
    if !fresh.contains thm || (env.getModuleIdxFor? thm).isSome then
      [("theorem", Json.str "not_declared_by_the_file")]
    else
      let (_, collected) := ((CollectAxioms.collect thm).run env).run {}
      let axioms := ("axioms", names collected.axioms)
      match info with
      | .thmInfo _ =>
        let diff := difference env reference [thm]
        [("theorem", Json.str "declared"), ("same_statement", Json.bool diff.isNone),
          ("detail", Json.str (diff.getD "")), axioms]
      | _ => [("theorem", Json.str "not_a_theorem"), ("kind", Json.str (kindOf info)), axioms]

/-- The exit status and the answer for `thm` in the attempt, against the reference. -/
def check (attemptFile referenceFile : System.FilePath) (thm : Name) : IO (UInt32 × Json) := do
  let (attempt, _) ← readModuleData attemptFile
  let (reference, _) ← readModuleData referenceFile
  let referenceConstants := constantsOf reference
  unless referenceConstants.contains thm do
    throw <| IO.userError s!"the reference does not declare {thm}"
  for i in attempt.imports do
    unless plainModule i.module do
      throw <| IO.userError s!"the file imports {i.module}, which is not a module name"
  let env ← importModules (attempt.imports ++ reference.imports) {} 0
  let mut fresh : Std.HashMap Name ConstantInfo := {}
  let mut skipped : Array Name := #[]
  for name in attempt.constNames, info in attempt.constants do
    if info.isUnsafe || info.isPartial then
      skipped := skipped.push name
    fresh := fresh.insert name info
  match (← EIO.toBaseIO (env.replay fresh)) with
  | .error e => return (2, answer [("rejected", Json.str (toString e))])
  | .ok env =>
    return (0, answer (report env fresh referenceConstants thm ++
      [("replayed", toJson (fresh.size - skipped.size)), ("skipped", names skipped)]))

end FdCheck

def main (args : List String) : IO UInt32 := do
  let [attemptFile, referenceFile, thm, resultFile] := args
    | IO.eprintln "usage: fdcheck ATTEMPT.olean REFERENCE.olean THEOREM RESULT.json" *> pure 1
  initSearchPath (← findSysroot)
  try
    let (code, json) ← FdCheck.check ⟨attemptFile⟩ ⟨referenceFile⟩ thm.toName
    IO.FS.writeFile ⟨resultFile⟩ json.compress
    return code
  catch e =>
    IO.eprintln s!"fdcheck: {e}"
    IO.FS.writeFile ⟨resultFile⟩ (FdCheck.answer [("error", Json.str (toString e))]).compress
    return 1
