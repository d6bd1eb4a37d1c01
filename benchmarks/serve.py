"""Online serving latency and throughput: the Ray Serve app against a plain FastAPI + Redis GET app, same run.

Set-up (not timed): our own redis-server and moto server (``streamrec.devstack`` launchers), the region
provisioned (``provision_region``), the ETL's popularity list in the features table, and a registry
version published and promoted in a ``file://`` lake: a ``TwoTowerModel`` with the project's default
config (``ray_apps.train.model_config_for``; random weights, fixed seed: speed does not depend on the
weights) over ``--items`` catalogue items, its exact/IVF index from ``build_index(kind="auto")``. Then
``ray.init`` (2 CPUs, no dashboard, small object store, short temp dir; the process environment of
``serve.http_front`` set first, as ``ensure_ray`` does: HAProxy on the Serve port by default), ``serve.start`` and
``serve.run(build_app(settings, region))`` with one Ingress and one Retriever replica (the ServeScaling
``num_cpus`` defaults) and the default request budget (``deadline_ms`` 50, cache 10, batch 20,
real-time 35 ms); the settings are in every line's ``params``.

Paths measured, each with ``GET /v1/users/{user}/recommendations`` (k=20, exclude_seen=true):

- **cache hit** (a): ``--cache-users`` users with 10 clicks each (``ur:{region}:{user}``, older than
  their batch), batch recommendations (100 items) in DynamoDB, and the answer the chain caches for
  them in Redis (written with the app's codec, key and TTL: see :func:`prime_cache` for why not through
  the app), each requested once through the app to check, then requested round-robin. Every
  response's ``source`` is checked: it must be ``cache``. The batch is ``--batch-age-s`` old (default
  0): older than ``serve.cache_refresh_after_s`` (300 s), every hit is served *stale* and recomputed in
  the background (DynamoDB + Redis SET in the ingress), which is what a daily batch gets in production
  as the chain stands; the ingress's counters (hit / stale) are reported for every run.
- **real time** (b): users never seen before, each with 10 clicks in Redis, no batch recommendations
  and no cached answer, each requested exactly once: Redis (cache miss + clicks) → DynamoDB (not found)
  → Retriever (user tower + ANN) → answer (the cache write happens off the request path). Every
  response must say ``realtime``. (The alternative, bumping a click before each request for a small
  user set, adds a Redis round trip to the load generator on the same 2 cores; fresh users need only
  a bigger pool, written before the clock starts: ``--realtime-users``. A level that runs out of
  users ends early and says so.)
- **baseline** (c): a plain FastAPI app (:func:`plain_app`, below) under uvicorn in a subprocess
  (1 worker, uvicorn's defaults: uvloop + httptools where installed, access log off) that does only
  ``await redis.get(key)`` (redis.asyncio) of the same cache keys and returns the stored bytes, on the
  same URL shape, for the same users in the same order as (a).

After a Serve run whose dependency calls timed out or failed, the app is left idle for
``serve.breaker_reset_s`` + 0.5 s before the next one, so a breaker that run opened is half-open again
(each run starts from the same state). Load generator:
closed loop in this process (it shares the 2 cores with everything else, which is
how the targets are stated): one ``httpx.AsyncClient`` with a keep-alive pool of N connections and N
tasks, each sending its next request as soon as the previous answer arrives; a warm-up, then
``--duration`` seconds measured; latency of each request with ``perf_counter`` (send → whole body
read), percentiles with numpy. RPS = requests started in the measured window / its length. Each
concurrency level runs baseline, cache hit, real time in that order.

Where the time goes (reported beside the figures): the ingress replica's own histogram
(``streamrec_serve_request_latency_seconds``, scraped from ``/metrics`` before and after each run:
mean time inside the ingress), Serve's per-request access logs of the proxy, the ingress and the
retriever replicas (their own timings, when Serve writes them), and sequential round trips from this
process to Redis (the ingress's GET + ZREVRANGE pipeline) and DynamoDB (moto ``GetItem``).

Variants: ``--serve-json`` overrides ServeSettings (the targets are stated for the defaults), e.g.
``'{"http_front": "proxy"}'`` for Serve's Python proxy actor; ``--ray-env K=V`` sets Serve switches for
an experiment (with ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` alone, no HAProxy, the load generator is
pointed at the ingress replica's own port); ``--client raw`` swaps httpx for :mod:`benchmarks.rawhttp`, a
minimal keep-alive GET client, to show how much of a latency figure is the load generator's own CPU (a
variant run: reported, never the headline).

    python -m benchmarks.serve [--quick] [--duration S] [--concurrency 1,8,32] [--ray-env K=V] [--client raw]

Targets (issue), load generator included, 2-core machine: cache hit p99 < 15 ms at 8 clients and at
least 60% of the baseline's RPS; real-time p99 < 40 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import emit

BENCHMARK = "serve"
REGION = "us-east-1"
DAY = date(2026, 11, 26)
K = 20
CLICKS_PER_USER = 10
BATCH_ITEMS = 100
CATEGORIES = 200
# A run whose answers come from the intended source less often than this is not measuring that path.
MIN_PATH_SHARE = 0.5
TARGETS = {"cache_hit_p99_ms_c8": ("<", 15.0), "cache_hit_rps_ratio_c8": (">=", 0.6),
           "realtime_p99_ms_c8": ("<", 40.0)}
ENV_REDIS, ENV_REGION, ENV_VERSION = "SR_BENCH_REDIS_URL", "SR_BENCH_REGION", "SR_BENCH_MODEL_VERSION"
_SOURCE = re.compile(rb'"source"\s*:\s*"([a-z]+)"')


# --------------------------------------------------------------------------------------------------------
# (c) The baseline: a plain FastAPI app that only reads the cached answer from Redis
# --------------------------------------------------------------------------------------------------------

def plain_app() -> Any:
    """uvicorn factory (``benchmarks.serve:plain_app``): the same route as the Serve ingress, one
    ``GET recs:{region}:{version}:{user}`` and the stored bytes as the body (404 when absent)."""
    import redis.asyncio as aioredis
    from fastapi import FastAPI, Response

    from ray_apps.serve.answers import cache_key

    region, version = os.environ[ENV_REGION], os.environ[ENV_VERSION]
    client = aioredis.Redis.from_url(os.environ[ENV_REDIS], socket_timeout=0.5, max_connections=64)
    app = FastAPI(title="plain Redis GET baseline")

    @app.get("/v1/users/{user_id}/recommendations")
    async def recommendations(user_id: str, k: int = K, exclude_seen: bool = True) -> Response:
        raw = await client.get(cache_key(region, version, user_id))
        if raw is None:
            return Response(status_code=404)
        return Response(content=raw, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


# --------------------------------------------------------------------------------------------------------
# Set-up: servers, data, model, the Serve app and the baseline app (not timed)
# --------------------------------------------------------------------------------------------------------

@dataclass
class World:
    settings: Any
    version: str
    serve_url: str
    plain_url: str
    redis_url: str
    dynamodb: Any
    ray_temp: Path
    cache_users: list[str]
    realtime_users: list[str]
    # What the app caches for a cache-hit user's batch answer: Answer.encode() of it, by user.
    cache_entries: dict[str, bytes]
    setup_s: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


def item_ids(n: int) -> list[str]:
    return [f"item-{i:06d}" for i in range(n)]


def publish_model(settings: Any, items: list[str], seed: int,
                  overrides: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """A version with the default model config (``overrides`` applied) and random weights, published and
    promoted."""
    import numpy as np
    import torch

    from ray_apps.ann import build_index
    from ray_apps.encoding import encode_items
    from ray_apps.model import TwoTowerConfig, TwoTowerModel, as_tensors
    from ray_apps.registry import ModelRegistry, embeddings_table
    from ray_apps.train import model_config_for, state_to_bytes

    config = TwoTowerConfig.model_validate({**model_config_for(settings).model_dump(), "seed": seed,
                                            **(overrides or {})})
    torch.manual_seed(seed)
    model = TwoTowerModel(config).eval()
    categories = [f"cat-{i % CATEGORIES}" for i in range(len(items))]
    ranks = np.arange(1, len(items) + 1)
    with torch.no_grad():
        vectors = model.item_embeddings(as_tensors(encode_items(items, categories, ranks, config=config))).numpy()
    index = build_index(items, vectors, kind="auto", exact_max_items=settings.score.exact_max_items)
    registry = ModelRegistry.from_settings(settings, REGION)
    version = registry.publish(
        None, user_tower=state_to_bytes(model.state_dict()), config=json.loads(config.model_dump_json()),
        item_embeddings=embeddings_table(items, vectors), index=index,
        data_window=(DAY - timedelta(days=13), DAY), metrics={"benchmark": f"random weights, seed {seed}"},
        gate={"passed": True}, code_version="benchmark")
    registry.promote(version.version, {"reason": "benchmark"})
    info = {"items": len(items), "index": dict(version.index_info), "embedding_dim": config.embedding_dim,
            "output_dim": config.output_dim, "id_buckets": config.id_buckets, "history_length": config.history_length}
    return version.version, info


def write_batch_recs(dynamodb: Any, table: str, users: list[str], version: str, items: list[str],
                     generated_at: datetime, seed: int) -> dict[str, list[str]]:
    """BATCH_ITEMS recommendations per user, 25 per BatchWriteItem, UnprocessedItems retried. Returns
    each user's items."""
    import random

    from streamrec.online_store import recs_item

    rng = random.Random(seed)
    recs = {u: rng.sample(items, BATCH_ITEMS) for u in users}
    requests = [{"PutRequest": {"Item": recs_item(u, version, ranked, batch_scores(), "model", generated_at)}}
                for u, ranked in recs.items()]
    for start in range(0, len(requests), 25):
        pending = {table: requests[start:start + 25]}
        for attempt in range(10):
            left = dynamodb.batch_write_item(RequestItems=pending).get("UnprocessedItems") or {}
            if not left:
                break
            pending = left
            time.sleep(0.05 * 2 ** attempt)
        else:
            raise RuntimeError(f"DynamoDB left {len(pending[table])} recs items unprocessed")
    return recs


