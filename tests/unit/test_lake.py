"""The lake layout (streamrec.lake): paths for file:// and s3:// roots, partition bounds, file names, and
atomic Parquet writes on the local filesystem."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from streamrec.lake import DATASETS, LakeLayout, batch_file_name, filesystem, write_parquet_atomic

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "scheme", "base"),
    [
        ("file:///tmp/lake", "file", "/tmp/lake"),
        ("file:///tmp/lake/", "file", "/tmp/lake"),
        ("file:///", "file", "/"),
        ("s3://bucket", "s3", "bucket"),
        ("s3://bucket/prefix", "s3", "bucket/prefix"),
        ("s3://bucket/a/b/", "s3", "bucket/a/b"),
    ],
)
def test_base_and_scheme(uri: str, scheme: str, base: str) -> None:
    layout = LakeLayout(uri)
    assert layout.scheme == scheme
    assert layout.base == base


@pytest.mark.parametrize(
    ("uri", "dataset", "region", "day", "hour", "expected"),
    [
        (
            "file:///data/lake",
            "raw",
            "us-east-1",
            "2026-11-26",
            8,
            "/data/lake/raw/region=us-east-1/dt=2026-11-26/hour=08",
        ),
        (
            "file:///data/lake",
            "dead_letter",
            "eu-west-1",
            date(2026, 1, 2),
            0,
            "/data/lake/dead_letter/region=eu-west-1/dt=2026-01-02/hour=00",
        ),
        (
            "file:///data/lake",
            "clean",
            "us-east-1",
            datetime(2026, 12, 31, 23, 59, tzinfo=UTC),
            None,
            "/data/lake/clean/region=us-east-1/dt=2026-12-31",
        ),
        (
            "s3://bucket/prefix",
            "raw",
            "us-east-1",
            "2026-11-26",
            23,
            "bucket/prefix/raw/region=us-east-1/dt=2026-11-26/hour=23",
        ),
        (
            "s3://bucket",
            "recs",
            "ap-southeast-2",
            date(2026, 2, 28),
            None,
            "bucket/recs/region=ap-southeast-2/dt=2026-02-28",
        ),
    ],
)
def test_partition_paths(
    uri: str, dataset: str, region: str, day: object, hour: int | None, expected: str
) -> None:
    assert LakeLayout(uri).partition(dataset, region, day, hour) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("hour", [0, 23])
def test_hour_bounds_accepted(hour: int) -> None:
    assert (
        LakeLayout("file:///l").partition("raw", "us-east-1", "2026-11-26", hour).endswith(f"hour={hour:02d}")
    )


@pytest.mark.parametrize("hour", [-1, 24, 100])
def test_hour_out_of_bounds_rejected(hour: int) -> None:
    with pytest.raises(ValueError, match="hour must be 0..23"):
        LakeLayout("file:///l").partition("raw", "us-east-1", "2026-11-26", hour)


@pytest.mark.parametrize("day", ["2026-13-01", "2026-02-30", "26-11-2026", "yesterday"])
def test_bad_day_spelling_rejected(day: str) -> None:
    with pytest.raises(ValueError):
        LakeLayout("file:///l").partition("raw", "us-east-1", day, 1)


def test_unknown_dataset_rejected() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        LakeLayout("file:///l").dataset("bronze")  # type: ignore[arg-type]
    assert [LakeLayout("s3://b").dataset(d) for d in DATASETS] == [f"b/{d}" for d in DATASETS]


@pytest.mark.parametrize(
    "uri", ["http://bucket/x", "gs://bucket/x", "/abs/path", "relative/path", "s3a://bucket/x", ""]
)
def test_bad_scheme_rejected(uri: str) -> None:
    with pytest.raises(ValueError, match="file:// or s3://"):
        LakeLayout(uri)
    with pytest.raises(ValueError, match="file:// or s3://"):
        filesystem(uri)


@pytest.mark.parametrize("uri", [
    "file://lake", "file://relative/lake", "file:relative", "s3:///prefix", "s3://",
])
def test_lake_root_without_absolute_path_or_bucket_is_rejected(uri: str) -> None:
    """``file://lake`` (two slashes: a host, not a path) once meant the filesystem root '/', so a typo
    sent the lake there; an s3:// URI without a bucket is just as wrong."""
    with pytest.raises(ValueError):
        LakeLayout(uri)


def test_file_uri_on_localhost_is_a_local_path() -> None:
    assert LakeLayout("file://localhost/tmp/lake").base == "/tmp/lake"


