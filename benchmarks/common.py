"""Benchmark output convention (ENGINEERING.md §4): one JSON object per measured figure, printed and
appended to ``benchmarks/results/<name>.jsonl``, always with the baseline measured in the same run."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib, "python": sys.version.split()[0],
            "platform": platform.platform()}


_RUN_AT: str | None = None


def run_stamp() -> str:
    """When this process emitted its first figure: every line of one run carries it, since the report
    groups a run's lines by (benchmark, at) and a run's lines can straddle a second."""
    global _RUN_AT
    if _RUN_AT is None:
        _RUN_AT = datetime.now(UTC).isoformat(timespec="seconds")
    return _RUN_AT


def emit(benchmark: str, metric: str, value: float, unit: str, baseline_metric: str, baseline_value: float,
         params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    line = {
        "benchmark": benchmark, "metric": metric, "value": round(value, 3), "unit": unit,
        "baseline_metric": baseline_metric, "baseline_value": round(baseline_value, 3),
        "ratio": round(value / baseline_value, 4) if baseline_value else None,
        "machine": machine(), "params": params, "at": run_stamp(), **extra,
    }
    print(json.dumps(line), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{benchmark}.jsonl").open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    return line


@contextlib.contextmanager
def ray_cluster(settings: Any, num_cpus: int, prefix: str = "srb-") -> Iterator[float]:
    """A local Ray with ``num_cpus`` logical CPUs in its own short temp dir (Ray's socket paths are
    limited), set up as ``ray_apps.runtime`` would (so ``ensure_ray`` reuses it); yields its start
    seconds and shuts it down after."""
    import ray

    from ray_apps.runtime import ensure_ray, local_ray_options

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    options = local_ray_options(settings)
    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    options.update(num_cpus=num_cpus, _temp_dir=temp)
    t0 = time.perf_counter()
    ray.init(**options)
    started = time.perf_counter() - t0
    try:
        assert ensure_ray(settings) is ray  # the code under test joins this session
        yield started
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
