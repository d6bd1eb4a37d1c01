"""Fixtures for the ingest integration tests (helpers in ``ingest_support.py``).

A test module may change the defaults these fixtures take from ``ingest_support``: ``make_env`` starts
from the module's ``FAST_INGEST`` (IngestSettings fields) if it has one, and a worker process started by
``workers`` waits ``WORKER_TIMEOUT_S`` seconds to exit by default, the module's if it has one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest_support import FAST_INGEST, REGION, WORKER_TIMEOUT_S, Env, WorkerProcess
from streamrec.devstack.provision import provision_region
from streamrec.devstack.service import ServiceHandle
from streamrec.settings import load_settings


@pytest.fixture
def make_env(request: pytest.FixtureRequest, tmp_path: Path, moto_server: ServiceHandle,
             redis_url: str) -> Callable[..., Env]:
    """Provisioned settings with unique stream and table names, written to a YAML file for the workers.

    ``make_env(shard_count, **ingest)``: ``ingest`` overrides fields of the module's ``FAST_INGEST``."""
    defaults: dict[str, Any] = getattr(request.module, "FAST_INGEST", FAST_INGEST)

    def make(shard_count: int, **ingest: Any) -> Env:
        suffix = uuid.uuid4().hex[:8]
        document = {
            "environment": "local",
            "aws": {"endpoint_url": moto_server.url, "access_key_id": "testing",
                    "secret_access_key": "testing"},
            "regions": {REGION: {
                "stream_name": f"clicks-{suffix}",
                "shard_count": shard_count,
                "lake_uri": f"file://{tmp_path / f'lake-{suffix}'}",
                "tables": {"leases": f"leases-{suffix}", "recs": f"recs-{suffix}",
                           "features": f"features-{suffix}"},
                "redis_url": redis_url,
            }},
            "ingest": {**defaults, **ingest},
        }
        path = tmp_path / f"streamrec-{suffix}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        settings = load_settings(path)
        provision_region(settings, REGION)
        return Env(settings, path, tmp_path)

    return make


@pytest.fixture
def workers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `streamrec ingest run` processes; any still running at the end of the test are killed.

    ``workers(env, *extra_args, worker_id=None, until_drained=True, config=None)``: a worker id may be
    used again (a restarted pod); each process gets its own log and summary file."""
    timeout: float = getattr(request.module, "WORKER_TIMEOUT_S", WORKER_TIMEOUT_S)
    started: list[WorkerProcess] = []

    def start(env: Env, *extra: str, worker_id: str | None = None, until_drained: bool = True,
              config: Path | None = None) -> WorkerProcess:
        wid = worker_id or f"w-{uuid.uuid4().hex[:6]}"
        n = sum(1 for w in started if w.worker_id == wid)
        log = tmp_path / f"{wid}-{n}.log"
        summary = tmp_path / f"{wid}-{n}.summary.json"
        argv = [sys.executable, "-m", "streamrec", "ingest", "run", "--region", REGION,
                "--config", str(config or env.config), "--worker-id", wid, "--summary-out", str(summary),
                *extra]
        if until_drained:
            argv.append("--until-drained")
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        worker = WorkerProcess(proc, wid, log, summary, timeout)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
