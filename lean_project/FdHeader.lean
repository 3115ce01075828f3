/-
The imports of every problem header (`import Mathlib`, `import Aesop`). `lake build` builds
this module, so everything an episode imports is built before the first check.
-/
import Mathlib
import Aesop
