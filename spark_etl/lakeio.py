"""Small file operations through Spark's own Hadoop filesystem (file:// locally, s3:// via EMRFS on EMR).

The jobs read and write their run summaries with these, so they need no AWS credentials or libraries
beyond what Spark already has on the cluster.
"""

from __future__ import annotations

import uuid
from typing import Any

from pyspark.sql import SparkSession


def _fs_path(spark: SparkSession, uri: str) -> tuple[Any, Any]:
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), path


def exists(spark: SparkSession, uri: str) -> bool:
    fs, path = _fs_path(spark, uri)
    return bool(fs.exists(path))


def existing(spark: SparkSession, uris: list[str]) -> list[str]:
    return [uri for uri in uris if exists(spark, uri)]


def read_text(spark: SparkSession, uri: str) -> str | None:
    """The file's text, or None when it does not exist."""
    fs, path = _fs_path(spark, uri)
    if not fs.exists(path):
        return None
    stream = fs.open(path)
    try:
        return str(spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
    finally:
        stream.close()


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a torn one.

    S3 objects appear whole when the upload completes; elsewhere write a temporary sibling and rename.
    """
    fs, path = _fs_path(spark, uri)
    direct = uri.startswith(("s3://", "s3a://"))
    jvm = spark.sparkContext._jvm
    target = path if direct else jvm.org.apache.hadoop.fs.Path(path.getParent(), f".{path.getName()}.{uuid.uuid4().hex}")
    out = fs.create(target, True)
    try:
        out.write(bytearray(text.encode("utf-8")))
    finally:
        out.close()
    if not direct:
        fs.delete(path, False)
        if not fs.rename(target, path):
            raise OSError(f"could not rename {target} to {uri}")


def delete(spark: SparkSession, uri: str) -> None:
    fs, path = _fs_path(spark, uri)
    fs.delete(path, True)
