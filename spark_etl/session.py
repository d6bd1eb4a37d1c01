"""Spark settings in one place: the conf every job runs with, locally and on EMR on EKS.

Locally the session is ``local[2]`` sized for a 2-core laptop or CI box; on EMR on EKS the cluster
sizing comes from the job submission (spark_etl/emr.py) and only :func:`job_conf` applies.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pyspark.sql import SparkSession

from streamrec.settings import SparkSettings


def job_conf(spark: SparkSettings) -> dict[str, str]:
    """Properties the jobs' correctness depends on: they hold on every cluster."""
    conf = {
        # Event times are UTC instants; the day boundaries of dt partitions are UTC days.
        "spark.sql.session.timeZone": "UTC",
        # Rerunning one day replaces only that day's partition of a partitioned dataset.
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        # dt and hour stay strings ("2026-11-26", "08"), the spelling of the folder names.
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
        # INT64 microseconds instead of legacy INT96, so pyarrow, Ray Data and Redshift read them as is.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.parquet.compression.codec": "snappy",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
    }
    conf.update(spark.conf)
    return conf


def local_conf(spark: SparkSettings) -> dict[str, str]:
    """Extra properties for an in-process local session (laptop, CI, `make demo`)."""
    return {
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.driver.memory": spark.driver_memory,
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={LOG4J_CONFIG.as_uri()}",
        # On a cluster the default (200) with adaptive coalescing fits; two local cores want a handful.
        "spark.sql.shuffle.partitions": str(spark.shuffle_partitions),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        **job_conf(spark),
    }


LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")


def local_session(spark: SparkSettings, app_name: str = "streamrec-etl") -> SparkSession:
    """The in-process session used by ``streamrec etl run`` and the tests (about 4 s to start)."""
    # The driver binds to loopback anyway; saying so keeps Spark from warning about the hostname.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # PySpark warns about pandas 3 on import; the jobs do not use pandas conversions.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    builder = SparkSession.builder.master(spark.master).appName(app_name)
    for key, value in local_conf(spark).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def apply_job_conf(session: SparkSession, spark: SparkSettings) -> None:
    """On a cluster session (EMR), set the runtime-settable properties the jobs depend on."""
    for key, value in job_conf(spark).items():
        session.conf.set(key, value)
