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


class BlockedAddress(Exception):
    """The host resolves only to addresses the policy refuses."""


class ResolveError(Exception):
    def __init__(self, retryable: bool) -> None:
        super().__init__("cannot resolve")
        self.retryable = retryable


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo), if any."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return ip.ipv4_mapped
        if ip.sixtofour:
            return ip.sixtofour
        if ip.teredo:
            return ip.teredo[1]
    return None


class AddressPolicy:
    """Which resolved addresses may be connected to."""

    def __init__(
        self,
        allow_private_networks: bool = False,
        allowed_networks: list[str] | tuple[str, ...] = (),
        allowed_hosts: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self.allowed_networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
        self.allowed_hosts = {h.lower() for h in allowed_hosts}  # trusted by name, whatever they resolve to

    def allows(self, ip: IPAddress) -> bool:
        if self.allow_private_networks or any(ip in net for net in self.allowed_networks):
            return True
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return self.allows(inner)
        refused = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
                   or ip.is_unspecified or not ip.is_global)
        return not refused


class Resolver:
    """getaddrinfo with a per-worker cache (resolution is a known bottleneck at scale)."""

    def __init__(self, ttl_seconds: float = 300.0) -> None:
        self.ttl_seconds = ttl_seconds
        self.overrides: dict[str, list[str]] = {}  # host → addresses, consulted before DNS (pinning, tests)
        self._cache: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}
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

    def checked_address(self, host: str, port: int) -> IPAddress:
        addresses = self.resolver.resolve(host, port)
        if host.lower() in self.policy.allowed_hosts and addresses:
            return addresses[0]
        for ip in addresses:
            if self.policy.allows(ip):
                return ip
        raise BlockedAddress(host)

    def pool(self, scheme: str, host: str, port: int):
        """The pool for this host, connecting to its checked address; raises BlockedAddress or ResolveError."""
        ip = self.checked_address(host, port)
        key = (scheme, host, port, str(ip))
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
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
            return pool
