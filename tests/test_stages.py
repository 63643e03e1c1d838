"""Stage functions on synthetic data: acoustics, assembly, progress, config, diarization parts."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.acoustics import N_FFT, FrameTracks, frame_tracks, spectral_tracks, word_features, yin
from pipeline.asr import (
    TimedWord,
    Transcript,
    TranscriptSegment,
    check_language,
    combine_language_probabilities,
    detection_clips,
    in_parallel,
    interpolate_missing,
    runs_of,
)
from pipeline.assembly import assemble, join_words, speaker_of, tidy_times
from pipeline.config import AcousticSettings, load_settings
from pipeline.diarization import Diarization, SpeakerTurn, check_speaker_counts, relabel
from pipeline.errors import InputError, UnsupportedLanguage
from pipeline.progress import StagedProgress
from pipeline.schemas import Metadata

SR = 16_000


def tone(freq: float, seconds: float, amplitude: float = 0.1) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    # A few harmonics: a voice-like periodic signal, not a pure sine.
    return (amplitude * sum(np.sin(2 * np.pi * k * freq * t) / k for k in (1, 2, 3))).astype(np.float32)


# -- acoustics ---------------------------------------------------------------


@pytest.mark.parametrize("freq", [80.0, 120.0, 220.0, 400.0])
def test_yin_finds_pitch(freq):
    f0, aperiodicity = yin(tone(freq, 1.0), 160, 65, 500)
    middle = f0[10:-10]
    assert np.median(np.abs(middle - freq) / freq) < 0.01
    assert np.median(aperiodicity[10:-10]) < 0.1


def test_noise_is_unvoiced_and_volume_is_calibrated():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, SR).astype(np.float32)  # -26 dBFS white noise
    signal = np.concatenate([noise, tone(150, 1.0, 0.1)])
    tracks = frame_tracks(signal, AcousticSettings())
    unvoiced = word_features(tracks, 0.1, 0.9)
    voiced = word_features(tracks, 1.1, 1.9)
    assert unvoiced.pitch_hz is None  # never 0 or NaN
    assert abs(unvoiced.volume_db - 20 * np.log10(0.05)) < 0.5
    assert voiced.pitch_hz == pytest.approx(150, rel=0.02)
    expected = 10 * np.log10(np.mean(tone(150, 1.0, 0.1) ** 2))
    assert abs(voiced.volume_db - expected) < 0.5
    assert voiced.spectral_centroid < unvoiced.spectral_centroid
    assert len(voiced.mfcc) == 13 and all(np.isfinite(voiced.mfcc))


@pytest.mark.parametrize("length", [3 * SR, 3 * SR + 77])
def test_spectral_tracks_in_blocks_equal_one_stft_of_the_whole(length):
    """The spectral tracks are computed a block of frames at a time (memory stays flat on long
    files); each frame must get what one centred STFT of the whole signal gives it, the last
    block's partial frames and the file's edges included."""
    import librosa

    rng = np.random.default_rng(1)
    signal = (np.concatenate([tone(140, 2.0), tone(260, 2.0)]) + rng.normal(0, 0.01, 4 * SR))[:length]
    signal = signal.astype(np.float32)
    spec = np.abs(librosa.stft(signal, n_fft=N_FFT, hop_length=160, center=True)).astype(np.float32)
    whole = (
        librosa.feature.spectral_centroid(S=spec, sr=SR)[0],
        librosa.feature.spectral_rolloff(S=spec, sr=SR, roll_percent=0.85)[0],
        librosa.feature.melspectrogram(S=spec**2, sr=SR, n_mels=40),
    )
    rms_db, *blocked = spectral_tracks(signal, 160, block=37)
    for got, expected in zip(blocked, whole, strict=True):
        assert got.shape == expected.shape
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(rms_db) == spec.shape[1] and np.all(np.isfinite(rms_db))


def test_zero_length_word_uses_nearest_frame():
    tracks = FrameTracks(0.01, np.full(10, -20.0), np.full(10, 100.0), np.ones(10), np.ones(10), np.zeros((13, 10)))
    assert word_features(tracks, 0.5, 0.5).pitch_hz == 100.0
    assert word_features(tracks, 5.0, 5.0).volume_db == pytest.approx(-20.0)  # past the end: last frame


# -- assembly ----------------------------------------------------------------

TURNS = [SpeakerTurn(0.0, 2.0, "SPEAKER_00"), SpeakerTurn(2.5, 5.0, "SPEAKER_01")]


def test_speaker_by_overlap_then_nearest():
    assert speaker_of(0.5, 1.0, TURNS) == "SPEAKER_00"
    assert speaker_of(1.8, 2.9, TURNS) == "SPEAKER_01"  # 0.4 s with 01 beats 0.2 s with 00
    assert speaker_of(2.1, 2.2, TURNS) == "SPEAKER_00"  # in the gap, nearer the first turn
    assert speaker_of(1.0, 1.2, []) == "SPEAKER_00"


def test_tidy_times_orders_and_clamps():
    words = [TimedWord("a", -0.2, 0.3, 0.9, "recognizer"), TimedWord("b", 0.2, 0.1, 0.9, "recognizer"),
             TimedWord("c", 9.0, 11.0, 0.9, "recognizer")]  # fmt: skip
    tidy_times(words, 10.0)
    assert [(w.start, w.end) for w in words] == [(0.0, 0.3), (0.2, 0.2), (9.0, 10.0)]


def test_interpolates_unaligned_words():
    words = [TimedWord("I", 0.0, 0.2, 1.0, "aligned"), TimedWord("42", np.nan, np.nan, None, "aligned"),
             TimedWord("cats", 0.8, 1.1, 1.0, "aligned")]  # fmt: skip
    interpolate_missing(words)
    assert (words[1].start, words[1].end, words[1].timing) == (0.2, 0.8, "interpolated")


def test_segments_split_on_speaker_change_and_summaries():
    words = [TimedWord(w, s, s + 0.4, 0.9, "recognizer") for w, s in [("hi", 0.1), ("there.", 0.6), ("hello", 3.0),
                                                                      ("back.", 3.5)]]  # fmt: skip
    transcript = Transcript("en", 0.99, [TranscriptSegment(0.1, 3.9, "hi there. hello back.", words)], "m")
    result = assemble(transcript, Diarization(TURNS, "d"), None, 5.0, Metadata(processing_time=0, model_versions={}))
    assert [(s.speaker.speaker_id, s.text) for s in result.segments] == [
        ("SPEAKER_00", "hi there."),
        ("SPEAKER_01", "hello back."),
    ]
    assert result.text == "hi there. hello back."
    assert result.speakers["SPEAKER_00"].total_duration == 2.0
    assert result.speakers["SPEAKER_01"].word_count == 2


def test_unspaced_languages_join_without_spaces():
    assert join_words(["今日", "は"], "ja") == "今日は"
    assert join_words(["hola", "amigo"], "es") == "hola amigo"


def test_relabel_orders_speakers_by_first_appearance():
    turns = [SpeakerTurn(3.0, 4.0, "B"), SpeakerTurn(0.0, 1.0, "A"), SpeakerTurn(5.0, 6.0, "B")]
    labels = {t.start: t.speaker for t in relabel(turns)}
    assert labels == {0.0: "SPEAKER_00", 3.0: "SPEAKER_01", 5.0: "SPEAKER_01"}


def test_overlapped_speech_counts_for_each_speaker():
    d = Diarization([SpeakerTurn(0, 3, "SPEAKER_00"), SpeakerTurn(2, 4, "SPEAKER_01")], "d")
    assert d.speaking_time() == {"SPEAKER_00": 3, "SPEAKER_01": 2}


# -- language detection ------------------------------------------------------


def test_detection_clips_spread_over_all_the_speech():
    # 100 s of speech in five clips: the longest clip of each quarter of the speech.
    lengths = [20.0, 30.0, 5.0, 25.0, 20.0]
    starts = np.cumsum([0.0] + lengths[:-1]) + 3.0 * np.arange(5)  # 3 s of silence between clips
    clips = [{"start": float(s), "end": float(s) + n} for s, n in zip(starts, lengths, strict=True)]
    # Middles at 10, 35, 52.5, 67.5 and 90 s of speech: quarters 0, 1, 2, 2, 3.
    assert detection_clips(clips, 4) == [0, 1, 3, 4]
    assert detection_clips(clips, 1) == [1]
    assert detection_clips(clips, 2) == [1, 3]


def test_detection_clips_no_more_than_the_clips():
    assert detection_clips([{"start": 1.0, "end": 9.0}], 4) == [0]
    assert detection_clips([{"start": 0.0, "end": 30.0}, {"start": 31.0, "end": 36.0}], 4) == [0, 1]
    assert detection_clips([], 4) == []


# -- decoders side by side ----------------------------------------------------


def test_runs_of_keeps_order():
    assert runs_of(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert runs_of([1], 4) == [[1]]
    assert runs_of([], 4) == []


def test_in_parallel_yields_every_item_from_threads_at_once():
    import threading

    both_running = threading.Barrier(2, timeout=10)  # each thread waits for the other: they run at once

    def produce(n: int):
        both_running.wait()
        for i in range(n):
            yield (threading.current_thread().name, i)

    items = list(in_parallel(produce, [3, 4], 2))
    assert sorted(i for _, i in items) == [0, 0, 1, 1, 2, 2, 3]
    assert len({name for name, _ in items}) == 2
    # One worker: produced here, on the calling thread, input after input.
    assert {name for name, _ in in_parallel(lambda n: [(threading.current_thread().name, n)], [1, 2], 1)} == {
        threading.current_thread().name
    }


def test_in_parallel_gives_the_next_input_to_whichever_thread_is_free():
    """A thread slow on its first input does not hold back inputs after it: the other thread takes
    them all (halves fixed in advance would leave the slow thread one of them)."""
    import threading

    quick_ones_done = threading.Semaphore(0)
    took: dict[str, list[str]] = {}

    def produce(x: str):
        if x == "slow":  # done only once the other thread has got through every quick input
            for _ in range(3):
                assert quick_ones_done.acquire(timeout=10), "the quick inputs waited for the slow one"
        took.setdefault(threading.current_thread().name, []).append(x)
        if x != "slow":
            quick_ones_done.release()
        yield x

    assert sorted(in_parallel(produce, ["slow", "quick", "quick", "quick"], 2)) == ["quick"] * 3 + ["slow"]
    assert sorted(took.values()) == [["quick", "quick", "quick"], ["slow"]]


def test_in_parallel_raises_a_threads_error_after_the_others_stop():
    import threading

    stopped = threading.Event()

    def produce(fail: bool):
        if fail:
            raise ValueError("bad clip")
        try:
            for i in range(10_000):
                yield i
                stopped.wait(0.001)
        finally:
            stopped.set()

    with pytest.raises(ValueError, match="bad clip"):
        list(in_parallel(produce, [False, True], 2))
    assert stopped.is_set()  # the healthy thread was told to stop and had stopped


def test_language_probabilities_are_averaged_over_windows():
    windows = [[("en", 0.9), ("de", 0.1)], [("de", 0.8), ("en", 0.2)], [("de", 0.7), ("en", 0.3)]]
    assert combine_language_probabilities(windows) == [
        ("de", pytest.approx(0.5333, abs=1e-4)),
        ("en", pytest.approx(0.4667, abs=1e-4)),
    ]
    # One window Whisper is sure is Thai (music, noise) must not veto the others,
    # as a product of probabilities would.
    windows = [[("fr", 0.9), ("th", 0.1)], [("fr", 0.9), ("th", 0.1)], [("th", 0.9999), ("fr", 0.0001)]]
    assert combine_language_probabilities(windows)[0] == ("fr", pytest.approx(0.6, abs=1e-3))


# -- validation, progress, config --------------------------------------------


def test_language_and_speaker_checks():
    assert check_language("auto") is None and check_language(" EN ") == "en"
    with pytest.raises(UnsupportedLanguage):
        check_language("xx")
    with pytest.raises(InputError):
        check_speaker_counts(0, None, None)
    with pytest.raises(InputError):
        check_speaker_counts(None, 4, 2)


def test_staged_progress_never_goes_down():
    seen: list[float] = []
    progress = StagedProgress({"a": 1, "b": 3}, lambda p, m: seen.append(p))
    progress("a", 0.5, "")
    progress("b", 0.5, "")
    progress("a", 0.2, "")  # a late, lower report must not pull progress back
    progress("a", 1.0, "")
    progress("b", 1.0, "")
    assert seen == sorted(seen) and seen[-1] == 100.0
    assert seen[0] == pytest.approx(12.5)


def test_config_yaml_then_env(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("asr:\n  model: large-v2\n  batch_size: 4\ndiarization:\n  hf_token: hf_from_yaml\n")
    monkeypatch.setenv("ECG_ASR__BATCH_SIZE", "16")
    settings = load_settings(config)
    assert settings.asr.model == "large-v2"  # from YAML
    assert settings.asr.batch_size == 16  # the environment wins over YAML
    assert settings.diarization.hf_token.get_secret_value() == "hf_from_yaml"
    assert "hf_from_yaml" not in repr(settings) and "hf_from_yaml" not in settings.model_dump_json()


def test_shipped_profiles_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_settings(root / "default.yaml").asr.model == "embedded:whisper-base"
    gpu = load_settings(root / "gpu-t4.yaml")
    assert (gpu.asr.model, gpu.asr.compute_type) == ("large-v2", "float16")
    assert gpu.diarization.pipeline == "pyannote/speaker-diarization-3.1"


# -- diarization parts ---------------------------------------------------------


def test_gated_pipeline_without_hub_is_a_model_error_without_the_token():
    """The hub is unreachable here (HF_HUB_OFFLINE=1 in conftest): loading the gated
    production pipeline must fail as ModelError, naming the pipeline but never the token."""
    from pipeline.config import DiarizationSettings
    from pipeline.diarization import load_pretrained_pipeline
    from pipeline.errors import ModelError

    secret = "hf_SECRETtoken123"
    with pytest.raises(ModelError) as info:
        load_pretrained_pipeline(DiarizationSettings(pipeline="pyannote/speaker-diarization-3.1", hf_token=secret))
    assert "speaker-diarization-3.1" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value.__cause__)
