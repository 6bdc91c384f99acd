"""The SSRF guard: hostile URLs never make the downloader connect where it must not.

Connection tests send traffic to 127.0.0.1 only: a canary listener counts every TCP connection it accepts and must
count zero. Addresses outside loopback (the metadata service, private ranges) are checked at the resolution step,
which never opens a connection.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from urllib.parse import quote

import pytest

from curate.stages.download.guard import AddressPolicy, BlockedAddress, GuardedPools, Resolver
from curate.stages.download.config import DownloadConfig
from curate.stages.download.stage import DownloadStage

BLOCKED = ["127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
           "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
           "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "2002:7f00:1::1", "64:ff9b::a9fe:a9fe"]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_refused(address):
    assert not AddressPolicy().allows(ipaddress.ip_address(address), 443)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address):
    assert AddressPolicy().allows(ipaddress.ip_address(address), 443)


def test_explicit_allowances():
    assert AddressPolicy(allowed_networks=["10.1.2.0/24"]).allows(ipaddress.ip_address("10.1.2.3"), 443)
    assert not AddressPolicy(allowed_networks=["10.1.2.0/24"]).allows(ipaddress.ip_address("10.1.3.3"), 443)
    assert AddressPolicy(allow_private_networks=True).allows(ipaddress.ip_address("169.254.169.254"), 80)


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "localhost",
                                      "169.254.169.254", "0xa9fea9fe", "2852039166", "10.0.0.1", "012.0.0.1"])
def test_every_spelling_resolves_to_a_refused_address(spelling):
    pools = GuardedPools(AddressPolicy(), Resolver(), maxsize=1)
    with pytest.raises(BlockedAddress):
        pools.checked_address(spelling, 80)


class Canary:
    """Counts TCP connections on 127.0.0.1 (and ::1 on the same port when the machine has it)."""

    def __init__(self) -> None:
        self.hits = 0
        self.sockets = [socket.create_server(("127.0.0.1", 0))]
        self.port = self.sockets[0].getsockname()[1]
        try:
            self.sockets.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        except OSError:
            pass
        self._stop = threading.Event()
        for sock in self.sockets:
            sock.settimeout(0.1)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def canary():
    listener = Canary()
    yield listener
    listener.close()




def test_ssrf_matrix_makes_zero_connections(canary, download_outcomes):
    p = canary.port
    urls = {
        f"http://127.0.0.1:{p}/": "download:blocked_address",
        f"http://localhost:{p}/": "download:blocked_address",
        f"http://0x7f000001:{p}/": "download:blocked_address",
        f"http://2130706433:{p}/": "download:blocked_address",
        f"http://0177.0.0.1:{p}/": "download:blocked_address",
        f"http://[::1]:{p}/": "download:blocked_address",
        f"http://[::ffff:127.0.0.1]:{p}/": "download:blocked_address",
        f"https://127.0.0.1:{p}/": "download:blocked_address",
        "file:///etc/passwd": "download:invalid_url",
        f"ftp://127.0.0.1:{p}/x.jpg": "download:unsupported_scheme",
        f"gopher://127.0.0.1:{p}/_GET": "download:unsupported_scheme",
    }
    stage = DownloadStage(DownloadConfig(timeout=2, retries=1, backoff=0.01))
    assert download_outcomes(stage, list(urls)) == [("failed", reason) for reason in urls.values()]
    assert canary.hits == 0


def test_a_redirect_to_loopback_is_refused_on_the_hop(canary, fault_server, download_outcomes):
    """An allowed first hop (a trusted name, here pinned to the fault server) redirects to the canary."""
    port = int(fault_server.base_url.rsplit(":", 1)[1])
    stage = DownloadStage(DownloadConfig(timeout=2, retries=0, allowed_hosts=[f"mirror.example:{port}"]))
    stage.setup()
    stage._pools.resolver.overrides["mirror.example"] = ["127.0.0.1"]
    targets = [f"http://127.0.0.1:{canary.port}/x.jpg", f"http://localhost:{canary.port}/x.jpg",
               f"http://2130706433:{canary.port}/x.jpg"]
    urls = [f"http://mirror.example:{port}/to/{quote(target, safe='')}" for target in targets]
    def hops() -> int:
        return sum(n for path, n in fault_server.requests.items() if path.startswith("/to/"))

    before = hops()
    assert download_outcomes(stage, urls) == [("failed", "download:blocked_address")] * 3
    assert hops() - before == 3  # the first hops were made
    assert canary.hits == 0


def test_allow_private_networks_reaches_loopback(canary, download_outcomes):
    stage = DownloadStage(DownloadConfig(timeout=1, retries=0, allow_private_networks=True))
    outcome = download_outcomes(stage, [f"http://127.0.0.1:{canary.port}/"])
    assert canary.hits >= 1 and outcome[0][0] == "failed"  # the canary hangs up without answering


def test_bad_networks_in_config_are_one_clear_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="CIDR"):
        DownloadConfig(allowed_networks=["not-a-net"])


# Addresses that are not publicly routable although Python's ipaddress (3.11) counts them as global, or that reach
# the network through a tunnel whose far end the address check cannot see.
SPECIAL_RANGES = {
    "fec0::1": "IPv6 site-local, deprecated (RFC 3879)",
    "feff:ffff::1": "the top of fec0::/10",
    "3fff::1": "IPv6 documentation prefix (RFC 9637)",
    "192.0.0.8": "IETF protocol assignments, 192.0.0.0/24",
    "192.0.0.200": "IETF protocol assignments, 192.0.0.0/24",
    "192.88.99.1": "6to4 relay anycast, deprecated (RFC 7526)",
    "::ffff:192.0.0.8": "IPv4-mapped spelling of 192.0.0.8",
    "2002:c058:6301::1": "6to4 address carrying 192.88.99.1",
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7": "Teredo (its client part reads 8.8.8.8): a tunnel, not a host",
}


@pytest.mark.parametrize("address", list(SPECIAL_RANGES))
def test_special_ranges_python_counts_as_global_are_refused(address):
    pools = GuardedPools(AddressPolicy(), Resolver(), maxsize=1)
    with pytest.raises(BlockedAddress):
        pools.checked_address(address, 443)


def test_an_allowlist_entry_without_a_port_opens_only_80_and_443(canary, download_outcomes):
    """`allowed_networks: [127.0.0.1/32]` or `allowed_hosts: [mirror.example]` is a web mirror, not every service
    on that machine: a URL list must not reach its other ports (here the canary's)."""
    stage = DownloadStage(DownloadConfig(timeout=2, retries=0, allowed_networks=["127.0.0.1/32"],
                                         allowed_hosts=["mirror.example"]))
    stage.setup()
    stage._pools.resolver.overrides["mirror.example"] = ["127.0.0.1"]
    urls = [f"http://127.0.0.1:{canary.port}/x.jpg", f"http://mirror.example:{canary.port}/x.jpg"]
    assert download_outcomes(stage, urls) == [("failed", "download:blocked_address")] * 2
    assert canary.hits == 0


@pytest.fixture(scope="module")
def image_names(demo_pool) -> list[str]:
    return [item.name for item in demo_pool[1] if item.kind == "clean"][:8]


def test_allowlist_entries_with_a_port_open_that_port_only(canary, fault_server, image_names, download_outcomes):
    port = int(fault_server.base_url.rsplit(":", 1)[1])
    stage = DownloadStage(DownloadConfig(timeout=2, retries=0, allowed_networks=[f"127.0.0.1/32:{port}"],
                                         allowed_hosts=[f"mirror.example:{port}"]))
    stage.setup()
    stage._pools.resolver.overrides["mirror.example"] = ["127.0.0.1"]
    name = image_names[0]
    urls = [fault_server.url("img", name), f"http://mirror.example:{port}/img/{name}",
            f"http://127.0.0.1:{canary.port}/x.jpg", f"http://mirror.example:{canary.port}/x.jpg"]
    assert download_outcomes(stage, urls) == [("ok", None)] * 2 + [("failed", "download:blocked_address")] * 2
    assert canary.hits == 0


def test_allowlist_ports_at_the_policy_level():
    from curate.stages.download.guard import ALLOWLISTED, PUBLIC

    ip = ipaddress.ip_address
    policy = AddressPolicy(allowed_networks=["10.1.2.0/24:8443", "10.9.0.0/16", "fd00::/8:8080", "[fd01::/16]:81",
                                             "10.7.0.0/16:*"],
                           allowed_hosts=["mirror.internal:8080", "plain.internal", "[fd02::1]:82"])
    assert policy.verdict(ip("10.1.2.3"), 8443) == ALLOWLISTED
    assert policy.verdict(ip("10.1.2.3"), 443) is None
    assert [policy.verdict(ip("10.9.1.1"), p) for p in (80, 443, 22, 6379)] == [ALLOWLISTED, ALLOWLISTED, None, None]
    assert policy.verdict(ip("10.7.1.1"), 6379) == ALLOWLISTED  # ":*" says every port, deliberately
    assert policy.verdict(ip("::ffff:10.1.2.3"), 8443) == ALLOWLISTED  # the same host, IPv4-mapped
    assert policy.verdict(ip("fd00::5"), 8080) == ALLOWLISTED and policy.verdict(ip("fd00::5"), 80) is None
    assert policy.verdict(ip("fd01::5"), 81) == ALLOWLISTED
    assert policy.verdict(ip("10.200.0.1"), 8080, host="mirror.internal") == ALLOWLISTED
    assert policy.verdict(ip("10.200.0.1"), 8081, host="mirror.internal") is None
    assert policy.verdict(ip("10.200.0.1"), 8080, host="other.internal") is None
    assert policy.verdict(ip("10.200.0.1"), 443, host="plain.internal") == ALLOWLISTED
    assert policy.verdict(ip("10.200.0.1"), 8443, host="plain.internal") is None
    assert policy.verdict(ip("fd02::1"), 82, host="fd02::1") == ALLOWLISTED
    assert policy.verdict(ip("8.8.8.8"), 8443) == PUBLIC  # public addresses: any port, as before
    assert policy.verdict(ip("8.8.8.8"), 443, host="mirror.internal") == PUBLIC  # a trusted name on a public address


@pytest.mark.parametrize(("field", "entry", "message"), [
    ("allowed_networks", "10.1.2.0/24:99999", "port"),
    ("allowed_networks", "10.1.2.0/24:https", "port"),
    ("allowed_networks", "10.1.2.0/24:", "port"),
    ("allowed_hosts", "http://mirror.internal", "host or host:port"),
    ("allowed_hosts", "mirror.internal:0", "port"),
    ("allowed_hosts", "mirror.internal/images", "host or host:port"),
    ("allowed_hosts", "", "host or host:port"),
    ("allowed_hosts", "[fd00::1", "host or host:port"),
])
def test_bad_allowlist_entries_are_one_clear_error(field, entry, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message) as err:
        DownloadConfig(**{field: [entry]})
    assert repr(entry) in str(err.value) or f"'{entry}'" in str(err.value)


def test_good_allowlist_entries_are_accepted():
    config = DownloadConfig(allowed_networks=["10.1.2.0/24", "10.1.2.0/24:8443", "10.1.2.0/24:*", "10.1.2.3",
                                              "10.1.2.3:8080", "fd00::/8", "fd00::/8:443", "[fd00::/8]:443"],
                            allowed_hosts=["mirror.internal", "Mirror.Internal:8080", "mirror.internal:*",
                                           "[fd00::1]:8080", "fd00::1"])
    assert len(config.allowed_networks) == 8 and len(config.allowed_hosts) == 5


def test_a_public_server_cannot_redirect_into_the_allowlist(demo_pool, fault_server, image_names, download_outcomes):
    """The allowlist trusts an internal mirror for URLs that name it; a public server that answers with a redirect
    into it is someone else choosing what we fetch there. No public address can be used here, so the fault server
    (on 127.0.0.1, its own port) is declared public to the policy; the mirror is another loopback port, allowlisted
    by name and by address."""
    from curate.demo.server import FaultServer
    from curate.stages.download.guard import AddressPolicy as Policy

    public_port = int(fault_server.base_url.rsplit(":", 1)[1])
    with FaultServer(demo_pool[0] / "files") as mirror:
        port = int(mirror.base_url.rsplit(":", 1)[1])
        allow = dict(allowed_networks=[f"127.0.0.1/32:{port}"], allowed_hosts=[f"mirror.internal:{port}"])

        def stage() -> DownloadStage:
            made = DownloadStage(DownloadConfig(timeout=2, retries=0, **allow))
            made.setup()
            made._pools.resolver.overrides["mirror.internal"] = ["127.0.0.1"]
            made._pools.policy = Policy(**allow, treat_as_public=[f"127.0.0.1/32:{public_port}"])
            return made

        a, b, c, d = image_names[:4]
        into_mirror = [f"http://mirror.internal:{port}/img/{a}", f"http://127.0.0.1:{port}/img/{b}"]
        redirects = [f"{fault_server.base_url}/to/{quote(target, safe='')}" for target in into_mirror]
        public_to_public = fault_server.url("redirect", c)
        assert download_outcomes(stage(), redirects + [public_to_public]) == [
            ("failed", "download:blocked_redirect")] * 2 + [("ok", None)]
        assert sum(mirror.requests.values()) == 0  # not even its robots.txt
        direct = [f"http://mirror.internal:{port}/img/{d}", f"http://127.0.0.1:{port}/img/{d}"]
        assert download_outcomes(stage(), direct) == [("ok", None)] * 2


def test_the_dns_cache_is_bounded():
    """One worker meets millions of host names; each cached answer is kept for its TTL, but not all of them.
    Decimal spellings of loopback addresses are resolved by getaddrinfo itself: no DNS query leaves the machine."""
    resolver = Resolver(ttl_seconds=300.0)
    names = [str(int(ipaddress.ip_address("127.0.0.1")) + i) for i in range(15_000)]
    for name in names:
        assert str(resolver.resolve(name, 80)[0]).startswith("127.")
    assert len(resolver._cache) <= 5_000, f"{len(resolver._cache)} answers cached"
    assert str(resolver.resolve(names[-1], 80)[0]) == str(ipaddress.ip_address(int(names[-1])))
