"""Stage 2, speech recognition: WhisperX's recipe on CPU or GPU.

VAD cuts the audio into speech chunks of at most `chunk_size_s`; the chunks
are decoded in batches by faster-whisper (CTranslate2), the engine WhisperX
wraps. Every word then gets times from one of two sources:

- WhisperX forced alignment (wav2vec2) when `alignment` is on and a model for
  the language loads; words the aligner cannot place (digits, symbols) are
  interpolated from their neighbours;
- otherwise Whisper's own cross-attention word timings (`word_timestamps`),
  which need no extra weights. A language without an alignment model is
  therefore never an error.

We feed WhisperX's chunks to faster-whisper's `BatchedInferencePipeline`
rather than calling `whisperx.load_model`, because WhisperX's batched pipeline
decodes without timestamps and could not give words times without alignment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from pipeline.config import AsrSettings, check_device, resolve_device
from pipeline.embedded import EMBEDDED_PREFIX, whisper_model_dir
from pipeline.errors import AnalyzerError, ModelError, UnsupportedLanguage
from pipeline.media import SAMPLE_RATE
from pipeline.progress import ProgressHook, no_progress
from pipeline.schemas import WordTiming

log = logging.getLogger(__name__)
STAGE = "transcription"
T = TypeVar("T")
R = TypeVar("R")
LOOP_NGRAM = 4  # a clip decoded into a loop is decoded again with no n-gram this long said twice


@dataclass
class TimedWord:
    word: str
    start: float
    end: float
    score: float | None
    timing: WordTiming


@dataclass
class TranscriptSegment:
    start: float
    end: float
    text: str
    words: list[TimedWord] = field(default_factory=list)


@dataclass
class Transcript:
    language: str
    language_probability: float | None
    segments: list[TranscriptSegment]
    model: str
    alignment_model: str | None = None
    device: str = "cpu"

    @property
    def words(self) -> list[TimedWord]:
        return [w for s in self.segments for w in s.words]


@dataclass(frozen=True)
class LanguageGuess:
    """Whisper's language probabilities averaged over the detection windows, best first."""

    probabilities: list[tuple[str, float]]
    windows: int

    @property
    def language(self) -> str:
        return self.probabilities[0][0]

    @property
    def probability(self) -> float:
        return self.probabilities[0][1]


@dataclass
class TranscriptionRequest:
    """One file's share of a batch (see `WhisperXTranscriber.transcribe_batch`)."""

    samples: np.ndarray
    language: str | None
    progress: ProgressHook = no_progress
    prompt: str | None = None  # see `AnalysisOptions.prompt`


@dataclass
class _Prepared:
    """A request after VAD and language detection, ready to be decoded."""

    request: TranscriptionRequest
    language: str
    probability: float | None
    clips: list[dict[str, float]]
    aligner: tuple[Any, dict, str] | None
    encoded: list[bytes] = field(default_factory=list)  # detection's encoder outputs kept for the decoder


class SpeechRecognizer(Protocol):
    model_name: str
    device: str

    def transcribe(
        self, samples: np.ndarray, language: str | None, progress: ProgressHook, prompt: str | None = None
    ) -> Transcript: ...


def supported_languages() -> tuple[str, ...]:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return tuple(_LANGUAGE_CODES)


def check_language(language: str | None) -> str | None:
    """Normalise a requested language: None/"auto" mean detect; anything else must be a Whisper code."""
    if language is None or language.strip().lower() in ("", "auto"):
        return None
    code = language.strip().lower()
    if code not in supported_languages():
        raise UnsupportedLanguage(f"unknown language code {language!r}; use 'auto' or an ISO 639-1 code such as 'en'")
    return code


