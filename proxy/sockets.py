"""Writing to gevent sockets.

Kept apart from the upstream client so that the worker module, which
Gunicorn's master imports before gevent patches anything, does not pull in
urllib3 (and ssl) with it.
"""

from __future__ import annotations

import socket


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)``, minus the getsockopt() system call gevent's
    sendall makes before every write: one send() takes a small write whole."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
