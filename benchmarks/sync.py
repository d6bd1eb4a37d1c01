"""DynamoDB sync throughput (moto) against a plain sequential BatchWriteItem loop, in the same run.

Set-up (not timed): our own moto server (``streamrec.devstack`` launcher, a process of its own on the
same cores), the region provisioned, ``--items`` synthetic users' recommendations (``--top-k`` items
each, the scoring default 100) written as scoring writes them (``recs/region=R/dt=D/model_version=V/``,
``--files`` part files and ``_run_summary.json``), and the same rows turned into recs-table items.
Every run writes into a table of its own, created just before it (same starting state for all).

Runs, each ``--repeats`` times, in alternating order; the best of each is kept:

- **baseline**: one thread, a plain loop of ``batch_write_item`` calls of 25 of the prebuilt items,
  unprocessed items re-sent at once, no limiter, no backoff, on a client as the factory makes it;
- **sequential, sync client**: the same loop on the sync's client (:func:`sync_client`: no botocore
  parameter validation), to separate that setting's share of the gain from the threads';
- **writer**: the same items through :func:`operators.sync.dynamodb.write_items` (``--workers``
  threads, batches of 25, the sync's backoff; rate limit off);
- **sync_recs**: :func:`operators.sync.dynamodb.sync_recs` end to end (Parquet read, item building,
  checkpoints, the version marker; rate limit off);
- **throttled**: the writer with ``--throttle-share`` of the items of every call held back by a botocore
  hook and returned as UnprocessedItems (the sync's default backoff: base 50 ms, cap 5 s);
- **rate limited**: the writer with ``sync.dynamodb_items_per_s`` set to ``--rate-share`` of the
  writer's measured rate (bucket of 0.05 s), to show the limiter holds the configured rate.

Backoff share = seconds the writer threads slept in backoff / (wall seconds x workers).

    python -m benchmarks.sync [--quick] [--items N] [--workers W] [--top-k K]
"""

from __future__ import annotations

import argparse
import os
import posixpath
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from botocore.awsrequest import AWSResponse

from benchmarks.common import emit

BENCHMARK = "sync"
REGION = "us-east-1"
DAY = date(2026, 11, 26)
VERSION = "bench-v1"
GENERATED = datetime(2026, 11, 27, tzinfo=UTC)


