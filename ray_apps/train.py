"""Daily two-tower training with Ray Train, evaluation against the baselines, and publication.

One day's step for one region (:func:`run`)::

    features/region=R/dt=D/
      examples/split=train ─▶ train() ─▶ weights ─▶ item tower over items/ ─▶ ANN index
      examples/split=eval  ─▶ holdout ─▶ evaluate(candidate, popular, promoted) ─▶ gate
                           ─▶ ModelRegistry.publish(...) ─▶ promote() when the gate passed

Training (:func:`train`, :func:`train_loop_per_worker`):

- Data. ``ray.data.read_parquet`` streams the train split's files (sorted, so every run reads the same
  blocks) through ``random_shuffle(seed)``: the ETL writes examples clustered by user and time, and an
  in-batch softmax fed one user's clicks in a row would learn from negatives that are nothing alike. The
  shuffle is the same permutation each epoch (an integer seed is "fully deterministic" in Ray Data), so
  a split whose encoded rows take at most ``train.materialize_max_bytes`` (rows x
  :func:`ray_apps.encoding.encoded_row_bytes`) is read, encoded and shuffled once and held in the object
  store; each epoch then varies the batch composition with a local shuffle buffer seeded by
  (seed, epoch, rank).
  Ray Train splits the stream across workers (``streaming_split(equal=True)``); ``preserve_order`` makes
  that split deterministic too. Rows are encoded by :func:`ray_apps.encoding.encode_examples` in Ray
  Data's read tasks, before the shuffle, so the workers receive model-ready arrays: on a GPU worker the
  encoding was most of the epoch, and a materialized split is encoded once for all epochs.
- Log-Q. Item counts over HASHED ids (``encoding.item_counts``) are computed once on the driver in a
  single streaming pass over the train split (which also yields the row count, the data window and the
  popularity baseline's ranking) and handed to Ray Data's encode tasks with the map function.
- Determinism. ``TwoTowerModel`` initialises its parameters from ``config.seed``; dropout and the
  local shuffle are re-seeded at the start of EVERY epoch from (seed, epoch, rank), so a run resumed at
  epoch k draws exactly what an uninterrupted run draws in epoch k. Gradients are averaged by DDP
  (gloo on CPU, NCCL on GPU).
- Checkpoints. Every epoch rank 0 reports a checkpoint holding the model's state_dict, the optimizer's,
  the epoch, the per-epoch history (loss, rows, seconds) and a fingerprint of what defines the
  trajectory. Checkpoints live in the lake next to the registry, under
  ``models/region=R/_checkpoints/<run name>/`` (``storage_path`` = the local path for a ``file://``
  lake, ``bucket/prefix/...`` with an S3 filesystem for ``s3://``); the registry ignores names starting
  with ``_``. The run name defaults to ``train-<region>-<day>``, so a rerun of the same day is the same
  Ray Train run: Train V2 restores its checkpoint manager from storage and ``ray.train.get_checkpoint()``
  hands the workers the last checkpoint. A worker failure inside one ``fit()`` is retried
  (``FailureConfig(max_failures)``) from the last checkpoint too. A completed run that is run again
  trains nothing and returns the same weights. A checkpoint whose fingerprint differs (other data files,
  model config or hyperparameters; the epoch count is NOT part of it, so raising ``epochs`` continues a
  run) is ignored and training starts over.
- Warm start. With ``train.warm_start`` the promoted model's weights initialise epoch 0, when its
  config has the same architecture (:data:`ARCHITECTURE_FIELDS`: every table size, width, the pooling
  and the id hashing must match; temperature, dropout, history length and seed may differ) and its data
  window ends BEFORE the day being trained: a model whose window reaches day D was tuned against D's
  holdout (or, reaching past D, trained on it), so it must not start day D's training (a rerun or a
  backfill). A checkpoint of the same run always wins over the warm start.
- GPU. ``use_gpu`` (``auto``: when the Ray cluster has a GPU per worker) switches to NCCL, bf16
  autocast and ``gpu_batch_size``; the code path is otherwise the same. The global batch is split
  evenly across workers and in-batch negatives are per worker.

What is published. ``user_tower.pt`` holds the FULL two-tower state_dict (``torch.save`` of
``TwoTowerModel.state_dict()``), not just the user tower: the user tower pools its history through the
item tower's id table (one shared embedding), so it cannot be loaded without it. ``config.json`` is the
``TwoTowerConfig``. The published item embeddings and index use the items table's ``popularity_rank``
(as of day D, what serving from D on has); evaluation uses leak-free ranks from the train split
(``evaluate.with_popularity_rank``), as the training examples had.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ray_apps.encoding import (
    EncodingParams,
    encode_examples,
    encoded_row_bytes,
    event_weights,
    hash_ids,
    item_counts,
)
from streamrec.lake import LakeLayout, filesystem

if TYPE_CHECKING:
    import torch

    from ray_apps.evaluate import EvalReport, GateDecision
    from ray_apps.model import TwoTowerConfig, TwoTowerModel
    from ray_apps.registry import ModelRegistry
    from streamrec.settings import Settings

logger = logging.getLogger(__name__)

# TwoTowerConfig fields that must be equal for weights to be loadable AND mean the same thing: every
# table size and layer width (they fix the state_dict's shapes), the pooling (attention adds
# parameters) and the id hashing (which row an item id lands in). The rest (temperature, dropout,
# history_length, seed) only shape training and inference, so a warm start may change them.
ARCHITECTURE_FIELDS: tuple[str, ...] = (
    "id_buckets", "category_buckets", "pop_buckets", "user_buckets", "region_buckets", "device_buckets",
    "embedding_dim", "feature_dim", "item_hidden", "user_hidden", "output_dim", "pooling", "hash_scheme",
)
# Columns of the train split the workers read (+ user_id when the model has a user table).
TRAIN_COLUMNS: tuple[str, ...] = (
    "history", "item_id", "category", "event_type", "weight", "device", "hour", "region", "item_pop_rank",
)
EVAL_COLUMNS: tuple[str, ...] = ("user_id", "history", "region", "device", "hour", "item_id", "ts")
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "category", "popularity_rank")
# Worker failures one fit() recovers from (from the last checkpoint) before it gives up.
MAX_FAILURES = 2
CHECKPOINTS_DIR = "_checkpoints"
CHECKPOINT_FILE = "state.pt"
# Checkpoints kept per run (the newest): resuming needs one, the second covers a torn upload.
CHECKPOINTS_KEPT = 2
# The popularity baseline ranks items over the train split's last days (the ETL's item_pop_rank rule).
POPULAR_DAYS = 7
# Rows held by each worker's local shuffle buffer, in per-worker batches.
SHUFFLE_BUFFER_BATCHES = 4
_SCAN_BATCH_ROWS = 262_144
_AUTO = "auto"


class TrainError(RuntimeError):
    """Training could not produce a model; the message is one line for an operator."""


class FeaturesMissingError(TrainError, FileNotFoundError):
    """The ETL's features for the region and day are not in the lake."""