def batch_scores() -> list[float]:
    return [1.0 - i / (2 * BATCH_ITEMS) for i in range(BATCH_ITEMS)]


def write_clicks(redis_url: str, users: list[str], items: list[str], newest: datetime, seed: int) -> None:
    """CLICKS_PER_USER distinct clicks per user in the consumer's last-N sorted set, the newest at
    ``newest``, one second apart."""
    import random

    import redis

    from streamrec import online

    rng = random.Random(seed)
    top_ms = int(newest.timestamp() * 1000)
    with redis.Redis.from_url(redis_url) as client:
        for start in range(0, len(users), 2000):
            pipe = client.pipeline(transaction=False)
            for user in users[start:start + 2000]:
                clicked = rng.sample(items, CLICKS_PER_USER)
                pipe.zadd(online.user_recent_key(REGION, user),
                          {item: top_ms - 1000 * n for n, item in enumerate(clicked)})
            pipe.execute()


def wait_http(url: str, timeout_s: float, ok: Callable[[Any], bool] = lambda r: r.status_code == 200) -> Any:
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if ok(r):
                return r
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready in {timeout_s:.0f} s: {last}")


def serve_document(port: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``serve`` settings: one replica of each deployment, everything else at its default, then
    ``overrides`` (merged one level down for ``ingress`` / ``retriever``). Each deployment's defaults are
    spelled out: a partial ``retriever`` section would otherwise take ServeScaling's field defaults
    (num_cpus 0.25, target_ongoing_requests 8), not ServeSettings' retriever defaults (0.5, 4)."""
    from streamrec.settings import ServeSettings

    defaults = ServeSettings()
    doc: dict[str, Any] = {"port": port, **{k: v for k, v in overrides.items() if k not in ("ingress", "retriever")}}
    for name in ("ingress", "retriever"):
        doc[name] = {**getattr(defaults, name).model_dump(), "min_replicas": 1, "max_replicas": 1,
                     **overrides.get(name, {})}
    return doc


def direct_ingress_port(ray_temp: Path, timeout_s: float = 60) -> int | None:
    """With Serve's direct ingress on (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, or implied by
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) the ingress replica serves HTTP itself, no proxy in between, on
    a port Serve allocates (30000-31000 by default) and logs; None when direct ingress is off."""
    from ray.serve._private import constants

    if not constants.RAY_SERVE_ENABLE_DIRECT_INGRESS or constants.RAY_SERVE_ENABLE_HA_PROXY:
        return None  # HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1) listens on the Serve port itself
    pattern = re.compile(r"Successfully started \S*(?:HTTP|http)\S* server on port (\d+)")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in (ray_temp / "session_latest" / "logs" / "serve").glob("replica_*Ingress*"):
            m = pattern.search(path.read_text(errors="replace"))
            if m:
                return int(m.group(1))
        time.sleep(0.5)
    raise RuntimeError("direct ingress is on but the ingress replica never logged its HTTP port")


@contextlib.contextmanager
def world(work: Path, *, items: int, cache_users: int, realtime_users: int, batch_age_s: float,
          seed: int, serve_overrides: dict[str, Any] | None = None,
          model_overrides: dict[str, Any] | None = None) -> Iterator[World]:
    """Everything up and loaded; torn down (Serve, Ray, uvicorn, redis, moto) on exit."""
    import yaml

    from ray_apps.serve.answers import Answer
    from ray_apps.serve.front import apply_serve_env
    from streamrec import aws
    from streamrec.devstack.moto_server import MotoLauncher
    from streamrec.devstack.process import free_port, terminate
    from streamrec.devstack.provision import provision_region
    from streamrec.devstack.redis_server import RedisLauncher
    from streamrec.settings import load_settings

    setup: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        t = time.perf_counter()
        redis_launcher, moto_launcher = RedisLauncher(), MotoLauncher()
        redis_handle = redis_launcher.start(work / "redis")
        stack.callback(redis_launcher.purge, redis_handle)
        stack.callback(redis_launcher.stop, redis_handle)
        moto_handle = moto_launcher.start(work / "moto")
        stack.callback(moto_launcher.stop, moto_handle)
        redis_url = f"{redis_handle.url}/0"
        setup["servers_s"] = time.perf_counter() - t

        suffix = uuid.uuid4().hex[:6]
        serve_port = free_port()
        document = {
            "environment": "local",
            "aws": {"endpoint_url": moto_handle.url, "access_key_id": "testing", "secret_access_key": "testing"},
            "regions": {REGION: {
                "stream_name": f"clicks-{suffix}", "shard_count": 1, "lake_uri": f"file://{work / 'lake'}",
                "tables": {"leases": f"leases-{suffix}", "recs": f"recs-{suffix}", "features": f"features-{suffix}"},
                "redis_url": redis_url,
            }},
            "serve": serve_document(serve_port, serve_overrides or {}),
        }
        config_path = work / "streamrec.yaml"
        config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        settings = load_settings(config_path)
        # Serve's front end (serve.http_front) is process environment, read when Serve's processes start:
        # set before `ray.init` below, as ensure_ray does for `streamrec serve run`; --ray-env wins.
        apply_serve_env(settings.serve.http_front, os.environ)
        region = settings.region(REGION)
        t = time.perf_counter()
        provision_region(settings, REGION)
        dynamodb = aws.client("dynamodb", REGION, settings.aws)
        catalogue = item_ids(items)
        dynamodb.put_item(TableName=region.tables.features, Item={
            "pk": {"S": "popular"}, "sk": {"S": f"top{settings.etl.popular_top_k}"},
            "item_ids": {"L": [{"S": i} for i in catalogue[:settings.etl.popular_top_k]]},
            "scores": {"L": [{"N": str(settings.etl.popular_top_k - i)} for i in range(settings.etl.popular_top_k)]},
            "dt": {"S": DAY.isoformat()}})
        setup["provision_s"] = time.perf_counter() - t

        t = time.perf_counter()
        version, model_info = publish_model(settings, catalogue, seed, model_overrides)
        setup["model_publish_s"] = time.perf_counter() - t

        t = time.perf_counter()
        now = datetime.now(UTC)
        cached = [f"bench-c-{i:06d}" for i in range(cache_users)]
        fresh = [f"bench-r-{i:07d}" for i in range(realtime_users)]
        clicked_at = now - timedelta(seconds=batch_age_s + 3600)  # before the batch: it stays usable
        batch_at = now - timedelta(seconds=batch_age_s)
        write_clicks(redis_url, cached, catalogue, clicked_at, seed)
        recs = write_batch_recs(dynamodb, region.tables.recs, cached, version, catalogue, batch_at, seed)
        # The entry the chain stores for a batch answer (ray_apps.serve.chain: source batch, the batch's
        # generated_at, the newest click it took into account), encoded by the app's own codec.
        entries = {u: Answer(tuple(ranked), tuple(batch_scores()), "batch", version, batch_at,
                             int(clicked_at.timestamp() * 1000)).encode() for u, ranked in recs.items()}
        write_clicks(redis_url, fresh, catalogue, now - timedelta(seconds=5), seed + 1)
        setup["data_s"] = time.perf_counter() - t

        # The baseline app, before Ray takes the cores' attention.
        t = time.perf_counter()
        plain_port = free_port()
        log = (work / "plain.log").open("ab")
        stack.callback(log.close)
        plain = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "benchmarks.serve:plain_app", "--host", "127.0.0.1",
             "--port", str(plain_port), "--workers", "1", "--log-level", "warning", "--no-access-log"],
            cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, ENV_REDIS: redis_url, ENV_REGION: REGION, ENV_VERSION: version})
        stack.callback(terminate, plain.pid, plain_port)
        plain_url = f"http://127.0.0.1:{plain_port}"
        wait_http(f"{plain_url}/healthz", 60)
        setup["plain_app_start_s"] = time.perf_counter() - t

        t = time.perf_counter()
        import ray
        from ray import serve

        from ray_apps.serve.app import build_app

        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray_temp = Path(tempfile.mkdtemp(prefix="srbv-", dir="/tmp"))  # short: Ray's socket paths are limited
        stack.callback(shutil.rmtree, ray_temp, True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
                 object_store_memory=100 * 1024 * 1024, _temp_dir=str(ray_temp))
        stack.callback(ray.shutdown)
        setup["ray_init_s"] = time.perf_counter() - t
        t = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        stack.callback(serve.shutdown)
        serve.run(build_app(settings, REGION), name="streamrec", route_prefix="/")
        serve_url = f"http://127.0.0.1:{direct_ingress_port(ray_temp) or serve_port}"
        wait_http(f"{serve_url}/readyz", 120)
        setup["serve_start_s"] = time.perf_counter() - t

        yield World(settings, version, serve_url, plain_url, redis_url, dynamodb, ray_temp, cached, fresh,
                    entries, {k: round(v, 2) for k, v in setup.items()}, model_info)


