"""The pipeline's stage functions: what each stage does, in-process.

``streamrec pipeline run`` calls all of them in one process (:mod:`operators.local`). Under the
controller, the ETL runs as an EMR on EKS job run or a SparkApplication (whose result is then read
back with :func:`etl_result`), training and scoring run these same functions inside KubeRay RayJobs
(``streamrec pipeline stage``), and sync and promote run in the controller process.

A stage's outputs are what later stages need (the model version, the gate decision, counts); the
executors persist them as the stage's result file (:func:`operators.pipeline.stage_result_path`).
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from operators.pipeline import RunSpec, StageResult, stage_refusal_path, stage_result_path
from streamrec.lake import LakeLayout, filesystem
from streamrec.settings import Settings

if TYPE_CHECKING:  # the warehouse (psycopg, boto3) is imported by the sync stage when it runs
    from operators.warehouse.load import WarehouseReport

logger = logging.getLogger(__name__)

StageFn = Callable[[Settings, RunSpec, Mapping[str, StageResult]], StageResult]


class StageError(RuntimeError):
    """A stage failed in a way a retry may fix (the executor retries it, then fails the run)."""


class StageRefused(StageError):
    """A stage cannot run with what it was given (missing input, bad override): retrying will not help."""


# --------------------------------------------------------------------------- result files


def _lake(settings: Settings, region: str) -> tuple[LakeLayout, Any]:
    uri = settings.region(region).lake_uri
    return LakeLayout(uri), filesystem(uri, endpoint_url=settings.aws.endpoint_url, region=region)


def _read_run_file(settings: Settings, spec: RunSpec, path: Callable[[LakeLayout], str]) -> bytes | None:
    """A file of the run's folder in the lake (``path`` of the region's layout), or None when absent."""
    layout, fs = _lake(settings, spec.region)
    try:
        with fs.open_input_stream(path(layout)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_run_file(settings: Settings, spec: RunSpec, path: Callable[[LakeLayout], str], data: bytes) -> str:
    """Write a file of the run's folder atomically (readers see all of it or nothing); its URI."""
    from ray_apps.ann import write_bytes_atomic

    layout, fs = _lake(settings, spec.region)
    target = path(layout)
    write_bytes_atomic(fs, target, data)
    return layout.to_uri(target)


def read_result(settings: Settings, spec: RunSpec, stage: str) -> StageResult | None:
    """The stage's result file for this run, or None when the stage has not finished."""
    raw = _read_run_file(settings, spec, lambda layout: stage_result_path(layout, spec, stage))
    return None if raw is None else StageResult.from_json(raw)


def write_result(settings: Settings, spec: RunSpec, result: StageResult) -> str:
    """Persist a finished stage's result (atomically: readers see all of it or nothing)."""
    return _write_run_file(settings, spec, lambda layout: stage_result_path(layout, spec, result.stage),
                           result.to_json())


def write_refusal(settings: Settings, spec: RunSpec, child_key: str, message: str) -> str:
    """Record that the attempt ``child_key`` refused its input (see :func:`stage_refusal_path`)."""
    return _write_run_file(settings, spec, lambda layout: stage_refusal_path(layout, spec, child_key),
                           json.dumps({"message": message}).encode())


def read_refusal(settings: Settings, spec: RunSpec, child_key: str) -> str | None:
    """The refusal message the attempt ``child_key`` recorded, or None when it recorded none."""
    raw = _read_run_file(settings, spec, lambda layout: stage_refusal_path(layout, spec, child_key))
    return None if raw is None else str(json.loads(raw)["message"])


# --------------------------------------------------------------------------- etl


