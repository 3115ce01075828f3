/-
The REPL that the feedback workers run; `lake build` links it as `.lake/build/bin/fdrepl`.

The program is the pinned REPL's own (`REPL.Main` defines `main`, so its compiled module
carries the executable's entry point); this module only makes it a target of this package,
so that building the project builds the REPL too and nothing is cloned at run time.
-/
import REPL.Main
