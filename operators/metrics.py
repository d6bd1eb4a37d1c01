"""Prometheus metrics of the PipelineRun controller (names: streamrec_pipeline_<what>_<unit>).

The chart's alerts read them: a run that failed, no successful run of a region for more than a day,
stage attempts being retried. The controller serves them on ``--metrics-port`` (``/metrics``).

A restarted controller starts its counters at zero (Prometheus' ``increase`` handles the reset), and
refills the last-finished gauges from the finished runs it resumes, so the "no recent success" alert
does not fire merely because the controller restarted."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from operators.pipeline import STAGES
from operators.reconcile import PROGRESSING, TERMINAL_PHASES, parse_timestamp

RUNS_FINISHED = Counter("streamrec_pipeline_runs_finished_total",
                        "PipelineRuns that reached a terminal phase (Succeeded or Failed)", ["region", "phase"])
LAST_FINISHED = Gauge("streamrec_pipeline_last_finished_timestamp_seconds",
                      "When the newest finished run of the region in this phase finished (Unix time)",
                      ["region", "phase"])
EVENTS = Counter("streamrec_pipeline_events_total",
                 "Kubernetes events the controller posted on PipelineRuns, by reason (StageStarted, "
                 "StageRetrying, StageFailed, Succeeded, InvalidSpec, ...)", ["region", "reason"])
STAGE_DURATION = Histogram("streamrec_pipeline_stage_duration_seconds",
                           "Wall time of each stage of a finished run, from its first start to its end",
                           ["region", "stage", "state"],
                           buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800))
RECONCILE_ERRORS = Counter("streamrec_pipeline_reconcile_errors_total",
                           "Reconcile steps that raised an unexpected error (kopf retries them)")


def finished_at(status: Mapping[str, Any]) -> datetime | None:
    """When a terminal run finished: its Progressing condition turned False then; None while it runs."""
    if status.get("phase") not in TERMINAL_PHASES:
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == PROGRESSING and condition.get("lastTransitionTime"):
            return parse_timestamp(condition["lastTransitionTime"])
    return None


def stage_durations(status: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(stage, state, seconds) of every stage of the status that started and finished."""
    out = []
    stages = status.get("stages") or {}
    for stage in STAGES:
        entry = stages.get(stage) or {}
        started, ended = entry.get("startedAt"), entry.get("finishedAt")
        if started and ended:
            seconds = (parse_timestamp(ended) - parse_timestamp(started)).total_seconds()
            out.append((stage, str(entry.get("state", "")), max(seconds, 0.0)))
    return out


# The newest finish per (region, phase) this process has seen: runs are resumed in no particular order.
_newest: dict[tuple[str, str], float] = {}


def _note_finished(region: str, status: Mapping[str, Any]) -> None:
    when = finished_at(status)
    if when is None:
        return
    key = (region, str(status["phase"]))
    _newest[key] = max(_newest.get(key, 0.0), when.timestamp())
    LAST_FINISHED.labels(*key).set(_newest[key])


def run_finished(region: str, status: Mapping[str, Any]) -> None:
    """A run of ``region`` has just reached a terminal phase (called once, on that step)."""
    RUNS_FINISHED.labels(region, str(status["phase"])).inc()
    _note_finished(region, status)
    for stage, state, seconds in stage_durations(status):
        STAGE_DURATION.labels(region, stage, state).observe(seconds)


def run_seen_finished(region: str, status: Mapping[str, Any]) -> None:
    """A run that finished earlier (seen again, e.g. resumed after a controller restart)."""
    _note_finished(region, status)


def events_posted(region: str, reasons: list[str]) -> None:
    for reason in reasons:
        EVENTS.labels(region, reason).inc()


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; the WSGI server (``server_port`` is
    the bound port, ``shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr)
    return server


__all__ = ["events_posted", "finished_at", "run_finished", "run_seen_finished", "serve", "stage_durations"]
