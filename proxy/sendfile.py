"""Response bodies the worker's response sends itself, without copying them
through Python: from a file with ``sendfile(2)``, without blocking the loop.

``Region`` is what the app hands the server, in the WSGI
``wsgi.file_wrapper``, for a body of known length that nothing above the
server needs to read: a stored one (``FileRegion``, the cache's hits) or
next-hop's (``proxy.app``'s spliced relay, by ``splice(2)``). The worker's
response (``proxy.worker``) calls ``Region.send``; with Gunicorn's
``sendfile`` setting off (the operator's "no zero-copy" switch) it does
not, and Gunicorn iterates the wrapper, which ``read``s the region in
blocks.

gevent's ``socket.sendfile`` does not use ``os.sendfile`` (it reads the
file in 8 KiB blocks and ``send``s them, see gevent's ``_socket3``), so a
cache hit would be copied through Python. Here ``os.sendfile`` runs on the
socket's descriptor, which gevent keeps non-blocking: when the socket's
buffer is full the greenlet waits for it to drain with gevent's public
``wait_write``, and the other greenlets run meanwhile.
"""

from __future__ import annotations

import abc
import errno
import os
import socket
from collections.abc import Iterator
from typing import BinaryIO

from gevent.socket import wait_write  # type: ignore[import-untyped]

from .sockets import BLOCK_SIZE

__all__ = ["FileRegion", "Region"]


class Region(abc.ABC):
    """A response body of ``length`` bytes that the server's response can
    send itself (``send``) or, where it does not, read in blocks (``read``).
    ``done`` is how many bytes were sent (or handed out by ``read``);
    ``failed`` says the source failed before the body was complete."""

    __slots__ = ("length", "done", "failed")

    def __init__(self, length: int) -> None:
        self.length = length
        self.done = 0
        self.failed = False

    @abc.abstractmethod
    def send(self, sock: socket.socket, head: bytes) -> None:
        """``head`` (the response head, held back so far), then the body, to
        the client's ``sock``, counting ``done``. ``head`` goes with
        ``MSG_MORE``, so the kernel holds it back and it leaves in the same
        segment as the first body bytes. The client's socket failing raises
        OSError; what the source failing does is the region's to say."""

    @abc.abstractmethod
    def read(self, size: int = -1) -> bytes:
        """The next body bytes (about ``size``); ``b""`` at the end."""

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(BLOCK_SIZE):
            yield block

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of the source (called once the response ended, sent or not)."""


class FileRegion(Region):
    """``length`` bytes of an open file from ``offset``, sent by sendfile(2).
    ``failed`` says the file ended before the region did (it was cut under
    us: the client must not get a short body passed off as complete, so the
    sender raises)."""

    __slots__ = ("file", "offset")

    def __init__(self, file: BinaryIO, offset: int, length: int) -> None:
        super().__init__(length)
        self.file = file
        self.offset = offset

    def fileno(self) -> int:
        return self.file.fileno()

    def _cut(self) -> OSError:
        self.failed = True
        return OSError(errno.EIO, f"file ended {self.length - self.done} bytes before the body did")

    def read(self, size: int = -1) -> bytes:
        """The next bytes of the region (at most ``size``), read with ``pread``."""
        left = self.length - self.done
        if size < 0 or size > left:
            size = left
        if size == 0:
            return b""
        data = os.pread(self.file.fileno(), size, self.offset + self.done)
        if not data:
            raise self._cut()
        self.done += len(data)
        return data

    def send(self, sock: socket.socket, head: bytes) -> None:
        """``head``, then the region by sendfile(2); a file cut under us raises OSError."""
        view = memoryview(head)
        while view:
            view = view[sock.send(view, socket.MSG_MORE) :]
        out, src = sock.fileno(), self.fileno()
        timeout = sock.gettimeout()
        while self.done < self.length:
            try:
                sent = os.sendfile(out, src, self.offset + self.done, self.length - self.done)
            except BlockingIOError:
                wait_write(out, timeout=timeout)
                continue
            if sent == 0:
                raise self._cut()
            self.done += sent

    def close(self) -> None:
        self.file.close()
