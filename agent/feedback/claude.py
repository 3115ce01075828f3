"""Feedback from Claude through the `anthropic` SDK (the paper's source: Claude Opus 4.6, prompt (4)).

The SDK's own retries are off (`max_retries=0`): we retry overloads, rate limits, server errors and
connection errors ourselves with capped, jittered exponential backoff, so the behaviour is ours, visible and
tested, and a run that cannot get feedback stops with one clear `FeedbackError` instead of hanging.
A semaphore caps the requests in flight. The on-disk cache maps a request (model, system, messages,
max_tokens) to Claude's text, so a rerun over the same attempts costs nothing and gives the same feedback.

There is no temperature: `messages.create` has no sampling parameters since SDK 1.0, the API version
that SDK 2.x sends rejects them, and Claude models from Opus 4.7 on reject them with any API version.
Claude samples at its default.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from agent.feedback.base import Attempt, FeedbackError, framed
from agent.feedback.prompts import DEFAULT_PROMPT, system_prompt, user_message

RETRY_STATUSES = frozenset({429, 500, 502, 503, 529})  # rate limit, server errors, overloaded


class ClaudeFeedback:
    name = "claude"

    def __init__(self, *, model: str = "claude-opus-4-6", max_tokens: int = 1024, prompt: int = DEFAULT_PROMPT,
                 api_key: str | None = None, base_url: str | None = None, max_concurrency: int = 16,
                 max_attempts: int = 8, backoff_s: float = 2.0, max_backoff_s: float = 60.0,
                 timeout_s: float = 300.0, cache_dir: str | Path | None = None) -> None:
        """`base_url` None lets the SDK read ANTHROPIC_BASE_URL (else the public API); `api_key` None reads
        ANTHROPIC_API_KEY. `max_attempts` counts the first request; waits double from `backoff_s`."""
        try:
            import anthropic
        except ImportError as e:
            raise ImportError("claude feedback needs the anthropic SDK: pip install anthropic") from e
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not api_key:
            raise FeedbackError("claude feedback needs an Anthropic API key: set ANTHROPIC_API_KEY")
        if max_attempts < 1 or max_concurrency < 1:
            raise ValueError("max_attempts and max_concurrency must be at least 1")
        self._anthropic = anthropic
        self._client_args = {"api_key": api_key, "base_url": base_url, "max_retries": 0, "timeout": timeout_s}
        self.model = model
        self.max_tokens = max_tokens
        self.system = system_prompt(prompt)
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that _client and _slots belong to
        self._client: Any = None
        self._slots = asyncio.Semaphore(max_concurrency)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    async def feedback(self, attempt: Attempt) -> str:
        request = {"model": self.model, "system": self.system,
                   "messages": [{"role": "user", "content": user_message(attempt)}],
                   "max_tokens": self.max_tokens}
        key = request_key(request)
        text = self._cached(key)
        if text is None:
            text = await self._create(request)
            self._store(key, request, text)
        return framed(text)

    def _bind(self) -> None:
        """A client and a semaphore for the running event loop: pooled connections (and a semaphore's waiters)
        cannot move between loops, and a caller may run one `asyncio.run` per training step."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._client = self._anthropic.AsyncAnthropic(**self._client_args)
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop

    async def _create(self, request: dict[str, Any]) -> str:
        self._bind()
        error: Exception | None = None
        for number in range(1, self.max_attempts + 1):
            retry_after = 0.0
            try:
                async with self._slots:
                    message = await self._client.messages.create(**request)
            except self._anthropic.APIStatusError as e:
                if e.status_code not in RETRY_STATUSES:
                    raise FeedbackError(f"Claude request failed with HTTP {e.status_code}: {e.message}") from e
                error, retry_after = e, _seconds(e.response.headers.get("retry-after"))
            except self._anthropic.APIConnectionError as e:
                error = e
            else:
                text = "".join(block.text for block in message.content if block.type == "text").strip()
                if not text:
                    raise FeedbackError(f"Claude returned no text (stop_reason={message.stop_reason})")
                return text
            if number < self.max_attempts:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (number - 1)) * random.uniform(0.5, 1.0)
                await asyncio.sleep(max(delay, min(retry_after, self.max_backoff_s)))
        raise FeedbackError(f"Claude feedback failed after {self.max_attempts} attempts; last error: "
                            f"{type(error).__name__}: {error}") from error

    def _cached(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        return json.loads(path.read_text(encoding="utf-8"))["text"] if path.exists() else None

    def _store(self, key: str, request: dict[str, Any], text: str) -> None:
        """Write to a temporary file in the cache directory, then rename: readers never see half a file."""
        if self.cache_dir is None:
            return
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.cache_dir, suffix=".tmp",
                                         delete=False) as f:
            json.dump({"request": request, "text": text}, f, ensure_ascii=False)
        os.replace(f.name, self.cache_dir / f"{key}.json")


def request_key(request: dict[str, Any]) -> str:
    """sha256 of the request's canonical JSON (sorted keys, no whitespace, UTF-8)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0
