"""Offline evaluation of a two-tower model on the cutoff day, against a most-popular baseline, and the
promotion gate that decides from those numbers.

The protocol, in one paragraph: the ETL's ``split=eval`` examples are the interactions of the cutoff day
D. Each evaluated user contributes ONE query, their earliest example of day D (its ``history`` holds only
items strictly before that moment, and its region, device and hour are the request's context), and the
TARGETS are all the distinct items they interacted with on day D. Every item of the items table is a
candidate (full-catalogue ranking by exact inner product, no sampled negatives, which would flatter
every model), and items the user already has in their history are NOT excluded: repeat views and
re-purchases are real clickstream behaviour, and the serving path does not exclude them either (only
purchases, and only when configured). The baseline recommends the same list to everyone: items ranked by
weighted event counts over the last days of the TRAIN split, the very information the model trained on.
(The items table's ``popularity_rank`` for day D counts day D's own events, which would hand the
baseline the answers; :func:`with_popularity_rank` gives the item tower the same leak-free ranks.)

Layering: holdout construction, metrics and the gate are pure numpy/pyarrow and tested with tables of
cases; only :func:`model_recommendations`, :func:`item_embeddings_for` and :func:`evaluate` touch torch.
The gate compares numbers only; the trainer measures the promoted model on the SAME holdout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ray_apps.encoding import encode_items, encode_users, event_weights
from ray_apps.model import TwoTowerConfig, TwoTowerModel, as_tensors
from streamrec.settings import GateSettings

DEFAULT_KS: tuple[int, ...] = (10, 20, 50, 100)
PAD_ID = ""  # the id of an empty slot in a recommendation row (a catalogue smaller than K)
QUERY_COLUMNS: tuple[str, ...] = ("user_id", "history", "region", "device", "hour")
# Scores held at once by the exact top-k (float32 count): 64 MB whatever the catalogue size.
_SCORE_BLOCK = 16 * 1024 * 1024
# Float slack for the gate's thresholds: a candidate exactly at the threshold passes despite rounding.
_GATE_EPS = 1e-12
_TICKS_PER_DAY = {"s": 86_400, "ms": 86_400_000, "us": 86_400_000_000, "ns": 86_400_000_000_000}


# --------------------------------------------------------------------------- holdout


@dataclass(frozen=True)
class Holdout:
    """One query per evaluated user and the items they went on to interact with.

    ``user_ids[i]``, ``queries`` row ``i`` and ``targets[i]`` belong together; users are in sorted id
    order. ``queries`` has :data:`QUERY_COLUMNS` (what :func:`ray_apps.encoding.encode_users` reads);
    ``targets[i]`` is an object array of distinct item ids (sorted). ``total_users`` is how many users
    the eval day had before sampling.
    """

    user_ids: np.ndarray
    queries: pa.Table
    targets: list[np.ndarray]
    total_users: int = 0

    def __len__(self) -> int:
        return len(self.user_ids)


def holdout_from_examples(eval_examples: pa.Table, *, max_users: int, seed: int = 0) -> Holdout:
    """The evaluation holdout from the ETL's ``split=eval`` examples (columns per EXAMPLES).

    Query = the user's earliest eval example (ties on ``ts`` go to the earlier row); targets = the
    distinct items of all their eval examples, the query's own item included. When more than
    ``max_users`` users are present a seeded sample is drawn from the sorted user ids, so the result
    depends on the set of users and the seed, not on the row order of the Parquet files. A ``split``
    column, when present, is honoured (only ``eval`` rows are used).
    """
    if max_users < 1:
        raise ValueError(f"max_users must be at least 1, got {max_users}")
    table = _eval_rows(eval_examples)
    users, user_values = _sorted_codes(table.column("user_id"))
    n_users = len(user_values)
    chosen = _sample(n_users, max_users, seed)
    # Only the sampled users' rows are grouped: the sample is drawn first, from the sorted distinct ids.
    slot = np.full(n_users, -1, dtype=np.int64)
    slot[chosen] = np.arange(len(chosen))
    rows = np.flatnonzero(slot[users] >= 0)
    sampled = slot[users[rows]]  # 0..len(chosen)-1, in sorted user-id order
    items, item_values = _sorted_codes(table.column("item_id"))
    query_rows = rows[_earliest_rows(sampled, _timestamps(table.column("ts"))[rows])]
    return Holdout(
        user_ids=user_values[chosen],
        queries=table.take(pa.array(query_rows, pa.int64())).select(QUERY_COLUMNS),
        targets=_distinct_targets(sampled, items[rows], item_values, len(chosen)),
        total_users=n_users,
    )


def _eval_rows(table: pa.Table) -> pa.Table:
    missing = [c for c in (*QUERY_COLUMNS, "item_id", "ts") if c not in table.column_names]
    if missing:
        raise KeyError(f"eval examples lack column(s) {', '.join(missing)}; they have {table.column_names}")
    if "split" in table.column_names:
        table = table.filter(pc.equal(table.column("split"), "eval"))
    # user_id and item_id are non-null by contract; a null one cannot be a query or a target.
    return table.filter(pc.and_(pc.is_valid(table.column("user_id")), pc.is_valid(table.column("item_id"))))


def _sorted_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strings → (codes int64 [rows], distinct values object [V]) with codes in sorted-value order.

    Dictionary encoding hashes each distinct string once; sorting only the dictionary keeps string
    comparisons to V values instead of every row.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = column.dictionary_encode()
    dictionary = encoded.dictionary
    order = pc.sort_indices(dictionary).to_numpy(zero_copy_only=False)
    rank = np.empty(len(dictionary), dtype=np.int64)
    rank[order] = np.arange(len(dictionary), dtype=np.int64)
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)]
    values = dictionary.to_numpy(zero_copy_only=False).astype(object)[order]
    return codes, values


def _timestamps(ts: pa.ChunkedArray) -> np.ndarray:
    """Any timestamp column → int64 ticks (a missing one sorts last, so it is never the query)."""
    ticks = pc.cast(ts, pa.int64()) if pa.types.is_timestamp(ts.type) else ts
    return pc.fill_null(ticks, np.iinfo(np.int64).max).to_numpy(zero_copy_only=False).astype(np.int64)


def _earliest_rows(users: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """Row index of each user's earliest example (user codes 0..V-1, all present)."""
    order = np.lexsort((np.arange(len(users)), ticks, users))  # last key sorts first
    first = np.ones(len(order), dtype=bool)
    first[1:] = users[order[1:]] != users[order[:-1]]
    return order[first]


