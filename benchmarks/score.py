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

Path measured: ``ray_apps.score.score(settings, region, day)`` end to end, as the CLI runs it
(``rows_per_block`` left to its default, ``ray_apps.score.default_rows_per_block``; ``--rows-per-block N``
adds variants): popularity list, Ray Data ``read_parquet`` → ``UserScorer`` actors (each loads the
weights and index from the registry) → ``write_parquet`` to staging → read-back check → summary →
folder swap. Ray is started BEFORE the clock starts (``ray.init`` is timed and reported apart, and in a
second figure that includes it).

Figures (users/s, each against the same baseline):

- ``score_users_per_s``: users / wall seconds of the ``score()`` call (THE figure of the issue);
- ``score_users_per_s_incl_ray_start``: the same with ``ray.init`` added;
- ``score_users_per_s_steady_state``: users / the scoring window, from the first batch an actor starts
  to the last batch an actor ends (start-up before it and the tail after it left out; labelled as such,
  it is NOT the end-to-end figure). The start-up is split into the driver's preparation (until Ray
  Data's execution starts: version checks, row count, popularity list, plan) and the actors' start
  (worker imports, ``UserScorer``'s constructor: torch, weights, index);
- ``score_in_process_users_per_s``: ``ray_apps.score.recommend_batch`` over batches of
  ``score.batch_size`` in this process, no Ray (the per-batch work; the rest of the gap is Ray).

Baseline: raw index search of the same user vectors, in this process with faiss on all C cores:
``AnnIndex.search(vectors, k=top_k)`` over every user, after ``ray_apps.score.user_vectors`` computed
the vectors (timed apart: the user-tower cost). The decomposition reported beside it, all in-process
on C threads, same model and index as the actors load:

- ``faiss_only``: the faiss call alone (``search`` on the raw faiss index, same nprobe, positions only);
- ``search``: ``AnnIndex.search`` without exclusion (THE BASELINE: faiss + mapping positions to ids);
- ``search_excluding``: ``AnnIndex.search_positions`` with ``exclude=purchased_items`` (the Arrow
  column) per batch of ``score.batch_size`` (what ``recommend_batch`` calls);
- ``user_tower``: ``user_vectors`` over every user, per batch;
- ``recommend_batch``: the whole per-batch function (tower + search + exclusion + Arrow output);
- ``*_legacy``: the same three with the code as it was before the vectorisation of issue 4 (kept in
  this file, below, as the reference): per-row exclusion in Python, mean pooling over a gathered
  ``[B, N, D]`` tensor with a mask, output lists from object arrays of Python strings. The run checks
  the new code against it: the same search positions and scores for the same vectors (exactly), user
  vectors within float rounding, and the recommendation lists (rows that differ must be swaps of items
  whose scores tie within 1e-5, or queries on an IVF probe boundary: both from the towers' last-bit
  rounding; anything else is counted as ``unexplained_rows``).

Each in-process figure is the best of ``--inner-repeats`` (CPU seconds of the process are reported too:
on a shared machine they are steadier than wall time); the two whole-batch functions run once each.
Inside the pipeline, the actors are timed too (``UserScorer`` wrapped for the call: when each became
ready, constructor seconds, batches, busy and CPU seconds, torch/faiss threads).

    python -m benchmarks.score [--quick] [--users N] [--items N] [--rows-per-block N] [--no-legacy]
                               [--object-store-mib N]

Target (issue 4): ratio >= 0.7 (Ray Data pipeline / raw index search, users/s) for 100k+ users and a
100k-item catalogue.
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
# The code before issue 4's vectorisation: the reference for the before/after figures and the checks
# --------------------------------------------------------------------------------------------------------

def legacy_search_positions(index: Any, queries: np.ndarray, k: int,
                            exclude: list[Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """``AnnIndex.search_positions`` as it was: excluded ids looked up per row, each row that needs it
    filtered with its own ``np.isin`` in a Python loop (same over-fetch and escalation rules)."""
    from ray_apps.ann import _MAX_ESCALATIONS, _as_matrix

    q = _as_matrix(queries, "queries", dim=index.dim)
    if not hasattr(index, "_legacy_lookup"):  # built once per index, as AnnIndex cached it
        index._legacy_lookup = {item: i for i, item in enumerate(index.item_ids.tolist())}
    lookup = index._legacy_lookup
    excluded = None if exclude is None else [
        np.asarray([] if ids is None else [lookup[i] for i in ids if i in lookup], dtype=np.int64)
        for ids in exclude]
    out_pos = np.full((len(q), k), -1, dtype=np.int64)
    out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    longest = max((e.size for e in excluded), default=0) if excluded is not None else 0
    pending = np.arange(len(q))
    fetch = min(len(index), k + longest)
    for round_ in range(_MAX_ESCALATIONS + 1):
        final = index.kind == "exact" or round_ == _MAX_ESCALATIONS
        scores, pos = index._raw_search(q[pending], fetch, effort=2**round_, exhaustive=final)
        done = np.zeros(len(pending), dtype=bool)
        if excluded is None and pos.shape[1] >= k:
            done = (pos[:, :k] >= 0).all(axis=1)
            out_pos[pending[done]] = pos[done, :k]
            out_scores[pending[done]] = scores[done, :k]
        for row in np.flatnonzero(~done):
            b = pending[row]
            keep = pos[row] >= 0
            if excluded is not None and excluded[b].size:
                keep &= ~np.isin(pos[row], excluded[b])
            got = np.flatnonzero(keep)[:k]
            if got.size == k or final:
                out_pos[b, : got.size] = pos[row, got]
                out_scores[b, : got.size] = scores[row, got]
                done[row] = True
        pending = pending[~done]
        if pending.size == 0:
            break
        fetch = min(len(index), fetch * 2)
    return out_pos, out_scores


def legacy_user_vectors(model: Any, users: Any, region: str) -> np.ndarray:
    """``ray_apps.score.user_vectors`` as it was: the history's vectors gathered into ``[B, N, D]`` and
    mean-pooled with a mask (``UserTower.forward``, which still pools that way)."""
    import torch

    from ray_apps.encoding import encode_users
    from ray_apps.model import as_tensors

    config = model.config
    device = users.column("device") if "device" in users.column_names else None
    user_id = users.column("user_id") if config.user_buckets > 0 else None
    batch = as_tensors(encode_users(users.column("last_items"), region, device, None, user_id, config=config),
                       next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            history = batch["history"]
            vectors = model.user_tower(model.history_embedding(history), history != 0, batch["region"],
                                       batch["device"], batch["hour"], batch.get("user_id"))
    finally:
        model.train(was_training)
    return np.ascontiguousarray(vectors.float().cpu().numpy(), dtype=np.float32)


def legacy_recommend_batch(batch: Any, *, model: Any, index: Any, region: str, popular: Any, top_k: int,
                           model_version: str, generated_at: Any, min_history: int = 1,
                           exclude_purchased: bool = True) -> Any:
    """``ray_apps.score.recommend_batch`` as it was (pyarrow batches only): purchases as Python lists,
    results as object arrays of Python strings, cold buyers filtered one by one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ray_apps.score import RECS_SCHEMA, SOURCE_MODEL, SOURCE_POPULAR, utc

    rows = batch.num_rows
    cold = pc.fill_null(pc.list_value_length(batch.column("last_items")), 0).to_numpy(
        zero_copy_only=False) < min_history
    purchased = batch.column("purchased_items").to_pylist() if exclude_purchased else None
    ids = np.full((rows, top_k), "", dtype=object)
    scores = np.full((rows, top_k), -np.inf, dtype=np.float32)
    padded = np.append(index.item_ids.astype(object), "")
    warm = np.flatnonzero(~cold)
    if warm.size:
        vectors = legacy_user_vectors(model, batch.take(pa.array(warm)), region)
        exclude = [purchased[i] for i in warm] if purchased is not None else None
        pos, found = legacy_search_positions(index, vectors, top_k, exclude)
        ids[warm], scores[warm] = padded[pos], found
    pop_ids = np.asarray(popular.item_ids, dtype=object)
    pop_scores = np.asarray(popular.scores, dtype=np.float32)
    for r in np.flatnonzero(cold):
        bought = purchased[r] if purchased is not None else None
        keep = np.arange(len(pop_ids)) if not bought else np.flatnonzero(
            ~np.isin(pop_ids, np.asarray(list(bought), dtype=object)))
        keep = keep[:top_k]
        ids[r, : keep.size], scores[r, : keep.size] = pop_ids[keep], pop_scores[keep]
    valid = ids != ""
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32), pa.int32())
    return pa.Table.from_arrays([
        batch.column("user_id").cast(pa.string()),
        pa.ListArray.from_arrays(offsets, pa.array(ids[valid], type=pa.string())),
        pa.ListArray.from_arrays(offsets, pa.array(scores[valid], type=pa.float32())),
        pa.array(np.where(cold, SOURCE_POPULAR, SOURCE_MODEL).astype(object), type=pa.string()),
        pa.repeat(pa.scalar(model_version, pa.string()), rows),
        pa.repeat(pa.scalar(utc(generated_at), RECS_SCHEMA.field("generated_at").type), rows),
    ], schema=RECS_SCHEMA)


# --------------------------------------------------------------------------------------------------------
# Baseline and decomposition, in this process on all cores
# --------------------------------------------------------------------------------------------------------

def compare_search(ref_pos: np.ndarray, ref_scores: np.ndarray, pos: np.ndarray,
                   scores: np.ndarray) -> dict[str, Any]:
    """Rows whose positions differ, and the largest score difference (both must be 0: the same faiss
    calls on the same vectors)."""
    finite = np.isfinite(ref_scores) & np.isfinite(scores)
    return {"rows": len(pos), "rows_identical": int((pos == ref_pos).all(axis=1).sum()),
            "same_padding": bool((np.isfinite(ref_scores) == np.isfinite(scores)).all()),
            "max_score_diff": float(np.max(np.abs(scores[finite] - ref_scores[finite]), initial=0.0))}


def compare_lists(ref: Any, new: Any) -> dict[str, Any]:
    """Two RECS tables row by row: identical item lists, and among the rows that differ, those whose
    score sequences agree within 1e-5 at every rank (an order swap of near-tied items: the user vectors
    differ in the last bits) against the rest (``unexplained_rows``, their indexes in ``_unexplained``;
    after :func:`probe_boundary_ties` a bug if not 0)."""
    same_schema = ref.schema == new.schema
    ref_ids, new_ids = ref.column("item_ids").to_pylist(), new.column("item_ids").to_pylist()
    ref_sc, new_sc = ref.column("scores").to_pylist(), new.column("scores").to_pylist()
    identical, near, other = 0, 0, []
    for row, (a, b, sa, sb) in enumerate(zip(ref_ids, new_ids, ref_sc, new_sc, strict=True)):
        if a == b:
            identical += 1
        elif len(a) == len(b) and np.allclose(sa, sb, rtol=0, atol=1e-5):
            near += 1
        else:
            other.append(row)
    other_columns = all(ref.column(c).equals(new.column(c)) for c in ("user_id", "source", "model_version",
                                                                       "generated_at"))
    return {"same_schema": same_schema, "rows": len(ref_ids), "rows_identical": identical,
            "rows_near_tie_swaps_only": near, "unexplained_rows": len(other),
            "other_columns_equal": other_columns, "_unexplained": other}


def probe_boundary_ties(index: Any, rows: list[int], a: np.ndarray, b: np.ndarray) -> int:
    """Of ``rows``, how many sit on an IVF probe boundary: for vector ``a`` or ``b`` of the row, the
    nprobe-th and next-nearest centroids score within 1e-6 of each other, so which of the two lists is
    probed follows the last bits of the user vector (and of faiss's batched BLAS product), and the lists
    may then differ beyond near-tied swaps from rounding alone."""
    import faiss

    if not rows or index.kind != "ivf":
        return 0
    quantizer = faiss.downcast_index(index._index).quantizer
    nprobe = int(index.params["nprobe"])
    tied = np.zeros(len(rows), dtype=bool)
    for vectors in (a, b):
        scores, _ = quantizer.search(np.ascontiguousarray(vectors[rows]), nprobe + 1)
        tied |= scores[:, nprobe - 1] - scores[:, nprobe] <= 1e-6
    return int(tied.sum())


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


def run_in_process(world: World, threads: int, device: str, repeats: int, legacy: bool) -> dict[str, Any]:
    """The baseline and the decomposition (see the module docstring), ``threads`` torch and faiss threads.
    Each figure is the best of ``repeats``, except the whole-batch functions (once each: they are the
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
    checks: dict[str, Any] = {}
    try:
        registry = ModelRegistry.from_settings(settings, REGION)
        seconds["load_model_and_index"], (model, index) = timed(  # what each actor does first
            lambda: load_scoring_model(registry, world.version, device), 1, cpu, "load_model_and_index")
        batches = [users.slice(i, batch) for i in range(0, n, batch)]
        seconds["user_tower"], vectors = timed(
            lambda: np.concatenate([user_vectors(model, b, REGION) for b in batches]), repeats, cpu,
            "user_tower")
        if legacy:
            seconds["user_tower_legacy"], legacy_vectors = timed(
                lambda: np.concatenate([legacy_user_vectors(model, b, REGION) for b in batches]), repeats,
                cpu, "user_tower_legacy")
            checks["user_vectors_max_abs_diff"] = float(np.abs(legacy_vectors - vectors).max())
        nprobe = index.params.get("nprobe")

        def faiss_only() -> Any:
            if index.kind == "ivf":
                return index._index.search(vectors, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
            return index._index.search(vectors, k)

        seconds["faiss_only"], _ = timed(faiss_only, repeats, cpu, "faiss_only")
        seconds["search"], _ = timed(lambda: index.search(vectors, k), repeats, cpu, "search")  # the baseline
        purchased = users.column("purchased_items").combine_chunks()

        def excluding() -> list[Any]:  # per batch, as recommend_batch calls it
            return [index.search_positions(vectors[i:i + batch], k, purchased.slice(i, batch))
                    for i in range(0, n, batch)]

        seconds["search_excluding"], parts = timed(excluding, repeats, cpu, "search_excluding")
        if legacy:
            exclude = purchased.to_pylist()

            def excluding_legacy() -> list[Any]:
                return [legacy_search_positions(index, vectors[i:i + batch], k, exclude[i:i + batch])
                        for i in range(0, n, batch)]

            seconds["search_excluding_legacy"], legacy_parts = timed(excluding_legacy, repeats, cpu,
                                                                     "search_excluding_legacy")
            checks["search_excluding_vs_legacy"] = compare_search(
                np.concatenate([p for p, _ in legacy_parts]), np.concatenate([s for _, s in legacy_parts]),
                np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts]))

        paths = FeaturePaths.for_day(settings, REGION, DAY)
        spare = settings.etl.purchased_items_max if scoring.exclude_purchased else 0
        popular = read_popular(paths.fs, paths.table("items"), scoring.top_k + spare)
        kwargs = {"model": model, "index": index, "region": REGION, "popular": popular, "top_k": k,
                  "model_version": world.version, "generated_at": default_generated_at(DAY),
                  "min_history": scoring.min_history, "exclude_purchased": scoring.exclude_purchased}
        seconds["recommend_batch"], new = timed(
            lambda: [recommend_batch(b, **kwargs) for b in batches], 1, cpu, "recommend_batch")
        if legacy:
            seconds["recommend_batch_legacy"], old = timed(
                lambda: [legacy_recommend_batch(b, **kwargs) for b in batches], 1, cpu,
                "recommend_batch_legacy")
            lists = compare_lists(pa.concat_tables(old), pa.concat_tables(new))
            # Every benchmark user is warm, so table row i is vector row i.
            ties = probe_boundary_ties(index, lists.pop("_unexplained"), vectors, legacy_vectors)
            lists["rows_ivf_probe_boundary_ties"] = ties
            lists["unexplained_rows"] -= ties
            checks["recommend_batch_vs_legacy"] = lists
    finally:
        torch.set_num_threads(previous)
        configure_threads()
    rates = {key: round(n / v, 1) for key, v in seconds.items() if key != "load_model_and_index"}
    return {
        "seconds": {key: round(v, 3) for key, v in seconds.items()},
        "cpu_seconds": {key: round(v, 3) for key, v in cpu.items()},
        "users_per_s": rates,
        "checks": checks,
        "users_with_purchases": _non_empty(purchased),
        "purchased_items_total": len(purchased.flatten()),
        "threads": threads,
    }


def _non_empty(lists: Any) -> int:
    """Rows of an Arrow list array with at least one element."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.greater(pc.fill_null(pc.list_value_length(lists), 0), 0)).as_py() or 0)


# --------------------------------------------------------------------------------------------------------
# Timing the pipeline from inside: the actors and the driver
# --------------------------------------------------------------------------------------------------------

class ProbedUserScorer:
    """``ray_apps.score.UserScorer`` inside a timer: the benchmark hands this class to ``score()`` (in place
    of the module's ``UserScorer`` for the call); in the actor it builds the real ``UserScorer`` and
    appends one JSON line per event (constructor, batch) to ``$BENCH_SCORE_PROBE_DIR/actor-<pid>.jsonl``."""

    def __init__(self, **kwargs: Any) -> None:
        start = time.time()
        modules = set(sys.modules)
        from ray_apps.score import UserScorer  # in the actor process: the real class

        self.inner = UserScorer(**kwargs)
        self._log({"event": "init", "start": start, "end": time.time(), "process_created": _process_created(),
                   "torch_imported_here": "torch" not in modules and "torch" in sys.modules})

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
def probed(probe_dir: Path | None, marks: dict[str, float]) -> Iterator[None]:
    """Actors wrapped in :class:`ProbedUserScorer`, and ``marks["execution_started"]`` (``_ended``) set when
    the driver hands the plan to Ray Data (``Dataset.write_parquet``, which runs it) and when it returns."""
    import ray.data

    import ray_apps.score as rs

    if probe_dir is None:
        yield
        return
    original_scorer, original_write = rs.UserScorer, ray.data.Dataset.write_parquet

    def write_parquet(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks["execution_started"] = time.time()
        try:
            return original_write(self, *args, **kwargs)
        finally:
            marks["execution_ended"] = time.time()

    rs.UserScorer = ProbedUserScorer
    ray.data.Dataset.write_parquet = write_parquet
    try:
        yield
    finally:
        rs.UserScorer = original_scorer
        ray.data.Dataset.write_parquet = original_write


def _machine_busy_s() -> float | None:
    """CPU seconds all processes of this machine have used since boot (Linux ``/proc/stat``), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _after(moment: float | None, t0: float) -> float | None:
    return None if moment is None else round(moment - t0, 2)


def actor_report(probe_dir: Path, t0: float, wall: float, users: int,
                 marks: dict[str, float]) -> dict[str, Any]:
    """Per actor: constructor seconds, batches, busy seconds (in ``__call__``), CPU seconds; and the wall
    time split into start-up (driver preparation, then actor start until the first batch), the scoring
    window (first batch start to last batch end) and the tail (Ray Data's last writes and shut-down, then
    the driver's read-back check, summary and swap)."""
    actors, starts, ends, ready = [], [], [], []
    for path in sorted(probe_dir.glob("actor-*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines()]
        inits = [e for e in events if e["event"] == "init"]
        calls = [e for e in events if e["event"] == "batch"]
        starts += [e["start"] for e in calls]
        ends += [e["end"] for e in calls]
        ready += [e["end"] for e in inits]
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
            "first_batch_start_s": round(min(e["start"] for e in calls) - t0, 2) if calls else None,
            "last_batch_end_s": round(max(e["end"] for e in calls) - t0, 2) if calls else None,
        })
    busy = sum(a["busy_s"] for a in actors)
    out: dict[str, Any] = {"actors": actors, "actor_busy_s": round(busy, 2),
                           "busy_share_of_wall_x_actors": round(busy / (wall * max(len(actors), 1)), 3)}
    if starts:
        first, last = min(starts) - t0, max(ends) - t0
        prep = marks.get("execution_started", t0) - t0
        ended = marks.get("execution_ended", t0 + wall) - t0
        out["phases_s"] = {"driver_prep": round(prep, 2), "actor_start": round(first - prep, 2),
                           "startup_total": round(first, 2), "scoring_window": round(last - first, 2),
                           "tail": round(wall - last, 2), "tail_ray_data": round(ended - last, 2),
                           "tail_driver_checks_and_swap": round(wall - ended, 2), "wall": round(wall, 2),
                           "actors_ready_after": [round(r - t0, 2) for r in sorted(ready)]}
        out["startup_share_of_wall"] = round(first / wall, 3)
        out["steady_state_users_per_s"] = round(users / max(last - first, 1e-9), 1)
    return out


# --------------------------------------------------------------------------------------------------------
# The Ray Data pipeline
# --------------------------------------------------------------------------------------------------------

def run_pipeline(settings: Any, rows_per_block: int | None, probe_dir: Path | None) -> dict[str, Any]:
    from ray_apps.score import score

    if probe_dir is not None:
        shutil.rmtree(probe_dir, ignore_errors=True)
        probe_dir.mkdir(parents=True)
    marks: dict[str, float] = {}
    machine_before, driver_before = _machine_busy_s(), time.process_time()
    t0 = time.time()
    t = time.perf_counter()
    with probed(probe_dir, marks):
        summary = score(settings, REGION, DAY, rows_per_block=rows_per_block)
    wall = time.perf_counter() - t
    machine_after = _machine_busy_s()
    out = {"wall_s": wall, "users": summary.users, "model_scored": summary.model_scored,
           "files": len(summary.files), "summary_seconds": summary.seconds,
           "rows_per_block_used": summary.params.get("rows_per_block"),
           # Whether the cores were free: every process's CPU over the call (other work included), the
           # driver's own, and what the cores could give (the actors' share is in pipeline.actors).
           "cpu_s": {"machine": None if machine_before is None or machine_after is None
                     else round(machine_after - machine_before, 2),
                     "driver": round(time.process_time() - driver_before, 2),
                     "available": round(wall * (os.cpu_count() or 1), 2)}}
    if probe_dir is not None:
        out.update(actor_report(probe_dir, t0, wall, summary.users, marks))
    return out


# --------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def benchmark(*, work: Path, users: int, items: int, seed: int, device: str, repeats: int, inner_repeats: int,
              rows_per_block: list[int | None], score_overrides: dict[str, Any], quick: bool,
              profile: bool = True, legacy: bool = True, object_store_mib: int | None = None,
              model: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Build the lake and version, run the in-process baseline and ``score()`` (alternating, ``repeats``
    times), emit the figures; returns the emitted lines."""
    from ray_apps.ann import _usable_cpus
    from ray_apps.train import model_config_for

    device = resolve_device(device)
    cores = _usable_cpus()
    load_before = _load()
    store = {} if object_store_mib is None else {"object_store_bytes": object_store_mib * 1024 * 1024}
    settings = make_settings(work / "lake", score_overrides, model, **store)
    world = build_world(settings, users, items, seed, device)
    print(f"set-up: {users:,} users, {items:,} items, index {world.index_info['kind']} "
          f"{world.index_info.get('params')}, recall@100 {world.index_info.get('recall_at_100')}; "
          f"{world.setup}; load {load_before}", file=sys.stderr)

    baselines: list[dict[str, Any]] = []
    pipelines: dict[str, list[dict[str, Any]]] = {str(r): [] for r in rows_per_block}
    ray_init: list[float] = []
    for r in range(repeats):
        base = run_in_process(world, cores, device, repeats=inner_repeats, legacy=legacy)
        baselines.append(base)
        ups = base["users_per_s"]
        print(f"repeat {r + 1}: in-process ({cores} threads) users/s: " + ", ".join(
            f"{key} {value:,.0f}" for key, value in ups.items()) + f"; checks {base['checks']}",
            file=sys.stderr)
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
                print(f"repeat {r + 1}: score() rows_per_block={rpb} (used {run['rows_per_block_used']}): "
                      f"{run['wall_s']:.1f} s, {run['users'] / run['wall_s']:,.0f} users/s, "
                      f"{run['files']} files "
                      f"(ray.init {started:.1f} s before the clock); phases {run.get('phases_s')}; "
                      f"steady state {run.get('steady_state_users_per_s')} users/s; CPU s {run['cpu_s']}; "
                      f"{actors}",
                      file=sys.stderr)

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
              "weights": "random init (seeded): quality not measured",
              "object_store_bytes": settings.train.object_store_bytes,
              "load_avg_before": load_before, "load_avg_after": _load()}
    decomposition = {"in_process_seconds": best_base["seconds"],
                     "in_process_cpu_seconds": best_base["cpu_seconds"],
                     "in_process_users_per_s": best_base["users_per_s"],
                     "checks": best_base["checks"], "baseline_threads": cores, "setup_s": world.setup}
    lines = []
    for rpb in rows_per_block:
        runs = pipelines[str(rpb)]
        best = min(runs, key=lambda x: x["wall_s"])
        suffix = "" if rpb is None else f"_rows_per_block_{rpb}"
        p = {**params, "rows_per_block": rpb, "rows_per_block_used": best["rows_per_block_used"],
             "output_files": best["files"]}
        rate = best["users"] / best["wall_s"]
        pipeline = {key: best[key] for key in ("phases_s", "startup_share_of_wall", "cpu_s", "actors",
                                               "actor_busy_s", "busy_share_of_wall_x_actors") if key in best}
        lines.append(emit("score", f"score_users_per_s{suffix}", rate, "users/s",
                          "raw_index_search_users_per_s", raw_rate, p, ray_start_included=False,
                          measure="end to end: users / wall seconds of score(), actor start-up included",
                          score_wall_s=round(best["wall_s"], 2),
                          ray_init_s=round(min(ray_init), 2), pipeline=pipeline, **decomposition))
        with_start = best["users"] / (best["wall_s"] + min(ray_init))
        lines.append(emit("score", f"score_users_per_s_incl_ray_start{suffix}", with_start, "users/s",
                          "raw_index_search_users_per_s", raw_rate, p, ray_start_included=True,
                          score_wall_s=round(best["wall_s"], 2), ray_init_s=round(min(ray_init), 2)))
        if "steady_state_users_per_s" in best:
            lines.append(emit("score", f"score_users_per_s_steady_state{suffix}",
                              best["steady_state_users_per_s"], "users/s", "raw_index_search_users_per_s",
                              raw_rate, p,
                              measure="STEADY STATE ONLY (not end to end): users / seconds from the first "
                                      "batch an actor starts to the last batch an actor ends; start-up and "
                                      "tail excluded, see phases_s",
                              phases_s=best.get("phases_s")))
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
                        help="score(rows_per_block=N) variant to run besides the default; repeatable")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; the best of each is kept")
    parser.add_argument("--inner-repeats", type=int, default=None,
                        help="best-of-N for each in-process measurement (default 2)")
    parser.add_argument("--no-profile", action="store_true", help="no timers around the scoring actors")
    parser.add_argument("--no-legacy", action="store_true",
                        help="skip the pre-vectorisation reference code (figures and checks)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the in-process baseline's user tower runs (the actors pick CUDA when "
                             "Ray has GPUs)")
    parser.add_argument("--score-json", default=None,
                        help='ScoreSettings overrides, e.g. \'{"concurrency": 1}\'')
    parser.add_argument("--model-json", default=None,
                        help='TwoTowerConfig overrides (train.model), e.g. \'{"id_buckets": 65536}\'')
    parser.add_argument("--object-store-mib", type=int, default=None,
                        help="Ray object store of the local cluster in MiB (default: "
                             "train.object_store_bytes, 512 MiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="work here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    users = args.users or (10_000 if args.quick else 100_000)
    items = args.items or (10_000 if args.quick else 100_000)
    overrides = json.loads(args.score_json) if args.score_json else {}
    rows_per_block: list[int | None] = [None] + (args.rows_per_block or [])
    os.environ.pop("STREAMREC_CONFIG", None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="streamrec-bench-score-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        benchmark(work=work, users=users, items=items, seed=args.seed, device=args.device, repeats=args.repeats,
                  inner_repeats=args.inner_repeats or 2, profile=not args.no_profile,
                  legacy=not args.no_legacy, object_store_mib=args.object_store_mib,
                  model=json.loads(args.model_json) if args.model_json else None,
                  rows_per_block=rows_per_block, score_overrides=overrides, quick=args.quick)
    finally:
        os.environ.pop(PROBE_ENV, None)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
