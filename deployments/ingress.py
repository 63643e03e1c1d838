"""The HTTP ingress: FastAPI routes on a Serve deployment that runs analyses
through the stage graph and records every one of them as a job.

Errors become HTTP statuses here and only here (see `deployments.errors`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' real types.
import asyncio
import logging
import uuid
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from deployments.api import (
    AnalysisRequest,
    ErrorBody,
    Health,
    JobAccepted,
    JobRequest,
    StageInfo,
)
from deployments.errors import JobExists, Overloaded, UnknownJob, as_analyzer_error, http_status
from deployments.graph import Graph, Upload
from deployments.jobs import JobError, JobView
from deployments.metrics import GraphMetrics
from deployments.progress import TrackerProgress
from deployments.tracker import job_tracker
from pipeline.analyzer import STAGE_WEIGHTS, AnalysisOptions
from pipeline.config import Settings
from pipeline.errors import AnalyzerError, FileTooLarge, InputError
from pipeline.media import choose_source
from pipeline.schemas import AnalysisResult

log = logging.getLogger(__name__)
CANCELLED = JobError(code="cancelled", message="the client closed the connection before the analysis finished")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Bad input: no source, unknown language, bad speaker counts, unreadable URL",
        404: "Source file not found",
        409: "job_id already used",
        413: "File too large or audio too long",
        415: "Not a media file",
        422: "No audio stream, empty audio, or a malformed request body",
        500: "A model failed",
        503: "Overloaded: retry later",
    }.items()
}

app = FastAPI(
    title="ECG Audio Analyzer",
    summary="Transcripts with word timings, speakers and per-word acoustics for audio and video.",
    version="0.1.0",
)


@app.exception_handler(AnalyzerError)
async def _analyzer_error(request: Request, error: AnalyzerError) -> JSONResponse:
    headers = {"retry-after": "30"} if isinstance(error, Overloaded) else None
    return JSONResponse(
        ErrorBody(error=error.code, message=str(error)).model_dump(), http_status(error), headers=headers
    )


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
    message = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in error.errors())
    return JSONResponse(ErrorBody(error="invalid_input", message=message).model_dump(), 422)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return JSONResponse(ErrorBody(error="http_error", message=str(error.detail)).model_dump(), error.status_code)


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = ErrorBody(error="internal_error", message="internal error; see the server log")
    return JSONResponse(body.model_dump(), 500)


MULTIPART_FIELDS = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "The video or audio file."},
        **{name: {"type": "string"} for name in JobRequest.model_fields if name not in ("video_path", "audio_path")},
    },
    "required": ["file"],
}


# Helpers sit above the class: serve.ingress ships the class by value, with
# the globals its methods use at the time it is decorated.
def _options(body: AnalysisRequest) -> AnalysisOptions:
    callback_url = body.callback_url if isinstance(body, JobRequest) else None
    if callback_url is not None and urlsplit(callback_url).scheme not in ("http", "https"):
        raise InputError("callback_url must be an http(s) URL")
    return AnalysisOptions(
        language=body.language,
        num_speakers=body.num_speakers,
        min_speakers=body.min_speakers,
        max_speakers=body.max_speakers,
    )


@serve.deployment(name="Ingress", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        extraction: DeploymentHandle,
        transcription: DeploymentHandle,
        diarization: DeploymentHandle,
        acoustics: DeploymentHandle,
        settings: Settings,
    ) -> None:
        self._settings = settings
        self._graph = Graph(extraction, transcription, diarization, acoustics)
        self._tracker = job_tracker(settings.jobs, STAGE_WEIGHTS)
        self._slots = asyncio.Semaphore(settings.jobs.max_active)
        self._admitted = 0  # analyses this replica accepted and has not finished
        self._running = 0  # of which hold a slot
        self._background: set[asyncio.Task] = set()
        self._metrics = GraphMetrics()

    @app.get("/health", response_model=Health)
    async def health(self) -> Health:
        """Readiness of each stage deployment, the models they loaded and their devices."""
        answers = await self._graph.describe()
        stages = {
            name: a if isinstance(a, StageInfo) else StageInfo(ready=False, detail=type(a).__name__)
            for name, a in answers.items()
        }
        counts = await self._tracker.counts.remote()
        status = "ok" if all(s.ready for s in stages.values()) else "degraded"
        return Health(status=status, deployments=stages, jobs=counts)

    @app.post("/transcribe", response_model=AnalysisResult, responses=ERRORS)
    async def transcribe(self, body: AnalysisRequest, response: Response) -> AnalysisResult:
        """Analyse one file and answer with the result (synchronous; use jobs for long files)."""
        options = _options(body)
        source = choose_source(body.video_path, body.audio_path)
        job_id = body.job_id or uuid.uuid4().hex
        _, created = await self._register(job_id, source, None)
        if not created:
            raise JobExists(f"job {job_id} exists already; GET /jobs/{job_id}")
        response.headers["x-job-id"] = job_id
        return await self._execute(job_id, source, options)

    @app.post(
        "/api/upload-video/process-video",
        status_code=202,
        response_model=JobAccepted,
        responses={200: {"model": JobAccepted, "description": "This job_id exists already"}, **ERRORS},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": JobRequest.model_json_schema()},
                    "multipart/form-data": {"schema": MULTIPART_FIELDS},
                },
            }
        },
    )
    async def process_video(self, request: Request, response: Response) -> JobAccepted:
        """Start an analysis job; progress and the result go to `callback_url` and `GET /jobs/{job_id}`.

        Send JSON with `video_path`/`audio_path`, or a multipart form with `file`
        and the other fields as form fields.
        """
        body, upload = await self._read_job_request(request)
        options = _options(body)
        source: str | Upload = upload or choose_source(body.video_path, body.audio_path)
        job_id = body.job_id or uuid.uuid4().hex
        label = source.filename if isinstance(source, Upload) else source
        job, created = await self._register(job_id, label, body.callback_url)
        if created:
            task = asyncio.create_task(self._execute(job_id, source, options))
            self._background.add(task)
            task.add_done_callback(self._background_done)
        else:
            response.status_code = 200
        return JobAccepted(
            job_id=job_id, status=job.status, progress=job.progress, message=job.message, status_url=f"/jobs/{job_id}"
        )

    @app.get("/jobs/{job_id}", response_model=JobView, responses={404: ERRORS[404]})
    async def job(self, job_id: str) -> JobView:
        """A job's status, progress and message; its result once completed, its error once failed."""
        job = await self._tracker.get.remote(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        return job

    # -- running analyses -----------------------------------------------------

    async def _register(self, job_id: str, label: str, callback_url: str | None) -> tuple[JobView, bool]:
        """Admit an analysis and record its job; (the job, True) when the caller must now `_execute` it.

        The admission is counted before the first await, so a burst of requests
        cannot all slip past the limit; `_execute` gives it back when done.
        """
        jobs = self._settings.jobs
        if self._admitted >= jobs.max_active + jobs.max_waiting:
            raise Overloaded(f"{self._admitted} analyses are running or waiting; retry later")
        self._admitted += 1
        created = False
        try:
            job, created = await self._tracker.submit.remote(job_id, label, callback_url)
        finally:
            if not created:
                self._admitted -= 1
        self._report_occupancy()
        return job, created

    async def _execute(self, job_id: str, source: str | Upload, options: AnalysisOptions) -> AnalysisResult:
        """Run a registered analysis; its job ends completed or failed, and its admission is released."""
        try:
            async with self._slots:
                self._running += 1
                self._report_occupancy()
                try:
                    await self._tracker.start.remote(job_id)
                    progress = TrackerProgress(self._tracker, job_id, self._settings.jobs.progress_interval_s)
                    result = await self._graph.analyze(source, options, progress, timings={})
                finally:
                    self._running -= 1
        except asyncio.CancelledError:  # a /transcribe client went away: Serve cancels its request
            await asyncio.shield(self._tracker.fail.remote(job_id, CANCELLED))
            raise
        except Exception as e:
            error = as_analyzer_error(e)
            self._metrics.requests_failed.inc(tags={"code": error.code})
            await self._tracker.fail.remote(job_id, JobError(code=error.code, message=str(error)))
            if error is e:
                raise
            raise error from e
        else:
            await self._tracker.complete.remote(job_id, result)
            self._metrics.analysis_done(result)
            return result
        finally:
            self._admitted -= 1
            self._report_occupancy()

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # mark it retrieved: _execute recorded it as the job's failure

    def _report_occupancy(self) -> None:
        self._metrics.occupancy(self._running, self._admitted - self._running)

    async def _read_job_request(self, request: Request) -> tuple[JobRequest, Upload | None]:
        content_type = request.headers.get("content-type", "")
        try:
            if content_type.startswith("multipart/form-data"):
                return await self._read_form(request)
            return JobRequest.model_validate_json(await request.body()), None
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from e

    async def _read_form(self, request: Request) -> tuple[JobRequest, Upload]:
        form = await request.form(max_files=1)
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InputError("a multipart request needs the media in a `file` field")
        limit = self._settings.media.max_file_bytes
        if file.size is not None and file.size > limit:
            raise FileTooLarge(f"upload is {file.size} bytes; the limit is {limit}")
        fields = {k: v for k, v in form.items() if isinstance(v, str) and v != ""}
        body = JobRequest.model_validate(fields)
        return body, Upload(await file.read(), file.filename or "upload")
