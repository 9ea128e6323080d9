"""Reading next-hop's HTTP/1.1 answers, without I/O: bytes in, events out.

A proxy and its next hop must agree byte for byte on where each answer
ends (RFC 9112 section 6.3), or one client's request can be answered with
another's response. This module holds every rule for that, and nothing
else: no sockets, no timeouts, no pool. The connection layer
(``proxy.upstream``) feeds it what it receives and acts on the events;
the tests feed it each answer whole, byte by byte and split at every offset.

``ResponseReader.next_event`` returns, in order: one ``Head`` (interim 1xx
answers are skipped), body data as ``bytes`` (slices of what was fed, never
copied byte by byte), then ``Signal.END``; ``Signal.NEED_DATA`` whenever it
needs more bytes first. Anything that could be read two ways raises
``ResponseError``. ``reusable`` then tells whether the connection may carry
another request.

The rest of a Content-Length body may also go from the socket to the client
without being fed (``proxy.splice``): ``unfed_body`` says how many bytes
are still to come, and ``bypass`` counts them as read once they went by,
so that the answer ends (and ``reusable`` is decided) exactly as if they
had been fed.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .headers import Header, connection_tokens

__all__ = [
    "MAX_FIELDS",
    "MAX_HEAD_BYTES",
    "Event",
    "Head",
    "NoAnswer",
    "ResponseError",
    "ResponseReader",
    "Signal",
    "parse_head",
]

#: Longest response head accepted from next-hop (nginx refuses more than 8 KiB).
MAX_HEAD_BYTES = 64 * 1024
#: Most field lines accepted in a response head or in trailers.
MAX_FIELDS = 100
#: Longest chunk-size line (with its extensions).
_MAX_CHUNK_LINE = 1024


class ResponseError(Exception):
    """next-hop's answer breaks HTTP/1.1 framing; it is never relayed as it is."""


class NoAnswer(ResponseError):
    """next-hop closed the connection before sending a byte of its answer
    (on a pooled connection: it closed it while idle)."""


class Signal(enum.Enum):
    """The reader's events that carry no data."""

    #: Feed more bytes (or ``b""`` for the end of the stream), then ask again.
    NEED_DATA = enum.auto()
    #: The answer is complete; nothing more belongs to it.
    END = enum.auto()


@dataclass(slots=True)
class Head:
    """A parsed response head, with its framing settled (RFC 9112 section 6.3)."""

    status: int
    reason: str
    #: The fields in order, obs-folds joined, and at most one Content-Length,
    #: in canonical form (``5, 5`` is 5).
    headers: list[Header]
    connection: str | None
    #: The body's Content-Length, if it has one.
    length: int | None
    chunked: bool
    #: Whether the connection may carry another request (HTTP/1.1, no ``close``).
    keep_alive: bool

    def header(self, name: str) -> str | None:
        """The first value of a field (names are case-insensitive)."""
        name = name.lower()
        return next((value for n, value in self.headers if n.lower() == name), None)


Event = Head | bytes | Signal

# -- the head ------------------------------------------------------------------------------

#: The end of a head: a line end, then an empty line (bare LF line ends are
#: accepted, RFC 9112 section 2.2).
_HEAD_END = re.compile(rb"\n\r?\n")
#: A control character other than HTAB, CR and LF (RFC 9110 section 5.5).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_STATUS_LINE = re.compile(r"HTTP/1\.([0-9]) ([0-9]{3})(?: (.*))?")
#: Field lines: a token, a colon straight after it, the value (any line end
#: is CRLF or LF: bare CRs were refused before). ``_FIELD_LINES`` checks the
#: whole block; ``_FIELD_LINE`` takes each name and value (whitespace before
#: the value skipped, after it still there).
_FIELD_LINES = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r?\n)*")
_FIELD_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*)\r?\n")
#: obs-fold: a line end followed by whitespace continues the value (RFC 9112
#: section 5.2: replaced by a space).
_OBS_FOLD = re.compile(r"\r?\n[ \t]+")


