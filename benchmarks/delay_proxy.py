"""A TCP proxy that delays every byte by a fixed time in each direction: a network hop.

``DelayProxy(("127.0.0.1", 5432), delay_s=0.001)`` listens on a free port of 127.0.0.1; each chunk
read from one side is written to the other ``delay_s`` later, in order. With 1 ms each way a
PostgreSQL round trip on loopback becomes about 2.1-3 ms, as between an app and a Neon compute in
the same region; 20 ms each way is another region.

It also counts round trips. A round trip (a :class:`Flight`) is what a client sends after the
last answer reached it: bytes sent back to back with no answer in between (a pipeline, a
``BEGIN;`` prefix) are one round trip, and a message sent without waiting for its reply (a
``ROLLBACK`` after the response) is one too. Each flight records when it reached the proxy and
when the first bytes of its answer were passed on to the client, on ``time.perf_counter()``'s
clock, so a caller can tell the round trips a request waited for from those sent after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import socket
import threading
import time


@dataclasses.dataclass
class Flight:
    """One round trip on one connection."""

    connection: int
    #: When its first bytes reached the proxy.
    sent: float
    #: When the first bytes of the answer were passed on to the client (None: not yet).
    answered: float | None = None


class DelayProxy:
    """Forward connections to ``target``, delaying each direction by ``delay_s``."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        self.target = target
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        #: Every round trip so far, in the order they were sent.
        self.flights: list[Flight] = []
        #: When each connection was accepted.
        self.connections: list[float] = []
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
            with self._lock:
                number = len(self.connections)
                self.connections.append(time.perf_counter())
            # The flight awaiting its answer on this connection, shared by both directions.
            awaiting: list[Flight | None] = [None]
            for source, sink, upstream in ((client, server, True), (server, client, False)):
                pending: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
                threading.Thread(
                    target=self._read,
                    args=(source, pending, upstream, number, awaiting),
                    daemon=True,
                ).start()
                threading.Thread(
                    target=self._write, args=(sink, pending, upstream, awaiting), daemon=True
                ).start()

    def _read(
        self,
        source: socket.socket,
        pending: queue.SimpleQueue[tuple[float, bytes]],
        upstream: bool,
        number: int,
        awaiting: list[Flight | None],
    ) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                now = time.perf_counter()
                if upstream:
                    with self._lock:
                        if awaiting[0] is None:
                            awaiting[0] = Flight(number, now)
                            self.flights.append(awaiting[0])
                pending.put((now + self.delay_s, data))
        pending.put((0.0, b""))  # end of stream

    def _write(
        self,
        sink: socket.socket,
        pending: queue.SimpleQueue[tuple[float, bytes]],
        upstream: bool,
        awaiting: list[Flight | None],
    ) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = pending.get()
                if not data:
                    break
                # Sleep most of the wait, then spin: sleep alone overshoots by 50-100 us.
                while (left := due - time.perf_counter()) > 0:
                    time.sleep(left - 0.0002) if left > 0.0003 else None
                if not upstream:
                    # An answer reaches the client: what it sends next is a new round trip.
                    with self._lock:
                        flight, awaiting[0] = awaiting[0], None
                        if flight is not None:
                            flight.answered = time.perf_counter()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def flights_between(self, start: float, end: float) -> list[Flight]:
        """The round trips sent from ``start`` to ``end`` (``time.perf_counter()`` values)."""
        with self._lock:
            return [flight for flight in self.flights if start <= flight.sent < end]

    def connections_between(self, start: float, end: float) -> int:
        """How many connections were opened from ``start`` to ``end``."""
        with self._lock:
            return sum(start <= opened < end for opened in self.connections)

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
