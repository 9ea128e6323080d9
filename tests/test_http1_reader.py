"""The sans-I/O response reader (proxy.http1), without sockets.

Every answer is fed whole, byte by byte, and split in two at every offset:
the events (body bytes joined), the reuse decision and the bytes left over
must be the same each way, and a malformed answer must give the same error.
The answers are the ones the socket-level tests in test_hostile.py send
through a running proxy, plus the framings they do not cover.
"""

from __future__ import annotations

import pytest
from test_hostile import BAD_ANSWERS, BAD_CHUNKED, OK_HEAD, POISON, RELAYED_ANSWERS

from proxy.http1 import MAX_FIELDS, MAX_HEAD_BYTES, Head, NoAnswer, ResponseError, ResponseReader, Signal


def run(parts: list[bytes], method: str = "GET", upgrade: bool = False, eof: bool = False):
    """Feed ``parts`` one at a time when the reader needs data, then the end
    of the stream if ``eof``. Returns (events with adjacent body bytes
    joined, reusable, bytes left over) or the error raised."""
    reader = ResponseReader(method, upgrade)
    parts = list(parts)
    events: list[object] = []
    try:
        while True:
            event = reader.next_event()
            if event is Signal.NEED_DATA:
                if parts:
                    reader.feed(parts.pop(0))
                    continue
                if eof:
                    reader.feed(b"")
                    eof = False
                    continue
                events.append(event)
                break
            if isinstance(event, bytes):
                assert event, "an empty body event"
                if events and isinstance(events[-1], bytes):
                    events[-1] += event
                    continue
            events.append(event)
            if event is Signal.END:
                break
    except ResponseError as exc:
        return type(exc), str(exc)
    left = reader.take_buffered() + b"".join(parts)
    # Bytes never fed stay on the socket: the connection is not reused then
    # either (the pool's liveness peek sees them).
    return events, reader.reusable and not left, left


def splits(data: bytes) -> list[list[bytes]]:
    """The ways each answer is fed: whole, byte by byte, two parts at every
    offset. Past 4 KiB (only the over-long heads), 1000-byte pieces and
    every 997th offset: feeding 64 KiB byte by byte is quadratic."""
    if len(data) > 4096:
        ways = [[data], [data[i : i + 1000] for i in range(0, len(data), 1000)]]
        offsets = [*range(1, len(data), 997), len(data) - 1]
    else:
        ways = [[data], [data[i : i + 1] for i in range(len(data))]]
        offsets = list(range(1, len(data)))
    ways.extend([data[:i], data[i:]] for i in offsets)
    return ways


def same_every_way(data: bytes, **kwargs):
    results = [run(parts, **kwargs) for parts in splits(data)]
    for parts, result in zip(splits(data), results, strict=True):
        assert result == results[0], [len(p) for p in parts]
    return results[0]


def head(status: int, *headers: tuple[str, str], length=None, chunked=False, keep_alive=True, reason="OK"):
    connection = ", ".join(v for n, v in headers if n.lower() == "connection") or None
    fields = [(n, v) for n, v in headers if n.lower() != "content-length"]
    if length is not None:
        fields.append(("Content-Length", str(length)))
    return Head(status, reason, fields, connection, length, chunked, keep_alive)


# -- valid answers ---------------------------------------------------------------------------

KIB = bytes(range(256)) * 4

#: (answer, request method, expected events, reusable, left over, end of stream fed)
VALID = {
    "content-length-1k": (
        OK_HEAD + b"Content-Length: 1024\r\n\r\n" + KIB,
        "GET",
        [head(200, length=1024), KIB, Signal.END],
        True,
        b"",
        False,
    ),
    "content-length-zero": (
        OK_HEAD + b"Content-Length: 0\r\n\r\n",
        "GET",
        [head(200, length=0), Signal.END],
        True,
        b"",
        False,
    ),
    "chunked-extensions-trailers": (
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\nA ; x\r\n0123456789\r\n0000000000000000;last\r\nX-T: 1\r\nX-U: 2\r\n\r\n",
        "GET",
        [head(200, ("Transfer-Encoding", "chunked"), chunked=True), b"hello0123456789", Signal.END],
        True,
        b"",
        False,
    ),
    "chunked-bare-lf": (
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        "GET",
        [head(200, ("Transfer-Encoding", "chunked"), chunked=True), b"abc", Signal.END],
        True,
        b"",
        False,
    ),
    "chunked-100-trailer-fields": (
        OK_HEAD
        + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_FIELDS))
        + b"\r\n",
        "GET",
        [head(200, ("Transfer-Encoding", "chunked"), chunked=True), b"x", Signal.END],
        True,
        b"",
        False,
    ),
    "close-delimited": (
        OK_HEAD + b"X-A: b\r\n\r\nbody until close",
        "GET",
        [head(200, ("X-A", "b")), b"body until close", Signal.END],
        False,
        b"",
        True,
    ),
    "close-delimited-empty": (OK_HEAD + b"\r\n", "GET", [head(200), Signal.END], False, b"", True),
    "connection-close": (
        OK_HEAD + b"Connection: close\r\nContent-Length: 2\r\n\r\nok",
        "GET",
        [head(200, ("Connection", "close"), length=2, keep_alive=False), b"ok", Signal.END],
        False,
        b"",
        False,
    ),
    "upgrade-101-with-early-bytes": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n\x81\x02hi",
        "GET",
        [
            head(101, ("Upgrade", "x"), ("Connection", "Upgrade"), reason="Switching Protocols"),
            Signal.END,
        ],
        False,
        b"\x81\x02hi",
        False,
    ),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_answer_reads_the_same_at_every_split(name):
    answer, method, events, reusable, left, eof = VALID[name]
    result = same_every_way(answer, method=method, upgrade=name.startswith("upgrade"), eof=eof)
    assert result == (events, reusable, left)


