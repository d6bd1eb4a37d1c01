"""benchmarks.serve end to end at toy size: its own redis-server, moto, uvicorn baseline and Ray Serve, one
second per run at 1 and 2 clients, and the figures it emits (names, keys, every answer from the path it
names). Not a performance test: the request budget is loosened so a busy machine cannot fail it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks import serve as bench

pytestmark = pytest.mark.integration

# A loose budget: on a loaded 2-core machine the default 10/20/35 ms step timeouts open breakers and the
# answers come from popularity, which the benchmark (rightly) reports as not measuring the path.
LOOSE = {"deadline_ms": 2000, "cache_timeout_ms": 500, "batch_timeout_ms": 800, "realtime_timeout_ms": 1500}


def test_the_benchmark_emits_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    started = time.monotonic()
    rc = bench.main(["--duration", "1", "--warmup", "0.3", "--concurrency", "1,2", "--items", "300",
                     "--cache-users", "20", "--realtime-users", "400", "--serve-json", json.dumps(LOOSE),
                     "--model-json", json.dumps({"id_buckets": 4096, "category_buckets": 64}),
                     "--work-dir", str(tmp_path / "work")])
    took = time.monotonic() - started
    lines = [json.loads(x) for x in (tmp_path / "results" / "serve.jsonl").read_text().splitlines()]
    assert rc == 0, [(x["metric"], x["path_share"], x["serve"]["sources"]) for x in lines]

    by_name = {x["metric"]: x for x in lines}
    expected = {f"{path}_{what}_c{c}" for path in ("cache_hit", "realtime") for what in ("p99_ms", "rps")
                for c in (1, 2)}
    assert set(by_name) == expected
    for name, x in by_name.items():
        assert {"benchmark", "metric", "value", "unit", "baseline_metric", "baseline_value", "ratio", "machine",
                "params"} <= set(x)
        assert x["benchmark"] == "serve" and x["valid"] is True
        assert x["value"] > 0 and x["baseline_value"] > 0
        assert x["baseline_metric"].startswith("plain_redis_get_")
        want = "cache" if name.startswith("cache_hit") else "realtime"
        assert x["serve"]["sources"] == {want: x["serve"]["requests"]}, x["serve"]
        assert x["plain"]["sources"] == {"cache": x["plain"]["requests"]}
    rps = by_name["cache_hit_rps_c2"]
    assert rps["ratio"] == pytest.approx(rps["value"] / rps["baseline_value"], rel=1e-3)
    assert by_name["cache_hit_p99_ms_c1"]["p50_ms"] <= by_name["cache_hit_p99_ms_c1"]["value"]
    assert by_name["realtime_p99_ms_c1"]["params"]["serve"]["deadline_ms"] == LOOSE["deadline_ms"]
    print(f"benchmark smoke run took {took:.0f} s")
