"""Callback hardening: Standard Webhooks signatures, callback URLs redacted for display, and a host resolved once and pinned.

Signing (https://www.standardwebhooks.com): headers ``webhook-id`` (the job id: the same on
every retry), ``webhook-timestamp`` (Unix seconds of the attempt) and ``webhook-signature:
v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, the secret from AEX_CALLBACK_SECRET
(``whsec_`` + base64, as the spec writes secrets, or any text of 16 bytes or more).
Delivery: the callback host is resolved once; every address it resolves to must be
acceptable (a public address, or one the allow-list names as an IP address or network such
as ``10.0.0.0/8``; never 0.0.0.0 or ::; an IPv6 address that carries an IPv4 address, mapped,
compatible, SIIT, NAT64, 6to4 or Teredo, is judged as the IPv4 address it carries), and the
request goes to that address with the original ``Host`` and TLS server name, so a DNS answer
that changes between the check and the connection (rebinding) cannot send it elsewhere. Torch-free: the API process uses it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from models.errors import BadParameterError

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16
TOLERANCE_SECONDS = 300

Resolver = Callable[..., list]


# --- signatures --------------------------------------------------------------------------
def generate_callback_secret() -> str:
    """A new AEX_CALLBACK_SECRET: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def parse_callback_secret(text: str) -> bytes:
    """The HMAC key of a secret: the bytes after ``whsec_`` (base64), or the text's UTF-8."""
    text = (text or "").strip()
    if text.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise BadParameterError("AEX_CALLBACK_SECRET: the part after whsec_ is not base64") from None
    else:
        key = text.encode()
    if len(key) < MIN_SECRET_BYTES:
        raise BadParameterError(f"AEX_CALLBACK_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
    return key


def signature(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">``."""
    mac = hmac.new(secret, f"{msg_id}.{int(timestamp)}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signed_headers(secret: bytes, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers of ``body``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature(secret, msg_id, ts, body),
    }


def verify_signature(
    secret: bytes, headers: Mapping[str, str], body: bytes, tolerance: int = TOLERANCE_SECONDS, now: int | None = None
) -> bool:
    """What a receiver checks: a ``v1`` signature of ``body`` matches (compared in constant
    time) and the timestamp is within ``tolerance`` seconds of now."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, ts = lower.get("webhook-id"), lower.get("webhook-timestamp", "")
    if not msg_id or not ts.isdigit():
        return False
    if abs((int(time.time()) if now is None else now) - int(ts)) > tolerance:
        return False
    expected = signature(secret, msg_id, int(ts), body)
    return any(hmac.compare_digest(expected, sig) for sig in lower.get("webhook-signature", "").split())


# --- display -----------------------------------------------------------------------------
def redact_url(url: str | None) -> str | None:
    """Scheme, host, port and path of ``url``: no user info, query or fragment (a token in a
    callback URL's query stays out of job views, records and logs)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "(invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((parts.scheme, host + (f":{port}" if port else ""), parts.path, "", ""))


# --- addresses ---------------------------------------------------------------------------
def _networks(allowed: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for entry in allowed or []:
        try:
            out.append(ipaddress.ip_network(entry.strip().strip("[]"), strict=False))
        except ValueError:
            continue  # a host name
    return out


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of ``text`` (a zone index dropped); an IPv4-mapped IPv6 address as its IPv4
    address (it is that address on a dual-stack socket)."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: prefixes /48 to /96 inside it
_RFC6052_LENGTHS = (48, 56, 64, 96)


def _rfc6052(value: int, prefix: int) -> ipaddress.IPv4Address:
    """The IPv4 address an RFC 6052 translator embeds after a ``prefix``-bit prefix (bits 64-71,
    the ``u`` octet, skipped)."""
    raw = value.to_bytes(16, "big")
    if prefix == 96:
        return ipaddress.IPv4Address(raw[12:])
    raw = raw[:8] + raw[9:]
    return ipaddress.IPv4Address(raw[prefix // 8 : prefix // 8 + 4])


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (empty for any other address): IPv4-mapped
    ``::ffff:0:0/96``, IPv4-compatible ``::/96`` (not ``::`` nor ``::1``), SIIT
    ``::ffff:0:0:0/96``, NAT64 ``64:ff9b::/96`` and every RFC 6052 position of the local-use
    ``64:ff9b:1::/48``, 6to4 ``2002::/16`` and Teredo ``2001::/32`` (its server and client)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    value, high = int(ip), int(ip) >> 32
    low = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if high == 0:
        return [low] if value > 1 else []
    if high in (0xFFFF0000, 0x0064FF9B << 64):
        return [low]
    if ip in _NAT64_LOCAL:
        return [_rfc6052(value, n) for n in _RFC6052_LENGTHS]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return []


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address: ``is_global`` and none of the special ranges
    (Python's ``is_global`` alone calls ``::10.0.0.1`` or ``2002:a00:1::`` global); an address
    that carries an IPv4 address is judged by each one it carries."""
    embedded = embedded_ipv4(ip)
    if embedded:
        return all(is_public(v4) for v4 in embedded)
    special = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
    special = special or ip.is_unspecified or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    return ip.is_global and not special


def _on_list(ip, networks) -> bool:
    """In a network of the list, or carrying only IPv4 addresses that all are."""
    if any(ip in net for net in networks):
        return True
    embedded = embedded_ipv4(ip)
    usable = all(not (v4.is_unspecified or v4.is_multicast) for v4 in embedded)
    return bool(embedded) and usable and all(any(v4 in net for net in networks) for v4 in embedded)


def ip_on_allow_list(host: str, allowed: list[str]) -> bool:
    """Whether ``host`` is an IP address inside an IP or network entry of the allow-list (an
    IPv6 address that carries IPv4 addresses: when each of them is)."""
    try:
        ip = _address(host.strip("[]"))
    except ValueError:
        return False
    return _on_list(ip, _networks(allowed))


def address_allowed(address: str, host: str, allowed: list[str]) -> bool:
    """Whether a callback to ``host`` may connect to ``address``: a public unicast address
    (``is_public``: one that carries an IPv4 address is judged as that IPv4 address), or one
    inside an IP/network entry of ``allowed`` (``localhost`` on the list covers the loopback
    addresses of the name localhost). Never the unspecified or a multicast address."""
    ip = _address(address)
    if ip.is_unspecified or ip.is_multicast:
        return False
    if _on_list(ip, _networks(allowed)):
        return True
    if ip.is_loopback and host.lower().rstrip(".") == "localhost" and "localhost" in (allowed or []):
        return True
    return is_public(ip)


@dataclass(frozen=True)
class PinnedTarget:
    """Where a callback goes: ``url`` names the address, ``host_header`` and ``sni_hostname``
    the host the client named (certificates are checked against that name)."""

    url: str
    host_header: str
    sni_hostname: str
    address: str


def pin(url: str, allowed: list[str], resolve: Resolver | None = None) -> PinnedTarget:
    """Resolve the callback URL's host once and pin it to an acceptable address;
    BadParameterError when any address it resolves to is not (``OSError`` when it does not
    resolve: a transient failure)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = (resolve or socket.getaddrinfo)(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    refused = [a for a in addresses if not address_allowed(a, host, allowed)]
    if refused:
        raise BadParameterError(
            f"callback host {host} resolves to {', '.join(refused)}, which is not a public address "
            "nor inside an IP address or network of AEX_CALLBACK_ALLOWED_HOSTS"
        )
    address = str(_address(addresses[0]))
    netloc_host = f"[{address}]" if ":" in address else address
    userinfo, _, host_header = parts.netloc.rpartition("@")
    netloc = (f"{userinfo}@" if userinfo else "") + f"{netloc_host}:{port}"  # user info: httpx's Basic auth
    return PinnedTarget(
        url=urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
        host_header=host_header,
        sni_hostname=host,
        address=address,
    )
