"""`ecg-analyze`: the whole analysis in-process, result on stdout or in a file."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_INPUT, EXIT_MODEL = 2, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ecg-analyze", description="Transcribe, diarize and measure a media file.")
    p.add_argument("input", help="local path, http(s) URL or s3://bucket/key of a video or audio file")
    p.add_argument("--language", default="auto", help="'auto' (detect) or an ISO 639-1 code such as en")
    p.add_argument("--model", help="Whisper model (overrides asr.model), e.g. embedded:whisper-base or large-v2")
    p.add_argument("--num-speakers", type=int)
    p.add_argument("--min-speakers", type=int)
    p.add_argument("--max-speakers", type=int)
    p.add_argument(
        "--format",
        choices=["json", "srt", "vtt", "rttm", "txt", "tsv"],
        default="json",
        help="json (the whole result), subtitles (srt, vtt), speaker turns (rttm), text or a table (txt, tsv)",
    )
    p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    p.add_argument("--config", type=Path, help="YAML settings file (default: $ECG_CONFIG or built-in CPU profile)")
    p.add_argument("-v", "--verbose", action="store_true", help="log model loading and stage details")
    return p.parse_args(argv)


class ProgressPrinter:
    """A one-line bar on a terminal, one line per change elsewhere (logs, CI)."""

    def __init__(self, stream=sys.stderr) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = ""

    def __call__(self, percent: float, message: str) -> None:
        if self._tty:
            bar = "#" * int(percent / 4)
            self._stream.write(f"\r[{bar:<25}] {percent:5.1f}% {message[:60]:<60}")
            if percent >= 100:
                self._stream.write("\n")
        elif message != self._last:
            self._stream.write(f"{percent:5.1f}% {message}\n")
        self._last = message
        self._stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    # Lightning announces a checkpoint upgrade at INFO on every load of the segmentation model.
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # Imports after argument parsing: `--help` stays instant.
    from pipeline.analyzer import AnalysisOptions, Analyzer
    from pipeline.config import load_settings
    from pipeline.errors import AnalyzerError, InputError
    from pipeline.formats import render

    try:
        options = AnalysisOptions(
            language=args.language,
            num_speakers=args.num_speakers,
            min_speakers=args.min_speakers,
            max_speakers=args.max_speakers,
        )
        settings = load_settings(args.config)
        if args.model:
            settings.asr.model = args.model
        # The local roots guard a server against its clients; here the user names their own file.
        settings.media.local_roots = [Path("/")]
        result = Analyzer(settings).analyze(args.input, options, ProgressPrinter())
    except InputError as e:
        print(f"ecg-analyze: error: {e} [{e.code}]", file=sys.stderr)
        return EXIT_INPUT
    except AnalyzerError as e:
        print(f"ecg-analyze: error: {e} [{e.code}]", file=sys.stderr)
        return EXIT_MODEL
    text = render(result, args.format, name=_recording_name(args.input))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _recording_name(source: str) -> str:
    """The file's stem, as RTTM names the recording: `calls/monday.mp4?sig=..` -> `monday`."""
    return Path(source.split("?")[0].rstrip("/")).stem


if __name__ == "__main__":
    sys.exit(main())
