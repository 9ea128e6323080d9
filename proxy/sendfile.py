"""Response bodies sent from a file with ``sendfile(2)``, without blocking the loop.

gevent's ``socket.sendfile`` does not use ``os.sendfile`` (it reads the
file in 8 KiB blocks and ``send``s them, see gevent's ``_socket3``), so a
cache hit would be copied through Python. Here ``os.sendfile`` runs on the
socket's descriptor, which gevent keeps non-blocking: when the socket's
buffer is full the greenlet waits for it to drain with gevent's public
``wait_write``, and the other greenlets run meanwhile.

``FileRegion`` is what the cache hands the server through the WSGI
``wsgi.file_wrapper``; the worker's response (``proxy.worker``) sends it
with ``send_region``, or iterates it in blocks where sendfile is off.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from typing import BinaryIO

from gevent.socket import wait_write  # type: ignore[import-untyped]

from .sockets import BLOCK_SIZE

__all__ = ["FileRegion", "send_region"]


class FileRegion:
    """``length`` bytes of an open file from ``offset``. ``done`` is how many
    were sent (or handed out by ``read``); ``failed`` says the file ended
    before the region did (it was cut under us: the client must not get a
    short body passed off as complete, so the sender raises)."""

    __slots__ = ("file", "offset", "length", "done", "failed")

    def __init__(self, file: BinaryIO, offset: int, length: int) -> None:
        self.file = file
        self.offset = offset
        self.length = length
        self.done = 0
        self.failed = False

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

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(BLOCK_SIZE):
            yield block

    def close(self) -> None:
        self.file.close()


def send_region(sock: socket.socket, head: bytes, region: FileRegion) -> None:
    """``head`` then the region's bytes. The head goes with ``MSG_MORE``, so the
    kernel holds it back and it leaves in the same segment as the first body
    bytes."""
    view = memoryview(head)
    while view:
        view = view[sock.send(view, socket.MSG_MORE) :]
    out, src = sock.fileno(), region.fileno()
    timeout = sock.gettimeout()
    while region.done < region.length:
        try:
            sent = os.sendfile(out, src, region.offset + region.done, region.length - region.done)
        except BlockingIOError:
            wait_write(out, timeout=timeout)
            continue
        if sent == 0:
            raise region._cut()
        region.done += sent
