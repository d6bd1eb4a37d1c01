"""Deployment view of ONE region: the EKS cluster (node groups, namespaces, workloads) and the AWS
services around it, with the network paths between them. Writes deployment_region.png next to this file.

What it draws is what the repository deploys: charts/streamrec (workloads), k8s/eksctl (node groups,
Pod Identity), k8s/namespace.yaml, k8s/iam (who may call what), docs/deployment.md (network flows).
"""

from __future__ import annotations

import _style as s
from diagrams import Cluster, Diagram, Edge
from diagrams.aws.analytics import EMR, KinesisDataStreams
from diagrams.aws.compute import ECR
from diagrams.aws.database import Dynamodb, ElasticacheForRedis, Redshift
from diagrams.aws.general import Users
from diagrams.aws.management import Cloudwatch
from diagrams.aws.network import ElbApplicationLoadBalancer, Route53
from diagrams.aws.security import IAMRole
from diagrams.aws.storage import S3
from diagrams.k8s.compute import Cronjob, Deploy, Job, Pod
from diagrams.k8s.others import CRD

NAME = "deployment_region"


def build() -> str:
    with Diagram("streamrec: one region (deployment view)", filename=s.out(NAME), show=False, direction="LR",
                 outformat="png", graph_attr=s.GRAPH, node_attr=s.NODE, edge_attr=s.EDGE):
        with Cluster("clients", graph_attr=s.PLAIN):
            site = Users("website\n(event producers)")
            clients = Users("API clients")

        with Cluster("AWS endpoints of the region", graph_attr=s.AWS):
            dns = Route53("Route 53 latency\nrecord (global)")
            kinesis = KinesisDataStreams("Kinesis stream\nstreamrec-clicks-<r>")
            alb = ElbApplicationLoadBalancer("ALB: HTTPS,\ntarget type ip")
            emr = EMR("EMR on EKS\nvirtual cluster")

        with Cluster("EKS cluster streamrec-<r>: private subnets in 3 AZs", graph_attr=s.EKS):
            with Cluster("node group system: m6i.xlarge, 2-6 nodes", graph_attr=s.NODEGROUP):
                with Cluster("ns kuberay-system, keda, kube-system", graph_attr=s.NAMESPACE):
                    operators = Deploy("KubeRay, KEDA,\nALB controller")
                with Cluster("ns streamrec: Pod Security restricted", graph_attr=s.NAMESPACE):
                    ingest = Deploy("ingest Deployment\nKEDA: shards / 2")
                    head = Pod("Ray head\n(RayService)")
                    cron = Cronjob("CronJob\n06:30 UTC")
                    run = CRD("PipelineRun\n<r>-<day>")
                    controller = Deploy("controller: kopf,\n1 replica; runs\nsync + promote")
            with Cluster("node group r5-memory: r5.2xlarge / r5.4xlarge, 2-30 nodes, tainted",
                         graph_attr=s.NODEGROUP):
                with Cluster("ns streamrec", graph_attr=s.NAMESPACE):
                    serve = Pod("Ray Serve workers\nIngress + Retriever")
                    rayjobs = Job("RayJobs\ntrain, score")
                with Cluster("ns streamrec-emr: baseline", graph_attr=s.NAMESPACE):
                    spark = Pod("Spark driver\n+ executors")

        with Cluster("AWS data services of the region", graph_attr=s.AWS):
            redis = ElasticacheForRedis("ElastiCache Redis\nrediss://, one shard")
            ddb = Dynamodb("DynamoDB: leases,\nrecs, features")
            s3 = S3("S3 lake\nstreamrec-lake-<r>")
            redshift = Redshift("Redshift warehouse\n(5439 or Data API)")

        with Cluster("used by every pod", graph_attr=s.AWS):
            ecr = ECR("ECR images\napp, ray, spark")
            iam = IAMRole("IAM role per\nServiceAccount")
            logs = Cloudwatch("CloudWatch\nlogs")

        # Clickstream (green).
        site >> Edge(label="PutRecords", color=s.STREAM) >> kinesis
        kinesis >> Edge(label="GetRecords", color=s.STREAM) >> ingest
        ingest >> Edge(label="ur:, pop:", color=s.STREAM) >> redis
        ingest >> Edge(label="leases", color=s.STREAM) >> ddb
        ingest >> Edge(label="raw/, dead_letter/", color=s.STREAM) >> s3

        # Online requests (blue).
        clients >> Edge(label="DNS", color=s.REQUEST) >> dns
        clients >> Edge(label="HTTPS", color=s.REQUEST) >> alb
        alb >> Edge(label=":8000", color=s.REQUEST) >> serve
        serve >> Edge(label="cache, clicks", color=s.REQUEST) >> redis
        serve >> Edge(label="GetItem", color=s.REQUEST) >> ddb
        serve >> Edge(label="models/", color=s.REQUEST) >> s3

        # The daily pipeline (purple: control, brown: data).
        cron >> Edge(label="creates", color=s.CONTROL) >> run
        run >> Edge(label="watched by", color=s.CONTROL) >> controller
        controller >> Edge(label="StartJobRun", color=s.CONTROL, constraint="false") >> emr
        emr >> Edge(label="starts pods", color=s.CONTROL) >> spark
        controller >> Edge(label="creates", color=s.CONTROL) >> rayjobs
        spark >> Edge(label="clean/, features/, keys/", color=s.BATCH) >> s3
        rayjobs >> Edge(label="models/, recs/", color=s.BATCH) >> s3
        # sync and promote run in the controller: BatchWriteItem, COPY + MERGE, cache pre-warm.
        controller >> Edge(color=s.BATCH) >> redis
        controller >> Edge(color=s.BATCH) >> ddb
        controller >> Edge(color=s.BATCH) >> redshift
        operators >> Edge(label="manage", color=s.CONTROL, style="dotted") >> head
        head >> Edge(color=s.CONTROL, style="dotted") >> serve

        # Keep the shared services in the right-hand column.
        for a, b in ((s3, ecr), (ddb, iam), (redshift, logs)):
            a >> Edge(style="invis") >> b
    return s.out(NAME) + ".png"


if __name__ == "__main__":
    print(build())