# --------------------------------------------------------------------------------------------------------
# The load generator
# --------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    target: str
    concurrency: int
    seconds: float
    latencies_ms: Any  # numpy float array, one per measured request
    sources: Counter[str]
    errors: Counter[str]
    client_cpu_s: float
    machine_busy: float | None
    machine_steal: float | None
    load_1m: float | None = None  # the machine's 1-minute load average when the run started
    exhausted: bool = False
    ingress: dict[str, Any] = field(default_factory=dict)
    serve_logs: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.latencies_ms, q)) if self.requests else float("nan")

    def share(self, source: str) -> float:
        total = sum(self.sources.values()) + sum(self.errors.values())
        return self.sources.get(source, 0) / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        return {"rps": round(self.rps, 1), "p50_ms": round(self.pct(50), 3), "p95_ms": round(self.pct(95), 3),
                "p99_ms": round(self.pct(99), 3), "max_ms": round(float(self.latencies_ms.max()), 3)
                if self.requests else None, "requests": self.requests, "seconds": round(self.seconds, 2),
                "sources": dict(self.sources), "errors": dict(self.errors),
                "client_cpu_ms_per_request": round(1000 * self.client_cpu_s / max(1, self.requests), 3),
                "machine_busy_share": self.machine_busy, "machine_steal_share": self.machine_steal,
                "load_1m_at_start": self.load_1m,
                "pool_exhausted": self.exhausted}


