"""Custom metrics for capacity tuning, exported through Ray's metrics agent
(Ray dashboard -> Metrics, or Prometheus at each node's metrics export port).
Created inside the replica, never at import."""

from __future__ import annotations

from ray.serve import metrics

from pipeline.schemas import AnalysisResult

_SECONDS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200]
_RTF = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0]


class GraphMetrics:
    def __init__(self) -> None:
        self.stage_latency = metrics.Histogram(
            "ecg_stage_latency_seconds",
            description="Wall time of each stage as the ingress sees it (queueing included).",
            boundaries=_SECONDS,
            tag_keys=("stage",),
        )
        self.audio_seconds = metrics.Counter(
            "ecg_audio_seconds_total", description="Seconds of audio analysed successfully."
        )
        self.real_time_factor = metrics.Histogram(
            "ecg_real_time_factor",
            description="Processing time divided by audio duration, per analysis.",
            boundaries=_RTF,
        )
        self.jobs_running = metrics.Gauge(
            "ecg_jobs_running", description="Analyses this ingress replica runs through the graph."
        )
        self.requests_failed = metrics.Counter(
            "ecg_analyses_failed_total", description="Analyses that failed, by error code.", tag_keys=("code",)
        )

    def analysis_done(self, result: AnalysisResult) -> None:
        for stage, seconds in result.metadata.stage_timings.items():
            self.stage_latency.observe(seconds, tags={"stage": stage})
        self.audio_seconds.inc(result.duration)
        if result.duration > 0:
            self.real_time_factor.observe(result.metadata.processing_time / result.duration)

    def occupancy(self, running: int) -> None:
        self.jobs_running.set(running)
