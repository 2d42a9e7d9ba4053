"""service.server without a server: who counts as one client (IPv4 address, IPv6 /64, trusted
proxies not at all), the count table, the refusal's bytes, and the settings that bound them
(the server itself: tests/service/test_client_limits.py and test_slow_clients.py)."""

from __future__ import annotations

import json

import h11
import pytest
from pydantic import ValidationError

from jobs.settings import Settings
from service.server import ClientCounts, client_group, refusal_bytes, server_options


@pytest.mark.parametrize(
    ("host", "group"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client of a dual-stack socket
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),  # the same host, another of its addresses
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
        ("/run/aex.sock", None),
        ("", None),
    ],
)
def test_client_group(host, group):
    assert client_group(host) == group


def test_trusted_proxies_are_not_counted():
    counts = ClientCounts(2, ["10.0.0.0/8", "2001:db8:ff::/48"])
    assert counts.group_of(("10.1.2.3", 5000)) is None
    assert counts.group_of(("::ffff:10.1.2.3", 5000)) is None
    assert counts.group_of(("2001:db8:ff:1::9", 5000)) is None
    assert counts.group_of(("11.1.2.3", 5000)) == "11.1.2.3"
    assert counts.group_of(("2001:db8:fe:1::9", 5000)) == "2001:db8:fe:1::/64"
    assert counts.group_of(None) is None


def test_counts_stop_at_the_limit_and_forget_a_client_with_none():
    counts = ClientCounts(2, [])
    assert counts.take(counts.open, "a") and counts.take(counts.open, "a")
    assert not counts.take(counts.open, "a")
    assert counts.take(counts.open, "b")
    counts.give_back(counts.open, "a")
    assert counts.take(counts.open, "a")
    for group in ("a", "a", "b"):
        counts.give_back(counts.open, group)
    assert counts.open == {}


def test_the_refusal_is_a_whole_429_that_closes_the_connection():
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/healthz", headers=[("Host", "test")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(refusal_bytes())
    response = conn.next_event()
    body = conn.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 429
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close" and int(headers[b"retry-after"]) > 0
    assert json.loads(body.data)["error"]["code"] == "too_many_connections"
    assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_limits_must_leave_room_for_others_and_a_head_is_due_before_a_body():
    with pytest.raises(ValidationError, match="AEX_MAX_CONNECTIONS_PER_CLIENT"):
        Settings(max_connections=10, max_connections_per_client=10)
    with pytest.raises(ValidationError, match="AEX_HEAD_TIMEOUT_SECONDS"):
        Settings(head_timeout_seconds=30.0, body_timeout_seconds=30.0)
    assert Settings(max_connections=10, max_connections_per_client=9).connections_per_client() == 9
    assert Settings().connections_per_client() == Settings().max_connections // 4
    assert Settings(max_connections=3).connections_per_client() == 1


def test_trusted_proxies_are_networks():
    settings = Settings(trusted_proxies=" 10.0.0.0/8, 192.0.2.7 ,::1")
    assert settings.trusted_proxies == ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]
    assert Settings(**{"trusted_proxies": settings.as_env()["AEX_TRUSTED_PROXIES"]}).trusted_proxies == (
        settings.trusted_proxies
    )
    for bad in ("proxy.example.org", "10.0.0.1/8", "*"):
        with pytest.raises(ValidationError, match="AEX_TRUSTED_PROXIES"):
            Settings(trusted_proxies=bad)


def test_forwarded_headers_are_believed_from_trusted_proxies_only():
    options = server_options(Settings())
    assert options["proxy_headers"] is False  # uvicorn would otherwise believe 127.0.0.1
    options = server_options(Settings(trusted_proxies="10.0.0.0/8"))
    assert options["proxy_headers"] is True and options["forwarded_allow_ips"] == "10.0.0.0/8"
    assert options["ws"] == "none"


def test_each_server_has_its_own_count_table():
    settings = Settings(max_connections=8)
    first, second = server_options(settings)["http"], server_options(settings)["http"]
    assert first.counts is not second.counts
    assert first.counts.per_client == 2 and first.head_timeout == settings.head_timeout_seconds


def test_writes_of_one_loop_turn_leave_the_connection_as_one():
    """``CoalescedWrites`` over a real socket transport: a response's head and body written in
    one turn of the event loop reach the peer together when the turn ends, not one by one;
    ``close`` sends what is pending first."""
    import asyncio
    import socket

    from service.server import CoalescedWrites

    async def scenario() -> tuple[bool, bytes, bytes]:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        writes = CoalescedWrites(transport, loop)
        writes.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        writes.write(b"{}")
        try:
            peer.recv(1024)
            early = True
        except BlockingIOError:
            early = False  # nothing sent yet: the turn is not over
        assert writes.get_write_buffer_size() == 40
        await asyncio.sleep(0.05)
        together = peer.recv(1024)
        writes.write(b"last")
        writes.close()
        await asyncio.sleep(0.05)
        last = peer.recv(1024)
        peer.close()
        return early, together, last

    early, together, last = asyncio.run(scenario())
    assert not early and together == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}" and last == b"last"
