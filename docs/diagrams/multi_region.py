"""Multi-region view: isolated regional stacks behind latency-based DNS, and what is global.
Writes multi_region.png next to this file.

Each region is a copy of deployment_region.png installed from its own values file
(charts/streamrec/values/<region>.yaml) and eksctl ClusterConfig (k8s/eksctl/cluster-<region>.yaml).
Nothing in a region's request path or pipeline calls another region; the only shared things are the
DNS name, the source repository and the images built from it, and the account's IAM.
"""

from __future__ import annotations

import _style as s
from diagrams import Cluster, Diagram, Edge
from diagrams.aws.analytics import KinesisDataStreams
from diagrams.aws.compute import ECR, EKS
from diagrams.aws.database import Dynamodb, ElasticacheForRedis, Redshift
from diagrams.aws.general import Users
from diagrams.aws.network import ElbApplicationLoadBalancer, Route53
from diagrams.aws.security import IAM
from diagrams.aws.storage import S3
from diagrams.onprem.vcs import Git

NAME = "multi_region"
REGIONS = (
    ("us-east-1", "10.10.0.0/16", "8 shards"),
    ("eu-west-1", "10.20.0.0/16", "4 shards"),
    ("ap-southeast-1", "10.30.0.0/16", "2 shards"),
)


def build() -> str:
    graph = {**s.GRAPH, "ranksep": "1.3", "nodesep": "0.35"}
    with Diagram("streamrec: isolated regions, latency-based routing", filename=s.out(NAME), show=False,
                 direction="LR", outformat="png", graph_attr=graph, node_attr=s.NODE, edge_attr=s.EDGE):
        with Cluster("users, per geography", graph_attr=s.PLAIN):
            users = Users("API clients\nand website")
        with Cluster("global", graph_attr=s.PLAIN):
            dns = Route53("Route 53: latency\nrecords + health\nchecks per region")
            repo = Git("one repository:\nchart, values/<r>.yaml,\neksctl cluster-<r>.yaml")
            iam = IAM("IAM (account-wide):\nroles named per region")

        users >> Edge(label="DNS query", color=s.REQUEST) >> dns
        for i, (region, cidr, shards) in enumerate(REGIONS):
            first = i == 0
            with Cluster(f"region {region} (VPC {cidr}): its own EKS cluster and data", graph_attr=s.REGION):
                alb = ElbApplicationLoadBalancer(f"ALB\nrecs.{region}")
                kinesis = KinesisDataStreams(f"Kinesis\n{shards}")
                eks = EKS("EKS: ingest, Serve,\ncontroller, RayJobs,\nEMR on EKS")
                ecr = ECR("ECR\n(images pushed\nper region)")
                with Cluster("data that stays in the region", graph_attr=s.AWS):
                    data = [S3("S3 lake"), Dynamodb("DynamoDB"), ElasticacheForRedis("Redis"), Redshift("Redshift")]
            dns >> Edge(label="lowest latency, healthy" if first else "", color=s.REQUEST) >> alb
            users >> Edge(label="clickstream to its region" if first else "", color=s.STREAM) >> kinesis
            alb >> Edge(color=s.REQUEST) >> eks
            kinesis >> Edge(color=s.STREAM) >> eks
            eks >> Edge(color=s.BATCH) >> data[0]
            eks >> Edge(color=s.BATCH) >> data[1]
            eks >> Edge(color=s.BATCH) >> data[2]
            eks >> Edge(color=s.BATCH) >> data[3]
            repo >> Edge(label="skaffold build -p <r>" if first else "", color=s.CONTROL, style="dashed") >> ecr
            ecr >> Edge(style="dotted") >> eks
            iam >> Edge(style="invis") >> eks
    return s.out(NAME) + ".png"


if __name__ == "__main__":
    print(build())