class WhisperXTranscriber:
    """Owns a Whisper model (and VAD/alignment models); transcribes one file per call."""

    def __init__(self, settings: AsrSettings, cache_dir: Path) -> None:
        from faster_whisper import WhisperModel

        self._settings = settings
        self.device = resolve_device(settings.device)
        compute_type = settings.compute_type
        if compute_type == "auto":
            compute_type = "float16" if self.device == "cuda" else "int8"
        self.model_name = settings.model
        model_path = settings.model
        if model_path.startswith(EMBEDDED_PREFIX):
            model_path = str(whisper_model_dir(model_path.removeprefix(EMBEDDED_PREFIX), cache_dir))
        # 0 means "one per core" explicitly: CTranslate2's own default follows
        # OMP_NUM_THREADS, which Ray sets to a replica's num_cpus (1 here), and
        # a single-threaded decoder would dominate the whole analysis.
        threads = settings.cpu_threads or os.cpu_count() or 1
        self.decoders = settings.decoders or (1 if self.device == "cuda" else min(2, threads))
        try:
            self._model = WhisperModel(
                model_path,
                device=self.device,
                compute_type=compute_type,
                cpu_threads=max(1, threads // self.decoders),
                num_workers=self.decoders,  # CTranslate2 runs this many calls at once, one per thread
            )
        except Exception as e:  # CTranslate2/hub raise many types; all mean "no model"
            raise ModelError(f"could not load Whisper model {settings.model!r}: {e}") from e
        # The batched decoder calls `self._model.encode`: the stand-in gives it language detection's outputs.
        self._encoder = EncoderReuse(self._model.encode, enabled=self.device == "cpu", threads=self.decoders)
        self._model.encode = self._encoder
        self._pyannote_vad: Any = None
        self._aligners: dict[str, tuple[Any, dict, str] | None] = {}
        log.info("loaded Whisper %s on %s (%s)", settings.model, self.device, compute_type)

    def check(self) -> None:
        """ModelError unless the model still answers (its CTranslate2 object, its device); no inference."""
        try:
            _ = self._model.model.is_multilingual
            check_device(self.device)
        except Exception as e:
            raise ModelError(f"Whisper model {self.model_name} does not answer: {type(e).__name__}: {e}") from e

    @property
    def english_only(self) -> bool:
        return not self._model.model.is_multilingual

    def transcribe(
        self,
        samples: np.ndarray,
        language: str | None,
        progress: ProgressHook = no_progress,
        prompt: str | None = None,
    ) -> Transcript:
        (outcome,) = self.transcribe_batch([TranscriptionRequest(samples, language, progress, prompt)])
        if isinstance(outcome, AnalyzerError):
            raise outcome
        return outcome

    def transcribe_batch(self, requests: list[TranscriptionRequest]) -> list[Transcript | AnalyzerError]:
        """Transcribe several files, decoding their speech chunks together.

        Files of one language (and one prompt) are laid end to end on one
        timeline, and their VAD chunks go to Whisper as one list of clips, so
        `batch_size` chunks of different files share each model call. A file's
        own error (bad language) is returned in its place instead of failing
        the others.
        """
        outcomes: list[Transcript | AnalyzerError | None] = [None] * len(requests)
        prepared: dict[int, _Prepared] = {}
        try:
            for i, request in enumerate(requests):
                try:
                    prepared[i] = self._prepare(request)
                except AnalyzerError as e:
                    outcomes[i] = e
            # The prompt is an argument of the whole decoding call: files asking for different ones decode apart.
            groups: dict[tuple[str, str | None], list[int]] = {}
            for i, p in prepared.items():
                groups.setdefault((p.language, p.request.prompt), []).append(i)
            for (language, prompt), indices in groups.items():
                decoded = self._decode_together(language, prompt, [prepared[i] for i in indices])
                for i, segments in zip(indices, decoded, strict=True):
                    outcomes[i] = self._finish(prepared[i], segments)
        finally:
            for p in prepared.values():
                self._encoder.forget(p.encoded)  # outputs the decoder did not meet (another file's offsets, an error)
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def _prepare(self, request: TranscriptionRequest) -> _Prepared:
        language = check_language(request.language)
        if self.english_only and language not in (None, "en"):
            raise UnsupportedLanguage(f"model {self.model_name} only transcribes English, not {language!r}")
        request.progress(STAGE, 0.0, "detecting speech")
        clips = self._speech_clips(request.samples)
        probability: float | None = 1.0
        encoded: list[bytes] = []
        if self.english_only:
            language = "en"
        elif language is None and clips:
            guess = self._detect_language(request.samples, clips, encoded)
            language, probability = guess.language, guess.probability
        elif language is None:
            language, probability = "en", None  # no speech: nothing to detect, nothing to transcribe
        aligner = self._aligner(language) if self._settings.alignment else None
        return _Prepared(request, language, probability, clips, aligner, encoded)

    def _speech_clips(self, samples: np.ndarray) -> list[dict[str, float]]:
        """Speech regions merged into chunks of at most chunk_size_s, in seconds (WhisperX's recipe)."""
        if self._settings.vad == "pyannote":
            return self._pyannote_clips(samples)
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        limit = self._settings.chunk_size_s
        speech = get_speech_timestamps(samples, VadOptions(max_speech_duration_s=limit, min_silence_duration_ms=160))
        chunks: list[dict[str, float]] = []
        for region in speech:
            start, end = region["start"] / SAMPLE_RATE, region["end"] / SAMPLE_RATE
            if chunks and end - chunks[-1]["start"] <= limit:
                chunks[-1]["end"] = end
            else:
                chunks.append({"start": start, "end": end})
        return chunks

    def detect_language(self, samples: np.ndarray) -> LanguageGuess | None:
        """The language of `samples`' speech (see `_detect_language`); None when VAD finds no speech."""
        clips = self._speech_clips(samples)
        encoded: list[bytes] = []
        try:
            return self._detect_language(samples, clips, encoded) if clips else None
        finally:
            self._encoder.forget(encoded)  # nothing is decoded after

    def _detect_language(self, samples: np.ndarray, clips: list[dict[str, float]], kept: list[bytes]) -> LanguageGuess:
        """Whisper's language probabilities over several clips of speech spread across the file.

        faster-whisper's own `detect_language` looks at the first 30 s only, so
        a file that opens with music, a jingle or another language was
        confidently misdetected. The clips are the decoder's own, so their
        encoder outputs are kept for it (see `EncoderReuse`): detection costs
        no extra encoder pass. The keys of the kept outputs are added to `kept`.
        """
        chosen = [clips[i] for i in detection_clips(clips, self._settings.language_detection_windows)]
        features = np.stack([self._clip_features(samples, clip) for clip in chosen])
        encoded = self._encoder.remember(features, kept)
        per_window = [
            [(token[2:-2], float(p)) for token, p in result]  # "<|fr|>" -> "fr"
            for result in self._model.model.detect_language(encoded)
        ]
        guess = LanguageGuess(combine_language_probabilities(per_window), len(chosen))
        top = ", ".join(f"{lang} {p:.2f}" for lang, p in guess.probabilities[:3])
        log.info("language over %d clip(s): %s", guess.windows, top)
        return guess

    def _clip_features(self, samples: np.ndarray, clip: dict[str, float]) -> np.ndarray:
        """A clip's log-mel features exactly as faster-whisper's batched pipeline computes them for
        `clip_timestamps` (same slice, last frame dropped, padded to 30 s): equal features are what
        lets the decoder reuse the clip's encoder output."""
        from faster_whisper.audio import pad_or_trim

        audio = samples[int(clip["start"] * SAMPLE_RATE) : int(clip["end"] * SAMPLE_RATE)]
        return pad_or_trim(self._model.feature_extractor(audio)[..., :-1])

    def _decode_together(
        self, language: str, prompt: str | None, files: list[_Prepared]
    ) -> list[list[TranscriptSegment]]:
        offsets = np.cumsum([0] + [len(f.request.samples) for f in files[:-1]])
        clips = [
            {"start": c["start"] + offset / SAMPLE_RATE, "end": c["end"] + offset / SAMPLE_RATE}
            for f, offset in zip(files, offsets, strict=True)
            for c in f.clips
        ]
        results: list[list[TranscriptSegment]] = [[] for _ in files]
        if not clips:
            return results
        timeline = np.concatenate([f.request.samples for f in files]) if len(files) > 1 else files[0].request.samples
        word_timestamps = files[0].aligner is None  # one language, so one aligner (or none) for all
        speech = [sum(c["end"] - c["start"] for c in f.clips) for f in files]
        heard = [0.0] * len(files)

        def decode(group: list[dict[str, float]]) -> Iterator[Any]:
            return self._decode_clips(timeline, group, language, prompt, word_timestamps)

        # Several decoders take one batch of clips at a time, whichever is free: halves fixed in
        # advance left one decoder idle for the last 4 s of the 10-minute benchmark (a clip that
        # loops is decoded twice, and speech is not spread evenly).
        groups = runs_of(clips, self._settings.batch_size) if self.decoders > 1 else [clips]
        for seg in in_parallel(decode, groups, self.decoders):
            owner = int(np.searchsorted(offsets, round(seg.start * SAMPLE_RATE), side="right")) - 1
            shift = offsets[owner] / SAMPLE_RATE
            words = [
                TimedWord(
                    w.word.strip(), float(w.start - shift), float(w.end - shift), float(w.probability), "recognizer"
                )
                for w in seg.words or []
                if w.word.strip()
            ]
            start, end = float(seg.start - shift), float(seg.end - shift)
            results[owner].append(TranscriptSegment(start, end, seg.text.strip(), words))
            heard[owner] += end - start
            files[owner].request.progress(
                STAGE,
                min(heard[owner] / max(speech[owner], 1e-9), 0.99),
                f"transcribed {min(heard[owner], speech[owner]):.0f} of {speech[owner]:.0f} s of speech",
            )
        for segments in results:
            segments.sort(key=lambda seg: seg.start)  # the decoders' segments arrive interleaved
        return results

    def _decode_clips(
        self, timeline: np.ndarray, clips: list[dict[str, float]], language: str, prompt: str | None, words: bool
    ) -> Iterator[Any]:
        """faster-whisper's batched decoding of `clips` of `timeline`, as a generator of its segments."""
        from faster_whisper import BatchedInferencePipeline

        # A pipeline per call: it keeps the last word's end between batches, which decoders must not
        # share. Each call starts as after a pause (where its word timings may shorten an overlong
        # first word), which is what VAD clips mostly start after.
        segments, _ = BatchedInferencePipeline(self._model).transcribe(
            timeline,
            language=language,
            batch_size=self._settings.batch_size,
            beam_size=self._settings.beam_size,
            initial_prompt=prompt,  # a per-call argument: nothing shared with other calls is changed
            vad_filter=False,
            clip_timestamps=clips,
            chunk_length=int(self._settings.chunk_size_s),
            word_timestamps=words,
        )
        # A generator: decoding happens as we iterate.
        return self._without_loops(segments, timeline, language, prompt, words)

    def _without_loops(
        self, segments: Iterable[Any], timeline: np.ndarray, language: str, prompt: str | None, words: bool
    ) -> Iterator[Any]:
        """The batched decoder's segments, with every clip it decoded into a repetition loop decoded again.

        The batched decoder has no temperature fallback: a clip whose beam search
        falls into a loop comes back as is, and the clip's real speech is lost (on
        the diarization harness's dev split, "this time, this time, ..." for the
        whole of one 30 s clip; 15 clips of 13 files in 90). Such a clip is told as
        Whisper tells it (its text compresses more than `compression_ratio_threshold`
        times under zlib) and decoded again alone, still by beam search but with no
        4-gram said twice. On dev's looping clips that gave fewer word errors than
        Whisper's fallback on sampling at rising temperatures, in a third of the time
        (the sampling took up to 27 s for one clip), and needs no random seed.
        """
        threshold = self._settings.compression_ratio_threshold
        for seg in segments:
            if not threshold or seg.compression_ratio <= threshold:
                yield seg
                continue
            log.warning(
                "clip %.1f-%.1f s decoded into a loop (compression ratio %.1f); decoding it again with no "
                "repeated %d-gram",
                seg.start,
                seg.end,
                seg.compression_ratio,
                LOOP_NGRAM,
            )
            # The clip's audio alone, not the timeline with `clip_timestamps`: faster-whisper's
            # `transcribe` computes the log-mel features of all the audio it is given before it
            # seeks, in float64 (a 3 GB spike on an hour of audio, for one 30 s clip).
            first = int(seg.start * SAMPLE_RATE)
            again, _ = self._model.transcribe(
                timeline[first : int(np.ceil(seg.end * SAMPLE_RATE))],
                language=language,
                beam_size=self._settings.beam_size,
                initial_prompt=prompt,
                temperature=0.0,
                no_repeat_ngram_size=LOOP_NGRAM,
                condition_on_previous_text=False,  # a loop must not prompt the next window
                word_timestamps=words,
            )
            yield from (shifted(part, first / SAMPLE_RATE) for part in again)

    def _finish(self, file: _Prepared, segments: list[TranscriptSegment]) -> Transcript:
        transcript = Transcript(file.language, file.probability, segments, self.model_name, device=self.device)
        if file.aligner is not None and segments:
            model, metadata, name = file.aligner
            transcript.segments = self._align(segments, file.request.samples, model, metadata)
            transcript.alignment_model = name
        file.request.progress(STAGE, 1.0, f"transcribed {len(transcript.words)} words")
        return transcript

    def _pyannote_clips(self, samples: np.ndarray) -> list[dict[str, float]]:
        """WhisperX's own VAD: pyannote segmentation, merged into chunks of at most chunk_size_s."""
        import torch
        from whisperx.vads import Pyannote

        onset, offset = 0.5, 0.363  # WhisperX's defaults
        if self._pyannote_vad is None:
            self._pyannote_vad = Pyannote(torch.device(self.device), token=None, vad_onset=onset, vad_offset=offset)
        scores = self._pyannote_vad({"waveform": torch.from_numpy(samples)[None], "sample_rate": SAMPLE_RATE})
        chunks = Pyannote.merge_chunks(scores, self._settings.chunk_size_s, onset=onset, offset=offset)
        return [{"start": c["start"], "end": c["end"]} for c in chunks]

    def _aligner(self, language: str) -> tuple[Any, dict, str] | None:
        """The wav2vec2 aligner for `language`, loaded once; None if none loads (never an error)."""
        if language not in self._aligners:
            import whisperx

            name = self._settings.alignment_models.get(language)
            try:
                model, metadata = whisperx.load_align_model(language, self.device, model_name=name)
                self._aligners[language] = (model, metadata, name or f"whisperx-default-{language}")
            except Exception as e:  # no model for the language, no network, bad name...
                log.warning("no alignment model for %r (%s); using Whisper word timings", language, e)
                self._aligners[language] = None
        return self._aligners[language]

    def _align(
        self, segments: list[TranscriptSegment], samples: np.ndarray, model: Any, metadata: dict
    ) -> list[TranscriptSegment]:
        import whisperx

        aligned = whisperx.align(
            [{"start": s.start, "end": s.end, "text": s.text} for s in segments],
            model,
            metadata,
            samples,
            self.device,
        )
        out = []
        for seg in aligned["segments"]:
            words = [
                TimedWord(w["word"], w.get("start", np.nan), w.get("end", np.nan), w.get("score"), "aligned")
                for w in seg.get("words", [])
            ]
            out.append(TranscriptSegment(seg["start"], seg["end"], seg["text"].strip(), interpolate_missing(words)))
        return out


def interpolate_missing(words: list[TimedWord]) -> list[TimedWord]:
    """Give words the aligner could not place (NaN times) the gap between their neighbours."""
    n = len(words)
    for i, w in enumerate(words):
        if np.isfinite(w.start) and np.isfinite(w.end):
            continue
        prev_end = next((words[j].end for j in range(i - 1, -1, -1) if np.isfinite(words[j].end)), None)
        next_start = next((words[j].start for j in range(i + 1, n) if np.isfinite(words[j].start)), None)
        start = prev_end if prev_end is not None else (next_start or 0.0)
        end = next_start if next_start is not None else start
        w.start, w.end, w.timing = float(start), float(max(end, start)), "interpolated"
    return words


def detection_clips(clips: list[dict[str, float]], count: int) -> list[int]:
    """Indices of up to `count` clips to detect the language on, spread over the speech.

    The clips laid end to end (silence left out) are cut into `count` equal
    shares of speech, and each share gives its longest clip (a clip belongs to
    the share its middle falls in): spread over the file, and as full of speech
    as the clips are. Short files cost one clip.
    """
    if not clips:
        return []
    lengths = np.array([c["end"] - c["start"] for c in clips])
    middles = np.cumsum(lengths) - lengths / 2
    share = np.minimum((middles / max(lengths.sum(), 1e-9) * count).astype(int), count - 1)
    return [int(np.flatnonzero(share == s)[np.argmax(lengths[share == s])]) for s in np.unique(share)]


def runs_of(items: list[T], size: int) -> list[list[T]]:
    """`items` cut into runs of `size` consecutive items (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]


def in_parallel(produce: Callable[[T], Iterable[R]], inputs: list[T], workers: int) -> Iterator[R]:
    """The items of `produce(x)` for every input, yielded in the order they come. Up to `workers`
    threads each take the next input nobody has taken yet, so a thread whose inputs went quickly
    takes more instead of waiting for the others. An error in one thread is raised here once the
    others have stopped."""
    workers = min(workers, len(inputs))
    if workers <= 1:
        for x in inputs:
            yield from produce(x)  # nothing to overlap: no thread
        return
    items: queue.Queue = queue.Queue()
    todo: queue.Queue = queue.Queue()
    for x in inputs:
        todo.put(x)
    stop = threading.Event()
    finished = object()

    def work() -> None:
        try:
            while not stop.is_set():
                try:
                    x = todo.get_nowait()
                except queue.Empty:
                    return
                for item in produce(x):
                    if stop.is_set():
                        return
                    items.put(item)
        except BaseException as e:  # re-raised by the consumer below
            items.put(_Raised(e))
        finally:
            items.put(finished)

    threads = [threading.Thread(target=work, name=f"decoder-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = items.get()
            if item is finished:
                running -= 1
            elif isinstance(item, _Raised):
                raise item.error
            else:
                yield item
    finally:
        stop.set()  # a thread still decoding stops after its current batch
        for thread in threads:
            thread.join()


@dataclass(frozen=True)
class _Raised:
    error: BaseException


def shifted(segment: Any, seconds: float) -> Any:
    """A faster-whisper `Segment` (and its words) `seconds` later."""
    words = segment.words and [
        replace(w, start=round(w.start + seconds, 3), end=round(w.end + seconds, 3)) for w in segment.words
    ]
    return replace(segment, start=round(segment.start + seconds, 3), end=round(segment.end + seconds, 3), words=words)


class EncoderReuse:
    """Stands in for `WhisperModel.encode`, handing back the outputs of feature windows that were
    `remember`ed, instead of encoding them again.

    Why: language detection encodes a few of the clips the batched decoder
    encodes next (faster-whisper calls `model.encode` inside its batch step);
    on 2 CPU cores each 30 s window costs about 0.5 s of encoder. Outputs are
    matched by the features' bytes, so a window is reused only when it is
    exactly the one remembered, whichever thread decodes it (the decoders run
    on threads of their own): equal features have equal outputs, so a request
    that meets another's window gets the right output too. CPU only:
    CTranslate2 cannot hand device memory to numpy, and on a GPU the encoder
    pass is cheap.
    """

    def __init__(self, encode: Callable[[np.ndarray], Any], enabled: bool, threads: int = 1) -> None:
        self._encode = encode
        self._enabled = enabled
        self._threads = threads if enabled else 1
        self._lock = threading.Lock()
        self._outputs: dict[bytes, np.ndarray] = {}

    def remember(self, features: np.ndarray, keys: list[bytes]) -> Any:
        """`features`' encoder output, kept for the next `__call__` that meets them; their keys are
        added to `keys`, for `forget`. The windows are shared among the model's decoders, which run
        one call each at once."""
        parts = np.array_split(features, min(self._threads, len(features)))
        if len(parts) == 1:
            encoded = self._encode(features)
        else:
            import ctranslate2

            with ThreadPoolExecutor(len(parts)) as pool:
                outputs = list(pool.map(lambda part: np.asarray(self._encode(part)), parts))
            encoded = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.concatenate(outputs)))
        if self._enabled:
            kept = {_window_key(f): out for f, out in zip(features, np.asarray(encoded), strict=True)}
            with self._lock:
                self._outputs.update(kept)
            keys.extend(kept)
        return encoded

    def forget(self, keys: list[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._outputs.pop(key, None)

    def kept(self) -> int:
        """How many outputs are waiting for the decoder."""
        return len(self._outputs)

    def __call__(self, features: np.ndarray) -> Any:
        if not self._outputs:
            return self._encode(features)
        import ctranslate2

        batch = features if features.ndim == 3 else features[None]
        with self._lock:
            outputs = [self._outputs.pop(_window_key(f), None) for f in batch]
        missing = [i for i, out in enumerate(outputs) if out is None]
        if len(missing) == len(batch):
            return self._encode(features)
        if missing:
            for i, out in zip(missing, np.asarray(self._encode(batch[missing])), strict=True):
                outputs[i] = out
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(outputs)))


def _window_key(features: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(features).tobytes(), digest_size=16).digest()


def combine_language_probabilities(per_window: list[list[tuple[str, float]]]) -> list[tuple[str, float]]:
    """Each language's mean probability over the windows, best first.

    A mean rather than a product (sum of logs): one window of music or of a
    second language that Whisper scores near zero for the main language must
    not veto it; the language most of the speech is in wins.
    """
    totals: dict[str, float] = {}
    for probabilities in per_window:
        for language, p in probabilities:
            totals[language] = totals.get(language, 0.0) + p
    mean = [(language, total / len(per_window)) for language, total in totals.items()]
    return sorted(mean, key=lambda lp: lp[1], reverse=True)
