"""The web page's files (deployments/static/), read once and served by name.

A request names one of the files found here or gets a 404: no path it sends is
ever joined to a directory, so no form of "..", encoded or not, reaches another file.
No FastAPI here: the ingress turns a `StaticFile` into its response.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# What the browser may do on the page: scripts, styles and requests to this server only, no framing;
# media from an upload (blob:) or from the URL the user gave.
HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; media-src 'self' blob: http: https:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # kept, but checked (ETag) on each load: a new version shows at once
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


def load_static(directory: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """Every file of `directory` with a known type, by name (subdirectories are not served)."""
    files = {}
    for path in sorted(directory.iterdir()):
        media_type = MEDIA_TYPES.get(path.suffix)
        if media_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        files[path.name] = StaticFile(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return files
