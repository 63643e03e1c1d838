"""Benchmark the Serve graph over HTTP against the in-process CLI.

    .venv/bin/python benchmarks/bench_serve.py [--seconds 600] [--url http://127.0.0.1:8080]

1. The CLI (`ecg-analyze`, one process: diarization, then transcription beside the acoustics) on the
   10-minute dialogue: its analysis time (model loading excluded).
2. The same file through `POST /transcribe` on `serve run serve_config.yaml`
   (started here on a free port unless --url names a running server):
   end-to-end HTTP latency. Target: overhead <= 10 % over the CLI.
3. Four 1-minute dialogues: one after another through `/transcribe`, then all
   four at once as async jobs; wall time of each.

Prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a script, not a package: reach the tests' server helper
from benchmarks.bench_pipeline import make_recording  # noqa: E402
from tests.serving import ServeProcess  # noqa: E402


def cli_run(path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        subprocess.run([str(ROOT / ".venv/bin/ecg-analyze"), str(path), "-o", str(out)], check=True)
        wall = time.perf_counter() - t0
        result = json.loads(out.read_text())
    return {"wall_s": round(wall, 2), "analysis_s": result["metadata"]["processing_time"]}


def http_run(client: httpx.Client, path: Path) -> dict:
    t0 = time.perf_counter()
    response = client.post("/transcribe", json={"audio_path": str(path)})
    response.raise_for_status()
    return {"latency_s": round(time.perf_counter() - t0, 2), "stages_s": response.json()["metadata"]["stage_timings"]}


def concurrent_jobs(client: httpx.Client, paths: list[Path]) -> float:
    t0 = time.perf_counter()
    ids = [client.post("/api/upload-video/process-video", json={"audio_path": str(p)}).json()["job_id"] for p in paths]
    pending = set(ids)
    while pending:
        time.sleep(0.2)
        for job_id in list(pending):
            status = client.get(f"/jobs/{job_id}").json()["status"]
            if status == "failed":
                raise RuntimeError(f"job {job_id} failed")
            if status == "completed":
                pending.discard(job_id)
    return round(time.perf_counter() - t0, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--url", help="a running server; default: start serve_config.yaml here")
    args = parser.parse_args()

    long_file = make_recording(args.seconds).with_suffix(".flac")
    short_files = [make_recording(60).with_suffix(".flac")] * 4
    report: dict = {"audio_s": args.seconds, "cli": cli_run(long_file)}

    server = None
    if not args.url:
        roots = json.dumps([str(long_file.parent), str(ROOT / "tests" / "fixtures")])
        env = {"HF_HUB_OFFLINE": "1", "ECG_MEDIA__LOCAL_ROOTS": roots}
        server = ServeProcess(Path(tempfile.mkdtemp(prefix="bench-serve-")), env=env)
        t0 = time.perf_counter()
        server.start()
        report["server_start_s"] = round(time.perf_counter() - t0, 1)
    try:
        with httpx.Client(base_url=args.url or server.url, timeout=3600) as client:
            http_run(client, ROOT / "tests/fixtures/sentence_es.flac")  # warm-up: lazy model parts
            report["http"] = http_run(client, long_file)
            sequential = time.perf_counter()
            for path in short_files:
                http_run(client, path)
            report["four_1min_sequential_s"] = round(time.perf_counter() - sequential, 2)
            report["four_1min_concurrent_s"] = concurrent_jobs(client, short_files)
    finally:
        if server is not None:
            server.stop()
    report["http_overhead"] = round(report["http"]["latency_s"] / report["cli"]["analysis_s"] - 1, 3)
    report["concurrency_speedup"] = round(report["four_1min_sequential_s"] / report["four_1min_concurrent_s"], 2)
    print(json.dumps(report, indent=2))
    verdict = "ok" if report["http_overhead"] <= 0.10 else "MISSED"
    print(f"HTTP latency vs CLI analysis: {report['http_overhead']:+.1%} (target <= +10%) {verdict}")


if __name__ == "__main__":
    main()
