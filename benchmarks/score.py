"""Batch scoring throughput through the Ray Data pipeline against raw index search, in the same run.

Set-up (not timed): a ``file://`` lake with the ETL's ``items`` (``--items``, Zipf popularity) and
``users`` tables (``--users``; every user active, 1-50 ``last_items``, 40% with purchases: geometric,
mean 4) for one region and day (``benchmarks.synthetic_features``, one Parquet file per million rows
as the ETL writes them), and a registry version built and promoted the way ``ray_apps.train.run``
publishes one: a ``TwoTowerModel`` with the default config (random weights, fixed seed: recommendation
QUALITY is not measured here, only speed, which does not depend on the weights), item vectors from
``ray_apps.evaluate.item_embeddings_for``, the index from ``ray_apps.ann.build_index(kind="auto",
exact_max_items=score.exact_max_items)`` (IVF above 50k items), ``ModelRegistry.publish`` + ``promote``.
Settings are the ``ScoreSettings`` defaults (top 100, purchases excluded, batches of 4,096, two actors
of 0.5 CPU) unless flags say otherwise.

Path measured: ``ray_apps.score.score(settings, region, day)`` end to end: popularity list, Ray Data
``read_parquet`` → ``UserScorer`` actors (each loads the weights and index from the registry) →
``write_parquet`` to staging → read-back check → summary → folder swap. Ray is started BEFORE the clock
starts (``ray.init`` is timed and reported apart, and in a second figure that includes it).
``score_users_per_s`` = users / wall seconds of the ``score()`` call with ``rows_per_block=None`` (what
the CLI runs by default: Ray Data's own read blocks, one or two for a one-file users table, so one
actor gets all the work); ``score_users_per_s_rows_per_block`` = the same with ``rows_per_block =
score.batch_size`` (every actor busy; ``--rows-per-block`` picks other values; not run with --quick).

Baseline: raw index search of the same user vectors, in this process with faiss on all C cores:
``AnnIndex.search(vectors, k=top_k)`` over every user, after ``ray_apps.score.user_vectors`` computed
the vectors (timed apart: the user-tower cost). The decomposition reported beside it, all in-process
on C threads, same model and index as the actors load:

- ``faiss_only``: the faiss call alone (``search`` on the raw faiss index, same nprobe, positions only);
- ``search``: ``AnnIndex.search`` without exclusion (THE BASELINE: faiss + mapping positions to ids);
- ``search_excluding``: ``AnnIndex``'s search with ``exclude=purchased_items`` per batch of
  ``score.batch_size`` (what ``recommend_batch`` calls);
- ``user_tower``: ``user_vectors`` over every user, per batch;
- ``recommend_batch``: the whole per-batch function (tower + search + exclusion + Arrow output) over
  batches of ``score.batch_size``: the pipeline's work without Ray (also emitted as
  ``score_in_process_users_per_s``, so the gap splits into "per-batch work" and "Ray");
- prototypes of proposed ray_apps changes, in this file, checked against the originals:
  ``search_excluding_vectorised`` (the exclusion with array operations), ``user_tower_prototype``
  (mean pooling with ``F.embedding_bag``) and ``recommend_batch_prototype`` (both, and the output lists
  built with an Arrow ``take``).

Each in-process figure is the best of ``--inner-repeats`` (CPU seconds of the process are reported too:
on a shared machine they are steadier than wall time). Inside the pipeline, the actors are timed too
(``UserScorer`` wrapped for the call: when each became ready, constructor seconds, batches, busy and CPU
seconds, torch/faiss threads), which splits ``score()``'s wall time into start-up, work and the rest.

    python -m benchmarks.score [--quick] [--users N] [--items N] [--rows-per-block N] [--device ...]

Target (issue): ratio >= 0.7 (Ray Data pipeline / raw index search, users/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, ray_cluster

REGION = "us-east-1"
DAY = date(2026, 11, 25)
PROBE_ENV = "BENCH_SCORE_PROBE_DIR"  # where the wrapped actors log their timings (not a setting)


# --------------------------------------------------------------------------------------------------------
# Set-up (not timed)
# --------------------------------------------------------------------------------------------------------

def make_settings(lake_root: Path, score: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                  object_store_bytes: int = 512 * 1024 * 1024) -> Any:
    from streamrec.settings import RegionSettings, load_settings

    region = RegionSettings.default_for(REGION, f"file://{lake_root}")
    return load_settings(None, regions={REGION: region.model_dump()}, score=score or {},
                         train={"object_store_bytes": object_store_bytes, "model": model or {}})


@dataclass
class World:
    settings: Any
    version: str
    users: Any  # pa.Table, the users table as written
    setup: dict[str, float]
    index_info: dict[str, Any]


def build_world(settings: Any, users: int, items: int, seed: int, device: str) -> World:
    import pyarrow.fs as pafs
    import torch

    from benchmarks import synthetic_features as sf
    from ray_apps.ann import build_index
    from ray_apps.evaluate import item_embeddings_for
    from ray_apps.model import TwoTowerModel
    from ray_apps.registry import ModelRegistry, embeddings_table
    from ray_apps.train import FeaturePaths, model_config_for, state_to_bytes

    setup: dict[str, float] = {}
    t = time.perf_counter()
    paths = FeaturePaths.for_day(settings, REGION, DAY)
    fs = pafs.LocalFileSystem()
    cat = sf.catalogue(items, seed)
    items_table = sf.items_table(cat, day=DAY)
    users_table = sf.users_table(users, cat, day=DAY, history_length=settings.etl.history_length,
                                 purchased_max=settings.etl.purchased_items_max, seed=seed)
    etl = settings.etl
    sf.write_parquet(fs, items_table, paths.table("items"), max_rows_per_file=etl.max_rows_per_file,
                     row_group_bytes=etl.row_group_bytes)
    sf.write_parquet(fs, users_table, paths.table("users"), max_rows_per_file=etl.max_rows_per_file,
                     row_group_bytes=etl.row_group_bytes)
    setup["tables_s"] = time.perf_counter() - t

    t = time.perf_counter()
    config = model_config_for(settings)
    model = TwoTowerModel(config).eval()
    with torch.no_grad():
        ids, vectors = item_embeddings_for(model.to(device), config, items_table)
    model = model.cpu()
    setup["item_tower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index = build_index(ids, vectors, kind="auto", exact_max_items=settings.score.exact_max_items)
    setup["index_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    registry = ModelRegistry.from_settings(settings, REGION)
    version = registry.publish(
        None, user_tower=state_to_bytes(model.state_dict()), config=json.loads(config.to_json()),
        item_embeddings=embeddings_table(ids, vectors), index=index,
        data_window=(DAY - timedelta(days=settings.etl.train_days - 1), DAY),
        metrics={"benchmark": f"random weights, seed {config.seed}"}, gate={"passed": True},
        code_version="benchmark")
    registry.promote(version.version, {"reason": "benchmark"})
    setup["publish_s"] = time.perf_counter() - t  # includes the registry's recall measurement
    return World(settings, version.version, users_table, {k: round(v, 2) for k, v in setup.items()},
                 dict(version.index_info))


# --------------------------------------------------------------------------------------------------------
# Baseline and decomposition, in this process on all cores
# --------------------------------------------------------------------------------------------------------

def search_excluding_vectorised(index: Any, queries: np.ndarray, k: int,
                                purchased: Any) -> tuple[np.ndarray, np.ndarray]:
    """What ``AnnIndex.search(queries, k, exclude=purchased)`` returns, computed with array operations.

    A prototype for ray_apps/ann.py (it reads AnnIndex internals): ``purchased`` is the Arrow
    list<string> column as it comes out of the users table. Excluded ids → positions with one vectorised
    hash lookup (a ``pandas.Index`` of the item ids, built once per index); rows WITHOUT exclusions are
    searched for k (the common case), rows WITH exclusions for k + the longest list among them; excluded
    candidates are masked by comparing each excluded position with its own row's candidates only
    (``cand[rows] == pos``), and the first k usable columns per row are gathered in rank order with a
    cumulative sum. A row left short (an approximate index that found too few candidates) goes through
    AnnIndex's own search, with its escalation rules. The results are AnnIndex's, up to float rounding:
    faiss scores a call's queries together, and other query groups round differently (the benchmark
    measures that noise floor on AnnIndex itself).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    q = np.ascontiguousarray(queries, dtype=np.float32)
    n_rows, n_items = len(q), len(index)
    out_pos = np.full((n_rows, k), -1, dtype=np.int64)
    out_scores = np.full((n_rows, k), -np.inf, dtype=np.float32)
    if not hasattr(index, "_ids_lookup"):  # built once per index; pandas caches the hash table
        import pandas as pd

        index._ids_lookup = pd.Index(index.item_ids.tolist())
        index._ids_lookup.get_indexer(index.item_ids[:1].tolist())
    if isinstance(purchased, pa.ChunkedArray):
        purchased = purchased.combine_chunks()
    flat = pc.list_flatten(purchased).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(purchased).to_numpy()
    found = index._ids_lookup.get_indexer(flat)  # -1: not in the catalogue (ignored, as AnnIndex does)
    known = found >= 0
    ex_rows = parents[known]
    ex_pos = found[known].astype(np.int64)
    per_row = np.bincount(ex_rows, minlength=n_rows)

    short_rows: list[np.ndarray] = []
    groups = ((np.flatnonzero(per_row == 0), 0), (np.flatnonzero(per_row > 0), int(per_row.max(initial=0))))
    for rows, extra in groups:
        if rows.size == 0:
            continue
        fetch = min(n_items, k + extra)
        scores, cand = index._raw_search(q[rows], fetch, effort=1, exhaustive=index.kind == "exact")
        keep = cand >= 0
        if extra:
            slot = np.full(n_rows, -1, dtype=np.int64)
            slot[rows] = np.arange(rows.size)
            mine = slot[ex_rows]  # this group's row of each excluded (row, position) pair
            hit_e, hit_col = np.nonzero(cand[mine] == ex_pos[:, None])
            keep[mine[hit_e], hit_col] = False
        rank = np.cumsum(keep, axis=1)
        full = rank[:, -1] >= k
        take = keep & (rank <= k) & full[:, None]
        cols = np.nonzero(take)[1].reshape(-1, k)
        done = rows[full]
        out_pos[done] = np.take_along_axis(cand[full], cols, axis=1)
        out_scores[done] = np.take_along_axis(scores[full], cols, axis=1)
        short_rows.append(rows[~full])
    short = np.concatenate(short_rows) if short_rows else np.zeros(0, dtype=np.int64)
    if short.size:  # rare: the escalation rules of AnnIndex (wider probe, then exhaustive)
        lists = purchased.take(pa.array(short)).to_pylist()
        pos, sc = index._search_positions(q[short], k, lists)
        out_pos[short], out_scores[short] = pos, sc
    return out_pos, out_scores