def parse_head(data: bytes) -> Head:
    """Parse one response head (the bytes up to, not including, its empty line).

    Raises ResponseError for any head that could be read two ways: a bare
    CR or control character, a line that is not a field, Transfer-Encoding
    other than a lone ``chunked``, Transfer-Encoding with Content-Length, or
    a Content-Length that is not one decimal number (``5, 7``, ``-5``, ``5x``).
    """
    if _CONTROL.search(data) or data.count(b"\r") != data.count(b"\r\n"):
        raise ResponseError(f"control character or bare CR in the response head: {data[:100]!r}")
    status, _, block = data.decode("latin-1").partition("\n")
    status_line = _STATUS_LINE.fullmatch(status.removesuffix("\r"))
    if status_line is None or status_line[2][0] == "0":  # no status below 100
        raise ResponseError(f"invalid status line: {status[:100]!r}")
    if block[:1] in (" ", "\t"):
        raise ResponseError("response head starts with a continuation line")
    if block and not block.endswith("\n"):
        block += "\n"
    if not _FIELD_LINES.fullmatch(block):
        block = _OBS_FOLD.sub(" ", block)
        if not _FIELD_LINES.fullmatch(block):
            line = next(line for line in block.splitlines() if not _FIELD_LINES.fullmatch(line + "\n"))
            raise ResponseError(f"invalid field line in the response head: {line[:100]!r}")
    fields = _FIELD_LINE.findall(block)
    if len(fields) > MAX_FIELDS:
        raise ResponseError(f"more than {MAX_FIELDS} fields in the response head")

    headers: list[Header] = []
    length = None
    codings: list[str] = []
    connection = None
    for name, value in fields:
        value = value.rstrip(" \t")
        lower = name.lower()
        if lower == "content-length":
            for part in value.split(","):
                part = part.strip(" \t")
                if not (part.isascii() and part.isdigit()) or (length is not None and int(part) != length):
                    raise ResponseError(f"invalid Content-Length {value!r}")
                length = int(part)
            continue
        if lower == "transfer-encoding":
            codings.extend(coding.strip(" \t").lower() for coding in value.split(","))
        elif lower == "connection":
            connection = value if connection is None else f"{connection}, {value}"
        headers.append((name, value))
    if codings and (codings != ["chunked"] or length is not None):
        raise ResponseError(f"ambiguous framing: Transfer-Encoding {codings}, Content-Length {length}")
    if length is not None:
        headers.append(("Content-Length", str(length)))
    keep_alive = status_line[1] == "1" and "close" not in connection_tokens(connection)
    return Head(
        status=int(status_line[2]),
        reason=status_line[3] or "",
        headers=headers,
        connection=connection,
        length=length,
        chunked=bool(codings),
        keep_alive=keep_alive,
    )


# -- the reader ----------------------------------------------------------------------------

#: A chunk-size line, with any chunk extensions (RFC 9112 section 7.1.1).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")

# Reader states: what the next bytes are.
_HEAD, _LENGTH, _UNTIL_CLOSE, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _DONE = range(8)


