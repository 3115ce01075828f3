import Lake
open Lake DSL

-- The pinned Lean project every episode checks against: Lean v4.26.0 (see lean-toolchain) and
-- Mathlib v4.26.0. `lake exe cache get && lake build` fetches Mathlib's build and builds
-- `FdHeader`, which imports everything a problem header imports, so no check compiles Mathlib.
-- Lean's default options are kept (e.g. `autoImplicit`), so statements elaborate as in a plain file.

package fd_prover

require mathlib from git "https://github.com/leanprover-community/mathlib4" @ "v4.26.0"

@[default_target]
lean_lib FdHeader where
  srcDir := "lean_project"
