"""Cluster-level manifests in k8s/: the eksctl ClusterConfigs and the Karpenter NodePool/EC2NodeClass
through their schemas, with the labels and taints the chart and the settings select; the namespace's
Pod Security labels; the IAM policy documents as valid, least-privilege policies."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chartlib import (
    CHART,
    K8S,
    KUBE_VERSION,
    REGION_FILES,
    ROOT,
    SCHEMAS,
    load_values,
    validate_custom_resource,
)

pytestmark = pytest.mark.charts

REGIONS = [p.stem for p in REGION_FILES]
ACCOUNT = "111122223333"
R5_LABEL = ("streamrec.io/node-group", "r5")
R5_TAINT = {"key": "streamrec.io/memory-optimized", "value": "true", "effect": "NoSchedule"}
DOCS = ROOT / "docs" / "deployment.md"


def substitute(text: str, **values: str) -> str:
    """What `envsubst '$A $B'` does in the docs: replace ${A} and ${B}; every ${VAR} must be given."""
    out = re.sub(r"\$\{([A-Z_][A-Z0-9_]*)\}", lambda m: values[m.group(1)], text)
    assert "${" not in out
    return out


# ------------------------------------------------------------------------------------------ eksctl


@functools.lru_cache(maxsize=1)
def eksctl_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "eksctl-v1alpha5.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def cluster_config(region: str) -> dict[str, Any]:
    text = (K8S / "eksctl" / f"cluster-{region}.yaml").read_text()
    return yaml.safe_load(substitute(text, AWS_ACCOUNT_ID=ACCOUNT))


@pytest.mark.parametrize("region", REGIONS)
def test_eksctl_cluster_config_is_valid(region: str) -> None:
    cfg = cluster_config(region)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in eksctl_validator().iter_errors(cfg)
    ]
    assert errors == []
    assert (cfg["apiVersion"], cfg["kind"]) == ("eksctl.io/v1alpha5", "ClusterConfig")
    assert cfg["metadata"]["region"] == region and cfg["metadata"]["name"] == f"streamrec-{region}"
    assert cfg["metadata"]["version"] == KUBE_VERSION.rsplit(".", 1)[0]
    assert all(az.startswith(region) for az in cfg["availabilityZones"])


@pytest.mark.parametrize("region", REGIONS)
def test_eksctl_node_groups_match_the_chart(region: str) -> None:
    from streamrec.settings import RayJobTemplate

    groups = {g["name"]: g for g in cluster_config(region)["managedNodeGroups"]}
    assert "system" in groups and not groups["system"].get("taints")
    r5 = [g for g in groups.values() if g.get("labels", {}).get(R5_LABEL[0]) == R5_LABEL[1]]
    assert len(r5) == 1
    (group,) = r5
    assert all(t.startswith("r5.") for t in group["instanceTypes"]), group["instanceTypes"]
    assert group["taints"] == [R5_TAINT]
    # The chart's default selector/tolerations and the controller's RayJob template select exactly this.
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["memoryOptimizedNodes"]
    tpl = RayJobTemplate()
    for selector in (defaults["nodeSelector"], tpl.node_selector):
        assert all(group["labels"].get(k) == v for k, v in selector.items())
    for tolerations in (defaults["tolerations"], list(tpl.tolerations)):
        assert any(
            t["key"] == R5_TAINT["key"]
            and t["effect"] == R5_TAINT["effect"]
            and (t["operator"] == "Exists" or t.get("value") == R5_TAINT["value"])
            for t in tolerations
        )


@pytest.mark.parametrize("region", REGIONS)
def test_eksctl_pod_identity_covers_the_chart_service_accounts(region: str) -> None:
    cfg = cluster_config(region)
    associations = {
        (a["namespace"], a["serviceAccountName"]): a for a in cfg["iam"]["podIdentityAssociations"]
    }
    for sa, policy in (
        ("streamrec-ingest", "ingest-consumer"),
        ("streamrec-serve", "serving"),
        ("streamrec-controller", "controller"),
        ("streamrec-ray", "ray-jobs"),
    ):
        a = associations[("streamrec", sa)]
        assert a["permissionPolicyARNs"] == [f"arn:aws:iam::{ACCOUNT}:policy/streamrec-{policy}-{region}"]
        assert (K8S / "iam" / f"{policy}.json").exists()
    assert ("keda", "keda-operator") in associations
    assert cfg["iam"]["withOIDC"] is True  # EMR on EKS job execution roles
    addons = {a["name"] for a in cfg["addons"]}
    assert {"eks-pod-identity-agent", "vpc-cni"} <= addons


# ------------------------------------------------------------------------------------------ Karpenter


def karpenter_objects() -> list[dict[str, Any]]:
    text = (K8S / "karpenter" / "r5-nodepool.yaml").read_text()
    filled = substitute(
        text,
        CLUSTER_NAME="streamrec-us-east-1",
        KARPENTER_NODE_ROLE="KarpenterNodeRole-streamrec",
        AL2023_AMI_VERSION="v20241024",
    )
    return [d for d in yaml.safe_load_all(filled) if d]


def test_karpenter_nodepool_and_nodeclass_are_valid() -> None:
    objs = karpenter_objects()
    assert sorted(o["kind"] for o in objs) == ["EC2NodeClass", "NodePool"]
    for obj in objs:
        assert validate_custom_resource(obj) == [], obj["kind"]


def test_karpenter_is_restricted_to_r5_with_the_chart_label_and_taint() -> None:
    pool = next(o for o in karpenter_objects() if o["kind"] == "NodePool")
    nodeclass = next(o for o in karpenter_objects() if o["kind"] == "EC2NodeClass")
    tpl = pool["spec"]["template"]
    assert tpl["metadata"]["labels"] == {R5_LABEL[0]: R5_LABEL[1]}
    assert tpl["spec"]["taints"] == [R5_TAINT]
    family = next(r for r in tpl["spec"]["requirements"] if r["key"] == "karpenter.k8s.aws/instance-family")
    assert family == {"key": "karpenter.k8s.aws/instance-family", "operator": "In", "values": ["r5"]}
    assert tpl["spec"]["nodeClassRef"] == {
        "group": "karpenter.k8s.aws",
        "kind": "EC2NodeClass",
        "name": nodeclass["metadata"]["name"],
    }
    (ami,) = nodeclass["spec"]["amiSelectorTerms"]
    assert re.fullmatch(r"al2023@v\d{8}", ami["alias"]), "pin the AMI, never @latest"
    assert nodeclass["spec"]["metadataOptions"]["httpTokens"] == "required"


# ------------------------------------------------------------------------------------------ namespace


def test_namespace_enforces_restricted_pod_security() -> None:
    docs = [d for d in yaml.safe_load_all((K8S / "namespace.yaml").read_text()) if d]
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    ns = next(d for d in docs if d["metadata"]["name"] == "streamrec")
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
        assert labels[f"pod-security.kubernetes.io/{mode}-version"] == f"v{KUBE_VERSION.rsplit('.', 1)[0]}"


# ------------------------------------------------------------------------------------------ IAM

IAM_FILES = sorted((K8S / "iam").glob("*.json"))
# Actions that work only on "*" (none used today) would be listed here.
STAR_RESOURCE_ACTIONS: set[str] = set()
# IAM action names that differ from the service's API operation names (S3).
S3_ACTIONS = {"GetObject", "PutObject", "DeleteObject", "AbortMultipartUpload", "ListBucket"}
SERVICE_MODELS = {
    "kinesis": "kinesis",
    "dynamodb": "dynamodb",
    "emr-containers": "emr-containers",
    "logs": "logs",
}
ARN = re.compile(
    r"^arn:aws:(?P<service>[a-z0-9-]+):(?P<region>[a-z0-9-]*):(?P<account>\d{12}|):(?P<resource>.+)$"
)


@functools.cache
def _operations(service: str) -> set[str]:
    import botocore.session

    return set(botocore.session.get_session().get_service_model(service).operation_names)


def policy(path: Path, region: str) -> dict[str, Any]:
    return json.loads(substitute(path.read_text(), AWS_REGION=region, AWS_ACCOUNT_ID=ACCOUNT))


@pytest.mark.parametrize("path", IAM_FILES, ids=[p.stem for p in IAM_FILES])
@pytest.mark.parametrize("region", REGIONS)
def test_iam_policy_documents_are_valid(path: Path, region: str) -> None:
    doc = policy(path, region)
    assert set(doc) == {"Version", "Statement"} and doc["Version"] == "2012-10-17"
    sids = [s["Sid"] for s in doc["Statement"]]
    assert len(sids) == len(set(sids)) and all(re.fullmatch(r"[A-Za-z0-9]+", s) for s in sids)
    for st in doc["Statement"]:
        assert set(st) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        assert st["Effect"] == "Allow"
        assert isinstance(st["Action"], list) and isinstance(st["Resource"], list)
        for action in st["Action"]:
            service, _, name = action.partition(":")
            assert "*" not in action, f"{action}: no wildcard actions"
            if service == "s3":
                assert name in S3_ACTIONS, action
            else:
                assert name in _operations(SERVICE_MODELS[service]), f"{action} is not a {service} operation"
        for resource in st["Resource"]:
            assert resource != "*" or set(st["Action"]) <= STAR_RESOURCE_ACTIONS, f"{st['Sid']}: Resource *"
            m = ARN.match(resource)
            assert m, resource
            if m["service"] != "s3":
                assert m["region"] == region and m["account"] == ACCOUNT, resource
            else:
                assert m["resource"].startswith(f"streamrec-lake-{region}"), resource


def _grants(region: str, name: str) -> list[tuple[str, str]]:
    return [
        (a, r)
        for st in policy(K8S / "iam" / f"{name}.json", region)["Statement"]
        for a in st["Action"]
        for r in st["Resource"]
    ]


@pytest.mark.parametrize("region", REGIONS)
def test_iam_least_privilege(region: str) -> None:
    lake = f"arn:aws:s3:::streamrec-lake-{region}"
    writes = {
        "s3:PutObject",
        "s3:DeleteObject",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:BatchWriteItem",
        "dynamodb:DeleteItem",
    }
    # The consumer reads its stream and writes its lake prefixes and its lease table.
    consumer = _grants(region, "ingest-consumer")
    assert {r for a, r in consumer if a.startswith("kinesis:")} == {
        f"arn:aws:kinesis:{region}:{ACCOUNT}:stream/streamrec-clicks-{region}"
    }
    assert {r for a, r in consumer if a in writes and a.startswith("s3:")} == {
        f"{lake}/raw/region={region}/*",
        f"{lake}/dead_letter/region={region}/*",
    }
    assert {r for a, r in consumer if a.startswith("dynamodb:")} == {
        f"arn:aws:dynamodb:{region}:{ACCOUNT}:table/streamrec-ingest-leases-{region}"
    }
    # Serving only reads: its tables and the model prefix.
    serving = _grants(region, "serving")
    assert not [a for a, _ in serving if a in writes]
    assert {r for a, r in serving if a == "s3:GetObject"} == {f"{lake}/models/region={region}/*"}
    assert {r.rsplit("/", 1)[1] for a, r in serving if a.startswith("dynamodb:")} == {
        f"streamrec-recs-{region}",
        f"streamrec-features-{region}",
    }
    # The controller starts EMR job runs (with the ETL role only) and writes DynamoDB.
    controller = policy(K8S / "iam" / "controller.json", region)["Statement"]
    start = next(s for s in controller if "emr-containers:StartJobRun" in s["Action"])
    assert (
        start["Condition"]["ArnEquals"]["emr-containers:ExecutionRoleArn"]
        == f"arn:aws:iam::{ACCOUNT}:role/streamrec-etl-job-{region}"
    )
    assert any(a == "dynamodb:BatchWriteItem" for a, _ in _grants(region, "controller"))
    # KEDA reads the shard count of this region's stream, nothing else.
    assert _grants(region, "keda-kinesis-scaler") == [
        (
            "kinesis:DescribeStreamSummary",
            f"arn:aws:kinesis:{region}:{ACCOUNT}:stream/streamrec-clicks-{region}",
        )
    ]


def test_iam_files_are_referenced_by_the_docs() -> None:
    docs = DOCS.read_text()
    for path in IAM_FILES:
        assert f"k8s/iam/{path.name}" in docs, f"{path.name} is not in docs/deployment.md"


def test_region_values_use_the_roles_and_names_k8s_creates() -> None:
    for path in REGION_FILES:
        region = path.stem
        values = load_values(path)
        assert values["settings"]["emr"]["execution_role_arn"].endswith(f":role/streamrec-etl-job-{region}")
        assert (
            values["settings"]["emr"]["release_label"]
            == yaml.safe_load((K8S / "versions.yaml").read_text())["emr-on-eks"]["releaseLabel"]
        )


def test_pinned_versions_match_the_vendored_crds_and_the_docs() -> None:
    versions = yaml.safe_load((K8S / "versions.yaml").read_text())
    addons = versions["addons"]
    crd_versions = {
        "kuberay-operator": ("ray.io_rayservices.yaml", "1.7.0"),
        "keda": ("keda.sh_scaledobjects.yaml", "2.20.2"),
        "karpenter": ("karpenter.sh_nodepools.yaml", "1.14.1"),
        "prometheus-operator": ("monitoring.coreos.com_podmonitors.yaml", "0.93.0"),
    }
    readme = (SCHEMAS / "README.md").read_text()
    docs = DOCS.read_text()
    for name, (crd_file, version) in crd_versions.items():
        assert addons[name]["version"] == version
        row = next(line for line in readme.splitlines() if f"`{crd_file}`" in line)
        assert f"v{version}" in row, f"{crd_file} is not from {name} {version}"
        assert version in docs, f"docs/deployment.md does not pin {name} {version}"
    assert addons["aws-load-balancer-controller"]["appVersion"] in docs
    assert versions["kubernetes"] == KUBE_VERSION.rsplit(".", 1)[0]