def user_vectors_prototype(model: Any, users: Any, region: str) -> np.ndarray:
    """``ray_apps.score.user_vectors`` with the history's mean pooling done by ``F.embedding_bag`` (one fused
    gather + mean that skips index 0) instead of gathering a [B, N, D] tensor and masking it (a prototype
    of a ray_apps/model.py change; attention pooling goes to the original). Same numbers up to float
    rounding (checked by the benchmark)."""
    import torch
    import torch.nn.functional as F

    from ray_apps.encoding import encode_users
    from ray_apps.model import _unit, as_tensors
    from ray_apps.score import user_vectors

    config = model.config
    if config.pooling != "mean":
        return user_vectors(model, users, region)
    device = users.column("device") if "device" in users.column_names else None
    user_id = users.column("user_id") if config.user_buckets > 0 else None
    where = next(model.parameters()).device
    encoded = encode_users(users.column("last_items"), region, device, None, user_id, config=config)
    batch = as_tensors(encoded, where)
    tower = model.user_tower
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pooled = F.embedding_bag(batch["history"], model.item_id_embedding.weight, mode="mean",
                                     padding_idx=0)
            parts = [pooled, tower.region_embedding(batch["region"]), tower.device_embedding(batch["device"]),
                     tower.hour_embedding(batch["hour"])]
            if tower.user_id_embedding is not None:
                ids = batch.get("user_id", torch.zeros_like(batch["region"]))
                parts.insert(1, tower.user_id_embedding(ids))
            vectors = _unit(tower.mlp(torch.cat(parts, dim=-1)))
    finally:
        model.train(was_training)
    return np.ascontiguousarray(vectors.float().cpu().numpy(), dtype=np.float32)