class ResponseReader:
    """One answer's reader: ``feed`` it bytes, take ``next_event`` until
    ``Signal.END``. ``method`` is the request's (a HEAD answer has no body);
    a 101 is taken as the answer only if ``upgrade`` (the request asked)."""

    __slots__ = (
        "_head_method",
        "_upgrade",
        "_buf",
        "_pos",
        "_searched",
        "_eof",
        "_state",
        "_left",
        "_keep",
        "_trailers",
    )

    def __init__(self, method: str, upgrade: bool = False) -> None:
        self._head_method = method == "HEAD"
        self._upgrade = upgrade
        #: Bytes fed and not yet taken start at ``_pos``.
        self._buf = b""
        self._pos = 0
        #: Where the search for the head's end resumes.
        self._searched = 0
        self._eof = False
        self._state = _HEAD
        #: Body bytes left: of the Content-Length, or of the current chunk.
        self._left = 0
        #: Whether the framing lets the connection carry another request.
        self._keep = False
        self._trailers = 0

    def feed(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the stream ended."""
        if not data:
            self._eof = True
            return
        pos = self._pos
        if pos:
            self._buf = self._buf[pos:] + data
            self._searched = max(self._searched - pos, 0)
            self._pos = 0
        elif self._buf:
            self._buf += data
        else:
            self._buf = data

    @property
    def reusable(self) -> bool:
        """Whether the answer ended exactly, nothing came after it, and its
        framing lets the connection carry another request."""
        return self._state == _DONE and self._keep and self._pos == len(self._buf) and not self._eof

    def unfed_body(self) -> int:
        """How many bytes of a Content-Length body are still to come beyond
        those fed: what may go from the socket to the client past the
        reader (``bypass``). 0 for any other answer (chunked, delimited by
        the close, without a body), before the head, and once every byte of
        the body was fed."""
        if self._state != _LENGTH or self._eof:
            return 0
        return max(self._left - (len(self._buf) - self._pos), 0)

    def bypass(self, size: int) -> None:
        """Count ``size`` bytes of a Content-Length body as read that were
        never fed (they went from the socket to the client past the reader),
        once the body bytes the reader held were taken (``next_event``). When
        none is left the answer has ended, and ``reusable`` says whether the
        connection may carry another request, as if they had been fed.
        Raises ValueError for bytes the reader cannot be bypassed for."""
        if self._state != _LENGTH or self._pos != len(self._buf) or not 0 < size <= self._left:
            raise ValueError(f"{size} body bytes cannot go past the reader now")
        self._left -= size
        if not self._left:
            self._state = _DONE

    def take_buffered(self) -> bytes:
        """The bytes fed and not taken (after a 101, the new protocol's first)."""
        data = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        return data

    def next_event(self) -> Event:
        """The next event (see the module's docstring)."""
        while True:
            state = self._state
            if state == _LENGTH:
                return self._body(_DONE)
            if state == _DONE:
                return Signal.END
            if state == _HEAD:
                return self._head()
            if state == _CHUNK_DATA:
                return self._body(_CHUNK_END)
            if state == _UNTIL_CLOSE:
                if self._pos == len(self._buf):
                    if not self._eof:
                        return Signal.NEED_DATA
                    self._state = _DONE
                    return Signal.END
                return self._take(len(self._buf) - self._pos)
            # Chunked framing: lines, consumed without an event of their own.
            if state == _CHUNK_END:
                line = self._line(2)
                if line is None:
                    return Signal.NEED_DATA
                if line:
                    raise ResponseError("chunk data not followed by CRLF")
                self._state = _CHUNK_SIZE_LINE
            elif state == _CHUNK_SIZE_LINE:
                line = self._line(_MAX_CHUNK_LINE)
                if line is None:
                    return Signal.NEED_DATA
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise ResponseError(f"invalid chunk-size line {line[:100]!r}")
                self._left = int(match[1], 16)
                self._state = _CHUNK_DATA if self._left else _TRAILERS
            else:  # _TRAILERS: fields dropped, up to the empty line
                line = self._line(MAX_HEAD_BYTES)
                if line is None:
                    return Signal.NEED_DATA
                if not line:
                    self._state = _DONE
                    return Signal.END
                self._trailers += 1
                if self._trailers > MAX_FIELDS:
                    raise ResponseError(f"more than {MAX_FIELDS} trailer fields")

    def _head(self) -> Event:
        while True:
            buf, pos = self._buf, self._pos
            end = _HEAD_END.search(buf, max(self._searched, pos), pos + MAX_HEAD_BYTES)
            if end is None:
                if len(buf) - pos >= MAX_HEAD_BYTES:
                    raise ResponseError(f"response head longer than {MAX_HEAD_BYTES} bytes")
                if self._eof:
                    if len(buf) > pos:
                        raise ResponseError("next-hop closed the connection in the middle of the response head")
                    raise NoAnswer("next-hop closed the connection before answering")
                self._searched = max(len(buf) - 2, pos)
                return Signal.NEED_DATA
            head = parse_head(buf[pos : end.start() + 1])
            self._pos = self._searched = end.end()
            status = head.status
            if status == 101:
                if not self._upgrade:
                    raise ResponseError("101 Switching Protocols to a request that asked for no upgrade")
            elif status < 200:
                # 100 Continue, 102, 103 Early Hints: taking one for the final
                # answer would pair the next answer on the connection with this request.
                continue
            if self._head_method or status in (204, 304) or status < 200:
                # No body, whatever the head says; and a body sent anyway may
                # arrive after the connection went back to the pool, to be read
                # as the answer to the next request on it: never reuse these.
                self._state = _DONE
            elif head.chunked:
                self._state, self._keep = _CHUNK_SIZE_LINE, head.keep_alive
            elif head.length is not None:
                self._state = _LENGTH if head.length else _DONE
                self._left, self._keep = head.length, head.keep_alive
            else:
                self._state = _UNTIL_CLOSE
            return head

    def _body(self, then: int) -> Event:
        """Body bytes of the Content-Length or of the current chunk; ``then``
        is the state once they are all taken."""
        available = len(self._buf) - self._pos
        if not available:
            if self._eof:
                raise ResponseError("next-hop closed the connection before the end of the body")
            return Signal.NEED_DATA
        data = self._take(min(available, self._left))
        self._left -= len(data)
        if not self._left:
            self._state = then
        return data

    def _take(self, size: int) -> bytes:
        """``size`` buffered bytes; the buffer itself when that is all of it."""
        buf, pos = self._buf, self._pos
        if not pos and size == len(buf):
            self._buf = b""
            return buf
        self._pos = pos + size
        return buf[pos : pos + size]

    def _line(self, limit: int) -> bytes | None:
        """One line of chunked framing without its line end, or None until
        it is complete."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\n", pos, pos + limit + 1)
        if end == -1:
            if len(buf) - pos > limit:
                raise ResponseError("chunked framing line too long")
            if self._eof:
                raise ResponseError("next-hop closed the connection inside the chunked framing")
            return None
        self._pos = end + 1
        if end > pos and buf[end - 1] == 0x0D:
            end -= 1
        return buf[pos:end]
