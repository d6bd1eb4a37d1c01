"""The Ray Serve recommendation API against real Ray Serve, a real redis-server and moto DynamoDB.

One application serves the whole module (starting Serve costs seconds on 2 cores). The model is a
tiny two-tower trained here on planted clusters (item ``item-CCC-NN`` belongs to cluster CCC), so
"neighbours of a clicked item rank higher" is a checkable property. Each test uses its own users.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
import yaml

from ingest_support import FAST_INGEST, event
from ray_apps.ann import build_index
from ray_apps.encoding import encode_examples, encode_items, examples_table, item_counts
from ray_apps.model import TwoTowerConfig, TwoTowerModel, as_tensors
from ray_apps.registry import ModelRegistry, embeddings_table
from ray_apps.serve.front import apply_serve_env
from streamrec import aws
from streamrec.devstack.process import free_port
from streamrec.devstack.provision import provision_region
from streamrec.devstack.redis_server import RedisLauncher
from streamrec.devstack.service import ServiceHandle
from streamrec.events import canonical_json
from streamrec.online_store import recs_item
from streamrec.settings import Settings, load_settings

pytestmark = pytest.mark.integration
REGION = "eu-west-1"
CLUSTERS, PER_CLUSTER = 6, 30
CONFIG = TwoTowerConfig(
    id_buckets=8192, category_buckets=64, embedding_dim=32, feature_dim=8, item_hidden=(64,), user_hidden=(64,),
    output_dim=32, history_length=20, temperature=0.1, dropout=0.0, seed=5,
)
ITEMS = [f"item-{c:03d}-{i:02d}" for c in range(CLUSTERS) for i in range(PER_CLUSTER)]
API_KEY = "test-key-" + uuid.uuid4().hex
KEY = {"X-API-Key": API_KEY}  # the /v1 routes need it: the module's settings configure one key


def cluster(item: str) -> int:
    return int(item.split("-")[1])


def train_planted(seed: int) -> TwoTowerModel:
    """Users click inside one cluster: after a few hundred steps the user tower maps a history onto
    its cluster's items (seconds on one core)."""
    rng = np.random.default_rng(seed)
    rows = 6000
    clusters = rng.integers(CLUSTERS, size=rows)
    pick = lambda c: f"item-{c:03d}-{int(rng.integers(PER_CLUSTER)):02d}"  # noqa: E731
    table = examples_table({
        "user_id": [f"u{i}" for i in range(rows)],
        "history": [[pick(c) for _ in range(5)] for c in clusters],
        "item_id": [pick(c) for c in clusters], "category": [f"cat-{c}" for c in clusters],
        "event_type": ["click"] * rows, "device": ["mobile"] * rows, "hour": [12] * rows,
        "region": [REGION] * rows, "item_pop_rank": [1] * rows,
    })
    config = CONFIG.model_copy(update={"seed": seed})
    hashed = encode_items(table["item_id"], table["category"], None, config=config)["item_id"]
    data = as_tensors(encode_examples(table, config, item_counts(hashed, config.id_buckets)))
    torch.manual_seed(seed)
    model = TwoTowerModel(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        index = torch.randint(0, rows, (256,))
        loss = model({k: v[index] for k, v in data.items()})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def publish(registry: ModelRegistry, model: TwoTowerModel, day: date) -> str:
    batch = encode_items(ITEMS, [f"cat-{cluster(i)}" for i in ITEMS], None, config=model.config)
    with torch.no_grad():
        vectors = model.item_embeddings(as_tensors(batch)).numpy()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    version = registry.publish(
        None, user_tower=buf.getvalue(), config=model.config.model_dump(mode="json"),
        item_embeddings=embeddings_table(ITEMS, vectors), index=build_index(ITEMS, vectors, kind="exact"),
        data_window=(day - timedelta(days=13), day), metrics={}, gate={"passed": True}, code_version="git:test")
    return version.version


@dataclass
class World:
    settings: Settings
    config: Path
    registry: ModelRegistry
    v1: str
    v2: str
    url: str
    redis_url: str
    redis_handle: ServiceHandle
    redis_launcher: RedisLauncher
    redis_dir: Path
    dynamodb: Any

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def put_recs(self, user: str, items: list[str], version: str | None = None,
                 generated_at: datetime | None = None) -> None:
        self.dynamodb.put_item(TableName=self.settings.region(REGION).tables.recs, Item=recs_item(
            user, version or self.v1, items, [1.0 - i / 100 for i in range(len(items))], "model",
            generated_at or datetime.now(UTC)))

    def click(self, user: str, item: str, at: datetime | None = None) -> None:
        """A click as the consumer records it (its Redis last-N sorted set); see the freshness test for
        the whole path through Kinesis and the consumer."""
        self.redis().zadd(f"ur:{REGION}:{user}", {item: int((at or datetime.now(UTC)).timestamp() * 1000)})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, moto_server: ServiceHandle) -> Iterator[World]:
    import ray
    from ray import serve

    from ray_apps.serve.app import build_app

    tmp = tmp_path_factory.mktemp("serve")
    launcher = RedisLauncher()  # our own redis-server: one test stops it
    redis_handle = launcher.start(tmp / "redis")
    redis_url = f"{redis_handle.url}/0"
    suffix = uuid.uuid4().hex[:6]
    lake = tmp / "lake"
    port = free_port()
    document = {
        "environment": "local",
        "aws": {"endpoint_url": moto_server.url, "access_key_id": "testing", "secret_access_key": "testing"},
        "regions": {REGION: {
            "stream_name": f"clicks-{suffix}", "shard_count": 1, "lake_uri": f"file://{lake}",
            "tables": {"leases": f"leases-{suffix}", "recs": f"recs-{suffix}", "features": f"features-{suffix}"},
            "redis_url": redis_url,
        }},
        "ingest": FAST_INGEST,
        # Budgets far above the defaults: these tests check which source answers, and a loaded CI box
        # must not turn a slow moto read into a fallback (latency is benchmarks/serve.py's business).
        "serve": {"port": port, "registry_poll_s": 0.5, "popular_refresh_s": 1, "breaker_reset_s": 1,
                  "deadline_ms": 3000, "cache_timeout_ms": 1000, "batch_timeout_ms": 1000,
                  "realtime_timeout_ms": 1500, "api_keys": ["another-key", API_KEY],
                  "ingress": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0},
                  "retriever": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0}},
    }
    config = tmp / "streamrec.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    settings = load_settings(config)
    provision_region(settings, REGION)
    dynamodb = aws.client("dynamodb", REGION, settings.aws)
    dynamodb.put_item(TableName=settings.region(REGION).tables.features, Item={
        "pk": {"S": "popular"}, "sk": {"S": f"top{settings.etl.popular_top_k}"},
        "item_ids": {"L": [{"S": i} for i in ITEMS[:50]]}, "scores": {"L": [{"N": str(50 - i)} for i in range(50)]},
        "dt": {"S": "2026-11-25"}})
    registry = ModelRegistry(f"file://{lake}", REGION)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    v1 = publish(registry, train_planted(1), date(2026, 11, 24))
    v2 = publish(registry, train_planted(2), date(2026, 11, 25))
    registry.promote(v1, {"reason": "test"})

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # The production front end (serve.http_front, default haproxy), as ensure_ray sets it for a local cluster.
    front_env = apply_serve_env(settings.serve.http_front, os.environ)
    temp = Path(tempfile.gettempdir()) / f"sr-serve-{uuid.uuid4().hex[:6]}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=bool(os.environ.get("SR_DEBUG")), logging_level="warning",
             object_store_memory=150 * 1024 * 1024, _temp_dir=str(temp))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, REGION), name="streamrec", route_prefix="/")
        w = World(settings, config, registry, v1, v2, f"http://127.0.0.1:{port}", redis_url, redis_handle,
                  launcher, tmp / "redis", dynamodb)
        wait_ready(w)
        yield w
    finally:
        serve.shutdown()
        ray.shutdown()
        for key in front_env:
            os.environ.pop(key, None)
        shutil.rmtree(temp, ignore_errors=True)
        launcher.stop(w.redis_handle if 'w' in locals() else redis_handle)
        launcher.purge(redis_handle)
        torch.set_num_threads(torch_threads)


