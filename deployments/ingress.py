"""The HTTP ingress: FastAPI routes on a Serve deployment that runs analyses
through the stage graph and records every one of them as a job.

Errors become HTTP statuses here and only here (see `deployments.errors`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' real types.
import asyncio
import logging
import uuid
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from deployments.api import (
    AnalysisRequest,
    ErrorBody,
    Health,
    JobAccepted,
    JobRequest,
    StageInfo,
)
from deployments.auth import Access
from deployments.bodies import SpooledUpload, check_result_size, media_type, read_form, read_json
from deployments.errors import JobExists, Overloaded, Unauthorized, UnknownJob, as_analyzer_error, http_status
from deployments.graph import Graph
from deployments.jobs import JobError, JobView, job_key
from deployments.metrics import GraphMetrics
from deployments.progress import TrackerProgress
from deployments.tracker import job_tracker
from pipeline.analyzer import STAGE_WEIGHTS, AnalysisOptions
from pipeline.config import Settings
from pipeline.errors import AnalyzerError, UnsupportedMediaType
from pipeline.media import choose_source
from pipeline.netguard import NetworkPolicy, check_url_async
from pipeline.schemas import AnalysisResult
from pipeline.sources import check_source

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
CANCELLED = JobError(code="cancelled", message="the client closed the connection before the analysis finished")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Bad input: no source, unknown language, a URL that could not be downloaded or is not allowed",
        401: "No API key, or an unknown one (`Authorization: Bearer <key>`)",
        403: "A local path outside the server's roots, or an anonymous client off loopback",
        404: "Source file or job not found",
        409: "job_id already used",
        413: "Request body, file or result too large, or audio too long",
        415: "Not a media file, or a body that is neither JSON nor multipart",
        422: "No audio stream, empty or invalid audio, or a malformed request body",
        500: "A model failed",
        503: "Overloaded: retry later",
    }.items()
}

app = FastAPI(
    title="ECG Audio Analyzer",
    summary="Transcripts with word timings, speakers and per-word acoustics for audio and video.",
    version="0.1.0",
    # Served by the Ingress itself (below), so that they obey `server.open_paths` like every route.
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@app.exception_handler(AnalyzerError)
async def _analyzer_error(request: Request, error: AnalyzerError) -> JSONResponse:
    headers = None
    if isinstance(error, Overloaded):
        headers = {"retry-after": "30"}
    elif isinstance(error, Unauthorized):
        headers = {"www-authenticate": "Bearer"}
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
    try:
        return AnalysisOptions(
            language=body.language,
            num_speakers=body.num_speakers,
            min_speakers=body.min_speakers,
            max_speakers=body.max_speakers,
        )
    except ValidationError as e:
        raise _invalid(e) from e


def _invalid(error: ValidationError) -> RequestValidationError:
    """A body model's errors as FastAPI reports its own: located under "body"."""
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()])


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """An `openapi_extra` for a route that reads its JSON body itself (to check the caller and size first)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def _openapi() -> dict[str, Any]:
    """FastAPI's document, plus the request models the routes read by hand (it cannot see those)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in (AnalysisRequest, JobRequest):
            schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        app.openapi_schema = document
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def _discard(source: object) -> None:
    """Delete an upload's spooled file once nothing will read it again."""
    if isinstance(source, SpooledUpload):
        source.path.unlink(missing_ok=True)


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
        self._access = Access.from_settings(settings)
        self._network = NetworkPolicy.from_settings(settings.network)
        self._graph = Graph(extraction, transcription, diarization, acoustics, settings.jobs)
        self._tracker = job_tracker(settings.jobs, settings.network, STAGE_WEIGHTS)
        self._slots = asyncio.Semaphore(settings.jobs.max_active)
        self._admitted = 0  # analyses this replica accepted and has not finished
        self._running = 0  # of which hold a slot
        self._background: set[asyncio.Task] = set()
        self._metrics = GraphMetrics()

    @app.get("/health", response_model=Health)
    async def health(self, request: Request) -> Health:
        """Readiness of each stage deployment, the models they loaded and their devices."""
        self._caller(request)
        answers = await self._graph.describe()
        stages = {
            name: a if isinstance(a, StageInfo) else StageInfo(ready=False, detail=type(a).__name__)
            for name, a in answers.items()
        }
        counts = await self._tracker.counts.remote()
        status = "ok" if all(s.ready for s in stages.values()) else "degraded"
        return Health(status=status, deployments=stages, jobs=counts)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._caller(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._caller(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    @app.post("/transcribe", response_model=AnalysisResult, responses=ERRORS, openapi_extra=_json_body(AnalysisRequest))
    async def transcribe(self, request: Request, response: Response) -> AnalysisResult:
        """Analyse one file and answer with the result (synchronous; use jobs for long files)."""
        owner = self._caller(request)
        body = await self._read_json(request, AnalysisRequest)
        options = _options(body)
        source = self._source(body)
        job_id = body.job_id or uuid.uuid4().hex
        _, created = await self._register(owner, job_id, source, None)
        if not created:
            raise JobExists(f"job {job_id} exists already; GET /jobs/{job_id}")
        response.headers["x-job-id"] = job_id
        return await self._execute(job_key(owner, job_id), source, options)

    @app.post(
        "/api/upload-video/process-video",
        status_code=202,
        response_model=JobAccepted,
        responses={200: {"model": JobAccepted, "description": "This job_id exists already"}, **ERRORS},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref(JobRequest)},
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
        owner = self._caller(request)
        self._check_capacity()  # before an upload is read and spooled, not after
        body, upload = await self._read_job_request(request)
        try:
            options = _options(body)
            source: str | SpooledUpload = upload or self._source(body)
            if body.callback_url is not None:
                await check_url_async(body.callback_url, self._network)
            job_id = body.job_id or uuid.uuid4().hex
            label = source.filename if isinstance(source, SpooledUpload) else source
            job, created = await self._register(owner, job_id, label, body.callback_url)
        except BaseException:
            _discard(upload)
            raise
        if created:
            task = asyncio.create_task(self._execute(job_key(owner, job_id), source, options))
            self._background.add(task)
            task.add_done_callback(self._background_done)
        else:
            _discard(upload)
            response.status_code = 200
        return JobAccepted(
            job_id=job_id, status=job.status, progress=job.progress, message=job.message, status_url=f"/jobs/{job_id}"
        )

    @app.get("/jobs/{job_id}", response_model=JobView, responses={k: ERRORS[k] for k in (401, 404)})
    async def job(self, request: Request, job_id: str) -> JobView:
        """A job's status, progress and message; its result once completed, its error once failed.

        Only the API key that created a job can read it; to any other it does not exist.
        """
        owner = self._caller(request)
        job = await self._tracker.get.remote(job_key(owner, job_id))
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        return job

    # -- requests -------------------------------------------------------------

    def _caller(self, request: Request) -> str:
        """The owner the request acts for; open paths need no key (their caller is anonymous)."""
        if self._access.is_open(request.url.path):
            return ""
        client = request.client.host if request.client else None
        headers = request.headers
        return self._access.owner(headers.get("authorization"), client, headers.get("host"), headers.get("origin"))

    def _source(self, body: AnalysisRequest) -> str:
        """The source to analyse, refused here already when it may never be read (a path off the roots)."""
        source = choose_source(body.video_path, body.audio_path)
        check_source(source, self._settings.media)
        return source

    async def _read_json(self, request: Request, model: type[M]) -> M:
        try:
            return await read_json(request, model, self._settings.server.max_json_bytes)
        except ValidationError as e:
            raise _invalid(e) from e

    async def _read_job_request(self, request: Request) -> tuple[JobRequest, SpooledUpload | None]:
        if media_type(request) == "multipart/form-data":
            spool = self._settings.server.upload_dir
            try:
                return await read_form(request, JobRequest, self._settings.media.max_file_bytes, spool)
            except ValidationError as e:
                raise _invalid(e) from e
        if media_type(request) == "application/json":
            return await self._read_json(request, JobRequest), None
        raise UnsupportedMediaType("send application/json, or multipart/form-data with the media as `file`")

    # -- running analyses -----------------------------------------------------

    async def _register(self, owner: str, job_id: str, label: str, callback_url: str | None) -> tuple[JobView, bool]:
        """Admit an analysis and record its job; (the job, True) when the caller must now `_execute` it.

        The admission is counted before the first await, so a burst of requests
        cannot all slip past the limit; `_execute` gives it back when done.
        """
        self._check_capacity()
        self._admitted += 1
        created = False
        try:
            job, created = await self._tracker.submit.remote(owner, job_id, label, callback_url)
        finally:
            if not created:
                self._admitted -= 1
        self._report_occupancy()
        return job, created

    def _check_capacity(self) -> None:
        jobs = self._settings.jobs
        if self._admitted >= jobs.max_active + jobs.max_waiting:
            raise Overloaded(f"{self._admitted} analyses are running or waiting; retry later")

    async def _execute(self, key: str, source: str | SpooledUpload, options: AnalysisOptions) -> AnalysisResult:
        """Run a registered analysis; its job ends completed or failed, and its admission is released."""
        try:
            async with self._slots:
                self._running += 1
                self._report_occupancy()
                try:
                    await self._tracker.start.remote(key)
                    progress = TrackerProgress(self._tracker, key, self._settings.jobs.progress_interval_s)
                    result = await self._graph.analyze(source, options, progress, timings={})
                    await asyncio.to_thread(check_result_size, result, self._settings.server.max_result_bytes)
                finally:
                    self._running -= 1
        except asyncio.CancelledError:  # a /transcribe client went away: Serve cancels its request
            await asyncio.shield(self._tracker.fail.remote(key, CANCELLED))
            raise
        except Exception as e:
            error = as_analyzer_error(e)
            self._metrics.requests_failed.inc(tags={"code": error.code})
            await self._tracker.fail.remote(key, JobError(code=error.code, message=str(error)))
            if error is e:
                raise
            raise error from e
        else:
            await self._tracker.complete.remote(key, result)
            self._metrics.analysis_done(result)
            return result
        finally:
            self._admitted -= 1
            self._report_occupancy()
            _discard(source)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # mark it retrieved: _execute recorded it as the job's failure

    def _report_occupancy(self) -> None:
        self._metrics.occupancy(self._running, self._admitted - self._running)
