"""Which sources a request may name: local paths only under the configured
roots, http(s) URLs (fetched through `pipeline.netguard`), s3:// URIs.

Checked twice: by the ingress at submission (so a refused path is a 403 at
once, not a failed job) and by the extraction stage that reads it.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.config import MediaSettings
from pipeline.errors import DownloadFailed, InputError, PathNotAllowed

REMOTE_SCHEMES = ("http", "https", "s3")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")  # RFC 3986


def scheme_of(source: str) -> str:
    """The source's URL scheme, "" for a plain path."""
    head, sep, _ = source.partition("://")
    return head.lower() if sep and _SCHEME.fullmatch(head) else ""


def check_source(source: str, media: MediaSettings) -> None:
    """Raise unless `source` may be read at all (a local path must also be under a root)."""
    scheme = scheme_of(source)
    if scheme in REMOTE_SCHEMES:
        try:
            urlsplit(source).port  # noqa: B018 (parsing host and port is what may fail)
        except ValueError:  # "http://[::1", a port of "x": reported as every failed fetch is
            raise DownloadFailed("could not download <invalid URL>") from None
        return
    if scheme not in ("", "file"):
        raise InputError("unsupported source: give a path, an http(s):// URL or an s3:// URI")
    local_path(source, media.local_roots)


def local_path(source: str, roots: list[Path]) -> Path:
    """The real path `source` names, if it lies under one of `roots`; PathNotAllowed otherwise.

    Symlinks and `..` are resolved first, so neither leads out of a root. The
    refusal is the same whether or not the file exists: a client must not be
    able to probe the server's file system.
    """
    raw = _strip_file_scheme(source)
    if "\x00" in raw:
        raise PathNotAllowed(_REFUSED)
    try:
        path = Path(raw).resolve()
        allowed = [root.resolve() for root in roots]
    except (OSError, RuntimeError, ValueError):  # symlink loops, names the OS rejects
        raise PathNotAllowed(_REFUSED) from None
    if not any(path.is_relative_to(root) for root in allowed):
        raise PathNotAllowed(_REFUSED)
    return path


_REFUSED = "local paths outside this server's media directories may not be read"


def _strip_file_scheme(source: str) -> str:
    if scheme_of(source) != "file":
        return source
    parts = urlsplit(source)
    if parts.netloc not in ("", "localhost"):
        raise PathNotAllowed(_REFUSED)  # file://host/... names another machine's file
    return unquote(parts.path)
