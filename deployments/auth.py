"""Who is calling: API keys, and the owner each key stands for.

Keys come from `ECG_API_KEYS` (comma-separated) and/or `api_keys_file` (one
per line). A client sends `Authorization: Bearer <key>`. A job belongs to the
key that created it; the owner recorded with it is a digest of the key, so the
job store never holds a key.

With no key configured the server is anonymous and, unless
`server.anonymous_remote` is set, answers only clients on loopback that name
it by a loopback Host: a server started without keys is a developer's, not a
public one. Then the threat is the developer's browser, which any web page can
make post a form, or reach the server through a rebound DNS name; so requests
with a foreign Host or Origin are refused. With keys, a browser cannot attach
one on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from deployments.errors import Forbidden, Unauthorized
from pipeline.config import Settings

log = logging.getLogger(__name__)
ANONYMOUS = ""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def owner_of(key: str) -> str:
    """The owner id recorded for a key: part of its digest, never the key itself."""
    return _digest(key).hex()[:24]


@dataclass(frozen=True)
class Access:
    keys: tuple[bytes, ...]  # SHA-256 digests: equal lengths, so comparing leaks no length
    open_paths: frozenset[str]
    anonymous_remote: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        keys = []
        if settings.api_keys is not None:
            keys += settings.api_keys.get_secret_value().split(",")
        if settings.api_keys_file is not None:
            keys += settings.api_keys_file.read_text().splitlines()
        keys = [k.strip() for k in keys if k.strip()]
        access = cls(
            keys=tuple(_digest(k) for k in dict.fromkeys(keys)),
            open_paths=frozenset(settings.server.open_paths),
            anonymous_remote=settings.server.anonymous_remote,
        )
        if not access.keys:
            where = "any client" if access.anonymous_remote else "clients on loopback only"
            log.warning("no API keys configured (ECG_API_KEYS): the server is open to %s", where)
        return access

    def is_open(self, path: str) -> bool:
        """Whether `path` needs no key: an exact open path, or one under an open prefix ("/static/*").

        A path with a ".." segment is under no prefix: no route resolves dot segments, but a
        prefix must not open whatever a proxy in front might make of one.
        """
        if path in self.open_paths:
            return True
        if ".." in path.split("/"):
            return False
        return any(p.endswith("*") and path.startswith(p[:-1]) for p in self.open_paths)

    def owner(
        self, authorization: str | None, client_host: str | None, host: str | None = None, origin: str | None = None
    ) -> str:
        """The caller's owner id; Unauthorized/Forbidden when it may not call.

        `host` and `origin` are the request's headers: they matter only without keys.
        """
        if not self.keys:
            self._check_anonymous(client_host, host, origin)
            return ANONYMOUS
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("send an API key: `Authorization: Bearer <key>`")
        candidate = _digest(given.strip())
        # Compare with every key, always: the time taken says nothing about which key nearly matched.
        matches = [hmac.compare_digest(candidate, key) for key in self.keys]
        if not any(matches):
            raise Unauthorized("unknown API key")
        return owner_of(given.strip())

    def _check_anonymous(self, client_host: str | None, host: str | None, origin: str | None) -> None:
        """Without keys, a browser is the threat: any web page can make it post a form to
        a loopback server, or rebind a name of its own to 127.0.0.1 and read the answers.
        A page cannot choose the Host it sends nor hide its Origin, so both must be loopback."""
        if origin is not None and not _is_loopback(_origin_name(origin)):
            raise Forbidden("requests from web pages of other origins are refused on a server without API keys")
        if self.anonymous_remote:
            return
        if not _is_loopback(client_host) or not _is_loopback(_host_name(host)):
            raise Forbidden("this server has no API keys and serves clients on loopback only")


def _origin_name(origin: str) -> str | None:
    try:
        return urlsplit(origin).hostname if "://" in origin else None  # "null" and junk: no name
    except ValueError:
        return None


def _host_name(host: str | None) -> str | None:
    """The name in a Host header: "[::1]:8080" -> "::1", "localhost:8080" -> "localhost"."""
    if host is None:
        return None
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_loopback(host: str | None) -> bool:
    if host is not None and host.lower() == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