def wait_ready(w: World, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{w.url}/readyz", timeout=5)
            last = r.json()
            if r.status_code == 200:
                return last
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"the app did not become ready: {last}")


def get(w: World, user: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{w.url}/v1/users/{user}/recommendations", params=params, timeout=10, headers=KEY)


def recs(w: World, user: str, **params: Any) -> dict[str, Any]:
    r = get(w, user, **params)
    assert r.status_code == 200, r.text
    return r.json()


def items(body: dict[str, Any]) -> list[str]:
    return [i["item_id"] for i in body["items"]]


# ------------------------------------------------------------------------------------ the chain


def test_unknown_user_gets_the_popularity_list(world: World) -> None:
    body = recs(world, "nobody-at-all", k=10)
    assert body["source"] == "popular"
    assert items(body) == ITEMS[:10]  # the ETL list (no live counts yet: this test runs first)


def test_batch_then_cache(world: World) -> None:
    mine = ITEMS[100:130]
    world.put_recs("u-batch", mine)
    first = recs(world, "u-batch", k=5)
    assert (first["source"], items(first), first["model_version"]) == ("batch", mine[:5], world.v1)
    second = recs(world, "u-batch", k=5)
    assert second["source"] == "cache" and items(second) == mine[:5]
    assert world.redis().exists(f"recs:{REGION}:{world.v1}:u-batch")


def test_a_click_after_the_batch_switches_to_realtime_excluding_it(world: World) -> None:
    world.put_recs("u-rt", ITEMS[:30], generated_at=datetime.now(UTC) - timedelta(hours=1))
    assert recs(world, "u-rt")["source"] == "batch"
    clicked = ["item-004-03", "item-004-07", "item-004-11"]
    for n, item in enumerate(clicked):
        world.click("u-rt", item, datetime.now(UTC) - timedelta(seconds=3 - n))
    body = recs(world, "u-rt", k=10)
    assert body["source"] == "realtime"
    assert not set(items(body)) & set(clicked)
    assert sum(cluster(i) == 4 for i in items(body)) >= 7, items(body)
    # Without exclusions the answer is cached and served again until the next click.
    assert recs(world, "u-rt", k=10)["source"] == "cache"


def test_freshness_through_kinesis_and_the_consumer(world: World, tmp_path: Path) -> None:
    user = "u-fresh"
    world.put_recs(user, ITEMS[:30], generated_at=datetime.now(UTC) - timedelta(minutes=5))
    assert recs(world, user)["source"] == "batch"
    kinesis = aws.client("kinesis", REGION, world.settings.aws)
    clicked = "item-002-05"
    e = event(user, clicked, datetime.now(UTC) - timedelta(seconds=1), "click")
    kinesis.put_record(StreamName=world.settings.region(REGION).stream_name, Data=canonical_json(e),
                       PartitionKey=user)
    started = time.monotonic()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        subprocess.run([sys.executable, "-m", "streamrec", "ingest", "run", "--region", REGION,
                        "--config", str(world.config), "--until-drained"], stdout=out, stderr=subprocess.STDOUT,
                       check=True, timeout=120)
    body = recs(world, user, k=10)
    assert body["source"] == "realtime", log.read_text()[-2000:]
    assert clicked not in items(body)
    assert sum(cluster(i) == 2 for i in items(body)) >= 7, items(body)
    assert time.monotonic() - started < 60


def test_batch_endpoint(world: World) -> None:
    world.put_recs("u-b1", ITEMS[60:90])
    r = httpx.post(f"{world.url}/v1/recommendations:batch",
                   json={"user_ids": ["u-b1", "nobody-2"], "k": 3}, timeout=10, headers=KEY)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["user_id"] for x in results] == ["u-b1", "nobody-2"]
    assert [x["source"] for x in results] == ["batch", "popular"]
    assert items(results[0]) == ITEMS[60:63]


