"""The Ray Serve application: an HTTP ingress (FastAPI) and a retriever (model + ANN index), two
deployments that scale on their own.

::

    client ─HTTP─▶ Ingress (FastAPI; cache, DynamoDB, popularity; many light replicas)
                      └─handle─▶ Retriever (user tower + ANN index; fewer, heavier replicas)

Entry points: :func:`build` is the Serve application builder the RayService names
(``import_path: ray_apps.serve.app:build``, ``args: {region: ..., config: ...}``); ``streamrec serve run``
calls :func:`build_app` on a local Ray. The retriever follows the registry's promoted pointer (polled
every ``serve.registry_poll_s``) unless ``user_config`` pins a version (``{"model_version": "..."}``);
the ingress learns the active version from the retriever, so the version in a cache key or a DynamoDB
lookup is always one the retriever has loaded.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures of a Serve ingress
# class at runtime, and string annotations would not resolve in the replica.

import asyncio
import hmac
import logging
import threading
import time
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_apps.serve.answers import Answer
from ray_apps.serve.chain import RealtimeQuery, Recommender
from ray_apps.serve.metrics import ServeMetrics
from ray_apps.serve.schemas import (
    DEFAULT_K, MAX_K, BatchRequest, BatchResponse, ErrorBody, Health, Id, Readiness, Recommendations,
    ScoredItem, SimilarItems,
)
from streamrec.settings import Settings

logger = logging.getLogger(__name__)
API_KEY_HEADER = "X-API-Key"
VERSION_POLL_S = 1.0
_UNAUTHORISED = {401: {"model": ErrorBody, "description": "missing or wrong API key (when keys are configured)"}}
_INVALID = {422: {"model": ErrorBody, "description": "invalid id, k or body; the message says which"}}

api = FastAPI(
    title="streamrec recommendations",
    version="1",
    description="Top-K recommendations per user, from the precomputed batch, real-time personalisation "
                "on recent clicks, or regional popularity. Every answer says which source served it.",
)


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line per problem (FastAPI's default is a nested list)."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body" or len(error.get("loc", ())) == 1)
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return JSONResponse(status_code=422, content={"detail": "; ".join(parts) or "invalid request"})


def _answer(user_id: str, answer: Answer) -> Recommendations:
    return Recommendations(
        user_id=user_id, items=[ScoredItem(item_id=i, score=s) for i, s in zip(answer.item_ids, answer.scores)],
        model_version=answer.model_version, source=answer.source, generated_at=answer.generated_at)


@serve.deployment(name="Retriever", health_check_period_s=10, health_check_timeout_s=30)
class RetrieverDeployment:
    """Holds one model version at a time (see :mod:`ray_apps.serve.retriever`) and follows promotions."""

    def __init__(self, settings: Settings, region: str) -> None:
        from ray_apps.registry import ModelRegistry
        from ray_apps.serve.retriever import Retriever

        self.settings = settings
        self.core = Retriever(ModelRegistry.from_settings(settings, region), region)
        self._recommend_batch.set_max_batch_size(settings.serve.realtime_batch_size)
        self._recommend_batch.set_batch_wait_timeout_s(settings.serve.realtime_batch_wait_ms / 1000)
        self.pinned: str | None = None
        self._poll_error: str | None = None
        self._refresh()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="registry-poll", daemon=True)
        self._poller.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"model_version": V}`` pins V (a rollback without touching the registry); an empty config
        follows the promoted pointer again."""
        self.pinned = (user_config or {}).get("model_version") or None
        self._refresh()

    def _refresh(self) -> None:
        try:
            if self.pinned:
                self.core.activate(self.pinned)
            else:
                self.core.refresh()
            self._poll_error = None
        except Exception as exc:  # keep serving the active version; readiness reports the problem
            self._poll_error = f"{type(exc).__name__}: {exc}"
            logger.warning("model refresh failed: %s", self._poll_error)

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.serve.registry_poll_s):
            self._refresh()

    def check_health(self) -> None:
        if not self._poller.is_alive():
            raise RuntimeError("the registry poller stopped")

    def status(self) -> dict[str, Any]:
        return {"model_version": self.core.version, "error": self._poll_error}

    async def recommend(self, history: list[str], k: int, exclude: list[str],
                        hour: int | None) -> tuple[list[str], list[float], str]:
        return await self._recommend_batch(RealtimeQuery(history, k, exclude, hour))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)  # sizes from settings, set in __init__
    async def _recommend_batch(self, queries: list[RealtimeQuery]) -> list[tuple[list[str], list[float], str]]:
        # Concurrent real-time requests share one user-tower pass and one index search: under load a
        # replica answers a queue of N users in about the time of one, instead of N in turn.
        return self.core.recommend_many(queries)

    def similar(self, item_id: str, k: int) -> tuple[list[str], list[float], str] | None:
        try:
            return self.core.similar(item_id, k)
        except KeyError:
            return None


