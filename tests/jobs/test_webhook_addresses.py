"""IPv6 forms that carry an IPv4 address (mapped, compatible, SIIT, NAT64 both prefixes, 6to4,
Teredo) are judged as the IPv4 address they carry: at admission of the callback URL
(``check_callback_url``), on the allow-list, and for every address a host resolves to before
the callback connects (``pin``)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from jobs.callbacks import check_callback_url
from jobs.webhooks import address_allowed, embedded_ipv4, ip_on_allow_list, is_public, pin
from models.errors import BadParameterError


def teredo(server: str, client: str) -> str:
    """A Teredo address: 2001:0::/32, the server's IPv4 address, flags and port, then the
    client's IPv4 address with every bit flipped."""
    flipped = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | flipped
    return str(ipaddress.IPv6Address(value))


def nat64_local(v4: str, prefix: int) -> str:
    """``v4`` embedded in the local-use NAT64 prefix 64:ff9b:1::/48 at the RFC 6052 position of
    a ``prefix``-bit prefix (the octet at bits 64-71 left zero)."""
    raw = bytearray(ipaddress.IPv6Address("64:ff9b:1::").packed)
    octets = ipaddress.IPv4Address(v4).packed
    positions = [i for i in range(prefix // 8, 16) if i != 8][:4] if prefix != 96 else [12, 13, 14, 15]
    for i, octet in zip(positions, octets, strict=True):
        raw[i] = octet
    return str(ipaddress.IPv6Address(bytes(raw)))


FORMS = {
    "mapped": lambda v4: f"::ffff:{v4}",
    "compatible": lambda v4: f"::{v4}",
    "siit": lambda v4: f"::ffff:0:{v4}",
    "nat64": lambda v4: f"64:ff9b::{v4}",
    "6to4": lambda v4: str(ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(v4)) << 80) | 1)),
    "teredo client": lambda v4: teredo("8.8.8.8", v4),
    "teredo server": lambda v4: teredo(v4, "8.8.4.4"),
}
PRIVATE = ["10.1.2.3", "127.0.0.1", "169.254.169.254", "192.168.0.1", "172.16.0.1", "100.64.0.1", "0.0.0.0"]
PRIVATE += ["240.0.0.1", "224.0.0.1", "192.0.2.1", "198.18.0.1"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("v4", PRIVATE)
def test_a_form_carrying_a_private_ipv4_address_is_refused(form, v4):
    address = FORMS[form](v4)
    ip = ipaddress.ip_address(address)
    assert ip.is_unspecified or ipaddress.IPv4Address(v4) in embedded_ipv4(ip)  # ::0.0.0.0 is ::
    assert not address_allowed(address, "hooks.example.org", ["hooks.example.org"])
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(BadParameterError, match="not a public address"):
        pin("https://hooks.example.org/h?token=t", ["hooks.example.org"], resolve=resolver(address))


@pytest.mark.parametrize("form", FORMS)
def test_a_form_carrying_a_public_ipv4_address_is_judged_as_that_address(form):
    address = FORMS[form]("93.184.216.34")
    assert address_allowed(address, "hooks.example.org", ["hooks.example.org"])
    target = pin("https://hooks.example.org/h?token=t", ["hooks.example.org"], resolve=resolver(address))
    assert target.host_header == "hooks.example.org" and target.sni_hostname == "hooks.example.org"


@pytest.mark.parametrize("prefix", [48, 56, 64, 96])
def test_local_use_nat64_is_refused_at_every_prefix_length(prefix):
    for v4 in ("10.0.0.1", "8.8.8.8"):  # not globally routable, whatever it carries
        address = nat64_local(v4, prefix)
        assert ipaddress.IPv4Address(v4) in embedded_ipv4(ipaddress.ip_address(address))
        assert not address_allowed(address, "h", ["h"])
    assert address_allowed(nat64_local("10.0.0.1", prefix), "h", ["64:ff9b:1::/48"])  # named: allowed


def test_every_address_a_host_resolves_to_is_checked():
    public, hidden = "2606:4700::1111", FORMS["6to4"]("127.0.0.1")
    with pytest.raises(BadParameterError, match="not a public address"):
        pin("http://hooks.example.org/h", ["hooks.example.org"], resolve=resolver(public, hidden))
    assert pin("http://hooks.example.org/h", ["hooks.example.org"], resolve=resolver(public)).address == public


def test_the_allow_list_judges_the_ipv4_address_carried():
    allowed = ["10.0.0.0/8"]
    for form in FORMS:
        if form.startswith("teredo"):
            continue  # carries two addresses: both must be on the list
        assert ip_on_allow_list(FORMS[form]("10.1.2.3"), allowed), form
        assert address_allowed(FORMS[form]("10.1.2.3"), "h", allowed), form
        assert not ip_on_allow_list(FORMS[form]("192.168.1.1"), allowed), form
        assert not address_allowed(FORMS[form]("192.168.1.1"), "h", allowed), form
    assert not ip_on_allow_list(teredo("8.8.8.8", "10.1.2.3"), allowed)
    assert ip_on_allow_list(teredo("10.0.0.9", "10.1.2.3"), allowed)
    assert not address_allowed(FORMS["nat64"]("0.0.0.0"), "h", ["0.0.0.0/8"])  # never the unspecified address


@pytest.mark.parametrize("form", FORMS)
def test_admission_judges_a_literal_by_the_ipv4_address_it_carries(form):
    allowed = ["*.example.org", "10.0.0.0/8", "8.8.8.8", "8.8.4.4"]
    for v4 in ("169.254.169.254", "127.0.0.1", "192.168.0.1"):
        literal = FORMS[form](v4)
        with pytest.raises(BadParameterError, match="not allowed"):
            check_callback_url(f"http://[{literal}]/latest/meta-data?x=1", allowed)
    if not form.startswith("teredo"):
        url = f"http://[{FORMS[form]('10.1.2.3')}]:8080/h"
        assert check_callback_url(url, allowed) == url  # the network named on the list


def test_plain_addresses_keep_their_verdicts():
    for address in ("8.8.8.8", "2606:4700::1111", "2a00:1450::1"):
        assert address_allowed(address, "h", [])
    for address in ("::", "::1", "fe80::1", "fc00::1", "2001:db8::1", "ff02::1", "100::1", "2001:10::1", "fec0::1"):
        assert not address_allowed(address, "h", []), address
    assert address_allowed("::1", "localhost", ["localhost"])  # the loopback of the name localhost


def resolver(*addresses: str):
    def resolve(host, port, type=0):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port)) for a in addresses]

    return resolve
