"""The HTTP ingress: FastAPI routes on a Serve deployment that runs analyses
through the stage graph and records every one of them as a job.

Errors become HTTP statuses here and only here (see `deployments.errors`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' real types.
import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
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
from deployments.errors import (
    JobExists,
    JobStateConflict,
    Overloaded,
    Unauthorized,
    UnknownJob,
    as_analyzer_error,
    http_status,
)
from deployments.events import JobEvent
from deployments.graph import Graph
from deployments.jobs import Job, JobError, JobSpec, JobView, job_key
from deployments.metrics import GraphMetrics
from deployments.openai_api import ERRORS as OPENAI_ERRORS
from deployments.openai_api import (
    FORM_BODY,
    TRANSCRIPTION_RESPONSES,
    ModelCard,
    ModelList,
    TranscriptionForm,
    error_param,
    is_openai_path,
    openai_error,
    render_transcription,
    served_model,
    served_models,
    transcript_events,
    validation_param,
)
from deployments.progress import TrackerProgress
from deployments.tracker import job_tracker
from deployments.webpage import HEADERS as PAGE_HEADERS
from deployments.webpage import load_static
from pipeline.analyzer import STAGE_WEIGHTS, AnalysisOptions, Source, Upload, run_analysis
from pipeline.config import Settings
from pipeline.errors import AnalyzerError, InputError, UnsupportedMediaType
from pipeline.formats import FORMATS, render
from pipeline.media import choose_source
from pipeline.netguard import NetworkPolicy, check_url_async
from pipeline.schemas import AnalysisResult
from pipeline.sources import check_source

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Bad input: no source, unknown language, a URL that could not be downloaded or is not allowed",
        401: "No API key, or an unknown one (`Authorization: Bearer <key>`)",
        403: "A local path outside the server's roots, or an anonymous client off loopback",
        404: "Source file or job not found",
        409: "job_id already used, or a job in a state that does not allow the request",
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


def _error(
    request: Request, status: int, code: str, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    """An error in the product's `ErrorBody`, or in OpenAI's shape on the OpenAI-compatible routes."""
    if is_openai_path(request.url.path):
        return JSONResponse(openai_error(status, code, message, param), status, headers=headers)
    return JSONResponse(ErrorBody(error=code, message=message).model_dump(), status, headers=headers)


@app.exception_handler(AnalyzerError)
async def _analyzer_error(request: Request, error: AnalyzerError) -> JSONResponse:
    headers = None
    if isinstance(error, Overloaded):
        headers = {"retry-after": "30"}
    elif isinstance(error, Unauthorized):
        headers = {"www-authenticate": "Bearer"}
    return _error(request, http_status(error), error.code, str(error), error_param(error), headers)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
    message = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in error.errors())
    if is_openai_path(request.url.path):  # OpenAI answers a bad parameter with 400 and names it
        return _error(request, 400, "invalid_value", message, validation_param(list(error.errors())))
    return _error(request, 422, "invalid_input", message)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = str(error.detail)
    if is_openai_path(request.url.path) and error.status_code in (404, 405):
        message = f"Invalid URL ({request.method} {request.url.path})"  # OpenAI's words for a route it lacks
    return _error(request, error.status_code, "http_error", message)


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(request, 500, "internal_error", "internal error; see the server log")


EVENT_WAIT_S = 15.0  # a keep-alive comment this often while a job is quiet: proxies close silent streams
EVENT_RETRY_MS = 2000  # how soon EventSource clients reconnect after a break
ExportFormat = Literal["json", "srt", "vtt", "rttm", "txt", "tsv"]

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


class LeaseLost(Exception):
    """This replica stopped running a job that is no longer its own (cancelled, claimed again, given back)."""


def _discard(source: object) -> None:
    """Delete an upload's spooled file once nothing will read it again."""
    if isinstance(source, SpooledUpload):
        source.path.unlink(missing_ok=True)