def etl_result(settings: Settings, spec: RunSpec) -> StageResult:
    """The ETL stage's outputs, read from the jobs' run summaries in the lake (the same whether Spark
    ran in-process, on EMR on EKS, or under the Spark operator). Raises StageError if a job's summary
    is missing or says it failed."""
    from spark_etl.summary import SUMMARY_NAME

    layout, fs = _lake(settings, spec.region)
    clean_rows, removed = 0, {}
    parts: list[tuple[str, Any]] = [("clean", d) for d in spec.etl_days]
    parts += [("features", spec.day), ("keys", spec.day)]
    outputs: dict[str, Any] = {}
    for job, day in parts:
        path = posixpath.join(layout.partition(job, spec.region, day), SUMMARY_NAME)
        try:
            with fs.open_input_stream(path) as f:
                summary = json.loads(f.read())
        except FileNotFoundError:
            raise StageError(f"ETL job {job} for {day} left no run summary ({layout.to_uri(path)})") from None
        if summary.get("status") != "succeeded":
            raise StageError(f"ETL job {job} for {day} did not succeed: {summary.get('error')}")
        if job == "clean":
            clean_rows += int(summary["outputs"].get("clean", 0))
            for reason, n in summary.get("removed", {}).items():
                if reason != "other_day":
                    removed[reason] = removed.get(reason, 0) + int(n)
        else:
            outputs[job] = {k: int(v) for k, v in summary["outputs"].items()}
    outputs["clean_rows"], outputs["removed"], outputs["days"] = clean_rows, removed, len(spec.etl_days)
    return StageResult("etl", outputs, f"cleaned {len(spec.etl_days)} day(s): {clean_rows:,} rows; "
                       f"features and keys for {spec.day}")


