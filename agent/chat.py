"""Chat rendering and tool calls: the model's own chat template, Qwen3's `<tool_call>` JSON format.

Two ways to offer tools:
- native: the template takes `tools=` and `tool` messages (Qwen3, our tiny models);
- fallback, for templates with no tool support (SmolLM2): the tool specs and the call
  format are appended to the system message, and each tool output becomes a user message
  `<tool_response>\n{output}\n</tool_response>`. The model calls tools the same way.

A rollout never re-tokenizes: `tool_turn_ids` gives the ids of what the template adds
after the model's end-of-turn token for the tool outputs (and the next assistant header),
so the sequence is prompt ids + generated ids + tool-turn ids + generated ids + ...
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
FALLBACK_TOOL_PROMPT = (
    "\n\n# Tools\nYou can call these tools. To call one, write\n"
    '<tool_call>\n{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>\n'
    "and stop; its output comes back in a <tool_response> block. Tools:\n{specs}"
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class MalformedCall:
    raw: str
    error: str  # shown to the model


def parse_tool_calls(text: str) -> list[ToolCall | MalformedCall]:
    """Every `<tool_call>` block of an assistant turn, in order; an unclosed last block is malformed."""
    calls: list[ToolCall | MalformedCall] = []
    for m in _CALL.finditer(text):
        calls.append(_parse_call(m[1].strip()))
    tail = text[text.rfind("</tool_call>") + 1:] if "</tool_call>" in text else text
    if "<tool_call>" in tail:
        calls.append(MalformedCall(tail[tail.find("<tool_call>"):], "the tool call is not closed with </tool_call>"))
    return calls


def _parse_call(raw: str) -> ToolCall | MalformedCall:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return MalformedCall(raw, f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return MalformedCall(raw, 'a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return MalformedCall(raw, "the tool call's arguments are not a JSON object")
    if not isinstance(args, dict):
        return MalformedCall(raw, "the tool call's arguments must be a JSON object")
    return ToolCall(obj["name"], args)


class ChatFormat:
    """Renders conversations to token ids with a tokenizer's chat template and the env's tool specs."""

    def __init__(self, tokenizer: Any, tools: list[dict]) -> None:
        self.tokenizer = tokenizer
        self.tools = tools
        self.native = "tools" in (tokenizer.chat_template or "")
        eos = tokenizer.eos_token_id
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
        self.end_of_turn_id: int = im_end if im_end is not None else eos
        self.stop_token_ids: tuple[int, ...] = tuple(sorted({self.end_of_turn_id, eos} - {None}))
        self._end_of_turn = tokenizer.decode([self.end_of_turn_id])

    # -- rendering -------------------------------------------------------------------
    def render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        if self.native:
            return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        return self.tokenizer.apply_chat_template(self._fallback(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True))

    def tool_turn_ids(self, conversation: list[dict], tool_messages: list[dict]) -> list[int]:
        """Ids the template puts after the last assistant turn's end-of-turn token for `tool_messages`.

        `conversation` ends with that assistant turn. Only the text after the end-of-turn
        token is encoded; it starts at a special token, so its ids do not depend on what
        came before.
        """
        before = self.render(conversation, add_generation_prompt=False)
        cut = before.rfind(self._end_of_turn)
        if cut < 0:
            raise ValueError("the rendered conversation has no end-of-turn token after the assistant turn")
        cut += len(self._end_of_turn)
        after = self.render(conversation + tool_messages, add_generation_prompt=True)
        if after[:cut] != before[:cut]:
            raise ValueError("the chat template renders earlier turns differently once tool outputs follow")
        return self.encode(after[cut:])

    def assistant_text(self, generated_ids: list[int]) -> str:
        """The assistant turn's text: generated ids decoded, without the end-of-turn token."""
        ids = generated_ids[:-1] if generated_ids and generated_ids[-1] in self.stop_token_ids else generated_ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # -- fallback format -------------------------------------------------------------
    def _fallback(self, messages: list[dict]) -> list[dict]:
        specs = "\n".join(json.dumps(t) for t in self.tools)
        out = [dict(m) for m in messages]
        if not out or out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": ""})
        out[0]["content"] = out[0]["content"] + FALLBACK_TOOL_PROMPT.format(specs=specs)
        converted = []
        for m in out:
            if m["role"] == "tool":
                converted.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
            else:
                converted.append({"role": m["role"], "content": m["content"]})
        return converted