class Users:
    """The next user to ask for: round-robin over a pool, or each user once (None when used up)."""

    def __init__(self, users: list[str], *, once: bool, start: int = 0) -> None:
        self.users, self.once, self.i = users, once, start

    def next(self) -> str | None:
        if self.once and self.i >= len(self.users):
            return None
        user = self.users[self.i % len(self.users)]
        self.i += 1
        return user


def _cpu_times() -> tuple[float, float, float] | None:
    """(busy, steal, total) jiffies of the whole machine, from /proc/stat (busy includes steal: time the
    hypervisor gave to other guests)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, fields[7] if len(fields) > 7 else 0.0, sum(fields)


def classify_serve(status: int, body: bytes) -> str:
    m = _SOURCE.search(body) if status == 200 else None
    return m.group(1).decode() if m else f"http_{status}"


def classify_plain(status: int, body: bytes) -> str:
    return "cache" if status == 200 and body.startswith(b"{") else f"http_{status}"


async def closed_loop(client: Any, users: Users, classify: Callable[[int, bytes], str], concurrency: int,
                      seconds: float) -> tuple[list[float], Counter[str], Counter[str], float, bool]:
    """N tasks, each sending its next request when the previous answer is in, for ``seconds``.
    Returns (latencies ms, sources, errors, measured seconds, pool exhausted)."""
    import httpx

    from benchmarks.rawhttp import RawHttpError

    latencies: list[float] = []
    sources: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    exhausted = False
    start = time.perf_counter()
    end = start + seconds
    clock = time.perf_counter

    async def one() -> None:
        nonlocal exhausted
        while clock() < end:
            user = users.next()
            if user is None:
                exhausted = True
                return
            t0 = clock()
            try:
                r = await client.get(f"/v1/users/{user}/recommendations", params={"k": K})
                status, body = r.status_code, r.content
            except (httpx.HTTPError, RawHttpError) as exc:  # a timeout or a reset connection: a failed request
                errors[type(exc).__name__] += 1
                continue
            latencies.append((clock() - t0) * 1000)
            source = classify(status, body)
            (sources if not source.startswith("http_") else errors)[source] += 1

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies, sources, errors, min(clock(), end) - start if not exhausted else clock() - start, exhausted


def event_loop_runner() -> tuple[Any, str]:
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop), f"uvloop {uvloop.__version__}"
    except ImportError:
        return asyncio.Runner(), "asyncio"


# --------------------------------------------------------------------------------------------------------
# Where the time goes: the ingress's histogram, Serve's access logs, direct round trips
# --------------------------------------------------------------------------------------------------------

def parse_ingress_metrics(text: str) -> dict[str, Any]:
    """Cumulative (count, sum) of the user route's latency by source, and the cache/fallback counters."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {"latency": {}, "buckets": {}, "cache": {}, "fallbacks": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == "streamrec_serve_request_latency_seconds_count" and labels.get("route") == "user":
                out["latency"].setdefault(labels["source"], [0.0, 0.0])[0] = s.value
            elif s.name == "streamrec_serve_request_latency_seconds_sum" and labels.get("route") == "user":
                out["latency"].setdefault(labels["source"], [0.0, 0.0])[1] = s.value
            elif s.name == "streamrec_serve_request_latency_seconds_bucket" and labels.get("route") == "user":
                out["buckets"].setdefault(labels["source"], {})[float(labels["le"])] = s.value
            elif s.name == "streamrec_serve_cache_lookups_total":
                out["cache"][labels["result"]] = s.value
            elif s.name == "streamrec_serve_fallbacks_total":
                out["fallbacks"][f"{labels['step']}:{labels['reason']}"] = s.value
    return out


