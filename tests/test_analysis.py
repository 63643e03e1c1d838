"""The whole pipeline on real embedded models and the espeak-ng dialogue, against its exact ground truth."""

from __future__ import annotations

import subprocess
import sys

import jiwer
import numpy as np
import parselmouth
import pytest
from pyannote.core import Annotation, Segment
from pyannote.metrics.diarization import DiarizationErrorRate

from pipeline.acoustics import frame_tracks
from pipeline.analyzer import AnalysisOptions
from pipeline.errors import InputError, UnsupportedLanguage
from tests.conftest import ffmpeg, fixture_path, truth, words_of

TRUTH = truth("dialogue_en")


def speaker_mapping(result) -> dict[str, str]:
    """Our label -> truth label, by which truth turn each segment's midpoint falls in."""
    votes: dict[tuple[str, str], float] = {}
    for seg in result.segments:
        mid = (seg.start_time + seg.end_time) / 2
        for turn in TRUTH["turns"]:
            if turn["start"] - 0.5 <= mid <= turn["end"] + 0.5:
                key = (seg.speaker.speaker_id, turn["speaker"])
                votes[key] = votes.get(key, 0.0) + seg.end_time - seg.start_time
    mapping: dict[str, str] = {}
    for (ours, theirs), _ in sorted(votes.items(), key=lambda kv: -kv[1]):
        if ours not in mapping and theirs not in mapping.values():
            mapping[ours] = theirs
    return mapping


def test_transcript_wer(dialogue_result):
    reference = words_of(" ".join(t["text"] for t in TRUTH["turns"]))
    hypothesis = words_of(dialogue_result.text)
    assert jiwer.wer(reference, hypothesis) <= 0.10
    assert dialogue_result.language == "en"


def test_two_speakers_and_der(dialogue_result):
    assert set(dialogue_result.speakers) == {"SPEAKER_00", "SPEAKER_01"}
    reference, hypothesis = Annotation(), Annotation()
    for t in TRUTH["turns"]:
        reference[Segment(t["start"], t["end"])] = t["speaker"]
    for seg in dialogue_result.segments:
        hypothesis[Segment(seg.start_time, seg.end_time)] = seg.speaker.speaker_id
    assert DiarizationErrorRate()(reference, hypothesis) <= 0.15


def test_speaking_time_per_speaker(dialogue_result):
    mapping = speaker_mapping(dialogue_result)
    assert len(mapping) == 2
    for ours, theirs in mapping.items():
        expected = sum(t["end"] - t["start"] for t in TRUTH["turns"] if t["speaker"] == theirs)
        got = dialogue_result.speakers[ours].total_duration
        assert abs(got - expected) <= 0.15 * expected, (ours, theirs, got, expected)


def test_word_times_inside_file_and_ordered(dialogue_result):
    words = [w for s in dialogue_result.segments for w in s.words]
    assert len(words) > 80
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    for w in words:
        assert 0.0 <= w.start <= w.end <= dialogue_result.duration
        assert w.timing == "recognizer"  # no alignment model offline
    assert abs(dialogue_result.duration - TRUTH["duration"]) < 0.05


def test_words_land_in_their_speakers_turns(dialogue_result):
    """Each word's time falls inside (or within 0.5 s of) the truth turn that contains it."""
    all_turns = TRUTH["turns"]
    words = [w for s in dialogue_result.segments for w in s.words]
    inside = sum(any(t["start"] - 0.5 <= (w.start + w.end) / 2 <= t["end"] + 0.5 for t in all_turns) for w in words)
    assert inside / len(words) >= 0.95


def test_quieter_speaker_is_9db_lower(dialogue_result):
    mapping = speaker_mapping(dialogue_result)
    by_truth = {theirs: ours for ours, theirs in mapping.items()}
    gains = {name: v["gain_db"] for name, v in TRUTH["voices"].items()}
    loud, quiet = sorted(gains, key=gains.get, reverse=True)

    def median_volume(truth_speaker: str) -> float:
        label = by_truth[truth_speaker]
        vols = [w.acoustic_features.volume_db for s in dialogue_result.segments if s.speaker.speaker_id == label
                for w in s.words]  # fmt: skip
        return float(np.median(vols))

    difference = median_volume(loud) - median_volume(quiet)
    assert abs(difference - (gains[loud] - gains[quiet])) <= 2.0, difference


