"""The client's request body, read from Gunicorn's ``wsgi.input`` as it is forwarded.

Downstream-side code: it knows the WSGI environ and the configured body
limit, nothing about next-hop. The upstream client only iterates it, and
its errors (``ClientBodyError``, ``BodyTooLarge``) pass through that client
unchanged, so that the app answers them with 400 or 413, never as a
failure of next-hop.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from . import internals, splice
from .sockets import BLOCK_SIZE, send_all

__all__ = ["BodyTooLarge", "ClientBodyError", "LimitedBody", "RequestBody", "request_body"]


class ClientBodyError(Exception):
    """Reading the client's request body failed (bad chunked framing, or the
    client went away); the request cannot be completed."""


class BodyTooLarge(Exception):
    """The client's body passed ``upstream.max_body_bytes``."""


class RequestBody:
    """The client's body as an iterator, remembering whether reading began
    (a request whose body was partly sent cannot be retried)."""

    __slots__ = ("_input", "_remaining", "started", "bytes_read", "unfinished")

    def __init__(self, wsgi_input: BinaryIO, length: int | None) -> None:
        self._input = wsgi_input
        self._remaining = length
        self.started = False
        self.bytes_read = 0
        #: The body was taken from Gunicorn and did not all get through: the
        #: rest of it is still on the connection (or lost), so the connection
        #: must close after the answer, or its next "request" would start mid-body.
        self.unfinished = False

    def splice_to(self, sock: socket.socket, head: bytes) -> bool:
        """Send ``head`` and a Content-Length body to ``sock``, the body by
        splice(2) (``proxy.splice``) after the bytes Gunicorn already read
        of it, which leave with the head; False, with nothing sent, when it
        cannot go that way (chunked, a middleware's ``wsgi.input``, no
        splice here): iterate it instead."""
        length = self._remaining
        if length is None or not splice.AVAILABLE or self.started:
            return False
        taken = internals.take_length_body(self._input)
        if taken is None:
            return False
        self.started = True
        try:
            send_all(sock, head + taken.held)
            self.bytes_read += len(taken.held)
            for moved in splice.move(taken.sock, sock, taken.remaining):
                self.bytes_read += moved
        except splice.SourceError as exc:  # the client's side; next-hop's raises OSError
            if exc.cause is None:
                raise ClientBodyError(_short(exc.left)) from exc
            raise ClientBodyError(_read_failed(exc.cause)) from exc
        finally:
            self.unfinished = self.bytes_read < length
        return True

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        read = self._input.read
        remaining = self._remaining
        while remaining is None or remaining > 0:
            try:
                chunk = read(BLOCK_SIZE if remaining is None else min(BLOCK_SIZE, remaining))
            except Exception as exc:
                raise ClientBodyError(_read_failed(exc)) from exc
            if not chunk:
                if remaining:
                    # next-hop was promised ``Content-Length`` bytes: ending
                    # short would let it take the start of the next request
                    # on a pooled connection for the rest of this body.
                    raise ClientBodyError(_short(remaining))
                break
            self.bytes_read += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


class LimitedBody(RequestBody):
    """A chunked request body that stops at the configured limit."""

    __slots__ = ("_limit",)

    def __init__(self, wsgi_input: BinaryIO, limit: int) -> None:
        super().__init__(wsgi_input, None)
        self._limit = limit

    def __iter__(self) -> Iterator[bytes]:
        # Never ask for more than one byte past the limit: a read blocks until
        # it has all it asked for, and a client pausing after crossing the
        # limit must get its 413 now, not when it sends more.
        self.started = True
        read = self._input.read
        limit = self._limit
        while True:
            try:
                chunk = read(min(BLOCK_SIZE, limit - self.bytes_read + 1))
            except Exception as exc:
                raise ClientBodyError(_read_failed(exc)) from exc
            if not chunk:
                return
            self.bytes_read += len(chunk)
            if self.bytes_read > limit:
                raise BodyTooLarge()
            yield chunk


# What the log says of a client's body that failed, however it was being read
# (from Gunicorn's ``wsgi.input``, or spliced past it).


def _read_failed(exc: BaseException) -> str:
    return f"reading the request body failed: {exc!r}"


def _short(left: int) -> str:
    return f"the client closed its body {left} bytes short of its Content-Length"


def request_body(environ: Mapping[str, Any], limit: int | None) -> tuple[RequestBody | None, bool]:
    """The client's body to forward, if any, and whether it is chunked.

    A Content-Length over ``limit`` was refused before this point (without
    reading the body); a chunked body is stopped when it crosses it.
    """
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        if limit is None:
            return RequestBody(environ["wsgi.input"], None), True
        return LimitedBody(environ["wsgi.input"], limit), True
    length = environ.get("CONTENT_LENGTH")
    if length and length != "0":
        return RequestBody(environ["wsgi.input"], int(length)), False
    return None, False
