#!/usr/bin/env python3
"""The response reader: ours (``proxy.http1``) against h11, in-process.

(a) Speed: µs per exchange over representative answers (1 KiB with
Content-Length, the hot path of the 1 KiB keep-alive scenario; a chunked
answer; 64 KiB arriving in 16 KiB reads). Each side does what one upstream
exchange costs it on a kept-alive connection: write the request head, then
read the answer to its end (h11 only reads an answer after it has written
the request, so the write is in both numbers). "ours, reader only" leaves
the write out.

(b) Strictness: every malformed answer of tests/test_hostile.py (and the
framing cases of tests/test_properties.py) is fed to h11; the ones it
accepts are listed. The proxy refuses all of them.

Run with the project's interpreter (it needs ``proxy`` and h11);
``bench/run.py`` calls it at the end of a run. docs/architecture.md has the
decision and the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h11

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from proxy.http1 import ResponseError, ResponseReader, Signal  # noqa: E402
from proxy.upstream import request_head  # noqa: E402

__all__ = ["main", "scenarios", "speed", "strictness"]

HEAD_FIELDS = (
    b"Server: nginx/1.26.3\r\nDate: Sat, 21 Nov 2026 09:23:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nLast-Modified: Fri, 20 Nov 2026 10:00:00 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6740a1b0-400"\r\nAccept-Ranges: bytes\r\n'
)
REQUEST_FIELDS = [
    ("Host", "bench.test"),
    ("User-Agent", "wrk"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-For", "192.0.2.1, 127.0.0.1"),
    ("X-Request-Id", "0123456789abcdef0123456789abcdef"),
]


def _answer(body: bytes, chunked: bool = False) -> bytes:
    if not chunked:
        return b"HTTP/1.1 200 OK\r\n" + HEAD_FIELDS + b"Content-Length: %d\r\n\r\n" % len(body) + body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 256]), body[i : i + 256]) for i in range(0, len(body), 256))
    return b"HTTP/1.1 200 OK\r\n" + HEAD_FIELDS + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


def scenarios() -> dict[str, list[bytes]]:
    """Each answer as the reads that deliver it."""
    big = _answer(b"x" * 65536)
    return {
        "1k_content_length": [_answer(b"x" * 1024)],
        "1k_chunked_4x256": [_answer(b"x" * 1024, chunked=True)],
        "64k_content_length": [big[i : i + 16384] for i in range(0, len(big), 16384)],
    }


def ours_reader(reads: list[bytes]) -> int:
    reader = ResponseReader("GET")
    pending = iter(reads)
    size = 0
    while True:
        event = reader.next_event()
        if event is Signal.NEED_DATA:
            reader.feed(next(pending))
        elif event is Signal.END:
            return size
        elif isinstance(event, bytes):
            size += len(event)


def ours_exchange(reads: list[bytes]) -> int:
    request_head("GET", "/1k", REQUEST_FIELDS, False)
    return ours_reader(reads)


class _H11:
    """One kept-alive h11 client connection, as a pool would hold it."""

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.request = h11.Request(method="GET", target="/1k", headers=REQUEST_FIELDS)

    def exchange(self, reads: list[bytes]) -> int:
        conn = self.conn
        conn.send(self.request)
        conn.send(h11.EndOfMessage())
        pending = iter(reads)
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(next(pending))
            elif type(event) is h11.Data:
                size += len(event.data)
            elif type(event) is h11.EndOfMessage:
                conn.start_next_cycle()
                return size


def _per_call_us(function: Callable[[list[bytes]], int], reads: list[bytes], seconds: float) -> float:
    """Median µs per call over 5 timed batches (after a warm-up batch)."""
    batch = 200
    results = []
    for round_ in range(6):
        started = time.perf_counter()
        deadline = started + seconds / 6
        calls = 0
        while True:
            for _ in range(batch):
                function(reads)
            calls += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        if round_:
            results.append((now - started) / calls * 1e6)
    return statistics.median(results)


def speed(seconds: float) -> dict[str, dict[str, float]]:
    """µs per exchange for each scenario: ours, ours (reader only), h11."""
    out = {}
    for name, reads in scenarios().items():
        h11_conn = _H11()
        assert ours_exchange(reads) == h11_conn.exchange(reads)  # both read the same body
        out[name] = {
            "ours_us": _per_call_us(ours_exchange, reads, seconds),
            "ours_reader_only_us": _per_call_us(ours_reader, reads, seconds),
            "h11_us": _per_call_us(h11_conn.exchange, reads, seconds),
        }
    return out


def _malformed() -> dict[str, tuple[bytes, str]]:
    """Answers the proxy refuses, with the request method they answer."""
    from test_hostile import BAD_ANSWERS, BAD_CHUNKED, OK_HEAD

    cases = {f"hostile/{name}": (answer, "GET") for name, answer in BAD_ANSWERS.items()}
    for name, body in BAD_CHUNKED.items():
        cases[f"hostile/chunked-{name}"] = (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body, "GET")
    # test_properties.py's framing values and @example findings
    for value in ("-5", "+5", "0x5", "5x", "", "5, 7", " 5 x"):
        cases[f"properties/content-length {value!r}"] = (
            OK_HEAD + b"Content-Length: %s\r\n\r\nhello" % value.encode(),
            "GET",
        )
    for value in ("gzip, chunked", "chunked, chunked", "identity"):
        cases[f"properties/transfer-encoding {value!r}"] = (
            OK_HEAD + b"Transfer-Encoding: %s\r\n\r\n0\r\n\r\n" % value.encode(),
            "GET",
        )
    cases["properties/content-length-with-transfer-encoding"] = (
        OK_HEAD + b"Content-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET",
    )
    cases["properties/bare-cr-in-value"] = (
        OK_HEAD + b"X-A: a\rSet-Cookie: injected=1\r\nContent-Length: 0\r\n\r\n",
        "GET",
    )
    return cases


def _h11_accepts(answer: bytes, method: str) -> bool:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(answer)
    conn.receive_data(b"")
    try:
        while True:
            event = conn.next_event()
            if type(event) is h11.EndOfMessage or event is h11.PAUSED:
                return True
            if type(event) is h11.ConnectionClosed:
                return False
            if event is h11.NEED_DATA:
                return False
    except h11.RemoteProtocolError:
        return False


def _ours_accepts(answer: bytes, method: str) -> bool:
    reader = ResponseReader(method)
    reader.feed(answer)
    reader.feed(b"")
    try:
        while (event := reader.next_event()) is not Signal.END:
            if event is Signal.NEED_DATA:
                return False
    except ResponseError:
        return False
    return True


def strictness() -> tuple[int, list[str]]:
    """(how many malformed answers were tried, the ones h11 accepts)."""
    cases = _malformed()
    accepted = []
    for name, (answer, method) in cases.items():
        assert not _ours_accepts(answer, method), name
        if _h11_accepts(answer, method):
            accepted.append(name)
    return len(cases), accepted


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.3 s per measurement instead of 2 s")
    args = parser.parse_args(argv)
    seconds = 0.3 if args.quick else 2.0
    print(f"\nresponse reader, ours (proxy.http1) vs h11 {h11.__version__}: µs per exchange (median of 5 batches)")
    print(f"{'scenario':<22}{'ours':>10}{'ours, reader':>14}{'h11':>10}{'h11 / ours':>12}")
    for name, row in speed(seconds).items():
        ratio = row["h11_us"] / row["ours_us"]
        print(
            f"{name:<22}{row['ours_us']:>10.2f}{row['ours_reader_only_us']:>14.2f}{row['h11_us']:>10.2f}{ratio:>11.2f}x"
        )
    tried, accepted = strictness()
    print(f"\nstrictness: h11 accepts {len(accepted)} of the {tried} malformed answers the proxy refuses")
    for name in accepted:
        print(f"  accepted by h11: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
