"""The ANN index: exact search, approximate recall, exclusions, persistence and the auto choice."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest

from ray_apps.ann import (
    AnnIndex,
    AnnParams,
    build_index,
    configure_threads,
    measure_recall,
    recall_queries,
    resolve_kind,
)

N, DIM, CLUSTERS = 20_000, 32, 200


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    """One OpenMP thread here: bit-reproducible HNSW graphs, and no OpenMP barrier stalls when the 2-core
    test machine is shared with other test processes (a busy core makes every 2-thread region wait)."""
    before = faiss.omp_get_max_threads()
    configure_threads(1)
    yield
    configure_threads(before)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    """20k items in 200 clusters, spread wide enough (noise 0.7 per axis vs unit-variance centres) that
    neighbourhoods overlap and an approximate index has real work to do."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(CLUSTERS, DIM))
    x = centres[rng.integers(0, CLUSTERS, N)] + 0.7 * rng.normal(size=(N, DIM))
    return np.array([f"item-{i:05d}" for i in range(N)], dtype=object), _normalise(x)


@pytest.fixture(scope="module")
def queries(catalogue: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return recall_queries(catalogue[1], 200, seed=1)


@pytest.fixture(scope="module")
def ivf(catalogue: tuple[np.ndarray, np.ndarray]) -> AnnIndex:
    return build_index(*catalogue, kind="ivf")


@pytest.fixture(scope="module")
def hnsw(catalogue: tuple[np.ndarray, np.ndarray]) -> AnnIndex:
    # A narrower construction beam than the default (100) builds 3x faster; recall must hold even so.
    return build_index(*catalogue, kind="hnsw", params=AnnParams(ef_construction=40))


def _brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ x.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)


