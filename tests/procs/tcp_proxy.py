"""A small TCP proxy for tests: put it between a client and a database server to cut links.

Threads, no asyncio, so it runs beside sync and async code alike. States:

- up: every byte is forwarded both ways;
- down: every open link is cut (both sockets shut down) and new connections are accepted and
  closed at once, so the client sees "lost connection" on its first read;
- a trigger (``cut_on``): when a client sends a packet containing a byte pattern, that packet
  is *not* forwarded, then either the proxy goes down (``then="down"``) or only that link is
  cut (``then="drop"``, the proxy stays up). Because the packet never reaches the server,
  the statement it carried certainly did not run: the cut is deterministic.

MariaDB and PostgreSQL both send SQL text in the clear here (no TLS on 127.0.0.1), so a
pattern such as ``b"XA COMMIT"`` or ``b"COMMIT PREPARED"`` matches the statement itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target``; cut links on demand."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: list[tuple[socket.socket, socket.socket]] = []
        self._down = False
        self._pattern: bytes | None = None
        self._then: Literal["down", "drop"] = "down"
        self._closed = False
        #: Set each time a trigger fires (cleared by ``cut_on``).
        self.triggered = threading.Event()
        #: How many packets a trigger swallowed.
        self.swallowed = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # -- control -----------------------------------------------------------------------

    def cut_on(self, pattern: bytes, *, then: Literal["down", "drop"] = "down") -> None:
        """Arm a trigger on client-to-server data containing ``pattern``."""
        with self._lock:
            self._pattern = pattern
            self._then = then
            self.triggered.clear()

    def disarm(self) -> None:
        """Forget the trigger."""
        with self._lock:
            self._pattern = None

    def down(self) -> None:
        """Cut every link and refuse new ones."""
        with self._lock:
            self._down = True
            links, self._links = self._links, []
        for pair in links:
            _kill(*pair)

    def up(self) -> None:
        """Accept and forward again."""
        with self._lock:
            self._down = False

    @property
    def is_down(self) -> bool:
        with self._lock:
            return self._down

    def close(self) -> None:
        """Stop listening and cut everything."""
        self._closed = True
        self.down()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    # -- plumbing ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.1)
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                refuse = self._down
            if refuse:
                _kill(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _kill(client)
                continue
            server.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if self._down:
                    _kill(client, server)
                    continue
                self._links.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    with self._lock:
                        pattern, then = self._pattern, self._then
                    if pattern is not None and pattern in tail + data:
                        self.swallowed += 1
                        self.triggered.set()
                        if then == "down":
                            self.down()
                        break
                    # A pattern split across two reads still matches.
                    tail = (tail + data)[-64:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._links = [p for p in self._links if src not in p]
            _kill(src, dst)


def _kill(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
