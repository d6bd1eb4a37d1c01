"""Batch scoring with Ray Data: every user of a region's day → top-K recommendations in the lake.

Input (the Spark ETL's outputs for region R and day D, see docs/etl.md)::

    features/region=R/dt=D/users/   user_id, last_items (oldest first), purchased_items, device, ...
    features/region=R/dt=D/items/   item_id, popularity_rank, pop_7d, ...  (the popularity fallback)

Output, one folder per model version, so a new version never overwrites the one being served (the recs
table is keyed the same way: ``user_id`` + ``model_version``, see :mod:`streamrec.tables`)::

    recs/region=R/dt=D/model_version=V/part-NNNNN-0.parquet   one row per user (:data:`RECS_SCHEMA`)
    recs/region=R/dt=D/model_version=V/_run_summary.json      written LAST: the completion marker

Per user (:func:`recommend_batch`, pure and testable without Ray):

- fewer than ``score.min_history`` items in ``last_items`` → **cold**: the regional popularity list of
  day D (``popularity_rank`` order, 7-day popularity as the score), source ``popular``;
- otherwise the user tower encodes ``last_items`` with the region and the user's last ``device``; the
  hour of day is **unknown** (index 0: the batch runs once a day and the recommendations are served at
  any hour; the zero padding row means "no time-of-day signal", the same input the serving path uses
  when it has no hour). The user vector is searched in the version's ANN index for ``top_k`` items,
  source ``model``;
- with ``score.exclude_purchased`` the user's ``purchased_items`` never appear, in either list (the
  index over-fetches so rows still get ``top_k`` items; the popularity list is read ``top_k +
  etl.purchased_items_max`` long for the same reason). A list is shorter than ``top_k`` only when the
  catalogue has fewer eligible items.

Reproducibility. ``generated_at`` is one value per run, passed in; by default it is the end of day D
(D+1 00:00 UTC: the recommendations are "as of" the data they were computed from), so a rerun on the
same inputs with the same model version writes the same rows. Blocks keep their input order
(``preserve_order``) and files are named by write-task index, so on the same cluster size a rerun also
writes byte-identical files (on CPU; with the user tower on a GPU, cuBLAS may round the last bit
differently between runs, which only swaps items whose scores tie to ~1e-7: measured on an H100, 0.5%
of users' lists differ from the CPU's in such an order swap, scores by at most 2e-7).

Idempotence and crashes. A run writes into a hidden sibling ``_staging.model_version=V`` (readers of
the lake skip names starting with ``_``), counts what landed (every user exactly once, else it fails
without publishing), writes ``_run_summary.json`` into it, and only then replaces the target folder:
on a local lake by two renames (old folder aside, staging in place, old folder deleted), on S3, which
has no rename, by deleting the target's objects and copying the staged files in, the summary last. A
crash before the swap leaves the previous complete output untouched; a crash during it leaves a folder
without ``_run_summary.json`` (or none at all), which the sync step must refuse: it loads a version's
recs only when the summary exists, and only the files the summary lists. A rerun clears any
leftovers (staging, the set-aside folder) and redoes the run. One writer per (region, day, version).
"""

from __future__ import annotations

import io
import json
import posixpath
import time as _time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_apps.ann import AnnIndex, write_bytes_atomic
from ray_apps.encoding import HASH_SCHEME, encode_users
from ray_apps.registry import ModelRegistry, ModelVersion
from streamrec.lake import LakeLayout

if TYPE_CHECKING:
    import torch

    from ray_apps.model import TwoTowerModel
    from streamrec.settings import Settings

SUMMARY_FILE = "_run_summary.json"
STAGING_PREFIX = "_staging."
REPLACED_PREFIX = "_replaced."
SOURCE_MODEL = "model"
SOURCE_POPULAR = "popular"
# Columns scoring reads from the users table (device and purchased_items may be absent in a batch).
USER_COLUMNS = ("user_id", "last_items", "purchased_items", "device")

RECS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("item_ids", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("source", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("generated_at", pa.timestamp("us", tz="UTC")),
])


class ScoreError(Exception):
    """Scoring cannot run or did not complete; the message is one line meant for an operator."""


class NoPromotedModelError(ScoreError):
    """No version given and none promoted in the region."""


class MissingInputError(ScoreError):
    """An ETL output scoring reads does not exist."""


# --------------------------------------------------------------------------- small value types


