"""Where the downloader may connect: resolve a host once, check every address it resolves to, and connect to the
address that was checked (no second lookup a DNS-rebinding server could answer differently).

URL lists come from strangers; a cluster inside a cloud account can reach its metadata service (169.254.169.254),
internal services and loopback. By default only globally routable unicast addresses are allowed, in every spelling
of an address (decimal, hex, octal, IPv4-mapped IPv6): the check is on the resolved address, not on the text.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Ports = frozenset[int] | None  # None: every port

# What an allowlist entry without a port opens: the http and https defaults, i.e. a web mirror, not every service
# of the machine it runs on.
WEB_PORTS = frozenset({80, 443})

# Why an address may be connected to (AddressPolicy.verdict). A redirect from a PUBLIC hop to an ALLOWLISTED one is
# refused by the downloader: the allowlist trusts URLs that name the mirror, not a stranger's server pointing there.
PUBLIC = "public"  # globally routable
ALLOWLISTED = "allowlisted"  # not public, allowed by allowed_networks or allowed_hosts
UNGUARDED = "unguarded"  # not public, allowed because allow_private_networks turned the guard off

# Not publicly routable (or deprecated, or a tunnel) although Python's ipaddress counts them as global, at least
# before 3.12.4's table. Checked before Python's flags, so that those flags only ever add refusals.
_REFUSED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "192.0.0.0/24",  # IETF protocol assignments (RFC 6890)
    "192.88.99.0/24",  # 6to4 relay anycast, deprecated (RFC 7526)
    "fec0::/10",  # IPv6 site-local, deprecated (RFC 3879)
    "3fff::/20",  # IPv6 documentation (RFC 9637)
    "2001::/32",  # Teredo: a tunnel to an IPv4 host behind NAT; what it reaches is not the address we check
))

_NETWORK_FORM = ("a network in CIDR notation, optionally with :port (e.g. 10.1.2.0/24 or 10.1.2.0/24:8443; "
                 "[fd00::/8]:8443)")
_HOST_FORM = "a host or host:port (e.g. mirror.internal or mirror.internal:8080; [fd00::1]:8080), not a URL"


class BlockedAddress(Exception):
    """The host resolves only to addresses the policy refuses."""


class ResolveError(Exception):
    def __init__(self, retryable: bool) -> None:
        super().__init__("cannot resolve")
        self.retryable = retryable


def _parse_ports(text: str, entry: str) -> Ports:
    if text == "*":
        return None
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return frozenset({int(text)})
    raise ValueError(f"'{entry}': the port must be a number from 1 to 65535, or * for every port")


def _split_bracketed(text: str, entry: str, form: str) -> tuple[str, str | None]:
    """'[inside]' or '[inside]:port' → (inside, port text or None)."""
    inside, closed, rest = text[1:].partition("]")
    if not closed or (rest and not rest.startswith(":")):
        raise ValueError(f"'{entry}' is not {form}")
    return inside, (rest[1:] if rest else None)


def parse_network_entry(entry: str) -> tuple[IPNetwork, Ports]:
    """An allowed_networks entry: CIDR, CIDR:port, CIDR:* or [IPv6 CIDR]:port. No port means WEB_PORTS. A bare IPv6
    address is read as an address, never as address:port (write [fd00::1]:8080 for that)."""
    text, port_text = entry.strip(), None
    if text.startswith("["):
        text, port_text = _split_bracketed(text, entry, _NETWORK_FORM)
    elif "/" in text:  # the prefix length holds no colon: what follows one is the port
        base, _, tail = text.rpartition("/")
        prefix, colon, port = tail.partition(":")
        text, port_text = f"{base}/{prefix}", (port if colon else None)
    elif text.count(":") == 1:  # IPv4:port
        text, port_text = text.split(":")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"'{entry}' is not {_NETWORK_FORM}") from None
    return network, (WEB_PORTS if port_text is None else _parse_ports(port_text, entry))


def parse_host_entry(entry: str) -> tuple[str, Ports]:
    """An allowed_hosts entry: host, host:port, host:* or [IPv6]:port; the host as urlsplit spells it (lower case,
    IPv6 without brackets). No port means WEB_PORTS."""
    text, port_text = entry.strip(), None
    if "://" in text:
        raise ValueError(f"'{entry}' is not {_HOST_FORM}")
    if text.startswith("["):
        text, port_text = _split_bracketed(text, entry, _HOST_FORM)
        if not _is_ipv6(text):
            raise ValueError(f"'{entry}' is not {_HOST_FORM}")
    elif text.count(":") == 1:
        text, port_text = text.split(":")
    elif ":" in text and not _is_ipv6(text):
        raise ValueError(f"'{entry}' is not {_HOST_FORM}")
    if not text or any(c.isspace() or c in "/?#@[]\\" for c in text):
        raise ValueError(f"'{entry}' is not {_HOST_FORM}")
    return text.lower(), (WEB_PORTS if port_text is None else _parse_ports(port_text, entry))


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _port_in(ports: Ports, port: int) -> bool:
    return ports is None or port in ports


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4), if any; Teredo is refused outright."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return ip.ipv4_mapped
        if ip.sixtofour:
            return ip.sixtofour
    return None


def is_public_address(ip: IPAddress) -> bool:
    """Globally routable unicast; an IPv6 address that carries an IPv4 one is judged by the IPv4 one."""
    if any(ip in net for net in _REFUSED_NETWORKS):
        return False
    inner = _embedded_ipv4(ip)
    if inner is not None:
        return is_public_address(inner)
    refused = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified or not ip.is_global)
    return not refused


class AddressPolicy:
    """Which resolved addresses may be connected to, on which port, and why (``verdict``).

    ``treat_as_public`` takes allowed_networks-style entries counted as public: tests stand a loopback server in
    for a public one with it (no test may connect to a public address). It is not a configuration setting.
    """

    def __init__(
        self,
        allow_private_networks: bool = False,
        allowed_networks: list[str] | tuple[str, ...] = (),
        allowed_hosts: list[str] | tuple[str, ...] = (),
        *,
        treat_as_public: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self.allowed_networks = [parse_network_entry(n) for n in allowed_networks]
        self.allowed_hosts: dict[str, Ports] = {}  # trusted by name, whatever they resolve to, on these ports
        for entry in allowed_hosts:
            host, ports = parse_host_entry(entry)
            known = self.allowed_hosts.get(host, frozenset())
            self.allowed_hosts[host] = None if known is None or ports is None else known | ports
        self.treat_as_public = [parse_network_entry(n) for n in treat_as_public]

    def verdict(self, ip: IPAddress, port: int, host: str | None = None) -> str | None:
        """PUBLIC, ALLOWLISTED, UNGUARDED, or None when ``ip``:``port`` (reached as ``host``) is refused."""
        if is_public_address(ip) or _listed(self.treat_as_public, ip, port):
            return PUBLIC
        if self.allow_private_networks:
            return UNGUARDED
        if host is not None and _port_in(self.allowed_hosts.get(host.lower(), frozenset()), port):
            return ALLOWLISTED
        if _listed(self.allowed_networks, ip, port):
            return ALLOWLISTED
        return None

    def allows(self, ip: IPAddress, port: int) -> bool:
        return self.verdict(ip, port) is not None


def _listed(entries: list[tuple[IPNetwork, Ports]], ip: IPAddress, port: int) -> bool:
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # the same host, IPv6 spelling
    return any((ip in net or (mapped is not None and mapped in net)) and _port_in(ports, port)
               for net, ports in entries)


class Resolver:
    """getaddrinfo with a per-worker cache (resolution is a known bottleneck at scale), least recently used
    answers dropped beyond ``max_entries``: a worker meets far more hosts than it needs to remember."""

    def __init__(self, ttl_seconds: float = 300.0, max_entries: int = 4096) -> None:
        self.ttl_seconds, self.max_entries = ttl_seconds, max_entries
        self.overrides: dict[str, list[str]] = {}  # host → addresses, consulted before DNS (pinning, tests)
        self._cache: OrderedDict[tuple[str, int], tuple[float, list[IPAddress]]] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        if host in self.overrides:
            return [ipaddress.ip_address(a) for a in self.overrides[host]]
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((host, port))
            if hit and hit[0] > now:
                self._cache.move_to_end((host, port))
                return hit[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise ResolveError(retryable=err.errno in (socket.EAI_AGAIN,)) from None
        except (UnicodeError, ValueError):
            raise ResolveError(retryable=False) from None
        addresses: list[IPAddress] = []
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if ip not in addresses:
                addresses.append(ip)
        with self._lock:
            self._cache[(host, port)] = (now + self.ttl_seconds, addresses)
            self._cache.move_to_end((host, port))
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return addresses


class GuardedPools:
    """urllib3 connection pools keyed by (scheme, host, port, checked address): connections are reused per host
    and always go to an address the policy allowed. TLS still verifies the certificate for the host name."""

    def __init__(self, policy: AddressPolicy, resolver: Resolver, maxsize: int, max_pools: int = 512) -> None:
        import urllib3

        self._urllib3 = urllib3
        self.policy, self.resolver, self.maxsize, self.max_pools = policy, resolver, maxsize, max_pools
        self._pools: OrderedDict[tuple[str, str, int, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def checked_address(self, host: str, port: int) -> tuple[IPAddress, str]:
        """The first address of ``host`` the policy allows on ``port``, and the policy's verdict on it."""
        for ip in self.resolver.resolve(host, port):
            verdict = self.policy.verdict(ip, port, host)
            if verdict is not None:
                return ip, verdict
        raise BlockedAddress(host)

    def pool(self, scheme: str, host: str, port: int) -> tuple[Any, str]:
        """The pool for this host, connecting to its checked address, and the policy's verdict on that address;
        raises BlockedAddress or ResolveError."""
        ip, verdict = self.checked_address(host, port)
        key = (scheme, host, port, str(ip))
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool, verdict
            if scheme == "https":
                pool = self._urllib3.HTTPSConnectionPool(
                    str(ip), port, maxsize=self.maxsize, block=False, retries=False,
                    server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED",
                )
            else:
                pool = self._urllib3.HTTPConnectionPool(str(ip), port, maxsize=self.maxsize, block=False, retries=False)
            self._pools[key] = pool
            while len(self._pools) > self.max_pools:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool, verdict
