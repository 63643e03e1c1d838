"""Outbound HTTP to user-given URLs that cannot be turned against our own network (SSRF).

Media downloads and job callbacks go to URLs a client chose. Without care such a
URL can reach the cloud metadata service, localhost admin ports or the private
network behind the server. Every request made here therefore:

* accepts only http and https URLs with a real host;
* resolves the host once and refuses it if ANY address is not global unicast,
  unless the host name, address or CIDR block is listed in `allowed_hosts`;
* connects to exactly the address that was checked (no second DNS lookup, so
  DNS rebinding cannot swap it), while the Host header, TLS SNI and certificate
  check still use the real name;
* checks every redirect hop the same way (downloads), or follows none (callbacks).

Failures are reported without detail: a refused address, a DNS error and an
upstream 404 read alike, so the server cannot be used as a network scanner.
The real cause goes to the log, with query strings (presigned credentials) removed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from pipeline.errors import DownloadFailed, FileTooLarge, InputError

if TYPE_CHECKING:
    from pipeline.config import NetworkSettings

logger = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Far above any real presigned URL; keeps huge inputs out of parsers, DNS and logs.
_MAX_URL_CHARS = 16_384
_MAX_SHOWN_CHARS = 200
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")  # underscores: rare but real in host names

# Ranges refused on top of what `ipaddress` calls non-global. Python's lists differ
# between patch releases and count e.g. multicast and fec0::/10 as global.
_DENIED_V4 = tuple(
    ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes 255.255.255.255
    )
)
_GLOBAL_UNICAST_V6 = ip_network("2000::/3")  # everything else (::1, fe80::, fc00::, fec0::, ff00::, ::ffff:0:0) is out
_DENIED_V6 = tuple(
    ip_network(n)
    for n in (
        "2001::/32",  # Teredo: the embedded IPv4 is obfuscated; refuse outright
        "2001:2::/48",  # benchmarking
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
    )
)
_NAT64 = ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are the IPv4 target
# 64:ff9b:1::/48 (local-use NAT64) and IPv4-compatible ::a.b.c.d lie outside 2000::/3: refused outright.


class AddressRefused(Exception):
    """`post` refused the URL: not http(s), no host, or an address that is not public.

    Not an httpx error on purpose: retrying cannot help, so callers should stop.
    The message holds only the redacted URL; the reason is logged.
    """


class _Failed(Exception):
    """Internal: a fetch failed; `reason` is for the log only, never for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Refused(_Failed):
    """Internal: the URL or one of its addresses is not allowed."""


class _LookupTimeout(_Failed):
    """Internal: DNS did not answer in time."""


class _TooLarge(Exception):
    """Internal: the body passed the size limit (turned into `FileTooLarge` with the user's URL)."""


# --- addresses and policy ---------------------------------------------------------------------


def is_public_address(address: str | IPAddress) -> bool:
    """True only for global unicast addresses that are safe to connect to.

    IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4) are judged by that
    IPv4 address, because that is where the packets end up.
    """
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return _is_public_v4(embedded)
    if isinstance(ip, IPv4Address):
        return _is_public_v4(ip)
    return _is_public_v6(ip)


