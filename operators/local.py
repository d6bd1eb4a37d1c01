"""The in-process executor: ``streamrec pipeline run`` and ``make demo`` run a PipelineRun's stages
one after another in this process, with the same stage functions and result files the controller uses.

A stage whose result file exists is not run again (its work is durable and the file was written after
it), so rerunning a run resumes where it stopped and a finished run is a no-op; ``force`` reruns every
stage (each is idempotent: the ETL overwrites its partitions, training resumes its checkpoint and
republishes the same version, scoring replaces its folder, sync skips checkpointed files).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from operators.pipeline import STAGES, RunSpec, SpecError, StageResult, settings_overrides
from operators.stages import (
    STAGE_FUNCTIONS, StageError, StageFn, StageRefused, read_result, record_run, write_result,
)
from streamrec.settings import Settings

logger = logging.getLogger(__name__)


class PipelineFailed(RuntimeError):
    """A stage failed for good (refused, or out of attempts); earlier stages' results are kept."""

    def __init__(self, stage: str, attempts: int, message: str, *, refused: bool = False) -> None:
        super().__init__(f"stage {stage} failed after {attempts} attempt(s): {message}")
        self.stage = stage
        self.attempts = attempts
        self.reason = message
        self.refused = refused  # StageRefused: retrying cannot help


@dataclass
class StageRun:
    stage: str
    state: str  # Succeeded | Skipped | Reused
    result: StageResult
    attempts: int = 0
    seconds: float = 0.0


@dataclass
class LocalRun:
    spec: RunSpec
    stages: list[StageRun] = field(default_factory=list)

    @property
    def done(self) -> dict[str, StageResult]:
        return {s.stage: s.result for s in self.stages}


def settings_for_run(settings: Settings, spec: RunSpec) -> Settings:
    """``settings`` with the run's overrides applied; a wrong override fails naming its key."""
    if not spec.overrides:
        return settings
    document = settings_overrides(settings.model_dump(), spec.overrides)
    try:
        # model_validate checks the document alone (no environment or YAML sources): what we want.
        return Settings.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"spec.overrides: {problems}") from None


Recorder = Callable[[Settings, RunSpec, Mapping[str, StageResult], str, datetime, datetime], None]


def run_pipeline(settings: Settings, spec: RunSpec, *, force: bool = False, retry_delay_s: float | None = None,
                 functions: Mapping[str, StageFn] = STAGE_FUNCTIONS, record: Recorder | None = record_run,
                 say: Callable[[str], None] = print) -> LocalRun:
    """Run ``spec``'s stages in order (see the module docstring); raise PipelineFailed on a failure.

    Stages before the first requested one that a later one needs (e.g. train before score) are taken
    from their result files. ``record`` writes the finished (or failed) run to the warehouse's
    pipeline_runs table; a failure to record is reported, not raised (the run's work is done)."""
    settings = settings_for_run(settings, spec)
    delay = settings.pipeline.retry_delay_s if retry_delay_s is None else retry_delay_s
    run = LocalRun(spec)
    ray_was_up = _ray_up()
    earlier: dict[str, StageResult] = {}
    for stage in STAGES[:STAGES.index(spec.stages[0])]:
        found = read_result(settings, spec, stage)
        if found is not None:
            earlier[stage] = found
    started, phase = datetime.now(UTC), "Failed"
    try:
        for stage in spec.stages:
            done = {**earlier, **run.done}
            existing = None if force else read_result(settings, spec, stage)
            if existing is not None:
                say(f"  {stage:<8} done earlier: {existing.message}")
                run.stages.append(StageRun(stage, "Reused", existing))
                continue
            run.stages.append(_run_stage(settings, spec, stage, functions[stage], done, delay, say))
        phase = "Succeeded"
    finally:
        if not ray_was_up:  # train and score share one local Ray; a session someone else started stays
            _shutdown_ray()
        if record is not None:
            try:
                record(settings, spec, {**earlier, **run.done}, phase, started, datetime.now(UTC))
            except Exception as exc:  # the warehouse being down must not hide the run's own outcome
                logger.warning("recording run %s in the warehouse failed: %s", spec.run_id, exc)
                say(f"  (recording the run in the warehouse failed: {exc})")
    return run


def _run_stage(settings: Settings, spec: RunSpec, stage: str, fn: StageFn, done: Mapping[str, StageResult],
               delay: float, say: Callable[[str], None]) -> StageRun:
    attempts = settings.pipeline.max_attempts
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            result = fn(settings, spec, done)
        except StageRefused as exc:
            raise PipelineFailed(stage, attempt, str(exc), refused=True) from None
        except StageError as exc:
            if attempt == attempts:
                raise PipelineFailed(stage, attempt, str(exc)) from None
            wait = delay * 2 ** (attempt - 1)
            say(f"  {stage:<8} attempt {attempt} failed ({exc}); retrying in {wait:.0f} s")
            time.sleep(wait)
            continue
        write_result(settings, spec, result)
        seconds = time.monotonic() - started
        say(f"  {stage:<8} {'skipped' if result.skipped else 'done'} in {seconds:.0f} s: {result.message}")
        return StageRun(stage, "Skipped" if result.skipped else "Succeeded", result, attempt, seconds)
    raise AssertionError("unreachable")  # pragma: no cover


def _ray_up() -> bool:
    ray: Any = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _shutdown_ray() -> None:
    if _ray_up():
        sys.modules["ray"].shutdown()


__all__ = ["LocalRun", "PipelineFailed", "StageRun", "run_pipeline", "settings_for_run"]
