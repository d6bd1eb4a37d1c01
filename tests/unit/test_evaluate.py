"""Offline evaluation: holdout construction, ranking metrics, the popularity baseline, exact model
scoring and the promotion gate."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

import ray_apps.evaluate as ev
from ray_apps.ann import build_index
from ray_apps.encoding import encode_items, examples_table
from ray_apps.evaluate import (
    Holdout,
    evaluate,
    exact_top_k,
    gate,
    holdout_from_examples,
    item_embeddings_for,
    model_recommendations,
    popular_recommendations,
    popularity_ranking_from_examples,
    ranking_metrics,
    user_embeddings_for,
    with_popularity_rank,
)
from ray_apps.model import TwoTowerConfig, TwoTowerModel, as_tensors
from streamrec.settings import GateSettings

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

TINY = TwoTowerConfig(
    id_buckets=512, category_buckets=32, pop_buckets=8, region_buckets=8, device_buckets=8,
    embedding_dim=16, feature_dim=4, item_hidden=(32,), user_hidden=(32,), output_dim=8, history_length=6,
    dropout=0.1,
)
DAY = datetime(2024, 5, 10, tzinfo=UTC)  # the eval (cutoff) day



def _at(day_offset: int, minute: int = 0) -> datetime:
    return DAY + timedelta(days=day_offset, minutes=minute)


def _examples(rows: list[dict[str, Any]]) -> pa.Table:
    """EXAMPLES-shaped table from partial rows (defaults for the columns a test does not care about)."""
    defaults = {"history": [], "category": "c", "event_type": "view", "weight": 1.0, "device": "mobile",
                "region": "eu", "item_pop_rank": None}
    full = [{**defaults, **row} for row in rows]
    for row in full:
        row.setdefault("hour", row["ts"].hour)
    return examples_table({name: [row[name] for row in full] for name in full[0]})


# --------------------------------------------------------------------------- metrics


def test_metrics_hand_computed() -> None:
    rec = np.array([["a", "b", "c"], ["d", "a", ""]], dtype=object)
    targets = [np.array(["b", "x"], dtype=object), np.array(["a"], dtype=object)]
    m = ranking_metrics(rec, targets, catalogue_size=10, ks=(1, 2, 3))
    d2 = 1 / math.log2(3)
    expected = {
        "recall@1": 0.0, "ndcg@1": 0.0, "mrr@1": 0.0, "coverage@1": 0.2,  # {a, d}
        # user 0: 1 hit of min(2, 2) at rank 2; user 1: 1 hit of min(1, 2) at rank 2
        "recall@2": (0.5 + 1.0) / 2, "ndcg@2": (d2 / (1 + d2) + d2 / 1) / 2, "mrr@2": 0.5,
        "coverage@2": 0.3,  # {a, b, d}
        "recall@3": 0.75, "ndcg@3": (d2 / (1 + d2) + d2) / 2, "mrr@3": 0.5,
        "coverage@3": 0.4,  # {a, b, c, d}: the empty slot is not an item
        "users": 2,
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_metrics_more_targets_than_k_can_reach_one() -> None:
    """Recall is capped at min(|targets|, K): a perfect top-2 for a user with 5 targets scores 1."""
    rec = np.array([["t1", "t2", "z"]], dtype=object)
    targets = [np.array(["t1", "t2", "t3", "t4", "t5"], dtype=object)]
    m = ranking_metrics(rec, targets, catalogue_size=100, ks=(2, 3))
    assert m["recall@2"] == 1.0 and m["ndcg@2"] == pytest.approx(1.0) and m["mrr@2"] == 1.0
    assert m["recall@3"] == pytest.approx(2 / 3)
    ideal3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / ideal3)


def test_metrics_duplicates_padding_and_empty_targets() -> None:
    """A repeated id hits once; "" and None are empty slots; users without targets are not averaged."""
    rec = np.array([["a", "a", "b"], ["", None, "a"], ["a", "b", "c"]], dtype=object)
    targets = [np.array(["a"]), np.array(["", "a", "a"]), np.array([], dtype=object)]
    m = ranking_metrics(rec, targets, catalogue_size=4, ks=(3,))
    assert m["users"] == 2
    assert m["recall@3"] == 1.0
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
    assert m["coverage@3"] == pytest.approx(2 / 4)  # rows of evaluated users only: {a, b}


def test_metrics_accept_unicode_arrays_and_reject_bad_shapes() -> None:
    rec = np.array([["a", "b"]])  # numpy '<U1', not object
    assert ranking_metrics(rec, [np.array(["b"])], 2, ks=(2,))["mrr@2"] == 0.5
    with pytest.raises(ValueError, match="every K"):
        ranking_metrics(rec, [np.array(["b"])], 2, ks=(3,))
    with pytest.raises(ValueError, match="target lists"):
        ranking_metrics(rec, [], 2, ks=(1,))
    empty = ranking_metrics(np.zeros((0, 2), dtype=object), [], 5, ks=(2,))
    assert empty["users"] == 0 and empty["recall@2"] == 0.0


def test_metrics_vectorised_match_a_per_user_loop() -> None:
    rng = np.random.default_rng(3)
    catalogue = np.array([f"i{j}" for j in range(60)], dtype=object)
    rec = np.stack([rng.choice(catalogue, 20, replace=False) for _ in range(200)])
    targets = [rng.choice(catalogue, rng.integers(1, 30), replace=False) for _ in range(200)]
    m = ranking_metrics(rec, targets, len(catalogue), ks=(5, 20))
    for k in (5, 20):
        recall, ndcg, mrr = [], [], []
        for row, t in zip(rec, targets, strict=True):
            hit = np.isin(row[:k], t)
            ideal = min(len(t), k)
            recall.append(hit.sum() / ideal)
            disc = 1 / np.log2(np.arange(2, k + 2))
            ndcg.append((hit * disc).sum() / disc[:ideal].sum())
            mrr.append(1 / (np.argmax(hit) + 1) if hit.any() else 0.0)
        assert m[f"recall@{k}"] == pytest.approx(np.mean(recall))
        assert m[f"ndcg@{k}"] == pytest.approx(np.mean(ndcg))
        assert m[f"mrr@{k}"] == pytest.approx(np.mean(mrr))
        assert m[f"coverage@{k}"] == pytest.approx(len(set(rec[:, :k].ravel())) / len(catalogue))


# --------------------------------------------------------------------------- holdout


def test_holdout_query_is_the_earliest_example_and_targets_are_distinct() -> None:
    table = _examples([
        {"user_id": "u1", "item_id": "b", "ts": _at(0, 30), "history": ["x", "a"], "device": "desktop"},
        {"user_id": "u2", "item_id": "z", "ts": _at(0, 5), "history": []},
        {"user_id": "u1", "item_id": "a", "ts": _at(0, 10), "history": ["x"], "region": "us"},
        {"user_id": "u1", "item_id": "b", "ts": _at(0, 50), "history": ["x", "a", "b"]},
        {"user_id": "u1", "item_id": "c", "ts": _at(0, 10), "history": ["y"]},  # same ts, later row
    ])
    h = holdout_from_examples(table, max_users=10)
    assert h.user_ids.tolist() == ["u1", "u2"] and h.total_users == 2 and len(h) == 2
    assert h.queries.column_names == ["user_id", "history", "region", "device", "hour"]
    q = h.queries.to_pylist()
    assert q[0] == {"user_id": "u1", "history": ["x"], "region": "us", "device": "mobile", "hour": 0}
    assert q[1]["user_id"] == "u2" and q[1]["history"] == []
    assert [t.tolist() for t in h.targets] == [["a", "b", "c"], ["z"]]


def test_holdout_honours_split_and_handles_empty_input() -> None:
    table = _examples([
        {"user_id": "u1", "item_id": "a", "ts": _at(-1)},
        {"user_id": "u1", "item_id": "b", "ts": _at(0)},
    ]).append_column("split", pa.array(["train", "eval"]))
    h = holdout_from_examples(table, max_users=5)
    assert [t.tolist() for t in h.targets] == [["b"]]
    empty = holdout_from_examples(table.slice(0, 0), max_users=5)
    assert len(empty) == 0 and empty.queries.num_rows == 0 and empty.targets == []


def test_holdout_sampling_is_seeded_capped_and_independent_of_row_order() -> None:
    rows = [{"user_id": f"u{u:02d}", "item_id": f"i{(u * 7 + j) % 13}", "ts": _at(0, u + j)}
            for u in range(50) for j in range(3)]
    table = _examples(rows)
    shuffled = table.take(pa.array(np.random.default_rng(1).permutation(table.num_rows)))
    a = holdout_from_examples(table, max_users=10, seed=4)
    b = holdout_from_examples(shuffled, max_users=10, seed=4)
    c = holdout_from_examples(table, max_users=10, seed=5)
    assert len(a) == 10 and a.total_users == 50
    assert a.user_ids.tolist() == b.user_ids.tolist() == sorted(a.user_ids.tolist())
    assert a.queries.equals(b.queries) and [t.tolist() for t in a.targets] == [t.tolist() for t in b.targets]
    assert c.user_ids.tolist() != a.user_ids.tolist()
    for uid, query, t in zip(a.user_ids, a.queries.to_pylist(), a.targets, strict=True):
        u = int(uid[1:])
        assert query["user_id"] == uid and len(t) == 3 and f"i{(u * 7) % 13}" in t.tolist()


# --------------------------------------------------------------------------- popularity baseline


def test_popularity_ranking_weights_window_and_ties() -> None:
    table = _examples([
        {"user_id": "u", "item_id": "old", "ts": _at(-9), "weight": 100.0},  # outside a 7-day window
        {"user_id": "u", "item_id": "a", "ts": _at(-7, 1), "weight": 1.0},  # first day of the window
        {"user_id": "u", "item_id": "a", "ts": _at(-2), "weight": 1.0},
        {"user_id": "u", "item_id": "b", "ts": _at(-1), "weight": 8.0, "event_type": "purchase"},
        {"user_id": "u", "item_id": "c", "ts": _at(-1), "weight": 2.0},
        {"user_id": "u", "item_id": "d", "ts": _at(-1, 1439), "weight": None, "event_type": "purchase"},
    ])
    assert popularity_ranking_from_examples(table).tolist() == ["b", "d", "a", "c"]  # a and c tie at 2
    assert popularity_ranking_from_examples(table, last_days=1).tolist() == ["b", "d", "c"]
    assert popularity_ranking_from_examples(table, last_days=None)[0] == "old"
    with_split = table.append_column("split", pa.array(["train"] * 5 + ["eval"]))
    assert "d" not in popularity_ranking_from_examples(with_split).tolist()


def test_popular_recommendations_repeat_and_pad() -> None:
    recs = popular_recommendations(np.array(["p1", "p2", "p3"], dtype=object), n_users=2, k=4)
    assert recs.tolist() == [["p1", "p2", "p3", ""], ["p1", "p2", "p3", ""]]
    assert popular_recommendations(np.array(["p1", "p2"]), 1, 1).tolist() == [["p1"]]


def test_with_popularity_rank_replaces_the_leaky_ranks() -> None:
    items = pa.table({"item_id": ["a", "b", "c"], "category": ["x", "y", "x"],
                      "popularity_rank": pa.array([1, 2, 3], pa.int32())})
    out = with_popularity_rank(items, np.array(["c", "a"], dtype=object))
    assert out.column("popularity_rank").to_pylist() == [2, None, 1]
    assert out.column_names == items.column_names


# --------------------------------------------------------------------------- gate

SETTINGS = GateSettings(metric="recall@20", min_lift_over_popular=0.1, max_regression=0.02)


@pytest.mark.parametrize(("candidate", "popular", "promoted", "promote", "words"), [
    (0.20, 0.10, None, True, ["promoted:", "0.2000", "+100.0%", "no model promoted yet"]),
    (0.105, 0.10, None, False, ["not promoted", "+5.0%", "needs +10.0%", "0.1100"]),
    (0.11, 0.10, None, True, ["promoted:"]),  # exactly at the margin passes
    (0.20, 0.10, 0.203, True, ["-1.5%", "0.2030"]),  # within the 2% tolerance
    (0.20, 0.10, 0.21, False, ["-4.8%", "allowed -2.0%", "0.2058"]),  # beyond it
    (0.105, 0.10, 0.21, False, ["over popular", "promoted model"]),  # both rules fail, both said
    (0.0, 0.0, None, False, ["hits nothing"]),  # 0 >= 0 * 1.1, but nothing is not a model
])
def test_gate(candidate: float, popular: float, promoted: float | None, promote: bool,
              words: list[str]) -> None:
    def metrics(value: float) -> dict[str, float]:
        return {"recall@20": value, "ndcg@20": 0.5}

    decision = gate(metrics(candidate), metrics(popular), None if promoted is None else metrics(promoted),
                    SETTINGS)
    assert decision.promote is promote
    assert decision.metric == "recall@20" and decision.candidate == candidate
    assert decision.promoted == promoted
    for word in words:
        assert word in decision.reason, decision.reason
    assert "\n" not in decision.reason
    assert decision.thresholds["required_vs_popular"] == pytest.approx(popular * 1.1)
    data = decision.to_json()
    assert data["promote"] is promote and data["thresholds"]["max_regression"] == 0.02
    if popular > 0:
        assert decision.lift_over_popular == pytest.approx(candidate / popular - 1)


def test_gate_needs_the_metric() -> None:
    with pytest.raises(KeyError, match="recall@20"):
        gate({"ndcg@20": 0.3}, {"recall@20": 0.1}, None, SETTINGS)


# --------------------------------------------------------------------------- model scoring


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_exact_top_k_matches_faiss_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    items, users = _unit(rng.normal(size=(1000, 16))), _unit(rng.normal(size=(7, 16)))
    ids = np.array([f"i{j}" for j in range(1000)], dtype=object)
    expected, _ = build_index(ids, items, kind="exact").search(users, 25)
    monkeypatch.setattr(ev, "_SCORE_BLOCK", 7 * 40)  # blocks of 40 items: 25 merges
    got = exact_top_k(torch.from_numpy(users), torch.from_numpy(items), 25).numpy()
    assert ids[got].tolist() == expected.tolist()


def _items_table(n: int) -> pa.Table:
    return pa.table({"item_id": [f"item-{j:02d}" for j in range(n)],
                     "category": [f"cat-{j % 3}" for j in range(n)],
                     "popularity_rank": pa.array(range(1, n + 1), pa.int32())})


def test_item_and_user_embeddings_batch_independent_and_mode_restored() -> None:
    model = TwoTowerModel(TINY)
    items = _items_table(10)
    ids, vectors = item_embeddings_for(model, TINY, items, batch_size=3)
    assert model.training  # the caller's mode is restored
    assert ids.tolist() == items.column("item_id").to_pylist() and vectors.dtype == np.float32
    model.eval()
    with torch.no_grad():
        direct = model.item_embeddings(as_tensors(encode_items(
            items.column("item_id"), items.column("category"), items.column("popularity_rank"), config=TINY)))
    np.testing.assert_allclose(vectors, direct.numpy(), atol=1e-6)
    queries = pa.table({"user_id": ["u1", "u2"], "history": [["item-01"], []], "region": ["eu", "us"],
                        "device": ["mobile", None], "hour": pa.array([3, 23], pa.int32())})
    np.testing.assert_allclose(user_embeddings_for(model, TINY, queries, batch_size=1),
                               user_embeddings_for(model, TINY, queries), atol=1e-6)


def test_model_recommendations_pad_a_small_catalogue() -> None:
    model = TwoTowerModel(TINY)
    ids, vectors = item_embeddings_for(model, TINY, _items_table(3))
    queries = pa.table({"user_id": ["u"], "history": [["item-00"]], "region": ["eu"], "device": ["mobile"],
                        "hour": pa.array([1], pa.int32())})
    recs = model_recommendations(model, TINY, Holdout(np.array(["u"], dtype=object), queries,
                                                      [np.array(["item-00"])]), ids, vectors, k=5)
    assert recs.shape == (1, 5) and sorted(recs[0, :3].tolist()) == ids.tolist()
    assert recs[0, 3:].tolist() == ["", ""]


def test_end_to_end_planted_users_prefer_planted_items() -> None:
    """Train days make p00..p09 popular; on the eval day two users click their own planted items.

    The planted items' vectors are set to those users' tower vectors, so an exact full-catalogue search
    must put them first: the model reaches recall@10 = 1 where the popular list scores 0, and the gate
    promotes it. Everything else (holdout, popularity ranking, encoding, towers, search, metrics) is real.
    """
    train = [{"user_id": f"w{j}", "item_id": f"p{j % 10:02d}", "ts": _at(-1 - j % 3, j),
              "weight": float(10 - j % 10)} for j in range(60)]
    eval_rows = [
        {"user_id": "alice", "item_id": "a1", "ts": _at(0, 5), "history": ["p01", "a0"], "device": "desktop"},
        {"user_id": "alice", "item_id": "a2", "ts": _at(0, 9), "history": ["p01", "a0", "a1"]},
        {"user_id": "bob", "item_id": "b1", "ts": _at(0, 7), "history": ["p05"], "region": "us"},
        {"user_id": "bob", "item_id": "b1", "ts": _at(0, 8), "history": ["p05", "b1"], "region": "us"},
        {"user_id": "bob", "item_id": "b2", "ts": _at(0, 12), "history": ["p05", "b1"], "region": "us"},
    ]
    popular_ids = popularity_ranking_from_examples(_examples(train))
    assert popular_ids[:3].tolist() == ["p00", "p01", "p02"]
    holdout = holdout_from_examples(_examples(eval_rows), max_users=100)
    assert holdout.user_ids.tolist() == ["alice", "bob"]

    names = [f"p{j:02d}" for j in range(10)] + ["a0", "a1", "a2", "b1", "b2"]
    names += [f"x{j:02d}" for j in range(45)]
    items = with_popularity_rank(
        pa.table({"item_id": names, "category": ["c"] * len(names), "popularity_rank": pa.array(
            range(1, len(names) + 1), pa.int32())}), popular_ids)
    model = TwoTowerModel(TINY)
    ids, vectors = item_embeddings_for(model, TINY, items)
    users = user_embeddings_for(model, TINY, holdout.queries)
    noise = np.random.default_rng(0).normal(scale=0.01, size=(4, TINY.output_dim))
    for row, (name, user) in enumerate([("a1", 0), ("a2", 0), ("b1", 1), ("b2", 1)]):
        vectors[names.index(name)] = _unit(users[user] + noise[row])

    report = evaluate(model, TINY, holdout, ids, vectors, popular_ids, ks=(10, 20))
    assert report.users == 2 and report.items == 60
    assert report.model["recall@10"] == 1.0 and report.popular["recall@10"] == 0.0
    assert report.model["recall@10"] > report.popular["recall@10"]
    assert set(report.to_json()) == {"users", "items", "model", "popular"}
    recs = model_recommendations(model, TINY, holdout, ids, vectors, k=10, batch_size=1)
    assert set(recs[0, :2]) == {"a1", "a2"} and set(recs[1, :2]) == {"b1", "b2"}
    decision = gate(report.model, report.popular, None,
                    GateSettings(metric="recall@10", min_lift_over_popular=0.1, max_regression=0.02))
    assert decision.promote, decision.reason
