"""Per-batch scoring logic (ray_apps.score.recommend_batch) without Ray: cold users and the popularity
fallback, purchased-item exclusion, agreement with a brute-force ranking, small catalogues, input
formats and the output schema."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from ray_apps.ann import AnnIndex, build_index, configure_threads
from ray_apps.encoding import encode_items, encode_users
from ray_apps.model import TwoTowerConfig, TwoTowerModel, as_tensors
from ray_apps.score import (
    RECS_SCHEMA,
    PopularList,
    ScoreSummary,
    default_generated_at,
    default_rows_per_block,
    recommend_batch,
    user_vectors,
)

pytestmark = pytest.mark.unit

REGION = "eu-west-1"
VERSION = "v20261125-abcdefabcdef"
WHEN = datetime(2026, 11, 26, tzinfo=UTC)
ITEMS = [f"item-{i:03d}" for i in range(60)]
TINY = TwoTowerConfig(
    id_buckets=1024, category_buckets=16, pop_buckets=8, region_buckets=8, device_buckets=8,
    embedding_dim=16, feature_dim=4, item_hidden=(32,), user_hidden=(32,), output_dim=8, history_length=5,
    dropout=0.2,
)
POPULAR = PopularList(tuple(ITEMS[:12]), tuple(float(100 - i) for i in range(12)))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    configure_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> TwoTowerModel:
    return TwoTowerModel(TINY)  # dropout > 0: scoring must switch it off itself


def _item_vectors(model: TwoTowerModel, ids: list[str]) -> np.ndarray:
    batch = encode_items(ids, [f"cat-{i % 4}" for i in range(len(ids))], np.arange(1, len(ids) + 1),
                         config=model.config)
    model.eval()
    with torch.no_grad():
        out = model.item_embeddings(as_tensors(batch)).numpy()
    model.train()
    return out


@pytest.fixture(scope="module")
def vectors(model: TwoTowerModel) -> np.ndarray:
    return _item_vectors(model, ITEMS)


@pytest.fixture(scope="module")
def index(vectors: np.ndarray) -> AnnIndex:
    return build_index(ITEMS, vectors, kind="exact")


def users_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table({
        "user_id": pa.array([r["user_id"] for r in rows], pa.string()),
        "last_items": pa.array([r.get("last_items", []) for r in rows], pa.list_(pa.string())),
        "purchased_items": pa.array([r.get("purchased_items", []) for r in rows], pa.list_(pa.string())),
        "device": pa.array([r.get("device", "mobile") for r in rows], pa.string()),
    })


def run(batch: Any, model: TwoTowerModel, index: AnnIndex, **overrides: Any) -> pa.Table:
    kwargs: dict[str, Any] = dict(model=model, index=index, region=REGION, popular=POPULAR, top_k=10,
                                  model_version=VERSION, generated_at=WHEN)
    return recommend_batch(batch, **{**kwargs, **overrides})


def brute_force(model: TwoTowerModel, vectors: np.ndarray, history: list[str], device: str | None,
                k: int, exclude: set[str] = frozenset()) -> tuple[list[str], np.ndarray]:
    """The expected ranking, computed independently: user tower by hand, every item scored, sorted."""
    encoded = encode_users([history], REGION, device, None, config=model.config)
    model.eval()
    with torch.no_grad():
        user = model.user_embeddings(as_tensors(encoded)).numpy()[0]
    model.train()
    scores = vectors @ user
    order = [i for i in np.argsort(-scores, kind="stable") if ITEMS[i] not in exclude][:k]
    return [ITEMS[i] for i in order], scores[order]


def test_warm_users_get_the_exact_top_k_of_the_model(model: TwoTowerModel, vectors: np.ndarray,
                                                     index: AnnIndex) -> None:
    rows = [{"user_id": f"u{i}", "last_items": ITEMS[i:i + 3 + i % 4], "device": ["mobile", "desktop", None][i % 3]}
            for i in range(7)]
    out = run(users_table(rows), model, index)
    assert out.schema == RECS_SCHEMA
    assert out.column("user_id").to_pylist() == [r["user_id"] for r in rows]
    assert set(out.column("source").to_pylist()) == {"model"}
    for row, got_ids, got_scores in zip(rows, out.column("item_ids").to_pylist(),
                                        out.column("scores").to_pylist()):
        want_ids, want_scores = brute_force(model, vectors, row["last_items"], row["device"], 10)
        assert got_ids == want_ids
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-5)
    assert model.training, "the caller's training mode is restored"


def test_dropout_is_off_while_scoring(model: TwoTowerModel, index: AnnIndex) -> None:
    table = users_table([{"user_id": "u", "last_items": ITEMS[:4]}])
    assert run(table, model, index).equals(run(table, model, index))


def test_cold_users_get_the_popularity_list_exactly(model: TwoTowerModel, index: AnnIndex) -> None:
    table = users_table([{"user_id": "cold", "last_items": []}, {"user_id": "warm", "last_items": ITEMS[5:7]},
                         {"user_id": "null", "last_items": None}])
    out = run(table, model, index).to_pylist()
    assert [r["source"] for r in out] == ["popular", "model", "popular"]
    for row in (out[0], out[2]):
        assert row["item_ids"] == list(POPULAR.item_ids[:10])
        np.testing.assert_allclose(row["scores"], POPULAR.scores[:10])


def test_min_history_decides_who_is_cold(model: TwoTowerModel, index: AnnIndex) -> None:
    table = users_table([{"user_id": f"u{n}", "last_items": ITEMS[:n]} for n in range(5)])
    out = run(table, model, index, min_history=3)
    assert out.column("source").to_pylist() == ["popular"] * 3 + ["model"] * 2
    everyone = run(table, model, index, min_history=0)
    assert set(everyone.column("source").to_pylist()) == {"model"}, "min_history 0: nobody is cold"


def test_purchased_items_are_excluded_and_the_list_stays_full(model: TwoTowerModel, vectors: np.ndarray,
                                                              index: AnnIndex) -> None:
    history = ITEMS[20:24]
    top, _ = brute_force(model, vectors, history, "mobile", 10)
    bought = top[:3] + ["not-in-catalogue"]
    table = users_table([{"user_id": "buyer", "last_items": history, "purchased_items": bought}])
    out = run(table, model, index).to_pylist()[0]
    want, want_scores = brute_force(model, vectors, history, "mobile", 10, exclude=set(bought))
    assert out["item_ids"] == want and len(want) == 10
    assert not set(bought) & set(out["item_ids"])
    np.testing.assert_allclose(out["scores"], want_scores, atol=1e-5)
    kept = run(table, model, index, exclude_purchased=False).to_pylist()[0]
    assert kept["item_ids"][:3] == top[:3], "without the rule, the purchases rank first again"


def test_cold_buyers_get_popular_items_minus_their_purchases(model: TwoTowerModel, index: AnnIndex) -> None:
    popular = list(POPULAR.item_ids)
    table = users_table([{"user_id": "u", "last_items": ITEMS[:1], "purchased_items": [popular[0], popular[4]]}])
    out = run(table, model, index, min_history=2).to_pylist()[0]
    assert out["source"] == "popular"
    assert out["item_ids"] == [i for i in popular if i not in (popular[0], popular[4])][:10]


def test_small_catalogue_gives_short_lists_without_padding(model: TwoTowerModel) -> None:
    ids = ITEMS[:4]
    small = build_index(ids, _item_vectors(model, ids), kind="exact")
    table = users_table([{"user_id": "a", "last_items": ITEMS[:2], "purchased_items": [ids[1]]},
                         {"user_id": "b", "last_items": []}])
    out = run(table, model, small, top_k=10, popular=PopularList(("p1", "p2"), (2.0, 1.0))).to_pylist()
    assert sorted(out[0]["item_ids"]) == sorted([ids[0], ids[2], ids[3]])
    assert len(out[0]["scores"]) == 3 and all(np.isfinite(out[0]["scores"]))
    assert out[1]["item_ids"] == ["p1", "p2"]


def test_a_mixed_batch_row_by_row(model: TwoTowerModel, vectors: np.ndarray, index: AnnIndex) -> None:
    """Warm and cold users, buyers and not, null and duplicate purchases in one batch, split over several
    Arrow chunks (as Ray Data hands them): every row is what the rules give for that user alone."""
    popular = list(POPULAR.item_ids)
    rows = [
        {"user_id": "warm", "last_items": ITEMS[1:4]},
        {"user_id": "cold", "last_items": []},
        {"user_id": "warm-buyer", "last_items": ITEMS[8:12],
         "purchased_items": [ITEMS[30], ITEMS[30], "gone"]},
        {"user_id": "cold-buyer", "last_items": None,
         "purchased_items": [popular[1], popular[1], popular[11]]},
        {"user_id": "null-purchases", "last_items": ITEMS[2:3], "purchased_items": None},
        {"user_id": "cold-null-purchases", "last_items": [], "purchased_items": None},
        {"user_id": "bought-everything", "last_items": ITEMS[:2], "purchased_items": ITEMS[:55]},
    ]
    table = users_table(rows)
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 3), table.slice(5)])
    assert chunked.column("purchased_items").num_chunks == 3
    out = run(chunked, model, index)
    assert out.equals(run(table, model, index)), "chunking changes nothing"
    got = {r["user_id"]: r for r in out.to_pylist()}
    assert [r["user_id"] for r in out.to_pylist()] == [r["user_id"] for r in rows]
    for row in rows:
        bought = set(row.get("purchased_items") or [])
        result = got[row["user_id"]]
        if row["last_items"]:
            want, want_scores = brute_force(model, vectors, row["last_items"], "mobile", 10, exclude=bought)
            assert result["source"] == "model" and result["item_ids"] == want, row["user_id"]
            np.testing.assert_allclose(result["scores"], want_scores, atol=1e-5)
        else:
            keep = [i for i, item in enumerate(popular) if item not in bought][:10]
            assert result["source"] == "popular", row["user_id"]
            assert result["item_ids"] == [popular[i] for i in keep]
            np.testing.assert_allclose(result["scores"], [POPULAR.scores[i] for i in keep])
    assert len(got["bought-everything"]["item_ids"]) == 5, "60 items, 55 bought: 5 left, no padding"
    assert len(got["cold-buyer"]["item_ids"]) == 10, "12 popular, 2 distinct bought: still 10"


def test_a_batch_of_cold_users_only(model: TwoTowerModel, index: AnnIndex) -> None:
    table = users_table([{"user_id": "a"}, {"user_id": "b", "purchased_items": list(POPULAR.item_ids)}])
    out = run(table, model, index).to_pylist()
    assert out[0]["item_ids"] == list(POPULAR.item_ids[:10]) and out[1]["item_ids"] == []
    assert out[1]["scores"] == [] and out[1]["source"] == "popular"
    empty_popular = run(table, model, index, popular=PopularList((), ())).to_pylist()
    assert [r["item_ids"] for r in empty_popular] == [[], []]


def test_default_rows_per_block_gives_every_actor_equal_work() -> None:
    for users, batch, actors in [(100_000, 4096, 2), (5_000, 4096, 2), (401, 32, 2), (4096 * 6, 4096, 3),
                                 (10, 4096, 4), (3, 4096, 4), (1, 16, 2), (1_000_003, 4096, 7)]:
        rows = default_rows_per_block(users, batch, actors)
        blocks = -(-users // rows)
        assert 1 <= rows <= batch, (users, batch, actors)
        assert blocks >= min(users, actors), "every actor gets a block (when there are enough users)"
        assert users - (blocks - 1) * rows >= rows - blocks, "the last block is not much shorter"
    assert default_rows_per_block(100_000, 4096, 2) == 3_847  # 26 blocks, 13 per actor
    assert default_rows_per_block(5_000, 4096, 2) == 2_500
    assert default_rows_per_block(4096 * 6, 4096, 3) == 4096
    assert default_rows_per_block(0, 4096, 2) == 1
    with pytest.raises(ValueError, match="concurrency"):
        default_rows_per_block(10, 4096, 0)


def test_every_ray_batch_format_gives_the_same_table(model: TwoTowerModel, index: AnnIndex) -> None:
    rows = [{"user_id": "a", "last_items": ITEMS[:3], "purchased_items": ITEMS[:1]},
            {"user_id": "b", "last_items": [], "device": None}]
    table = users_table(rows)
    expected = run(table, model, index)
    numpy_batch = {
        "user_id": np.array(["a", "b"], dtype=object),
        "last_items": np.array([np.array(ITEMS[:3], dtype=object), np.array([], dtype=object)], dtype=object),
        "purchased_items": np.array([np.array(ITEMS[:1], dtype=object), np.array([], dtype=object)],
                                    dtype=object),
        "device": np.array(["mobile", None], dtype=object),
    }
    assert run(numpy_batch, model, index).equals(expected)
    assert run(table.to_pandas(), model, index).equals(expected)
    assert run(table.to_batches()[0], model, index).equals(expected)


def test_output_columns_are_constant_per_run(model: TwoTowerModel, index: AnnIndex) -> None:
    paris = timezone(timedelta(hours=1))
    out = run(users_table([{"user_id": "a", "last_items": ITEMS[:2]}, {"user_id": "b"}]), model, index,
              generated_at=datetime(2026, 11, 26, 1, 0, tzinfo=paris))
    assert out.column("model_version").to_pylist() == [VERSION, VERSION]
    assert out.column("generated_at").to_pylist() == [WHEN, WHEN], "stored in UTC"
    with pytest.raises(ValueError, match="timezone-aware"):
        run(users_table([{"user_id": "a"}]), model, index, generated_at=datetime(2026, 11, 26))


def test_empty_batch_and_missing_columns(model: TwoTowerModel, index: AnnIndex) -> None:
    empty = run(users_table([]), model, index)
    assert empty.num_rows == 0 and empty.schema == RECS_SCHEMA
    with pytest.raises(KeyError, match="purchased_items"):
        run(pa.table({"user_id": ["a"], "last_items": pa.array([["x"]])}), model, index)
    no_rule = run(pa.table({"user_id": ["a"], "last_items": pa.array([ITEMS[:2]])}), model, index,
                  exclude_purchased=False)
    assert no_rule.column("source").to_pylist() == ["model"], "device may be absent: unknown device"


def test_user_vectors_are_unit_length_and_use_the_region(model: TwoTowerModel) -> None:
    table = users_table([{"user_id": "a", "last_items": ITEMS[:3]}])
    here = user_vectors(model, table, REGION)
    there = user_vectors(model, table, "ap-south-1")
    np.testing.assert_allclose(np.linalg.norm(here, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(here, there)


def test_defaults_and_summary_round_trip() -> None:
    assert default_generated_at(date(2026, 11, 25)) == WHEN
    summary = ScoreSummary(region=REGION, dt="2026-11-25", model_version=VERSION, generated_at="2026-11-26T00:00:00Z",
                           users=3, model_scored=2, popular_fallback=1, seconds=1.5, users_per_second=2.0,
                           output="file:///lake/recs", files=[{"path": "part-00000-0.parquet", "rows": 3}])
    assert ScoreSummary.from_json(summary.to_json()) == summary
