"""A small HTTP(S) server on a loopback address that answers fixed routes and counts what it is asked."""

from __future__ import annotations

import http.server
import ssl
import threading


class LoopbackServer:
    """Answers each path with ``(status, body)`` or ``(status, body, headers)`` (404 otherwise) and keeps
    every request it got in ``requests`` as ``(path, Host header)``. Listens on ``host`` (a loopback
    address) and ``port`` (0: a free one); with ``tls`` (a server-side SSL context) it speaks HTTPS. Use as
    a context manager, or call :meth:`close`."""

    def __init__(self, routes: dict[str, tuple], host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
                 port: int = 0):
        requests: list[tuple[str, str]] = []
        self.requests = requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append((self.path, self.headers.get("Host", "")))
                status, body, *rest = routes.get(self.path, (404, b"not found"))
                self.send_response(status)
                for name, value in (rest[0] if rest else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        assert host.startswith("127."), "test servers listen on loopback only"
        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
