"""The data lake layout, in one place.

Every dataset is keyed by region and date with Hive-style partition folders, so Spark, pyarrow and
Athena/Redshift Spectrum all read them without configuration::

    {root}/raw/region=us-east-1/dt=2026-11-26/hour=08/{shard}-{first_seq}-{last_seq}.parquet
    {root}/dead_letter/region=.../dt=.../hour=.../{shard}-{first_seq}-{last_seq}.parquet
    {root}/clean/region=.../dt=.../            features/region=.../dt=.../{table}/
    {root}/keys/region=.../dt=.../{popular,items,users}/   (key data points for the online store)
    {root}/models/region=.../{version}/        recs/region=.../dt=.../
    {root}/sync/region=.../dt=.../             (the sync step's per-file checkpoints)
    {root}/runs/region=.../dt=.../{run_id}/{stage}.json   (each pipeline stage's result, written last)

The root is ``file:///abs/path`` locally or ``s3://bucket/prefix`` in AWS. Path helpers are pure;
:func:`filesystem` and :func:`write_parquet_atomic` are the only I/O here.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

Dataset = Literal["raw", "dead_letter", "clean", "features", "keys", "models", "recs", "sync", "runs"]
DATASETS: tuple[str, ...] = ("raw", "dead_letter", "clean", "features", "keys", "models", "recs", "sync", "runs")


def validate_lake_uri(uri: str) -> str:
    """Check a lake root: ``file:///absolute/path`` or ``s3://bucket[/prefix]``; return it without a
    trailing slash. ``file://lake`` would silently mean the filesystem root, so a host is refused."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"a file:// lake URI needs an absolute path (file:///abs/path), got {uri!r}")
    elif parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"an s3:// lake URI needs a bucket (s3://bucket/prefix), got {uri!r}")
    else:
        raise ValueError(f"lake URI must be file:// or s3://, got {uri!r}")
    return uri.rstrip("/") if parsed.path not in ("", "/") else uri


def _dt(day: date | datetime | str) -> str:
    if isinstance(day, str):
        return date.fromisoformat(day).isoformat()  # validates the spelling
    if isinstance(day, datetime):
        return day.date().isoformat()
    return day.isoformat()


@dataclass(frozen=True)
class LakeLayout:
    """Paths of one lake root. ``base`` is the filesystem path (no scheme) that pyarrow expects."""

    uri: str

    def __post_init__(self) -> None:
        validate_lake_uri(self.uri)

    @property
    def scheme(self) -> str:
        return urlparse(self.uri).scheme

    @property
    def base(self) -> str:
        parsed = urlparse(self.uri)
        if parsed.scheme == "file":
            return parsed.path.rstrip("/") or "/"
        return f"{parsed.netloc}{parsed.path}".rstrip("/")

    def dataset(self, name: Dataset) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
        return posixpath.join(self.base, name)

    def region_root(self, name: Dataset, region: str) -> str:
        """All of one region's partitions of a dataset (what a reader of every date opens)."""
        return posixpath.join(self.dataset(name), f"region={region}")

    def partition(self, name: Dataset, region: str, day: date | datetime | str, hour: int | None = None) -> str:
        parts = [self.region_root(name, region), f"dt={_dt(day)}"]
        if hour is not None:
            if not 0 <= hour <= 23:
                raise ValueError(f"hour must be 0..23, got {hour}")
            parts.append(f"hour={hour:02d}")
        return posixpath.join(*parts)

    def models(self, region: str) -> str:
        return self.region_root("models", region)

    def to_uri(self, path: str) -> str:
        """Turn a filesystem path back into a URI (for Spark, logs and manifests)."""
        return f"{self.scheme}://{path}" if self.scheme == "s3" else f"file://{path}"


def batch_file_name(shard_id: str, first_seq: str, last_seq: str, suffix: str = "parquet") -> str:
    """Deterministic name of the file holding one shard's records first_seq..last_seq.

    A replay of the same range after a crash produces the same name, so it overwrites rather than
    duplicates.
    """
    return f"{shard_id}-{first_seq}-{last_seq}.{suffix}"


def filesystem(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
               access_key: str | None = None, secret_key: str | None = None) -> pafs.FileSystem:
    """A pyarrow filesystem for a lake URI.

    pyarrow does not read AWS_ENDPOINT_URL, so the endpoint (moto locally) is passed explicitly.
    """
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return pafs.LocalFileSystem()
    if scheme == "s3":
        kwargs: dict[str, object] = {}
        if endpoint_url:
            parsed = urlparse(endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme or "http"
        if region:
            kwargs["region"] = region
        if access_key and secret_key:
            kwargs["access_key"] = access_key
            kwargs["secret_key"] = secret_key
        # A small object is one PUT (atomic, nothing left behind on a crash) instead of a 3-request
        # multipart upload whose abandoned parts cost storage until a lifecycle rule aborts them.
        return pafs.S3FileSystem(allow_delayed_open=True, **kwargs)
    raise ValueError(f"lake URI must be file:// or s3://, got {uri!r}")


def write_parquet_atomic(fs: pafs.FileSystem, table: pa.Table, path: str, *,
                         row_group_size: int | None = None, use_dictionary: bool | list[str] = True) -> None:
    """Write ``table`` so that readers see either no file or the whole file.

    Locally: write a hidden temporary file in the same folder, then rename (atomic on POSIX). On S3 the
    object becomes visible only when the single PUT or multipart upload completes on close, so it is
    written in place.
    """
    directory = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(directory, recursive=True)  # S3 has no folders: no empty "dir/" marker objects there
        tmp = posixpath.join(directory, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            pq.write_table(table, tmp, filesystem=fs, compression="snappy", row_group_size=row_group_size,
                           use_dictionary=use_dictionary)
            fs.move(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        pq.write_table(table, path, filesystem=fs, compression="snappy", row_group_size=row_group_size,
                       use_dictionary=use_dictionary)
