"""benchmarks.quality: the pure split / example builder, the seen-items rule, and a tiny end-to-end run
(MovieLens-format file written here, tiny synthetic set) that checks the emitted figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

import benchmarks.common as common
from benchmarks import quality as q

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

H = 3_600_000  # one hour in ms



def _events(rows: list[tuple[str, str, int, str]], event_type: str = "view") -> pa.Table:
    """(user, item, ts_ms, event_id) rows → an events table."""
    return q.events_table({
        "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
        "event_type": [event_type] * len(rows), "ts_ms": [r[2] for r in rows],
        "event_id": [r[3] for r in rows],
    })


def _by_key(examples: pa.Table) -> dict[tuple[str, str], dict[str, Any]]:
    """(user_id, event's item_id) → the example row (test rows use distinct items per user)."""
    return {(r["user_id"], r["item_id"]): r for r in examples.to_pylist()}


# --------------------------------------------------------------------------------------------------------
# holdout_counts / SplitRule
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sizes", "rule", "expected"), [
    ([20, 5, 2, 1], q.SplitRule(last=10), [10, 4, 1, 0]),          # always one train interaction left
    ([20, 5, 2, 1], q.SplitRule(last=1), [1, 1, 1, 0]),
    ([20, 5, 2, 1], q.SplitRule(fraction=0.1), [2, 1, 1, 0]),      # rounded, at least 1
    ([100, 25, 15], q.SplitRule(fraction=0.2), [20, 5, 3]),
])
def test_holdout_counts(sizes: list[int], rule: q.SplitRule, expected: list[int]) -> None:
    assert q.holdout_counts(np.array(sizes), rule).tolist() == expected


@pytest.mark.parametrize("kwargs", [{"last": 0}, {"fraction": 0.0}, {"fraction": 1.0}])
def test_split_rule_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        q.SplitRule(**kwargs)


# --------------------------------------------------------------------------------------------------------
# build_examples
# --------------------------------------------------------------------------------------------------------

# One user, events out of order in the input; two share ts=2h (ordered by event_id: e2 < e3).
ROWS = [("u1", "d", 4 * H, "e5"), ("u1", "a", 1 * H, "e1"), ("u1", "c", 2 * H, "e3"),
        ("u1", "b", 2 * H, "e2"), ("u1", "e", 5 * H, "e6")]


@pytest.mark.parametrize(("history_length", "expected"), [
    # history = items strictly before the event's ts (b and c, at the same ms, never see each other)
    (50, {"a": [], "b": ["a"], "c": ["a"], "d": ["a", "b", "c"], "e": ["a", "b", "c", "d"]}),
    # the last N, oldest first
    (2, {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["c", "d"]}),
    (1, {"a": [], "b": ["a"], "c": ["a"], "d": ["c"], "e": ["d"]}),
])
def test_history_is_strictly_before_and_the_last_n(history_length: int,
                                                    expected: dict[str, list[str]]) -> None:
    examples = q.build_examples(_events(ROWS), q.SplitRule(last=1), history_length=history_length)
    got = {r["item_id"]: r["history"] for r in examples.to_pylist()}
    assert got == expected
    # sorted by user, ts, event_id; hour from ts; weight from the event type
    assert examples.column("item_id").to_pylist() == ["a", "b", "c", "d", "e"]
    assert examples.column("hour").to_pylist() == [1, 2, 2, 4, 5]
    assert set(examples.column("weight").to_pylist()) == {1.0}


@pytest.mark.parametrize(("rule", "eval_items"), [
    (q.SplitRule(last=1), {"e"}),
    (q.SplitRule(last=2), {"d", "e"}),
    (q.SplitRule(last=3), {"c", "d", "e"}),        # ties split by event_id: b (e2) stays train
    (q.SplitRule(last=10), {"b", "c", "d", "e"}),  # capped: a stays train
    (q.SplitRule(fraction=0.4), {"d", "e"}),
])
def test_per_user_last_interactions_are_eval(rule: q.SplitRule, eval_items: set[str]) -> None:
    examples = q.build_examples(_events(ROWS), rule, history_length=50)
    got = {r["item_id"] for r in examples.to_pylist() if r["split"] == "eval"}
    assert got == eval_items


def test_split_is_per_user_and_eval_histories_include_train_items() -> None:
    rows = [("u1", f"a{i}", i * H, f"x{i}") for i in range(6)] + [("u2", f"b{i}", (10 + i) * H, f"y{i}")
                                                                  for i in range(3)] + [("u3", "c0", H, "z0")]
    examples = q.build_examples(_events(rows), q.SplitRule(last=2), history_length=50)
    split = {(r["user_id"], r["item_id"]): r["split"] for r in examples.to_pylist()}
    assert [k for k, v in split.items() if v == "eval"] == [
        ("u1", "a4"), ("u1", "a5"), ("u2", "b1"), ("u2", "b2")]
    assert split[("u3", "c0")] == "train"  # a user with one interaction is never held out
    rows_by = _by_key(examples)
    assert rows_by[("u1", "a4")]["history"] == ["a0", "a1", "a2", "a3"]
    assert rows_by[("u1", "a5")]["history"] == ["a0", "a1", "a2", "a3", "a4"]
    assert rows_by[("u2", "b0")]["history"] == []  # other users' items never leak in


