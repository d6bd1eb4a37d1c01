"""Daily training (ray_apps/train.py) on real ETL output, with a real local Ray cluster.

One lake is built per module, through the real pipeline: a generated clickstream with planted
structure (300 users, 400 items, 15k events over 4 days) landed with ``ingest.offline.land``, cleaned
and featurized by the Spark jobs (``spark_etl.runner.run``), giving features for two cutoff days. Ray
starts once for the module (2 workers x 0.5 CPU, as on a 2-core box) and is shut down at its end.

Runs, in the order the fixtures build them:

- ``day1``: ``run()`` on the first day: nothing promoted yet, so a cold start; it trains, evaluates,
  publishes and promotes;
- ``day2``: ``run()`` on the next day: warm-starts from day 1's promoted model and is gated against it;
- a run that crashes in epoch 1 (an injected worker failure, no retries), then rerun under the same
  name: it resumes after epoch 0's checkpoint and must end with day 1's weights;
- a deliberately bad model (learning rate ~0, no warm start) that the gate must refuse.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from ingest.offline import land
from ray_apps.registry import ModelRegistry, embeddings_matrix
from ray_apps.train import (
    ARCHITECTURE_FIELDS,
    InjectedFailure,
    TrainError,
    TrainOutcome,
    TrainResult,
    model_config_for,
    run,
    state_from_bytes,
    train,
)
from spark_etl import runner
from streamrec.clickstream.config import GeneratorConfig
from streamrec.clickstream.generate import generate_region
from streamrec.clickstream.truth import build_truth
from streamrec.settings import EtlSettings, Settings, load_settings

pytestmark = pytest.mark.integration

REGION = "us-east-1"
EVENT_DAYS = (date(2024, 5, 1), date(2024, 5, 4))
DAY1, DAY2 = date(2024, 5, 3), date(2024, 5, 4)
GENERATOR: dict[str, Any] = dict(
    seed=7, regions=(REGION,), users_per_region=300, items=400, events_per_region=15_000, days=4,
    end=datetime(2024, 5, 5, tzinfo=UTC), bot_share=0.0, malformed_share=0.0, duplicate_share=0.0,
)
ETL: dict[str, Any] = {"train_days": 3, "history_length": 10, "popular_top_k": 25}
# A small model: 400 items in 2,048 id rows, 32-d towers. Two epochs learn the planted topics.
MODEL: dict[str, Any] = {"id_buckets": 2048, "category_buckets": 64, "embedding_dim": 32, "feature_dim": 8,
                         "item_hidden": [64], "user_hidden": [64], "output_dim": 32}
TRAIN: dict[str, Any] = {"workers": 2, "cpus_per_worker": 0.5, "use_gpu": "no", "epochs": 2,
                         "batch_size": 256, "learning_rate": 0.01, "model": MODEL}
GATE: dict[str, Any] = {"metric": "recall@20", "max_eval_users": 100}
# Float tolerance of "the same weights": resumed and uninterrupted runs do the same float operations.
ATOL = 1e-6


@dataclass(frozen=True)
class Lake:
    root: Path
    config: Path  # settings YAML
    settings: Settings

    def with_settings(self, tmp_path: Path, **sections: Any) -> Settings:
        """Settings of this lake with some sections replaced, loaded from a YAML file like a process."""
        document = yaml.safe_load(self.config.read_text())
        document.update(sections)
        path = tmp_path / f"streamrec-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return load_settings(path)


def write_config(path: Path, lake_uri: str, **sections: Any) -> Path:
    document = {
        "environment": "local",
        "regions": {REGION: {"stream_name": "clicks", "lake_uri": lake_uri,
                             "tables": {"leases": "leases", "recs": "recs", "features": "features"}}},
        "etl": ETL, "train": TRAIN, "gate": GATE, **sections,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, spark: Any) -> Lake:
    root = tmp_path_factory.mktemp("train") / "lake"
    uri = f"file://{root}"
    config = GeneratorConfig(**GENERATOR)
    truth = build_truth(config)
    land([(r.data, r.partition_key) for r in generate_region(config, REGION, truth)], uri, REGION,
         now=config.window[1])
    etl = EtlSettings(**ETL)
    for summary in runner.run(spark, uri, REGION, "clean", *EVENT_DAYS, etl):
        assert summary.outputs["clean"] > 0
    for summary in runner.run(spark, uri, REGION, "features", DAY1, DAY2, etl):
        assert summary.outputs["examples_train"] > 0 and summary.outputs["examples_eval"] > 0
    path = write_config(root.parent / "streamrec.yaml", uri)
    return Lake(root, path, load_settings(path))


@pytest.fixture(scope="module")
def ray_cluster(lake: Lake) -> Iterator[Any]:
    """One local Ray for the module (its own short temp dir), shut down at the end."""
    import ray

    from ray_apps.runtime import ensure_ray, local_ray_options

    if ray.is_initialized():
        ray.shutdown()
    options = local_ray_options(lake.settings)
    temp_dir = tempfile.mkdtemp(prefix="srtrain-", dir="/tmp")  # short: Ray's socket paths are limited
    options["_temp_dir"] = temp_dir
    ray.init(**options)
    try:
        assert ensure_ray(lake.settings) is ray  # the module's session is the one training uses
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def registry(lake: Lake) -> ModelRegistry:
    return ModelRegistry.from_settings(lake.settings, REGION)


@pytest.fixture(scope="module")
def day1(lake: Lake, ray_cluster: Any, registry: ModelRegistry) -> TrainOutcome:
    assert registry.promoted() is None
    return run(lake.settings, REGION, DAY1)


@pytest.fixture(scope="module")
def day2(lake: Lake, day1: TrainOutcome) -> TrainOutcome:
    return run(lake.settings, REGION, DAY2)


def features(lake: Lake, day: date, *parts: str) -> Path:
    return lake.root.joinpath("features", f"region={REGION}", f"dt={day.isoformat()}", *parts)


def examples(lake: Lake, day: date, split: str) -> Any:
    return pads.dataset(str(features(lake, day, "examples", f"split={split}")), format="parquet").to_table()


def assert_same_weights(a: TrainResult, b: TrainResult) -> None:
    sa, sb = state_from_bytes(a.state_bytes), state_from_bytes(b.state_bytes)
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= ATOL, f"weights differ by up to {worst}"
    np.testing.assert_allclose(a.losses, b.losses, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------
# day 1: a cold start


def test_training_reads_the_etl_output_and_the_loss_decreases(lake: Lake, day1: TrainOutcome) -> None:
    result = day1.train
    train_rows = examples(lake, DAY1, "train").num_rows
    assert result.stats.rows == train_rows
    assert sum(result.stats.counts) == train_rows  # log-Q counts cover every example
    assert result.data_window == (date(2024, 5, 1), date(2024, 5, 2))
    assert len(result.losses) == TRAIN["epochs"] and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0] * 0.95, result.losses
    # Each epoch saw every example once (the workers' equal split truncates at most one row per worker).
    for epoch in result.epochs:
        assert train_rows - TRAIN["workers"] < epoch["rows"] <= train_rows
    assert result.samples_per_second > 0
    assert (result.epochs_trained, result.resumed_from_epoch, result.warm_start_from) == (2, None, None)
    assert not result.use_gpu and result.workers == 2
    checkpoint = Path(result.checkpoint_path)
    assert checkpoint.is_relative_to(lake.root / "models" / f"region={REGION}" / "_checkpoints" /
                                     f"train-{REGION}-{DAY1.isoformat()}")
    assert (checkpoint / "state.pt").is_file()


def test_model_beats_popularity_on_the_planted_data(day1: TrainOutcome) -> None:
    report = day1.report
    assert report.users >= 100 and report.items > 300
    assert report.model["recall@20"] > report.popular["recall@20"] * 1.1, (report.model, report.popular)
    assert report.model["ndcg@20"] > report.popular["ndcg@20"]
    assert day1.promoted_report is None and day1.previous_version is None


def test_run_publishes_a_complete_version_and_promotes_it(lake: Lake, day1: TrainOutcome,
                                                          registry: ModelRegistry) -> None:
    assert day1.decision.promote and day1.promoted
    version = registry.get(day1.version)
    assert version.data_window == (date(2024, 5, 1), DAY1)
    assert version.metrics == json.loads(json.dumps(day1.metrics))
    assert version.metrics["model"]["recall@20"] == day1.report.model["recall@20"]
    assert version.metrics["training"]["losses"] == day1.train.losses
    assert version.gate == json.loads(json.dumps(day1.decision.to_json()))
    assert version.gate["promote"] is True
    pointer = registry.promotion()
    assert pointer is not None and pointer.version == day1.version and pointer.previous is None
    # The artefacts load back: the config, the full two-tower weights, embeddings aligned with the index.
    assert registry.load_config(version) == json.loads(day1.train.config.to_json())
    stored = state_from_bytes(registry.load_user_tower(version))
    assert "item_id_embedding.weight" in stored and any(k.startswith("user_tower.") for k in stored)
    ids, vectors = embeddings_matrix(registry.load_item_embeddings(version))
    items = pads.dataset(str(features(lake, DAY1, "items")), format="parquet").to_table()
    assert sorted(ids.tolist()) == sorted(items.column("item_id").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    index = registry.load_index(version)
    assert len(index) == len(ids) and index.kind == "exact"
    # What scoring loads (ray_apps.score) is this same model.
    from ray_apps.score import load_scoring_model

    model, _ = load_scoring_model(registry, version, device="cpu")
    reference = day1.train.model()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


# ---------------------------------------------------------------------------------------------------
# checkpoints: a run that crashed is resumed by a rerun under the same name


def test_rerun_after_a_crash_resumes_from_the_checkpoint_and_matches_an_uninterrupted_run(
        lake: Lake, day1: TrainOutcome) -> None:
    name = f"resume-{uuid.uuid4().hex[:6]}"
    # Epoch 1 dies after its training, before its checkpoint; no retries: the call fails.
    with pytest.raises(TrainError, match="injected failure after epoch 1"):
        train(lake.settings, REGION, DAY1, run_name=name, warm_start=None, max_failures=0,
              inject_failure=InjectedFailure(epoch=1))
    run_dir = lake.root / "models" / f"region={REGION}" / "_checkpoints" / name
    assert sorted(p.name.split("-epoch-")[1] for p in run_dir.glob("*-epoch-*")) == ["00000"]

    # The same run name again: Ray Train restores the run, the workers get epoch 0's checkpoint and
    # train epoch 1 only, with the same data order and dropout draws as the uninterrupted day-1 run.
    resumed = train(lake.settings, REGION, DAY1, run_name=name, warm_start=None)
    assert (resumed.resumed_from_epoch, resumed.epochs_trained) == (0, 1)
    assert resumed.run_name == name and Path(resumed.checkpoint_path).parent == run_dir
    assert_same_weights(resumed, day1.train)


# ---------------------------------------------------------------------------------------------------
# day 2: warm start and the gate against the promoted model


def test_second_day_warm_starts_from_the_promoted_model(day1: TrainOutcome, day2: TrainOutcome,
                                                        registry: ModelRegistry) -> None:
    assert day2.train.warm_start_from == day1.version
    assert day2.previous_version == day1.version
    # Starting from a trained model, the first epoch's loss is far below a cold start's.
    assert day2.train.losses[0] < day1.train.losses[0] * 0.95, (day1.train.losses, day2.train.losses)
    assert day2.promoted_report is not None
    assert day2.decision.promoted == pytest.approx(day2.promoted_report.model["recall@20"])
    assert day2.metrics["promoted"]["version"] == day1.version
    assert day2.decision.promote and day2.promoted
    pointer = registry.promotion()
    assert pointer is not None and (pointer.version, pointer.previous) == (day2.version, day1.version)
    assert registry.get(day2.version).data_window == (date(2024, 5, 1), DAY2)


def test_gate_refuses_a_bad_model_and_keeps_the_promoted_one(lake: Lake, day2: TrainOutcome,
                                                             registry: ModelRegistry, tmp_path: Path) -> None:
    # A learning rate of ~0 (the settings require > 0) and no warm start: the untrained initialisation.
    bad = lake.with_settings(tmp_path, train={**TRAIN, "epochs": 1, "learning_rate": 1e-9,
                                              "warm_start": False})
    before = registry.promotion()
    outcome = run(bad, REGION, DAY2, run_name=f"bad-{uuid.uuid4().hex[:6]}")
    assert outcome.train.warm_start_from is None
    assert not outcome.decision.promote and not outcome.promoted
    assert outcome.decision.reason.startswith("not promoted")
    assert outcome.decision.candidate < outcome.decision.popular
    assert outcome.previous_version == day2.version
    assert registry.promotion() == before  # the pointer did not move
    refused = registry.get(outcome.version)  # published, for the record, with the refusal in its manifest
    assert refused.gate["promote"] is False


# ---------------------------------------------------------------------------------------------------
# configuration and the command line


def test_warm_start_requires_the_same_architecture(lake: Lake, tmp_path: Path) -> None:
    config = model_config_for(lake.settings)
    assert config.history_length == ETL["history_length"] and config.id_buckets == MODEL["id_buckets"]
    other = lake.with_settings(tmp_path, train={**TRAIN, "model": {**MODEL, "output_dim": 16}})
    from ray_apps.train import architecture_mismatch

    assert architecture_mismatch(config, model_config_for(other)) == ["output_dim: 32 != 16"]
    assert "temperature" not in ARCHITECTURE_FIELDS and "hash_scheme" in ARCHITECTURE_FIELDS


def test_cli_reports_missing_features_in_one_line(lake: Lake) -> None:
    from streamrec.cli import train as train_cli
    from streamrec.cli.common import UserError

    root = typer.Typer()  # registered as the streamrec app registers it: `streamrec train run ...`
    root.add_typer(train_cli.app, name="train")
    result = CliRunner().invoke(root, ["train", "run", "--region", REGION, "--date", "2024-06-01",
                                       "--config", str(lake.config)])
    assert isinstance(result.exception, UserError), result.output  # main() prints it in one line, exit 2
    message = str(result.exception)
    assert "\n" not in message
    assert "dt=2024-06-01" in message and "streamrec etl run" in message


def test_cli_summary_shows_losses_metrics_gate_and_version(day2: TrainOutcome) -> None:
    from streamrec.cli import train as train_cli

    with train_cli.console.capture() as captured:
        train_cli._print_summary(day2, REGION, DAY2, "recall@20")
    text = captured.get()
    assert " → ".join(f"{x:.4f}" for x in day2.train.losses) in text
    for metrics in (day2.report.model, day2.report.popular, day2.promoted_report.model):
        assert f"{metrics['recall@20']:.4f}" in text
    assert "promoted" in text and day2.version in text and day2.decision.reason in text
