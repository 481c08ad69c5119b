"""A small TCP proxy in front of a real PostgreSQL that misbehaves on demand.

It stands in for the network and for Neon's proxy: it can answer the first connections the way
Neon answers while a compute wakes up (an ErrorResponse ``Couldn't connect to compute node``),
delay new connections, accept them and never answer (a black hole), or cut every live
connection. Everything else is forwarded byte for byte to the real server.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import typing as t

Mode = t.Literal["forward", "blackhole"]


def _error_response(message: str, sqlstate: str = "XX000") -> bytes:
    fields = (
        b"SERROR\x00VERROR\x00C" + sqlstate.encode() + b"\x00M" + message.encode() + b"\x00\x00"
    )
    return b"E" + struct.pack("!I", len(fields) + 4) + fields


_ENCRYPTION_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest


def _read_startup(client: socket.socket) -> None:
    """Consume the client's startup packet, declining TLS and GSS encryption requests first."""
    while True:
        header = client.recv(8)
        if len(header) < 8:
            return
        length, code = struct.unpack("!II", header)
        if code in _ENCRYPTION_REQUESTS:
            client.sendall(b"N")
            continue
        remaining = length - 8
        while remaining > 0:
            chunk = client.recv(remaining)
            if not chunk:
                return
            remaining -= len(chunk)
        return


class FaultProxy:
    """Listen on 127.0.0.1:<free port> and forward to ``target``.

    Attributes:
        wake_failures: The next N connections get Neon's "compute waking" error and are closed.
        connect_delay: Seconds to wait before connecting a new client to the server.
        mode: ``forward`` or ``blackhole`` (accept, then never answer).
        accepted: Number of client connections accepted so far.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.wake_failures = 0
        self.connect_delay = 0.0
        self.mode: Mode = "forward"
        self.accepted = 0
        #: The text of every simple-protocol query the clients sent, in order.
        self.queries: list[str] = []
        #: Every statement the clients sent, in order: a Query message's text, a Parse
        #: message's (the extended protocol, psycopg 3's), ``EXECUTE <name>`` for a Bind of a
        #: statement prepared earlier.
        self.statements: list[str] = []
        #: The statements by round trip: each entry is what a client sent up to a message the
        #: server answers with ReadyForQuery (a Query, a Sync), the point where a client that
        #: wants the answer waits for it. psycopg2: one Query per entry; psycopg 3: its
        #: pipeline's Parse/Bind/Execute messages up to their Sync.
        self.exchanges: list[list[str]] = []
        #: A query starting with this text is held back until ``release`` is set; ``held``
        #: is set when one arrives (to see what happens before it reaches the server).
        self.hold: str | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def url(self, template: str) -> str:
        """``template`` (a URL of the real server) rewritten to go through the proxy."""
        from flask_neon._url import parse_url

        url = parse_url(template)
        rewritten = url.to_sqlalchemy().set(host="127.0.0.1", port=self.port)
        return rewritten.render_as_string(hide_password=False)

    def cut_all(self) -> int:
        """Close every live connection in both directions, like a dropped network."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server in pairs:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        return len(pairs)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.cut_all()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.wake_failures > 0:
            self.wake_failures -= 1
            with contextlib.suppress(OSError):
                _read_startup(client)
                client.sendall(_error_response("Couldn't connect to compute node"))
            client.close()
            return
        if self.mode == "blackhole":
            self._closed.wait()
            client.close()
            return
        if self.connect_delay:
            self._closed.wait(self.connect_delay)
        try:
            server = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._pairs.append((client, server))
        self._pump(client, server)

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        sockets = [client, server]
        parser = _ClientStream(self.queries, self.statements, self.exchanges)
        # A selector, not select(): it takes descriptors above 1023 (tests that open many).
        selector = selectors.DefaultSelector()
        try:
            for sock in sockets:
                selector.register(sock, selectors.EVENT_READ)
            while not self._closed.is_set():
                for key, _ in selector.select(0.5):
                    sock = t.cast(socket.socket, key.fileobj)
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        seen = len(self.statements)
                        parser.feed(data)
                        if self.hold and any(
                            query.startswith(self.hold) for query in self.statements[seen:]
                        ):
                            self.held.set()
                            self.release.wait()
                    (server if sock is client else client).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                if (client, server) in self._pairs:
                    self._pairs.remove((client, server))


class _ClientStream:
    """Follows the client's half of the protocol and records its statements: each Query ('Q')
    message, each Parse ('P'), each Bind ('B') of a named statement, and where a Query or a
    Sync ('S') ends an exchange."""

    def __init__(
        self,
        queries: list[str],
        statements: list[str] | None = None,
        exchanges: list[list[str]] | None = None,
    ) -> None:
        self.queries = queries
        self.statements = statements if statements is not None else []
        self.exchanges = exchanges if exchanges is not None else []
        self.pending: list[str] = []
        self.buffer = b""
        self.started = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if not self.started:
                if len(self.buffer) < 8:
                    return
                length, code = struct.unpack("!II", self.buffer[:8])
                if len(self.buffer) < length:
                    return
                self.buffer = self.buffer[length:]
                # SSLRequest and GSSENCRequest come before the real startup packet.
                self.started = code not in _ENCRYPTION_REQUESTS
                continue
            if len(self.buffer) < 5:
                return
            kind = self.buffer[:1]
            (length,) = struct.unpack("!I", self.buffer[1:5])
            if len(self.buffer) < 1 + length:
                return
            payload, self.buffer = self.buffer[5 : 1 + length], self.buffer[1 + length :]
            if kind == b"Q":
                text = payload.rstrip(b"\x00").decode("utf-8", "replace")
                self.queries.append(text)
                self._statement(text)
                self._exchange()
            elif kind == b"P":  # Parse: statement name, query, parameter types
                text = payload.split(b"\x00", 2)[1].decode("utf-8", "replace")
                self._statement(text)
            elif kind == b"B":  # Bind: portal name, statement name, ...
                name = payload.split(b"\x00", 2)[1]
                if name:
                    self._statement(f"EXECUTE {name.decode('utf-8', 'replace')}")
            elif kind == b"S":
                self._exchange()

    def _statement(self, text: str) -> None:
        self.pending.append(text)
        self.statements.append(text)

    def _exchange(self) -> None:
        self.exchanges.append(self.pending)
        self.pending = []
