"""Origins for the tunnel tests: a real WebSocket server and a raw Upgrade one.

``WsOrigin`` is the ``websockets`` library's asyncio server on 127.0.0.1,
running its own event loop in a thread. It records every handshake request
(one per TCP connection) and how each WebSocket ended. Paths (any query
string is ignored, so tests can make their requests unique):

- ``/echo``          echoes every message
- ``/server-close``  sends one message, then closes with 4000 "bye"
- ``/server-ping``   pings the client, reports the pong, then echoes
- ``/refuse``        refuses the upgrade: 400 with a text body

Run as a script (``python ws_origin.py``) it serves the same in the
foreground and prints its port, so a test can kill it mid-tunnel.

``RawUpgradeOrigin`` speaks HTTP/1.1 on raw sockets (keep-alive, one thread
per connection; requests read by h11, answers written raw) and counts connections, so a test can tell the pooled
connection from a tunnel's. Any request without ``Upgrade`` gets 200 and
the connection stays open. With ``Upgrade``:

- ``/refuse``        400 with a body; the connection stays open
- ``/echo``          101, then echoes every byte until the peer closes
- ``/greet``         like ``/echo``, but sends ``GREETING`` in the same
                     write as the 101 head, before reading anything
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from dataclasses import dataclass, field

import h11
from origin import RequestReader
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

GREETING = b"greetings from the raw origin\n"


@dataclass
class Handshake:
    path: str
    headers: list[tuple[str, str]]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return ", ".join(values) if values else None


@dataclass
class WsOrigin:
    host: str = "127.0.0.1"
    port: int = 0
    handshakes: list[Handshake] = field(default_factory=list)
    #: ``(path and query, close code received, close reason received)`` per ended WebSocket.
    closed: list[tuple[str, int | None, str | None]] = field(default_factory=list)
    active: int = 0
    peak_active: int = 0
    pong_latencies: list[float] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.handshakes)

    def start(self) -> WsOrigin:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start_server():
            return await serve(
                self._handler,
                self.host,
                self.port,
                process_request=self._process_request,
                ping_interval=None,
                max_size=None,
                backlog=1024,
            )

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(start_server())
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("WebSocket origin did not start")
        return self

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), 5)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reset(self) -> None:
        self.handshakes.clear()
        self.closed.clear()
        self.pong_latencies.clear()

    def _process_request(self, connection: ServerConnection, request: Request):
        self.handshakes.append(Handshake(request.path, list(request.headers.raw_items())))
        if request.path.split("?")[0] == "/refuse":
            return connection.respond(400, "upgrade refused by origin\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?")[0]
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            if path == "/server-close":
                await ws.send("closing soon")
                await ws.close(4000, "bye")
                return
            if path == "/server-ping":
                pong = await ws.ping(b"from-origin")
                self.pong_latencies.append(await asyncio.wait_for(pong, 10))
                await ws.send("pong received")
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.active -= 1
            self.closed.append((ws.request.path, ws.close_code, ws.close_reason))


class RawUpgradeOrigin:
    """HTTP/1.1 keep-alive origin that switches to an echo on ``Upgrade``."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0
        #: ``(connection number, request head as text)`` in arrival order.
        self.requests: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> RawUpgradeOrigin:
        self._listener = socket.create_server((self.host, 0), backlog=512)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._listener.close()

    def reset(self) -> None:
        with self._lock:
            self.connections = 0
            self.requests.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = RequestReader(conn)
        try:
            while True:
                parsed = reader.head()
                if parsed is None:
                    return
                request, head = parsed
                with self._lock:
                    self.requests.append((number, head.decode("latin-1")))
                for _ in reader.body():  # none of these requests has a body worth keeping
                    pass
                target = request.target.decode("latin-1")
                upgrade = [v.decode("latin-1") for k, v in request.headers if k == b"upgrade"]
                common = f"X-Origin-Conn: {number}\r\n"
                if not upgrade:
                    body = b"plain\n"
                    conn.sendall(f"HTTP/1.1 200 OK\r\n{common}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    continue
                if target == "/refuse":
                    body = b"no upgrade here\n"
                    conn.sendall(
                        f"HTTP/1.1 400 Bad Request\r\n{common}Content-Type: text/plain\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    continue
                switch = (
                    f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {upgrade[-1]}\r\n{common}\r\n"
                ).encode()
                conn.sendall(switch + (GREETING if target == "/greet" else b""))
                self._echo(conn, reader.pending)
                return
        except (OSError, h11.RemoteProtocolError):  # the peer went away, or sent what h11 refuses
            return
        finally:
            conn.close()

    @staticmethod
    def _echo(conn: socket.socket, early: bytes) -> None:
        if early:
            conn.sendall(early)
        while data := conn.recv(65536):
            conn.sendall(data)


def _main() -> None:
    """Serve the WebSocket origin in the foreground until killed."""
    origin = WsOrigin().start()
    sys.stdout.write(f"{origin.port}\n")
    sys.stdout.flush()
    threading.Event().wait()


if __name__ == "__main__":
    _main()
