"""Errors of the serving layer, and the one place errors become HTTP statuses."""

from __future__ import annotations

import logging

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.openai_api import UnknownModel
from pipeline.errors import (
    AnalyzerError,
    AudioTooLong,
    EmptyAudio,
    FileTooLarge,
    InputError,
    InvalidAudio,
    ModelError,
    NoAudioStream,
    NotMediaFile,
    PathNotAllowed,
    SourceNotFound,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)


class Overloaded(AnalyzerError):
    """Too many analyses are waiting already (HTTP 503)."""

    code = "overloaded"


class Unauthorized(AnalyzerError):
    """No API key, or one this server does not know (HTTP 401)."""

    code = "unauthorized"


class Forbidden(AnalyzerError):
    """A caller this server will not serve at all (HTTP 403)."""

    code = "forbidden"


class JobExists(InputError):
    code = "job_exists"


class UnknownJob(InputError):
    code = "unknown_job"


class JobStateConflict(InputError):
    """The job is not in a state that allows what was asked (cancel a finished job, retry a running one)."""

    code = "job_state"


# Most specific class first: the first match in the error's MRO wins.
HTTP_STATUS: dict[type[AnalyzerError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    PathNotAllowed: 403,
    SourceNotFound: 404,
    UnknownJob: 404,
    UnknownModel: 404,
    JobExists: 409,
    JobStateConflict: 409,
    FileTooLarge: 413,
    AudioTooLong: 413,
    NotMediaFile: 415,
    UnsupportedMediaType: 415,
    NoAudioStream: 422,
    EmptyAudio: 422,
    InvalidAudio: 422,
    InputError: 400,
    Overloaded: 503,
    ModelError: 500,
    AnalyzerError: 500,
}


def http_status(error: AnalyzerError) -> int:
    return next(HTTP_STATUS[cls] for cls in type(error).__mro__ if cls in HTTP_STATUS)


def as_analyzer_error(e: BaseException) -> AnalyzerError:
    """What a stage raised, seen through Ray's wrappers, as one of our errors."""
    if isinstance(e, RayTaskError) and isinstance(e.cause, AnalyzerError):
        return e.cause
    if isinstance(e, AnalyzerError):
        return e
    if isinstance(e, BackPressureError):
        return Overloaded("a stage is at capacity; retry later")
    if isinstance(e, ActorDiedError | ActorUnavailableError):
        return ModelError("a stage replica died while processing; retry the request")
    log.error("unexpected failure in the graph", exc_info=e)
    return ModelError(f"a stage failed unexpectedly ({type(e).__name__})")