def run_etl(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> StageResult:
    """clean every ETL day, then features and keys for the run's day, with Spark in this process."""
    from pyspark.sql import SparkSession

    from spark_etl import runner
    from spark_etl.jobs.common import MissingInputError
    from spark_etl.session import local_session
    from spark_etl.summary import DataQualityError

    shared = SparkSession.getActiveSession() is not None  # a test suite's session stays up
    spark = local_session(settings.spark)
    lake_uri = settings.region(spec.region).lake_uri
    days = spec.etl_days
    try:
        list(runner.run(spark, lake_uri, spec.region, "clean", days[0], days[-1], settings.etl))
        list(runner.run(spark, lake_uri, spec.region, "features", spec.day, None, settings.etl))
        list(runner.run(spark, lake_uri, spec.region, "keys", spec.day, None, settings.etl))
    except MissingInputError as exc:
        raise StageRefused(str(exc)) from None
    except DataQualityError as exc:
        raise StageError(str(exc)) from None
    finally:
        if not shared:
            spark.stop()
    return etl_result(settings, spec)


# --------------------------------------------------------------------------- train


def run_train(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> StageResult:
    """Train, evaluate, gate and publish a version; promotion waits for the promote stage."""
    from ray_apps.registry import RegistryError
    from ray_apps.train import FeaturesMissingError, TrainError
    from ray_apps.train import run as train

    try:
        outcome = train(settings, spec.region, spec.day, run_name=f"{spec.run_id}-train", promote=False)
    except FeaturesMissingError as exc:
        raise StageRefused(str(exc)) from None
    except (TrainError, RegistryError) as exc:
        raise StageError(str(exc)) from None
    metric = settings.gate.metric
    outputs = {
        "version": outcome.version,
        "gate": outcome.decision.to_json(),
        "previous_version": outcome.previous_version,
        "metric": metric,
        "model": outcome.report.model.get(metric),
        "popular": outcome.report.popular.get(metric),
        "examples": outcome.train.stats.rows,
        "samples_per_second": round(outcome.train.samples_per_second, 1),
    }
    verdict = "passes the gate" if outcome.decision.promote else "refused by the gate"
    reason = outcome.decision.reason.removeprefix("not promoted: ").removeprefix("promoted: ")
    return StageResult("train", outputs, f"version {outcome.version} {verdict}: {reason}")


# --------------------------------------------------------------------------- score


def version_to_serve(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> tuple[str | None, str]:
    """The version whose recommendations this run computes and syncs: the new one when the gate
    passed, else the one already promoted (so today's batch answers are fresh either way), else none."""
    from ray_apps.registry import ModelRegistry

    train = done.get("train")
    if train is not None and train.outputs.get("gate", {}).get("promote"):
        return str(train.outputs["version"]), "the new version (gate passed)"
    promoted = ModelRegistry.from_settings(settings, spec.region).promoted()
    if promoted is not None:
        why = "the promoted version (gate refused the new one)" if train is not None else "the promoted version"
        return promoted.version, why
    return None, "no version passed the gate and none is promoted"


def run_score(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> StageResult:
    from ray_apps.registry import RegistryError
    from ray_apps.score import MissingInputError, ScoreError, score

    version, why = version_to_serve(settings, spec, done)
    if version is None:
        return StageResult("score", {"version": None}, f"nothing scored: {why}", skipped=True)
    try:
        summary = score(settings, spec.region, spec.day, version=version)
    except MissingInputError as exc:
        raise StageRefused(str(exc)) from None
    except (ScoreError, RegistryError) as exc:
        raise StageError(str(exc)) from None
    outputs = {"version": version, "users": summary.users, "model_scored": summary.model_scored,
               "popular_fallback": summary.popular_fallback, "users_per_second": round(summary.users_per_second, 1),
               "output": summary.output}
    return StageResult("score", outputs, f"{summary.users:,} users scored with {why}")


# --------------------------------------------------------------------------- sync


def run_sync(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> StageResult:
    """Key data points and the scored version's recs into DynamoDB; facts, dimensions, recs and the
    run into the warehouse. Both are checkpointed: a rerun writes only what is missing."""
    from operators.sync.dynamodb import SyncError, sync_keys, sync_recs
    from operators.warehouse.load import WarehouseError, load_run_days

    score = done.get("score")
    version = score.outputs.get("version") if score is not None else None
    outputs: dict[str, Any] = {}
    try:
        keys = sync_keys(settings, spec.region, spec.day)
        outputs["dynamodb_keys"] = keys.to_json()
        if version:
            recs = sync_recs(settings, spec.region, spec.day, version)
            outputs["dynamodb_recs"] = recs.to_json()
        # A backfill cleaned every day of its range: their events go to the fact table too (a daily
        # run has one ETL day, its own; etl_days ends with the run's day).
        reports = load_run_days(settings, spec.region, spec.etl_days, run_id=spec.run_id, model_version=version)
        outputs["warehouse"] = warehouse_outputs(reports)
    except (SyncError, WarehouseError) as exc:
        raise StageError(str(exc)) from None
    outputs["version"] = version
    return StageResult("sync", outputs, summarize_sync(outputs))


def warehouse_outputs(reports: Sequence[WarehouseReport]) -> dict[str, Any]:
    """The run's warehouse loads (the run's day last) as one result: the run's day's report, with the
    rows of every day loaded summed per table and the days listed."""
    rows: dict[str, int] = {}
    for report in reports:
        for table, n in report.rows.items():
            rows[table] = rows.get(table, 0) + n
    return {**reports[-1].to_json(), "rows": rows, "days": [r.dt for r in reports]}


def summarize_sync(outputs: Mapping[str, Any]) -> str:
    parts = []
    for key, label in (("dynamodb_keys", "key items"), ("dynamodb_recs", "recs items")):
        if key in outputs:
            report = outputs[key]
            parts.append(f"{report['items_written'] + report['items_skipped']:,} {label}")
    if "warehouse" in outputs:
        parts.append(f"{sum(outputs['warehouse']['rows'].values()):,} warehouse rows")
    return "synced " + ", ".join(parts)


def synced_counts(done: Mapping[str, StageResult]) -> dict[str, int]:
    """Counts for the PipelineRun's status.synced (and the demo's table), by target."""
    sync = done.get("sync")
    if sync is None:
        return {}
    out: dict[str, int] = {}
    for key in ("dynamodb_keys", "dynamodb_recs"):
        if key in sync.outputs:
            report = sync.outputs[key]
            out[key] = int(report["items_written"]) + int(report["items_skipped"])
    for table, rows in (sync.outputs.get("warehouse") or {}).get("rows", {}).items():
        out[f"warehouse_{table}"] = int(rows)
    return out


# --------------------------------------------------------------------------- promote


def run_promote(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult]) -> StageResult:
    """Flip the region to the new version when the gate passed and its recs are synced; otherwise say
    why everything keeps serving the previous version."""
    from operators.promote import PromotionError, promote

    train, sync = done.get("train"), done.get("sync")
    if train is None:
        return StageResult("promote", {"promoted": False}, "nothing to promote: the run did not train",
                           skipped=True)
    gate = train.outputs.get("gate") or {}
    version = str(train.outputs["version"])
    if not gate.get("promote"):
        previous = train.outputs.get("previous_version") or "none"
        reason = str(gate.get("reason") or "refused by the gate").removeprefix("not promoted: ")
        return StageResult("promote", {"promoted": False, "version": version, "serving": previous},
                           f"{version} not promoted ({reason}); still serving {previous}")
    if sync is None or sync.outputs.get("version") != version:
        raise StageRefused(f"version {version} passed the gate but its recommendations are not synced "
                           "(run the sync stage first)")
    recs = sync.outputs.get("dynamodb_recs") or {}
    try:
        report = promote(settings, spec.region, spec.day, version, gate,
                         synced_items=int(recs.get("items_written", 0)) + int(recs.get("items_skipped", 0)))
    except PromotionError as exc:
        raise StageError(str(exc)) from None
    return StageResult("promote", {"promoted": True, "version": version, **report.to_json()},
                       f"promoted {version} (was {report.previous or 'none'}); "
                       f"{report.prewarmed:,} cache entries pre-warmed")


def run_record(spec: RunSpec, done: Mapping[str, StageResult], phase: str, started: datetime,
               finished: datetime) -> Any:  # PipelineRunRecord
    """The run as the warehouse's pipeline_runs table records it (pure)."""
    from operators.warehouse.load import PipelineRunRecord

    train = done.get("train")
    promote = done.get("promote")
    gate = (train.outputs.get("gate") or {}) if train else {}
    version = None
    if promote is not None and promote.outputs.get("promoted"):
        version = promote.outputs.get("version")
    elif train is not None:
        version = train.outputs.get("version")
    metrics = {}
    if train is not None:
        metrics = {k: train.outputs.get(k) for k in ("metric", "model", "popular", "examples", "samples_per_second")}
    return PipelineRunRecord(run_id=spec.run_id, region=spec.region, dt=spec.day, phase=phase, model_version=version,
                             gate_promote=gate.get("promote") if train else None,
                             gate_reason=gate.get("reason") if train else None, metrics=metrics,
                             synced=synced_counts(done), started_at=started, finished_at=finished)


def record_run(settings: Settings, spec: RunSpec, done: Mapping[str, StageResult], phase: str,
               started: datetime, finished: datetime) -> None:
    """Upsert the run into the warehouse (MERGE on run id: recording it again updates the row)."""
    from operators.warehouse.load import record_run as upsert

    upsert(settings, spec.region, run_record(spec, done, phase, started, finished))


STAGE_FUNCTIONS: dict[str, StageFn] = {
    "etl": run_etl, "train": run_train, "score": run_score, "sync": run_sync, "promote": run_promote,
}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = ["STAGE_FUNCTIONS", "StageError", "StageFn", "StageRefused", "etl_result", "now_iso", "read_refusal",
           "read_result", "record_run", "run_record",
           "run_etl", "run_promote", "run_score", "run_sync", "run_train", "synced_counts", "version_to_serve",
           "write_refusal", "write_result"]