def _distinct_targets(users: np.ndarray, items: np.ndarray, item_values: np.ndarray,
                      n_users: int) -> list[np.ndarray]:
    """Each user's distinct item ids (sorted), one object array per user code 0..n_users-1."""
    if n_users == 0:
        return []
    width = max(len(item_values), 1)
    pairs = np.unique(users * width + items)  # sorted by user, then item
    bounds = np.searchsorted(pairs // width, np.arange(1, n_users))
    return np.split(item_values[pairs % width], bounds)


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of ``size`` out of ``n`` (everything when n <= size)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


# --------------------------------------------------------------------------- metrics


def ranking_metrics(
    recommended: np.ndarray,
    targets: Sequence[np.ndarray],
    catalogue_size: int,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Top-K quality of ``recommended`` ([U, Kmax] item ids, best first, ``""`` = empty slot).

    For each K in ``ks``, averaged over the users that have at least one target (``users`` counts them):

    - ``recall@K`` = |top-K ∩ targets| / min(|targets|, K). Capped at K so that a user with more targets
      than K can still reach 1.0: the plain |∩| / |targets| would punish a perfect ranker for an
      impossible task and mix list length into the number;
    - ``ndcg@K``: binary relevance, discount 1/log2(rank + 1), divided by the ideal DCG of
      min(|targets|, K) hits at the top;
    - ``mrr@K``: 1 / rank of the first hit within K, 0 when none;
    - ``coverage@K``: distinct items in all evaluated users' top-K, over ``catalogue_size``.

    A repeated id within a row counts once (at its first position); empty slots never hit. Vectorised:
    ids become integer codes, (user, item) pairs become one int64 key, and one ``np.isin`` marks hits.
    """
    rec = np.asarray(recommended, dtype=object)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be a 2-D array [users, K], got shape {rec.shape}")
    n_users, kmax = rec.shape
    if len(targets) != n_users:
        raise ValueError(f"{len(targets)} target lists for {n_users} recommendation rows")
    if catalogue_size < 1:
        raise ValueError(f"catalogue_size must be positive, got {catalogue_size}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or max(ks) > kmax:
        raise ValueError(f"every K must be in 1..{kmax} (the recommendation rows' length), got {ks}")
    rec_codes, target_keys, vocab = _encode_pairs(rec, targets)
    hits = _hit_matrix(rec_codes, target_keys, vocab)
    n_targets = np.bincount(target_keys // vocab, minlength=n_users)
    evaluated = n_targets > 0
    if not evaluated.all():
        hits, n_targets, rec_codes = hits[evaluated], n_targets[evaluated], rec_codes[evaluated]
    out: dict[str, float] = {}
    for k in ks:
        out.update(_metrics_at(k, hits, n_targets, rec_codes, catalogue_size))
    out["users"] = int(evaluated.sum())
    return out


def _encode_pairs(rec: np.ndarray, targets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """(recommended codes [U, Kmax] with -1 for empty, distinct target keys user*V+code, V)."""
    lengths = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
    flat = np.concatenate([rec.ravel(), *[np.asarray(t, dtype=object).ravel() for t in targets]])
    codes, vocab = _codes(flat)
    rec_codes = codes[: rec.size].reshape(rec.shape)
    target_users = np.repeat(np.arange(len(targets), dtype=np.int64), lengths)
    target_codes = codes[rec.size:]
    valid = target_codes >= 0
    keys = np.unique(target_users[valid] * vocab + target_codes[valid])
    return rec_codes, keys, vocab


def _codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Object array of ids → int64 codes (one per distinct id) with -1 for None/""; and the code count."""
    array = pa.array(values, type=pa.string(), from_pandas=True)
    encoded = array.dictionary_encode()
    size = max(len(encoded.dictionary), 1)
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    empty = pc.equal(encoded.dictionary, PAD_ID).to_numpy(zero_copy_only=False)
    if empty.any():
        codes[np.isin(codes, np.flatnonzero(empty))] = -1
    return codes, size


def _hit_matrix(rec_codes: np.ndarray, target_keys: np.ndarray, vocab: int) -> np.ndarray:
    """bool [U, Kmax]: slot holds a target of its row, and is that id's first slot in the row."""
    rows = np.arange(rec_codes.shape[0], dtype=np.int64)[:, None]
    keys = rows * vocab + rec_codes
    valid = rec_codes >= 0
    hits = valid & np.isin(keys, target_keys)
    ordered = np.sort(np.where(valid, rec_codes, -1 - np.arange(rec_codes.shape[1])), axis=1)
    if not (ordered[:, 1:] == ordered[:, :-1]).any():  # the usual case: no id repeats within a row
        return hits
    first = np.zeros(keys.size, dtype=bool)
    _, first_at = np.unique(np.where(valid, keys, -1).ravel(), return_index=True)  # row-major: earliest
    first[first_at] = True
    return hits & first.reshape(keys.shape)


def _metrics_at(k: int, hits: np.ndarray, n_targets: np.ndarray, rec_codes: np.ndarray,
                catalogue_size: int) -> dict[str, float]:
    top = hits[:, :k]
    ideal = np.minimum(n_targets, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    shown = rec_codes[:, :k]
    distinct = int(np.count_nonzero(np.bincount(shown[shown >= 0], minlength=1)))
    if len(top) == 0:
        return {f"recall@{k}": 0.0, f"ndcg@{k}": 0.0, f"mrr@{k}": 0.0,
                f"coverage@{k}": distinct / catalogue_size}
    found = top.any(axis=1)
    reciprocal = np.where(found, 1.0 / (np.argmax(top, axis=1) + 1), 0.0)
    return {
        f"recall@{k}": float(np.mean(top.sum(axis=1) / ideal)),
        f"ndcg@{k}": float(np.mean((top @ discount) / np.cumsum(discount)[ideal - 1])),
        f"mrr@{k}": float(np.mean(reciprocal)),
        f"coverage@{k}": distinct / catalogue_size,
    }


# --------------------------------------------------------------------------- popularity baseline


def popularity_ranking_from_examples(train_examples: pa.Table, last_days: int | None = 7) -> np.ndarray:
    """Item ids by weighted event count (``weight``, most popular first) over the train split's last
    ``last_days`` UTC calendar days (by ``ts``; None = all of it); ties by item id.

    This is the ETL's ``item_pop_rank`` rule (``spark_etl.transforms.popularity_rank_before``) computed
    from what training saw, so the baseline and the model get the same information: the items table's
    ``popularity_rank`` includes the eval day itself. A ``split`` column, when present, is honoured. A
    null ``weight`` falls back to the event type's weight.
    """
    table = train_examples
    if "split" in table.column_names:
        table = table.filter(pc.equal(table.column("split"), "train"))
    table = table.filter(pc.is_valid(table.column("item_id")))
    if last_days is not None:
        table = _last_days(table, last_days)
    counts = pa.table({"item_id": table.column("item_id"), "w": _weights(table)})
    ranked = counts.group_by("item_id").aggregate([("w", "sum")]).sort_by(
        [("w_sum", "descending"), ("item_id", "ascending")])
    return ranked.column("item_id").to_numpy(zero_copy_only=False).astype(object)


def _last_days(table: pa.Table, last_days: int) -> pa.Table:
    if last_days < 1:
        raise ValueError(f"last_days must be at least 1 (or None for all), got {last_days}")
    if table.num_rows == 0:
        return table
    # Whole UTC days since the epoch from the stored instant (Arrow keeps timestamps as UTC ticks).
    ts = table.column("ts")
    per_day = _TICKS_PER_DAY[ts.type.unit]
    day = np.floor_divide(pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False), per_day)
    return table.filter(pa.array(day >= day.max() - (last_days - 1)))


def _weights(table: pa.Table) -> np.ndarray:
    names = table.column_names
    weight = table.column("weight") if "weight" in names else None
    if "event_type" in names:
        return event_weights(table.column("event_type"), weight).astype(np.float64)
    if weight is None:
        return np.ones(table.num_rows)
    return pc.fill_null(pc.cast(weight, pa.float64()), 1.0).to_numpy(zero_copy_only=False)


def popular_recommendations(ranked_item_ids: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """The top ``k`` of ``ranked_item_ids`` for each of ``n_users`` users (object [n_users, k]); a ranking
    shorter than k is padded with ``""``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    row = np.full(k, PAD_ID, dtype=object)
    top = np.asarray(ranked_item_ids, dtype=object)[:k]
    row[: len(top)] = top
    return np.tile(row, (n_users, 1))


def with_popularity_rank(items: pa.Table, ranked_item_ids: np.ndarray) -> pa.Table:
    """``items`` with ``popularity_rank`` replaced by the position (1-based) in ``ranked_item_ids``, null
    for items not in it: feed the item tower the leak-free ranks the training examples had
    (``item_pop_rank``) instead of day D's, which include the eval day's events."""
    ranked = pa.array(np.asarray(ranked_item_ids, dtype=object), type=pa.string())
    position = pc.index_in(items.column("item_id"), value_set=ranked)
    rank = pc.cast(pc.add(position, 1), pa.int32())
    column = items.column_names.index("popularity_rank") if "popularity_rank" in items.column_names else None
    if column is None:
        return items.append_column("popularity_rank", rank)
    return items.set_column(column, "popularity_rank", rank)


# --------------------------------------------------------------------------- model scoring


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode (no dropout) and no autograd for the block; the caller's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def item_embeddings_for(
    model: TwoTowerModel, config: TwoTowerConfig, items: pa.Table, batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Item tower vectors for every row of ``items`` (item_id, category, popularity_rank):
    ``(item ids object [N], float32 [N, output_dim])``, row-aligned with the table."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = items.column("item_id").to_numpy(zero_copy_only=False).astype(object)
    parts = [np.zeros((0, config.output_dim), dtype=np.float32)]
    with _inference(model) as device:
        for start in range(0, items.num_rows, batch_size):
            chunk = items.slice(start, batch_size)
            batch = encode_items(chunk.column("item_id"), chunk.column("category"),
                                 chunk.column("popularity_rank"), config=config)
            parts.append(model.item_embeddings(as_tensors(batch, device)).cpu().numpy())
    return ids, np.concatenate(parts).astype(np.float32, copy=False)


def user_embeddings_for(
    model: TwoTowerModel, config: TwoTowerConfig, queries: pa.Table, batch_size: int = 4096
) -> np.ndarray:
    """User tower vectors (float32 [U, output_dim]) for holdout queries (:data:`QUERY_COLUMNS`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts = [np.zeros((0, config.output_dim), dtype=np.float32)]
    with _inference(model) as device:
        for start in range(0, queries.num_rows, batch_size):
            q = queries.slice(start, batch_size)
            batch = encode_users(q.column("history"), q.column("region"), q.column("device"),
                                 q.column("hour"), q.column("user_id"), config=config)
            parts.append(model.user_embeddings(as_tensors(batch, device)).cpu().numpy())
    return np.concatenate(parts).astype(np.float32, copy=False)


def exact_top_k(users: torch.Tensor, items: torch.Tensor, k: int) -> torch.Tensor:
    """Positions [U, min(k, N)] of each user's best items by inner product, best first.

    Exhaustive (this IS full-catalogue ranking), on whatever device the tensors are on, with at most
    ``_SCORE_BLOCK`` scores held at once: users go in groups whose score rows fit, and only a catalogue
    larger than the block is also cut into item blocks, whose top-k are merged into a running top-k.
    Whole rows first because one top-k over a long row is several times faster than many short ones.
    """
    k = min(k, items.shape[0])
    rows = max(1, _SCORE_BLOCK // max(items.shape[0], 1))
    parts = [_top_k_rows(users[start:start + rows], items, k) for start in range(0, users.shape[0], rows)]
    return torch.cat(parts) if parts else torch.zeros((0, k), dtype=torch.int64, device=users.device)


def _top_k_rows(users: torch.Tensor, items: torch.Tensor, k: int) -> torch.Tensor:
    block = max(k, _SCORE_BLOCK // users.shape[0])
    best_scores = best_pos = None
    for start in range(0, items.shape[0], block):
        scores = users @ items[start:start + block].T
        top_scores, top_pos = scores.topk(min(k, scores.shape[1]), dim=1)
        top_pos = top_pos + start
        if best_scores is None:
            best_scores, best_pos = top_scores, top_pos
            continue
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_pos = torch.cat([best_pos, top_pos], dim=1)
        best_scores, pick = merged_scores.topk(k, dim=1)
        best_pos = merged_pos.gather(1, pick)
    assert best_pos is not None
    return best_pos


def model_recommendations(
    model: TwoTowerModel,
    config: TwoTowerConfig,
    holdout: Holdout,
    item_ids: np.ndarray,
    item_embeddings: np.ndarray,
    k: int = 100,
    batch_size: int = 4096,
) -> np.ndarray:
    """The model's top ``k`` items (object [U, k], ``""`` past the end of a small catalogue) for each
    holdout query, ranking the whole catalogue ``item_ids`` / ``item_embeddings`` exactly, on the
    model's device. History items stay candidates (see the module docstring)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ids = np.asarray(item_ids, dtype=object)
    vectors = np.asarray(item_embeddings, dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != len(vectors) or len(ids) == 0:
        raise ValueError(f"need one embedding row per item: {len(ids)} ids, "
                         f"embeddings of shape {vectors.shape}")
    if vectors.shape[1] != config.output_dim:
        raise ValueError(f"item embeddings have dimension {vectors.shape[1]}, the model {config.output_dim}")
    padded_ids = np.append(ids, PAD_ID)  # position -1 → ""
    out = np.full((len(holdout), k), PAD_ID, dtype=object)
    device = next(model.parameters()).device
    items = torch.as_tensor(vectors, device=device)
    for start in range(0, len(holdout), batch_size):
        queries = holdout.queries.slice(start, batch_size)
        users = torch.as_tensor(user_embeddings_for(model, config, queries, batch_size), device=device)
        positions = exact_top_k(users, items, k).cpu().numpy()
        out[start:start + len(positions), : positions.shape[1]] = padded_ids[positions]
    return out


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class EvalReport:
    """The model's and the popularity baseline's metrics on one holdout (see :func:`ranking_metrics`)."""

    model: dict[str, float]
    popular: dict[str, float]
    users: int
    items: int

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the registry manifest."""
        return {"users": self.users, "items": self.items, "model": dict(self.model),
                "popular": dict(self.popular)}


def evaluate(
    model: TwoTowerModel,
    config: TwoTowerConfig,
    holdout: Holdout,
    item_ids: np.ndarray,
    item_embeddings: np.ndarray,
    popular_ranked_ids: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> EvalReport:
    """Rank the full catalogue for every holdout query with the model and with the popularity ranking,
    and measure both the same way."""
    k = max(ks)
    recommended = model_recommendations(model, config, holdout, item_ids, item_embeddings, k=k)
    popular = popular_recommendations(popular_ranked_ids, len(holdout), k)
    model_metrics = ranking_metrics(recommended, holdout.targets, len(item_ids), ks)
    popular_metrics = ranking_metrics(popular, holdout.targets, len(item_ids), ks)
    return EvalReport(model_metrics, popular_metrics, users=int(model_metrics["users"]), items=len(item_ids))


# --------------------------------------------------------------------------- gate


@dataclass(frozen=True)
class GateDecision:
    """Promote or not, why in one line, and every number the decision used (for the manifest).

    ``lift_over_popular`` and ``change_vs_promoted`` are relative (0.25 = 25% better); None where the
    reference is 0 or absent.
    """

    promote: bool
    reason: str
    metric: str
    candidate: float
    popular: float
    promoted: float | None
    lift_over_popular: float | None
    change_vs_promoted: float | None
    thresholds: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gate(
    candidate: Mapping[str, float],
    popular: Mapping[str, float],
    promoted: Mapping[str, float] | None,
    settings: GateSettings,
) -> GateDecision:
    """Promote when ``candidate[metric] >= popular[metric] * (1 + min_lift_over_popular)`` and, if a model
    is promoted already, ``candidate[metric] >= promoted[metric] * (1 - max_regression)``.

    All three must be measured on the same holdout. A candidate scoring 0 (or NaN) is never promoted,
    even against a baseline that also scores 0: there is no evidence it recommends anything useful.
    """
    metric = settings.metric
    cand = _metric(candidate, metric, "candidate")
    pop = _metric(popular, metric, "popular baseline")
    prom = None if promoted is None else _metric(promoted, metric, "promoted model")
    need_pop = pop * (1 + settings.min_lift_over_popular)
    need_prom = None if prom is None else prom * (1 - settings.max_regression)
    lift = _relative(cand, pop)
    change = None if prom is None else _relative(cand, prom)
    problems = []
    if not cand > 0:
        problems.append(f"{metric} is {cand:.4f}: the candidate hits nothing on the holdout")
    if not cand >= need_pop - _GATE_EPS:
        problems.append(f"{metric} {cand:.4f} is {_pct(lift)} over popular {pop:.4f}, needs "
                        f"+{settings.min_lift_over_popular:.1%} (at least {need_pop:.4f})")
    if need_prom is not None and not cand >= need_prom - _GATE_EPS:
        problems.append(f"{metric} {cand:.4f} is {_pct(change)} vs the promoted model's {prom:.4f}, allowed "
                        f"-{settings.max_regression:.1%} (at least {need_prom:.4f})")
    if problems:
        reason = "not promoted: " + "; ".join(problems)
    else:
        versus = ("no model promoted yet" if prom is None
                  else f"{_pct(change)} vs the promoted model's {prom:.4f} "
                       f"(allowed -{settings.max_regression:.1%})")
        reason = (f"promoted: {metric} {cand:.4f} is {_pct(lift)} over popular {pop:.4f} "
                  f"(needs +{settings.min_lift_over_popular:.1%}); {versus}")
    return GateDecision(
        promote=not problems, reason=reason, metric=metric, candidate=cand, popular=pop, promoted=prom,
        lift_over_popular=lift, change_vs_promoted=change,
        thresholds={"min_lift_over_popular": settings.min_lift_over_popular,
                    "max_regression": settings.max_regression,
                    "required_vs_popular": need_pop, "required_vs_promoted": need_prom},
    )


def _metric(metrics: Mapping[str, float], name: str, whose: str) -> float:
    if name not in metrics:
        raise KeyError(f"the {whose}'s metrics have no {name!r} (have {sorted(metrics)})")
    return float(metrics[name])


def _relative(value: float, reference: float) -> float | None:
    return value / reference - 1 if reference > 0 and math.isfinite(value) else None


def _pct(relative: float | None) -> str:
    return "n/a" if relative is None else f"{relative:+.1%}"


__all__ = [
    "DEFAULT_KS",
    "PAD_ID",
    "QUERY_COLUMNS",
    "EvalReport",
    "GateDecision",
    "Holdout",
    "evaluate",
    "exact_top_k",
    "gate",
    "holdout_from_examples",
    "item_embeddings_for",
    "model_recommendations",
    "popular_recommendations",
    "popularity_ranking_from_examples",
    "ranking_metrics",
    "user_embeddings_for",
    "with_popularity_rank",
]
