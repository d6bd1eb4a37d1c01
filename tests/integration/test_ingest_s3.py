"""The consumer writing its lake to S3 (moto server) instead of a local folder: the production path."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from ingest.worker import build_worker
from streamrec.aws import client
from streamrec.devstack.provision import provision_region
from streamrec.devstack.service import ServiceHandle
from streamrec.events import canonical_json
from streamrec.lake import LakeLayout, filesystem
from streamrec.settings import load_settings

pytestmark = pytest.mark.integration
REGION = "eu-west-1"


def test_worker_writes_raw_and_dead_letter_parquet_to_s3(tmp_path: Path, moto_server: ServiceHandle,
                                                         redis_url: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    bucket = f"lake-{suffix}"
    path = tmp_path / "streamrec.yaml"
    path.write_text(yaml.safe_dump({
        "aws": {"endpoint_url": moto_server.url, "access_key_id": "testing", "secret_access_key": "testing"},
        "regions": {REGION: {
            "stream_name": f"clicks-{suffix}", "shard_count": 2, "lake_uri": f"s3://{bucket}/lake",
            "tables": {"leases": f"leases-{suffix}", "recs": f"recs-{suffix}", "features": f"features-{suffix}"},
            "redis_url": redis_url,
        }},
        "ingest": {"batch_max_seconds": 0.5, "idle_poll_seconds": 0.05, "lease_duration_seconds": 2,
                   "lease_renew_seconds": 0.5},
    }))
    settings = load_settings(path)
    provision_region(settings, REGION)  # creates the lake bucket too

    now = datetime.now(UTC)
    ids = [str(uuid.uuid4()) for _ in range(200)]
    records = [{"Data": canonical_json({
        "event_id": eid, "user_id": f"u{i % 20}", "session_id": f"s{i % 20}", "item_id": f"i{i % 7}",
        "event_type": "click", "ts": (now - timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "region": REGION}), "PartitionKey": f"u{i % 20}"} for i, eid in enumerate(ids)]
    records.append({"Data": b'{"event_id": 1}', "PartitionKey": "bad"})
    out = client("kinesis", REGION, settings.aws).put_records(
        StreamName=settings.region(REGION).stream_name, Records=records)
    assert out["FailedRecordCount"] == 0

    stats = build_worker(settings, REGION, until_drained=True).run()
    assert stats.rows_out == 200 and stats.dead_lettered == {"schema": 1}

    rs = settings.region(REGION)
    fs = filesystem(rs.lake_uri, endpoint_url=settings.aws.endpoint_url, region=REGION,
                    access_key="testing", secret_key="testing")
    layout = LakeLayout(rs.lake_uri)
    raw = ds.dataset(layout.region_root("raw", REGION), filesystem=fs, format="parquet",
                     partitioning="hive").to_table()
    assert sorted(raw.column("event_id").to_pylist()) == sorted(ids)
    dead = ds.dataset(layout.region_root("dead_letter", REGION), filesystem=fs, format="parquet",
                      partitioning="hive").to_table()
    assert dead.column("data").to_pylist() == [b'{"event_id": 1}']
    # Objects appear whole under their final names: no temporary keys are left in the bucket.
    keys = [o["Key"] for o in client("s3", REGION, settings.aws).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys and all(k.endswith(".parquet") and "/." not in k for k in keys)
