"""The request to next-hop leaves with its body's first bytes (issue 12:
head and first body bytes in one send), on real sockets with Gunicorn's
own parser and body readers in front."""

from __future__ import annotations

import socket

import pytest
from gunicorn.config import Config
from gunicorn.http.parser import RequestParser

from proxy.request_body import RequestBody
from proxy.upstream import send_request

HEAD = b"POST /x HTTP/1.1\r\nHost: next-hop\r\n\r\n"


class _Recording:
    """next-hop's socket, noting each write the proxy makes on it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.writes: list[bytes] = []

    def send(self, data: bytes, *flags: int) -> int:
        self.writes.append(bytes(data))
        return self._sock.send(data, *flags)

    def sendall(self, data: bytes, *flags: int) -> None:
        self.writes.append(bytes(data))
        self._sock.sendall(data, *flags)

    def fileno(self) -> int:
        return self._sock.fileno()


def _forward(client_sends: list[bytes], length: int | None) -> tuple[list[bytes], bytes]:
    """The client's request parsed by Gunicorn, its body forwarded with
    ``send_request``: the writes on next-hop's socket, and what it received."""
    client, server = socket.socketpair()
    upstream, next_hop = socket.socketpair()
    with client, server, upstream, next_hop:
        for sock in (client, server, next_hop):  # a stuck exchange fails the test, never hangs it
            sock.settimeout(10)
        client.sendall(client_sends[0])
        request = next(RequestParser(Config(), server, ("127.0.0.1", 1)))
        for data in client_sends[1:]:  # the rest of the body, once Gunicorn parsed the head
            client.sendall(data)
        recording = _Recording(upstream)
        send_request(recording, HEAD, RequestBody(request.body, length), length is None)  # type: ignore[arg-type]
        upstream.shutdown(socket.SHUT_WR)
        received = b""
        while data := next_hop.recv(1 << 16):
            received += data
        return recording.writes, received


def test_a_small_body_leaves_with_the_head_in_one_write():
    writes, received = _forward([b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"], 5)
    assert writes == [HEAD + b"hello"]
    assert received == HEAD + b"hello"


def test_a_chunked_body_s_first_chunk_leaves_with_the_head():
    writes, received = _forward(
        [b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"], None
    )
    assert writes == [HEAD + b"5\r\nhello\r\n", b"0\r\n\r\n"]
    assert received == HEAD + b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize("held", [0, 3])
def test_a_body_still_arriving_follows_the_head_byte_exact(held):
    """The head goes with what Gunicorn already read of the body (maybe
    nothing); the rest is spliced after it."""
    body = b"hello" + bytes(range(256)) * 400
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    writes, received = _forward([head + body[:held], body[held:]], len(body))
    assert writes[0] == HEAD + body[:held]
    assert received == HEAD + body
