"""The raw files a clean run reads, and the schema contract checked file by file from Parquet footers.

A merged schema hides drift: a file without a nullable column merges silently (its rows read as null)
and two files with different types fail deep inside Spark. Reading each footer (a few KB, in parallel)
names the file and the column instead. pyarrow reaches the lake itself: ``file://`` locally, ``s3://``
with the pod's credentials on EMR (the jobs' image has pyarrow; see spark_etl/emr.py).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Footer reads are latency-bound on S3; locally they cost a fraction of a millisecond each.
_FOOTER_THREADS = 16


def window_files(fs: pafs.FileSystem, region_root: str, hours: Iterable[tuple[str, str]]) -> list[str]:
    """Visible Parquet files under ``region_root/dt=D/hour=HH`` for the given (dt, hour) partitions."""
    files: list[str] = []
    for dt, hour in hours:
        folder = posixpath.join(region_root, f"dt={dt}", f"hour={hour}")
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
        files += sorted(info.path for info in fs.get_file_info(selector)
                        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
                        and not info.base_name.startswith((".", "_")))
    return files


def arrow_type_name(dtype: pa.DataType) -> str:
    """The Spark SQL name of an Arrow type as Spark reads it from Parquet (``schemas.describe`` spelling)."""
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    if pa.types.is_timestamp(dtype):
        return "timestamp" if dtype.tz else "timestamp_ntz"
    if pa.types.is_dictionary(dtype):
        return arrow_type_name(dtype.value_type)
    names = {pa.float64(): "double", pa.float32(): "float", pa.int64(): "bigint", pa.int32(): "int",
             pa.int16(): "smallint", pa.int8(): "tinyint", pa.bool_(): "boolean", pa.binary(): "binary",
             pa.date32(): "date"}
    return names.get(dtype, str(dtype))


def schema_problems(schema: pa.Schema, contract: dict[str, str]) -> list[str]:
    """Differences between one file's schema and the contract (column → Spark type name)."""
    have = {f.name: arrow_type_name(f.type) for f in schema}
    problems = [f"missing column {name} ({kind})" for name, kind in contract.items() if name not in have]
    problems += [f"column {name} is {have[name]}, expected {kind}"
                 for name, kind in contract.items() if name in have and have[name] != kind]
    problems += [f"unexpected column {name} ({kind})" for name, kind in have.items() if name not in contract]
    return problems


def drifted_files(fs: pafs.FileSystem, paths: list[str], contract: dict[str, str]) -> dict[str, list[str]]:
    """path → problems, for every file whose footer schema differs from the contract."""
    def check(path: str) -> tuple[str, list[str]]:
        return path, schema_problems(pq.read_schema(path, filesystem=fs), contract)

    with ThreadPoolExecutor(max_workers=_FOOTER_THREADS) as pool:
        return {path: problems for path, problems in pool.map(check, paths) if problems}