@pytest.mark.parametrize("name", list(RELAYED_ANSWERS))
def test_answers_with_one_reading_read_the_same_at_every_split(name):
    answer, method, status, body = RELAYED_ANSWERS[name]
    events, reusable, left = same_every_way(answer, method=method, eof=True)
    assert isinstance(events[0], Head) and events[0].status == status
    assert events[1:] == ([body, Signal.END] if body else [Signal.END])
    assert POISON not in b"".join(e for e in events if isinstance(e, bytes))
    # never reused: an answer without a body, an HTTP/1.0 one, or bytes past its end
    bodiless = method == "HEAD" or status in (204, 304)
    assert reusable == (not bodiless and not left and not name.startswith("http10"))


def test_interim_answers_are_skipped_whatever_their_number():
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" * 50 + OK_HEAD + b"Content-Length: 2\r\n\r\nok"
    events, reusable, _ = run([answer])
    assert [e.status if isinstance(e, Head) else e for e in events] == [200, b"ok", Signal.END] and reusable


def test_a_head_of_exactly_the_limit_is_read_and_one_byte_more_is_refused():
    filler = b"X-Long: "
    base = OK_HEAD + b"Content-Length: 0\r\n" + filler + b"\r\n\r\n"
    at_limit = base.replace(filler, filler + b"a" * (MAX_HEAD_BYTES - len(base)))
    assert len(at_limit) == MAX_HEAD_BYTES
    assert run([at_limit])[0][-1] is Signal.END
    over = at_limit.replace(b"aaaa", b"aaaaa", 1)
    assert run([over]) == (ResponseError, f"response head longer than {MAX_HEAD_BYTES} bytes")
    assert run([over[:MAX_HEAD_BYTES]]) == (ResponseError, f"response head longer than {MAX_HEAD_BYTES} bytes")


def test_body_bytes_are_handed_on_without_a_copy():
    body = b"x" * 65536
    reader = ResponseReader("GET")
    reader.feed(OK_HEAD + b"Content-Length: 131072\r\n\r\n")
    assert isinstance(reader.next_event(), Head)
    assert reader.next_event() is Signal.NEED_DATA
    reader.feed(body)
    assert reader.next_event() is body


def test_the_end_is_repeated_and_nothing_more_is_taken():
    reader = ResponseReader("GET")
    reader.feed(OK_HEAD + b"Content-Length: 2\r\n\r\nokEXTRA")
    assert [reader.next_event() for _ in range(4)][1:] == [b"ok", Signal.END, Signal.END]
    assert not reader.reusable and reader.take_buffered() == b"EXTRA"


# -- malformed answers -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
def test_malformed_head_is_refused_at_every_split(name):
    result = same_every_way(BAD_ANSWERS[name], eof=True)
    assert result[0] is ResponseError, result


@pytest.mark.parametrize("name", list(BAD_CHUNKED))
def test_malformed_chunked_body_is_refused_at_every_split(name):
    answer = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + BAD_CHUNKED[name] + POISON
    result = same_every_way(answer, eof=True)
    assert result[0] is ResponseError, result


BROKEN_OFF = {
    "nothing": (b"", NoAnswer, "next-hop closed the connection before answering"),
    "half-a-head": (b"HTTP/1.1 200 OK\r\nContent-Le", ResponseError, "in the middle of the response head"),
    "after-an-interim-answer": (b"HTTP/1.1 100 Continue\r\n\r\n", NoAnswer, "before answering"),
    "content-length-short": (OK_HEAD + b"Content-Length: 5\r\n\r\nhel", ResponseError, "before the end of the body"),
    "chunk-data-short": (
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel",
        ResponseError,
        "before the end of the body",
    ),
    "inside-chunk-size": (
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5",
        ResponseError,
        "inside the chunked framing",
    ),
    "in-trailers": (
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n",
        ResponseError,
        "inside the chunked framing",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN_OFF))
def test_an_answer_broken_off_by_the_end_of_the_stream_is_an_error(name):
    answer, error, message = BROKEN_OFF[name]
    for parts in splits(answer) if answer else [[]]:
        result = run(parts, eof=True)
        assert result[0] is error and message in result[1], (parts, result)