def _spec(source: str | SpooledUpload, options: AnalysisOptions) -> JobSpec:
    request = uuid.uuid4().hex
    if isinstance(source, SpooledUpload):
        return JobSpec(
            source=source.filename,
            upload=str(source.path),
            filename=source.filename,
            options=options,
            request_id=request,
        )
    return JobSpec(source=source, options=options, request_id=request)


def _media(spec: JobSpec) -> Source:
    if spec.upload is not None:
        return Upload(Path(spec.upload), spec.filename or "upload")
    return spec.source


async def _answer(call: Awaitable[T]) -> T:
    """A tracker call's answer; an error it raised on purpose (Overloaded, UnknownJob...) as itself."""
    try:
        return await call
    except Exception as e:
        raise as_analyzer_error(e) from e


def _accepted(job: JobView) -> JobAccepted:
    return JobAccepted(
        job_id=job.job_id,
        status=job.status,
        progress=job.progress,
        message=job.message,
        status_url=f"/jobs/{job.job_id}",
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
        self._access = Access.from_settings(settings)
        self._network = NetworkPolicy.from_settings(settings.network)
        self._graph = Graph(extraction, transcription, diarization, acoustics, settings.jobs)
        self._tracker = job_tracker(settings, STAGE_WEIGHTS)
        self._worker = uuid.uuid4().hex  # this replica's name on the leases it holds
        self._slots = asyncio.Semaphore(settings.jobs.max_active)
        self._running = 0  # analyses this replica runs now
        self._lost: set[str] = set()  # lease tokens of runs stopped here because the job is no longer theirs
        self._holding: dict[str, tuple[str, asyncio.Task]] = {}  # lease token -> (job key, its analysis)
        self._wake = asyncio.Event()  # a job was queued here: look for work now, not at the next poll
        self._claimed: set[asyncio.Task] = set()  # jobs running from the queue (referenced until done)
        self._metrics = GraphMetrics()
        self._static = load_static()
        # Serve builds replicas on their event loop: the worker starts with the replica, so queued
        # jobs run after a restart even before any request arrives.
        self._worker_loop = asyncio.get_running_loop().create_task(self._work())

    @app.get("/health", response_model=Health)
    async def health(self, request: Request) -> Health:
        """Readiness of each stage deployment, the models they loaded and their devices."""
        self._caller(request)
        answers = await self._graph.describe()
        stages = {
            name: a if isinstance(a, StageInfo) else StageInfo(ready=False, detail=type(a).__name__)
            for name, a in answers.items()
        }
        try:
            counts = await asyncio.wait_for(self._tracker.counts.remote(), 5.0)
        except Exception:  # the tracker is restarting: jobs wait meanwhile
            counts = None
        ready = counts is not None and all(s.ready for s in stages.values())
        return Health(status="ok" if ready else "degraded", deployments=stages, jobs=counts or {})

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
        await self._check_capacity()
        async with self._slots:  # runs here, on this replica, as soon as it has room
            spec, token = _spec(source, options), self._token()
            _, created = await _answer(self._tracker.submit.remote(owner, job_id, spec, source, None, worker=token))
            if not created:
                raise JobExists(f"job {job_id} exists already; GET /jobs/{job_id}")
            response.headers["x-job-id"] = job_id
            key = job_key(owner, job_id)
            try:
                return await self._run(key, spec, token)
            except LeaseLost:
                raise JobStateConflict(f"job {job_id} was cancelled") from None

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
        await self._check_capacity()  # before an upload is read and spooled, not after
        body, upload = await self._read_job_request(request)
        try:
            options = _options(body)
            source: str | SpooledUpload = upload or self._source(body)
            if body.callback_url is not None:
                await check_url_async(body.callback_url, self._network)
            job_id = body.job_id or uuid.uuid4().hex
            label = source.filename if isinstance(source, SpooledUpload) else source
            # Stored (upload path included) before the 202: from here on, a crash loses nothing.
            job, created = await _answer(
                self._tracker.submit.remote(owner, job_id, _spec(source, options), label, body.callback_url)
            )
        except asyncio.CancelledError:
            raise  # the client went away mid-submit: the job may be stored already (else the sweeper takes it)
        except BaseException:
            _discard(upload)
            raise
        if created:
            self._wake.set()
        else:
            _discard(upload)
            response.status_code = 200
        return _accepted(job)

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

    @app.get(
        "/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "Server-sent events of the job"},
            **{k: ERRORS[k] for k in (401, 404)},
        },
    )
    async def job_events(
        self,
        request: Request,
        job_id: str,
        last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    ) -> StreamingResponse:
        """The job's progress as server-sent events, live: `event: progress` for each update, then
        `event: completed|failed|cancelled` with the final state, and the stream ends.

        Each event's `data` is the job as `GET /jobs/{job_id}` shows it, without the
        result (fetch it once: `GET /jobs/{job_id}/result`). Send the last `id` seen as
        `Last-Event-ID` to resume after a break (browsers' EventSource does this itself).
        """
        key = job_key(self._caller(request), job_id)
        first = await _answer(self._tracker.events.remote(key, last_event_id, 0.0))
        if first is None:
            raise UnknownJob(f"no job {job_id}")
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # no proxy may hold events back
        stream = self._event_stream(key, last_event_id, first)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    @app.get(
        "/jobs/{job_id}/result",
        response_class=Response,
        responses={
            200: {
                "description": "The result in the format asked for",
                "content": {f.media_type.split(";")[0]: {} for f in FORMATS.values()},
            },
            **{k: ERRORS[k] for k in (401, 404, 409)},
        },
    )
    async def job_result(self, request: Request, job_id: str, format: ExportFormat = "json") -> Response:
        """A completed job's result as `json` (the AnalysisResult), subtitles (`srt`, `vtt`), speaker
        turns (`rttm`), or text with speakers (`txt`, `tsv`: start, end in ms, speaker, text).
        Any other state gets 409."""
        owner = self._caller(request)
        job = await self._tracker.get.remote(job_key(owner, job_id))
        if job is None:
            raise UnknownJob(f"no job {job_id}")
        if job.result is None:
            raise JobStateConflict(f"job {job_id} is {job.status}; it has a result once completed")
        text = await asyncio.to_thread(render, job.result, format, job_id)
        disposition = f'inline; filename="{job_id}.{FORMATS[format].extension}"'
        return Response(text, media_type=FORMATS[format].media_type, headers={"content-disposition": disposition})

    @app.delete("/jobs/{job_id}", response_model=JobView, responses={k: ERRORS[k] for k in (401, 403, 404, 409)})
    async def cancel_job(self, request: Request, job_id: str) -> JobView:
        """Cancel a queued or running job: it ends `cancelled` (with a final callback), and its worker
        stops within a third of `jobs.lease_s`. A finished job gets 409."""
        owner = self._caller(request)
        return await _answer(self._tracker.cancel.remote(job_key(owner, job_id)))

    @app.post(
        "/jobs/{job_id}/retry",
        status_code=202,
        response_model=JobAccepted,
        responses={k: ERRORS[k] for k in (401, 403, 404, 409, 503)},
    )
    async def retry_job(self, request: Request, job_id: str) -> JobAccepted:
        """Run a failed or cancelled job again, from its stored request (an upload is kept for this until
        `server.upload_retention_s`). Any other state gets 409."""
        owner = self._caller(request)
        job = await _answer(self._tracker.retry.remote(job_key(owner, job_id)))
        self._wake.set()
        return _accepted(job)

    # -- the web page: public by default (`server.open_paths`); it carries no data and asks for a key itself

    @app.get("/", include_in_schema=False)
    async def page(self, request: Request) -> Response:
        return self._static_file(request, "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, request: Request, name: str) -> Response:
        return self._static_file(request, name)

    def _static_file(self, request: Request, name: str) -> Response:
        self._caller(request)
        file = self._static.get(name)
        if file is None:
            raise HTTPException(404, "no such file")
        headers = {**PAGE_HEADERS, "etag": file.etag}
        if request.headers.get("if-none-match") == file.etag:
            return Response(status_code=304, headers=headers)
        return Response(file.body, media_type=file.media_type, headers=headers)

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

    async def _event_stream(self, key: str, last: str | None, first: tuple[list[JobEvent], bool]) -> AsyncIterator[str]:
        """Server-sent events until the job's final one; a comment line whenever it is quiet for a while."""
        yield f"retry: {EVENT_RETRY_MS}\n\n"
        events, ended = first
        while True:
            for event in events:
                yield event.encode()
            if ended:
                return
            if not events:
                yield ": keep-alive\n\n"
            last = events[-1].id if events else last
            answer = await _answer(self._tracker.events.remote(key, last, EVENT_WAIT_S))
            if answer is None:  # the job is gone (its owner's store was cleared): nothing more will come
                return
            events, ended = answer

    # -- running analyses -----------------------------------------------------

    async def _check_capacity(self) -> None:
        if await self._tracker.queue_full.remote():
            raise Overloaded("the job queue is full; retry later")

    async def _work(self) -> None:
        """Claim queued jobs (or jobs whose worker died) whenever this replica has a free slot."""
        poll_s = self._settings.jobs.poll_s
        while True:
            await self._slots.acquire()
            try:
                job = await self._tracker.claim.remote(self._token())
            except Exception as e:  # the tracker is restarting: its store keeps the queue meanwhile
                log.warning("could not claim a job (%s); trying again", type(e).__name__)
                job = None
            if job is None:
                self._slots.release()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll_s)
                self._wake.clear()
                continue
            task = asyncio.create_task(self._run_claimed(job))
            self._claimed.add(task)
            task.add_done_callback(self._claimed.discard)

    async def _run_claimed(self, job: Job) -> None:
        try:
            assert job.spec is not None and job.worker is not None  # the tracker hands out only runnable jobs
            await self._run(job.key, job.spec, job.worker)
        except Exception:
            pass  # _run recorded it as the job's failure
        finally:
            self._slots.release()
            self._wake.set()  # a slot is free: there may be more waiting

    async def _run(self, key: str, spec: JobSpec, token: str) -> AnalysisResult:
        """Run a job whose lease `token` this replica holds, renewing it meanwhile; record how it ended."""
        self._running += 1
        self._report_occupancy()
        analysis = asyncio.current_task()
        assert analysis is not None
        self._holding[token] = (key, analysis)
        lease = asyncio.create_task(self._hold_lease(key, token, analysis))
        try:
            progress = TrackerProgress(self._tracker, key, token, self._settings.jobs.progress_interval_s)
            result = await run_analysis(self._graph, _media(spec), spec.options, progress)
            await asyncio.to_thread(check_result_size, result, self._settings.server.max_result_bytes)
        except asyncio.CancelledError:
            if token in self._lost:  # cancelled, claimed again elsewhere, or given back: nothing to record
                self._lost.discard(token)
                raise LeaseLost(key) from None
            # A /transcribe client went away: Serve cancels its request.
            await asyncio.shield(_answer(self._tracker.cancel.remote(key)))
            raise
        except Exception as e:
            error = as_analyzer_error(e)
            self._metrics.requests_failed.inc(tags={"code": error.code})
            failure = JobError(code=error.code, message=str(error))
            # A server fault keeps an upload for POST /retry; the input's own fault would only fail again.
            await self._tracker.fail.remote(key, token, failure, retryable=not isinstance(error, InputError))
            if error is e:
                raise
            raise error from e
        else:
            await self._tracker.complete.remote(key, token, result)
            self._metrics.analysis_done(result)
            return result
        finally:
            lease.cancel()
            self._holding.pop(token, None)
            self._running -= 1
            self._report_occupancy()

    async def _hold_lease(self, key: str, token: str, analysis: asyncio.Task) -> None:
        """Renew the job's lease every third of it; stop the analysis once the job is no longer ours."""
        every = self._settings.jobs.lease_s / 3
        while True:
            await asyncio.sleep(every)
            try:
                held = await self._tracker.renew.remote(key, token)
            except Exception as e:  # the tracker is restarting; the lease is in its store
                log.warning("could not renew the lease of a job (%s)", type(e).__name__)
                continue
            if not held:
                log.info("job %s: cancelled or claimed by another replica; stopping it here", key.partition("/")[2])
                self._lost.add(token)
                analysis.cancel()
                return

    async def __del__(self) -> None:
        """Serve is shutting this replica down (a downscale, a redeploy): give its jobs back to the queue
        at once, uncounted, rather than leave them to a lease that runs out."""
        self._worker_loop.cancel()
        for token, (key, analysis) in list(self._holding.items()):
            self._lost.add(token)
            analysis.cancel()
            with suppress(Exception):
                await asyncio.wait_for(self._tracker.release.remote(key, token), 10.0)

    def _token(self) -> str:
        """A lease token: this replica, and one claim of it (a job run twice here holds two tokens)."""
        return f"{self._worker}.{uuid.uuid4().hex[:8]}"

    def _report_occupancy(self) -> None:
        self._metrics.occupancy(self._running)

    # -- OpenAI-compatible API (deployments.openai_api) ------------------------

    @app.get("/v1/models", response_model=ModelList, responses={401: OPENAI_ERRORS[401]})
    async def openai_models(self, request: Request) -> ModelList:
        """The models of `POST /v1/audio/transcriptions`: the configured Whisper model and OpenAI's names
        for it, all running the same full analysis."""
        self._caller(request)
        return served_models(self._settings.asr.model)

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses={k: OPENAI_ERRORS[k] for k in (401, 404)})
    async def openai_model(self, request: Request, model: str) -> ModelCard:
        self._caller(request)
        return served_model(model, self._settings.asr.model)

    @app.post(
        "/v1/audio/transcriptions",
        response_model=None,
        responses=TRANSCRIPTION_RESPONSES,
        openapi_extra=FORM_BODY,
    )
    async def openai_transcription(self, request: Request) -> Response:
        """OpenAI's transcription API: the full analysis of `file`, answered as `response_format` asks.

        Synchronous, and recorded as a job like `/transcribe` (its id in `x-job-id`).
        """
        owner = self._caller(request)
        await self._check_capacity()  # before an upload is read and spooled, not after
        form, upload = await self._read_openai_form(request)
        job_id = uuid.uuid4().hex
        result = await self._analyse_upload(owner, job_id, form, upload)
        headers = {"x-job-id": job_id}
        if form.stream:
            events = await asyncio.to_thread(transcript_events, result, form)
            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})  # as /jobs/{id}/events
            return StreamingResponse(iter(events), media_type="text/event-stream", headers=headers)
        rendered = await asyncio.to_thread(render_transcription, result, form)  # a long file's words: not on the loop
        return Response(rendered.body, media_type=rendered.media_type, headers=headers)

    async def _read_openai_form(self, request: Request) -> tuple[TranscriptionForm, SpooledUpload]:
        if media_type(request) != "multipart/form-data":
            raise UnsupportedMediaType("send multipart/form-data with the audio as `file`, as OpenAI's API takes it")
        try:
            spool = self._settings.server.upload_dir
            return await read_form(request, TranscriptionForm, self._settings.media.max_file_bytes, spool)
        except ValidationError as e:
            raise _invalid(e) from e

    async def _analyse_upload(
        self, owner: str, job_id: str, form: TranscriptionForm, upload: SpooledUpload
    ) -> AnalysisResult:
        """Run the analysis here, now, as `/transcribe` does; the upload is the job's once it is stored."""
        stored = False  # once stored, the upload is the job's: the tracker deletes it when the job ends
        try:
            served_model(form.model, self._settings.asr.model)
            options = form.analysis_options()
            async with self._slots:
                spec, token = _spec(upload, options), self._token()
                try:
                    await _answer(self._tracker.submit.remote(owner, job_id, spec, upload.filename, None, worker=token))
                except asyncio.CancelledError:
                    stored = True  # the client left mid-submit: it may be stored already (else the sweeper takes it)
                    raise
                stored = True
                try:
                    return await self._run(job_key(owner, job_id), spec, token)
                except LeaseLost:
                    raise JobStateConflict(f"job {job_id} was cancelled") from None
        finally:
            if not stored:
                _discard(upload)
