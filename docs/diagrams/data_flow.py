"""Data flow of one region: an event from the website to an answer of the API, through the stream, the
lake, the daily pipeline and the online stores; arrows point the way the data moves. Writes
data_flow.png next to this file.

Every store and prefix is the one the code uses: streamrec/lake.py (lake layout), streamrec/online.py
(Redis keys), streamrec/online_store.py and streamrec/tables.py (DynamoDB items), operators/warehouse
(Redshift tables), ray_apps/registry.py (models).
"""

from __future__ import annotations

import _style as s
from diagrams import Cluster, Diagram, Edge
from diagrams.aws.analytics import KinesisDataStreams
from diagrams.aws.database import Dynamodb, ElasticacheForRedis, Redshift
from diagrams.aws.general import Users
from diagrams.aws.storage import S3
from diagrams.k8s.compute import Deploy, Job
from diagrams.onprem.analytics import Spark
from diagrams.programming.framework import Fastapi

NAME = "data_flow"


def build() -> str:
    graph = {**s.GRAPH, "ranksep": "0.8", "nodesep": "0.5"}
    with Diagram("streamrec: data flow of one region (arrows: where the data goes)", filename=s.out(NAME),
                 show=False, direction="LR", outformat="png", graph_attr=graph, node_attr=s.NODE,
                 edge_attr=s.EDGE):
        site = Users("website")
        kinesis = KinesisDataStreams("Kinesis\nJSON events,\nkey = user_id")
        consumer = Deploy("ingest consumer\nvalidate, dedup,\nhash PII")
        raw = S3("raw/, dead_letter/\nby receive hour")

        with Cluster("Spark ETL on EMR on EKS (daily)", graph_attr=s.EKS):
            etl_clean = Spark("clean_events")
            clean = S3("clean/\nby event day")
            etl_features = Spark("build_features\n(30 days)")
            features = S3("features/\nitems, users,\nexamples")
            etl_keys = Spark("export_keys")
            keys = S3("keys/\npopular, items,\nusers")

        with Cluster("Ray on the R5 nodes (daily RayJobs)", graph_attr=s.EKS):
            train = Job("Ray Train on\nexamples: two-tower,\nevaluation gate")
            models = S3("models/<version>/\nweights, ANN index")
            score = Job("Ray Data: score\nevery user of\nfeatures/users")
            recs = S3("recs/\nmodel_version=V/")

        sync = Deploy("sync + promote\n(controller)")

        with Cluster("online stores", graph_attr=s.AWS):
            ddb = Dynamodb("DynamoDB: recs,\nfeatures, pointer")
            redis = ElasticacheForRedis("Redis: ur:, pop:,\nrecs: (answers)")
        warehouse = Redshift("Redshift: clickstream_fact,\nitem_dim, user_dim,\ndaily_recs, pipeline_runs")
        serve = Fastapi("Ray Serve API")
        client = Users("API client")

        site >> Edge(label="events", color=s.STREAM) >> kinesis >> Edge(color=s.STREAM) >> consumer
        consumer >> Edge(label="Parquet, ≤ 60 s", color=s.STREAM) >> raw
        consumer >> Edge(label="last N clicks, hourly popularity (seconds)", color=s.STREAM) >> redis

        raw >> Edge(color=s.BATCH) >> etl_clean >> Edge(color=s.BATCH) >> clean
        clean >> Edge(color=s.BATCH) >> etl_features >> Edge(color=s.BATCH) >> features
        features >> Edge(color=s.BATCH) >> etl_keys >> Edge(color=s.BATCH) >> keys
        features >> Edge(color=s.BATCH) >> train >> Edge(label="publish", color=s.BATCH) >> models
        features >> Edge(color=s.BATCH) >> score
        models >> Edge(label="new or promoted", color=s.BATCH) >> score >> Edge(color=s.BATCH) >> recs
        keys >> Edge(color=s.BATCH) >> sync
        recs >> Edge(color=s.BATCH) >> sync
        clean >> Edge(label="facts", color=s.BATCH, style="dashed") >> sync
        sync >> Edge(label="BatchWriteItem, pointer", color=s.BATCH) >> ddb
        sync >> Edge(label="pre-warm", color=s.BATCH) >> redis
        sync >> Edge(label="COPY + MERGE", color=s.BATCH) >> warehouse

        redis >> Edge(label="1 cached answer, clicks", color=s.REQUEST) >> serve
        ddb >> Edge(label="2 batch recs", color=s.REQUEST) >> serve
        models >> Edge(label="3 user tower + ANN (hot swap)", color=s.REQUEST, style="dashed") >> serve
        serve >> Edge(label="top-K + source", color=s.REQUEST) >> client
    return s.out(NAME) + ".png"


if __name__ == "__main__":
    print(build())
