"""Socket I/O shared by the worker and the upstream client.

Kept apart from the upstream client so that the worker module, which
Gunicorn's master imports before gevent patches anything, does not pull in
urllib3 (and ssl) with it.
"""

from __future__ import annotations

import socket

__all__ = ["BLOCK_SIZE", "send_all"]

#: Bytes read from a socket at a time, in both directions.
BLOCK_SIZE = 64 * 1024


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)``, minus the getsockopt() system call gevent's
    sendall makes before every write: one send() takes a small write whole."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