def test_exact_search_equals_brute_force(catalogue: tuple[np.ndarray, np.ndarray],
                                         queries: np.ndarray) -> None:
    ids, x = catalogue[0][:3_000], catalogue[1][:3_000]
    index = build_index(ids, x, kind="exact")
    got_ids, got_scores = index.search(queries, 50)
    top, scores = _brute_force(x, queries, 50)
    assert got_ids.shape == (len(queries), 50) and got_scores.dtype == np.float32
    assert (got_ids == ids[top]).all()
    np.testing.assert_allclose(got_scores, scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_100_is_at_least_095(kind: str, request: pytest.FixtureRequest,
                                                   catalogue: tuple[np.ndarray, np.ndarray],
                                                   queries: np.ndarray) -> None:
    index: AnnIndex = request.getfixturevalue(kind)
    assert index.kind == kind
    recall = measure_recall(index, catalogue[1], queries, k=100)
    assert 0.95 <= recall <= 1.0
    # Scores are exact inner products even when the candidate set is approximate.
    got_ids, got_scores = index.search(queries[:5], 10)
    position = {item: i for i, item in enumerate(catalogue[0])}
    rows = np.array([[position[i] for i in row] for row in got_ids])
    true_scores = np.einsum("bd,bkd->bk", queries[:5], catalogue[1][rows])
    np.testing.assert_allclose(got_scores, true_scores, atol=1e-5)


def test_measure_recall_detects_a_poor_index(catalogue: tuple[np.ndarray, np.ndarray],
                                             queries: np.ndarray) -> None:
    """One probed list out of 512 (~40 items, enough for k=10) must show up as low recall@10: the
    measurement is not a rubber stamp. (At k=100 the search widens its probe to fill 100 results.)"""
    poor = build_index(*catalogue, kind="ivf", params=AnnParams(nprobe=1))
    assert measure_recall(poor, catalogue[1], queries, k=10) < 0.8
    exact = build_index(*catalogue, kind="exact")
    assert measure_recall(exact, catalogue[1], queries) == 1.0


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_exclusions_are_filtered_and_k_results_still_returned(
        kind: str, request: pytest.FixtureRequest, catalogue: tuple[np.ndarray, np.ndarray],
        queries: np.ndarray) -> None:
    index = request.getfixturevalue(kind) if kind != "exact" else build_index(*catalogue, kind="exact")
    q = queries[:20]
    top, _ = _brute_force(catalogue[1], q, 150)
    # Row b excludes its own 150 best items (more than k), row 1 nothing, plus ids not in the catalogue.
    exclude = [set(catalogue[0][top[b]]) | {"not-an-item"} for b in range(len(q))]
    exclude[1] = None
    got_ids, got_scores = index.search(q, 100, exclude=exclude)
    assert got_ids.shape == (20, 100)
    for b, row in enumerate(got_ids):
        assert len(set(row)) == 100 and "" not in row
        assert not (set(row) & (exclude[b] or set()))
        assert np.all(np.diff(got_scores[b]) <= 1e-6)  # best first
    if kind == "exact":  # exactly the next 100 items after the excluded ones
        expected, _ = _brute_force(catalogue[1], q, 250)
        assert (got_ids[0] == catalogue[0][expected[0, 150:]]).all()


def test_ivf_widens_its_probe_when_exclusions_exhaust_the_candidates(
        catalogue: tuple[np.ndarray, np.ndarray], queries: np.ndarray) -> None:
    """With one probed list (~40 items), excluding 2,000 items leaves nothing: the search must widen."""
    index = build_index(*catalogue, kind="ivf", params=AnnParams(nprobe=1))
    q = queries[:3]
    top, _ = _brute_force(catalogue[1], q, 2_000)
    exclude = [catalogue[0][row] for row in top]
    got_ids, _ = index.search(q, 100, exclude=exclude)
    for b, row in enumerate(got_ids):
        assert len(set(row)) == 100 and "" not in row and not set(row) & set(exclude[b])


def test_small_catalogue_pads_when_too_few_items_remain() -> None:
    rng = np.random.default_rng(3)
    ids = [f"i{i}" for i in range(20)]
    index = build_index(ids, _normalise(rng.normal(size=(20, 4))))
    got_ids, got_scores = index.search(_normalise(rng.normal(size=(1, 4))), 10, exclude=[ids[:15]])
    assert sorted(got_ids[0, :5]) == ids[15:]
    assert list(got_ids[0, 5:]) == [""] * 5 and np.isneginf(got_scores[0, 5:]).all()


def _per_row_reference(index: AnnIndex, q: np.ndarray, k: int,
                       exclude: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Each query searched ALONE for all items, its exclusions dropped in Python: what the vectorised
    exclusion must reproduce (on an exact index)."""
    position = {item: i for i, item in enumerate(index.item_ids)}
    out_pos = np.full((len(q), k), -1, dtype=np.int64)
    out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    for b in range(len(q)):
        scores, pos = index._raw_search(q[b:b + 1], len(index), effort=1, exhaustive=True)
        banned = {position[i] for i in (exclude[b] or []) if i in position}
        keep = [c for c in range(pos.shape[1]) if pos[0, c] >= 0 and pos[0, c] not in banned][:k]
        out_pos[b, :len(keep)], out_scores[b, :len(keep)] = pos[0, keep], scores[0, keep]
    return out_pos, out_scores


def _as_arrow(exclude: list[Any]) -> pa.Array:
    return pa.array([None if e is None else list(e) for e in exclude], pa.list_(pa.string()))


def test_vectorised_exclusion_matches_a_per_row_filter_on_edge_cases() -> None:
    """One batch mixing every case: no exclusions (None, empty), unknown ids, duplicates, null ids, a
    row whose exclusions remove every item, rows left with fewer than k items, and an exclusion list
    longer than k. Python lists and the Arrow list column (how scoring passes it) agree with the
    reference, and with each row searched on its own."""
    rng = np.random.default_rng(11)
    n, k = 30, 8
    ids = np.array([f"i{i:02d}" for i in range(n)], dtype=object)
    index = build_index(ids, _normalise(rng.normal(size=(n, 6))), kind="exact")
    q = _normalise(rng.normal(size=(9, 6)))
    exclude: list[Any] = [
        None,                                   # nothing
        [],                                     # nothing either
        ["nope", "", None],                     # unknown, empty and null ids: ignored
        [ids[3], ids[3], ids[3], ids[7]],       # duplicates: excluded once, still k results
        list(ids),                              # every item: a row of padding
        list(ids[:25]),                         # 5 items left < k: padded after them
        list(ids[5:20]),                        # longer than k
        [ids[0]],
        list(ids[:22]) + ["nope"],              # exactly k left
    ]
    want_pos, want_scores = _per_row_reference(index, q, k, exclude)
    for form in (exclude, _as_arrow(exclude)):
        pos, scores = index.search_positions(q, k, form)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    assert (pos[4] == -1).all() and np.isneginf(scores[4]).all(), "all excluded: nothing left"
    assert (pos[5, :5] >= 0).all() and (pos[5, 5:] == -1).all()
    assert (pos[[0, 1, 2, 3, 6, 7, 8]] >= 0).all(), "everyone else gets k items"
    for b in range(len(q)):  # a batch gives what each query alone gives
        alone, _ = index.search_positions(q[b:b + 1], k, [exclude[b]])
        np.testing.assert_array_equal(alone[0], pos[b])
    got_ids, _ = index.search(q, k, exclude)
    assert list(got_ids[4]) == [""] * k and set(got_ids[3]).isdisjoint({ids[3], ids[7]})


@pytest.mark.parametrize("per_row", [2, 60])
def test_short_and_long_exclusion_lists_match_a_per_row_filter(per_row: int) -> None:
    """Both ways of matching exclusions against candidates (see AnnIndex._excluded_mask): a few ids a
    row (pairwise comparison, how purchases usually look) and long lists (a sorted search). Half the
    excluded ids come from the row's own top k, so they knock out candidates; some rows have none."""
    rng = np.random.default_rng(5)
    n, k, rows = 400, 10, 64
    ids = np.array([f"i{i:03d}" for i in range(n)], dtype=object)
    index = build_index(ids, _normalise(rng.normal(size=(n, 8))), kind="exact")
    q = _normalise(rng.normal(size=(rows, 8)))
    top, _ = index.search_positions(q, k)
    exclude: list[Any] = []
    for b in range(rows):
        if b % 4 == 0:
            exclude.append(None)
            continue
        own = [ids[p] for p in rng.choice(top[b], size=min(per_row // 2 or 1, k), replace=False)]
        other = [ids[p] for p in rng.integers(0, n, size=per_row - len(own))]
        exclude.append(own + other + own[:1])  # a duplicate too
    want_pos, want_scores = _per_row_reference(index, q, k, exclude)
    pos, scores = index.search_positions(q, k, _as_arrow(exclude))
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    assert (pos >= 0).all(), "every row keeps k items"


def test_exclusion_forms_agree_sliced_and_chunked(catalogue: tuple[np.ndarray, np.ndarray],
                                                 queries: np.ndarray) -> None:
    """Arrow exclusions as scoring gets them from Ray Data: slices of chunked columns (offsets not at 0)."""
    ids, x = catalogue[0][:2_000], catalogue[1][:2_000]
    index = build_index(ids, x, kind="exact")
    rng = np.random.default_rng(5)
    exclude = [None if b % 4 == 0 else list(rng.choice(ids, size=int(rng.integers(0, 30))))
               for b in range(120)]
    arrow = _as_arrow(exclude)
    chunked = pa.chunked_array([arrow.slice(0, 50), arrow.slice(50)])
    want = index.search_positions(queries[:100], 50, exclude[20:])
    for form in (chunked.slice(20, 100), arrow.slice(20, 100), chunked.slice(20, 100).combine_chunks()):
        got = index.search_positions(queries[:100], 50, form)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert pc.list_value_length(arrow.slice(20, 100)).to_pylist()[1] == len(exclude[21] or [])
    mapped = index.item_ids_arrow.take(pa.array(want[0][0]))
    assert mapped.to_pylist() == list(ids[want[0][0]]), "positions map to ids through item_ids_arrow"


def test_exclusion_inputs_are_validated() -> None:
    x = _normalise(np.random.default_rng(0).normal(size=(3, 4)))
    index = build_index(["a", "b", "c"], x)
    with pytest.raises(ValueError, match="exclude has 2 entries for 1 queries"):
        index.search_positions(x[:1], 1, _as_arrow([["a"], []]))
    with pytest.raises(TypeError, match="Arrow list array"):
        index.search_positions(x[:1], 1, pa.array(["a"]))
    assert index.search_positions(x[:0], 2, [])[0].shape == (0, 2)


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_load_round_trip_gives_identical_results(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path,
        catalogue: tuple[np.ndarray, np.ndarray], queries: np.ndarray) -> None:
    index = request.getfixturevalue(kind) if kind != "exact" else build_index(*catalogue, kind="exact")
    fs = pafs.LocalFileSystem()
    index.save(fs, str(tmp_path / "index"))
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["index.faiss", "item_ids.parquet",
                                                                      "meta.json"]
    loaded = AnnIndex.load(fs, str(tmp_path / "index"))
    assert (loaded.kind, loaded.params, len(loaded), loaded.dim) == (index.kind, index.params, N, DIM)
    exclude = [{catalogue[0][b]} for b in range(len(queries))]
    before, after = index.search(queries, 100, exclude), loaded.search(queries, 100, exclude)
    assert (before[0] == after[0]).all()
    np.testing.assert_array_equal(before[1], after[1])


def test_ivf_build_is_deterministic(catalogue: tuple[np.ndarray, np.ndarray], ivf: AnnIndex) -> None:
    """Same embeddings and seed, same bytes: what lets the registry derive version names from content."""
    again = build_index(*catalogue, kind="ivf")
    assert again.to_files() == ivf.to_files()


def test_auto_picks_exact_at_or_below_the_threshold(catalogue: tuple[np.ndarray, np.ndarray]) -> None:
    ids, x = catalogue[0][:2_000], catalogue[1][:2_000]
    assert build_index(ids, x, exact_max_items=2_000).kind == "exact"
    above = build_index(ids, x, exact_max_items=1_999)
    assert above.kind == "ivf" and above.params["nlist"] == 2_000 // 39  # capped: >= 39 points per list
    assert resolve_kind("auto", 50_000, 50_000) == "exact" and resolve_kind("auto", 50_001, 50_000) == "ivf"
    assert resolve_kind("hnsw", 10, 50_000) == "hnsw"
    with pytest.raises(ValueError, match="kind must be one of"):
        resolve_kind("lsh", 10, 50_000)


def test_ivf_default_parameters_follow_the_catalogue_size(ivf: AnnIndex) -> None:
    # 4*sqrt(20000) = 566 lists would train on fewer than 39 points each; capped at 20000 // 39.
    assert ivf.params == {"nlist": 512, "nprobe": 32, "seed": 0}
    assert ivf.info()["metric"] == "inner_product"


def test_inputs_are_validated() -> None:
    x = _normalise(np.random.default_rng(0).normal(size=(3, 4)))
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(["a", "b", "c"], x * 2)
    with pytest.raises(ValueError, match="unique"):
        build_index(["a", "a", "c"], x)
    with pytest.raises(ValueError, match="3 item ids but 2"):
        build_index(["a", "b", "c"], x[:2])
    index = build_index(["a", "b", "c"], x)
    with pytest.raises(ValueError, match="dimension 5"):
        index.search(np.ones((1, 5), np.float32), 1)
    with pytest.raises(ValueError, match="exclude has 2 entries for 1 queries"):
        index.search(x[:1], 1, exclude=[set(), set()])


def test_threads_follow_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_threads() == 3 and faiss.omp_get_max_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= configure_threads() <= (os.cpu_count() or 1)
    assert configure_threads(1) == 1