@dataclass(frozen=True)
class PopularList:
    """The regional popularity fallback: item ids best first, with their scores (7-day popularity)."""

    item_ids: tuple[str, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.scores):
            raise ValueError(f"{len(self.item_ids)} popular item ids but {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class RegistryLocation:
    """Where a region's model registry lives: small and picklable, so an actor opens it itself and
    nothing large (weights, index) travels through Ray's object store."""

    lake_uri: str
    region: str
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, region: str) -> RegistryLocation:
        aws = settings.aws
        return cls(settings.region(region).lake_uri, region, aws.endpoint_url, aws.access_key_id,
                   aws.secret_access_key)

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.lake_uri, self.region, endpoint_url=self.endpoint_url,
                             access_key=self.access_key, secret_key=self.secret_key)


@dataclass(frozen=True)
class ScoreSummary:
    """What a run did; also the content of ``_run_summary.json`` (the completion marker)."""

    region: str
    dt: str
    model_version: str
    generated_at: str
    users: int
    model_scored: int
    popular_fallback: int
    seconds: float
    users_per_second: float
    output: str
    files: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ScoreSummary:
        return cls(**json.loads(text))


# --------------------------------------------------------------------------- the per-batch logic


def recommend_batch(
    batch: pa.Table | pa.RecordBatch | Mapping[str, Any],
    *,
    model: TwoTowerModel,
    index: AnnIndex,
    region: str,
    popular: PopularList,
    top_k: int,
    model_version: str,
    generated_at: datetime,
    min_history: int = 1,
    exclude_purchased: bool = True,
) -> pa.Table:
    """Recommendations for one batch of users-table rows, as a :data:`RECS_SCHEMA` table (same row order).

    ``batch`` is a pyarrow Table/RecordBatch, a dict of numpy arrays or a pandas DataFrame (Ray Data's
    batch formats) with ``user_id``, ``last_items``, ``purchased_items`` (needed with
    ``exclude_purchased``) and optionally ``device``. The model runs in eval mode without autograd on
    whatever device its parameters are on (its previous mode is restored). See the module docstring
    for the rules.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    table = _as_table(batch)
    rows = table.num_rows
    for name in ("user_id", "last_items") + (("purchased_items",) if exclude_purchased else ()):
        if name not in table.column_names:
            raise KeyError(f"scoring needs column {name!r}; the batch has {sorted(table.column_names)}")
    lengths = pc.fill_null(pc.list_value_length(table.column("last_items")), 0)
    cold = lengths.to_numpy(zero_copy_only=False) < min_history
    purchased = _list_column(table, "purchased_items") if exclude_purchased else None

    # Results as positions in one id space: 0..N-1 the index's items, N.. the popularity list's; -1 none.
    positions = np.full((rows, top_k), -1, dtype=np.int64)
    scores = np.full((rows, top_k), -np.inf, dtype=np.float32)
    warm = np.flatnonzero(~cold)
    if warm.size:
        every = warm.size == rows  # the common case: no copy of the batch
        users = table if every else table.take(pa.array(warm))
        vectors = user_vectors(model, users, region)
        exclude = purchased if purchased is None or every else purchased.take(pa.array(warm))
        positions[warm], scores[warm] = index.search_positions(vectors, top_k, exclude=exclude)
    cold_rows = np.flatnonzero(cold)
    if cold_rows.size:
        pop_positions, scores[cold_rows] = _popular_positions(cold_rows, popular, purchased, top_k)
        positions[cold_rows] = np.where(pop_positions >= 0, pop_positions + len(index), -1)

    # Each row's results come first, then padding (-1): the valid cells in row order are the lists.
    valid = positions >= 0
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    offsets_array = pa.array(offsets, type=pa.int32())
    names = index.item_ids_arrow
    if cold_rows.size:
        names = pa.concat_arrays([names, pa.array(popular.item_ids, type=pa.string())])
    item_ids = pa.ListArray.from_arrays(offsets_array, names.take(pa.array(positions[valid])))
    item_scores = pa.ListArray.from_arrays(offsets_array, pa.array(scores[valid], type=pa.float32()))
    source = pc.if_else(pa.array(cold, type=pa.bool_()), SOURCE_POPULAR, SOURCE_MODEL)
    return pa.Table.from_arrays([
        table.column("user_id").cast(pa.string()),
        item_ids.cast(RECS_SCHEMA.field("item_ids").type),
        item_scores.cast(RECS_SCHEMA.field("scores").type),
        source.cast(pa.string()),
        pa.repeat(pa.scalar(model_version, pa.string()), rows),
        pa.repeat(pa.scalar(utc(generated_at), RECS_SCHEMA.field("generated_at").type), rows),
    ], schema=RECS_SCHEMA)


def user_vectors(model: TwoTowerModel, users: pa.Table, region: str) -> np.ndarray:
    """User-tower vectors (float32 [B, D]) for users-table rows: history = ``last_items``, context =
    ``region`` and ``device``, hour unknown (see the module docstring); ``user_id`` feeds the user-id
    table when the model has one."""
    import torch

    from ray_apps.model import as_tensors

    config = model.config
    device = users.column("device") if "device" in users.column_names else None
    user_id = users.column("user_id") if config.user_buckets > 0 else None
    encoded = encode_users(users.column("last_items"), region, device, None, user_id, config=config)
    with _inference(model) as where, torch.no_grad():
        vectors = model.user_embeddings(as_tensors(encoded, where))
    return np.ascontiguousarray(vectors.float().cpu().numpy(), dtype=np.float32)


def _list_column(table: pa.Table, name: str) -> pa.Array:
    """A list column as one Arrow array (chunks combined)."""
    column = table.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _popular_positions(rows: np.ndarray, popular: PopularList, purchased: pa.Array | None,
                       top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cold rows' lists as positions in the popularity list (``[len(rows), top_k]``, -1 = none) and
    scores: its first ``top_k`` items, minus what each user bought when excluding. Vectorised: the
    bought ids are looked up in the list once, masked, and the first ``top_k`` left per row kept."""
    size = len(popular)
    keep = np.ones((len(rows), size), dtype=bool)
    if purchased is not None and size:
        bought = purchased.take(pa.array(rows))
        parents = pc.list_parent_indices(bought).to_numpy(zero_copy_only=False)
        where = pc.index_in(pc.list_flatten(bought).cast(pa.string()),
                            value_set=pa.array(popular.item_ids, type=pa.string()))
        where = pc.fill_null(where, -1).to_numpy(zero_copy_only=False)
        hit = where >= 0
        keep[parents[hit], where[hit]] = False
    rank = np.cumsum(keep, axis=1)
    r, c = np.nonzero(keep & (rank <= top_k))
    positions = np.full((len(rows), top_k), -1, dtype=np.int64)
    scores = np.full((len(rows), top_k), -np.inf, dtype=np.float32)
    positions[r, rank[r, c] - 1] = c
    scores[r, rank[r, c] - 1] = np.asarray(popular.scores, dtype=np.float32)[c]
    return positions, scores


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode (no dropout) for the block, restoring the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _as_table(batch: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> pa.Table:
    """Any Ray Data batch format as a pyarrow Table (list columns typed list<string>)."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    try:
        import pandas as pd

        if isinstance(batch, pd.DataFrame):
            batch = {name: batch[name].to_numpy() for name in batch.columns}
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    columns = {}
    for name, values in batch.items():
        if name in ("last_items", "purchased_items"):
            # numpy batches hold one ndarray (or None) per row
            columns[name] = pa.array([None if v is None else list(v) for v in values],
                                     type=pa.list_(pa.string()))
        else:
            columns[name] = pa.array(values, from_pandas=True)
    return pa.table(columns)


def utc(moment: datetime) -> datetime:
    """A timezone-aware datetime in UTC (naive ones are refused: they are ambiguous)."""
    if moment.tzinfo is None:
        raise ValueError(f"generated_at must be timezone-aware (UTC), got {moment.isoformat()}")
    return moment.astimezone(UTC)


def default_generated_at(day: date) -> datetime:
    """The end of day ``day``: D+1 00:00 UTC, the moment the day's data are complete."""
    return datetime.combine(day + timedelta(days=1), time(), tzinfo=UTC)


# --------------------------------------------------------------------------- loading a version


def version_config(registry: ModelRegistry, version: str | ModelVersion) -> Any:
    """A version's :class:`~ray_apps.model.TwoTowerConfig`, refused when the weights were trained with
    another id hashing (their embedding rows would not mean the same items) or the index's dimension
    differs from the user tower's output. Cheap (the config and the manifest): the driver checks this
    before it starts any actor, so a bad version fails with one line instead of an actor error."""
    from ray_apps.model import TwoTowerConfig

    mv = version if isinstance(version, ModelVersion) else registry.get(version)
    config = TwoTowerConfig.model_validate(registry.load_config(mv))
    if config.hash_scheme != HASH_SCHEME:
        raise ScoreError(f"model version {mv.version!r} was trained with id hashing {config.hash_scheme!r}; "
                         f"this code hashes with {HASH_SCHEME!r}")
    dim = mv.index_info.get("dim")
    if dim != config.output_dim:
        raise ScoreError(f"model version {mv.version!r}: its index has dimension {dim}, the model's "
                         f"output_dim is {config.output_dim}")
    return config


def load_scoring_model(registry: ModelRegistry, version: str | ModelVersion,
                       device: str | torch.device | None = None) -> tuple[TwoTowerModel, AnnIndex]:
    """A version's model (eval mode, on ``device``, default CUDA when available, else CPU) and its ANN
    index, both checksum-verified by the registry and checked by :func:`version_config`."""
    import torch

    from ray_apps.model import TwoTowerModel

    config = version_config(registry, version)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    state = torch.load(io.BytesIO(registry.load_user_tower(version)), map_location="cpu", weights_only=True)
    model = TwoTowerModel(config)
    model.load_state_dict(state)
    model.to(device).eval()
    index = registry.load_index(version)
    if index.dim != config.output_dim:
        raise ScoreError(f"index dimension {index.dim} differs from the model's output_dim {config.output_dim}")
    return model, index


class UserScorer:
    """The Ray Data actor: loads the version's model and index once, then scores pyarrow batches.

    Constructed by Ray inside the actor from small arguments (the registry location, names, the
    popularity list); the weights and the index are read from the registry there (checksum-verified).
    """

    def __init__(self, *, location: RegistryLocation, version: str, region: str, popular: PopularList,
                 top_k: int, model_version: str | None = None, generated_at: datetime,
                 min_history: int = 1, exclude_purchased: bool = True, device: str | None = None) -> None:
        self.model, self.index = load_scoring_model(location.registry(), version, device)
        self.kwargs: dict[str, Any] = dict(
            region=region, popular=popular, top_k=top_k, model_version=model_version or version,
            generated_at=utc(generated_at), min_history=min_history, exclude_purchased=exclude_purchased,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return recommend_batch(batch, model=self.model, index=self.index, **self.kwargs)


# --------------------------------------------------------------------------- the run


def output_folder(layout: LakeLayout, region: str, day: date, version: str) -> str:
    """``recs/region=R/dt=D/model_version=V`` (a filesystem path, no scheme)."""
    return posixpath.join(layout.partition("recs", region, day), f"model_version={version}")


def resolve_version(registry: ModelRegistry, version: str | None) -> ModelVersion:
    """The named version, or the promoted one; :class:`NoPromotedModelError` when there is none."""
    if version is not None:
        return registry.get(version)
    promoted = registry.promoted()
    if promoted is None:
        raise NoPromotedModelError(
            f"no model version is promoted in region {registry.region} "
            f"({registry.layout.to_uri(registry.root)}): train and promote a model first, or name a "
            f"published version with --version")
    return promoted


def read_popular(fs: pafs.FileSystem, items_path: str, size: int) -> PopularList:
    """The ``size`` best items by ``popularity_rank`` (ties by item id) with their 7-day popularity."""
    dataset = pads.dataset(items_path, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=["item_id", "popularity_rank", "pop_7d"],
                             filter=pads.field("popularity_rank") <= size)
    table = table.sort_by([("popularity_rank", "ascending"), ("item_id", "ascending")]).slice(0, size)
    scores = pc.fill_null(table.column("pop_7d").cast(pa.float64()), 0.0)
    return PopularList(tuple(table.column("item_id").to_pylist()), tuple(scores.to_pylist()))


def read_summary(fs: pafs.FileSystem, folder: str) -> ScoreSummary | None:
    """The completion marker of an output folder; None when the run never completed (do not load it)."""
    try:
        with fs.open_input_stream(posixpath.join(folder, SUMMARY_FILE)) as stream:
            return ScoreSummary.from_json(stream.read())
    except FileNotFoundError:
        return None


def score(settings: Settings, region: str, day: date, *, version: str | None = None,
          generated_at: datetime | None = None, gpus_per_actor: float | None = None,
          rows_per_block: int | None = None) -> ScoreSummary:
    """Score every user of ``region`` on ``day`` with ``version`` (default: the promoted one).

    Reads ``features/region=R/dt=D/users`` with Ray Data, runs :class:`UserScorer` in a fixed pool of
    ``score.concurrency`` actors with ``score.cpus_per_actor`` CPUs each, ``score.batch_size`` rows a
    batch (at most a block), and replaces ``recs/region=R/dt=D/model_version=V/`` (see the module
    docstring for how a crash is handled). ``generated_at`` defaults to the end of ``day``.
    ``gpus_per_actor`` None gives each actor an equal share of the cluster's GPUs (at most one) when it
    has any, else none.
    ``rows_per_block`` re-cuts the users table into blocks of that many rows (streaming, no shuffle,
    order kept); each block is one actor task and one output file. Default
    (:func:`default_rows_per_block`): equal blocks of at most ``score.batch_size`` rows, a multiple of
    ``concurrency`` of them, so every actor gets work (Ray Data's own read blocks, up to its target block
    size, would leave a one-file table in one block and all but one actor idle).
    """
    import ray
    import ray.data

    from ray_apps.runtime import ensure_ray

    started = _time.perf_counter()
    scoring = settings.score
    location = RegistryLocation.from_settings(settings, region)
    registry = location.registry()
    layout, fs = registry.layout, registry.fs
    model_version = resolve_version(registry, version)
    version_config(registry, model_version)
    features = layout.partition("features", region, day)
    users_path, items_path = posixpath.join(features, "users"), posixpath.join(features, "items")
    for name, path in (("users", users_path), ("items", items_path)):
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise MissingInputError(f"no {name} table for region {region} on {day.isoformat()} "
                                    f"({layout.to_uri(path)}): run `streamrec etl run --region {region} "
                                    f"--date {day.isoformat()}` first")
    spare = settings.etl.purchased_items_max if scoring.exclude_purchased else 0
    popular = read_popular(fs, items_path, scoring.top_k + spare)
    users = pads.dataset(users_path, filesystem=fs, format="parquet").count_rows()
    if users == 0:
        raise MissingInputError(f"the users table for region {region} on {day.isoformat()} "
                                f"({layout.to_uri(users_path)}) is empty: rerun `streamrec etl run --region "
                                f"{region} --date {day.isoformat()}`")
    when = utc(generated_at) if generated_at is not None else default_generated_at(day)

    target = output_folder(layout, region, day, model_version.version)
    parent, leaf = posixpath.split(target)
    staging = posixpath.join(parent, STAGING_PREFIX + leaf)
    replaced = posixpath.join(parent, REPLACED_PREFIX + leaf)
    for leftover in (staging, replaced):
        _delete_dir(fs, leftover)

    ensure_ray(settings)
    if gpus_per_actor is None:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        gpus_per_actor = min(1.0, gpus / scoring.concurrency) if gpus > 0 else 0.0
    # select_columns right after the read is pushed down into it (only these columns are read).
    dataset = ray.data.read_parquet(users_path, filesystem=fs, partitioning=None).select_columns(
        list(USER_COLUMNS))
    if rows_per_block is None:
        rows_per_block = default_rows_per_block(users, scoring.batch_size, scoring.concurrency)
    dataset = dataset.repartition(target_num_rows_per_block=rows_per_block, strict=True)
    # Ray Data bundles input blocks until a task has batch_size rows: with smaller blocks two would share
    # a task (and a file), and the actors would get half as many, uneven tasks. A batch is at most a block.
    batch_size = min(scoring.batch_size, rows_per_block)
    recs = dataset.map_batches(
        UserScorer,
        fn_constructor_kwargs=dict(
            location=location, version=model_version.version, region=region, popular=popular,
            top_k=scoring.top_k, generated_at=when, min_history=scoring.min_history,
            exclude_purchased=scoring.exclude_purchased,
        ),
        compute=ray.data.ActorPoolStrategy(size=scoring.concurrency),
        num_cpus=scoring.cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        batch_size=batch_size,
        batch_format="pyarrow",
        udf_modifying_row_count=False,
    )
    # Blocks leave in input order, so write task i always gets the same rows: reruns write the same files.
    recs.context.execution_options.preserve_order = True
    recs.write_parquet(staging, filesystem=fs, filename_provider=_part_files(), mode="overwrite")

    files, model_scored, popular_fallback = _staged_files(fs, staging)
    written = sum(f["rows"] for f in files)
    if written != users:
        raise ScoreError(f"scoring wrote {written} rows for {users} users of region {region} on "
                         f"{day.isoformat()}; the output was not published (rerun the command)")
    seconds = _time.perf_counter() - started
    summary = ScoreSummary(
        region=region, dt=day.isoformat(), model_version=model_version.version,
        generated_at=when.isoformat().replace("+00:00", "Z"), users=users, model_scored=model_scored,
        popular_fallback=popular_fallback, seconds=round(seconds, 3),
        users_per_second=round(users / max(seconds, 1e-9), 1),
        output=layout.to_uri(target), files=files,
        params={"top_k": scoring.top_k, "min_history": scoring.min_history,
                "exclude_purchased": scoring.exclude_purchased, "batch_size": batch_size,
                "concurrency": scoring.concurrency, "cpus_per_actor": scoring.cpus_per_actor,
                "gpus_per_actor": gpus_per_actor, "rows_per_block": rows_per_block,
                "popular_items": len(popular)},
    )
    write_bytes_atomic(fs, posixpath.join(staging, SUMMARY_FILE), summary.to_json().encode())
    _replace_folder(fs, staging, target, replaced)
    return summary


def default_rows_per_block(users: int, batch_size: int, concurrency: int) -> int:
    """Rows per Ray Data block when ``score()`` is not told: blocks of at most ``batch_size`` rows (each
    block is one actor call and one output file), as equal as they can be and as many as a multiple of
    ``concurrency``, so every actor gets work and the actors finish together: 100,000 users in batches
    of 4,096 for 2 actors are 26 blocks of 3,847 (not 24 full blocks and one of 1,696); 5,000 users are
    2 blocks of 2,500 (one 4,096-row block would leave an actor idle)."""
    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"batch_size and concurrency must be >= 1, got {batch_size} and {concurrency}")
    if users <= 0:
        return 1
    blocks = concurrency * -(-users // (concurrency * batch_size))
    return -(-users // blocks)


def _part_files() -> Any:
    """A FilenameProvider naming files ``part-<write task index>-0.parquet`` (the ``{i}`` is pyarrow's
    file counter within a task): deterministic, so a rerun overwrites rather than adds. Only valid with
    ``mode="overwrite"``: Ray Data refuses names without the write's uuid in append mode."""
    from ray.data.datasource import FilenameProvider

    class PartFiles(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}-{{i}}.parquet"

    return PartFiles(file_format="parquet")


def _staged_files(fs: pafs.FileSystem, folder: str) -> tuple[list[dict[str, Any]], int, int]:
    """``([{path, rows}], model rows, popular rows)`` of the data files in ``folder``, read back."""
    selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
    names = sorted(info.base_name for info in fs.get_file_info(selector)
                   if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                   and not info.base_name.startswith(("_", ".")))
    files, model_rows, popular_rows = [], 0, 0
    for name in names:
        source = pq.read_table(posixpath.join(folder, name), filesystem=fs, columns=["source"]).column("source")
        counts = {row["values"]: row["counts"] for row in pc.value_counts(source).to_pylist()}
        model_rows += counts.get(SOURCE_MODEL, 0)
        popular_rows += counts.get(SOURCE_POPULAR, 0)
        files.append({"path": name, "rows": len(source)})
    return files, model_rows, popular_rows


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _replace_folder(fs: pafs.FileSystem, staging: str, target: str, replaced: str) -> None:
    """Put the staged output (summary included) in place of ``target``; see the module docstring."""
    if isinstance(fs, pafs.LocalFileSystem):
        if fs.get_file_info(target).type != pafs.FileType.NotFound:
            fs.move(target, replaced)
        fs.move(staging, target)
        _delete_dir(fs, replaced)
        return
    # Object stores: no rename. The target is incomplete (no summary) from the first delete on.
    fs.delete_dir_contents(target, missing_dir_ok=True)
    selector = pafs.FileSelector(staging, allow_not_found=True, recursive=False)
    names = sorted(i.base_name for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)
    for name in sorted(names, key=lambda n: n == SUMMARY_FILE):  # the summary last
        fs.copy_file(posixpath.join(staging, name), posixpath.join(target, name))
    _delete_dir(fs, staging)


__all__ = [
    "RECS_SCHEMA", "SUMMARY_FILE", "MissingInputError", "NoPromotedModelError", "PopularList",
    "RegistryLocation", "ScoreError", "ScoreSummary", "UserScorer", "default_generated_at",
    "default_rows_per_block",
    "load_scoring_model", "output_folder", "version_config", "read_popular", "read_summary", "recommend_batch",
    "resolve_version", "score", "user_vectors", "utc",
]