@pytest.mark.parametrize("uri", ["file:///tmp/lake", "s3://bucket/prefix"])
def test_to_uri_round_trips(uri: str) -> None:
    layout = LakeLayout(uri)
    path = layout.partition("raw", "us-east-1", "2026-11-26", 8)
    back = layout.to_uri(path)
    assert back == f"{uri}/raw/region=us-east-1/dt=2026-11-26/hour=08"
    assert LakeLayout(back).base == path


def test_models_and_region_root() -> None:
    layout = LakeLayout("s3://b/p")
    assert layout.models("us-east-1") == "b/p/models/region=us-east-1"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("shardId-000000000001", "4960", "4970"), "shardId-000000000001-4960-4970.parquet"),
        (("shardId-000000000001", "4960", "4960", "json"), "shardId-000000000001-4960-4960.json"),
    ],
)
def test_batch_file_name_is_deterministic(args: tuple[str, ...], expected: str) -> None:
    assert batch_file_name(*args) == expected
    assert batch_file_name(*args) == batch_file_name(*args)


def test_batch_file_names_differ_per_range() -> None:
    names = {batch_file_name("s", a, b) for a, b in [("1", "2"), ("1", "3"), ("2", "3")]}
    assert len(names) == 3


def test_filesystem_kinds() -> None:
    assert isinstance(filesystem("file:///tmp/x"), pafs.LocalFileSystem)
    fs = filesystem(
        "s3://bucket/x",
        endpoint_url="http://127.0.0.1:1",
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
    )
    assert isinstance(fs, pafs.S3FileSystem)
    assert fs.region == "us-east-1"


# ---------------------------------------------------------------------------------------------------
# write_parquet_atomic on the local filesystem


def _table(n: int, tag: str = "a") -> pa.Table:
    return pa.table({"k": pa.array(range(n), pa.int64()), "tag": pa.array([tag] * n, pa.string())})


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_write_creates_partition_dirs_and_leaves_no_temp_files(tmp_path: Path) -> None:
    layout = LakeLayout(f"file://{tmp_path}")
    path = os.path.join(
        layout.partition("raw", "us-east-1", "2026-11-26", 8), batch_file_name("s-1", "1", "9")
    )
    write_parquet_atomic(pafs.LocalFileSystem(), _table(10), path)
    assert _all_files(tmp_path) == ["raw/region=us-east-1/dt=2026-11-26/hour=08/s-1-1-9.parquet"]
    assert pq.read_table(path).to_pydict() == _table(10).to_pydict()


def test_write_overwrites_the_same_name(tmp_path: Path) -> None:
    path = str(tmp_path / "d" / "f.parquet")
    fs = pafs.LocalFileSystem()
    write_parquet_atomic(fs, _table(5, "first"), path)
    write_parquet_atomic(fs, _table(3, "second"), path)
    assert _all_files(tmp_path) == ["d/f.parquet"]
    assert pq.read_table(path).column("tag").to_pylist() == ["second"] * 3


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_file(tmp_path: Path) -> None:
    fs = pafs.LocalFileSystem()
    good = str(tmp_path / "d" / "f.parquet")
    write_parquet_atomic(fs, _table(2), good)
    # The target is an existing non-empty directory: the final rename fails after the temp file is written.
    blocked = tmp_path / "d" / "blocked.parquet"
    blocked.mkdir()
    (blocked / "keep").write_text("x")
    with pytest.raises(OSError):
        write_parquet_atomic(fs, _table(4), str(blocked))
    assert _all_files(tmp_path) == ["d/blocked.parquet/keep", "d/f.parquet"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert pq.read_table(good).num_rows == 2


def test_hive_partitions_read_back_with_pyarrow_dataset(tmp_path: Path) -> None:
    import pyarrow.dataset as ds

    layout = LakeLayout(f"file://{tmp_path}")
    fs = pafs.LocalFileSystem()
    for hour, n in ((7, 3), (8, 4)):
        path = os.path.join(layout.partition("raw", "us-east-1", "2026-11-26", hour), f"s-{hour}.parquet")
        write_parquet_atomic(fs, _table(n), path)
    table = ds.dataset(layout.dataset("raw"), format="parquet", partitioning="hive").to_table()
    counts = {h: 0 for h in (7, 8)}
    for hour in table.column("hour").to_pylist():
        counts[int(hour)] += 1
    assert counts == {7: 3, 8: 4}
    assert set(table.column("region").to_pylist()) == {"us-east-1"}