def test_item_pop_rank_counts_the_train_split_only() -> None:
    # "hot" is the most frequent item overall, but only in eval rows: it must get no rank at all.
    # Train: p x3 (u1, u2, u3), q x2 (u1, u2; one a purchase), r x1. Weighted: q 9, p 3, r 1.
    rows = [("u1", "p", 1 * H, "a1"), ("u1", "q", 2 * H, "a2"), ("u1", "hot", 3 * H, "a3"),
            ("u2", "p", 1 * H, "b1"), ("u2", "q", 2 * H, "b2"), ("u2", "hot", 3 * H, "b3"),
            ("u3", "p", 1 * H, "c1"), ("u3", "r", 2 * H, "c2"), ("u3", "hot", 3 * H, "c3")]
    events = _events(rows)
    types = ["view"] * len(rows)
    types[4] = "purchase"  # u2's q
    events = events.set_column(2, "event_type", pa.array(types, pa.string()))
    examples = q.build_examples(events, q.SplitRule(last=1), history_length=50)
    rank = {r["item_id"]: r["item_pop_rank"] for r in examples.to_pylist()}
    assert rank == {"q": 1, "p": 2, "r": 3, "hot": None}
    assert {r["item_id"] for r in examples.to_pylist() if r["split"] == "eval"} == {"hot"}
    assert _by_key(examples)[("u2", "q")]["weight"] == 8.0


def test_catalogue_has_every_item_with_train_ranks() -> None:
    rows = [("u1", "p", 1 * H, "a1"), ("u1", "q", 2 * H, "a2"), ("u1", "new", 3 * H, "a3")]
    events = _events(rows).set_column(5, "category", pa.array(["x", None, "y"], pa.string()))
    examples = q.build_examples(events, q.SplitRule(last=1), history_length=50)
    from ray_apps.evaluate import popularity_ranking_from_examples

    items = q.catalogue(events, popularity_ranking_from_examples(q.split_rows(examples, "train"), None))
    assert items.to_pylist() == [
        {"item_id": "new", "category": "y", "popularity_rank": None},
        {"item_id": "p", "category": "x", "popularity_rank": 1},
        {"item_id": "q", "category": None, "popularity_rank": 2},
    ]


# --------------------------------------------------------------------------------------------------------
# seen items, ALS formatting
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ranked", "seen", "k", "expected"), [
    ([["a", "b", "c", "d"]], [np.array(["b"], object)], 2, [["a", "c"]]),
    ([["a", "b", "c", "d"]], None, 3, [["a", "b", "c"]]),
    ([["a", "b", ""]], [np.array(["a"], object)], 3, [["b", "", ""]]),  # padded
    ([["a", "b"], ["a", "b"]], [np.array([], object), np.array(["a", "b"], object)], 2,
     [["a", "b"], ["", ""]]),
])
def test_exclude_seen(ranked: list[list[str]], seen: list[np.ndarray] | None, k: int,
                      expected: list[list[str]]) -> None:
    out = q.exclude_seen(np.array(ranked, dtype=object), seen, k)
    assert out.tolist() == expected


def test_positions_to_ids_pads_missing_and_out_of_range() -> None:
    out = q.positions_to_ids(np.array([[2, 0, -1], [1, 7, 0]]), np.array(["a", "b", "c"], object), 4)
    assert out.tolist() == [["c", "a", "", ""], ["b", "", "a", ""]]


def test_seen_items_and_user_item_matrix() -> None:
    train = pa.table({"user_id": ["u1", "u1", "u1", "u2"], "item_id": ["a", "b", "a", "b"],
                      "weight": [1.0, 2.0, 8.0, 4.0]})
    seen = q.seen_items(train, np.array(["u2", "u9", "u1"], object))
    assert [sorted(s) for s in seen] == [["b"], [], ["a", "b"]]
    matrix = q.user_item_matrix(train, np.array(["u1", "u2"], object), np.array(["a", "b", "c"], object))
    assert matrix.toarray().tolist() == [[9.0, 2.0, 0.0], [0.0, 4.0, 0.0]]


def test_read_genres_takes_the_first_flag(tmp_path: Path) -> None:
    flags = ["0"] * len(q.ML_GENRES)
    flags[5], flags[8] = "1", "1"  # comedy, drama
    none = ["0"] * len(q.ML_GENRES)
    (tmp_path / "u.item").write_bytes(
        ("1|Caf\xe9 (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n"
         "2|Nothing (1995)|01-Jan-1995||http://x|" + "|".join(none) + "\n").encode("latin-1"))
    assert q.read_genres(tmp_path / "u.item") == {"ml-i1": "comedy"}