# --------------------------------------------------------------------------- small value types


@dataclass(frozen=True)
class InjectedFailure:
    """Test hook: raise inside the workers after epoch ``epoch`` trained, before its checkpoint.

    Without ``marker`` every worker fails, on every attempt. With ``marker`` (a local file path) it
    happens once: only the worker that creates the file fails (its peers fail at, or are stopped in, the
    next collective), and later attempts (a FailureConfig retry, or a rerun) find the file and go on.
    """

    epoch: int
    marker: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A published model's weights and config, as the registry holds them."""

    version: str
    config: TwoTowerConfig
    state_bytes: bytes
    data_window: tuple[date, date] | None = None

    def model(self, device: str | torch.device = "cpu") -> TwoTowerModel:
        return model_from_state(self.config, self.state_bytes, device)


@dataclass(frozen=True)
class TrainSplitStats:
    """What one streaming pass over the train split yields (on the driver, before training)."""

    rows: int
    counts: np.ndarray  # int64 [id_buckets]: examples per hashed item id (log-Q)
    first_day: date
    last_day: date
    # item_id, ts (UTC day), weight (summed event weights): enough for the popularity baseline.
    daily_popularity: pa.Table = field(repr=False)

    def popular_ranked_ids(self, last_days: int = POPULAR_DAYS) -> np.ndarray:
        from ray_apps.evaluate import popularity_ranking_from_examples

        return popularity_ranking_from_examples(self.daily_popularity, last_days=last_days)


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`."""

    run_name: str
    state_bytes: bytes  # torch.save(TwoTowerModel.state_dict()): the full model (see the module docstring)
    config: TwoTowerConfig
    losses: list[float]  # mean training loss of each epoch, the whole run (resumed epochs included)
    epochs: list[dict[str, Any]]  # per epoch: epoch, loss, rows, seconds, samples_per_second
    samples_per_second: float  # over every epoch of the run
    epochs_trained: int  # by this call (0 when it found the run already complete)
    resumed_from_epoch: int | None  # the checkpoint's epoch this call started after, if any
    warm_start_from: str | None  # the registry version whose weights initialised the run's epoch 0
    checkpoint_path: str  # URI of the final checkpoint
    use_gpu: bool
    workers: int
    stats: TrainSplitStats = field(repr=False)

    @property
    def data_window(self) -> tuple[date, date]:
        return self.stats.first_day, self.stats.last_day

    def model(self, device: str | torch.device = "cpu") -> TwoTowerModel:
        return model_from_state(self.config, self.state_bytes, device)


@dataclass(frozen=True)
class TrainOutcome:
    """The outcome of :func:`run`: the published version and whether it now serves."""

    version: str
    promoted: bool
    metrics: dict[str, Any]
    decision: GateDecision
    report: EvalReport
    promoted_report: EvalReport | None
    previous_version: str | None  # the version promoted before this run (None: there was none)
    train: TrainResult


# --------------------------------------------------------------------------- lake paths


@dataclass(frozen=True)
class FeaturePaths:
    """The features of one region and day, and where the run's checkpoints go."""

    layout: LakeLayout
    fs: pafs.FileSystem
    region: str
    day: date

    @classmethod
    def for_day(cls, settings: Settings, region: str, day: date) -> FeaturePaths:
        lake_uri = settings.region(region).lake_uri
        aws = settings.aws
        fs = filesystem(lake_uri, endpoint_url=aws.endpoint_url, region=region,
                        access_key=aws.access_key_id, secret_key=aws.secret_access_key)
        return cls(LakeLayout(lake_uri), fs, region, day)

    @property
    def root(self) -> str:
        return self.layout.partition("features", self.region, self.day)

    def table(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def train(self) -> str:
        return self.table("examples", "split=train")

    @property
    def eval(self) -> str:
        return self.table("examples", "split=eval")

    @property
    def items(self) -> str:
        return self.table("items")

    @property
    def checkpoints(self) -> str:
        return posixpath.join(self.layout.models(self.region), CHECKPOINTS_DIR)

    def uri(self, path: str) -> str:
        return self.layout.to_uri(path)

    def data_files(self, path: str) -> list[pafs.FileInfo]:
        """The Parquet files readers see under ``path`` (hidden ``.``/``_`` names skipped), sorted;
        :class:`FeaturesMissingError` when there are none."""
        selector = pafs.FileSelector(path, allow_not_found=True, recursive=True)
        infos = [info for info in self.fs.get_file_info(selector)
                 if info.type == pafs.FileType.File and info.path.endswith(".parquet")
                 and not any(part.startswith((".", "_"))
                             for part in posixpath.relpath(info.path, path).split("/"))]
        if not infos:
            raise FeaturesMissingError(
                f"no features for region {self.region} on {self.day}: {self.uri(path)} has no Parquet "
                f"files; run `streamrec etl run --region {self.region} --date {self.day}` first")
        return sorted(infos, key=lambda info: info.path)

    def read(self, path: str, columns: Sequence[str]) -> pa.Table:
        files = [info.path for info in self.data_files(path)]
        return pads.dataset(files, filesystem=self.fs, format="parquet").to_table(columns=list(columns))


# --------------------------------------------------------------------------- model helpers


def model_config_for(settings: Settings) -> TwoTowerConfig:
    """The model config of a run: the ETL's history length and the training seed, then the
    ``train.model`` overrides (which win)."""
    from ray_apps.model import TwoTowerConfig

    base: dict[str, Any] = {"history_length": settings.etl.history_length, "seed": settings.train.seed}
    return TwoTowerConfig.model_validate({**base, **settings.train.model})


def architecture_mismatch(a: TwoTowerConfig, b: TwoTowerConfig) -> list[str]:
    """The :data:`ARCHITECTURE_FIELDS` on which two configs differ, as ``name: a != b`` lines."""
    return [f"{name}: {getattr(a, name)!r} != {getattr(b, name)!r}"
            for name in ARCHITECTURE_FIELDS if getattr(a, name) != getattr(b, name)]


def state_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().to("cpu") for k, v in state.items()}, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def model_from_state(config: TwoTowerConfig, data: bytes,
                     device: str | torch.device = "cpu") -> TwoTowerModel:
    """A :class:`TwoTowerModel` with the given weights, in eval mode on ``device``."""
    from ray_apps.model import TwoTowerModel

    model = TwoTowerModel(config)
    model.load_state_dict(state_from_bytes(data))
    return model.to(device).eval()


def load_promoted(registry: ModelRegistry) -> LoadedModel | None:
    """The promoted version's weights and config, or None when nothing is promoted or this code cannot
    read its config (then it is logged: a newer model replaces it on the gate's other terms)."""
    from pydantic import ValidationError

    from ray_apps.model import TwoTowerConfig

    version = registry.promoted()
    if version is None:
        return None
    try:
        config = TwoTowerConfig.model_validate(registry.load_config(version))
    except ValidationError as exc:
        logger.warning("promoted model %s has a config this code cannot read; ignoring it: %s",
                       version.version, " ".join(str(exc).split()))
        return None
    return LoadedModel(version.version, config, registry.load_user_tower(version), version.data_window)


def _warm_start_source(candidate: LoadedModel | None, config: TwoTowerConfig,
                       day: date) -> LoadedModel | None:
    if candidate is None:
        return None
    if candidate.data_window is not None and candidate.data_window[1] >= day:
        logger.info("no warm start from %s: its data reaches %s, not before %s",
                    candidate.version, candidate.data_window[1], day)
        return None
    mismatch = architecture_mismatch(candidate.config, config)
    if mismatch:
        logger.info("no warm start from %s: architecture differs (%s)", candidate.version,
                    "; ".join(mismatch))
        return None
    return candidate


# --------------------------------------------------------------------------- the train split, on the driver


def scan_train_split(paths: FeaturePaths, files: Sequence[str], config: TwoTowerConfig) -> TrainSplitStats:
    """One streaming pass over the train split's ``item_id, ts, event_type, weight`` columns: hashed item
    counts for log-Q, rows, the first and last day, and per-(item, day) event weights for the baseline."""
    dataset = pads.dataset(list(files), filesystem=paths.fs, format="parquet")
    counts = np.zeros(config.id_buckets, dtype=np.int64)
    rows = 0
    first = last = None
    daily: list[pa.Table] = []
    scanner = dataset.scanner(columns=["item_id", "ts", "event_type", "weight"], batch_size=_SCAN_BATCH_ROWS)
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        rows += batch.num_rows
        counts += item_counts(hash_ids(batch.column("item_id"), config.id_buckets), config.id_buckets)
        ts = batch.column("ts")
        bounds = pc.min_max(ts)
        low, high = bounds["min"], bounds["max"]
        if low.is_valid:
            first = low.as_py() if first is None else min(first, low.as_py())
            last = high.as_py() if last is None else max(last, high.as_py())
        weights = event_weights(batch.column("event_type"), batch.column("weight")).astype(np.float64)
        day = pc.floor_temporal(ts, unit="day")
        part = pa.table({"item_id": batch.column("item_id"), "ts": day, "weight": weights})
        daily.append(part.group_by(["item_id", "ts"]).aggregate([("weight", "sum")]))
    if rows == 0 or first is None:
        raise TrainError(f"the train split {paths.uri(paths.train)} has no rows with a timestamp")
    table = pa.concat_tables(daily).group_by(["item_id", "ts"]).aggregate([("weight_sum", "sum")])
    table = table.rename_columns(["item_id", "ts", "weight"])
    table = table.sort_by([("ts", "ascending"), ("item_id", "ascending")])
    return TrainSplitStats(rows=rows, counts=counts, first_day=_utc_day(first), last_day=_utc_day(last),
                           daily_popularity=table)


def _utc_day(ts: datetime) -> date:
    return (ts.astimezone(UTC) if ts.tzinfo else ts).date()


def _fingerprint(config: TwoTowerConfig, files: Sequence[pafs.FileInfo], hyper: Mapping[str, Any]) -> str:
    """What defines a run's trajectory (not its length): data files, model config, hyperparameters."""
    body = {"model": json.loads(config.to_json()), "hyper": dict(hyper),
            "files": [[info.path, info.size] for info in files]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_009 + rank) % (2**31 - 1)


# --------------------------------------------------------------------------- the worker loop


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Mapping[str, np.ndarray]],
    device: torch.device | str,
    *,
    use_gpu: bool = False,
) -> tuple[torch.Tensor, int, int]:
    """One pass over ``batches`` (encoded examples: :func:`ray_apps.encoding.encode_examples`'s dicts):
    forward (bf16 autocast on GPU, float32 on CPU), backward, step. Returns ``(sum of batch losses as a
    float64 tensor on device, batches, rows)``; the sum stays on the device so a GPU never waits for a
    host sync per step.

    Pure PyTorch (no Ray): the Ray Train loop feeds it its dataset shard, encoded ahead by Ray Data;
    benchmarks and GPU checks feed it batches they encode themselves.
    """
    import torch

    from ray_apps.model import as_tensors

    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = rows = 0
    for batch in batches:
        tensors = as_tensors(batch, device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_gpu else contextlib.nullcontext():
            loss = model(tensors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double()
        n_batches += 1
        rows += len(batch["weight"])
    return loss_sum, n_batches, rows




def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function (see the module docstring). ``config`` keys: ``model_config``
    (TwoTowerConfig JSON), ``initial_state`` (bytes, ObjectRef or None), ``epochs``, ``batch_size``
    (per worker), ``learning_rate``, ``weight_decay``, ``seed``, ``use_gpu``, ``fingerprint``,
    ``shuffle_buffer`` (rows), and optionally ``fail_at_epoch`` / ``fail_marker``
    (:class:`InjectedFailure`). The dataset shard's rows arrive encoded. Returns the run's history
    (rank 0's becomes ``Result.return_value``)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from ray_apps.model import TwoTowerConfig, TwoTowerModel

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model_config = TwoTowerConfig.from_json(config["model_config"])
    use_gpu = bool(config["use_gpu"])
    device = ray.train.torch.get_device()
    seed = int(config["seed"])

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu",
                               weights_only=True)
        if state.get("fingerprint") != config["fingerprint"]:
            logger.warning("checkpoint of epoch %s belongs to other data or settings; training from scratch",
                           state.get("epoch"))
            state = None

    model = TwoTowerModel(model_config)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    warm_start_from = None
    if state is not None:
        model.load_state_dict(state["model"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        warm_start_from = state.get("warm_start_from")
    elif config.get("initial_state") is not None:
        model.load_state_dict(state_from_bytes(_resolve(config["initial_state"])))
        warm_start_from = config.get("warm_start_from")
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(config["learning_rate"]),
                                  weight_decay=float(config["weight_decay"]))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    shard = ray.train.get_dataset_shard("train")
    batch_size = int(config["batch_size"])
    distributed = world > 1 and dist.is_available() and dist.is_initialized()

    for epoch in range(start_epoch, int(config["epochs"])):
        epoch_seed = _epoch_seed(seed, epoch, rank)
        torch.manual_seed(epoch_seed)  # dropout draws: the same whether the run was resumed or not
        started = time.perf_counter()
        batches_iter = shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                          local_shuffle_buffer_size=int(config["shuffle_buffer"]),
                                          local_shuffle_seed=epoch_seed)
        loss_sum, batches, rows = train_epoch(model, optimizer, batches_iter, device, use_gpu=use_gpu)
        _maybe_fail(config, epoch)
        totals = torch.stack([loss_sum, torch.tensor(float(batches), dtype=torch.float64, device=device),
                              torch.tensor(float(rows), dtype=torch.float64, device=device)])
        if distributed:
            dist.all_reduce(totals)
        total_loss, total_batches, total_rows = (float(x) for x in totals.cpu())  # (a GPU sync)
        seconds = time.perf_counter() - started
        entry = {"epoch": epoch, "loss": total_loss / max(total_batches, 1.0), "rows": int(total_rows),
                 "seconds": seconds, "samples_per_second": total_rows / seconds if seconds > 0 else 0.0}
        history.append(entry)
        metrics = {**entry, "losses": [h["loss"] for h in history]}
        if rank == 0:
            unwrapped = model.module if hasattr(model, "module") else model
            saved = {"model": {k: v.detach().cpu() for k, v in unwrapped.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                     "fingerprint": config["fingerprint"], "model_config": config["model_config"],
                     "warm_start_from": warm_start_from}
            with tempfile.TemporaryDirectory() as directory:
                torch.save(saved, os.path.join(directory, CHECKPOINT_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=f"{config['fingerprint'][:12]}-epoch-{epoch:05d}")
        else:
            ray.train.report(metrics, checkpoint=None)
    return {"history": history, "start_epoch": start_epoch}


def _resolve(value: Any) -> Any:
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _maybe_fail(config: Mapping[str, Any], epoch: int) -> None:
    """The :class:`InjectedFailure` hook. With a marker only the worker that creates the file fails (its
    peers then fail in, or are stopped at, the next collective), so the next attempt runs clean."""
    if config.get("fail_at_epoch") is None or int(config["fail_at_epoch"]) != epoch:
        return
    marker = config.get("fail_marker")
    if marker is not None:
        try:
            with open(marker, "x"):
                pass
        except FileExistsError:
            return
    raise RuntimeError(f"injected failure after epoch {epoch} (test hook)")


# --------------------------------------------------------------------------- the driver


def _failure_summary(exc: BaseException) -> str:
    """One line for a failed fit(): each failed worker's own exception (a WorkerGroupError carries them
    per rank; its message is a multi-line traceback), else the error's first line."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, Mapping) and failures:
        parts = []
        for rank, error in sorted(failures.items()):
            cause = getattr(error, "cause", None) or error  # RayTaskError wraps the user's exception
            lines = [line for line in str(cause).strip().splitlines() if line.strip()]
            parts.append(f"rank {rank}: {type(cause).__name__}: {lines[-1].strip() if lines else ''}")
        return "; ".join(parts)[:1000]
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"[:1000]


def _use_gpu(settings: Settings, ray: Any) -> bool:
    mode = settings.train.use_gpu
    if mode == "yes":
        return True
    if mode == "no":
        return False
    return float(ray.cluster_resources().get("GPU", 0)) >= settings.train.workers


def train(
    settings: Settings,
    region: str,
    day: date,
    *,
    run_name: str | None = None,
    warm_start: LoadedModel | None | str = _AUTO,
    max_failures: int = MAX_FAILURES,
    inject_failure: InjectedFailure | None = None,
) -> TrainResult:
    """Train the two-tower model on ``features/region=R/dt=D/examples/split=train`` with Ray Train.

    ``warm_start``: ``"auto"`` (default) looks up the promoted model when ``train.warm_start`` is on;
    a :class:`LoadedModel` uses that one (if compatible, see :data:`ARCHITECTURE_FIELDS`); None never
    warm-starts. ``run_name`` defaults to ``train-<region>-<day>``: calling again with the same name
    resumes that run from its last checkpoint. ``inject_failure`` is a test hook.
    """
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_apps.runtime import ensure_ray

    paths = FeaturePaths.for_day(settings, region, day)
    files = paths.data_files(paths.train)
    file_paths = [info.path for info in files]
    config = model_config_for(settings)
    stats = scan_train_split(paths, file_paths, config)

    ray_module = ensure_ray(settings)
    ts = settings.train
    use_gpu = _use_gpu(settings, ray_module)
    global_batch = ts.gpu_batch_size if use_gpu else ts.batch_size
    per_worker_batch = max(2, global_batch // ts.workers)
    hyper = {"learning_rate": ts.learning_rate, "weight_decay": ts.weight_decay,
             "batch_size": per_worker_batch, "workers": ts.workers, "seed": ts.seed, "use_gpu": use_gpu}
    fingerprint = _fingerprint(config, files, hyper)

    if isinstance(warm_start, str):
        if warm_start != _AUTO:
            raise ValueError(f"warm_start must be 'auto', a LoadedModel or None, got {warm_start!r}")
        candidate = None
        if ts.warm_start:
            from ray_apps.registry import ModelRegistry

            candidate = load_promoted(ModelRegistry.from_settings(settings, region))
    else:
        candidate = warm_start
    source = _warm_start_source(candidate, config, day)

    columns = list(TRAIN_COLUMNS) + (["user_id"] if config.user_buckets > 0 else [])
    # Encoding runs in Ray Data's read tasks, on the cluster's CPUs ahead of the workers: inside a
    # worker it was 74% of a GPU epoch (docs/design.md, section 9). Whole blocks: it is vectorised.
    dataset = (ray.data.read_parquet(file_paths, filesystem=paths.fs, partitioning=None,
                                     file_extensions=["parquet"])
               .select_columns(columns)
               .map_batches(encode_examples, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"config": EncodingParams.of(config), "counts": stats.counts})
               .random_shuffle(seed=ts.seed))
    if stats.rows * encoded_row_bytes(config) <= ts.materialize_max_bytes:
        # The permutation is the same every epoch; re-reading, re-encoding and re-shuffling it was the
        # largest share of a small split's epoch (docs/benchmarks.md, train). Held once, in a fixed
        # block order (preserve_order), it is the same every epoch and every run.
        dataset.context.execution_options.preserve_order = True
        dataset = dataset.materialize()
    # The context's ingest options (what DataConfig would use) plus preserve_order: a deterministic split
    # across workers (see the module docstring).
    ingest = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    ingest.preserve_order = True
    name = run_name or f"train-{region}-{day.isoformat()}"
    storage_path = paths.checkpoints
    storage_fs = None if isinstance(paths.fs, pafs.LocalFileSystem) else paths.fs
    loop_config: dict[str, Any] = {
        "model_config": config.to_json(),
        "initial_state": ray_module.put(source.state_bytes) if source is not None else None,
        "warm_start_from": source.version if source is not None else None,
        "epochs": ts.epochs,
        "batch_size": per_worker_batch,
        "learning_rate": ts.learning_rate,
        "weight_decay": ts.weight_decay,
        "seed": ts.seed,
        "use_gpu": use_gpu,
        "fingerprint": fingerprint,
        "shuffle_buffer": per_worker_batch * SHUFFLE_BUFFER_BATCHES,
    }
    if inject_failure is not None:
        loop_config["fail_at_epoch"] = inject_failure.epoch
        loop_config["fail_marker"] = inject_failure.marker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=ts.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": ts.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    logger.info("training %s: %d examples %s..%s, %d workers (%s), batch %d per worker, warm start %s",
                name, stats.rows, stats.first_day, stats.last_day, ts.workers, "GPU" if use_gpu else "CPU",
                per_worker_batch, source.version if source else "none")
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: one line, the cause chained
        raise TrainError(f"training run {name} failed: {_failure_summary(exc)}") from exc
    if result.checkpoint is None:
        raise TrainError(f"training run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        import torch

        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise TrainError(f"training run {name}: the last checkpoint belongs to other data or settings")
    history = list(state["history"])
    returned = result.return_value or {}
    start = int(returned.get("start_epoch", len(history)))
    total_rows = sum(h["rows"] for h in history)
    total_seconds = sum(h["seconds"] for h in history)
    checkpoint_path = result.checkpoint.path
    return TrainResult(
        run_name=name,
        state_bytes=state_to_bytes(state["model"]),
        config=config,
        losses=[float(h["loss"]) for h in history],
        epochs=history,
        samples_per_second=total_rows / total_seconds if total_seconds > 0 else 0.0,
        epochs_trained=len(history) - start,
        resumed_from_epoch=start - 1 if start > 0 else None,
        warm_start_from=state.get("warm_start_from"),
        checkpoint_path=paths.layout.to_uri(checkpoint_path) if storage_fs is not None else checkpoint_path,
        use_gpu=use_gpu,
        workers=ts.workers,
        stats=stats,
    )


# --------------------------------------------------------------------------- the daily step


def run(settings: Settings, region: str, day: date, *, run_name: str | None = None,
        warm_start: LoadedModel | None | str = _AUTO, promote: bool = True) -> TrainOutcome:
    """Train, embed the catalogue, build the ANN index, evaluate against the popularity baseline and
    the promoted model on the same holdout, gate, publish, and promote when the gate passes.

    ``promote=False`` records the gate's decision but leaves the pointer alone: the daily pipeline
    promotes only after the version's recommendations are synced (operators/promote.py)."""
    from ray_apps import evaluate as ev
    from ray_apps.ann import build_index
    from ray_apps.registry import ModelRegistry, embeddings_table

    paths = FeaturePaths.for_day(settings, region, day)
    # Fail fast, before Ray starts, when the ETL has not run: every input is checked up front.
    for path in (paths.train, paths.eval, paths.items):
        paths.data_files(path)
    registry = ModelRegistry.from_settings(settings, region)
    promoted = load_promoted(registry)
    if isinstance(warm_start, str) and warm_start == _AUTO:
        warm_start = promoted if settings.train.warm_start else None

    result = train(settings, region, day, run_name=run_name, warm_start=warm_start)
    model = result.model()

    items = paths.read(paths.items, ITEM_COLUMNS)
    eval_examples = paths.read(paths.eval, EVAL_COLUMNS)
    popular = result.stats.popular_ranked_ids()
    holdout = ev.holdout_from_examples(eval_examples, max_users=settings.gate.max_eval_users,
                                       seed=settings.train.seed)
    # Evaluation sees leak-free popularity ranks (the train split's), like the training examples did.
    eval_items = ev.with_popularity_rank(items, popular)
    ids, vectors = ev.item_embeddings_for(model, result.config, eval_items)
    report = ev.evaluate(model, result.config, holdout, ids, vectors, popular)
    promoted_report = None
    if promoted is not None:
        old = promoted.model()
        old_ids, old_vectors = ev.item_embeddings_for(old, promoted.config, eval_items)
        promoted_report = ev.evaluate(old, promoted.config, holdout, old_ids, old_vectors, popular)
    decision = ev.gate(report.model, report.popular, promoted_report.model if promoted_report else None,
                       settings.gate)

    # What is published serves from day D on: the item tower sees day D's popularity ranks.
    serve_ids, serve_vectors = ev.item_embeddings_for(model, result.config, items)
    index = build_index(serve_ids, serve_vectors, kind="auto", exact_max_items=settings.score.exact_max_items)
    metrics: dict[str, Any] = {
        **report.to_json(),
        "promoted": None if promoted_report is None else {"version": promoted.version,
                                                          "model": dict(promoted_report.model)},
        "training": {"run_name": result.run_name, "epochs": len(result.losses), "losses": result.losses,
                     "examples": result.stats.rows, "warm_start_from": result.warm_start_from,
                     "workers": result.workers, "use_gpu": result.use_gpu},
    }
    version = registry.publish(
        None,
        user_tower=result.state_bytes,
        config=json.loads(result.config.to_json()),
        item_embeddings=embeddings_table(serve_ids, serve_vectors),
        index=index,
        data_window=(result.stats.first_day, day),
        metrics=metrics,
        gate=decision.to_json(),
    )
    promoted_now = False
    if decision.promote and promote:
        registry.promote(version.version, decision.to_json())
        promoted_now = True
    logger.info("published %s (%s): %s", version.version, "promoted" if promoted_now else "not promoted",
                decision.reason)
    return TrainOutcome(version=version.version, promoted=promoted_now, metrics=metrics, decision=decision,
                        report=report, promoted_report=promoted_report,
                        previous_version=promoted.version if promoted else None, train=result)


__all__ = [
    "ARCHITECTURE_FIELDS", "FeaturePaths", "FeaturesMissingError", "InjectedFailure", "LoadedModel",
    "TrainError", "TrainOutcome", "TrainResult", "TrainSplitStats", "architecture_mismatch",
    "load_promoted", "model_config_for", "model_from_state", "run", "scan_train_split", "train",
    "train_epoch", "train_loop_per_worker",
]
