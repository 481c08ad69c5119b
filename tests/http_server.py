"""A real HTTP server for a WSGI app in a background thread, and a small client to drive it.

The server is werkzeug's threaded server (what ``make_server(..., threaded=True)`` builds), bound
to a free port of 127.0.0.1. Unlike Flask's test client, requests cross a real socket and run in
the server's own threads, so client disconnects, concurrency and blocked views behave as in
production. The server keeps no per-request log lines (thousands of them would pile up in
pytest's capture) but records every error werkzeug would print, so a test can assert there was
none. Closing it waits, with a deadline, until every request thread has finished.

Everything here is plain socket and ``http.client`` code: usable outside pytest.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time
import traceback
import typing as t

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

if t.TYPE_CHECKING:
    import types

    from _typeshed.wsgi import WSGIApplication

HOST = "127.0.0.1"
#: Seconds a client waits for an answer: far above every bound a test asserts, so a hang
#: shows up as a failed bound or a socket timeout, never as a stuck test run.
CLIENT_TIMEOUT = 60.0
#: Seconds ``LiveServer.close`` waits for request threads still running.
CLOSE_TIMEOUT = 30.0


class _QuietHandler(WSGIRequestHandler):
    """Werkzeug's request handler without the access log line per request."""

    def log(self, type: str, message: str, *args: t.Any) -> None:
        if type == "error":
            t.cast(_Server, self.server).record_error(message % args if args else message)


class _Server(ThreadedWSGIServer):
    """``ThreadedWSGIServer`` that counts its request threads and records errors."""

    def __init__(self, app: WSGIApplication) -> None:
        # A handler class per server: werkzeug sets ``protocol_version`` on the class it gets.
        handler = type("Handler", (_QuietHandler,), {})
        super().__init__(HOST, 0, app, handler)
        self.errors: list[str] = []
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        """Request threads started and not finished yet."""
        with self._lock:
            return self._active

    def record_error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def log(self, type: str, message: str, *args: t.Any) -> None:
        # "Error on request" with the traceback of an exception that escaped the app.
        if type == "error":
            self.record_error(message % args if args else message)

    def handle_error(self, request: t.Any, client_address: t.Any) -> None:
        # An exception that escaped the request handler itself (socketserver prints it).
        self.record_error(traceback.format_exc())

    def process_request(self, request: t.Any, client_address: t.Any) -> None:
        # Counted here, in the accepting thread, so close() cannot miss a thread about to start.
        with self._lock:
            self._active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                self._active -= 1
            raise

    def process_request_thread(self, request: t.Any, client_address: t.Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._active -= 1


@dataclasses.dataclass(frozen=True)
class Reply:
    """One HTTP answer, with when the request started and how long it took (monotonic)."""

    status: int
    #: Header names in lower case.
    headers: dict[str, str]
    body: bytes
    started: float
    elapsed: float

    @property
    def ended(self) -> float:
        return self.started + self.elapsed

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> t.Any:
        return json.loads(self.body)


class LiveServer:
    """Serve ``app`` on ``http://127.0.0.1:<port>`` from a background thread.

    Use it as a context manager; leaving it stops accepting, waits for the request threads
    (failing after ``CLOSE_TIMEOUT``) and closes the listening socket.
    """

    def __init__(self, app: WSGIApplication) -> None:
        self._server = _Server(app)
        self.port: int = self._server.port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"live-server-{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def errors(self) -> list[str]:
        """Errors werkzeug would have printed: exceptions that escaped the app, and so on."""
        return list(self._server.errors)

    @property
    def active_requests(self) -> int:
        return self._server.active

    def request(
        self,
        method: str,
        path: str,
        json_body: t.Any = None,
        timeout: float = CLIENT_TIMEOUT,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Send one request on a new connection and read the whole answer."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            headers = dict(headers or {})
            data = None
            if json_body is not None:
                data = json.dumps(json_body).encode()
                headers["Content-Type"] = "application/json"
            started = time.monotonic()
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            body = response.read()
            elapsed = time.monotonic() - started
            return Reply(
                status=response.status,
                headers={name.lower(): value for name, value in response.getheaders()},
                body=body,
                started=started,
                elapsed=elapsed,
            )
        finally:
            connection.close()

    def get(self, path: str, timeout: float = CLIENT_TIMEOUT) -> Reply:
        return self.request("GET", path, timeout=timeout)

    def send_and_disconnect(self, method: str, path: str) -> None:
        """Send a request and close the socket at once, before any answer can arrive."""
        with socket.create_connection((HOST, self.port), timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )

    def close(self) -> None:
        """Stop serving and wait until every request thread has finished."""
        try:
            self._server.shutdown()
            self._thread.join(CLOSE_TIMEOUT)
            deadline = time.monotonic() + CLOSE_TIMEOUT
            while self._server.active:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{self._server.active} request thread(s) still running "
                        f"{CLOSE_TIMEOUT:g} s after the server stopped"
                    )
                time.sleep(0.01)
        finally:
            self._server.server_close()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()