def recommend_batch_prototype(batch: Any, *, model: Any, index: Any, region: str, popular: Any, top_k: int,
                              model_version: str, generated_at: Any, min_history: int = 1,
                              exclude_purchased: bool = True) -> Any:
    """``ray_apps.score.recommend_batch`` with the proposed changes (a prototype, see the module
    docstring): the user tower through :func:`user_vectors_prototype`, the search through
    :func:`search_excluding_vectorised` (positions, not ids) and the output lists built with one Arrow
    ``take`` of the item-id strings instead of object arrays of Python strings.
    Batches with cold users go to the original (the popularity fallback is unchanged)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ray_apps.score import RECS_SCHEMA, SOURCE_MODEL, recommend_batch, utc

    lengths = pc.fill_null(pc.list_value_length(batch.column("last_items")), 0).to_numpy(zero_copy_only=False)
    if (lengths < min_history).any() or not exclude_purchased:
        return recommend_batch(batch, model=model, index=index, region=region, popular=popular, top_k=top_k,
                               model_version=model_version, generated_at=generated_at,
                               min_history=min_history, exclude_purchased=exclude_purchased)
    rows = batch.num_rows
    vectors = user_vectors_prototype(model, batch, region)
    pos, scores = search_excluding_vectorised(index, vectors, top_k, batch.column("purchased_items"))
    valid = pos >= 0
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    offsets_array = pa.array(offsets, type=pa.int32())
    if not hasattr(index, "_ids_arrow"):
        index._ids_arrow = pa.array(index.item_ids.tolist(), type=pa.string())
    item_ids = pa.ListArray.from_arrays(offsets_array, index._ids_arrow.take(pa.array(pos[valid])))
    item_scores = pa.ListArray.from_arrays(offsets_array, pa.array(scores[valid], type=pa.float32()))
    return pa.Table.from_arrays([
        batch.column("user_id").cast(pa.string()),
        item_ids.cast(RECS_SCHEMA.field("item_ids").type),
        item_scores.cast(RECS_SCHEMA.field("scores").type),
        pa.repeat(pa.scalar(SOURCE_MODEL, pa.string()), rows),
        pa.repeat(pa.scalar(model_version, pa.string()), rows),
        pa.repeat(pa.scalar(utc(generated_at), RECS_SCHEMA.field("generated_at").type), rows),
    ], schema=RECS_SCHEMA)


def compare_results(ref_pos: np.ndarray, ref_scores: np.ndarray, pos: np.ndarray, scores: np.ndarray,
                    index: Any = None, queries: np.ndarray | None = None) -> dict[str, Any]:
    """How far the prototype's results are from AnnIndex's. faiss scores a call's queries with one BLAS
    product, and the prototype calls it with other query groups, so scores may differ in the last bit:
    near-tied items (within 1e-5) may swap places, and with IVF a query whose nprobe-th and next centroid
    scores tie to float rounding may probe another list. Rows that differ for neither reason are
    counted in ``unexplained_rows`` (a bug if not 0)."""
    differ = (pos != ref_pos).any(axis=1)
    beyond_ties = []
    for b in np.flatnonzero(differ):
        cols = np.flatnonzero(pos[b] != ref_pos[b])
        if not np.all(np.abs(scores[b, cols] - ref_scores[b, cols]) <= 1e-5):
            beyond_ties.append(b)
    boundary = 0
    if beyond_ties and index is not None and queries is not None and index.kind == "ivf":
        import faiss

        nprobe = int(index.params["nprobe"])
        centroid_scores, _ = faiss.downcast_index(index._index).quantizer.search(
            np.ascontiguousarray(queries[beyond_ties]), nprobe + 1)
        boundary = int(np.sum(centroid_scores[:, nprobe - 1] - centroid_scores[:, nprobe] <= 1e-6))
    return {"rows": len(pos), "rows_identical": int((~differ).sum()),
            "rows_near_tie_swaps_only": int(differ.sum()) - len(beyond_ties),
            "rows_ivf_probe_boundary_ties": boundary, "unexplained_rows": len(beyond_ties) - boundary,
            "max_score_diff": float(np.max(np.abs(np.nan_to_num(scores - ref_scores, posinf=0, neginf=0)),
                                           initial=0.0))}


def timed(fn: Any, repeats: int, cpu: dict[str, float], key: str) -> tuple[float, Any]:
    """Best wall seconds of ``repeats`` calls (the process's CPU seconds of that call go to ``cpu[key]``),
    and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        wall = time.perf_counter() - t
        if wall < best:
            best, cpu[key] = wall, time.process_time() - c
    return best, result


def run_in_process(world: World, threads: int, device: str, repeats: int) -> dict[str, Any]:
    """The baseline and the decomposition (see the module docstring), ``threads`` torch and faiss threads.
    Each figure is the best of ``repeats``, except the two whole-batch functions (once each: they are the
    slowest and their parts are measured apart)."""
    import faiss
    import pyarrow as pa
    import torch

    from ray_apps.ann import configure_threads
    from ray_apps.registry import ModelRegistry
    from ray_apps.score import (
        default_generated_at,
        load_scoring_model,
        read_popular,
        recommend_batch,
        user_vectors,
    )
    from ray_apps.train import FeaturePaths

    settings, scoring = world.settings, world.settings.score
    users = world.users
    n, k, batch = users.num_rows, scoring.top_k, scoring.batch_size
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    configure_threads(threads)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    try:
        registry = ModelRegistry.from_settings(settings, REGION)
        seconds["load_model_and_index"], (model, index) = timed(  # what each actor does first
            lambda: load_scoring_model(registry, world.version, device), 1, cpu, "load_model_and_index")
        batches = [users.slice(i, batch) for i in range(0, n, batch)]
        seconds["user_tower"], vectors = timed(
            lambda: np.concatenate([user_vectors(model, b, REGION) for b in batches]), repeats, cpu,
            "user_tower")
        seconds["user_tower_prototype"], proto_vectors = timed(
            lambda: np.concatenate([user_vectors_prototype(model, b, REGION) for b in batches]), repeats, cpu,
            "user_tower_prototype")
        tower_max_diff = float(np.abs(proto_vectors - vectors).max())
        nprobe = index.params.get("nprobe")

        def faiss_only() -> Any:
            if index.kind == "ivf":
                return index._index.search(vectors, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
            return index._index.search(vectors, k)

        seconds["faiss_only"], _ = timed(faiss_only, repeats, cpu, "faiss_only")
        seconds["search"], _ = timed(lambda: index.search(vectors, k), repeats, cpu, "search")  # the baseline
        purchased = users.column("purchased_items").combine_chunks()
        exclude = purchased.to_pylist()

        def excluding() -> list[Any]:  # per batch, as recommend_batch calls it
            return [index._search_positions(vectors[i:i + batch], k, exclude[i:i + batch])
                    for i in range(0, n, batch)]

        seconds["search_excluding"], parts = timed(excluding, repeats, cpu, "search_excluding")

        def vectorised() -> list[Any]:
            return [search_excluding_vectorised(index, vectors[i:i + batch], k, purchased.slice(i, batch))
                    for i in range(0, n, batch)]

        seconds["search_excluding_vectorised"], vparts = timed(vectorised, repeats, cpu,
                                                               "search_excluding_vectorised")
        check = compare_results(np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts]),
                                np.concatenate([p for p, _ in vparts]), np.concatenate([s for _, s in vparts]),
                                index, vectors)
        # The noise floor of that comparison: AnnIndex.search against itself with the queries cut differently
        # (faiss's coarse quantizer scores a call's queries with one BLAS product, so its rounding, and
        # with it an IVF probe's last list, depends on which queries share the call).
        head = min(n, 2 * batch)
        one, _ = index._search_positions(vectors[:head], k, exclude[:head])
        cut = [index._search_positions(vectors[i:min(i + 1000, head)], k, exclude[i:min(i + 1000, head)])
               for i in range(0, head, 1000)]
        differing = int((one != np.concatenate([p for p, _ in cut])).any(axis=1).sum())
        check["noise_floor_rows_differing_of"] = [differing, head]

        paths = FeaturePaths.for_day(settings, REGION, DAY)
        spare = settings.etl.purchased_items_max if scoring.exclude_purchased else 0
        popular = read_popular(paths.fs, paths.table("items"), scoring.top_k + spare)
        kwargs = {"model": model, "index": index, "region": REGION, "popular": popular, "top_k": k,
                  "model_version": world.version, "generated_at": default_generated_at(DAY),
                  "min_history": scoring.min_history, "exclude_purchased": scoring.exclude_purchased}
        seconds["recommend_batch"], reference = timed(
            lambda: [recommend_batch(b, **kwargs) for b in batches], 1, cpu, "recommend_batch")
        seconds["recommend_batch_prototype"], prototype = timed(
            lambda: [recommend_batch_prototype(b, **kwargs) for b in batches], 1, cpu,
            "recommend_batch_prototype")
        ref_table, proto_table = pa.concat_tables(reference), pa.concat_tables(prototype)
        same_lists = sum(a == b for a, b in zip(ref_table.column("item_ids").to_pylist(),
                                                proto_table.column("item_ids").to_pylist()))
    finally:
        torch.set_num_threads(previous)
        configure_threads()
    rates = {key: round(n / v, 1) for key, v in seconds.items() if key != "load_model_and_index"}
    return {
        "seconds": {key: round(v, 3) for key, v in seconds.items()},
        "cpu_seconds": {key: round(v, 3) for key, v in cpu.items()},
        "users_per_s": rates,
        "vectorised_check": check,
        "tower_prototype_max_abs_diff": tower_max_diff,
        "prototype_check": {"same_schema": ref_table.schema == proto_table.schema,
                            "rows": proto_table.num_rows, "rows_with_identical_lists": int(same_lists)},
        "users_with_purchases": int(sum(1 for e in exclude if e)),
        "purchased_items_total": int(sum(len(e) for e in exclude)),
        "threads": threads,
    }


