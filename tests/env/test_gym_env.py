"""The Gymnasium env with the real Rocq prover: checker, a scripted solve, tool errors, budgets."""

import json

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

from env.gym_env import DONE, ProverEnv
from tests.env.test_rocq import PROBLEM


@pytest.fixture
def env(rocq):
    e = ProverEnv([PROBLEM], rocq, max_turns=6)
    yield e
    e.close()


def step_text(env, name, **arguments):
    obs, reward, terminated, truncated, info = env.step({"name": name, "arguments": arguments})
    (message,) = obs["messages"]
    assert message["role"] == "tool" and message["name"] == name
    return message["content"], reward, terminated, truncated, info


def test_env_checker_passes(env):
    check_env(env, skip_render_check=True)


def test_registered_with_gymnasium(rocq):
    made = gymnasium.make("FdProver-v0", problems=[PROBLEM], prover=rocq)
    obs, info = made.reset(seed=1)
    assert info["problem"] == PROBLEM.name and len(obs["tools"]) == 3
    made.close()


def test_reset_poses_the_problem(env):
    obs, info = env.reset(seed=0)
    system, user = obs["messages"]
    assert system["role"] == "system" and "rocq_write_file" in system["content"]
    assert user["role"] == "user" and PROBLEM.formal_statement.split("\n")[0] in user["content"]
    assert [t["function"]["name"] for t in obs["tools"]] == ["rocq_write_file", "rocq_check_file", "rg_in_stdlib"]
    json.dumps(obs)  # observations are plain JSON


def test_scripted_episode_write_check_search_solve(env, rocq):
    env.reset(seed=0)
    root = env.workdir.root
    wrong = rocq.render(PROBLEM, "  lia.")
    text, reward, terminated, *_ = step_text(env, "rocq_write_file", path="Main.v", content=wrong)
    assert "Wrote" in text and reward == 0.0 and not terminated
    text, reward, terminated, truncated, info = step_text(env, "rocq_check_file", path="Main.v")
    assert "does not compile" in text and "Main.v:6:" in text and reward == 0.0 and not terminated
    assert info["verdict"]["reason"] == "does_not_compile" and info["timings"]["check_s"] > 0
    text, *_ = step_text(env, "rg_in_stdlib", pattern=r"Lemma Rmult_gt_compat_l\b")
    assert "Rmult_gt_compat_l" in text
    step_text(env, "rocq_write_file", path="Main.v", content=rocq.render(PROBLEM))
    text, reward, terminated, truncated, info = step_text(env, "rocq_check_file", path="Main.v")
    assert reward == 1.0 and terminated and not truncated and info["verdict"]["solved"]
    assert "problem is solved" in text
    with pytest.raises(RuntimeError, match="call reset"):
        env.step({"name": "rocq_check_file", "arguments": {"path": "Main.v"}})
    env.reset(seed=0)
    assert not root.exists()  # the old episode's sandbox is gone


@pytest.mark.parametrize("action, expected", [
    ({"name": "rocq_write_file", "arguments": {"path": "/etc/x.v", "content": "x"}}, "absolute paths"),
    ({"name": "rocq_write_file", "arguments": {"path": "../x.v", "content": "x"}}, "'..' is not allowed"),
    ({"name": "rocq_write_file", "arguments": {"path": "x.v"}}, "missing string argument 'content'"),
    ({"name": "rocq_check_file", "arguments": "{not json"}, "not valid JSON"),
    ({"name": "rocq_check_file", "arguments": {"path": "absent.v"}}, "no file 'absent.v'"),
    ({"name": "lean_check_file", "arguments": {"path": "x"}}, "unknown tool 'lean_check_file'"),
    ({"name": "rg_in_stdlib", "arguments": {"pattern": "("}}, "invalid pattern"),
    ("not a dict", "unknown tool"),
])
def test_bad_tool_calls_are_errors_for_the_model(env, action, expected):
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(action)
    content = obs["messages"][0]["content"]
    assert content.startswith("Error:") and expected in content
    assert info["tool_error"] and reward == 0.0 and not terminated and not truncated


def test_turn_budget_truncates_and_done_terminates(env, rocq):
    env.reset(seed=0)
    for _ in range(5):
        *_, terminated, truncated, _ = step_text(env, "rg_in_stdlib", pattern="Rplus_comm")
        assert not terminated and not truncated
    *_, reward, terminated, truncated, info = step_text(env, "rg_in_stdlib", pattern="Rplus_comm")
    assert truncated and not terminated and reward == 0.0

    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step({"name": DONE})
    assert terminated and not truncated and reward == 0.0


def test_done_gives_an_unchecked_file_its_final_check(env, rocq):
    env.reset(seed=0)
    step_text(env, "rocq_write_file", path="Main.v", content=rocq.render(PROBLEM))
    obs, reward, terminated, truncated, info = env.step({"name": DONE})
    assert reward == 1.0 and terminated and info["final_check"]["solved"]


def test_prover_timeout_is_reported_and_env_keeps_working(rocq):
    env = ProverEnv([PROBLEM], rocq, max_turns=8, check_timeout_s=3)
    env.reset(seed=0)
    loop = "Goal True. repeat (assert True by exact I). exact I. Qed.\n"
    step_text(env, "rocq_write_file", path="Loop.v", content=loop)
    text, reward, terminated, truncated, info = step_text(env, "rocq_check_file", path="Loop.v")
    assert "time limit" in text and info["verdict"]["reason"] == "timeout" and not terminated
    env.check_timeout_s = 60  # the honest check below may take over 3 s on a busy machine
    step_text(env, "rocq_write_file", path="Main.v", content=rocq.render(PROBLEM))
    assert step_text(env, "rocq_check_file", path="Main.v")[1] == 1.0
    env.close()
