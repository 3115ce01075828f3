"""Bounded I/O with processes that run untrusted code: capped output buffers and a select loop.

A prover process runs whatever the attempt tells it to, so it can print without end. Its
output is read through a `CappedBuffer` (the first and last bytes kept, the rest counted) and
the process is stopped once it has printed more than a hard limit, so the reader's memory and
time stay bounded whatever the attempt does. `pump` moves bytes both ways (stdin written as
the process reads it, stdout read as it writes) until a sequence of marker strings has been
seen, a deadline passes, the output limit is hit, or the process closes its output.
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

HEAD_BYTES = 48 * 1024
TAIL_BYTES = 48 * 1024
OUTPUT_LIMIT_BYTES = 8 * 1024 * 1024  # past this much output a prover process is stopped


class CappedBuffer:
    """The first `head` and last `tail` bytes of a stream, and how many bytes it had."""

    def __init__(self, head: int = HEAD_BYTES, tail: int = TAIL_BYTES) -> None:
        self.head_cap, self.tail_cap = head, tail
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_cap:  # trim rarely: amortised constant time per byte
                del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def cut(self) -> int:
        """Bytes dropped from the middle."""
        return max(0, self.total - len(self.head) - min(len(self.tail), self.tail_cap))

    def text(self) -> str:
        tail = bytes(self.tail[-self.tail_cap:]) if self.tail else b""
        if not self.cut:
            return (bytes(self.head) + tail).decode("utf-8", "replace")
        note = f"\n[... {self.cut} bytes of output cut ...]\n"
        return bytes(self.head).decode("utf-8", "replace") + note + tail.decode("utf-8", "replace")


class MarkerScan:
    """Finds `markers` in order in a stream fed piece by piece, in time linear in its length."""

    def __init__(self, markers: Sequence[bytes]) -> None:
        self.markers = list(markers)
        self.found = 0  # how many markers have been seen
        self._window = b""

    @property
    def done(self) -> bool:
        return self.found == len(self.markers)

    def feed(self, data: bytes) -> None:
        window = self._window + data
        while not self.done:
            at = window.find(self.markers[self.found])
            if at < 0:
                break
            window = window[at + len(self.markers[self.found]):]
            self.found += 1
        keep = max((len(m) for m in self.markers), default=1) - 1
        self._window = window[-keep:] if keep else b""


Ending = Literal["markers", "eof", "timeout", "limit"]


@dataclass
class Pumped:
    ending: Ending
    output: CappedBuffer = field(default_factory=CappedBuffer)


def pump(stdin: int | None, stdout: int, *, send: bytes = b"", markers: Sequence[bytes] = (), deadline: float,
         limit: int = OUTPUT_LIMIT_BYTES, output: CappedBuffer | None = None,
         tick: Callable[[], None] | None = None, tick_s: float = 0.01) -> Pumped:
    """Write `send` to `stdin` while reading `stdout` (both raw file descriptors) until the end.

    The end is the first of: every marker seen in order (when markers are given), end of
    file, `deadline` (a `time.monotonic()` value), or more than `limit` bytes read.
    `tick` is called about every `tick_s` seconds meanwhile (to watch the process).
    """
    out = output if output is not None else CappedBuffer()
    scan = MarkerScan(markers) if markers else None
    pending = memoryview(send)
    sel = selectors.DefaultSelector()
    sel.register(stdout, selectors.EVENT_READ)
    writing = stdin is not None and len(pending) > 0
    if writing:
        os.set_blocking(stdin, False)
        sel.register(stdin, selectors.EVENT_WRITE)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Pumped("timeout", out)
            if tick is not None:
                tick()
            for key, _ in sel.select(timeout=min(left, tick_s) if tick is not None else left):
                if key.fd == stdout:
                    data = os.read(stdout, 65536)
                    if not data:
                        return Pumped("eof", out)
                    out.feed(data)
                    if out.total > limit:
                        return Pumped("limit", out)
                    if scan is not None:
                        scan.feed(data)
                        if scan.done:
                            return Pumped("markers", out)
                elif writing:
                    try:
                        n = os.write(key.fd, pending[:65536])
                    except BrokenPipeError:
                        n = len(pending)  # the process is gone; its output tells the rest
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(key.fd)
                        writing = False
    finally:
        sel.close()
