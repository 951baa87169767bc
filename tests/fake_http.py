"""The HTTP server under the fake third-party APIs (OpenAI, WeChat, Telegram): a
threaded loopback server in a daemon thread."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # many clients connect at once (the default backlog is 5)


def serve(handler: type[BaseHTTPRequestHandler], port: int = 0) -> LoopbackServer:
    server = LoopbackServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def port_of(server: LoopbackServer | None) -> int:
    assert server is not None, "the fake is not started"
    return int(server.server_address[1])


def shutdown(server: LoopbackServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
