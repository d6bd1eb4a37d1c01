"""The model registry: immutable model versions in the lake, and one promoted pointer per region.

Layout under ``LakeLayout(uri).models(region)`` (``file://`` or ``s3://``, through ``pyarrow.fs``)::

    models/region=R/
      <version>/user_tower.pt              weights (opaque bytes: this module never imports torch)
      <version>/config.json                model config
      <version>/item_embeddings.parquet    item_id string, embedding fixed_size_list<float32>[D]
      <version>/index/index.faiss          the ANN index (see ray_apps.ann), item_ids.parquet, meta.json
      <version>/manifest.json              written LAST: a version exists only once this file does
      promoted.json                        {version, promoted_at, previous, decision}, replaced whole

Why readers never see half a version: every file is written whole (temporary file + rename locally; on
S3 an object appears only when its upload completes: one PUT, or the completion of a multipart upload
when the pyarrow filesystem was opened without ``allow_delayed_open``), the manifest is written after
every other file and lists their sizes and sha256, and readers ignore a folder without a manifest.
``promote`` refuses a version without a manifest and replaces the pointer in one rename / one upload,
so the pointer only ever names a complete version. Loads verify each file against the manifest.

Version names. ``publish(None, ...)`` names a version ``v<data end yyyymmdd>-<12 hex of the content
hash>``; the hash covers every file's sha256 and every manifest field except ``created_at``. The name
is therefore a function of the content: a rerun of a crashed publish with the same content gets the same
name and completes the folder the crash left; a retrained model that came out different gets a new name
instead of colliding. A caller may pass its own name (e.g. the PipelineRun's deterministic child name);
then the same-name-different-content case is refused.

Immutability. Publishing a version whose manifest already exists is accepted only when the manifest it
would write is byte-for-byte the stored one (``created_at`` is kept from the first publication, so an
idempotent rerun is a no-op); anything else raises :class:`VersionExistsError`. A folder without a
manifest is an unfinished publish: it is invisible (``incomplete_versions`` lists it for clean-up) and a
rerun overwrites it. One writer per version name is assumed (deterministic names make that natural).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_apps.ann import INDEX_FILES, RECALL_K, AnnIndex, measure_recall, recall_queries, write_bytes_atomic
from streamrec.lake import LakeLayout, filesystem

if TYPE_CHECKING:
    from streamrec.settings import Settings

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
POINTER = "promoted.json"
USER_TOWER = "user_tower.pt"
CONFIG = "config.json"
EMBEDDINGS = "item_embeddings.parquet"
INDEX_DIR = "index"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Re-reads of a torn pointer read (see ModelRegistry.promotion) before it is reported as corrupt.
_POINTER_READ_ATTEMPTS = 20
# Queries used to measure the ANN's recall when the caller did not measure it.
RECALL_QUERIES = 1_000

FileHook = Callable[[str], None]


class RegistryError(Exception):
    """Base of the registry's errors; the message is one line meant for an operator."""


class VersionNotFoundError(RegistryError, LookupError):
    """No published version (no manifest) by that name."""


class VersionExistsError(RegistryError):
    """A published version of that name holds different content; versions are immutable."""


class IntegrityError(RegistryError):
    """Stored bytes do not match what the manifest (or pointer) says."""


@dataclass(frozen=True)
class ModelVersion:
    """One published version, as its manifest describes it."""

    version: str
    region: str
    uri: str
    manifest: Mapping[str, Any] = field(repr=False)

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.manifest["created_at"])

    @property
    def data_window(self) -> tuple[date, date]:
        window = self.manifest["data_window"]
        return date.fromisoformat(window["start"]), date.fromisoformat(window["end"])

    @property
    def metrics(self) -> Mapping[str, Any]:
        return self.manifest["metrics"]

    @property
    def gate(self) -> Mapping[str, Any]:
        return self.manifest["gate"]

    @property
    def code_version(self) -> str:
        return str(self.manifest["code_version"])

    @property
    def index_info(self) -> Mapping[str, Any]:
        return self.manifest["index"]

    @property
    def recall_at_100(self) -> float:
        return float(self.manifest["index"]["recall_at_100"])

    @property
    def files(self) -> dict[str, Mapping[str, Any]]:
        """Relative path -> ``{"path", "bytes", "sha256"}``."""
        return {entry["path"]: entry for entry in self.manifest["files"]}


