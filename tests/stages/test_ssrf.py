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

from curate.netguard import AddressPolicy, BlockedAddress, GuardedPools, Resolver
from curate.stages.download import DownloadConfig, DownloadStage

BLOCKED = ["127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
           "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
           "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "2002:7f00:1::1", "64:ff9b::a9fe:a9fe"]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_refused(address):
    assert not AddressPolicy().allows(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address):
    assert AddressPolicy().allows(ipaddress.ip_address(address))


def test_explicit_allowances():
    assert AddressPolicy(allowed_networks=["10.1.2.0/24"]).allows(ipaddress.ip_address("10.1.2.3"))
    assert not AddressPolicy(allowed_networks=["10.1.2.0/24"]).allows(ipaddress.ip_address("10.1.3.3"))
    assert AddressPolicy(allow_private_networks=True).allows(ipaddress.ip_address("169.254.169.254"))


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
    stage = DownloadStage(DownloadConfig(timeout=2, retries=0, allowed_hosts=["mirror.example"]))
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
