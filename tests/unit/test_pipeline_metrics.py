"""The controller's Prometheus metrics (operators/metrics.py): what a finished run's status yields,
and the /metrics endpoint the chart's PodMonitor scrapes (a real HTTP server on a loopback port)."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client import REGISTRY

from operators import metrics

RUN_STATUS: dict[str, Any] = {
    "phase": "Succeeded",
    "stages": {
        "etl": {"state": "Succeeded", "startedAt": "2026-11-26T06:30:00Z", "finishedAt": "2026-11-26T06:50:00Z"},
        "train": {"state": "Succeeded", "startedAt": "2026-11-26T06:50:05Z",
                  "finishedAt": "2026-11-26T07:20:05Z"},
        "score": {"state": "Skipped", "attempts": 0},
        "sync": {"state": "Failed", "startedAt": "2026-11-26T07:21:00Z", "finishedAt": "2026-11-26T07:20:00Z"},
    },
    "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-26T07:30:00Z"},
        {"type": "Progressing", "status": "False", "lastTransitionTime": "2026-11-26T07:30:00Z"},
    ],
}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_running_run_has_no_finish_time() -> None:
    assert metrics.finished_at({**RUN_STATUS, "phase": "Running"}) is None
    assert metrics.finished_at({"phase": "Failed"}) is None  # no condition recorded: nothing to report


def test_a_finished_run_finished_when_progressing_turned_false() -> None:
    assert metrics.finished_at(RUN_STATUS).isoformat() == "2026-11-26T07:30:00+00:00"


def test_stage_durations_cover_started_and_finished_stages_in_pipeline_order() -> None:
    assert metrics.stage_durations(RUN_STATUS) == [
        ("etl", "Succeeded", 1200.0),
        ("train", "Succeeded", 1800.0),
        ("sync", "Failed", 0.0),  # clock skew between controller restarts never gives a negative time
    ]


def test_run_finished_counts_once_and_the_gauge_keeps_the_newest_finish() -> None:
    region = "metrics-test-1"
    metrics.run_finished(region, RUN_STATUS)
    older = {**RUN_STATUS, "conditions": [{"type": "Progressing", "status": "False",
                                           "lastTransitionTime": "2026-11-20T07:30:00Z"}]}
    metrics.run_seen_finished(region, older)  # resumed after a restart: not counted again
    assert sample("streamrec_pipeline_runs_finished_total", region=region, phase="Succeeded") == 1
    assert sample("streamrec_pipeline_last_finished_timestamp_seconds", region=region,
                  phase="Succeeded") == metrics.finished_at(RUN_STATUS).timestamp()
    assert sample("streamrec_pipeline_stage_duration_seconds_count", region=region, stage="train",
                  state="Succeeded") == 1
    assert sample("streamrec_pipeline_stage_duration_seconds_sum", region=region, stage="train",
                  state="Succeeded") == 1800.0


def test_the_metrics_endpoint_serves_the_pipeline_series() -> None:
    metrics.events_posted("metrics-test-2", ["StageRetrying", "StageRetrying", "StageFailed"])
    server = metrics.serve(0, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'streamrec_pipeline_events_total{reason="StageRetrying",region="metrics-test-2"} 2.0' in body
    assert "# TYPE streamrec_pipeline_runs_finished_total counter" in body
    assert "# TYPE streamrec_pipeline_reconcile_errors_total counter" in body
