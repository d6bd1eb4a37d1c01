"""Create a region's AWS resources if they are missing: Kinesis stream, DynamoDB tables, lake bucket.

Idempotent, and only through :func:`streamrec.aws.client`, so it works the same against moto (the dev
stack, the tests) and against a real account. In production the chart's provisioning (not this code)
owns these resources; this module exists for local stacks and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import ClientError

from streamrec.aws import client
from streamrec.devstack.process import wait_until
from streamrec.settings import RegionSettings, Settings
from streamrec.tables import region_table_specs

ACTIVE_TIMEOUT_S = 60.0


def lake_bucket_name(region_name: str) -> str:
    """The S3 bucket that holds a region's lake (``s3://streamrec-lake-<region>/...``)."""
    return f"streamrec-lake-{region_name}"


@dataclass(frozen=True)
class ProvisionResult:
    """What provisioning found: resource names it created and names that already existed."""

    region: str
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)


def provision_region(settings: Settings, region_name: str) -> ProvisionResult:
    """Make sure ``region_name``'s stream (ACTIVE), tables (ACTIVE), bucket and local lake dir exist."""
    region = settings.region(region_name)
    result = ProvisionResult(region_name)
    _ensure_stream(client("kinesis", region_name, settings.aws), region, result)
    dynamodb = client("dynamodb", region_name, settings.aws)
    for spec in region_table_specs(region):
        _ensure_table(dynamodb, spec, result)
    # Superseded model versions' recs expire: the sync step writes expires_at (epoch seconds) on each.
    ttl = dynamodb.describe_time_to_live(TableName=region.tables.recs)["TimeToLiveDescription"]
    if ttl.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
        dynamodb.update_time_to_live(TableName=region.tables.recs, TimeToLiveSpecification={
            "Enabled": True, "AttributeName": "expires_at"})
        result.created.append(f"dynamodb-ttl:{region.tables.recs}.expires_at")
    else:
        result.existing.append(f"dynamodb-ttl:{region.tables.recs}.{ttl.get('AttributeName')}")
    s3 = client("s3", region_name, settings.aws)
    for bucket in _buckets(region_name, region):
        _ensure_bucket(s3, bucket, region_name, result)
    if region.lake_uri.startswith("file://"):
        Path(urlparse(region.lake_uri).path).mkdir(parents=True, exist_ok=True)
    return result


def _ensure_stream(kinesis: Any, region: RegionSettings, result: ProvisionResult) -> None:
    name = region.stream_name
    try:
        kinesis.create_stream(StreamName=name, ShardCount=region.shard_count)
        result.created.append(f"kinesis:{name}")
    except kinesis.exceptions.ResourceInUseException:
        result.existing.append(f"kinesis:{name}")

    def active() -> bool:
        summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        return bool(summary["StreamStatus"] == "ACTIVE")

    wait_until(active, timeout_s=ACTIVE_TIMEOUT_S, what=f"Kinesis stream {name} ACTIVE")


def _ensure_table(dynamodb: Any, spec: dict[str, Any], result: ProvisionResult) -> None:
    name = spec["TableName"]
    try:
        dynamodb.create_table(**spec)
        result.created.append(f"dynamodb:{name}")
    except dynamodb.exceptions.ResourceInUseException:
        result.existing.append(f"dynamodb:{name}")

    def active() -> bool:
        return bool(dynamodb.describe_table(TableName=name)["Table"]["TableStatus"] == "ACTIVE")

    wait_until(active, timeout_s=ACTIVE_TIMEOUT_S, what=f"DynamoDB table {name} ACTIVE")


def _buckets(region_name: str, region: RegionSettings) -> list[str]:
    names = [lake_bucket_name(region_name)]
    if region.lake_uri.startswith("s3://"):
        lake_bucket = urlparse(region.lake_uri).netloc
        if lake_bucket not in names:
            names.append(lake_bucket)
    return names


def _ensure_bucket(s3: Any, bucket: str, region_name: str, result: ProvisionResult) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        result.existing.append(f"s3:{bucket}")
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region_name != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region_name}
    try:
        s3.create_bucket(**kwargs)
        result.created.append(f"s3:{bucket}")
    except s3.exceptions.BucketAlreadyOwnedByYou:
        result.existing.append(f"s3:{bucket}")