class ProbedUserScorer:
    """``ray_apps.score.UserScorer`` inside a timer: the benchmark hands this class to ``score()`` (in place
    of the module's ``UserScorer`` for the call); in the actor it builds the real ``UserScorer`` and
    appends one JSON line per event (constructor, batch) to ``$BENCH_SCORE_PROBE_DIR/actor-<pid>.jsonl``."""

    def __init__(self, **kwargs: Any) -> None:
        from ray_apps.score import UserScorer  # in the actor process: the real class

        start = time.time()
        self.inner = UserScorer(**kwargs)
        self._log({"event": "init", "start": start, "end": time.time(), "process_created": _process_created()})

    def __call__(self, batch: Any) -> Any:
        start, cpu = time.time(), time.process_time()
        out = self.inner(batch)
        self._log({"event": "batch", "start": start, "end": time.time(), "rows": batch.num_rows,
                   "cpu_s": time.process_time() - cpu})
        return out

    @staticmethod
    def _log(entry: dict[str, Any]) -> None:
        folder = os.environ.get(PROBE_ENV)
        if not folder:
            return
        import faiss
        import torch

        entry.update(pid=os.getpid(), torch_threads=torch.get_num_threads(),
                     faiss_threads=faiss.omp_get_max_threads(),
                     OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"))
        with open(os.path.join(folder, f"actor-{os.getpid()}.jsonl"), "a") as out:
            out.write(json.dumps(entry) + "\n")


def _process_created() -> float | None:
    """When this process started (epoch seconds), from /proc (Linux), else None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


@contextlib.contextmanager
def probed_actors(probe_dir: Path | None) -> Iterator[None]:
    import ray_apps.score as rs

    if probe_dir is None:
        yield
        return
    original = rs.UserScorer
    rs.UserScorer = ProbedUserScorer
    try:
        yield
    finally:
        rs.UserScorer = original


def _after(moment: float | None, t0: float) -> float | None:
    return None if moment is None else round(moment - t0, 2)


def actor_report(probe_dir: Path, t0: float, wall: float) -> dict[str, Any]:
    """Per actor: constructor seconds, batches, busy seconds (in ``__call__``), CPU seconds; and the share
    of the wall time the actors were busy (the rest: start-up, Ray Data, writing, the driver's checks)."""
    actors = []
    for path in sorted(probe_dir.glob("actor-*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines()]
        inits = [e for e in events if e["event"] == "init"]
        calls = [e for e in events if e["event"] == "batch"]
        actors.append({
            "pid": events[0]["pid"], "torch_threads": events[0]["torch_threads"],
            "faiss_threads": events[0]["faiss_threads"], "OMP_NUM_THREADS": events[0]["OMP_NUM_THREADS"],
            "process_started_after_s": _after(inits[0].get("process_created"), t0) if inits else None,
            "constructor_started_after_s": _after(inits[0]["start"], t0) if inits else None,
            "ready_after_s": round(min(e["end"] for e in inits) - t0, 2) if inits else None,
            "init_s": round(sum(e["end"] - e["start"] for e in inits), 2),
            "batches": len(calls), "rows": sum(e["rows"] for e in calls),
            "busy_s": round(sum(e["end"] - e["start"] for e in calls), 2),
            "busy_cpu_s": round(sum(e["cpu_s"] for e in calls), 2),
            "last_batch_end_s": round(max(e["end"] for e in calls) - t0, 2) if calls else None,
        })
    busy = sum(a["busy_s"] for a in actors)
    return {"actors": actors, "actor_busy_s": round(busy, 2),
            "busy_share_of_wall_x_actors": round(busy / (wall * max(len(actors), 1)), 3) if wall else None}


# --------------------------------------------------------------------------------------------------------
# The Ray Data pipeline
# --------------------------------------------------------------------------------------------------------

def run_pipeline(settings: Any, rows_per_block: int | None, probe_dir: Path | None) -> dict[str, Any]:
    from ray_apps.score import score

    if probe_dir is not None:
        shutil.rmtree(probe_dir, ignore_errors=True)
        probe_dir.mkdir(parents=True)
    t0 = time.time()
    t = time.perf_counter()
    with probed_actors(probe_dir):
        summary = score(settings, REGION, DAY, rows_per_block=rows_per_block)
    wall = time.perf_counter() - t
    out = {"wall_s": wall, "users": summary.users, "model_scored": summary.model_scored,
           "files": len(summary.files), "summary_seconds": summary.seconds}
    if probe_dir is not None:
        out.update(actor_report(probe_dir, t0, wall))
    return out


# --------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def benchmark(*, work: Path, users: int, items: int, seed: int, device: str, repeats: int, inner_repeats: int,
              rows_per_block: list[int | None], score_overrides: dict[str, Any], quick: bool,
              profile: bool = True, model: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Build the lake and version, run the in-process baseline and ``score()`` (alternating, ``repeats``
    times), emit the figures; returns the emitted lines."""
    from ray_apps.ann import _usable_cpus
    from ray_apps.train import model_config_for

    device = resolve_device(device)
    cores = _usable_cpus()
    settings = make_settings(work / "lake", score_overrides, model)
    world = build_world(settings, users, items, seed, device)
    print(f"set-up: {users:,} users, {items:,} items, index {world.index_info['kind']} "
          f"{world.index_info.get('params')}, recall@100 {world.index_info.get('recall_at_100')}; "
          f"{world.setup}", file=sys.stderr)

    baselines: list[dict[str, Any]] = []
    pipelines: dict[str, list[dict[str, Any]]] = {str(r): [] for r in rows_per_block}
    ray_init: list[float] = []
    for r in range(repeats):
        base = run_in_process(world, cores, device, repeats=inner_repeats)
        baselines.append(base)
        ups = base["users_per_s"]
        print(f"repeat {r + 1}: in-process ({cores} threads) users/s: " + ", ".join(
            f"{key} {value:,.0f}" for key, value in ups.items())
            + f"; vectorised exclusion vs AnnIndex.search: {base['vectorised_check']}", file=sys.stderr)
        probe_dir = work / "probe" if profile else None
        if probe_dir is not None:
            os.environ[PROBE_ENV] = str(probe_dir)  # inherited by Ray's workers
        with ray_cluster(settings, cores, prefix="srbs-") as started:
            ray_init.append(started)
            for rpb in rows_per_block:
                run = run_pipeline(settings, rpb, probe_dir)
                pipelines[str(rpb)].append(run)
                actors = "; ".join(
                    f"actor {a['pid']}: process started at {a['process_started_after_s']} s, constructor "
                    f"{a['constructor_started_after_s']}-{a['ready_after_s']} s, "
                    f"{a['batches']} batches, busy {a['busy_s']} s ({a['busy_cpu_s']} CPU s), "
                    f"threads torch {a['torch_threads']} faiss {a['faiss_threads']}"
                    for a in run.get("actors", []))
                print(f"repeat {r + 1}: score() rows_per_block={rpb}: {run['wall_s']:.1f} s, "
                      f"{run['users'] / run['wall_s']:,.0f} users/s, {run['files']} files "
                      f"(ray.init {started:.1f} s before the clock); {actors}", file=sys.stderr)

    best_base = max(baselines, key=lambda b: b["users_per_s"]["search"])
    raw_rate = best_base["users_per_s"]["search"]
    scoring = settings.score
    params = {"users": users, "items": items, "top_k": scoring.top_k,
              "exclude_purchased": scoring.exclude_purchased,
              "batch_size": scoring.batch_size, "concurrency": scoring.concurrency,
              "cpus_per_actor": scoring.cpus_per_actor, "index": world.index_info, "device": device,
              "cores": cores, "repeats": repeats, "quick": quick,
              "users_with_purchases": best_base["users_with_purchases"],
              "purchased_items_total": best_base["purchased_items_total"],
              "model": json.loads(model_config_for(settings).to_json()),
              "weights": "random init (seeded): quality not measured"}
    decomposition = {"in_process_seconds": best_base["seconds"],
                     "in_process_cpu_seconds": best_base["cpu_seconds"],
                     "in_process_users_per_s": best_base["users_per_s"],
                     "vectorised_check": best_base["vectorised_check"],
                     "prototype_check": best_base["prototype_check"],
                     "tower_prototype_max_abs_diff": best_base["tower_prototype_max_abs_diff"],
                     "baseline_threads": cores, "setup_s": world.setup}
    lines = []
    for rpb in rows_per_block:
        runs = pipelines[str(rpb)]
        best = min(runs, key=lambda x: x["wall_s"])
        suffix = "" if rpb is None else "_rows_per_block"
        p = {**params, "rows_per_block": rpb, "output_files": best["files"]}
        rate = best["users"] / best["wall_s"]
        pipeline = {key: best[key] for key in ("actors", "actor_busy_s", "busy_share_of_wall_x_actors")
                    if key in best}
        lines.append(emit("score", f"score_users_per_s{suffix}", rate, "users/s",
                          "raw_index_search_users_per_s", raw_rate, p, ray_start_included=False,
                          score_wall_s=round(best["wall_s"], 2),
                          ray_init_s=round(min(ray_init), 2), pipeline=pipeline, **decomposition))
        with_start = best["users"] / (best["wall_s"] + min(ray_init))
        lines.append(emit("score", f"score_users_per_s_incl_ray_start{suffix}", with_start, "users/s",
                          "raw_index_search_users_per_s", raw_rate, p, ray_start_included=True,
                          score_wall_s=round(best["wall_s"], 2), ray_init_s=round(min(ray_init), 2)))
    # The pipeline's per-batch work without Ray, against the same baseline: how much of the gap is Ray.
    lines.append(emit("score", "score_in_process_users_per_s", best_base["users_per_s"]["recommend_batch"],
                      "users/s", "raw_index_search_users_per_s", raw_rate, params,
                      measure="ray_apps.score.recommend_batch over batches of score.batch_size, one process, "
                              f"{cores} threads, no Ray", **decomposition))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k users, 10k items (exact index)")
    parser.add_argument("--users", type=int, default=None, help="users to score (default 100,000)")
    parser.add_argument("--items", type=int, default=None, help="catalogue size (default 100,000)")
    parser.add_argument("--rows-per-block", type=int, action="append", default=None,
                        help="score(rows_per_block=N) variant to run besides the default (None); repeatable. "
                             "Default: also score.batch_size")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; the best of each is kept")
    parser.add_argument("--inner-repeats", type=int, default=None,
                        help="best-of-N for each in-process measurement (default 2)")
    parser.add_argument("--no-profile", action="store_true", help="no timers around the scoring actors")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the in-process baseline's user tower runs (the actors pick CUDA when "
                             "Ray has GPUs)")
    parser.add_argument("--score-json", default=None,
                        help='ScoreSettings overrides, e.g. \'{"concurrency": 1}\'')
    parser.add_argument("--model-json", default=None,
                        help='TwoTowerConfig overrides (train.model), e.g. \'{"id_buckets": 65536}\'')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="work here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    users = args.users or (10_000 if args.quick else 100_000)
    items = args.items or (10_000 if args.quick else 100_000)
    overrides = json.loads(args.score_json) if args.score_json else {}
    batch = overrides.get("batch_size", 4096)
    rows_per_block: list[int | None] = [None] + (args.rows_per_block or ([] if args.quick else [batch]))
    os.environ.pop("STREAMREC_CONFIG", None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="streamrec-bench-score-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        benchmark(work=work, users=users, items=items, seed=args.seed, device=args.device, repeats=args.repeats,
                  inner_repeats=args.inner_repeats or 2, profile=not args.no_profile,
                  model=json.loads(args.model_json) if args.model_json else None,
                  rows_per_block=rows_per_block, score_overrides=overrides, quick=args.quick)
    finally:
        os.environ.pop(PROBE_ENV, None)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