class _RetrieverClient:
    """The chain's Retrieval protocol over a deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def recommend(self, history: list[str], k: int, exclude: list[str],
                        hour: int | None) -> tuple[list[str], list[float], str]:
        return await self.handle.recommend.remote(history, k, exclude, hour)


@serve.deployment(name="Ingress", health_check_period_s=10)
@serve.ingress(api)
class Ingress:
    def __init__(self, retriever: DeploymentHandle, settings: Settings, region: str) -> None:
        from streamrec import aws
        from ray_apps.serve.sources import DynamoBatchStore, PopularList, RedisOnline

        region_settings = settings.region(region)
        s = settings.serve
        self.settings = settings
        self.region = region
        self.retriever = retriever
        self.metrics = ServeMetrics()
        self.api_keys = [k.get_secret_value().encode() for k in s.api_keys]
        dynamodb = aws.client("dynamodb", region, settings.aws, max_attempts=2, read_timeout=1,
                              max_pool_connections=32)
        self.redis = RedisOnline(region_settings.redis_url, region)
        self.batch = DynamoBatchStore(dynamodb, region_settings.tables.recs)
        self.popular = PopularList(region=region, redis_url=region_settings.redis_url, dynamodb=dynamodb,
                                   features_table=region_settings.tables.features, top_k=settings.etl.popular_top_k,
                                   size=s.popular_size, refresh_s=s.popular_refresh_s)
        self.popular.start()
        self.recommender = Recommender(region, s, self.redis, self.batch, _RetrieverClient(retriever),
                                       self.popular, self.metrics)
        self.model_version: str | None = None
        self._retriever_error: str | None = "not asked yet"
        self._version_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ plumbing

    async def _ensure_version_poll(self) -> None:
        if self._version_task is None:
            await self._poll_version_once()
            self._version_task = asyncio.ensure_future(self._poll_version())

    async def _poll_version_once(self) -> None:
        try:
            status = await asyncio.wait_for(self.retriever.status.remote(), 5)
            self.model_version, self._retriever_error = status["model_version"], status["error"]
        except Exception as exc:
            self._retriever_error = f"{type(exc).__name__}: {exc}"

    async def _poll_version(self) -> None:
        while True:
            await asyncio.sleep(VERSION_POLL_S)
            await self._poll_version_once()

    def _refusal(self, request: Request, route: str, started: float) -> JSONResponse | None:
        """A 401 when API keys are configured and the request carries none of them, else None."""
        if not self.api_keys:
            return None
        given = request.headers.get(API_KEY_HEADER, "").encode()
        if any(hmac.compare_digest(given, key) for key in self.api_keys):
            return None
        self._observe(route, "-", 401, started)
        return JSONResponse(status_code=401, content={"detail": f"missing or wrong {API_KEY_HEADER}"})

    def _observe(self, route: str, source: str, status: int, started: float) -> None:
        self.metrics.requests.labels(route, source, str(status)).inc()
        self.metrics.latency.labels(route, source).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------------------ routes

    @api.get("/v1/users/{user_id}/recommendations", response_model=Recommendations,
             responses={**_UNAUTHORISED, **_INVALID})
    async def recommendations(
        self, request: Request,
        user_id: Annotated[Id, Path(description="the user's id as in the clickstream")],
        k: Annotated[int, Query(ge=1, le=MAX_K, description="how many items")] = DEFAULT_K,
        exclude_seen: Annotated[bool, Query(description="leave out the items of the user's recent clicks")] = True,
    ) -> Any:
        started = time.perf_counter()
        if (refused := self._refusal(request, "user", started)) is not None:
            return refused
        await self._ensure_version_poll()
        answer = await self.recommender.recommend(user_id, k, exclude_seen, self.model_version)
        self._observe("user", answer.source, 200, started)
        return _answer(user_id, answer)

    @api.post("/v1/recommendations:batch", response_model=BatchResponse, responses={**_UNAUTHORISED, **_INVALID})
    async def batch_recommendations(self, request: Request, body: BatchRequest) -> Any:
        started = time.perf_counter()
        if (refused := self._refusal(request, "batch", started)) is not None:
            return refused
        await self._ensure_version_poll()
        answers = await asyncio.gather(*[
            self.recommender.recommend(u, body.k, body.exclude_seen, self.model_version) for u in body.user_ids])
        self._observe("batch", "mixed", 200, started)
        return BatchResponse(results=[_answer(u, a) for u, a in zip(body.user_ids, answers)])

    @api.get("/v1/items/{item_id}/similar", response_model=SimilarItems,
             responses={**_UNAUTHORISED, **_INVALID,
                        404: {"model": ErrorBody, "description": "the model does not know the item"},
                        503: {"model": ErrorBody, "description": "no model loaded yet"}})
    async def similar(
        self, request: Request,
        item_id: Annotated[Id, Path(description="the item's id as in the clickstream")],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = DEFAULT_K,
    ) -> Any:
        started = time.perf_counter()
        if (refused := self._refusal(request, "similar", started)) is not None:
            return refused
        try:
            got = await asyncio.wait_for(self.retriever.similar.remote(item_id, k),
                                         self.settings.serve.realtime_timeout_ms / 1000 * 4)
        except Exception as exc:  # no model yet, or the retriever is down: nothing else can answer this
            self._observe("similar", "-", 503, started)
            return JSONResponse(status_code=503, content={"detail": f"similar items unavailable: "
                                                                    f"{type(exc).__name__}"})
        if got is None:
            self._observe("similar", "-", 404, started)
            return JSONResponse(status_code=404, content={"detail": f"item {item_id!r} is not in the model's "
                                                                    "catalogue"})
        ids, scores, version = got
        self._observe("similar", "model", 200, started)
        return SimilarItems(item_id=item_id, items=[ScoredItem(item_id=i, score=s) for i, s in zip(ids, scores)],
                            model_version=version)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(self) -> Any:
        if self._version_task is None:
            await self._ensure_version_poll()  # polls once and starts the loop
        else:
            await self._poll_version_once()  # readiness reports the retriever's state now
        checks: dict[str, str] = {}
        checks["model"] = f"ok ({self.model_version})" if self.model_version else \
            f"no model loaded: {self._retriever_error or 'none promoted'}"
        for name, probe in (("redis", self.redis.ping), ("dynamodb", self.batch.ping)):
            try:
                await asyncio.wait_for(probe(), 1.0)
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"{type(exc).__name__}: {exc}"[:200]
        checks["popular"] = f"ok ({len(self.popular.items()[0])} items from {self.popular.source})"
        ready = all(v.startswith("ok") for v in checks.values())
        body = Readiness(ready=ready, model_version=self.model_version, checks=checks)
        return body if ready else JSONResponse(status_code=503, content=body.model_dump())

    @api.get("/metrics", response_class=Response)
    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def build_app(settings: Settings, region: str) -> Any:
    """The bound Serve application for one region, scaled per ``settings.serve``."""
    settings.region(region)  # fail now, naming the key, not inside a replica
    s = settings.serve

    def options(scaling: Any) -> dict[str, Any]:
        return {
            "autoscaling_config": {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                                   "target_ongoing_requests": scaling.target_ongoing_requests},
            "max_ongoing_requests": scaling.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": scaling.num_cpus},
        }

    retriever = RetrieverDeployment.options(**options(s.retriever)).bind(settings, region)
    return Ingress.options(**options(s.ingress)).bind(retriever, settings, region)


def build(args: dict[str, Any]) -> Any:
    """Serve application builder for the RayService: ``args = {"region": R, "config": path-or-null}``;
    the rest of the settings come from the environment (``STREAMREC_*``), as in every other pod."""
    from streamrec.settings import load_settings

    region = args.get("region")
    if not region:
        raise ValueError("args.region: the region this application serves is required")
    return build_app(load_settings(args.get("config")), str(region))


