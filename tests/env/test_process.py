"""Bounded I/O with untrusted processes: the capped buffer, the marker scan and `pump` on real subprocesses."""

import subprocess
import sys
import time

from env.process import CappedBuffer, MarkerScan, pump


def test_capped_buffer_keeps_head_and_tail_and_counts_the_rest():
    buf = CappedBuffer(head=4, tail=3)
    for piece in (b"ab", b"cdef", b"ghij", b"k"):
        buf.feed(piece)
    assert buf.total == 11 and buf.cut == 4
    assert buf.text() == "abcd\n[... 4 bytes of output cut ...]\nijk"
    small = CappedBuffer(head=4, tail=3)
    small.feed(b"abcdef")
    assert small.text() == "abcdef" and small.cut == 0


def test_capped_buffer_memory_stays_bounded():
    buf = CappedBuffer(head=10, tail=10)
    for _ in range(10_000):
        buf.feed(b"x" * 100)
    assert buf.total == 1_000_000 and len(buf.head) == 10 and len(buf.tail) <= 20


def test_marker_scan_finds_markers_in_order_across_pieces():
    scan = MarkerScan([b"NONCE", b"</prompt>"])
    for byte in b"</prompt> before NON" b"CE middle </pro" b"mpt> after":
        scan.feed(bytes([byte]))
    assert scan.done
    early = MarkerScan([b"NONCE", b"</prompt>"])
    early.feed(b"</prompt> then NONCE and nothing")
    assert early.found == 1 and not early.done


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_pump_writes_and_reads_at_once_until_the_markers():
    echo = _python("import sys\nfor line in sys.stdin: sys.stdout.write(line); sys.stdout.flush()")
    data = b"x" * 200 + b"\n"
    try:
        got = pump(echo.stdin.fileno(), echo.stdout.fileno(), send=data * 5000 + b"END\n", markers=[b"END"],
                   deadline=time.monotonic() + 30)
    finally:
        echo.kill()
    assert got.ending == "markers" and got.output.total - len(data) * 5000 in (3, 4)  # "END" and maybe its newline


def test_pump_stops_at_the_deadline_the_limit_or_the_end():
    quiet = _python("import time; time.sleep(30)")
    loud = _python("import sys\nwhile True: sys.stdout.write('y' * 65536)")
    brief = _python("print('bye')")
    try:
        assert pump(None, quiet.stdout.fileno(), deadline=time.monotonic() + 0.5).ending == "timeout"
        flooded = pump(None, loud.stdout.fileno(), deadline=time.monotonic() + 30, limit=1_000_000)
        assert flooded.ending == "limit" and 1_000_000 < flooded.output.total < 1_200_000
        ended = pump(None, brief.stdout.fileno(), deadline=time.monotonic() + 30)
        assert ended.ending == "eof" and ended.output.text() == "bye\n"
    finally:
        for proc in (quiet, loud, brief):
            proc.kill()
