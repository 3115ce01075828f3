"""The prover environment: problems, sandboxed provers, tools, verdicts and a Gymnasium env.

Knows nothing of tokens or models. `gymnasium.make("FdProver-v0", problems=..., prover="rocq")`
builds the env registered here.
"""

import gymnasium

from env.problems import Problem, ProblemFormatError, load_problems
from env.verdict import Verdict, judge

gymnasium.register(id="FdProver-v0", entry_point="env.gym_env:ProverEnv")

__all__ = ["Problem", "ProblemFormatError", "Verdict", "judge", "load_problems"]