def _embedded_ipv4(ip: IPAddress) -> IPv4Address | None:
    if isinstance(ip, IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _is_public_v4(ip: IPv4Address) -> bool:
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_private:
        return False
    return not any(ip in net for net in _DENIED_V4)


def _is_public_v6(ip: IPv6Address) -> bool:
    if ip not in _GLOBAL_UNICAST_V6 or not ip.is_global or ip.is_multicast:
        return False
    return not any(ip in net for net in _DENIED_V6)


@dataclass(frozen=True)
class NetworkPolicy:
    """Which non-public destinations are let through anyway (`NetworkSettings.allowed_hosts`).

    A listed host name (matched exactly, case-insensitively) is trusted with whatever
    it resolves to; a listed address or CIDR block lets that address through for
    any host name.
    """

    allowed_names: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: NetworkSettings) -> NetworkPolicy:
        return cls.from_entries(settings.allowed_hosts)

    @classmethod
    def from_entries(cls, entries: list[str] | tuple[str, ...]) -> NetworkPolicy:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                # strict=False: "10.1.2.3/8" means the block, as an operator would expect.
                networks.append(ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(_normal_name(entry))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        return _normal_name(host) in self.allowed_names

    def allows_address(self, address: str | IPAddress) -> bool:
        """Public, or inside an allowed block (itself or the IPv4 address it embeds)."""
        if is_public_address(address):
            return True
        try:
            ip = ip_address(address)
        except ValueError:
            return False
        candidates = [ip, _embedded_ipv4(ip)]
        return any(c is not None and c in net for c in candidates for net in self.allowed_networks)


def _normal_name(host: str) -> str:
    # "Example.COM." and "example.com" name the same host.
    return host.lower().rstrip(".")


# --- URLs ---------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL as it may appear in logs and error messages: scheme://host/path only.

    Query strings and user info can hold credentials (presigned URLs), so they go.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        shown = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{parts.path}"
    except ValueError:
        return "<invalid URL>"
    if len(shown) > _MAX_SHOWN_CHARS:
        return shown[:_MAX_SHOWN_CHARS] + "..."
    return shown


def _parse(url: str | httpx.URL) -> httpx.URL:
    if len(str(url)) > _MAX_URL_CHARS:
        raise _Refused("URL too long")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
        raise _Refused(f"unparsable URL ({type(exc).__name__})") from None
    if parsed.scheme not in _SCHEMES:
        raise _Refused(f"scheme {parsed.scheme!r} not allowed")
    if not parsed.raw_host:
        raise _Refused("URL has no host")
    if not _well_formed_host(_host(parsed)):
        raise _Refused("malformed host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        # httpx accepts any number; the socket layer would fail with a non-network error.
        raise _Refused("port out of range")
    return parsed


def _well_formed_host(host: str) -> bool:
    """An IPv6 literal without zone, or a DNS name (which includes every IPv4 spelling).

    Stray characters, percent-escapes, zones ("fe80::1%25eth0") and over-long labels
    would only reach the resolver to fail there, in ways that differ between platforms.
    """
    if ":" in host:
        try:
            return ip_address(host).version == 6 and "%" not in host
        except ValueError:
            return False
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split("."))


def _host(url: httpx.URL) -> str:
    # raw_host is the IDNA (ASCII) form, without brackets for IPv6 literals.
    return url.raw_host.decode("ascii")


def _port(url: httpx.URL) -> int:
    return url.port or _DEFAULT_PORTS[url.scheme]


# --- resolution and checking ------------------------------------------------------------------


def _addresses(infos: list[tuple[Any, ...]]) -> tuple[str, ...]:
    # Keep getaddrinfo's order (it ranks by RFC 6724) and drop duplicates.
    found = dict.fromkeys(str(info[4][0]) for info in infos)
    if not found:
        raise _Failed("name resolved to no address")
    return tuple(found)


def _resolve(url: httpx.URL, timeout: float) -> tuple[str, ...]:
    """getaddrinfo with a time limit (it has none of its own) in a throw-away thread.

    getaddrinfo also turns every inet_aton spelling (2130706433, 0x7f.1, 127.1) into
    the real address, which is what gets checked.
    """
    box: dict[str, Any] = {}

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(_host(url), _port(url), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as exc:
            box["error"] = exc

    worker = threading.Thread(target=lookup, name="netguard-dns", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _LookupTimeout("name resolution timed out")
    if "error" in box:
        raise _Failed(f"name resolution failed ({type(box['error']).__name__}: {box['error']})")
    return _addresses(box["infos"])


async def _resolve_async(url: httpx.URL, timeout: float) -> tuple[str, ...]:
    loop = asyncio.get_running_loop()
    lookup = loop.getaddrinfo(_host(url), _port(url), type=socket.SOCK_STREAM)
    try:
        infos = await asyncio.wait_for(lookup, timeout)
    except TimeoutError:
        raise _LookupTimeout("name resolution timed out") from None
    except (OSError, UnicodeError, ValueError) as exc:
        raise _Failed(f"name resolution failed ({type(exc).__name__}: {exc})") from None
    return _addresses(infos)


def _check(url: httpx.URL, addresses: tuple[str, ...], policy: NetworkPolicy) -> None:
    """Refuse unless the name is allowed or every address is: one bad address is enough,
    since we cannot know which one a later connection would have used."""
    if policy.allows_name(_host(url)):
        return
    refused = [a for a in addresses if not policy.allows_address(a)]
    if refused:
        raise _Refused(f"address {refused[0]} is not public")


def check_url(url: str, policy: NetworkPolicy, *, field: str = "callback_url", timeout: float = 10.0) -> None:
    """Resolve and check `url` now; raise `InputError` (HTTP 400) that says nothing more
    than that the URL is not acceptable. DNS failures count as not acceptable."""
    try:
        parsed = _parse(url)
        _check(parsed, _resolve(parsed, timeout), policy)
    except _Failed as exc:
        logger.info("%s %s refused: %s", field, redact_url(url), exc.reason)
        raise InputError(f"{field} must be a public http(s) URL") from None


async def check_url_async(
    url: str, policy: NetworkPolicy, *, field: str = "callback_url", timeout: float = 10.0
) -> None:
    """`check_url` for async code: the lookup runs off the event loop."""
    try:
        parsed = _parse(url)
        _check(parsed, await _resolve_async(parsed, timeout), policy)
    except _Failed as exc:
        logger.info("%s %s refused: %s", field, redact_url(url), exc.reason)
        raise InputError(f"{field} must be a public http(s) URL") from None


# --- pinning ----------------------------------------------------------------------------------


def _pinned_request(
    client: httpx.Client | httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    address: str,
    *,
    timeout: httpx.Timeout,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Request:
    """A request to `address` that still looks, to the server and to TLS, like one to `url`.

    httpcore connects to the URL's host, so putting the checked address there means no
    second lookup. The Host header keeps virtual hosting working; the `sni_hostname`
    extension (read by httpcore when it starts TLS) makes SNI and certificate
    verification use the real name instead of the address.
    """
    merged = httpx.Headers(headers)
    merged["Host"] = url.netloc.decode("ascii")
    extensions = {"sni_hostname": _host(url)} if url.scheme == "https" else {}
    return client.build_request(
        method,
        url.copy_with(host=address),
        headers=merged,
        content=content,
        timeout=timeout,
        extensions=extensions,
    )


# --- downloads --------------------------------------------------------------------------------


@dataclass
class _Clock:
    """One deadline for the whole download; every network wait is capped by what is left."""

    end: float
    read_timeout_s: float

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise _Failed("deadline passed")
        return remaining

    def wait(self) -> float:
        return min(self.read_timeout_s, self.left())

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.wait())


def download(
    url: str,
    target: Path,
    *,
    policy: NetworkPolicy,
    max_bytes: int,
    deadline_s: float,
    read_timeout_s: float,
    max_redirects: int,
) -> None:
    """GET `url` into `target`, following at most `max_redirects` checked redirects.

    Raises `FileTooLarge` past `max_bytes`, and `DownloadFailed("could not download
    <redacted url>")` for anything else that goes wrong: the same message whatever
    the cause. A partial file is removed. Errors writing `target` propagate as they are.
    """
    shown = redact_url(url)
    clock = _Clock(time.monotonic() + deadline_s, read_timeout_s)
    try:
        _follow(url, target, policy, max_bytes, clock, max_redirects)
    except _TooLarge:
        target.unlink(missing_ok=True)
        raise FileTooLarge(f"{shown} is larger than the limit of {max_bytes} bytes") from None
    except (_Failed, httpx.HTTPError, httpx.InvalidURL) as exc:
        target.unlink(missing_ok=True)
        logger.info("download of %s failed: %s", shown, _describe(exc))
        raise DownloadFailed(f"could not download {shown}") from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, _Failed):
        return exc.reason
    if isinstance(exc, httpx.TransportError):
        return f"{type(exc).__name__}: {exc}"
    # InvalidURL and friends may quote parts of the URL: name the type only.
    return type(exc).__name__


def _follow(url: str, target: Path, policy: NetworkPolicy, max_bytes: int, clock: _Clock, max_redirects: int) -> None:
    current = _parse(url)
    # No kept-alive connections: each hop connects afresh to its own checked address,
    # and a TLS session verified for one name is never reused for another.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(trust_env=False, follow_redirects=False, limits=limits) as client:
        for _ in range(max_redirects + 1):
            location = _fetch_once(client, current, target, policy, max_bytes, clock)
            if location is None:
                return
            current = _parse(location)
    raise _Failed(f"more than {max_redirects} redirects")


def _fetch_once(
    client: httpx.Client, url: httpx.URL, target: Path, policy: NetworkPolicy, max_bytes: int, clock: _Clock
) -> httpx.URL | None:
    """One hop: write the body to `target` and return None, or return the redirect target."""
    addresses = _resolve(url, clock.wait())
    _check(url, addresses, policy)
    response = _send_first(client, url, addresses, clock)
    try:
        if response.status_code in _REDIRECTS:
            return _location(url, response)
        if not response.is_success:
            raise _Failed(f"HTTP {response.status_code}")
        _save(response, target, max_bytes, clock)
        return None
    finally:
        response.close()


def _send_first(client: httpx.Client, url: httpx.URL, addresses: tuple[str, ...], clock: _Clock) -> httpx.Response:
    """Stream a GET from the first address that accepts a connection (IPv6 may be unroutable)."""
    for index, address in enumerate(addresses):
        request = _pinned_request(client, "GET", url, address, timeout=clock.timeout())
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError:
            if index == len(addresses) - 1:
                raise
    raise AssertionError("unreachable: _addresses never returns an empty tuple")


def _location(url: httpx.URL, response: httpx.Response) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise _Failed(f"HTTP {response.status_code} without Location")
    # Relative references are resolved against the URL as the user wrote it, not the pinned one.
    return url.join(location)


def _save(response: httpx.Response, target: Path, max_bytes: int, clock: _Clock) -> None:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _TooLarge
    written = 0
    with target.open("wb") as out:
        for chunk in response.iter_bytes():
            written += len(chunk)
            if written > max_bytes:
                raise _TooLarge
            out.write(chunk)
            # Each read is bounded by its own timeout; this bounds the sum, so a server
            # dripping bytes overruns the deadline by one read timeout at most.
            clock.left()


# --- callbacks --------------------------------------------------------------------------------


async def post(
    client: httpx.AsyncClient,
    url: str,
    *,
    content: bytes,
    headers: dict[str, str],
    policy: NetworkPolicy,
    timeout: float,
) -> httpx.Response:
    """POST `content` to `url`, pinned to a checked address; redirects are returned, not followed.

    Raises `AddressRefused` when the URL or an address it resolves to is not allowed
    (permanent). DNS and network failures raise httpx errors (`httpx.ConnectError`,
    `httpx.ConnectTimeout`, ...), which are worth retrying. `timeout` bounds the
    lookup and each network wait.
    """
    try:
        parsed = _parse(url)
    except _Refused as exc:
        logger.info("callback to %s refused: %s", redact_url(url), exc.reason)
        raise AddressRefused(f"refused to call {redact_url(url)}") from None
    addresses = await _resolve_for_post(parsed, url, timeout)
    try:
        _check(parsed, addresses, policy)
    except _Refused as exc:
        logger.info("callback to %s refused: %s", redact_url(url), exc.reason)
        raise AddressRefused(f"refused to call {redact_url(url)}") from None
    return await _post_first(client, parsed, addresses, content, headers, timeout)


async def _resolve_for_post(parsed: httpx.URL, url: str, timeout: float) -> tuple[str, ...]:
    # A failed lookup may be transient, so it surfaces as the httpx error callers retry.
    try:
        return await _resolve_async(parsed, timeout)
    except _Failed as exc:
        logger.info("callback to %s: %s", redact_url(url), exc.reason)
        error = httpx.ConnectTimeout if isinstance(exc, _LookupTimeout) else httpx.ConnectError
        raise error(f"could not resolve {redact_url(url)}") from None


async def _post_first(
    client: httpx.AsyncClient,
    url: httpx.URL,
    addresses: tuple[str, ...],
    content: bytes,
    headers: dict[str, str],
    timeout: float,
) -> httpx.Response:
    for index, address in enumerate(addresses):
        request = _pinned_request(
            client, "POST", url, address, timeout=httpx.Timeout(timeout), headers=headers, content=content
        )
        try:
            return await _send_discarding_body(client, request, timeout)
        except httpx.ConnectError:
            # Nothing was sent yet, so trying the next address cannot deliver twice.
            if index == len(addresses) - 1:
                raise
    raise AssertionError("unreachable: _addresses never returns an empty tuple")


async def _send_discarding_body(client: httpx.AsyncClient, request: httpx.Request, timeout: float) -> httpx.Response:
    """The receiver's status and headers, within one deadline; its body is never read.

    A callback receiver is a stranger: an endless or compressed-bomb answer must not
    fill the memory of the process that sends every job's callbacks.
    """
    request.headers["accept-encoding"] = "identity"
    try:
        async with asyncio.timeout(timeout):
            response = await client.send(request, follow_redirects=False, stream=True)
            await response.aclose()
    except TimeoutError:  # a receiver dripping its headers: retried like any other timeout
        raise httpx.ReadTimeout(f"no answer within {timeout:g} s", request=request) from None
    return response


def quiet_http_client_logs() -> None:
    """Keep httpx's own request log (full URLs, query strings and all) out of the logs.

    Presigned media URLs carry credentials in their query string; our own
    messages redact it, httpx's INFO line does not. Called by the components
    that make requests, when they are built (never at import).
    """
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
