"""The training and scoring benchmarks' core functions at tiny sizes, on a real local Ray.

Not a performance test (ENGINEERING.md §4: performance lives in benchmarks/, never in timed tests): it
checks that each benchmark runs its measured path and its baseline end to end and emits the figures the
report reads, named as the issue names them, with the convention's keys and positive values, and that
the probes (threads inside the Ray Train worker and the scoring actors, the prototypes' checks) report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import benchmarks.common
from benchmarks import score as score_bench
from benchmarks import train as train_bench

pytestmark = pytest.mark.integration

KEYS = {"benchmark", "metric", "value", "unit", "baseline_metric", "baseline_value", "ratio", "machine",
        "params"}
# A small model: the benchmark's code path, in seconds.
MODEL: dict[str, Any] = {"id_buckets": 4096, "category_buckets": 64, "embedding_dim": 16, "feature_dim": 4,
                         "item_hidden": [32], "user_hidden": [32], "output_dim": 16, "history_length": 10}


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """emit() appends to benchmarks/results/<name>.jsonl: here, to a temporary folder instead."""
    folder = tmp_path / "results"
    monkeypatch.setattr(benchmarks.common, "RESULTS", folder)
    return folder


def check_lines(lines: list[dict[str, Any]], results: Path, name: str, metrics: set[str]) -> dict[str, dict]:
    by_metric = {line["metric"]: line for line in lines}
    assert set(by_metric) == metrics
    for line in lines:
        assert KEYS <= set(line), sorted(KEYS - set(line))
        assert line["benchmark"] == name
        assert line["value"] > 0 and line["baseline_value"] > 0
        assert line["ratio"] == pytest.approx(line["value"] / line["baseline_value"], rel=1e-3, abs=1e-4)
        assert line["machine"]["cores"] >= 1
    written = [json.loads(text) for text in (results / f"{name}.jsonl").read_text().splitlines()]
    assert [w["metric"] for w in written] == [line["metric"] for line in lines]
    return by_metric


def test_train_benchmark_emits_both_figures(tmp_path: Path, results: Path) -> None:
    lines = train_bench.benchmark(
        work=tmp_path / "work", rows=600, items=300, epochs=2, batch_size=128, configs=["single"], device="cpu",
        repeats=1, seed=0, model=MODEL, profile=True, probe_allreduce=False, quick=True)
    figures = check_lines(lines, results, "train", {"train_samples_per_s", "train_wall_samples_per_s"})
    main = figures["train_samples_per_s"]
    assert main["baseline_metric"] == "plain_pytorch_samples_per_s"
    assert main["params"]["config"] == "single" and main["fair_comparison"] is True
    assert main["params"]["rows"] == 600 and main["params"]["global_batch"] == 128
    assert [e["rows"] for e in main["ray_epochs"]] == [600, 600]
    assert [e["rows"] for e in main["baseline_epochs"]] == [600, 600]
    # The worker's loop was the real one, wrapped: it logged its threads and timed every epoch.
    (worker,) = main["workers_probe"]
    assert worker["torch_threads"] == main["params"]["cores"] == int(worker["OMP_NUM_THREADS"])
    assert len(worker["epochs"]) == 2 and all(e["steps"] == 5 for e in worker["epochs"])
    assert figures["train_wall_samples_per_s"]["value"] < main["value"], "the wall figure includes start-up"


def test_score_benchmark_emits_the_figures(tmp_path: Path, results: Path) -> None:
    lines = score_bench.benchmark(
        work=tmp_path / "work", users=1_000, items=1_000, seed=0, device="cpu", repeats=1, inner_repeats=1,
        rows_per_block=[250], score_overrides={"batch_size": 250, "top_k": 20}, quick=True, model=MODEL)
    figures = check_lines(lines, results, "score", {
        "score_users_per_s_rows_per_block_250", "score_users_per_s_incl_ray_start_rows_per_block_250",
        "score_users_per_s_steady_state_rows_per_block_250", "score_in_process_users_per_s"})
    # (the default run, rows_per_block None, is the same path with equal blocks: metric
    # score_users_per_s; one pipeline run keeps this test short)
    main = figures["score_users_per_s_rows_per_block_250"]
    assert main["baseline_metric"] == "raw_index_search_users_per_s"
    assert main["params"]["users"] == 1_000 and main["params"]["index"]["kind"] == "exact"
    assert main["params"]["rows_per_block"] == 250 and main["params"]["output_files"] == 4
    assert main["ray_start_included"] is False and main["ray_init_s"] > 0
    assert figures["score_users_per_s_incl_ray_start_rows_per_block_250"]["value"] < main["value"]
    # The steady-state figure leaves start-up and tail out, so it is at least the end-to-end one.
    assert figures["score_users_per_s_steady_state_rows_per_block_250"]["value"] >= main["value"]
    assert set(main["in_process_users_per_s"]) >= {"user_tower", "search", "search_excluding",
                                                   "recommend_batch"}
    # Every user went through an actor; the actors ran with the threads their 0.5 CPU gives them.
    actors = main["pipeline"]["actors"]
    assert sum(a["rows"] for a in actors) == 1_000 and sum(a["batches"] for a in actors) == 4
    assert {a["torch_threads"] for a in actors} == {a["faiss_threads"] for a in actors} == {1}
    # The vectorised paths return what the per-row originals return (a swap of near-tied scores at most).
    checks = main["checks"]
    assert checks["user_vectors_max_abs_diff"] < 1e-5
    assert checks["search_excluding_vs_legacy"]["rows_identical"] == 1_000
    recommend = checks["recommend_batch_vs_legacy"]
    assert recommend["same_schema"] and recommend["rows"] == 1_000 and recommend["unexplained_rows"] == 0
