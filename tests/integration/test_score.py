"""Batch scoring (ray_apps.score) on a local Ray cluster over a file:// lake.

A tiny model version is built here (random two-tower weights, item vectors from its item tower, an
exact index), published and promoted in the registry; users and items tables are written with pyarrow
in the ETL's layout and schemas. Scoring runs with Ray Data (two 0.5-CPU actors, small batches, the
users table split over several files) and its output is checked row by row against an in-process
``recommend_batch`` over the same model and index, plus the rules: purchased items excluded, cold users
served the popularity list, reruns idempotent, clear errors, and the CLI.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from ray_apps.ann import AnnIndex, build_index
from ray_apps.encoding import encode_items
from ray_apps.model import TwoTowerConfig, TwoTowerModel, as_tensors
from ray_apps.registry import ModelRegistry, embeddings_table
from ray_apps.score import (
    RECS_SCHEMA,
    SUMMARY_FILE,
    MissingInputError,
    NoPromotedModelError,
    PopularList,
    ScoreError,
    ScoreSummary,
    read_popular,
    read_summary,
    recommend_batch,
    score,
    user_vectors,
)
from streamrec.cli import score as score_cli
from streamrec.cli.common import UserError
from streamrec.settings import RegionSettings, Settings, load_settings

pytestmark = pytest.mark.integration

REGION = "eu-west-1"
UNPROMOTED = "eu-central-1"  # has features but no promoted model
OLD_HASHING = "v-old-hashing"
DAY = date(2026, 11, 25)
NEXT_DAY = DAY + timedelta(days=1)
END_OF_DAY = datetime(2026, 11, 26, tzinfo=UTC)
N_ITEMS, N_USERS, TOP_K = 300, 400, 20
USER_FILES = 3
ROWS_PER_BLOCK = 100  # 401 users: 5 blocks for the 2 actors
SCORE = {"top_k": TOP_K, "batch_size": 32, "concurrency": 2, "cpus_per_actor": 0.5, "min_history": 1}
CONFIG = TwoTowerConfig(
    id_buckets=4096, category_buckets=64, pop_buckets=12, region_buckets=16, device_buckets=8,
    embedding_dim=16, feature_dim=4, item_hidden=(32,), user_hidden=(32,), output_dim=16, history_length=10,
    dropout=0.0, seed=3,
)
TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class World:
    lake: Path
    settings: Settings
    config_file: Path
    model: TwoTowerModel
    index: AnnIndex
    version: str
    users: pa.Table
    popular: PopularList
    buyer_bought: list[str]


# ---------------------------------------------------------------------------------------------------
# building the lake


def items_table(rng: np.random.Generator) -> pa.Table:
    """features/items (spark_etl.schemas.ITEMS): rank 1..N by 7-day popularity."""
    ids = [f"item-{i:04d}" for i in range(N_ITEMS)]
    pop = np.sort(rng.gamma(1.0, 50.0, N_ITEMS))[::-1]
    order = rng.permutation(N_ITEMS)  # which item holds which rank
    ts = datetime(2026, 11, 1, tzinfo=UTC)
    return pa.table({
        "item_id": pa.array([ids[i] for i in order], pa.string()),
        "category": pa.array([f"cat-{i % 7}" for i in order], pa.string()),
        "first_seen": pa.array([ts] * N_ITEMS, TS), "last_seen": pa.array([ts] * N_ITEMS, TS),
        "pop_1d": pa.array(pop / 7), "pop_7d": pa.array(pop), "pop_30d": pa.array(pop * 3),
        "events_30d": pa.array(np.ceil(pop * 2).astype(np.int64)),
        "popularity_rank": pa.array(np.arange(1, N_ITEMS + 1, dtype=np.int32)),
    })


def users_table(rows: list[dict[str, Any]]) -> pa.Table:
    """features/users (spark_etl.schemas.USERS)."""
    ts = datetime(2026, 11, 20, tzinfo=UTC)
    n = len(rows)
    zeros = pa.array(np.zeros(n, dtype=np.int64))
    return pa.table({
        "user_id": pa.array([r["user_id"] for r in rows], pa.string()),
        "last_items": pa.array([r["last_items"] for r in rows], pa.list_(pa.string())),
        "purchased_items": pa.array([r["purchased_items"] for r in rows], pa.list_(pa.string())),
        "n_view": zeros, "n_click": zeros, "n_add_to_cart": zeros, "n_purchase": zeros,
        "first_seen": pa.array([ts] * n, TS), "last_seen": pa.array([ts] * n, TS),
        "device": pa.array([r["device"] for r in rows], pa.string()),
    })


def write_features(lake: Path, region: str, users: pa.Table, items: pa.Table, day: date = DAY) -> None:
    base = lake / "features" / f"region={region}" / f"dt={day.isoformat()}"
    for name in ("users", "items"):
        (base / name).mkdir(parents=True, exist_ok=True)
    step = -(-users.num_rows // USER_FILES)
    for i in range(USER_FILES):
        pq.write_table(users.slice(i * step, step), base / "users" / f"part-{i:05d}.parquet")
    pq.write_table(items, base / "items" / "part-00000.parquet")
    (base / "_run_summary.json").write_text("{}")  # what the ETL leaves beside its tables


def item_vectors(model: TwoTowerModel, items: pa.Table) -> np.ndarray:
    batch = encode_items(items.column("item_id"), items.column("category"), items.column("popularity_rank"),
                         config=model.config)
    with torch.no_grad():
        return model.eval().item_embeddings(as_tensors(batch)).numpy()


def ray_temp_dir() -> Path:
    # Short: Ray's socket paths must fit in 107 bytes (pytest's tmp_path is too deep).
    return Path(tempfile.gettempdir()) / f"sr-score-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = ray_temp_dir()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
             object_store_memory=200 * 1024 * 1024, _temp_dir=str(temp))
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The in-process computations here run beside Ray's actors on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    rng = np.random.default_rng(17)
    lake = tmp_path_factory.mktemp("lake")
    lake_uri = f"file://{lake}"
    model = TwoTowerModel(CONFIG).eval()
    items = items_table(rng)
    ids = items.column("item_id").to_pylist()
    vectors = item_vectors(model, items)
    index = build_index(ids, vectors, kind="exact")

    devices = ["mobile", "desktop", "tablet", None]
    rows = []
    for u in range(N_USERS):
        cold = u % 9 == 0
        history = [] if cold else list(rng.choice(ids, size=int(rng.integers(1, 15))))
        bought = [] if cold or u % 3 else sorted(set(rng.choice(history, size=min(2, len(history)))))
        rows.append({"user_id": f"user-{u:05d}", "last_items": history, "purchased_items": bought,
                     "device": devices[u % 4]})
    # The buyer: a history whose model ranking, without the rule, starts with three items they bought.
    buyer_history = ids[40:46]
    probe = users_table([{"user_id": "buyer", "last_items": buyer_history, "purchased_items": [],
                          "device": "mobile"}])
    top, _ = index.search(user_vectors(model, probe, REGION), TOP_K)
    buyer_bought = list(top[0][:3])
    rows.insert(N_USERS // 2, {"user_id": "user-buyer", "last_items": buyer_history,
                               "purchased_items": buyer_bought, "device": "mobile"})
    users = users_table(rows)
    write_features(lake, REGION, users, items)
    write_features(lake, REGION, users, items, NEXT_DAY)  # the same tables, scored with default blocks
    write_features(lake, UNPROMOTED, users, items)

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    registry = ModelRegistry(lake_uri, REGION)
    published = registry.publish(
        None, user_tower=buf.getvalue(), config=CONFIG.model_dump(mode="json"),
        item_embeddings=embeddings_table(ids, vectors), index=index,
        data_window=(DAY - timedelta(days=13), DAY), metrics={"recall@20": 0.2},
        gate={"passed": True}, code_version="git:test")
    registry.promote(published.version, {"reason": "test"})
    # Published, never promoted: trained with an older id hashing, so it must not be used either.
    old_hashing = CONFIG.model_copy(update={"hash_scheme": "siphash24-utf8:streamrec:ids:v0"})
    ModelRegistry(lake_uri, UNPROMOTED).publish(
        OLD_HASHING, user_tower=buf.getvalue(), config=old_hashing.model_dump(mode="json"),
        item_embeddings=embeddings_table(ids, vectors), index=index,
        data_window=(DAY - timedelta(days=13), DAY), metrics={}, gate={"passed": False}, code_version="git:test")

    document = {
        "environment": "local",
        "regions": {
            name: {**RegionSettings.default_for(name, f"file://{lake}").model_dump(), "lake_uri": lake_uri}
            for name in (REGION, UNPROMOTED)
        },
        "score": SCORE,
        "etl": {"purchased_items_max": 20},
        "train": {"object_store_bytes": 200 * 1024 * 1024},
    }
    config_file = lake / "streamrec.yaml"
    config_file.write_text(yaml.safe_dump(document, sort_keys=False))
    settings = load_settings(config_file)
    popular = read_popular(ModelRegistry(lake_uri, REGION).fs, str(lake / "features" / f"region={REGION}" /
                                                                    f"dt={DAY}" / "items"), TOP_K + 20)
    return World(lake, settings, config_file, model, index, published.version, users, popular, buyer_bought)


def recs_folder(world: World, region: str = REGION, day: date = DAY) -> Path:
    partition = world.lake / "recs" / f"region={region}" / f"dt={day.isoformat()}"
    return partition / f"model_version={world.version}"


def read_recs(folder: Path) -> pa.Table:
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(("_", ".")))
    assert files, f"no data files under {folder}"
    return pa.concat_tables(pq.read_table(f) for f in files).sort_by("user_id")


def file_contents(folder: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(folder.iterdir()) if p.suffix == ".parquet"}


@pytest.fixture(scope="module")
def first_run(world: World, ray_cluster: Any) -> ScoreSummary:
    return score(world.settings, REGION, DAY, rows_per_block=ROWS_PER_BLOCK)


# ---------------------------------------------------------------------------------------------------
# tests


def test_every_user_gets_one_row(world: World, first_run: ScoreSummary) -> None:
    folder = recs_folder(world)
    recs = read_recs(folder)
    users = world.users.num_rows
    assert recs.schema == RECS_SCHEMA
    assert recs.num_rows == users
    assert recs.column("user_id").to_pylist() == sorted(world.users.column("user_id").to_pylist())
    assert set(recs.column("model_version").to_pylist()) == {world.version}
    assert set(recs.column("generated_at").to_pylist()) == {END_OF_DAY}, "default: end of the day"
    cold = sum(1 for h in world.users.column("last_items").to_pylist() if not h)
    assert (first_run.users, first_run.model_scored, first_run.popular_fallback) == (users, users - cold, cold)
    assert first_run.model_version == world.version and first_run.users_per_second > 0
    assert first_run.output == f"file://{folder}"
    assert read_summary(_fs(), str(folder)) == first_run, "the marker is the summary"
    assert sorted(f["path"] for f in first_run.files) == sorted(file_contents(folder))
    assert len(first_run.files) > 1, "several blocks, so several actor tasks and files"
    assert first_run.params["concurrency"] == 2 and first_run.params["cpus_per_actor"] == 0.5
    model_lists = [r for r in recs.to_pylist() if r["source"] == "model"]
    assert all(len(r["item_ids"]) == TOP_K == len(r["scores"]) for r in model_lists)


def _fs() -> Any:
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


def test_results_equal_an_in_process_computation(world: World, first_run: ScoreSummary) -> None:
    expected = recommend_batch(world.users, model=world.model, index=world.index, region=REGION,
                               popular=world.popular, top_k=TOP_K, model_version=world.version,
                               generated_at=END_OF_DAY).sort_by("user_id")
    got = read_recs(recs_folder(world))
    for name in ("user_id", "item_ids", "source", "model_version", "generated_at"):
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    for a, b in zip(got.column("scores").to_pylist(), expected.column("scores").to_pylist()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_purchased_items_never_come_back(world: World, first_run: ScoreSummary) -> None:
    recs = {r["user_id"]: r for r in read_recs(recs_folder(world)).to_pylist()}
    buyer = recs["user-buyer"]
    assert buyer["source"] == "model" and len(buyer["item_ids"]) == TOP_K
    assert not set(world.buyer_bought) & set(buyer["item_ids"]), "they would have ranked 1-3"
    for user in world.users.to_pylist():
        assert not set(user["purchased_items"]) & set(recs[user["user_id"]]["item_ids"])


def test_cold_users_get_exactly_the_popularity_list(world: World, first_run: ScoreSummary) -> None:
    popular = read_popular(_fs(), str(world.lake / "features" / f"region={REGION}" / f"dt={DAY}" / "items"), TOP_K)
    items = pq.read_table(world.lake / "features" / f"region={REGION}" / f"dt={DAY}" / "items")
    by_rank = items.sort_by("popularity_rank").slice(0, TOP_K)
    assert list(popular.item_ids) == by_rank.column("item_id").to_pylist()
    recs = {r["user_id"]: r for r in read_recs(recs_folder(world)).to_pylist()}
    cold = [u["user_id"] for u in world.users.to_pylist() if not u["last_items"]]
    assert cold
    for user_id in cold:
        row = recs[user_id]
        assert row["source"] == "popular"
        assert row["item_ids"] == list(popular.item_ids)
        np.testing.assert_allclose(row["scores"], by_rank.column("pop_7d").to_pylist(), rtol=1e-6)
    assert {r["source"] for uid, r in recs.items() if uid not in set(cold)} == {"model"}


def test_clear_errors_before_any_work(world: World) -> None:
    with pytest.raises(NoPromotedModelError, match=f"no model version is promoted in region {UNPROMOTED}"):
        score(world.settings, UNPROMOTED, DAY)
    with pytest.raises(MissingInputError, match=rf"no users table .* `streamrec etl run --region {REGION} "
                                                rf"--date 2026-11-24` first"):
        score(world.settings, REGION, DAY - timedelta(days=1))
    with pytest.raises(ScoreError, match=f"'{OLD_HASHING}' was trained with id hashing"):
        score(world.settings, UNPROMOTED, DAY, version=OLD_HASHING)
    assert not (world.lake / "recs" / f"region={UNPROMOTED}").exists()


def cli(world: World, *args: str) -> Any:
    app = typer.Typer()  # registered the way streamrec.cli registers it: `streamrec score run`
    app.add_typer(score_cli.app, name="score")
    return CliRunner().invoke(app, ["score", "run", *args, "--config", str(world.config_file)])


def test_cli_errors_are_one_line(world: World) -> None:
    for args, expected in [
        (["--region", UNPROMOTED, "--date", DAY.isoformat()], "no model version is promoted in region eu-central-1"),
        (["--region", REGION, "--date", "2026-11-01"], "run `streamrec etl run --region eu-west-1 --date 2026-11-01` first"),
        (["--region", "us-west-2", "--date", DAY.isoformat()], "--region us-west-2: not configured"),
        (["--region", REGION, "--date", "25/11/2026"], "expected a date as YYYY-MM-DD"),
        (["--region", REGION, "--date", DAY.isoformat(), "--version", "v-missing"], "'v-missing' is not published"),
        (["--region", REGION, "--date", DAY.isoformat(), "--generated-at", "2026-11-26T00:00"], "with a time zone"),
    ]:
        result = cli(world, *args)
        assert isinstance(result.exception, UserError), (args, result.output)
        assert expected in str(result.exception) and "\n" not in str(result.exception)


def test_cli_rerun_replaces_the_folder_with_the_same_files(world: World, first_run: ScoreSummary) -> None:
    """The CLI with the version and generated_at spelled out is the same run again: the same rows under
    the same deterministic file names, and nothing a crashed run could have left behind. (Which rows
    land in which part file follows Ray Data's block split, which may differ between runs.)"""
    folder = recs_folder(world)
    before = file_contents(folder)
    (folder / "part-99999-0.parquet").write_bytes(b"stale")  # a stray data file in the target
    staging = folder.parent / f"_staging.{folder.name}"  # a crashed run's half-written staging folder
    staging.mkdir()
    (staging / "part-00000-0.parquet").write_bytes(b"half")
    result = cli(world, "--region", REGION, "--date", DAY.isoformat(), "--version", world.version,
                 "--generated-at", "2026-11-26T00:00:00+00:00", "--rows-per-block", str(ROWS_PER_BLOCK))
    assert result.exit_code == 0, result.output
    users, cold = first_run.users, first_run.popular_fallback
    assert f"model {world.version}" in result.output
    assert f"users {users:,} (model {users - cold:,}, popular {cold:,})" in result.output
    assert "users/s" in result.output and f"file://{folder}" in result.output

    after = file_contents(folder)
    assert list(after) == list(before), "the same deterministic file names, nothing stale"

    def rows(tables: dict[str, pa.Table]) -> pa.Table:
        return pa.concat_tables(tables.values()).sort_by("user_id")

    assert rows(after).equals(rows(before))
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "no staging or set-aside folder"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*before, SUMMARY_FILE])
    again = read_summary(_fs(), str(folder))
    assert again is not None and again != first_run, "a new marker"
    assert (again.users, again.model_scored, again.files) == (first_run.users, first_run.model_scored,
                                                            first_run.files)


def test_default_blocks_feed_every_actor_and_change_no_row(world: World, first_run: ScoreSummary) -> None:
    """Without rows_per_block the users table is cut into equal blocks of at most score.batch_size rows,
    a multiple of the actor count (401 users, batches of 32, 2 actors: 14 blocks of 29, so 14 actor tasks
    and files), not left in Ray Data's read blocks (which keep a one-file table in one block: one busy
    actor); the rows are the same as with any cut."""
    summary = score(world.settings, REGION, NEXT_DAY)
    assert summary.params["rows_per_block"] == 29
    assert sorted(f["rows"] for f in summary.files) == [24] + [29] * 13
    got = read_recs(recs_folder(world, day=NEXT_DAY))
    before = read_recs(recs_folder(world))
    assert set(got.column("generated_at").to_pylist()) == {END_OF_DAY + timedelta(days=1)}
    for name in ("user_id", "item_ids", "source", "model_version"):
        assert got.column(name).equals(before.column(name)), name
    for a, b in zip(got.column("scores").to_pylist(), before.column("scores").to_pylist()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
