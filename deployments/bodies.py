"""Requests and results within limits: JSON bodies up to a size, multipart
uploads streamed to a file on disk with the size cap enforced while reading,
results no larger than the job store keeps.

Only `application/json` and `multipart/form-data` are read. A web page can make
a browser send a multipart form (or `text/plain`) anywhere without asking; what
keeps such posts out is the API key a browser cannot attach, or, on a server
without keys, the Host and Origin checks of `deployments.auth`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from pipeline.analyzer import Upload
from pipeline.errors import FileTooLarge, InputError, UnsupportedMediaType
from pipeline.media import upload_name
from pipeline.schemas import AnalysisResult

M = TypeVar("M", bound=BaseModel)
# Room for the multipart framing and the small form fields around the file.
_FORM_OVERHEAD = 1024 * 1024


@dataclass(frozen=True)
class SpooledUpload(Upload):
    """An uploaded file, on disk until its job completes."""

    size: int = 0


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
        body = model.model_validate(form_fields(form))  # before the copy: a bad field costs no disk
        upload = await _spool(file, limit, spool_dir)
        return body, upload
    finally:
        await form.close()


def form_fields(form: FormData) -> dict[str, str | list[str]]:
    """The text fields of a form, empty ones left out. A name ending in `[]` may repeat (the array
    convention of OpenAI's clients, `timestamp_granularities[]=word`): its values come as a list under
    the name without brackets. Any other name counts once, with its last value."""
    scalars: dict[str, str | list[str]] = {}
    lists: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if not isinstance(value, str) or value == "":
            continue
        if key.endswith("[]"):
            lists.setdefault(key.removesuffix("[]"), []).append(value)
        else:
            scalars[key] = value
    return {**scalars, **lists}


async def _limited(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FileTooLarge(f"{what} is {declared} bytes; the limit is {limit}")
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:  # chunked bodies declare no length: count as they come
                raise FileTooLarge(f"{what} is larger than the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect:  # nobody is left to answer; not the server's failure
        raise InputError(f"the client went away before its {what} arrived") from None


async def _spool(file: UploadFile, limit: int, spool_dir: Path | None) -> SpooledUpload:
    from starlette.concurrency import run_in_threadpool

    size = file.size or 0
    if size > limit:
        raise FileTooLarge(f"upload is {size} bytes; the limit is {limit}")
    name = upload_name(file.filename or "upload")
    if spool_dir is not None:
        spool_dir.mkdir(parents=True, exist_ok=True)
    handle, name_on_disk = tempfile.mkstemp(prefix="ecg-upload-", dir=spool_dir)
    path = Path(name_on_disk)
    try:
        await run_in_threadpool(_copy_to_disk, file, handle)
    except BaseException:  # a full disk, or the client gone (cancelled): leave nothing behind
        path.unlink(missing_ok=True)
        raise
    return SpooledUpload(path, name, size)


def _copy_to_disk(file: UploadFile, handle: int) -> None:
    file.file.seek(0)
    with open(handle, "wb") as out:
        shutil.copyfileobj(file.file, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())  # the 202 promises the upload survives a crash


def check_result_size(result: AnalysisResult, limit: int) -> None:
    """FileTooLarge when `result` is more JSON than a job may keep (a day of speech, word by word)."""
    size = len(result.model_dump_json())
    if size > limit:
        raise FileTooLarge(f"the result is {size} bytes of JSON; this server keeps at most {limit}")
