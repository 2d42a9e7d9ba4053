"""Servers the tests run in their own process: an ASGI app served for real by uvicorn on a free 127.0.0.1 port (in a thread), and free loopback ports."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

START_SECONDS = 30.0


def free_port() -> int:
    """A loopback port free now (another process may take it before it is used)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, **config) -> Iterator[str]:
    """Serve ``app`` with uvicorn (``config``: more ``uvicorn.Config`` options) in a thread of
    this process on a free 127.0.0.1 port; yields its base URL, stops it on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    try:
        deadline = time.monotonic() + START_SECONDS
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