def test_pitch_agrees_with_praat(dialogue_result, dialogue_samples):
    pitch = parselmouth.Sound(dialogue_samples.astype(np.float64), 16_000).to_pitch(
        time_step=0.01, pitch_floor=65, pitch_ceiling=500
    )
    times, f0 = pitch.xs(), pitch.selected_array["frequency"]
    checked = agreeing = 0
    for w in (w for s in dialogue_result.segments for w in s.words):
        voiced = f0[(times >= w.start) & (times <= w.end) & (f0 > 0)]
        if w.acoustic_features.pitch_hz is None or voiced.size < 5:
            continue  # Praat and we must both call the word voiced for a comparison
        checked += 1
        agreeing += abs(w.acoustic_features.pitch_hz - np.median(voiced)) <= 0.10 * np.median(voiced)
    assert checked >= 60
    assert agreeing / checked >= 0.95


def test_result_shape_and_metadata(dialogue_result):
    body = dialogue_result.model_dump()
    assert set(body) == {"segments", "speakers", "text", "language", "duration", "metadata"}
    segment = body["segments"][0]
    assert {"start_time", "end_time", "speaker", "text", "words"} <= set(segment)
    assert set(segment["speaker"]) == {"speaker_id"}
    features = segment["words"][0]["acoustic_features"]
    assert {"volume_db", "pitch_hz", "spectral_centroid", "spectral_rolloff", "mfcc"} <= set(features)
    assert len(features["mfcc"]) == 13
    meta = body["metadata"]
    assert meta["model_versions"]["whisperx"] == "embedded:whisper-base"
    assert meta["model_versions"]["diarization"].startswith("embedded:")
    assert meta["processing_time"] > 0
    assert {"media", "transcription", "diarization", "acoustics"} <= set(meta["stage_timings"])


def test_progress_is_monotonic_and_complete(dialogue_result, dialogue_progress):
    percents = [p for p, _ in dialogue_progress]
    assert percents == sorted(percents)
    assert percents[-1] == 100.0
    assert len({round(p) for p in percents}) >= 5
    assert any("diarization" in m for _, m in dialogue_progress)


def test_mp4_gives_same_transcript(analyzer, dialogue_result, tmp_path):
    video = tmp_path / "dialogue.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=160x120:r=10", "-i", str(fixture_path("dialogue_en.flac")),
           "-shortest", "-c:v", "libx264", "-c:a", "aac", "-b:a", "128k", str(video))  # fmt: skip
    result = analyzer.analyze(str(video), AnalysisOptions(language="en"))
    assert jiwer.wer(words_of(dialogue_result.text), words_of(result.text)) <= 0.05
    assert len(result.speakers) == 2


@pytest.mark.parametrize("code", ["es", "de", "fr"])
def test_detects_non_english_language(analyzer, code):
    result = analyzer.analyze(str(fixture_path(f"sentence_{code}.flac")), AnalysisOptions(num_speakers=1))
    assert result.language == code
    # Measured >= 0.94 (int8 and float32 weights); the margin is for other CPUs' arithmetic.
    assert result.metadata.language_probability >= 0.6
    assert result.text
    assert list(result.speakers) == ["SPEAKER_00"]


def test_language_detection_looks_past_the_first_30_s(analyzer, dialogue_samples):
    """30 s of English, then 89 s of German. Whisper's own detection (the first
    30 s) says English at p = 0.95; clips spread over all the speech find the
    German majority (measured: de 0.68, en 0.26)."""
    import soundfile as sf

    de, _ = sf.read(fixture_path("sentence_de.flac"), dtype="float32")
    samples = np.concatenate([dialogue_samples[: 30 * 16_000]] + [de] * 8)
    guess = analyzer.transcriber.detect_language(samples)
    assert guess is not None and guess.windows == 4
    probabilities = dict(guess.probabilities)
    assert guess.language == "de"
    assert probabilities["de"] - probabilities["en"] >= 0.2