def ingress_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What one run added: mean and bucket-estimated p99 time inside the ingress per source, cache
    lookups and fallbacks by kind."""
    out: dict[str, Any] = {}
    for source, (count, total) in after["latency"].items():
        c0, s0 = before["latency"].get(source, [0.0, 0.0])
        n = count - c0
        if n <= 0:
            continue
        buckets = after["buckets"].get(source, {})
        b0 = before["buckets"].get(source, {})
        p99 = None
        for le in sorted(buckets):
            if buckets[le] - b0.get(le, 0.0) >= 0.99 * n:
                p99 = le * 1000
                break
        out[source] = {"requests": int(n), "mean_ms": round(1000 * (total - s0) / n, 3), "p99_le_ms": p99}
    for kind, name in (("cache", "cache_lookups"), ("fallbacks", "fallbacks")):
        diff = {k: int(v - before[kind].get(k, 0.0)) for k, v in after[kind].items()}
        out[name] = {k: v for k, v in diff.items() if v}
    return out


_LOG_MS = re.compile(r"\s(\d+(?:\.\d+)?)ms\s*$")


def serve_log_offsets(temp: Path) -> dict[Path, int]:
    logs = temp / "session_latest" / "logs" / "serve"
    return {p: p.stat().st_size for p in logs.glob("*.log")} if logs.is_dir() else {}


def serve_log_latencies(temp: Path, since: dict[Path, int]) -> dict[str, Any]:
    """Median/p99 of the per-request durations Serve's access log lines end with (``... 200 3.1ms``),
    per component (proxy, Ingress replica, Retriever replica), for the lines written since ``since``."""
    import numpy as np

    per: dict[str, list[float]] = {}
    for path, size in serve_log_offsets(temp).items():
        name = path.name
        component = "proxy" if name.startswith("proxy") else "ingress" if "Ingress" in name else \
            "retriever" if "Retriever" in name else None
        if component is None:
            continue
        with path.open("rb") as fh:
            fh.seek(since.get(path, 0))
            chunk = fh.read(max(0, size - since.get(path, 0))).decode(errors="replace")
        for line in chunk.splitlines():
            # The user route's access lines (proxy, ingress) and the retriever's recommend calls only.
            if "/v1/users/" not in line and "CALL recommend " not in line:
                continue
            m = _LOG_MS.search(line)
            if m:
                per.setdefault(component, []).append(float(m.group(1)))
    return {c: {"lines": len(v), "p50_ms": round(float(np.percentile(v, 50)), 2),
                "p99_ms": round(float(np.percentile(v, 99)), 2)} for c, v in per.items() if v}


def round_trips(w: World, n: int) -> dict[str, Any]:
    """Sequential round trips from this process: the ingress's Redis pipeline and a DynamoDB GetItem."""
    import numpy as np
    import redis

    from ray_apps.serve.answers import cache_key
    from streamrec import online

    out: dict[str, Any] = {}
    with redis.Redis.from_url(w.redis_url) as client:
        samples = []
        for i in range(n):
            user = w.cache_users[i % len(w.cache_users)]
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            pipe.get(cache_key(REGION, w.version, user))
            pipe.zrevrange(online.user_recent_key(REGION, user), 0, 49, withscores=True)
            pipe.execute()
            samples.append((time.perf_counter() - t0) * 1000)
        out["redis_pipeline"] = samples
    table = w.settings.region(REGION).tables.recs
    samples = []
    for i in range(max(1, n // 5)):
        t0 = time.perf_counter()
        w.dynamodb.get_item(TableName=table, Key={"user_id": {"S": f"nobody-{i}"}, "model_version": {"S": w.version}})
        samples.append((time.perf_counter() - t0) * 1000)
    out["dynamodb_get_item_moto"] = samples
    return {k: {"p50_ms": round(float(np.percentile(v, 50)), 3), "p99_ms": round(float(np.percentile(v, 99)), 3),
                "n": len(v)} for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------

async def prime_cache(w: World, concurrency: int,
                      warmup_timeout_s: float = 60) -> tuple[Counter[str], dict[str, Any]]:
    """Warm the cache for the cache-hit users, then ask the app for each of them once and return the
    sources of those answers with the ingress's counters.

    The entries are written directly, as the app writes them for a batch answer (same key, codec and
    TTL): asking the app to compute them does not work against moto with the default budget, since
    moto's GetItem of a 100-item recs row takes longer than ``batch_timeout_ms`` (20 ms) on these
    machines, so the chain would answer from the real-time path instead (and cache that)."""
    import httpx
    import redis.asyncio as aioredis

    from ray_apps.serve.answers import cache_key

    store = aioredis.Redis.from_url(w.redis_url)
    try:
        pipe = store.pipeline(transaction=False)
        for user, entry in w.cache_entries.items():
            pipe.set(cache_key(REGION, w.version, user), entry, ex=w.settings.serve.cache_ttl_s)
        await pipe.execute()
    finally:
        await store.aclose()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    reset_s = w.settings.serve.breaker_reset_s
    async with httpx.AsyncClient(base_url=w.serve_url, limits=limits, timeout=30) as client:
        # A fresh replica's first calls are slow (connections, first use of each code path): their
        # timeouts open the breakers for breaker_reset_s. Warm up until a round of answers is served
        # from the cache.
        deadline = time.monotonic() + warmup_timeout_s
        while True:
            probe = Users(w.cache_users[:20], once=True)
            _, sources, _, _, _ = await closed_loop(client, probe, classify_serve, concurrency, 60)
            if sources.get("cache", 0) >= 18 or time.monotonic() > deadline:
                break
            await asyncio.sleep(reset_s + 0.5)
        _, sources, errors, _, _ = await closed_loop(client, Users(w.cache_users, once=True), classify_serve,
                                                     concurrency, 3600)
        metrics = parse_ingress_metrics((await client.get("/metrics")).text)
    return sources + errors, {"cache": metrics["cache"], "fallbacks": metrics["fallbacks"]}


async def measure(w: World, target: str, concurrency: int, warmup_s: float, seconds: float,
                  realtime: Users, settle_s: float = 0.0, client_kind: str = "httpx") -> Run:
    import httpx
    import numpy as np

    from benchmarks.rawhttp import RawHttpClient

    base = w.plain_url if target == "plain" else w.serve_url
    classify = classify_plain if target == "plain" else classify_serve
    users = realtime if target == "realtime" else Users(w.cache_users, once=False)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if target != "plain" and settle_s > 0:
        await asyncio.sleep(settle_s)  # an idle app: a breaker a previous run opened is half-open again
    load = (RawHttpClient(base, concurrency) if client_kind == "raw"
            else httpx.AsyncClient(base_url=base, limits=limits, timeout=10))
    async with load as client:
        await closed_loop(client, users, classify, concurrency, warmup_s)
        before = after = None
        if target != "plain":
            async with httpx.AsyncClient(base_url=w.serve_url, timeout=10) as side:
                before = parse_ingress_metrics((await side.get("/metrics")).text)
        offsets = serve_log_offsets(w.ray_temp)
        cpu0, busy0, load = time.process_time(), _cpu_times(), round(os.getloadavg()[0], 2)
        latencies, sources, errors, measured, exhausted = await closed_loop(
            client, users, classify, concurrency, seconds)
        cpu1, busy1 = time.process_time(), _cpu_times()
        if target != "plain":
            async with httpx.AsyncClient(base_url=w.serve_url, timeout=10) as side:
                after = parse_ingress_metrics((await side.get("/metrics")).text)
    machine_busy = machine_steal = None
    if busy0 and busy1 and busy1[2] > busy0[2]:
        machine_busy = round((busy1[0] - busy0[0]) / (busy1[2] - busy0[2]), 3)
        machine_steal = round((busy1[1] - busy0[1]) / (busy1[2] - busy0[2]), 3)
    run = Run(target, concurrency, measured, np.asarray(latencies, dtype=float), sources, errors, cpu1 - cpu0,
              machine_busy, machine_steal, load, exhausted)
    if before is not None and after is not None:
        run.ingress = ingress_delta(before, after)
        await asyncio.sleep(0.3)  # Serve's log handlers flush on their own
        run.serve_logs = serve_log_latencies(w.ray_temp, offsets)
    return run


def print_table(runs: dict[tuple[str, int], Run], levels: list[int]) -> None:
    names = {"plain": "(c) plain FastAPI+Redis GET", "cache": "(a) Serve cache hit", "realtime": "(b) Serve real time"}
    print("\n(p50 ms in: Serve's own access-log timings of the proxy, the ingress replica and the retriever "
          "call; the client's figure adds the load generator and the loopback HTTP hop)", file=sys.stderr)
    print(f"{'path':30} {'conc':>4} {'RPS':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'ratio':>6}  "
          f"{'p50 ms in: proxy':>16} {'ingress':>8} {'retriever':>9}  sources/errors", file=sys.stderr)
    for c in levels:
        plain = runs[("plain", c)]
        for target in ("plain", "cache", "realtime"):
            r = runs[(target, c)]
            ratio = f"{r.rps / plain.rps:6.2f}" if target != "plain" and plain.rps else "      "
            logs = [r.serve_logs.get(part, {}).get("p50_ms") for part in ("proxy", "ingress", "retriever")]
            inner_s = " ".join(f"{v:{w}.2f}" if v is not None else " " * w for v, w in zip(logs, (16, 8, 9)))
            extra = {**r.sources, **{f"err:{k}": v for k, v in r.errors.items()}}
            print(f"{names[target]:30} {c:4d} {r.rps:8.1f} {r.pct(50):8.2f} {r.pct(95):8.2f} {r.pct(99):8.2f} "
                  f"{ratio}  {inner_s}  {extra}{' (user pool ran out)' if r.exhausted else ''}", file=sys.stderr)


def benchmark(args: argparse.Namespace, levels: list[int], work: Path) -> int:
    import httpx
    import uvicorn

    t_all = time.perf_counter()
    print(f"setting up: redis, moto, model ({args.items:,} items), {args.cache_users:,} cache-hit users, "
          f"{args.realtime_users:,} real-time users, uvicorn baseline, Ray Serve ...", file=sys.stderr)
    with world(work, items=args.items, cache_users=args.cache_users, realtime_users=args.realtime_users,
               batch_age_s=args.batch_age_s, seed=args.seed, serve_overrides=args.serve_overrides,
               model_overrides=args.model_overrides) as w:
        print(f"set up in {sum(w.setup_s.values()):.1f} s: {w.setup_s}; model {w.version}", file=sys.stderr)
        runner, loop_name = event_loop_runner()
        with runner:
            primed, counters = runner.run(prime_cache(w, 1))
            print(f"cache primed: check pass sources {dict(primed)}; ingress counters {counters}", file=sys.stderr)
            if primed.get("cache", 0) < MIN_PATH_SHARE * len(w.cache_users):
                print(f"error: after priming, only {primed.get('cache', 0)} of {len(w.cache_users)} answers "
                      f"came from the cache ({dict(primed)}): the cache-hit path cannot be measured",
                      file=sys.stderr)
                return 1
            refs = round_trips(w, 500 if not args.quick else 100)
            print(f"direct round trips from the load generator's process: {refs}", file=sys.stderr)
            realtime = Users(w.realtime_users, once=True)
            runs: dict[tuple[str, int], Run] = {}
            settle = False
            for c in levels:
                for target in ("plain", "cache", "realtime"):
                    run = runner.run(measure(w, target, c, args.warmup, args.duration, realtime,
                                             w.settings.serve.breaker_reset_s + 0.5 if settle else 0.0,
                                             args.client))
                    runs[(target, c)] = run
                    if target != "plain":  # did this run trip a breaker? then the next one starts after a pause
                        settle = any(k.split(":")[1] in ("timeout", "error", "circuit_open")
                                     for k in run.ingress.get("fallbacks", {}))
                    print(f"c={c:<3} {target:8} {json.dumps(run.summary())}"
                          + (f"\n         ingress {json.dumps(run.ingress)}\n         serve logs "
                             f"{json.dumps(run.serve_logs)}" if target != "plain" else ""), file=sys.stderr)
        print_table(runs, levels)
        stale = sum(r.ingress.get("cache_lookups", {}).get("stale", 0) for r in runs.values())
        if stale:
            print(f"note: {stale} cache hits were 'stale' (served, then recomputed in the background: DynamoDB "
                  "and a Redis SET in the ingress); see --batch-age-s", file=sys.stderr)
        wall = time.perf_counter() - t_all
        print(f"wall time {wall:.0f} s (set-up {sum(w.setup_s.values()):.0f} s)", file=sys.stderr)

        s = w.settings.serve
        params = {
            "quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup, "concurrency": levels,
            "k": K, "exclude_seen": True, "items": args.items, "cache_users": args.cache_users,
            "realtime_users": args.realtime_users, "clicks_per_user": CLICKS_PER_USER,
            "batch_items": BATCH_ITEMS, "batch_age_s": args.batch_age_s, "model": w.model,
            "serve_overrides": args.serve_overrides, "model_overrides": args.model_overrides,
            "ray_env": args.ray_env, "serve_url": w.serve_url, "client": args.client,
            **({"variant": "raw load-generator client"} if args.client == "raw" else {}),
            "serve": {"deadline_ms": s.deadline_ms, "cache_timeout_ms": s.cache_timeout_ms,
                      "batch_timeout_ms": s.batch_timeout_ms, "realtime_timeout_ms": s.realtime_timeout_ms,
                      "cache_refresh_after_s": s.cache_refresh_after_s,
                      "ingress": s.ingress.model_dump(), "retriever": s.retriever.model_dump(),
                      "http_front": s.http_front,
                      "serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
                      "ray_num_cpus": 2},
            "load_generator": ("closed loop, benchmarks.rawhttp (asyncio streams, N keep-alive connections), "
                               if args.client == "raw" else
                               f"closed loop, httpx {httpx.__version__} AsyncClient (keep-alive pool of N), ")
                              +
                              f"{loop_name}, in the benchmark's main process (the Ray driver), sharing the 2 "
                              "cores with Serve, Redis, moto and the baseline",
            "baseline": f"plain FastAPI app, uvicorn {uvicorn.__version__} subprocess, 1 worker, loop auto, "
                        "http auto, no access log: one redis.asyncio GET of the same cache key, the bytes returned",
            "dynamodb": "moto server (local)", "setup_s": w.setup_s,
        }
        problems: list[str] = []
        for c in levels:
            plain, cache, rt = runs[("plain", c)], runs[("cache", c)], runs[("realtime", c)]
            for run, want in ((cache, "cache"), (rt, "realtime"), (plain, "cache")):
                if run.share(want) < MIN_PATH_SHARE:
                    problems.append(f"c={c} {run.target}: only {run.share(want):.0%} of the answers from "
                                    f"'{want}' ({dict(run.sources)}, errors {dict(run.errors)})")
            common = {"plain": plain.summary(), "round_trips": refs}
            for name, run in (("cache_hit", cache), ("realtime", rt)):
                # Valid: both this path and the baseline answered from the source they stand for.
                valid = run.share("cache" if name == "cache_hit" else "realtime") >= MIN_PATH_SHARE and \
                    plain.share("cache") >= MIN_PATH_SHARE
                extra = {"p50_ms": round(run.pct(50), 3), "p95_ms": round(run.pct(95), 3),
                         "baseline_p50_ms": round(plain.pct(50), 3), "baseline_p95_ms": round(plain.pct(95), 3),
                         "serve": run.summary(), "ingress": run.ingress, "serve_logs": run.serve_logs,
                         "path_share": round(run.share("cache" if name == "cache_hit" else "realtime"), 4),
                         "valid": valid, **common}
                emit(BENCHMARK, f"{name}_p99_ms_c{c}", run.pct(99), "ms", f"plain_redis_get_p99_ms_c{c}",
                     plain.pct(99), params, **extra)
                emit(BENCHMARK, f"{name}_rps_c{c}", run.rps, "requests/s", f"plain_redis_get_rps_c{c}", plain.rps,
                     params, **extra)
        if 8 in levels:
            verdict = {
                "cache_hit_p99_ms_c8": runs[("cache", 8)].pct(99),
                "cache_hit_rps_ratio_c8": runs[("cache", 8)].rps / runs[("plain", 8)].rps
                if runs[("plain", 8)].rps else 0.0,
                "realtime_p99_ms_c8": runs[("realtime", 8)].pct(99),
            }
            for name, value in verdict.items():
                op, limit = TARGETS[name]
                met = value < limit if op == "<" else value >= limit
                print(f"target {name} {op} {limit}: {value:.3f} {'met' if met else 'NOT met'}", file=sys.stderr)
        if problems:
            print("error: some runs did not measure the path they name (figures emitted with valid=false):\n  "
                  + "\n  ".join(problems), file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 s per run after a 0.5 s warm-up, 2,000 items, 200 cache-hit users (about a minute "
                             "on a quiet machine, plus Ray's and Serve's start: 20-40 s on 2 cores)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 15)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per run (default 2)")
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop client counts (default 1,8,32)")
    parser.add_argument("--items", type=int, default=None, help="catalogue size (default 10,000; 2,000 quick)")
    parser.add_argument("--cache-users", type=int, default=None, help="cache-hit user pool (default 1,000; 200 quick)")
    parser.add_argument("--realtime-users", type=int, default=None,
                        help="fresh users for the real-time path, each asked once (default 40,000; 6,000 quick)")
    parser.add_argument("--batch-age-s", type=float, default=0,
                        help="age of the cache-hit users' batch at set-up (default 0: plain hits for "
                             "serve.cache_refresh_after_s; above that every hit is 'stale' and refreshed in "
                             "the background, as for a daily batch)")
    parser.add_argument("--serve-json", default=None,
                        help='ServeSettings overrides, e.g. \'{"cache_timeout_ms": 100}\' (default: none; one replica '
                             'each always). The targets are stated for the defaults')
    parser.add_argument("--model-json", default=None,
                        help='TwoTowerConfig overrides, e.g. \'{"id_buckets": 4096}\' (default: the project\'s config)')
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for Ray and Serve (set before ray.init, inherited by the proxy "
                             "and the replicas), repeatable; e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    parser.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                        help="load generator's HTTP client: httpx (the issue's, 2-3 ms of CPU per request here) "
                             "or raw (benchmarks.rawhttp, a minimal keep-alive GET client: how much of a latency "
                             "figure is the generator's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        args.serve_overrides = json.loads(args.serve_json) if args.serve_json else {}
    except json.JSONDecodeError as exc:
        parser.error(f"--serve-json: not JSON: {exc}")
    try:
        args.model_overrides = json.loads(args.model_json) if args.model_json else {}
    except json.JSONDecodeError as exc:
        parser.error(f"--model-json: not JSON: {exc}")
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--concurrency: comma-separated integers, got {args.concurrency!r}")
    if not levels or min(levels) < 1:
        parser.error("--concurrency: at least one level, each >= 1")
    args.duration = args.duration or (2.0 if args.quick else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    args.items = args.items or (2_000 if args.quick else 10_000)
    args.cache_users = args.cache_users or (200 if args.quick else 1_000)
    args.realtime_users = args.realtime_users or (6_000 if args.quick else 40_000)
    if any("=" not in kv for kv in args.ray_env):
        parser.error("--ray-env: KEY=VALUE")
    args.ray_env = dict(kv.split("=", 1) for kv in args.ray_env)
    os.environ.pop("STREAMREC_CONFIG", None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.update(args.ray_env)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="streamrec-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return benchmark(args, levels, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
