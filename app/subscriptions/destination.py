"""Where outbound notifications may go: https in production, public addresses only.

A subscription URL is checked when it is stored and again, with a fresh DNS answer, right before
every attempt; the request then goes to the address that was checked (the host name stays in
the Host header and TLS SNI), so a name that re-resolves to an internal address between the
check and the connection (DNS rebinding) reaches nothing it should not.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import httpx

from app.errors import DomainError
from app.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL = 2000


class DestinationRefused(DomainError):
    status = 422
    code = "destination_not_allowed"


def allowed_networks(raw: str) -> list[IPNetwork]:
    """UNBLOCK_NOTIFY_ALLOWED_NETWORKS: comma-separated CIDRs (e.g. `10.1.0.0/16,127.0.0.1/32`)."""
    return [
        ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip()
    ]


def address_allowed(address: IPAddress, allowed: list[IPNetwork]) -> bool:
    """Public unicast addresses, or ones an allowlisted network holds.

    `is_global` is false for loopback, private, link-local (169.254.169.254, the cloud metadata
    address), shared (100.64/10), reserved and unspecified ranges alike.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return True
    return address.is_global and not address.is_multicast


def check_url(url: str, *, https_only: bool) -> httpx.URL:
    """The URL's shape: absolute http(s), a host, no credentials; https when required."""
    if len(url) > MAX_URL:
        raise DestinationRefused(f"The URL is longer than {MAX_URL} characters.")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise DestinationRefused("The URL cannot be parsed.") from exc
    allowed_schemes = ("https",) if https_only else ("https", "http")
    if parsed.scheme not in allowed_schemes:
        raise DestinationRefused(f"The URL must use {' or '.join(allowed_schemes)}.")
    if not parsed.host:
        raise DestinationRefused("The URL needs a host.")
    if parsed.userinfo:
        raise DestinationRefused("The URL may not carry credentials; the signature is the proof.")
    return parsed


async def resolve(parsed: httpx.URL, allowed: list[IPNetwork]) -> IPAddress:
    """Resolve the host now; every address it has must be allowed. The one to connect to."""
    host = parsed.host
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, parsed.port or 443, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise DestinationRefused(f"The host {host} does not resolve.") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    refused = [a for a in addresses if not address_allowed(a, allowed)]
    if refused or not addresses:
        raise DestinationRefused(
            f"The host {host} resolves to an address notifications may not go to "
            f"({refused[0] if refused else 'none'}): loopback, private, link-local and metadata "
            "addresses are refused unless UNBLOCK_NOTIFY_ALLOWED_NETWORKS holds them."
        )
    return addresses[0]


@dataclass(frozen=True)
class Pinned:
    """A request target pinned to a checked address."""

    url: httpx.URL
    host_header: str
    sni_hostname: str | None


def pin(parsed: httpx.URL, address: IPAddress) -> Pinned:
    name = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    try:
        ipaddress.ip_address(parsed.host)
        by_name = False
    except ValueError:
        by_name = True
    return Pinned(
        url=parsed.copy_with(host=str(address)),
        host_header=name if parsed.port is None else f"{name}:{parsed.port}",
        # TLS still checks the certificate against the name, not the pinned address.
        sni_hostname=parsed.host if parsed.scheme == "https" and by_name else None,
    )


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The client for subscribers: no redirects, no proxies from the environment, timeouts."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(settings.notify_timeout.total_seconds()),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        headers={"User-Agent": "unblock-notifications/1"},
    )
