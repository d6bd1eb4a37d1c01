"""The pipeline definition (operators/pipeline.py) and the in-process executor's rules
(operators/local.py) with stage bodies replaced by small functions: these tests are about ordering,
resuming, retries and overrides; the real stage bodies are exercised by the e2e demo test."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from operators.local import PipelineFailed, run_pipeline, settings_for_run
from operators.pipeline import (
    STAGES, RunSpec, SpecError, StageResult, child_name, daily_run_name, settings_overrides, stage_result_path,
)
from operators.stages import StageError, StageRefused, read_result
from streamrec.lake import LakeLayout
from streamrec.settings import RegionSettings, Settings

pytestmark = pytest.mark.unit

DAY = date(2026, 11, 25)


@pytest.mark.parametrize(("manifest", "expected"), [
    ({"region": "us-east-1", "date": "2026-11-25"}, RunSpec("us-east-1", DAY)),
    ({"region": "us-east-1", "date": "2026-11-20", "endDate": "2026-11-25"},
     RunSpec("us-east-1", DAY, date(2026, 11, 20))),
    # Stages run in pipeline order whatever order they are listed in, once each.
    ({"region": "eu-west-1", "date": "2026-11-25", "stages": ["sync", "etl", "sync"]},
     RunSpec("eu-west-1", DAY, stages=("etl", "sync"))),
    ({"region": "eu-west-1", "date": "2026-11-25", "overrides": {"train": {"epochs": 1}}},
     RunSpec("eu-west-1", DAY, overrides={"train": {"epochs": 1}})),
])
def test_spec_from_manifest(manifest: dict[str, Any], expected: RunSpec) -> None:
    spec = RunSpec.from_manifest(manifest)
    assert spec == expected
    assert RunSpec.from_manifest(spec.to_manifest()) == spec


@pytest.mark.parametrize(("manifest", "message"), [
    ({"date": "2026-11-25"}, "spec.region: required"),
    ({"region": "mars-1", "date": "2026-11-25"}, "spec.region: 'mars-1' is not an AWS region"),
    ({"region": "us-east-1"}, "spec.date: required"),
    ({"region": "us-east-1", "date": "25/11/2026"}, "spec.date: '25/11/2026' is not a date"),
    ({"region": "us-east-1", "date": "2026-11-25", "endDate": "2026-11-20"}, "spec.endDate: 2026-11-20 is before"),
    ({"region": "us-east-1", "date": "2024-01-01", "endDate": "2026-11-20"}, "at most 366 days"),
    ({"region": "us-east-1", "date": "2026-11-25", "stages": ["etl", "deploy"]}, "unknown stage\\(s\\) deploy"),
    ({"region": "us-east-1", "date": "2026-11-25", "stages": "etl"}, "expected a list"),
    ({"region": "us-east-1", "date": "2026-11-25", "overrides": {"serve": {"port": 1}}}, "cannot override serve"),
])
def test_bad_spec_names_the_field(manifest: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        RunSpec.from_manifest(manifest)


def test_run_identity_and_days() -> None:
    daily = RunSpec("us-east-1", DAY)
    assert daily.run_id == daily_run_name("us-east-1", DAY) == "us-east-1-2026-11-25"
    assert daily.etl_days == [DAY]
    backfill = RunSpec("us-east-1", DAY, date(2026, 11, 23))
    assert backfill.run_id == "us-east-1-2026-11-25-from-2026-11-23"
    assert backfill.etl_days == [date(2026, 11, 23), date(2026, 11, 24), DAY]
    path = stage_result_path(LakeLayout("s3://lake"), daily, "train")
    assert path == "lake/runs/region=us-east-1/dt=2026-11-25/us-east-1-2026-11-25/train.json"


def test_child_names_are_deterministic_dns_labels() -> None:
    assert child_name("us-east-1-2026-11-25", "train", 1) == "us-east-1-2026-11-25-train-1"
    assert child_name("us-east-1-2026-11-25", "etl", 2, "clean") == "us-east-1-2026-11-25-etl-clean-2"
    long_run = "us-east-1-2026-11-25-from-2026-10-01-" + "x" * 40
    a, b = child_name(long_run, "score", 3), child_name(long_run + "y", "score", 3)
    assert len(a) <= 63 and len(b) <= 63 and a != b
    assert a.endswith("-score-3") and a == child_name(long_run, "score", 3)


def test_overrides_replace_only_the_named_keys() -> None:
    base = {"train": {"epochs": 3, "seed": 0}, "gate": {"metric": "recall@20"}}
    out = settings_overrides(base, {"train": {"epochs": 5}, "sync": {"prewarm_users": 0}})
    assert out == {"train": {"epochs": 5, "seed": 0}, "gate": {"metric": "recall@20"},
                   "sync": {"prewarm_users": 0}}
    assert base["train"]["epochs"] == 3  # the input is not changed


def _settings(tmp_path: Path, **sections: Any) -> Settings:
    region = RegionSettings.default_for("us-east-1", f"file://{tmp_path / 'lake'}")
    return Settings.model_validate({"regions": {"us-east-1": region.model_dump()}, **sections})


def test_settings_for_run_validates_overrides(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    tuned = settings_for_run(settings, RunSpec("us-east-1", DAY, overrides={"train": {"epochs": 7}}))
    assert tuned.train.epochs == 7 and tuned.train.seed == settings.train.seed
    with pytest.raises(SpecError, match=r"spec.overrides: train.epochs: Input should be greater than or equal to 1"):
        settings_for_run(settings, RunSpec("us-east-1", DAY, overrides={"train": {"epochs": 0}}))
    with pytest.raises(SpecError, match=r"train.epoch"):
        settings_for_run(settings, RunSpec("us-east-1", DAY, overrides={"train": {"epoch": 2}}))


class Recorder:
    """Stage bodies that record their calls; ``fail`` maps a stage to errors raised on its first calls."""

    def __init__(self, fail: Mapping[str, list[Exception]] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = {k: list(v) for k, v in (fail or {}).items()}
        self.seen: dict[str, dict[str, StageResult]] = {}

    def functions(self) -> dict[str, Any]:
        def make(stage: str) -> Any:
            def fn(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> StageResult:
                self.calls.append(stage)
                self.seen[stage] = dict(done)
                if self.fail.get(stage):
                    raise self.fail[stage].pop(0)
                return StageResult(stage, {"n": len(self.calls)}, f"{stage} ok")
            return fn
        return {stage: make(stage) for stage in STAGES}


def test_stages_run_in_order_and_see_earlier_results(tmp_path: Path) -> None:
    settings, rec = _settings(tmp_path), Recorder()
    run = run_pipeline(settings, RunSpec("us-east-1", DAY), functions=rec.functions(), record=None, say=lambda m: None)
    assert rec.calls == list(STAGES)
    assert [s.state for s in run.stages] == ["Succeeded"] * 5
    assert set(rec.seen["promote"]) == {"etl", "train", "score", "sync"}
    assert read_result(settings, RunSpec("us-east-1", DAY), "score") == StageResult("score", {"n": 3}, "score ok")


def test_a_rerun_resumes_after_the_last_finished_stage(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    spec = RunSpec("us-east-1", DAY)
    crashing = Recorder({"score": [StageRefused("users table missing")]})
    with pytest.raises(PipelineFailed, match="stage score failed after 1 attempt"):
        run_pipeline(settings, spec, functions=crashing.functions(), record=None, say=lambda m: None)
    assert crashing.calls == ["etl", "train", "score"]  # refused: no retry

    again = Recorder()
    run = run_pipeline(settings, spec, functions=again.functions(), record=None, say=lambda m: None)
    assert again.calls == ["score", "sync", "promote"]
    assert [s.state for s in run.stages] == ["Reused", "Reused", "Succeeded", "Succeeded", "Succeeded"]
    assert again.seen["score"]["train"].outputs == {"n": 2}  # the first run's train result

    finished = Recorder()
    run_pipeline(settings, spec, functions=finished.functions(), record=None, say=lambda m: None)
    assert finished.calls == []  # a finished run is a no-op
    forced = Recorder()
    run_pipeline(settings, spec, force=True, functions=forced.functions(), record=None, say=lambda m: None)
    assert forced.calls == list(STAGES)


def test_retryable_failures_are_retried_then_fail_the_run(tmp_path: Path) -> None:
    settings = _settings(tmp_path, pipeline={"max_attempts": 3})
    spec = RunSpec("us-east-1", DAY, stages=("etl", "train"))
    flaky = Recorder({"train": [StageError("worker lost")]})
    lines: list[str] = []
    run = run_pipeline(settings, spec, retry_delay_s=0, functions=flaky.functions(), record=None, say=lines.append)
    assert flaky.calls == ["etl", "train", "train"]
    assert run.stages[-1].attempts == 2
    assert any("attempt 1 failed (worker lost)" in line for line in lines)

    broken = Recorder({"train": [StageError("out of memory")] * 3})
    with pytest.raises(PipelineFailed, match="stage train failed after 3 attempt\\(s\\): out of memory"):
        run_pipeline(settings, RunSpec("us-east-1", date(2026, 11, 24), stages=("train",)), retry_delay_s=0,
                     functions=broken.functions(), record=None, say=lambda m: None)
    assert broken.calls == ["train"] * 3


def test_a_later_stage_alone_reads_earlier_results(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    spec = RunSpec("us-east-1", DAY)
    run_pipeline(settings, RunSpec("us-east-1", DAY, stages=("etl", "train")), functions=Recorder().functions(),
                 record=None, say=lambda m: None)
    only = Recorder()
    run_pipeline(settings, RunSpec("us-east-1", DAY, stages=("score",)), functions=only.functions(),
                 record=None, say=lambda m: None)
    assert only.calls == ["score"] and set(only.seen["score"]) == {"etl", "train"}
    assert read_result(settings, spec, "sync") is None


def test_the_run_is_recorded_with_its_final_phase(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    recorded: list[tuple[str, str, list[str]]] = []

    def record(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult], phase: str, *_: Any) -> None:
        recorded.append((spec.run_id, phase, sorted(done)))

    run_pipeline(settings, RunSpec("us-east-1", DAY, stages=("etl", "train")), functions=Recorder().functions(),
                 record=record, say=lambda m: None)
    failing = Recorder({"score": [StageRefused("no users")]})
    with pytest.raises(PipelineFailed):
        run_pipeline(settings, RunSpec("us-east-1", DAY), functions=failing.functions(), record=record,
                     say=lambda m: None)
    assert recorded == [("us-east-1-2026-11-25", "Succeeded", ["etl", "train"]),
                        ("us-east-1-2026-11-25", "Failed", ["etl", "train"])]


def test_a_backfills_warehouse_loads_report_every_days_rows() -> None:
    from operators.stages import synced_counts, warehouse_outputs
    from operators.warehouse.load import TableLoad, WarehouseReport

    def report(dt: str, **rows: int) -> WarehouseReport:
        tables = tuple(TableLoad(table, 1, n, n, n, n, 0) for table, n in rows.items())
        return WarehouseReport("us-east-1", dt, "run-1", "v1", "postgres", tables, 0.5)

    earlier = [report("2026-11-23", clickstream_fact=100), report("2026-11-24", clickstream_fact=120)]
    last = report("2026-11-25", clickstream_fact=90, item_dim=10, user_dim=8, daily_recs=800)
    outputs = warehouse_outputs([*earlier, last])
    assert outputs["rows"] == {"clickstream_fact": 310, "item_dim": 10, "user_dim": 8, "daily_recs": 800}
    assert outputs["days"] == ["2026-11-23", "2026-11-24", "2026-11-25"] and outputs["dt"] == "2026-11-25"
    counts = synced_counts({"sync": StageResult("sync", {"warehouse": outputs}, "ok")})
    assert counts["warehouse_clickstream_fact"] == 310