@dataclass(frozen=True)
class Promotion:
    """The content of the promoted pointer."""

    version: str
    promoted_at: datetime
    previous: str | None
    decision: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "promoted_at": _iso(self.promoted_at), "previous": self.previous,
                "decision": dict(self.decision)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Promotion:
        return cls(version=str(data["version"]), promoted_at=datetime.fromisoformat(data["promoted_at"]),
                   previous=data.get("previous"), decision=data.get("decision") or {})


def embeddings_table(item_ids: Sequence[str] | np.ndarray, embeddings: np.ndarray) -> pa.Table:
    """``item_id`` string + ``embedding`` fixed_size_list<float32>[D]: the item_embeddings.parquet schema."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(item_ids):
        raise ValueError(f"embeddings must be [{len(item_ids)}, D], got shape {x.shape}")
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.float32()), x.shape[1])
    return pa.table({"item_id": pa.array(list(item_ids), type=pa.string()), "embedding": vectors})


def embeddings_matrix(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(item_ids object array, float32 [N, D])`` from an item-embeddings table."""
    table = _normalise_embeddings_table(table)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    ids = table.column("item_id").to_numpy(zero_copy_only=False).astype(object)
    return ids, flat.reshape(len(table), dim)


@functools.lru_cache(maxsize=1)
def current_code_version() -> str:
    """What code built a model: ``STREAMREC_CODE_VERSION`` (set in images, which carry no .git), else
    ``git:<sha>`` (``-dirty`` with uncommitted changes), else ``streamrec-<package version>``."""
    if os.environ.get("STREAMREC_CODE_VERSION"):
        return os.environ["STREAMREC_CODE_VERSION"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return f"git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"streamrec-{metadata.version('streamrec')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def version_name(data_end: date | str, content_sha256: str) -> str:
    """The content-derived name ``v<yyyymmdd>-<12 hex>`` (see the module docstring)."""
    end = date.fromisoformat(data_end) if isinstance(data_end, str) else data_end
    return f"v{end:%Y%m%d}-{content_sha256[:12]}"


class ModelRegistry:
    """Model versions of one region of one lake."""

    def __init__(self, lake_uri: str, region: str, fs: pafs.FileSystem | None = None, *,
                 endpoint_url: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, s3_region: str | None = None) -> None:
        """``fs`` wins; otherwise one is made for ``lake_uri`` (the S3 arguments matter for s3:// only;
        pyarrow does not read AWS_ENDPOINT_URL, so moto's endpoint must be passed)."""
        self.layout = LakeLayout(lake_uri)
        self.region = region
        self.fs = fs or filesystem(lake_uri, endpoint_url=endpoint_url, region=s3_region or region,
                                   access_key=access_key, secret_key=secret_key)
        self.root = self.layout.models(region)

    @classmethod
    def from_settings(cls, settings: Settings, region: str) -> ModelRegistry:
        aws = settings.aws
        return cls(settings.region(region).lake_uri, region, endpoint_url=aws.endpoint_url,
                   access_key=aws.access_key_id, secret_key=aws.secret_access_key)

    # ---------------------------------------------------------------- reading

    def get(self, version: str) -> ModelVersion:
        """The published version ``version``; :class:`VersionNotFoundError` when it has no manifest."""
        _check_name(version)
        raw = self._read(self._path(version, MANIFEST))
        if raw is None:
            raise VersionNotFoundError(f"model version {version!r} is not published in region {self.region} "
                                       f"(no {MANIFEST} under {self.layout.to_uri(self._path(version))})")
        return self._version_from_manifest(version, raw)

    def list_versions(self) -> list[ModelVersion]:
        """Published versions, oldest first (by created_at, then name). Unfinished folders are skipped."""
        out = []
        for name in self._version_folders():
            raw = self._read(self._path(name, MANIFEST))
            if raw is not None:
                out.append(self._version_from_manifest(name, raw))
        return sorted(out, key=lambda v: (v.created_at, v.version))

    def incomplete_versions(self) -> list[str]:
        """Folders a publish started but never finished (no manifest): safe to delete, or to rerun."""
        return [name for name in self._version_folders()
                if self.fs.get_file_info(self._path(name, MANIFEST)).type == pafs.FileType.NotFound]

    def promotion(self) -> Promotion | None:
        """The promoted pointer as stored, or None before the first promotion.

        The pointer is the one object that is overwritten, and pyarrow reads an S3 object with a HEAD
        (size) then a ranged GET: a switch between the two yields the new object cut to the old size, or
        padded with NULs to it (seen against moto). Such a torn read is never valid JSON, so it is read
        again; the next HEAD sees the new object.
        """
        path = posixpath.join(self.root, POINTER)
        for _ in range(_POINTER_READ_ATTEMPTS):
            raw = self._read(path)
            if raw is None:
                return None
            try:
                return Promotion.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError):  # torn (JSONDecodeError is a ValueError)
                continue
        raise IntegrityError(f"{self.layout.to_uri(path)} is not a valid pointer "
                             f"(unreadable {_POINTER_READ_ATTEMPTS} times in a row)")

    def promoted(self) -> ModelVersion | None:
        """The promoted version, or None before the first promotion."""
        pointer = self.promotion()
        if pointer is None:
            return None
        try:
            return self.get(pointer.version)
        except VersionNotFoundError:  # promote() never allows this; someone edited the lake by hand
            raise IntegrityError(f"{POINTER} in region {self.region} names {pointer.version!r}, "
                                 f"which has no manifest") from None

    def load_user_tower(self, version: str | ModelVersion) -> bytes:
        return self._read_verified(self._resolve(version), USER_TOWER)

    def load_config(self, version: str | ModelVersion) -> dict[str, Any]:
        return json.loads(self._read_verified(self._resolve(version), CONFIG))

    def load_item_embeddings(self, version: str | ModelVersion) -> pa.Table:
        """The item embeddings (checksum-verified) as ``item_id``, ``embedding`` fixed_size_list<float32>."""
        data = self._read_verified(self._resolve(version), EMBEDDINGS)
        return pq.read_table(pa.BufferReader(data))

    def load_index(self, version: str | ModelVersion) -> AnnIndex:
        """The ANN index (checksum-verified)."""
        mv = self._resolve(version)
        files = {name: self._read_verified(mv, f"{INDEX_DIR}/{name}") for name in INDEX_FILES}
        return AnnIndex.from_files(files)

    # ---------------------------------------------------------------- writing

    def publish(self, version: str | None, *, user_tower: bytes, config: Mapping[str, Any],
                item_embeddings: pa.Table, index: AnnIndex, data_window: tuple[date | str, date | str],
                metrics: Mapping[str, Any], gate: Mapping[str, Any], recall_at_100: float | None = None,
                code_version: str | None = None, created_at: datetime | None = None,
                on_file_written: FileHook | None = None) -> ModelVersion:
        """Write a version (files first, manifest last) and return it.

        ``version`` None derives the name from the content (see the module docstring). ``recall_at_100``
        None measures the index against exact search on ``item_embeddings`` now (1.0 for an exact index).
        ``on_file_written(relative_path)`` runs after each file lands, manifest included (progress logs;
        tests use it to simulate a crash). An identical rerun of a published version returns it untouched.
        """
        table = _normalise_embeddings_table(item_embeddings)
        _check_index_matches(table, index)
        files = self._serialise(user_tower, config, table, index)
        body = self._manifest_body(files, data_window=data_window, metrics=metrics, gate=gate, index=index,
                                   table=table, recall_at_100=recall_at_100,
                                   code_version=code_version or current_code_version())
        content = _sha256(_canonical({k: v for k, v in body.items() if k != "version"}))
        name = version if version is not None else version_name(body["data_window"]["end"], content)
        _check_name(name)
        body["version"] = name
        body["content_sha256"] = content

        existing = self._read(self._path(name, MANIFEST))
        if existing is not None:
            return self._confirm_identical(name, body, existing)
        body["created_at"] = _iso(created_at or _now())
        for rel, data in files.items():
            write_bytes_atomic(self.fs, self._path(name, rel), data)
            if on_file_written:
                on_file_written(rel)
        manifest = _canonical(body)
        write_bytes_atomic(self.fs, self._path(name, MANIFEST), manifest)  # last: the version now exists
        if on_file_written:
            on_file_written(MANIFEST)
        return self._version_from_manifest(name, manifest)

    def promote(self, version: str, decision: Mapping[str, Any]) -> Promotion:
        """Point the region at ``version`` (which must be published), recording why and what it replaced.

        Promoting the version that is already promoted changes nothing (an idempotent retry)."""
        target = self.get(version)  # raises for an unfinished version: the pointer never names one
        current = self.promotion()
        if current is not None and current.version == target.version:
            return current
        record = Promotion(version=target.version, promoted_at=_now(),
                           previous=current.version if current else None, decision=dict(decision))
        write_bytes_atomic(self.fs, posixpath.join(self.root, POINTER), _canonical(record.to_json()))
        return record

    # ---------------------------------------------------------------- internals

    def _path(self, version: str, rel: str = "") -> str:
        return posixpath.join(self.root, version, rel) if rel else posixpath.join(self.root, version)

    def _resolve(self, version: str | ModelVersion) -> ModelVersion:
        return version if isinstance(version, ModelVersion) else self.get(version)

    def _read(self, path: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def _read_verified(self, mv: ModelVersion, rel: str) -> bytes:
        entry = mv.files.get(rel)
        if entry is None:
            raise IntegrityError(f"model version {mv.version!r} lists no file {rel!r}")
        data = self._read(self._path(mv.version, rel))
        if data is None or len(data) != entry["bytes"] or _sha256(data) != entry["sha256"]:
            state = "is missing" if data is None else "does not match its manifest checksum"
            raise IntegrityError(f"{self.layout.to_uri(self._path(mv.version, rel))} {state}")
        return data

    def _version_folders(self) -> list[str]:
        selector = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory and VERSION_RE.match(info.base_name))

    def _version_from_manifest(self, name: str, raw: bytes) -> ModelVersion:
        manifest = json.loads(raw)
        if manifest.get("version") != name or manifest.get("region") != self.region:
            raise IntegrityError(f"manifest under {name!r} describes {manifest.get('version')!r} in "
                                 f"{manifest.get('region')!r}, not {name!r} in {self.region!r}")
        return ModelVersion(version=name, region=self.region, uri=self.layout.to_uri(self._path(name)),
                            manifest=manifest)

    def _confirm_identical(self, name: str, body: dict[str, Any], existing: bytes) -> ModelVersion:
        """An already-published version is only "published again" when nothing would change."""
        stored = json.loads(existing)
        body["created_at"] = stored.get("created_at")
        if _canonical(body) == existing:
            return self._version_from_manifest(name, existing)
        changed = sorted(k for k in set(body) | set(stored) if body.get(k) != stored.get(k))
        files = sorted(e["path"] for e in body["files"] if e not in stored.get("files", []))
        detail = ", ".join(changed) + (f" ({', '.join(files)})" if files else "")
        raise VersionExistsError(f"model version {name!r} already exists in region {self.region} with "
                                 f"different content ({detail}); versions are immutable, publish under a "
                                 f"new name")

    @staticmethod
    def _serialise(user_tower: bytes, config: Mapping[str, Any], table: pa.Table,
                   index: AnnIndex) -> dict[str, bytes]:
        """Every file of a version, in write order. Parquet and JSON bytes are deterministic for equal
        input (same library versions), which is what makes content-derived names stable."""
        if not isinstance(user_tower, (bytes, bytearray, memoryview)):
            raise TypeError(f"user_tower must be bytes (e.g. torch.save into a BytesIO), "
                            f"got {type(user_tower).__name__}")
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        files = {USER_TOWER: bytes(user_tower), CONFIG: _canonical(dict(config)), EMBEDDINGS: buf.getvalue()}
        files.update({f"{INDEX_DIR}/{name}": data for name, data in index.to_files().items()})
        return files

    def _manifest_body(self, files: Mapping[str, bytes], *, data_window: tuple[date | str, date | str],
                       metrics: Mapping[str, Any], gate: Mapping[str, Any], index: AnnIndex, table: pa.Table,
                       recall_at_100: float | None, code_version: str) -> dict[str, Any]:
        start, end = (date.fromisoformat(d) if isinstance(d, str) else d for d in data_window)
        if start > end:
            raise ValueError(f"data window starts after it ends: {start} > {end}")
        recall, queries = _recall(index, table, recall_at_100)
        return {
            "schema_version": SCHEMA_VERSION,
            "region": self.region,
            "data_window": {"start": start.isoformat(), "end": end.isoformat()},
            "metrics": dict(metrics),
            "gate": dict(gate),
            "code_version": code_version,
            "index": {**index.info(), "recall_at_100": recall, "recall_queries": queries},
            "files": [{"path": rel, "bytes": len(data), "sha256": _sha256(data)}
                      for rel, data in files.items()],
        }


def _recall(index: AnnIndex, table: pa.Table, given: float | None) -> tuple[float, int | None]:
    """(recall@100, number of queries it was measured on; None when given by the caller or exact)."""
    if given is not None:
        if not 0.0 <= given <= 1.0:
            raise ValueError(f"recall_at_100 must be within [0, 1], got {given}")
        return float(given), None
    if index.kind == "exact":
        return 1.0, None
    ids, x = embeddings_matrix(table)
    if not np.array_equal(ids, index.item_ids):  # align rows with the index's positions
        order = {item: i for i, item in enumerate(ids.tolist())}
        x = x[[order[item] for item in index.item_ids.tolist()]]
    queries = recall_queries(x, RECALL_QUERIES)
    return round(measure_recall(index, x, queries, k=RECALL_K), 6), len(queries)


def _normalise_embeddings_table(table: pa.Table) -> pa.Table:
    """Accept list<float32> or fixed_size_list<float*> embeddings; store fixed_size_list<float32>."""
    missing = {"item_id", "embedding"} - set(table.column_names)
    if missing:
        raise ValueError(f"item embeddings table lacks column(s): {', '.join(sorted(missing))}")
    column = table.column("embedding")
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) == 0 or np.any(lengths != lengths[0]):
            raise ValueError("item embeddings must all have the same length")
        dim = int(lengths[0])
    else:
        raise ValueError(f"embedding column must be a list of floats, got {column.type}")
    target = pa.list_(pa.float32(), dim)
    return pa.table({"item_id": table.column("item_id").cast(pa.string()),
                     "embedding": column.cast(target)})


def _check_index_matches(table: pa.Table, index: AnnIndex) -> None:
    if table.num_rows != len(index) or table.column("embedding").type.list_size != index.dim:
        raise ValueError(f"index ({len(index)} items, dim {index.dim}) does not match the item embeddings "
                         f"({table.num_rows} items, dim {table.column('embedding').type.list_size})")
    ids = table.column("item_id").to_pylist()
    if ids != index.item_ids.tolist() and set(ids) != set(index.item_ids.tolist()):
        raise ValueError("the index and the item embeddings hold different item ids")


def _check_name(version: str) -> None:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ValueError(f"invalid model version name {version!r}: letters, digits, '.', '_', '-' "
                         f"(first a letter or digit), at most 128 characters")


def _canonical(obj: Any) -> bytes:
    """Stable JSON bytes: sorted keys, no NaN (invalid JSON), numpy scalars as Python numbers."""
    return (json.dumps(obj, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False,
                       default=_json_default) + "\n").encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> datetime:
    """Now, to the millisecond, as timestamps are stored (so a returned record equals a re-read one)."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
