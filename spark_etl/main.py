"""The ETL's spark-submit entry point (EMR on EKS StartJobRun's ``entryPoint``).

    spark-submit main.py --job {clean,features,keys,all} --region R --date YYYY-MM-DD
        [--end-date YYYY-MM-DD] --lake-uri s3://bucket/prefix [--etl-json JSON] [--spark-json JSON]

Settings arrive as arguments (``--etl-json`` is :class:`streamrec.settings.EtlSettings`, ``--spark-json``
extra Spark properties), so the job needs no config file on the cluster. Exit status: 0 on success,
2 on a bad argument, 3 on a failed data-quality check or missing input, with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date

from pydantic import ValidationError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from spark_etl.runner import JOB_CHOICES

    parser = argparse.ArgumentParser(prog="spark_etl.main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=JOB_CHOICES, required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--date", type=date.fromisoformat, required=True, help="day (UTC), YYYY-MM-DD")
    parser.add_argument("--end-date", type=date.fromisoformat, help="last day of a backfill range")
    parser.add_argument("--lake-uri", required=True, help="lake root, s3://bucket/prefix or file:///path")
    parser.add_argument("--etl-json", default="{}", help="EtlSettings as JSON")
    parser.add_argument("--spark-json", default="{}", help="extra Spark properties as a JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pyspark.sql import SparkSession

    from spark_etl import runner
    from spark_etl.jobs.common import MissingInputError
    from spark_etl.session import apply_job_conf
    from spark_etl.summary import DataQualityError
    from streamrec.lake import validate_lake_uri
    from streamrec.settings import EtlSettings, SparkSettings

    args = parse_args(argv)
    try:
        etl = EtlSettings.model_validate(json.loads(args.etl_json))
        spark_settings = SparkSettings(conf=json.loads(args.spark_json))
        lake_uri = validate_lake_uri(args.lake_uri)
    except (ValueError, ValidationError) as exc:
        print(f"error: bad argument: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    spark = SparkSession.builder.appName(f"streamrec-etl-{args.job}-{args.region}-{args.date}").getOrCreate()
    apply_job_conf(spark, spark_settings)
    try:
        for summary in runner.run(spark, lake_uri, args.region, args.job, args.date, args.end_date, etl):
            print(json.dumps({"job": summary.job, "region": summary.region, "dt": summary.dt,
                              "status": summary.status, "seconds": summary.seconds, "outputs": summary.outputs,
                              "removed": summary.removed}))
    except (DataQualityError, MissingInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
