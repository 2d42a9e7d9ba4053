"""HTTP/1.1 over a raw socket, for the tests that play slow or misbehaving clients: one response
read off a socket, and whether the server then closed the connection."""

from __future__ import annotations

import socket


def read_response(
    sock: socket.socket, timeout: float, wait_for_close: bool = True
) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed): the response, and (``wait_for_close``) whether the
    server then closed the connection (EOF within ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    if not wait_for_close:
        return status, headers, body, False
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:
        # The server closed with bytes of ours still unread (a client that kept sending after
        # the answer): TCP resets instead of a clean EOF. Closed all the same.
        closed = True
    except TimeoutError:
        closed = False
    return status, headers, body, closed