def test_similar_items(world: World) -> None:
    r = httpx.get(f"{world.url}/v1/items/item-003-01/similar", params={"k": 10}, timeout=10, headers=KEY)
    assert r.status_code == 200, r.text
    got = items(r.json())
    assert len(got) == 10 and "item-003-01" not in got
    assert sum(cluster(i) == 3 for i in got) >= 7, got
    missing = httpx.get(f"{world.url}/v1/items/no-such-item/similar", timeout=10, headers=KEY)
    assert missing.status_code == 404 and "no-such-item" in missing.json()["detail"]


def test_the_v1_routes_need_a_configured_api_key(world: World) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        for method, path in (("GET", "/v1/users/u1/recommendations"), ("GET", "/v1/items/item-000-01/similar"),
                             ("POST", "/v1/recommendations:batch")):
            r = httpx.request(method, f"{world.url}{path}", headers=headers, timeout=10,
                              json={"user_ids": ["u1"]} if method == "POST" else None)
            assert r.status_code == 401 and "X-API-Key" in r.json()["detail"], (method, path, r.text)
    assert httpx.get(f"{world.url}/v1/users/u1/recommendations", headers={"X-API-Key": "another-key"},
                     timeout=10).status_code == 200
    assert httpx.get(f"{world.url}/healthz").status_code == 200  # probes need no key