CHUNKED_LIMITS = {
    "size-line-over-1024": b"5;" + b"x" * 1030 + b"\r\nhello\r\n0\r\n\r\n",
    "size-17-digits": b"00000000000000001\r\nx\r\n0\r\n\r\n",
    "data-then-no-crlf": b"1\r\nxy\r\n0\r\n\r\n",
    "data-then-lone-cr": b"1\r\nx\r0\r\n\r\n",
    "extension-control-char": b"1;a\x01\r\nx\r\n0\r\n\r\n",
    "101-trailer-fields": b"0\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_FIELDS + 1)) + b"\r\n",
}


@pytest.mark.parametrize("name", list(CHUNKED_LIMITS))
def test_chunked_framing_limits(name):
    answer = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_LIMITS[name]
    result = same_every_way(answer, eof=True)
    assert result[0] is ResponseError, result


def test_101_is_refused_unless_an_upgrade_was_asked():
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"
    assert run([answer])[0] is ResponseError
    assert run([answer], upgrade=True)[0][0].status == 101


# -- a Content-Length body that goes past the reader (splice) --------------------------------


def _reader_after(data: bytes, method: str = "GET") -> ResponseReader:
    """A reader fed ``data``, its head taken."""
    reader = ResponseReader(method)
    reader.feed(data)
    assert isinstance(reader.next_event(), Head)
    return reader


def test_the_rest_of_a_content_length_body_can_bypass_the_reader():
    reader = _reader_after(OK_HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
    assert reader.unfed_body() == 900
    assert reader.next_event() == b"x" * 100  # the bytes held go first
    assert reader.unfed_body() == 900
    reader.bypass(400)
    assert reader.unfed_body() == 500 and not reader.reusable
    reader.bypass(500)
    assert reader.unfed_body() == 0
    assert reader.next_event() is Signal.END and reader.reusable


def test_a_body_bypassed_from_its_first_byte_ends_exactly():
    reader = _reader_after(OK_HEAD + b"Content-Length: 70000\r\n\r\n")
    assert reader.unfed_body() == 70000
    assert reader.next_event() is Signal.NEED_DATA
    reader.bypass(70000)
    assert reader.next_event() is Signal.END and reader.reusable


def test_a_bypassed_body_of_an_answer_asking_to_close_is_not_reusable():
    reader = _reader_after(OK_HEAD + b"Connection: close\r\nContent-Length: 10\r\n\r\n")
    reader.bypass(10)
    assert reader.next_event() is Signal.END and not reader.reusable


def test_a_bypass_cut_short_by_the_end_of_the_stream_is_an_error():
    reader = _reader_after(OK_HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
    reader.next_event()
    reader.bypass(300)
    reader.feed(b"")
    with pytest.raises(ResponseError, match="before the end of the body"):
        reader.next_event()
    assert not reader.reusable and reader.unfed_body() == 0


def test_bytes_held_must_be_taken_before_a_bypass_and_no_more_than_the_rest_bypassed():
    reader = _reader_after(OK_HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
    with pytest.raises(ValueError):
        reader.bypass(900)  # the 100 held bytes are not taken yet
    reader.next_event()
    with pytest.raises(ValueError):
        reader.bypass(901)
    with pytest.raises(ValueError):
        reader.bypass(0)
    reader.bypass(900)
    with pytest.raises(ValueError):
        reader.bypass(1)  # the body has ended


@pytest.mark.parametrize(
    ("answer", "method"),
    [
        (OK_HEAD + b"Content-Length: 5\r\n\r\nhello", "GET"),  # all of it fed
        (OK_HEAD + b"Content-Length: 5\r\n\r\nhelloEXTRA", "GET"),  # and more
        (OK_HEAD + b"Content-Length: 0\r\n\r\n", "GET"),
        (OK_HEAD + b"Content-Length: 5000\r\n\r\n", "HEAD"),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5000\r\n\r\n", "GET"),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5000\r\n\r\n", "GET"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel", "GET"),
        (OK_HEAD + b"X-A: b\r\n\r\nuntil close", "GET"),
    ],
    ids=["all-fed", "all-fed-and-more", "empty", "head", "204", "304", "chunked", "close-delimited"],
)
def test_only_a_content_length_body_still_to_come_can_bypass_the_reader(answer, method):
    reader = _reader_after(answer, method)
    assert reader.unfed_body() == 0
    with pytest.raises(ValueError):
        reader.bypass(1)


def test_nothing_bypasses_a_reader_before_the_head_or_after_the_stream_ended():
    reader = ResponseReader("GET")
    reader.feed(OK_HEAD + b"Content-Le")
    assert reader.unfed_body() == 0
    reader = _reader_after(OK_HEAD + b"Content-Length: 1000\r\n\r\n")
    reader.feed(b"")
    assert reader.unfed_body() == 0
