"""A minimal HTTP/1.1 origin for ``scale.py``'s streaming test (stdlib only).

``GET /bytes/N`` streams N zero bytes; ``GET /1k`` answers 1 KiB; any request
with a body (``POST /sink``) has it read to the end, then gets the byte count
back. Keep-alive, one thread per connection, loopback only.

usage: python stream_origin.py PORT
"""

import socket
import sys
import threading

BLOCK = 1 << 20
ZEROS = memoryview(bytes(BLOCK))


def _answer(conn: socket.socket, body: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def _stream(conn: socket.socket, size: int) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size)
    while size:
        step = min(size, BLOCK)
        conn.sendall(ZEROS[:step])
        size -= step


def handle(conn: socket.socket) -> None:
    reader = conn.makefile("rb")
    sink = bytearray(BLOCK)
    with conn, reader:
        while True:
            line = reader.readline(65537)
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            length = 0
            while True:
                header = reader.readline(65537)
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            received = 0
            view = memoryview(sink)
            while received < length:
                got = reader.readinto(view[: min(BLOCK, length - received)])
                if not got:
                    return
                received += got
            if method == "GET" and target.startswith("/bytes/"):
                _stream(conn, int(target[len("/bytes/") :]))
            elif method == "GET" and target == "/1k":
                _answer(conn, b"k" * 1024)
            else:
                _answer(conn, b"%d\n" % received)


def main() -> None:
    server = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