BAD_REQUESTS = {
    "k too large": ("GET", "/v1/users/u1/recommendations?k=201", None, 422, "k"),
    "k zero": ("GET", "/v1/users/u1/recommendations?k=0", None, 422, "k"),
    "k not a number": ("GET", "/v1/users/u1/recommendations?k=ten", None, 422, "k"),
    "overlong user id": ("GET", f"/v1/users/{'u' * 129}/recommendations", None, 422, "user_id"),
    "control character": ("GET", "/v1/users/u%0A1/recommendations", None, 422, "user_id"),
    "space in the id": ("GET", "/v1/users/u%201/recommendations", None, 422, "user_id"),
    "bad item id": ("GET", "/v1/items/%00/similar", None, 422, "item_id"),
    "exclude_seen not a bool": ("GET", "/v1/users/u1/recommendations?exclude_seen=maybe", None, 422,
                                "exclude_seen"),
    "body not JSON": ("POST", "/v1/recommendations:batch", b"{not json", 422, "JSON"),
    "empty user list": ("POST", "/v1/recommendations:batch", b'{"user_ids": []}', 422, "user_ids"),
    "too many users": ("POST", "/v1/recommendations:batch",
                       ('{"user_ids": [%s]}' % ",".join(f'"u{i}"' for i in range(101))).encode(), 422,
                       "user_ids"),
    "unknown field": ("POST", "/v1/recommendations:batch", b'{"user_ids": ["a"], "kk": 1}', 422, "kk"),
    "wrong type": ("POST", "/v1/recommendations:batch", b'{"user_ids": "a"}', 422, "user_ids"),
    "unknown route": ("GET", "/v2/anything", None, 404, ""),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_4xx_with_a_message(world: World, case: str) -> None:
    method, path, body, status, mentions = BAD_REQUESTS[case]
    r = httpx.request(method, f"{world.url}{path}", content=body, timeout=10,
                      headers={**KEY, **({"content-type": "application/json"} if body is not None else {})})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and mentions in detail, detail


def test_health_metrics_and_openapi(world: World) -> None:
    assert httpx.get(f"{world.url}/healthz").json() == {"status": "ok"}
    ready = wait_ready(world)
    assert ready["ready"] and set(ready["checks"]) == {"model", "redis", "dynamodb", "popular"}
    recs(world, "nobody-metrics")
    text = httpx.get(f"{world.url}/metrics").text
    for name in ("streamrec_serve_requests_total", "streamrec_serve_request_latency_seconds_bucket",
                 "streamrec_serve_cache_lookups_total", "streamrec_serve_fallbacks_total"):
        assert name in text
    spec = httpx.get(f"{world.url}/openapi.json").json()
    assert {"/v1/users/{user_id}/recommendations", "/v1/recommendations:batch",
            "/v1/items/{item_id}/similar", "/healthz", "/readyz"} <= set(spec["paths"])
    route = spec["paths"]["/v1/users/{user_id}/recommendations"]["get"]
    assert {"200", "422"} <= set(route["responses"])


def test_the_serve_port_is_haproxy_in_front_of_the_ingress_replicas(world: World) -> None:
    """serve.http_front's default: an HAProxy (not Serve's Python proxy actor) binds the Serve port and
    forwards to the Ingress replica's own HTTP server."""
    assert world.settings.serve.http_front == "haproxy"
    port = world.url.rsplit(":", 1)[1]
    configs = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "haproxy":
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                configs.append(Path(argv[argv.index(b"-f") + 1].decode()).read_text())
        except (OSError, ValueError):
            continue  # a process that ended meanwhile, or another HAProxy's
    assert any(f":{port}" in cfg and "bind" in cfg for cfg in configs), configs
    assert recs(world, "nobody-front")["source"] == "popular"


# ------------------------------------------------------------------------------ failures, hot swap


def test_redis_down_falls_back_without_5xx(world: World) -> None:
    world.put_recs("u-nored", ITEMS[150:180])
    world.redis_launcher.stop(world.redis_handle)
    try:
        statuses, sources = [], []
        for _ in range(8):
            r = get(world, "u-nored", k=5)
            statuses.append(r.status_code)
            sources.append(r.json().get("source"))
        assert statuses == [200] * 8
        assert set(sources) == {"batch"}
        body = recs(world, "nobody-nored", k=5)
        assert body["source"] == "popular" and len(body["items"]) == 5
        metrics = httpx.get(f"{world.url}/metrics").text
        assert 'streamrec_serve_fallbacks_total{reason="circuit_open",step="cache"}' in metrics
    finally:  # the same port, so the app's connections find it again
        world.redis_handle = world.redis_launcher.start(world.redis_dir, port=world.redis_handle.port)
    # Once the breaker lets a trial through, answers are cached again.
    deadline = time.monotonic() + 30
    while recs(world, "u-nored", k=5)["source"] != "cache":
        assert time.monotonic() < deadline, "the cache never came back after redis-server restarted"
        time.sleep(0.3)


def test_hot_swap_under_load_drops_nothing(world: World) -> None:
    for u in range(20):
        world.click(f"u-swap-{u}", f"item-{u % CLUSTERS:03d}-01")

    async def load(stop: asyncio.Event) -> tuple[list[int], list[str]]:
        statuses: list[int] = []
        versions: list[str] = []
        async with httpx.AsyncClient(base_url=world.url, timeout=10, headers=KEY) as client:
            async def one_client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    user = f"u-swap-{(n * 7 + i) % 20}"
                    # a new click each time keeps the request on the real-time path (the model)
                    world.click(user, f"item-{(n + i) % CLUSTERS:03d}-{i % PER_CLUSTER:02d}")
                    r = await client.get(f"/v1/users/{user}/recommendations", params={"k": 5})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.append(r.json()["model_version"])
                    i += 1
            await asyncio.gather(*[one_client(n) for n in range(4)])
        return statuses, versions

    async def scenario() -> tuple[list[int], list[str]]:
        stop = asyncio.Event()
        task = asyncio.ensure_future(load(stop))
        await asyncio.sleep(1.0)
        world.registry.promote(world.v2, {"reason": "hot swap test"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=world.url, timeout=10) as client:
                r = await client.get("/readyz")
            if r.json().get("model_version") == world.v2:
                break
        await asyncio.sleep(1.5)
        stop.set()
        return await task

    statuses, versions = asyncio.run(scenario())
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert versions[0] == world.v1 and versions[-1] == world.v2
    switched = versions.index(world.v2)
    assert set(versions[switched:]) == {world.v2}  # once swapped, never back


def test_cli_refuses_an_unconfigured_region_in_one_line(world: World) -> None:
    import typer
    from typer.testing import CliRunner

    from streamrec.cli import serve as serve_cli
    from streamrec.cli.common import UserError

    app = typer.Typer()  # registered the way streamrec.cli registers it: `streamrec serve run`
    app.add_typer(serve_cli.app, name="serve")
    result = CliRunner().invoke(app, ["serve", "run", "--region", "us-west-2", "--config", str(world.config)])
    assert isinstance(result.exception, UserError), result.output
    assert "--region us-west-2: not configured" in str(result.exception) and "\n" not in str(result.exception)


# ------------------------------------------------------------------------------ fuzzing the OpenAPI


def test_fuzzed_requests_never_get_a_5xx(world: World) -> None:
    """Every operation of the served OpenAPI document with schemathesis-generated inputs, valid and
    invalid: the answer is never a server error (a 503 from /readyz excepted: that is its contract)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{world.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call(base_url=world.url, timeout=10, headers=KEY)
                allowed = (503,) if case.path == "/readyz" else ()
                if response.status_code >= 500 and response.status_code not in allowed:
                    failures.append(f"{case.method} {case.formatted_path} {case.query} {case.body!r}: "
                                    f"{response.status_code} {response.text[:200]}")

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body): /healthz, /metrics
                assert mode is GenerationMode.NEGATIVE
    assert operations >= 6
    assert not failures, failures[:5]


def test_batched_realtime_queries_answer_as_one_at_a_time(world: World) -> None:
    """Serve hands the Retriever concurrent real-time requests as one batch (one user-tower pass, one
    index search, k = the largest asked): each user's answer is the one it gets alone."""
    from ray_apps.serve.chain import RealtimeQuery
    from ray_apps.serve.retriever import Retriever

    core = Retriever(world.registry, REGION)
    assert core.activate(world.v1)
    queries = [
        RealtimeQuery([ITEMS[0], ITEMS[1]], 10, [ITEMS[1]], 12),
        RealtimeQuery([ITEMS[40]], 3, [], None),
        RealtimeQuery([], 7, [ITEMS[5]], 23),  # no history: context only
        RealtimeQuery([ITEMS[i] for i in range(0, 60, 3)], 25, [ITEMS[3], ITEMS[6]], 0),
    ]
    together = core.recommend_many(queries)
    for query, (ids, scores, version) in zip(queries, together):
        alone = core.recommend(query.history, query.k, query.exclude, query.hour)
        assert ids == alone[0] and version == alone[2] == world.v1
        assert np.allclose(scores, alone[1], atol=1e-5)
        assert len(ids) == query.k and not set(ids) & set(query.exclude)
