"""Reading request bodies within limits: JSON up to a size, multipart uploads
streamed to a file on disk with the size cap enforced while reading.

Only `application/json` and `multipart/form-data` are read: a browser can send
a plain form or `text/plain` to any origin without asking, so accepting those
would let any web page submit jobs with a visitor's cookies or network position.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from pipeline.errors import FileTooLarge, InputError, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)
# Room for the multipart framing and the small form fields around the file.
_FORM_OVERHEAD = 1024 * 1024


@dataclass(frozen=True)
class SpooledUpload:
    """An uploaded file, on disk until its analysis ends (the caller deletes it)."""

    path: Path
    filename: str
    size: int


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request, model: type[M], limit: int) -> M:
    """The body as `model`; FileTooLarge past `limit` bytes, ValidationError when malformed."""
    if media_type(request) != "application/json":
        raise UnsupportedMediaType("send the request as application/json")
    body = bytearray()
    async for chunk in _limited(request, limit, "request body"):
        body += chunk
    return model.model_validate_json(bytes(body))


async def read_form(request: Request, model: type[M], limit: int, spool_dir: Path | None) -> tuple[M, SpooledUpload]:
    """A multipart form: its `file` spooled to `spool_dir` (at most `limit` bytes), its fields as `model`."""
    parser = MultiPartParser(
        request.headers, _limited(request, limit + _FORM_OVERHEAD, "upload"), max_files=1, max_fields=20
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InputError(f"malformed multipart body: {e.message}") from e
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InputError("a multipart request needs the media in a `file` field")
        fields = {k: v for k, v in form.items() if isinstance(v, str) and v != ""}
        body = model.model_validate(fields)  # before the copy: a bad field costs no disk
        upload = await _spool(file, limit, spool_dir)
        return body, upload
    finally:
        await form.close()


async def _limited(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FileTooLarge(f"{what} is {declared} bytes; the limit is {limit}")
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:  # chunked bodies declare no length: count as they come
            raise FileTooLarge(f"{what} is larger than the limit of {limit} bytes")
        yield chunk


async def _spool(file: UploadFile, limit: int, spool_dir: Path | None) -> SpooledUpload:
    from starlette.concurrency import run_in_threadpool

    size = file.size or 0
    if size > limit:
        raise FileTooLarge(f"upload is {size} bytes; the limit is {limit}")
    name = Path(file.filename or "upload").name or "upload"
    return SpooledUpload(await run_in_threadpool(_copy_to_disk, file, spool_dir), name, size)


def _copy_to_disk(file: UploadFile, spool_dir: Path | None) -> Path:
    if spool_dir is not None:
        spool_dir.mkdir(parents=True, exist_ok=True)
    file.file.seek(0)
    with tempfile.NamedTemporaryFile(prefix="ecg-upload-", dir=spool_dir, delete=False) as out:
        shutil.copyfileobj(file.file, out, 1 << 20)
    return Path(out.name)
