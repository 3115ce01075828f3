from env.tools import cap, parse_arguments


def test_cap_keeps_head_and_tail_with_a_note():
    text = "".join(f"line {i}\n" for i in range(2000))
    capped = cap(text, 1000)
    assert len(capped) < 1200 and capped.startswith("line 0\n") and capped.endswith("line 1999\n")
    assert "characters cut" in capped
    assert cap("short", 1000) == "short"


def test_parse_arguments_accepts_dicts_and_json():
    assert parse_arguments({"path": "a"}) == {"path": "a"}
    assert parse_arguments('{"path": "a"}') == {"path": "a"}
    assert parse_arguments("") == {} and parse_arguments(None) == {}


def test_check_output_says_when_the_prover_ran_without_the_jail(rocq):
    from env.provers.rocq import RocqProver
    from env.sandbox import EpisodeDir, jail_available
    from env.tools import run_tool
    from tests.env.test_rocq import PROBLEM

    unjailed = RocqProver(timeout_s=30, memory_mb=2048, jail=False)
    try:
        for prover, jailed in ((unjailed, False), (rocq, jail_available())):
            with EpisodeDir() as d:
                run_tool(prover.tools.write, {"path": "Main.v", "content": prover.render(PROBLEM)}, prover=prover,
                         problem=PROBLEM, workdir=d)
                out = run_tool(prover.tools.check, {"path": "Main.v"}, prover=prover, problem=PROBLEM, workdir=d)
            assert out.verdict.solved and out.check.sandboxed == jailed
            assert ("without the bubblewrap jail" in out.text) == (not jailed)
    finally:
        unjailed.close()