# --------------------------------------------------------------------------------------------------------
# End to end, tiny
# --------------------------------------------------------------------------------------------------------

def _write_movielens(folder: Path, users: int = 30, items: int = 40, per_user: int = 12,
                     seed: int = 3) -> None:
    """A u.data with structure: two taste groups over a Zipf-ish catalogue, ratings 1-5."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, items + 1) ** 0.7
    lines = []
    for u in range(1, users + 1):
        taste = (np.arange(items) % 2 == u % 2) * 3.0 + 1.0
        p = pop * taste / (pop * taste).sum()
        chosen = rng.choice(items, size=per_user, replace=False, p=p)
        for j, item in enumerate(chosen):
            lines.append(f"{u}\t{item + 1}\t{int(rng.integers(1, 6))}\t{880_000_000 + u * 1000 + j * 60}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("\n".join(lines) + "\n")


def test_quick_run_emits_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    _write_movielens(tmp_path / "ml")
    code = q.main([
        "--quick", "--movielens", str(tmp_path / "ml"), "--epochs", "1", "--synthetic-epochs", "2",
        "--threads", "1",
        "--batch-size", "64", "--holdout-last", "3",
        "--model", "id_buckets=4096", "--model", "category_buckets=64", "--model", "embedding_dim=16",
        "--model", "item_hidden=[32]", "--model", "user_hidden=[32]", "--model", "output_dim=16",
        "--als-factors", "8", "--als-iterations", "3",
        "--synthetic-users", "40", "--synthetic-items", "60", "--synthetic-events", "2500",
        "--synthetic-days", "2",
    ])
    assert code == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    by_dataset: dict[str, dict[str, dict[str, Any]]] = {}
    for line in lines:
        by_dataset.setdefault(line["dataset"], {})[line["metric"]] = line
    models = {f"{m}@20_{name}" for m in ("recall", "ndcg") for name in ("two_tower", "popular", "als")}
    ratios = {"recall@20_vs_popular", "recall@20_vs_als"}
    assert set(by_dataset[q.MOVIELENS]) == models | ratios
    assert set(by_dataset[q.SYNTHETIC]) == models | ratios | {"recall@20_planted", "ndcg@20_planted"}
    for dataset, figures in by_dataset.items():
        for name, line in figures.items():
            for key in ("benchmark", "metric", "value", "unit", "baseline_metric", "baseline_value", "ratio",
                        "machine", "params"):
                assert key in line, (dataset, name, key)
            assert line["benchmark"] == "quality"
            if name in ratios:
                assert line["unit"] == "ratio"
                assert line["value"] == pytest.approx(line["two_tower"] / line["reference"], abs=1e-3)
            else:
                assert 0.0 <= line["value"] <= 1.0 and 0.0 <= line["baseline_value"] <= 1.0
        params = figures["recall@20_two_tower"]["params"]
        assert params["two_tower"]["epochs"] == (1 if dataset == q.MOVIELENS else 2)
        assert params["quick"] is True and params["two_tower"]["batch_size"] == 64
        assert params["exclude_seen"] is (dataset == q.MOVIELENS)
    assert by_dataset[q.MOVIELENS]["recall@20_two_tower"]["baseline_metric"] == "recall@20_popular"
    assert by_dataset[q.MOVIELENS]["recall@20_vs_als"]["baseline_value"] == q.TARGET_VS_ALS
    # the planted truth knows the users' tastes: it beats recommending the same list to everyone
    synthetic = by_dataset[q.SYNTHETIC]
    assert synthetic["recall@20_planted"]["value"] > synthetic["recall@20_popular"]["value"]
    saved = [json.loads(x) for x in (tmp_path / "results" / "quality.jsonl").read_text().splitlines()]
    assert saved == lines
    assert "two_tower" in out.err and "planted" in out.err  # the table went to stderr


def test_without_movielens_only_synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    code = q.main(["--quick", "--synthetic-epochs", "1", "--threads", "1", "--batch-size", "64",
                   "--model", "id_buckets=1024", "--als-factors", "4", "--als-iterations", "2",
                   "--synthetic-users", "20", "--synthetic-items", "30", "--synthetic-events", "800",
                   "--synthetic-days", "1"])
    assert code == 0
    out = capsys.readouterr()
    assert {json.loads(x)["dataset"] for x in out.out.splitlines()} == {q.SYNTHETIC}
    assert "no --movielens" in out.err


def test_missing_movielens_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert q.main(["--movielens", str(tmp_path), "--no-synthetic"]) == 2
    err = capsys.readouterr().err
    assert "u.data" in err and "Traceback" not in err