def test_language_detection_costs_no_extra_encoder_pass(analyzer, dialogue_samples, monkeypatch):
    """Detection encodes some of the decoder's own clips; the decoder reuses those outputs, so
    each clip goes through Whisper's encoder once, and the words are those of a run that
    encodes everything itself (language given)."""
    transcriber = analyzer.transcriber
    samples = np.concatenate([dialogue_samples] * 3)  # enough speech for several clips
    clips = transcriber._speech_clips(samples)
    assert len(clips) >= 3
    encoded: list[int] = []
    encode = transcriber._encoder._encode
    monkeypatch.setattr(transcriber._encoder, "_encode", lambda f: encoded.append(len(f)) or encode(f))

    detected = transcriber.transcribe(samples, None)
    assert detected.language == "en"
    assert sum(encoded) == len(clips)  # before: len(clips) + the detection windows

    encoded.clear()
    given = transcriber.transcribe(samples, "en")
    assert sum(encoded) == len(clips)
    # Equal on this machine; the margin allows for another CPU's batched arithmetic flipping a word.
    said = [" ".join(w.word for w in t.words) for t in (given, detected)]
    assert jiwer.wer(words_of(said[0]), words_of(said[1])) <= 0.02
    assert not transcriber._encoder.kept()  # nothing kept after the call


def test_two_decoders_give_the_words_of_one(settings, dialogue_samples):
    """Clips decoded by two one-thread decoders side by side (the CPU default) come back in time
    order with the words one decoder gives, and both decoders did decode."""
    import threading

    from pipeline.asr import WhisperXTranscriber

    samples = np.concatenate([dialogue_samples] * 3)  # several clips, so each decoder gets some
    said = []
    for decoders in (1, 2):
        transcriber = WhisperXTranscriber(settings.asr.model_copy(update={"decoders": decoders}), settings.cache_dir)
        threads: set[str] = set()
        encode = transcriber._encoder._encode

        def noted(features, encode=encode, threads=threads):
            threads.add(threading.current_thread().name)
            return encode(features)

        transcriber._encoder._encode = noted
        transcript = transcriber.transcribe(samples, "en")
        assert len(threads) == decoders
        starts = [s.start for s in transcript.segments]
        assert starts == sorted(starts)
        said.append(" ".join(w.word for w in transcript.words))
    # Equal on this machine; the margin allows for one- and two-thread arithmetic flipping a word elsewhere.
    assert jiwer.wer(words_of(said[0]), words_of(said[1])) <= 0.02


def test_acoustics_run_beside_the_transcription_after_diarization(analyzer, monkeypatch):
    """In one process, diarization runs alone first; the acoustic tracks (mostly one core) then
    run while the transcription decodes."""
    import time

    spans: dict[str, tuple[float, float]] = {}

    def timed(name, call):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                spans[name] = (start, time.perf_counter())

        return run

    monkeypatch.setattr(analyzer.diarizer, "diarize", timed("diarization", analyzer.diarizer.diarize))
    monkeypatch.setattr(analyzer.transcriber, "transcribe", timed("transcription", analyzer.transcriber.transcribe))
    monkeypatch.setattr("pipeline.analyzer.frame_tracks", timed("acoustics", frame_tracks))
    analyzer.analyze(str(fixture_path("dialogue_en.flac")), AnalysisOptions(language="en"))
    assert spans["diarization"][1] <= min(spans["transcription"][0], spans["acoustics"][0])
    assert spans["acoustics"][0] < spans["transcription"][1] and spans["transcription"][0] < spans["acoustics"][1]


def test_forced_language_is_used(analyzer):
    result = analyzer.analyze(str(fixture_path("sentence_es.flac")), AnalysisOptions(language="es"))
    assert result.language == "es"
    assert "mesa" in result.text.lower()


def test_a_clip_decoded_into_a_loop_is_decoded_again(analyzer, dialogue_samples, caplog):
    """The batched decoder has no temperature fallback: a clip whose beam search
    falls into a repetition loop is told by its text's zlib compression ratio
    and decoded again alone, with no 4-gram said twice. Whether beam search loops on a clip
    depends on the CPU's arithmetic (on dev it looped on one 30 s clip of 102
    files here), so the loop is made: a batched segment of looping text over the
    dialogue's last speech clip. What replaces it is the real model's decoding, at the clip's
    times in the file."""
    from faster_whisper.transcribe import Segment, get_compression_ratio

    transcriber = analyzer.transcriber
    clip = transcriber._speech_clips(dialogue_samples)[-1]
    assert clip["start"] > 1.0  # so that the clip's own times must be moved to the file's
    loop = "This time, as I know," + " this time," * 60
    looped = Segment(0, 0, clip["start"], clip["end"], loop, [], -0.1, get_compression_ratio(loop), 0.0, [], 0.0)
    assert looped.compression_ratio > 2.4

    with caplog.at_level("WARNING", logger="pipeline.asr"):
        again = list(transcriber._without_loops([looped], dialogue_samples, "en", None, True))
    assert "decoded into a loop" in caplog.text
    text = " ".join(seg.text for seg in again)
    assert get_compression_ratio(text) <= 2.4  # measured 1.5
    inside = [t for t in TRUTH["turns"] if clip["start"] - 0.5 <= t["start"] and t["end"] <= clip["end"] + 0.5]
    said = words_of(" ".join(t["text"] for t in inside)).split()
    assert len(said) >= 20
    heard = set(words_of(text).split())
    assert sum(w in heard for w in said) >= 0.8 * len(said)  # measured: 66 of 67
    for word in (w for seg in again for w in seg.words):
        assert clip["start"] - 0.1 <= word.start <= word.end <= clip["end"] + 0.1


