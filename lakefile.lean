import Lake
open Lake DSL

-- The pinned Lean project every episode checks against: Lean v4.26.0 (see lean-toolchain) and
-- Mathlib v4.26.0. `lake exe cache get && lake build` fetches Mathlib's build and builds
-- `FdHeader`, which imports everything a problem header imports, so no check compiles Mathlib,
-- plus the two programs the Lean backend runs (nothing is fetched or built at run time).
-- Lean's default options are kept (e.g. `autoImplicit`), so statements elaborate as in a plain file.

package fd_prover

require mathlib from git "https://github.com/leanprover-community/mathlib4" @ "v4.26.0"

-- The Lean REPL, at the commit of its fork's `v1.3.18_lean-toolchain-v4.26.0` tag (the REPL
-- build for our Lean version); built below as `fdrepl`.
require REPL from git "https://github.com/augustepoiroux/repl" @ "a690d9bc34048a50c2b4a9ca0ab68b0ccfa27b85"

@[default_target]
lean_lib FdHeader where
  srcDir := "lean_project"

-- The kernel re-check of a compiled attempt (lean_project/FdCheck.lean).
@[default_target]
lean_exe fdcheck where
  srcDir := "lean_project"
  root := `FdCheck
  supportInterpreter := true

-- The REPL the feedback workers run (lean_project/FdRepl.lean links the pinned REPL's `main`).
@[default_target]
lean_exe fdrepl where
  srcDir := "lean_project"
  root := `FdRepl
  supportInterpreter := true
