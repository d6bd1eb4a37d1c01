"""The demo's online part: Ray Serve up for every region, and three requests per region that show the
request path: a known user (batch recommendations, pre-warmed into the cache at promotion), a cold
user (the regional popularity list) and a user who has just clicked (the click goes through Kinesis
and the consumer into Redis; the answer is computed in real time from it)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 180.0
COLD_USER = "first-time-visitor"


class OnlineDemoError(RuntimeError):
    """Serving did not come up or answered wrongly; the message says which region and what."""


@dataclass(frozen=True)
class ServedAnswer:
    region: str
    case: str
    user_id: str
    source: str
    model_version: str | None
    item_ids: tuple[str, ...]
    milliseconds: float


def click_record(region: str, user_id: str, item_id: str) -> Any:  # GeneratedRecord
    """A well-formed click event, stamped now, as a producer would put it on the stream."""
    from streamrec.clickstream.records import GeneratedRecord
    from streamrec.events import ClickEvent, encode_event, format_ts

    event = ClickEvent(event_id=str(uuid.uuid4()), user_id=user_id, session_id=f"demo-{user_id}",
                       item_id=item_id, event_type="click", ts=format_ts(datetime.now(UTC)), region=region)
    return GeneratedRecord(region, user_id, encode_event(event), "valid")


def _get(http: Any, url: str) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    response = http.get(url)
    ms = (time.perf_counter() - t0) * 1000
    if response.status_code != 200:
        raise OnlineDemoError(f"GET {url} answered {response.status_code}: {response.text[:200]}")
    return response.json(), ms


def _wait_ready(http: Any, base: str, region: str, with_model: bool) -> None:
    """Until /readyz says ready; for a region with no promoted model (the gate refused it), until every
    check but the model's passes: such a region serves its popularity list, and says so."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        try:
            response = http.get(f"{base}/readyz")
            if response.status_code == 200:
                return
            checks = response.json().get("checks", {}) if response.status_code == 503 else {}
            if not with_model and checks and all(v.startswith("ok") for k, v in checks.items() if k != "model"):
                return
            last = response.text[:200]
        except Exception as exc:  # the proxy is not up yet
            last = repr(exc)
        time.sleep(0.5)
    raise OnlineDemoError(f"Serve for {region} was not ready with a model in {READY_TIMEOUT_S:.0f} s: {last}")


def show_online(settings: Any, config_path: Path, regions: tuple[str, ...], known_users: dict[str, list[str]],
                promoted: dict[str, bool], state_dir: Path, consume: Callable[[Path, str, int, Path], Any],
                say: Callable[[str], None]) -> list[ServedAnswer]:
    """Start Serve with one application per region (route prefix ``/<region>``), ask the three
    questions per region, and shut Serve down. ``known_users``: users with batch recommendations,
    most active first; ``promoted``: whether the region has a model to serve; ``consume`` runs the
    region's consumer until its stream is drained."""
    import httpx
    from ray import serve

    from ray_apps.runtime import ensure_ray
    from ray_apps.serve.app import build_app
    from streamrec.aws import client
    from streamrec.clickstream.publish import KinesisPublisher
    from streamrec.devstack.process import free_port

    ensure_ray(settings)
    # The demo reports Serve's progress itself; Serve's INFO lines in the driver would interleave with it.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    port = free_port()
    answers: list[ServedAnswer] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for region in regions:
            serve.run(build_app(settings, region), name=f"streamrec-{region}", route_prefix=f"/{region}",
                      blocking=False)
        with httpx.Client(timeout=30) as http:
            for region in regions:
                base = f"http://127.0.0.1:{port}/{region}"
                _wait_ready(http, base, region, promoted[region])
                say(f"  serve  {region}: ready at {base} ")
                known, clicker = known_users[region][0], known_users[region][1]
                for case, user in (("known user", known), ("cold user", COLD_USER)):
                    body, ms = _get(http, f"{base}/v1/users/{user}/recommendations?k=5")
                    answers.append(_answer(region, case, body, ms))
                # The click travels the production path: Kinesis → consumer → Redis last-N.
                before, _ = _get(http, f"{base}/v1/users/{clicker}/recommendations?k=5")
                item = before["items"][0]["item_id"]
                rs = settings.region(region)
                KinesisPublisher(client("kinesis", region, settings.aws), rs.stream_name).put(
                    [click_record(region, clicker, item)])
                consume(config_path, region, 1, state_dir / "ingest-online")
                body, ms = _get(http, f"{base}/v1/users/{clicker}/recommendations?k=5")
                answers.append(_answer(region, f"clicked {item}", body, ms))
    finally:
        serve.shutdown()
    return answers


def _answer(region: str, case: str, body: dict[str, Any], ms: float) -> ServedAnswer:
    return ServedAnswer(region, case, body["user_id"], body["source"], body.get("model_version"),
                        tuple(i["item_id"] for i in body["items"]), ms)


__all__ = ["COLD_USER", "OnlineDemoError", "ServedAnswer", "click_record", "show_online"]
