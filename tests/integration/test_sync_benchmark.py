"""benchmarks.sync end to end at toy size (its own moto server, every run it measures) and the figures it
emits: names, the convention's keys, and that each run did what its figure says. Not a performance test
(ENGINEERING.md §4): no figure is compared with a target."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks import sync as bench

pytestmark = pytest.mark.integration

KEYS = {"benchmark", "metric", "value", "unit", "baseline_metric", "baseline_value", "ratio", "machine", "params"}


def test_the_quick_benchmark_emits_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    assert bench.main(["--quick", "--items", "120", "--top-k", "10", "--workers", "2", "--files", "2"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "results" / "sync.jsonl").read_text().splitlines()]
    by = {x["metric"]: x for x in lines}
    assert list(by) == ["sync_writer_items_per_s", "sync_recs_items_per_s", "sync_throttled_items_per_s",
                        "sync_throttled_backoff_share", "sync_rate_limited_items_per_s"]
    for x in lines:
        assert KEYS <= set(x) and x["benchmark"] == "sync" and x["value"] > 0
        assert x["params"]["items"] == 120 and x["params"]["quick"] is True and x["machine"]["cores"] >= 1
        if x["baseline_value"]:
            assert x["ratio"] == pytest.approx(x["value"] / x["baseline_value"], rel=1e-3, abs=1e-4)

    writer = by["sync_writer_items_per_s"]
    assert writer["baseline_metric"] == "sequential_batch_write_items_per_s"
    assert writer["baseline"]["calls"] == math.ceil(120 / 25) and writer["run"]["max_items_per_call"] == 25
    assert writer["run"]["backoff_share"] == 0 and writer["sequential_sync_client_items_per_s"] > 0
    assert by["sync_recs_items_per_s"]["run"]["calls"] == 2 * math.ceil(60 / 25)  # batches are cut per file
    throttled = by["sync_throttled_items_per_s"]
    assert throttled["params"]["throttle_share"] == 0.2
    assert throttled["run"]["unprocessed_items"] > 0 and throttled["run"]["backoff_share"] > 0
    share = by["sync_throttled_backoff_share"]
    assert share["value"] == pytest.approx(throttled["run"]["backoff_share"], abs=1e-3)
    assert share["baseline_value"] == 0 and share["ratio"] is None  # the unthrottled writer never backs off
    limited = by["sync_rate_limited_items_per_s"]
    assert limited["baseline_metric"] == "configured_items_per_s"
    # 120 items: a 25-item burst, then the configured rate; never much faster than configured
    assert limited["value"] <= limited["baseline_value"] * 120 / 95 * 1.05
    assert limited["run"]["rate_wait_share"] > 0
