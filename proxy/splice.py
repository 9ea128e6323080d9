"""Bodies of known length moved between two sockets with splice(2).

A body of known length needs no inspection on its way through: the bytes
only have to arrive, in order and exactly as many as promised. So they go
socket -> pipe -> socket inside the kernel and never enter Python, instead
of a recv into a buffer and a send out of it, 64 KiB at a time. Both
directions use ``move``: request bodies from the client to next-hop
(``RequestBody.splice_to``), response bodies from next-hop to the client
(``Response.splice_to``, sent by the worker's response). Both sockets are
gevent's, non-blocking at the descriptor: when a side would block, the
greenlet waits on the event loop (gevent's public ``wait_read``/
``wait_write``) with that socket's own timeout.

``move`` knows nothing of which side is which: the source failing raises
``SourceError`` (neutral: how many bytes were missing, and the socket's
error if there was one), the destination failing raises its ``OSError``,
and each caller says what that means for its direction.

Each transfer takes a pipe from this process's pool and gives it back only
when it ended clean (the pipe empty); a transfer that failed closes its
pipe, since bytes may be left inside. The pool holds one pipe per transfer
in flight at its peak, never more than ``POOL_SIZE``.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator

from gevent.socket import wait_read, wait_write  # type: ignore[import-untyped]

__all__ = ["AVAILABLE", "PIPE_BYTES", "POOL_SIZE", "SourceError", "move", "send"]

#: Whether this platform has splice(2) (Linux; Python 3.10 and later).
AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
#: The size each pipe is asked for (Linux's default limit for unprivileged
#: processes, /proc/sys/fs/pipe-max-size); a pipe keeps what it was given.
PIPE_BYTES = 1024 * 1024
#: Idle pipes a process keeps for the next transfers.
POOL_SIZE = 64

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_pool: list[tuple[int, int, int]] = []


class SourceError(Exception):
    """The source's side failed: it ended ``left`` bytes short of the length
    (``cause`` None), or went silent past its socket's timeout or its socket
    broke (``cause`` is that OSError, ``socket.timeout`` included). The
    destination's side raises its OSError as it is."""

    def __init__(self, left: int, cause: OSError | None = None) -> None:
        super().__init__(f"the source ended {left} bytes short" if cause is None else f"the source failed: {cause!r}")
        self.left = left
        self.cause = cause


def _pipe() -> tuple[int, int, int]:
    """A pipe from the pool, or a new one: (read end, write end, capacity)."""
    if _pool:
        return _pool.pop()
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        capacity = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # a lower pipe-max-size: the default size works too
        capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, capacity


def move(src: socket.socket, dst: socket.socket, length: int, prefix: bytes = b"") -> Iterator[int]:
    """Move exactly ``length`` bytes from ``src`` to ``dst``, after ``prefix``;
    yields how many bytes reached ``dst`` at each step (``prefix``'s
    included, for the caller's counts).

    ``prefix`` (a response head) goes with ``MSG_MORE`` right before the
    first spliced bytes, so that the kernel holds it back and it leaves in
    the same segment as they do.
    """
    r, w, capacity = _pipe()
    clean = False
    src_fd, dst_fd = src.fileno(), dst.fileno()
    in_pipe = 0
    try:
        while length or in_pipe:
            if length and in_pipe < capacity:
                try:
                    n = os.splice(src_fd, w, min(length, capacity - in_pipe), flags=_FLAGS)
                except BlockingIOError:
                    n = -1
                except OSError as exc:
                    raise SourceError(length, exc) from exc
                if n == 0:
                    raise SourceError(length)
                if n > 0:
                    length -= n
                    in_pipe += n
                elif not in_pipe:
                    try:
                        wait_read(src_fd, timeout=src.gettimeout())
                    except OSError as exc:  # socket.timeout included
                        raise SourceError(length, exc) from exc
                    continue
            if prefix:
                yield from send(dst, prefix, socket.MSG_MORE)
                prefix = b""
            try:
                n = os.splice(r, dst_fd, in_pipe, flags=_FLAGS)
            except BlockingIOError:
                wait_write(dst_fd, timeout=dst.gettimeout())  # socket.timeout: the destination stopped reading
                continue
            in_pipe -= n
            yield n
        if prefix:  # nothing to splice (``length`` 0)
            yield from send(dst, prefix)
        clean = True
    finally:
        if clean and len(_pool) < POOL_SIZE:
            _pool.append((r, w, capacity))
        else:
            os.close(r)
            os.close(w)


def send(sock: socket.socket, data: bytes, flags: int = 0) -> Iterator[int]:
    """Send ``data`` to ``sock`` (gevent's send: the greenlet waits, with the
    socket's timeout, while its buffer is full); yields how many bytes each
    send took, for the caller's counts."""
    view = memoryview(data)
    while view:
        sent = sock.send(view, flags)
        view = view[sent:]
        yield sent
