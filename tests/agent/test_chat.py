import json

import pytest

from agent.chat import ChatFormat, MalformedCall, ToolCall, parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "rocq_check_file", "description": "check",
                                           "parameters": {"type": "object", "properties": {}}}}]


def test_parse_tool_calls():
    text = ('I will check. <tool_call>\n{"name": "rocq_check_file", "arguments": {"path": "Main.v"}}\n</tool_call>'
            '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("rocq_check_file", {"path": "Main.v"}), ToolCall("a", {"x": 1})]
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize("text, error", [
    ("<tool_call>{not json}</tool_call>", "not valid JSON"),
    ('<tool_call>["a"]</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "a", "arguments": [1]}</tool_call>', "arguments must be a JSON object"),
    ('<tool_call>{"name": "a", "arguments": "{bad"}</tool_call>', "arguments are not a JSON object"),
    ('ok <tool_call>{"name": "a"', "not closed"),
])
def test_malformed_calls_become_errors(text, error):
    (call,) = parse_tool_calls(text)
    assert isinstance(call, MalformedCall) and error in call.error


@pytest.mark.parametrize("which", ["qwen_tokenizer", "smollm2_tokenizer"])
def test_appending_ids_equals_a_fresh_rendering(request, which):
    tokenizer = request.getfixturevalue(which)
    chat = ChatFormat(tokenizer, TOOLS)
    assert chat.native == (which == "qwen_tokenizer")
    messages = [{"role": "system", "content": "Prove it."}, {"role": "user", "content": "Theorem t : 1 + 1 = 2."}]
    ids = chat.prompt_ids(messages)
    for turn in range(3):
        call = {"name": "rocq_check_file", "arguments": {"path": f"M{turn}.v"}}
        text = f"Step {turn}. <tool_call>\n{json.dumps(call)}\n</tool_call>"
        generated = chat.encode(text) + [chat.end_of_turn_id]
        ids += generated
        assert chat.assistant_text(generated) == text
        messages.append({"role": "assistant", "content": text})
        tool = [{"role": "tool", "name": "rocq_check_file", "content": f"M{turn}.v compiles with no errors."}]
        ids += chat.tool_turn_ids(messages, tool)
        messages += tool
    assert ids == chat.encode(chat.render(messages, add_generation_prompt=True))
    rendered = tokenizer.decode(ids)
    assert "M2.v compiles" in rendered and rendered.endswith("<|im_start|>assistant\n")
    if not chat.native:  # the fallback offers the tools in the system message
        assert '"name": "rocq_check_file"' in rendered.split("<|im_end|>")[0]
