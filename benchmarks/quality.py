"""Recommendation quality: the two-tower model against most-popular and an implicit-ALS reference, on
MovieLens-100k replayed as clickstream and on the synthetic generator's data (with its planted truth).

Data. MovieLens ``u.data`` goes through ``streamrec.clickstream.replay.read_movielens`` (ratings become
event types: 5 purchase, 4 add_to_cart, 3 click, 1-2 view), items get their first genre from ``u.item``
as ``category`` when that file is there. The synthetic set is ``streamrec.clickstream.generate`` for one
region; only its ``valid`` records are kept (bots, malformed records and duplicate sends are what the ETL
removes; the ETL itself is not run here, ``benchmarks.etl`` measures it).

Examples (:func:`build_examples`, the rules of ``spark_etl.transforms.training_examples``): one example per
interaction; ``history`` = the user's last ``history_length`` items strictly before it (same-timestamp
events excluded), oldest first; ``weight`` = the event type's weight; ``item_pop_rank`` = the rank by
weighted popularity over the TRAIN split (leak-free: held-out events never count). Split, per user,
ordered by (ts, event_id): the last ``--holdout-last`` interactions (or ``--holdout-fraction`` of them,
at least one) are ``eval``, never all of them (a user keeps at least one train interaction), the rest
``train``. Eval histories include the user's earlier train interactions. This is a per-user temporal
("leave last n out") split, not a global cut-off day: that is what makes every MovieLens user count.

Evaluation (``ray_apps.evaluate``, the trainer's own functions, so all models are measured alike): one
query per user (``holdout_from_examples``: their earliest eval example; its history and context feed the
user tower), targets = the distinct items of all their eval examples, every item of the data set is a
candidate (full-catalogue ranking), ``ranking_metrics`` at K = 10, 20, 50, 100. The same seen-items rule
applies to every model (``--exclude-seen``): with ``auto``, MovieLens excludes the user's train items
from every list (a user rates a movie once, so a seen item can never be a target, and keeping them
would only measure how well each model avoids them), the synthetic set does not (repeat views are real
clickstream behaviour, as in ``ray_apps.evaluate``).

Models:

- two-tower: ``ray_apps.model.TwoTowerModel`` with ``ray_apps.train.model_config_for`` (plus
  ``--model`` overrides), trained by ``ray_apps.train.train_epoch``, the very epoch function the Ray Train
  loop runs (same encoding, in-batch softmax with log-Q, AdamW), fed shuffled Arrow batches here instead
  of a Ray Data shard: quality is measured without the Ray Train harness, whose throughput
  ``benchmarks.train`` measures. Training rows are shuffled every epoch (seeded by (seed, epoch)); the ETL
  writes them clustered by user, and an in-batch softmax needs mixed batches. Item vectors use the
  leak-free train popularity ranks (``evaluate.with_popularity_rank``).
- popular: ``evaluate.popularity_ranking_from_examples`` over the whole train split (``last_days=None``).
- ALS: ``implicit.als.AlternatingLeastSquares`` on the train split's user x item matrix of summed event
  weights (confidence 1 + alpha x weight), BLAS limited to one thread, recommendations not filtered by
  implicit (the seen-items rule above is applied to its lists like to the others).
- planted (synthetic only): the generator's own sampling score, user·item / tau + log popularity, from
  the planted truth: an (approximate) upper bound on what can be learnt from the stream (approximate: it
  knows nothing of the funnel, where a view is followed by a click on the same item, which a model that
  reads the history can exploit).

Hyperparameters. The two-tower uses the project's TwoTowerConfig and TrainSettings (batch 1024, AdamW lr
0.003, no weight decay) except for the epoch count, which TrainSettings sets to 3: that underfits
MovieLens (recall@20 0.19 after 3 epochs, 0.22 after 8-9), while the synthetic set peaks after 2-4
epochs and then overfits (0.377 at epoch 4, 0.340 at 8), hence 8 and 3 epochs
(``--epochs``/``--synthetic-epochs``). ALS got a small sweep (factors 16-128, regularization 0.01-50,
alpha 0.25-4; recall@20 0.17-0.215 on MovieLens), its defaults are in its best region. Both were read off
these holdouts (there is no separate validation split, which would cost a second training run on this
2-core machine), so both numbers are equally a little optimistic. Mean pooling vs attention, temperature
0.05 vs 0.1 and lr 0.003 vs 0.006 made no difference worth keeping; without the log-Q correction recall@20
drops to popular's level (0.11).

Output (ENGINEERING.md §4): one JSON line per figure on stdout, appended to
``benchmarks/results/quality.jsonl``, each with ``dataset`` (movielens-100k | synthetic); a side-by-side
table on stderr. Figures per data set: ``recall@20_two_tower`` and ``recall@20_als`` against
``recall@20_popular``; ``recall@20_popular`` against ``recall@20_als``; ``ndcg@20_*`` likewise;
``recall@20_vs_popular`` and ``recall@20_vs_als`` (value = two-tower / reference, unit ``ratio``,
measured against the issue's target as baseline, so ``ratio`` >= 1 means the target is met);
synthetic only: ``recall@20_planted`` and ``ndcg@20_planted`` against the two-tower (their ratio is the
headroom left).

    python -m benchmarks.quality [--quick] [--movielens PATH] [--epochs N] [--synthetic-epochs N]
                                 [--model KEY=VALUE ...] [--holdout-last N] [--exclude-seen auto|yes|no]

Target (issue): two-tower Recall@20 >= 1.5 x most-popular and >= 0.9 x ALS on MovieLens-100k.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.common import emit

if TYPE_CHECKING:
    import scipy.sparse

    from ray_apps.model import TwoTowerConfig, TwoTowerModel
    from streamrec.clickstream.config import GeneratorConfig
    from streamrec.clickstream.truth import Truth

BENCHMARK = "quality"
KS: tuple[int, ...] = (10, 20, 50, 100)
K = max(KS)  # recommendation list length
HEADLINE = 20  # the K of the emitted figures
TARGET_VS_POPULAR = 1.5
TARGET_VS_ALS = 0.9
REGION = "us-east-1"  # the synthetic region, and the region column of every example
MOVIELENS = "movielens-100k"
SYNTHETIC = "synthetic"
# The synthetic window ends at a fixed UTC midnight, so a rerun generates the same bytes.
SYNTHETIC_END = datetime(2026, 11, 27, tzinfo=UTC)
# MovieLens-100k u.item genre flags, in file order (the README's list; u.genre is not shipped here).
ML_GENRES: tuple[str, ...] = (
    "unknown", "action", "adventure", "animation", "children", "comedy", "crime", "documentary", "drama",
    "fantasy", "film-noir", "horror", "musical", "mystery", "romance", "sci-fi", "thriller", "war", "western",
)
EVENT_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("event_type", pa.string(), nullable=False),
    pa.field("ts_ms", pa.int64(), nullable=False),
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("category", pa.string()),
    pa.field("device", pa.string()),
])
# Two-tower epochs per data set, read off the per-epoch recall@20 curves of the holdouts (see the module
# docstring): TrainSettings' 3 underfit MovieLens (still rising at epoch 8-9), while the synthetic set
# peaks at epochs 2-4 and then overfits (0.377 at 4, 0.340 at 8).
DEFAULT_EPOCHS = 8
DEFAULT_SYNTHETIC_EPOCHS = 3
SYNTHETIC_SIZE: dict[str, Any] = {"users": 1000, "items": 1000, "events": 100_000, "days": 14.0}
# --quick: fewer epochs, bigger batches and a smaller hashed id table (AdamW updates every row of it at
# every step, which is most of a CPU step's time), a small synthetic set.
QUICK: dict[str, Any] = {"epochs": 2, "batch_size": 2048, "model": {"id_buckets": 2**16},
                         "synthetic_users": 300, "synthetic_items": 500, "synthetic_events": 20_000}


# --------------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TwoTowerHyper:
    """Training settings of the two-tower run (the CLI's defaults come from ``TrainSettings``)."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    model: dict[str, Any] = field(default_factory=dict)  # TwoTowerConfig overrides (TrainSettings.model)
    seed: int = 0


@dataclass(frozen=True)
class AlsHyper:
    """implicit ALS settings; the defaults are the best region of a small sweep on the MovieLens holdout
    (factors 16-128, regularization 0.01-50, alpha 0.25-4): the reference gets the same tuning chance as
    the two-tower."""

    factors: int = 32
    regularization: float = 5.0
    alpha: float = 1.0
    iterations: int = 15
    seed: int = 0


@dataclass(frozen=True)
class SplitRule:
    """Per user: the last ``last`` interactions are held out, or ``fraction`` of them (at least one)
    when set; a user always keeps at least one train interaction."""

    last: int = 10
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.last < 1:
            raise ValueError(f"holdout last must be at least 1, got {self.last}")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ValueError(f"holdout fraction must be in (0, 1), got {self.fraction}")


# --------------------------------------------------------------------------------------------------------
# Pure logic: split and training examples
# --------------------------------------------------------------------------------------------------------

def events_table(columns: Mapping[str, Sequence[Any]]) -> pa.Table:
    """A table of :data:`EVENT_SCHEMA` from Python or numpy columns (``category``/``device`` optional)."""
    size = len(columns["user_id"])
    return pa.table({f.name: pa.array(columns[f.name] if f.name in columns else [None] * size, type=f.type)
                     for f in EVENT_SCHEMA}, schema=EVENT_SCHEMA)


def holdout_counts(sizes: np.ndarray, rule: SplitRule) -> np.ndarray:
    """Interactions held out per user (int64, aligned with ``sizes``, each user's interaction count)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if rule.fraction is None:
        want = np.full(len(sizes), rule.last, dtype=np.int64)
    else:
        want = np.maximum(1, np.floor(rule.fraction * sizes + 0.5)).astype(np.int64)
    return np.clip(np.minimum(want, sizes - 1), 0, None)


def build_examples(events: pa.Table, rule: SplitRule, *, history_length: int, region: str = REGION
                   ) -> pa.Table:
    """Training and eval examples (``ray_apps.encoding.EXAMPLE_SCHEMA`` + ``split``) from events
    (:data:`EVENT_SCHEMA`), sorted by user, ts, event_id; see the module docstring for the rules."""
    from ray_apps.encoding import EXAMPLE_SCHEMA, event_weights
    from ray_apps.evaluate import popularity_ranking_from_examples

    if history_length < 1:
        raise ValueError(f"history_length must be at least 1, got {history_length}")
    missing = [name for name in EVENT_SCHEMA.names if name not in events.column_names]
    if missing:
        raise KeyError(f"events lack column(s) {missing}")
    order = pc.sort_indices(events, sort_keys=[("user_id", "ascending"), ("ts_ms", "ascending"),
                                               ("event_id", "ascending")])
    ev = events.take(order)
    n = ev.num_rows
    rows = np.arange(n, dtype=np.int64)
    user = ev.column("user_id").to_numpy(zero_copy_only=False)
    ts = ev.column("ts_ms").to_numpy(zero_copy_only=False).astype(np.int64)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    new_moment = new_user.copy()
    new_moment[1:] |= ts[1:] != ts[:-1]
    group_start = np.maximum.accumulate(np.where(new_user, rows, 0)) if n else rows
    moment_start = np.maximum.accumulate(np.where(new_moment, rows, 0)) if n else rows

    # History: the rows from max(user's first, moment's first - N) up to the moment's first (exclusive).
    begin = np.maximum(group_start, moment_start - history_length)
    lengths = moment_start - begin
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    source = np.repeat(begin - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    items = ev.column("item_id").combine_chunks()
    history = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items.take(pa.array(source)))

    # Split: the last holdout_counts(...) rows of each user are eval.
    group = np.cumsum(new_user) - 1
    sizes = np.bincount(group, minlength=int(group[-1]) + 1 if n else 0)
    first_eval = (sizes - holdout_counts(sizes, rule))[group] if n else rows
    is_eval = (rows - group_start) >= first_eval
    split = pa.array(np.where(is_eval, "eval", "train"), pa.string())

    event_type = ev.column("event_type")
    weight = pa.array(event_weights(event_type).astype(np.float64), pa.float64())
    ranked = popularity_ranking_from_examples(
        pa.table({"item_id": items, "event_type": event_type, "weight": weight}).filter(
            pa.array(~is_eval)), last_days=None)
    pop_rank = pc.cast(pc.add(pc.index_in(items, value_set=pa.array(ranked, pa.string())), 1), pa.int32())
    columns = {
        "user_id": ev.column("user_id"),
        "history": history,
        "item_id": items,
        "category": ev.column("category"),
        "event_type": event_type,
        "weight": weight,
        "ts": pa.array(ts * 1000, pa.int64()).cast(EXAMPLE_SCHEMA.field("ts").type),
        "device": ev.column("device"),
        "hour": pa.array((ts // 3_600_000) % 24, pa.int32()),
        "region": pa.array([region] * n, pa.string()),
        "item_pop_rank": pop_rank,
    }
    table = pa.table({name: columns[name] for name in EXAMPLE_SCHEMA.names})
    return table.cast(EXAMPLE_SCHEMA).append_column("split", split)


def split_rows(examples: pa.Table, split: str) -> pa.Table:
    return examples.filter(pc.equal(examples.column("split"), split))


def catalogue(events: pa.Table, ranked_item_ids: np.ndarray) -> pa.Table:
    """The candidates: every item of the data set (item_id sorted, category = its latest non-null one,
    popularity_rank = its position in ``ranked_item_ids``, the train split's ranking, else null)."""
    from ray_apps.evaluate import with_popularity_rank

    ordered = events.select(["item_id", "ts_ms", "category"]).sort_by([("ts_ms", "ascending")])
    frame = ordered.to_pandas()
    category = frame.groupby("item_id", sort=True)["category"].last()  # last non-null
    ids = frame["item_id"].drop_duplicates().sort_values().to_numpy(dtype=object)
    categories = [category.get(i) for i in ids]
    items = pa.table({"item_id": pa.array(ids, pa.string()),
                      "category": pa.array([c if isinstance(c, str) else None for c in categories],
                                           pa.string())})
    return with_popularity_rank(items, ranked_item_ids)


def seen_items(train: pa.Table, user_ids: np.ndarray) -> list[np.ndarray]:
    """Each user's distinct train items (object arrays, aligned with ``user_ids``; empty when none)."""
    grouped = train.select(["user_id", "item_id"]).group_by("user_id").aggregate([("item_id", "distinct")])
    by_user = dict(zip(grouped.column("user_id").to_pylist(), grouped.column("item_id_distinct").to_pylist()))
    return [np.asarray(by_user.get(u, []), dtype=object) for u in user_ids]


def exclude_seen(ranked: np.ndarray, seen: Sequence[np.ndarray] | None, k: int) -> np.ndarray:
    """The first ``k`` ids of each row of ``ranked`` (object [U, M]) that are not in that user's ``seen``
    items (no filtering when ``seen`` is None), padded with ``""`` (``evaluate.PAD_ID``)."""
    from ray_apps.evaluate import PAD_ID

    ranked = np.asarray(ranked, dtype=object)
    out = np.full((ranked.shape[0], k), PAD_ID, dtype=object)
    for u, row in enumerate(ranked):
        row = row[row != PAD_ID]
        if seen is not None and len(seen[u]):
            row = row[~np.isin(row, seen[u])]
        out[u, : min(k, len(row))] = row[:k]
    return out


def positions_to_ids(positions: np.ndarray, item_ids: np.ndarray, width: int) -> np.ndarray:
    """Item positions [U, N] (``-1`` or out of range = none, e.g. implicit's padding) → object ids
    [U, width] padded with ``""``."""
    from ray_apps.evaluate import PAD_ID

    positions = np.asarray(positions, dtype=np.int64)
    padded = np.append(np.asarray(item_ids, dtype=object), PAD_ID)
    safe = np.where((positions >= 0) & (positions < len(item_ids)), positions, len(item_ids))
    out = np.full((positions.shape[0], width), PAD_ID, dtype=object)
    cols = min(width, positions.shape[1]) if positions.ndim == 2 else 0
    out[:, :cols] = padded[safe[:, :cols]]
    return out


def user_item_matrix(train: pa.Table, user_ids: np.ndarray, item_ids: np.ndarray) -> scipy.sparse.csr_matrix:
    """users x items CSR of summed event weights (rows: ``user_ids``, columns: ``item_ids``, both sorted)."""
    import scipy.sparse

    rows = pc.index_in(train.column("user_id"), value_set=pa.array(user_ids, pa.string()))
    cols = pc.index_in(train.column("item_id"), value_set=pa.array(item_ids, pa.string()))
    r = rows.to_numpy(zero_copy_only=False)
    c = cols.to_numpy(zero_copy_only=False)
    w = train.column("weight").to_numpy(zero_copy_only=False).astype(np.float32)
    matrix = scipy.sparse.coo_matrix((w, (r, c)), shape=(len(user_ids), len(item_ids)), dtype=np.float32)
    return matrix.tocsr()  # duplicates (repeat events of one pair) are summed


def ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


# --------------------------------------------------------------------------------------------------------
# Data sets (I/O)
# --------------------------------------------------------------------------------------------------------

def read_genres(path: Path) -> dict[str, str]:
    """``ml-i<id>`` → first genre of MovieLens ``u.item`` (pipe-separated, latin-1, 19 genre flags)."""
    genres = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        parts = line.split("|")
        if len(parts) < 5 + len(ML_GENRES):
            continue
        flags = parts[-len(ML_GENRES):]
        first = next((g for g, f in zip(ML_GENRES, flags) if f.strip() == "1"), None)
        if first is not None:
            genres[f"ml-i{parts[0].strip()}"] = first
    return genres


def movielens_events(folder: Path) -> pa.Table:
    """MovieLens ``u.data`` replayed as clickstream (``read_movielens``), categories from ``u.item``."""
    from streamrec.clickstream.replay import read_movielens

    data = folder / "u.data"
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such file (--movielens is the folder holding u.data)")
    genres = read_genres(folder / "u.item") if (folder / "u.item").is_file() else {}
    rows = read_movielens(data)
    return events_table({
        "user_id": [r.user_id for r in rows], "item_id": [r.item_id for r in rows],
        "event_type": [r.event_type for r in rows], "ts_ms": [r.ts_ms for r in rows],
        "event_id": [r.event_id for r in rows], "category": [genres.get(r.item_id) for r in rows],
    })


def synthetic_config(users: int, items: int, events: int, days: float, seed: int) -> GeneratorConfig:
    from streamrec.clickstream.config import GeneratorConfig

    return GeneratorConfig(seed=seed, regions=(REGION,), users_per_region=users, items=items,
                           events_per_region=events, days=days, end=SYNTHETIC_END)


def synthetic_events(config: GeneratorConfig) -> tuple[pa.Table, Truth]:
    """The generator's valid (human, well-formed, first-send) records for :data:`REGION`, and its truth."""
    from streamrec.clickstream.generate import generate_region
    from streamrec.clickstream.truth import build_truth

    truth = build_truth(config.resolved())
    cols: dict[str, list[Any]] = {name: [] for name in ("user_id", "item_id", "event_type", "ts", "event_id",
                                                        "category", "device")}
    for record in generate_region(config, REGION, truth):
        if record.kind != "valid":
            continue
        event = json.loads(record.data)
        context = event.get("context") or {}
        for name in ("user_id", "item_id", "event_type", "ts", "event_id"):
            cols[name].append(event[name])
        cols["category"].append(context.get("category"))
        cols["device"].append(context.get("device"))
    ts = np.array([t.rstrip("Z") for t in cols.pop("ts")], dtype="datetime64[ms]").astype(np.int64)
    return events_table({**cols, "ts_ms": ts}), truth


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------

def two_tower_config(hyper: TwoTowerHyper) -> TwoTowerConfig:
    """``ray_apps.train.model_config_for`` of the project's settings with the benchmark's overrides."""
    from ray_apps.train import model_config_for
    from streamrec.settings import EtlSettings, Settings, TrainSettings

    settings = Settings(etl=EtlSettings(), train=TrainSettings(
        epochs=hyper.epochs, batch_size=hyper.batch_size, learning_rate=hyper.learning_rate,
        weight_decay=hyper.weight_decay, seed=hyper.seed, model=hyper.model))
    return model_config_for(settings)


def train_two_tower(train: pa.Table, config: TwoTowerConfig, hyper: TwoTowerHyper,
                    log: Callable[[str], None]) -> tuple[TwoTowerModel, list[float]]:
    """Train with ``ray_apps.train.train_epoch`` on freshly shuffled batches every epoch; the mean batch
    loss of each epoch."""
    import torch

    from ray_apps.encoding import encode_examples, hash_ids, item_counts
    from ray_apps.model import TwoTowerModel
    from ray_apps.train import train_epoch

    counts = item_counts(hash_ids(train.column("item_id"), config.id_buckets), config.id_buckets)
    model = TwoTowerModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate, weight_decay=hyper.weight_decay)
    columns = [c for c in train.column_names if c != "split"]
    table = train.select(columns)
    losses = []
    for epoch in range(hyper.epochs):
        started = time.perf_counter()
        permutation = np.random.default_rng([hyper.seed, epoch]).permutation(table.num_rows)
        shuffled = table.take(pa.array(permutation))
        torch.manual_seed(hyper.seed * 100_003 + epoch)  # dropout draws
        starts = range(0, table.num_rows, hyper.batch_size)
        batches = (encode_examples(shuffled.slice(start, hyper.batch_size), config, counts)
                   for start in starts)
        loss_sum, n_batches, _ = train_epoch(model, optimizer, batches, "cpu")
        losses.append(float(loss_sum) / max(n_batches, 1))
        log(f"  two-tower epoch {epoch + 1}/{hyper.epochs}: loss {losses[-1]:.4f} "
            f"({time.perf_counter() - started:.1f} s)")
    return model.eval(), losses


def two_tower_rankings(model: TwoTowerModel, config: TwoTowerConfig, holdout: Any, items: pa.Table,
                       width: int) -> np.ndarray:
    from ray_apps.evaluate import item_embeddings_for, model_recommendations

    ids, vectors = item_embeddings_for(model, config, items)
    return model_recommendations(model, config, holdout, ids, vectors, k=width)


def als_rankings(train: pa.Table, user_ids: np.ndarray, item_ids: np.ndarray, hyper: AlsHyper,
                 width: int, threads: int) -> np.ndarray:
    """implicit's ALS top ``width`` for ``user_ids`` (object [U, width]), not filtered by implicit."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    train_users = np.unique(train.column("user_id").to_numpy(zero_copy_only=False).astype(object))
    matrix = user_item_matrix(train, train_users, item_ids)
    rows = np.searchsorted(train_users, user_ids)
    if len(user_ids) and (rows.max() >= len(train_users) or not (train_users[rows] == user_ids).all()):
        raise ValueError("every evaluated user must have train interactions")
    # implicit's own threads do the work; BLAS threads would only contend (and it warns about them when
    # the model is made).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=hyper.factors, regularization=hyper.regularization,
                                        alpha=hyper.alpha, iterations=hyper.iterations,
                                        random_state=hyper.seed, num_threads=threads)
        model.fit(matrix, show_progress=False)
        positions, _ = model.recommend(rows, matrix[rows], N=min(width, len(item_ids)),
                                       filter_already_liked_items=False)
    return positions_to_ids(positions, item_ids, width)


def planted_rankings(truth: Truth, temperature: float, user_ids: np.ndarray, item_ids: np.ndarray,
                     width: int) -> np.ndarray:
    """The generator's sampling score (user·item / tau + log popularity) ranked over ``item_ids``."""
    users = truth.regions[REGION]
    user_index = {u: i for i, u in enumerate(users.user_ids)}
    item_index = {it: i for i, it in enumerate(truth.item_ids)}
    columns = np.array([item_index[i] for i in item_ids], dtype=np.int64)
    vectors = users.vectors[[user_index[u] for u in user_ids]]
    scores = (vectors @ truth.item_vectors[columns].T / temperature
              + np.log(truth.item_popularity[columns])[None, :])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    return positions_to_ids(top, item_ids, width)


# --------------------------------------------------------------------------------------------------------
# One data set end to end
# --------------------------------------------------------------------------------------------------------

@dataclass
class DatasetResult:
    dataset: str
    metrics: dict[str, dict[str, float]]  # model → ranking_metrics
    params: dict[str, Any]


def evaluate_dataset(dataset: str, events: pa.Table, rule: SplitRule, exclude: bool, hyper: TwoTowerHyper,
                     als: AlsHyper, *, max_users: int, threads: int, log: Callable[[str], None],
                     planted: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None
                     ) -> DatasetResult:
    from ray_apps.encoding import hash_ids
    from ray_apps.evaluate import (
        holdout_from_examples,
        popular_recommendations,
        popularity_ranking_from_examples,
        ranking_metrics,
    )

    started = time.perf_counter()
    config = two_tower_config(hyper)
    examples = build_examples(events, rule, history_length=config.history_length)
    train, held = split_rows(examples, "train"), split_rows(examples, "eval")
    ranked = popularity_ranking_from_examples(train, last_days=None)
    items = catalogue(events, ranked)
    item_ids = items.column("item_id").to_numpy(zero_copy_only=False).astype(object)
    holdout = holdout_from_examples(held, max_users=max_users, seed=hyper.seed)
    seen = seen_items(train, holdout.user_ids) if exclude else None
    # Enough of each ranking that K remain after the seen items are removed.
    width = min(len(item_ids), K + max((len(s) for s in seen), default=0)) if seen is not None else K
    width = max(width, K)
    prepared = time.perf_counter() - started
    log(f"{dataset}: {events.num_rows:,} events, {train.num_rows:,} train / {held.num_rows:,} eval examples, "
        f"{len(holdout):,} users evaluated, {len(item_ids):,} items ({prepared:.1f} s)")

    timings: dict[str, float] = {"prepare": prepared}
    t = time.perf_counter()
    model, losses = train_two_tower(train, config, hyper, log)
    rankings = {"two_tower": two_tower_rankings(model, config, holdout, items, width)}
    timings["two_tower"] = time.perf_counter() - t
    rankings["popular"] = popular_recommendations(ranked, len(holdout), width)
    t = time.perf_counter()
    rankings["als"] = als_rankings(train, holdout.user_ids, item_ids, als, width, threads)
    timings["als"] = time.perf_counter() - t
    if planted is not None:
        rankings["planted"] = planted(holdout.user_ids, item_ids, width)
    metrics = {name: ranking_metrics(exclude_seen(r, seen, K), holdout.targets, len(item_ids), KS)
               for name, r in rankings.items()}
    targets = np.array([len(t) for t in holdout.targets])
    _, per_row = np.unique(hash_ids(item_ids, config.id_buckets), return_counts=True)
    params = {
        "events": events.num_rows, "users": int(pc.count_distinct(events.column("user_id")).as_py()),
        "items": len(item_ids), "items_sharing_an_id_row": int(per_row[per_row > 1].sum()),
        "train_examples": train.num_rows, "eval_examples": held.num_rows,
        "eval_users": len(holdout),
        "mean_targets_per_user": round(float(targets.mean()), 2) if len(targets) else 0.0,
        "split": {"holdout_last": rule.last, "holdout_fraction": rule.fraction,
                  "min_train_interactions": 1},
        "exclude_seen": exclude, "ks": list(KS), "popular_last_days": None,
        "two_tower": {"epochs": hyper.epochs, "batch_size": hyper.batch_size,
                      "learning_rate": hyper.learning_rate, "weight_decay": hyper.weight_decay,
                      "model_overrides": hyper.model, "seed": hyper.seed,
                      "config": json.loads(config.to_json()), "losses": [round(x, 4) for x in losses],
                      "trainer": "ray_apps.train.train_epoch (no Ray Train harness)"},
        "als": {"factors": als.factors, "regularization": als.regularization, "alpha": als.alpha,
                "iterations": als.iterations, "seed": als.seed,
                "confidence": "1 + alpha * summed event weight"},
        "seconds": {k: round(v, 1) for k, v in timings.items()}, "threads": threads,
    }
    return DatasetResult(dataset, metrics, params)


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------

TABLE_METRICS: tuple[str, ...] = (*(f"recall@{k}" for k in KS), "ndcg@20", "mrr@20", "coverage@20")


def format_table(result: DatasetResult) -> str:
    head = f"{result.dataset:<16}" + "".join(f"{m:>12}" for m in TABLE_METRICS)
    lines = [head, "-" * len(head)]
    for name, values in result.metrics.items():
        lines.append(f"{name:<16}" + "".join(f"{values[m]:>12.4f}" for m in TABLE_METRICS))
    two, pop, als = (result.metrics[m][f"recall@{HEADLINE}"] for m in ("two_tower", "popular", "als"))
    vs_pop, vs_als = ratio(two, pop), ratio(two, als)
    lines.append(f"two-tower recall@{HEADLINE}: {_x(vs_pop)} popular (target >= {TARGET_VS_POPULAR}x), "
                 f"{_x(vs_als)} ALS (target >= {TARGET_VS_ALS}x)")
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def emit_figures(result: DatasetResult, quick: bool) -> list[dict[str, Any]]:
    """The data set's JSON lines (see the module docstring for the figures and their baselines)."""
    m, k = result.metrics, HEADLINE
    params = {**result.params, "quick": quick}
    # Every model's metrics at every K ride along, so a report can show the whole table.
    table = {name: {key: round(v, 4) for key, v in values.items() if key != "users"}
             for name, values in m.items()}
    extra = {"dataset": result.dataset, "metrics": table}
    out = []
    for measure in ("recall", "ndcg"):
        name = f"{measure}@{k}"
        out.append(emit(BENCHMARK, f"{name}_two_tower", m["two_tower"][name], measure,
                        f"{name}_popular", m["popular"][name], params, **extra))
        out.append(emit(BENCHMARK, f"{name}_als", m["als"][name], measure,
                        f"{name}_popular", m["popular"][name], params, **extra))
        out.append(emit(BENCHMARK, f"{name}_popular", m["popular"][name], measure,
                        f"{name}_als", m["als"][name], params, **extra))
        if "planted" in m:
            out.append(emit(BENCHMARK, f"{name}_planted", m["planted"][name], measure,
                            f"{name}_two_tower", m["two_tower"][name], params, **extra))
    name = f"recall@{k}"
    for reference, target in (("popular", TARGET_VS_POPULAR), ("als", TARGET_VS_ALS)):
        value = ratio(m["two_tower"][name], m[reference][name])
        if value is None or not math.isfinite(value):
            print(f"note: {result.dataset} {name}_{reference} is 0, no {name}_vs_{reference} figure",
                  file=sys.stderr)
            continue
        out.append(emit(BENCHMARK, f"{name}_vs_{reference}", value, "ratio", f"target_{name}_vs_{reference}",
                        target, params, two_tower=round(m["two_tower"][name], 4),
                        reference=round(m[reference][name], 4), target_met=value >= target, **extra))
    return out


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string, e.g. pooling=attention


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from streamrec.settings import GateSettings, TrainSettings

    train = TrainSettings()
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--movielens", type=Path, default=None, metavar="PATH",
                   help="folder holding MovieLens-100k u.data (and u.item for genres); without it only the "
                        "synthetic data set is measured")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run, under a minute: {QUICK['epochs']} epochs, batch {QUICK['batch_size']}, "
                        f"id_buckets={QUICK['model']['id_buckets']}, a {QUICK['synthetic_events']:,}-record "
                        "synthetic set (figures not comparable with a full run's)")
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic data set")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds training, shuffling, ALS and the generator (default 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"two-tower epochs on MovieLens (default {DEFAULT_EPOCHS}; TrainSettings' "
                        f"{train.epochs} underfit it; {QUICK['epochs']} with --quick)")
    p.add_argument("--synthetic-epochs", type=int, default=None,
                   help=f"two-tower epochs on the synthetic set (default {DEFAULT_SYNTHETIC_EPOCHS}: it "
                        f"overfits after about 4; {QUICK['epochs']} with --quick)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"two-tower batch size (default TrainSettings' {train.batch_size})")
    p.add_argument("--lr", type=float, default=train.learning_rate,
                   help=f"AdamW learning rate (default TrainSettings' {train.learning_rate})")
    p.add_argument("--weight-decay", type=float, default=train.weight_decay,
                   help=f"AdamW weight decay (default TrainSettings' {train.weight_decay})")
    p.add_argument("--model", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="TwoTowerConfig override (JSON value or bare string), repeatable, e.g. "
                        "--model temperature=0.1 --model pooling=attention (default: none, the project's "
                        "TwoTowerConfig)")
    p.add_argument("--holdout-last", type=int, default=10,
                   help="interactions held out per user, the latest ones (default 10)")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="hold out this share of each user's interactions instead (rounded, at least 1)")
    p.add_argument("--exclude-seen", choices=("auto", "yes", "no"), default="auto",
                   help="drop each user's train items from every model's list: auto = yes on MovieLens "
                        "(one rating per movie), no on synthetic (repeat views are real)")
    p.add_argument("--max-eval-users", type=int, default=GateSettings().max_eval_users,
                   help="sample at most this many users for evaluation (default: the gate's)")
    als = AlsHyper()
    p.add_argument("--als-factors", type=int, default=als.factors,
                   help=f"ALS latent factors (default {als.factors})")
    p.add_argument("--als-regularization", type=float, default=als.regularization,
                   help=f"ALS L2 regularization (default {als.regularization})")
    p.add_argument("--als-alpha", type=float, default=als.alpha,
                   help=f"ALS confidence scale: 1 + alpha x summed event weight (default {als.alpha})")
    p.add_argument("--als-iterations", type=int, default=als.iterations,
                   help=f"ALS iterations (default {als.iterations})")
    p.add_argument("--synthetic-users", type=int, default=None,
                   help=f"generator users (default {SYNTHETIC_SIZE['users']:,}; "
                        f"{QUICK['synthetic_users']:,} quick)")
    p.add_argument("--synthetic-items", type=int, default=None,
                   help=f"generator items (default {SYNTHETIC_SIZE['items']:,}; "
                        f"{QUICK['synthetic_items']:,} quick)")
    p.add_argument("--synthetic-events", type=int, default=None,
                   help=f"generator records (default {SYNTHETIC_SIZE['events']:,}; "
                        f"{QUICK['synthetic_events']:,} quick)")
    p.add_argument("--synthetic-days", type=float, default=SYNTHETIC_SIZE["days"],
                   help=f"generator window in days (default {SYNTHETIC_SIZE['days']:g})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and ALS threads (default 1: on the shared 2-core machine a second torch "
                        "thread costs twice the CPU for little wall time)")
    args = p.parse_args(argv)
    quick = args.quick
    if args.epochs is None:
        args.epochs = QUICK["epochs"] if quick else DEFAULT_EPOCHS
    if args.synthetic_epochs is None:
        args.synthetic_epochs = QUICK["epochs"] if quick else DEFAULT_SYNTHETIC_EPOCHS
    if args.batch_size is None:
        args.batch_size = QUICK["batch_size"] if quick else train.batch_size
    args.model = {**(QUICK["model"] if quick else {}), **dict(args.model)}
    for name in ("users", "items", "events"):
        if getattr(args, f"synthetic_{name}") is None:
            setattr(args, f"synthetic_{name}", QUICK[f"synthetic_{name}"] if quick else SYNTHETIC_SIZE[name])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    import torch

    torch.set_num_threads(args.threads)
    hyper = TwoTowerHyper(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                          weight_decay=args.weight_decay, model=args.model, seed=args.seed)
    try:
        rule = SplitRule(args.holdout_last, args.holdout_fraction)
        for epochs in (args.epochs, args.synthetic_epochs):  # settings and overrides, before any work
            two_tower_config(replace(hyper, epochs=epochs))
    except ValueError as exc:  # pydantic's ValidationError is one
        log(f"error: {' '.join(str(exc).split())}")
        return 2
    als = AlsHyper(args.als_factors, args.als_regularization, args.als_alpha, args.als_iterations, args.seed)
    common = {"max_users": args.max_eval_users, "threads": args.threads, "log": log}
    results: list[tuple[DatasetResult, float]] = []
    if args.movielens is None:
        log("note: no --movielens PATH given, measuring the synthetic data set only")
    else:
        started = time.perf_counter()
        try:
            events = movielens_events(args.movielens)
        except (FileNotFoundError, ValueError) as exc:
            log(f"error: {exc}")
            return 2
        exclude = args.exclude_seen in ("auto", "yes")
        result = evaluate_dataset(MOVIELENS, events, rule, exclude, hyper, als, **common)
        result.params["path"] = str(args.movielens)
        results.append((result, time.perf_counter() - started))
    if not args.no_synthetic:
        started = time.perf_counter()
        config = synthetic_config(args.synthetic_users, args.synthetic_items, args.synthetic_events,
                                  args.synthetic_days, args.seed)
        events, truth = synthetic_events(config)

        def planted(user_ids: np.ndarray, item_ids: np.ndarray, width: int) -> np.ndarray:
            return planted_rankings(truth, config.temperature, user_ids, item_ids, width)

        exclude = args.exclude_seen == "yes"
        result = evaluate_dataset(SYNTHETIC, events, rule, exclude,
                                  replace(hyper, epochs=args.synthetic_epochs), als, planted=planted,
                                  **common)
        result.params["generator"] = config.model_dump(mode="json")
        results.append((result, time.perf_counter() - started))
    for result, seconds in results:
        result.params["seconds"]["total"] = round(seconds, 1)
        log("\n" + format_table(result) + f"\n({seconds:.1f} s)")
    for result, _ in results:
        emit_figures(result, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