class Throttle:
    """Makes DynamoDB refuse work through botocore hooks on one client (also used by
    tests/integration/test_sync_dynamodb.py): each item of a BatchWriteItem is held back with
    probability ``share`` (never sent, returned as UnprocessedItems, as DynamoDB does when a partition
    is over capacity), and every ``error_every``-th call fails with ProvisionedThroughputExceededException
    without reaching the server. ``share`` 1 refuses everything."""

    def __init__(self, ddb: Any, *, share: float, error_every: int = 0, seed: int = 0) -> None:
        self.share, self.error_every = share, error_every
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.calls = self.errors = self.held_back = 0
        events = ddb.meta.events
        events.register("provide-client-params.dynamodb.BatchWriteItem", self._params)
        events.register("before-call.dynamodb.BatchWriteItem", self._before)
        events.register("after-call.dynamodb.BatchWriteItem", self._after)

    def _params(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
            if self.error_every and self.calls % self.error_every == 0:
                self.errors += 1
                context["throttle"] = True
                return params
            ((table, requests),) = params["RequestItems"].items()
            held_flags = [self.rng.random() < self.share for _ in requests]
            self.held_back += sum(held_flags)
        held = [r for r, h in zip(requests, held_flags) if h]
        kept = [r for r, h in zip(requests, held_flags) if not h]
        context["held"] = (table, held)
        if not kept:
            context["refuse_all"] = True
            return params
        return {**params, "RequestItems": {table: kept}}

    def _before(self, context: dict[str, Any], params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict] | None:
        if context.get("throttle"):
            return AWSResponse(params["url"], 400, {}, None), {
                "Error": {"Code": "ProvisionedThroughputExceededException",
                          "Message": "The level of configured provisioned throughput for the table was exceeded."},
                "ResponseMetadata": {"HTTPStatusCode": 400}}
        if context.get("refuse_all"):
            table, held = context.pop("held")
            return AWSResponse(params["url"], 200, {}, None), {
                "UnprocessedItems": {table: held}, "ResponseMetadata": {"HTTPStatusCode": 200}}
        return None

    def _after(self, http_response: Any, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if "held" in context and http_response.status_code == 200:
            table, held = context["held"]
            if held:
                parsed.setdefault("UnprocessedItems", {}).setdefault(table, []).extend(held)


# --------------------------------------------------------------------------- set-up


def make_rows(users: int, top_k: int, seed: int) -> Any:
    import pyarrow as pa

    from ray_apps.score import RECS_SCHEMA

    rng = random.Random(seed)
    ids = [f"u{i:08d}" for i in range(users)]
    return pa.table({
        "user_id": ids,
        "item_ids": [[f"i{rng.randrange(100_000)}" for _ in range(top_k)] for _ in ids],
        "scores": [sorted((rng.random() for _ in range(top_k)), reverse=True) for _ in ids],
        "source": ["model"] * users, "model_version": [VERSION] * users, "generated_at": [GENERATED] * users,
    }, schema=RECS_SCHEMA)


def write_scored(settings: Any, rows: Any, files: int) -> None:
    """The rows as scoring's output folder: ``files`` part files, then the summary."""
    import pyarrow.parquet as pq

    from ray_apps.score import SUMMARY_FILE, ScoreSummary, output_folder
    from streamrec.lake import LakeLayout, filesystem

    layout = LakeLayout(settings.region(REGION).lake_uri)
    fs = filesystem(layout.uri)
    folder = output_folder(layout, REGION, DAY, VERSION)
    fs.create_dir(folder, recursive=True)
    step = -(-rows.num_rows // files)
    listed = []
    for n in range(files):
        part = rows.slice(n * step, step)
        name = f"part-{n:05d}-0.parquet"
        pq.write_table(part, posixpath.join(folder, name), filesystem=fs)
        listed.append({"path": name, "rows": part.num_rows})
    summary = ScoreSummary(region=REGION, dt=DAY.isoformat(), model_version=VERSION,
                           generated_at=GENERATED.isoformat(), users=rows.num_rows, model_scored=rows.num_rows,
                           popular_fallback=0, seconds=0.0, users_per_second=0.0, output=layout.to_uri(folder),
                           files=listed)
    with fs.open_output_stream(posixpath.join(folder, SUMMARY_FILE)) as out:
        out.write(summary.to_json().encode())


class Tables:
    """A fresh recs table per run, so every run starts from the same (empty) state."""

    def __init__(self, ddb: Any) -> None:
        self.ddb = ddb
        self.n = 0

    def new(self, prefix: str) -> str:
        from streamrec.tables import recs_table_spec

        self.n += 1
        name = f"bench-{prefix}-{self.n}-{uuid.uuid4().hex[:6]}"
        self.ddb.create_table(**recs_table_spec(name))
        return name

    def count(self, name: str) -> int:
        total, kwargs = 0, {"TableName": name, "Select": "COUNT"}
        while True:
            page = self.ddb.scan(**kwargs)
            total += page["Count"]
            if "LastEvaluatedKey" not in page:
                return total
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (the moto server), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


# --------------------------------------------------------------------------- runs


def run_sequential(ddb: Any, table: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The baseline: one thread, 25 items a call, unprocessed items re-sent at once."""
    from operators.sync.items import MAX_BATCH_ITEMS, put_requests, unprocessed_puts

    calls = 0
    started = time.perf_counter()
    for i in range(0, len(items), MAX_BATCH_ITEMS):
        batch = items[i:i + MAX_BATCH_ITEMS]
        while batch:
            response = ddb.batch_write_item(RequestItems={table: put_requests(batch)})
            calls += 1
            batch = unprocessed_puts(response, table)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "items_per_s": len(items) / seconds, "calls": calls, "backoff_share": 0.0}


def run_writer(ddb: Any, table: str, items: list[dict[str, Any]], sync: Any) -> dict[str, Any]:
    from operators.sync.dynamodb import write_items
    from operators.sync.items import RECS_KEY

    report = write_items(ddb, table, items, sync, key=RECS_KEY)
    assert report.items_written == len(items), report
    return report.to_json()


def benchmark(*, work: Path, items: int, top_k: int, workers: int, files: int, repeats: int,
              throttle_share: float, rate_share: float, seed: int, quick: bool,
              endpoint_url: str | None = None) -> list[dict[str, Any]]:
    from operators.sync.dynamodb import sync_client, sync_recs
    from operators.sync.items import recs_items
    from streamrec.aws import client
    from streamrec.devstack.moto_server import MotoLauncher
    from streamrec.devstack.provision import provision_region
    from streamrec.settings import AwsSettings, RegionSettings, Settings, SyncSettings

    launcher, handle, moto_pid = None, None, None
    if endpoint_url is None:
        launcher = MotoLauncher()
        handle = launcher.start(work / "moto")
        endpoint_url, moto_pid = handle.url, handle.pid
    try:
        base_region = RegionSettings.default_for(REGION, f"file://{work / 'lake'}")
        settings = Settings(aws=AwsSettings(endpoint_url=endpoint_url, access_key_id="testing",
                                            secret_access_key="testing"),
                            regions={REGION: base_region},
                            sync=SyncSettings(dynamodb_workers=workers, dynamodb_items_per_s=0))
        provision_region(settings, REGION)
        plain = client("dynamodb", REGION, settings.aws)
        ddb = sync_client(settings, REGION)
        tables = Tables(ddb)

        print(f"generating {items:,} users x {top_k} items ...", file=sys.stderr)
        rows = make_rows(items, top_k, seed)
        write_scored(settings, rows, files)
        t0 = time.process_time()
        prebuilt = recs_items(rows, ttl_days=settings.sync.recs_ttl_days)
        build_cpu_s = time.process_time() - t0
        item_bytes = sum(len(str(i)) for i in prebuilt[:200]) / min(200, len(prebuilt))

        results: dict[str, list[dict[str, Any]]] = {k: [] for k in ("seq", "seq_sync_client", "writer", "sync",
                                                                      "throttled")}

        def timed(name: str, fn: Any) -> None:
            """Run ``fn`` (which returns its figures and the table it wrote), count the moto server's CPU
            during it, then check the table holds every item (outside the counted window: a scan is
            costly in moto)."""
            cpu0 = process_cpu_s(moto_pid)
            out, table = fn()
            out["moto_cpu_s"] = round(process_cpu_s(moto_pid) - cpu0, 3)
            assert tables.count(table) == items, (name, table)
            results[name].append(out)
            print(f"  {name}: {out['items_per_s']:,.0f} items/s, backoff share {out['backoff_share']:.3f}",
                  file=sys.stderr)

        def sequential(client_: Any, prefix: str) -> tuple[dict[str, Any], str]:
            table = tables.new(prefix)
            return run_sequential(client_, table, prebuilt), table

        def writer() -> tuple[dict[str, Any], str]:
            table = tables.new("writer")
            return run_writer(ddb, table, prebuilt, settings.sync), table

        def e2e() -> tuple[dict[str, Any], str]:
            table = tables.new("sync")
            region = base_region.model_copy(update={"tables": base_region.tables.model_copy(update={"recs": table})})
            run_settings = settings.model_copy(update={"regions": {REGION: region}})
            shutil.rmtree(work / "lake" / REGION / "sync", ignore_errors=True)  # no checkpoints: a full sync
            report = sync_recs(run_settings, REGION, DAY, VERSION, dynamodb=ddb)
            assert report.items_written == items, report
            return report.to_json(), table

        def throttled() -> tuple[dict[str, Any], str]:
            tddb = sync_client(settings, REGION)
            throttle = Throttle(tddb, share=throttle_share, seed=seed)
            table = tables.new("throttled")
            out = run_writer(tddb, table, prebuilt, settings.sync)
            assert out["unprocessed_items"] == throttle.held_back
            return out, table

        for r in range(repeats):
            print(f"repeat {r + 1}/{repeats}", file=sys.stderr)
            order = [("seq", lambda: sequential(plain, "seq")), ("seq_sync_client", lambda: sequential(ddb, "seqsc")),
                     ("writer", writer), ("sync", e2e), ("throttled", throttled)]
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                timed(name, fn)

        best = {k: max(v, key=lambda x: x["items_per_s"]) for k, v in results.items()}
        limit = round(best["writer"]["items_per_s"] * rate_share, -1) or 100
        limited_sync = settings.sync.model_copy(update={"dynamodb_items_per_s": limit, "dynamodb_burst_s": 0.05})
        print(f"rate limited at {limit:,.0f} items/s", file=sys.stderr)
        limited = run_writer(ddb, tables.new("limited"), prebuilt, limited_sync)

        params = {"items": items, "top_k": top_k, "workers": workers, "files": files, "repeats": repeats,
                  "avg_item_json_bytes": round(item_bytes), "backend": "moto server (same machine)",
                  "quick": quick}
        # The machine's load when the runs ended (other processes share these cores: a noisy run shows here).
        load_avg = [round(x, 2) for x in os.getloadavg()]
        seq = best["seq"]
        lines = []

        def extra(run: dict[str, Any]) -> dict[str, Any]:
            keys = ("seconds", "calls", "backoff_share", "backoff_seconds", "rate_wait_share", "throttled_retries",
                    "unprocessed_items", "throttle_errors", "max_items_per_call", "moto_cpu_s")
            return {**{k: run[k] for k in keys if k in run}, "load_avg_1_5_15m": load_avg}

        lines.append(emit(BENCHMARK, "sync_writer_items_per_s", best["writer"]["items_per_s"], "items/s",
                          "sequential_batch_write_items_per_s", seq["items_per_s"], params,
                          run=extra(best["writer"]), baseline=extra(seq),
                          sequential_sync_client_items_per_s=round(best["seq_sync_client"]["items_per_s"], 1)))
        lines.append(emit(BENCHMARK, "sync_recs_items_per_s", best["sync"]["items_per_s"], "items/s",
                          "sequential_batch_write_items_per_s", seq["items_per_s"], params,
                          run=extra(best["sync"]), baseline=extra(seq),
                          build_items_per_cpu_s=round(items / max(build_cpu_s, 1e-9), 1),
                          note="includes reading Parquet and building the items; the baseline's items are prebuilt"))
        thr = best["throttled"]
        lines.append(emit(BENCHMARK, "sync_throttled_items_per_s", thr["items_per_s"], "items/s",
                          "sync_writer_items_per_s", best["writer"]["items_per_s"],
                          {**params, "throttle_share": throttle_share}, run=extra(thr)))
        lines.append(emit(BENCHMARK, "sync_throttled_backoff_share", thr["backoff_share"], "share",
                          "sync_writer_backoff_share", best["writer"]["backoff_share"],
                          {**params, "throttle_share": throttle_share}, run=extra(thr)))
        lines.append(emit(BENCHMARK, "sync_rate_limited_items_per_s", limited["items_per_s"], "items/s",
                          "configured_items_per_s", limit, {**params, "burst_s": 0.05, "rate_share": rate_share},
                          run=extra(limited)))
        return lines
    finally:
        if launcher is not None and handle is not None:
            launcher.stop(handle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 users and 1 repeat unless given (under a minute)")
    parser.add_argument("--items", type=int, default=None, help="users (recs items) per run (default 5,000)")
    parser.add_argument("--top-k", type=int, default=100, help="recommended items per user (default 100)")
    parser.add_argument("--workers", type=int, default=4, help="sync.dynamodb_workers (default 4)")
    parser.add_argument("--files", type=int, default=4, help="scored part files (default 4)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating repeats; the best of each is kept (default 3)")
    parser.add_argument("--throttle-share", type=float, default=0.2, help="items held back per call (default 0.2)")
    parser.add_argument("--rate-share", type=float, default=0.3,
                        help="rate limit as a share of the measured writer rate (default 0.3)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.items = args.items or (1_000 if args.quick else 5_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="streamrec-bench-sync-"))
    try:
        benchmark(work=work, items=args.items, top_k=args.top_k, workers=args.workers, files=args.files,
                  repeats=args.repeats, throttle_share=args.throttle_share, rate_share=args.rate_share,
                  seed=args.seed, quick=args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