def test_bad_options_are_input_errors():
    with pytest.raises(UnsupportedLanguage):
        AnalysisOptions(language="klingon")
    with pytest.raises(InputError):
        AnalysisOptions(min_speakers=3, max_speakers=2)


def test_cli_writes_srt_and_reports_errors(tmp_path):
    out = tmp_path / "out.srt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            str(fixture_path("sentence_de.flac")),
            "--format",
            "srt",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "100.0%" in proc.stderr
    srt = out.read_text()
    assert srt.startswith("1\n00:00:0") and "[SPEAKER_00]" in srt
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", str(tmp_path / "missing.wav")], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "not_found" in bad.stderr


def test_language_without_alignment_model_falls_back(settings):
    """Alignment on, but no wav2vec2 model can load here (no hub, no torchaudio download):
    the words keep Whisper's own timings and the analysis does not fail."""
    import soundfile as sf

    from pipeline.asr import WhisperXTranscriber

    transcriber = WhisperXTranscriber(settings.asr.model_copy(update={"alignment": True}), settings.cache_dir)
    samples, _ = sf.read(fixture_path("sentence_es.flac"), dtype="float32")
    transcript = transcriber.transcribe(samples, "auto")
    assert transcript.language == "es" and transcript.alignment_model is None
    assert transcript.language_probability >= 0.6
    assert transcript.words and all(w.timing == "recognizer" for w in transcript.words)


def test_silence_gives_an_empty_result(analyzer, tmp_path):
    import soundfile as sf

    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(3 * 16_000, dtype=np.float32), 16_000)
    result = analyzer.analyze(str(path), AnalysisOptions(language="en"))
    assert result.segments == [] and result.text == "" and result.speakers == {}
    assert result.duration == 3.0


def test_batch_shares_decoding_and_matches_one_by_one(analyzer, dialogue_samples):
    import soundfile as sf

    from pipeline.asr import TranscriptionRequest

    es, _ = sf.read(fixture_path("sentence_es.flac"), dtype="float32")
    de, _ = sf.read(fixture_path("sentence_de.flac"), dtype="float32")
    progress: list[float] = []
    requests = [
        TranscriptionRequest(es, None, lambda stage, f, m: progress.append(f)),
        TranscriptionRequest(dialogue_samples, "en"),
        TranscriptionRequest(de, None),
        TranscriptionRequest(es, "xx"),  # its own error, not the batch's
    ]
    batch = analyzer.transcriber.transcribe_batch(requests)
    assert isinstance(batch[3], UnsupportedLanguage)
    assert [t.language for t in batch[:3]] == ["es", "en", "de"]
    assert batch[0].language_probability >= 0.6 and batch[2].language_probability >= 0.6
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    for samples, language, batched in ((es, None, batch[0]), (dialogue_samples, "en", batch[1])):
        alone = analyzer.transcriber.transcribe(samples, language)
        assert [s.text for s in batched.segments] == [s.text for s in alone.segments]
        assert [w.start for w in batched.words] == pytest.approx([w.start for w in alone.words], abs=0.02)
        duration = len(samples) / 16_000
        assert all(0 <= w.start <= w.end <= duration + 0.05 for w in batched.words)


def test_model_health_checks(analyzer):
    """What the Serve deployments' `check_health` asks: loaded models answer, a lost one does not."""
    import copy

    from pipeline.errors import ModelError

    analyzer.transcriber.check()
    analyzer.diarizer.check()
    lost = copy.copy(analyzer.transcriber)
    lost._model = None  # what is left when the CTranslate2 model is gone
    with pytest.raises(ModelError, match="does not answer"):
        lost.check()
