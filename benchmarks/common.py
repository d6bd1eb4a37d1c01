"""Benchmark output convention (ENGINEERING.md §4): one JSON object per measured figure, printed and
appended to ``benchmarks/results/<name>.jsonl``, always with the baseline measured in the same run."""

from __future__ import annotations

import json
import os
import platform
import sys
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


def emit(benchmark: str, metric: str, value: float, unit: str, baseline_metric: str, baseline_value: float,
         params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    line = {
        "benchmark": benchmark, "metric": metric, "value": round(value, 3), "unit": unit,
        "baseline_metric": baseline_metric, "baseline_value": round(baseline_value, 3),
        "ratio": round(value / baseline_value, 4) if baseline_value else None,
        "machine": machine(), "params": params,
        "at": datetime.now(UTC).isoformat(timespec="seconds"), **extra,
    }
    print(json.dumps(line), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{benchmark}.jsonl").open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    return line
