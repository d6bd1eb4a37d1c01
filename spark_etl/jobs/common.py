"""What every job shares: where its data lives, schema conformance, Parquet writing, run summaries."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from spark_etl import lakeio
from spark_etl.summary import FAILED_SUMMARY_NAME, SUMMARY_NAME, DataQualityError, RunSummary, previous_outputs
from streamrec.lake import Dataset, LakeLayout
from streamrec.settings import EtlSettings


class MissingInputError(RuntimeError):
    """The input a job needs is not in the lake (e.g. features run before clean for that day)."""


@dataclass(frozen=True)
class JobContext:
    spark: SparkSession
    layout: LakeLayout
    region: str
    day: date
    etl: EtlSettings

    @property
    def dt(self) -> str:
        return self.day.isoformat()

    def root(self, dataset: Dataset) -> str:
        """URI of a dataset's root (what a partitioned write or read of several days opens)."""
        return self.layout.to_uri(self.layout.dataset(dataset))

    def region_root(self, dataset: Dataset) -> str:
        return self.layout.to_uri(self.layout.region_root(dataset, self.region))

    def partition(self, dataset: Dataset, day: date | None = None, *table: str) -> str:
        path = self.layout.partition(dataset, self.region, day or self.day)
        return self.layout.to_uri("/".join([path, *table]))

    def previous(self, dataset: Dataset) -> dict[str, int] | None:
        """Output row counts of the previous day's successful run of the job writing ``dataset``."""
        prior = self.partition(dataset, self.day - timedelta(days=1))
        return previous_outputs(lakeio.read_text(self.spark, f"{prior}/{SUMMARY_NAME}"))


def conform(df: DataFrame, schema: StructType, *extra: str) -> DataFrame:
    """Exactly the contract's columns, in order and with its types (plus partition columns ``extra``)."""
    return df.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields], *extra)


def files_for(rows: int, etl: EtlSettings) -> int:
    return max(1, math.ceil(rows / etl.max_rows_per_file))


def write_parquet(df: DataFrame, uri: str, etl: EtlSettings, *, files: int, cluster_by: list[str],
                  sort_by: list[str], partition_by: list[str] | None = None) -> None:
    """Write Parquet (snappy) with row groups of ``etl.row_group_bytes``: ``files`` files clustered by
    ``cluster_by`` (so readers of one key touch one file) and sorted, which also makes reruns
    produce the same files. With ``partition_by`` only the partitions present in ``df`` are replaced
    (dynamic partition overwrite); without it the folder is replaced."""
    writer = (df.repartition(files, *cluster_by).sortWithinPartitions(*sort_by)
              .write.mode("overwrite").option("parquet.block.size", str(etl.row_group_bytes)))
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.parquet(uri)


def run_with_summary(ctx: JobContext, summary: RunSummary, out_dir: str,
                     body: Callable[[RunSummary], None]) -> RunSummary:
    """Run ``body`` and write its summary next to the output: ``_run_summary.json`` on success, or
    ``_run_summary.failed.json`` on a failed check (the last good output and summary stay)."""
    try:
        body(summary)
    except (DataQualityError, MissingInputError) as exc:
        summary.finish("failed", str(exc))
        lakeio.write_text(ctx.spark, f"{out_dir}/{FAILED_SUMMARY_NAME}", summary.to_json())
        raise
    summary.finish("succeeded")
    lakeio.write_text(ctx.spark, f"{out_dir}/{SUMMARY_NAME}", summary.to_json())
    lakeio.delete(ctx.spark, f"{out_dir}/{FAILED_SUMMARY_NAME}")
    return summary
