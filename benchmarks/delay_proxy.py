"""A TCP proxy that delays every byte by a fixed time in each direction: a network hop.

``DelayProxy(("127.0.0.1", 5432), delay_s=0.001)`` listens on a free port of 127.0.0.1; each chunk
read from one side is written to the other ``delay_s`` later, in order. With 1 ms each way a
PostgreSQL round trip on loopback becomes about 2.1-3 ms, as between an app and a Neon compute in
the same region; 20 ms each way is another region.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class DelayProxy:
    """Forward connections to ``target``, delaying each direction by ``delay_s``."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        self.target = target
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            for source, sink in ((client, server), (server, client)):
                pending: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
                threading.Thread(target=self._read, args=(source, pending), daemon=True).start()
                threading.Thread(target=self._write, args=(sink, pending), daemon=True).start()

    def _read(
        self, source: socket.socket, pending: queue.SimpleQueue[tuple[float, bytes]]
    ) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                pending.put((time.perf_counter() + self.delay_s, data))
        pending.put((0.0, b""))  # end of stream

    def _write(self, sink: socket.socket, pending: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = pending.get()
                if not data:
                    break
                # Sleep most of the wait, then spin: sleep alone overshoots by 50-100 us.
                while (left := due - time.perf_counter()) > 0:
                    time.sleep(left - 0.0002) if left > 0.0003 else None
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def url(self, template: str) -> str:
        """``template`` (a URL of the real server) rewritten to go through the proxy."""
        import sqlalchemy as sa

        url = sa.make_url(template).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
