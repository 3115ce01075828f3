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
