"""The small error hierarchy every stage raises.

Only the HTTP ingress (and the CLI) translate these into status codes or exit
codes; stages never know about HTTP. `code` is a stable identifier clients can
switch on; the message is meant for humans and never contains secrets.
"""

from __future__ import annotations


class AnalyzerError(Exception):
    """Base class of every error the pipeline raises on purpose."""

    code = "analysis_error"


class InputError(AnalyzerError):
    """The request or its media is at fault: the client can fix it (HTTP 4xx)."""

    code = "invalid_input"


class SourceNotFound(InputError):
    code = "not_found"


class PathNotAllowed(InputError):
    """A local path outside the configured roots: refused the same way whether or not it exists."""

    code = "path_not_allowed"


class UnsupportedMediaType(InputError):
    """A request body of a content type the server does not read."""

    code = "unsupported_media_type"


class NotMediaFile(InputError):
    code = "not_media"


class DecodeLimitExceeded(NotMediaFile):
    """ffprobe/ffmpeg needed more time, CPU or memory than the server's limits allow for this file."""

    code = "decode_limit"


class NoAudioStream(InputError):
    code = "no_audio_stream"


class EmptyAudio(InputError):
    code = "empty_audio"


class InvalidAudio(InputError):
    """The audio decodes, but its samples are not numbers (mostly NaN or infinite)."""

    code = "invalid_audio"


class AudioTooLong(InputError):
    code = "too_long"


class FileTooLarge(InputError):
    code = "too_large"


class DownloadFailed(InputError):
    code = "download_failed"


class UnsupportedLanguage(InputError):
    code = "unsupported_language"


class ModelError(AnalyzerError):
    """A model could not be loaded or run: the server is at fault (HTTP 5xx)."""

    code = "model_error"
