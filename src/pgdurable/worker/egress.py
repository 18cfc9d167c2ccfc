"""The worker's HTTP egress policy: which URLs an HTTP step may reach (docs/http.md).

The policy belongs to the operator (worker flags), never to the workflow author: nothing in
SQL can widen it. By default any public host is reachable and every private, loopback,
link-local or otherwise non-global address is refused — including addresses a public name
resolves to, which is why ``resolve`` returns the checked addresses and the HTTP executor
connects to exactly those (a second lookup could answer differently: DNS rebinding).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

__all__ = ["Blocked", "EgressPolicy", "check_url", "resolve"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DISABLED = (
    "Blocked: outbound HTTP requests are disabled by this worker's egress policy "
    "(pgdurable worker --http-disable)."
)
_NO_HOST = "Blocked: unable to extract hostname from URL."
_BARE_IP = "Blocked: requests to bare IP addresses are not permitted by the egress allow-list."


@dataclass(frozen=True)
class EgressPolicy:
    """The operator's HTTP egress policy (worker flags; never user-settable).

    ``allowed_hosts`` entries are host suffixes: ``example.com`` matches the host itself and
    its subdomains, ``.example.com`` (or ``*.example.com``) only its subdomains. An empty
    tuple allows any host name; addresses are checked either way unless ``allow_all``.
    ``allowed_networks`` are CIDRs exempt from the address block-list. Invalid values raise
    ValueError at construction, so a policy in use is always well-formed.
    """

    enabled: bool = True
    allow_all: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    max_response_bytes: int = 10 * 1024 * 1024
    max_redirects: int = 0

    def __post_init__(self) -> None:
        # Normalized to tuples of clean entries: a list would not be hashable (the parsed
        # networks are cached per policy), and a lone string would iterate as characters.
        hosts = tuple(_normalize_host_entry(h) for h in _split(self.allowed_hosts))
        networks = _split(self.allowed_networks)
        _networks(networks)
        object.__setattr__(self, "allowed_hosts", hosts)
        object.__setattr__(self, "allowed_networks", networks)
        if self.max_response_bytes < 0:
            raise ValueError("max_response_bytes must not be negative")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must not be negative")


class Blocked(Exception):
    """A request the policy refuses; str(exc) is the error text."""


def check_url(url: str, policy: EgressPolicy) -> str:
    """Check everything about ``url`` that needs no I/O; return its host (lower-case,
    IPv6 without brackets), or raise Blocked."""
    if not policy.enabled:
        raise Blocked(_DISABLED)
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise Blocked(
            f"Blocked: unsupported URL scheme '{scheme}'. Only http and https are allowed."
        )
    if policy.allow_all:
        return extract_host(url) or ""
    host = extract_host(url)
    if not host:
        raise Blocked(_NO_HOST)
    # The request is sent by httpx, which parses the URL itself; a URL the two parsers read
    # differently could pass the check for one host and reach another.
    try:
        parsed = httpx.URL(url).host.lower()
    except httpx.InvalidURL:
        parsed = host  # httpx refuses to send it at all; the executor reports that
    if parsed != host:
        raise Blocked(_NO_HOST)
    if policy.allowed_hosts:
        if _ip(host) is not None:
            raise Blocked(_BARE_IP)
        if not any(_host_matches(host, entry) for entry in policy.allowed_hosts):
            raise Blocked(f"Blocked: '{host}' is not in the allowed endpoint list.")
    else:
        address = _ip(host)
        if address is not None and _address_blocked(address, policy):
            raise Blocked(_restricted(host))
    return host


async def resolve(host: str, port: int, policy: EgressPolicy) -> list[str]:
    """The addresses of ``host`` the policy allows connecting to, in resolver order.

    Raises Blocked when every address is blocked, OSError when resolution fails. An IP
    literal is checked without a lookup. Under ``allow_all`` nothing is filtered.
    """
    literal = _ip(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise OSError(f"no addresses found for '{host}'")
    if policy.allow_all:
        return addresses
    allowed = [a for a in addresses if not _address_blocked(_parse_address(a), policy)]
    if not allowed:
        raise Blocked(_restricted(host))
    return allowed


def extract_host(url: str) -> str | None:
    """The host of ``url`` as pg_durable extracts it (lower-case, brackets removed), or None
    when there is none."""
    if "://" not in url:
        return None
    rest = url.split("://", 1)[1]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end].rpartition("@")[2]
    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            return None
        host = inside
    elif authority.count(":") > 1:
        return None
    else:
        host = authority.partition(":")[0]
    return host.lower() or None


def _restricted(host: str) -> str:
    return (
        f"Blocked: the resolved IP address for '{host}' is in a restricted range. "
        "df.http() cannot access private or internal network addresses."
    )


def _host_matches(host: str, entry: str) -> bool:
    host = host.rstrip(".")
    if entry.startswith("."):
        return host.endswith(entry)
    return host == entry or host.endswith("." + entry)


def _normalize_host_entry(entry: str) -> str:
    value = entry.strip().lower().rstrip(".")
    if value.startswith("*."):
        value = value[1:]
    bare = value.lstrip(".")
    if not bare or any(c in bare for c in "/:@*?# ") or value.startswith(".."):
        raise ValueError(
            f"invalid allowed host '{entry}': expected a host name or suffix such as "
            "'example.com' or '.example.com'"
        )
    return value


@functools.lru_cache(maxsize=64)
def _networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(
                f"invalid allowed network '{entry}': {exc} (expected a CIDR such as "
                "'10.0.0.0/8' or '127.0.0.1/32')"
            ) from None
    return tuple(networks)


def _ip(host: str) -> IPAddress | None:
    try:
        return _parse_address(host)
    except ValueError:
        return None


def _parse_address(text: str) -> IPAddress:
    # A scope id (fe80::1%eth0) says which interface, not which address.
    return ipaddress.ip_address(text.partition("%")[0])


def _address_blocked(address: IPAddress, policy: EgressPolicy) -> bool:
    candidates = _embedded(address)
    networks = _networks(policy.allowed_networks)
    if any(c in n for c in candidates for n in networks if c.version == n.version):
        return False
    return any(_non_global(c) for c in candidates)


def _embedded(address: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address it tunnels to: a check that looked only at the
    outer IPv6 address would let ::ffff:127.0.0.1 or 2002:7f00:1:: reach loopback."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.append(address.teredo[1])
    return found


def _non_global(address: IPAddress) -> bool:
    # is_global alone misses multicast and, depending on the Python patch release, some
    # reserved IPv6 ranges (e.g. the deprecated IPv4-compatible ::a.b.c.d).
    return (
        not address.is_global
        or address.is_multicast
        or address.is_private
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


def _split(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(part for item in items for part in item.replace(",", " ").split() if part)
