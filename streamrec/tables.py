"""DynamoDB table definitions: the key schemas every environment creates identically.

The dev stack, the tests and the Helm chart's provisioning docs all use these, so a table's layout is
written down once. Item layouts beyond the keys are documented where the items are written.
"""

from __future__ import annotations

from typing import Any

from streamrec.settings import RegionSettings


def lease_table_spec(name: str) -> dict[str, Any]:
    """Kinesis consumer leases: one item per shard (see ingest.lease_table)."""
    return {
        "TableName": name,
        "KeySchema": [{"AttributeName": "shard_id", "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": "shard_id", "AttributeType": "S"}],
        "BillingMode": "PAY_PER_REQUEST",
    }


def _two_key_table(name: str, hash_key: str, range_key: str) -> dict[str, Any]:
    return {
        "TableName": name,
        "KeySchema": [
            {"AttributeName": hash_key, "KeyType": "HASH"},
            {"AttributeName": range_key, "KeyType": "RANGE"},
        ],
        "AttributeDefinitions": [
            {"AttributeName": hash_key, "AttributeType": "S"},
            {"AttributeName": range_key, "AttributeType": "S"},
        ],
        "BillingMode": "PAY_PER_REQUEST",
    }


def recs_table_spec(name: str) -> dict[str, Any]:
    """Batch recommendations: partition = user id, sort = model version, so a new version never
    overwrites the one being served until promotion flips the pointer."""
    return _two_key_table(name, "user_id", "model_version")


def features_table_spec(name: str) -> dict[str, Any]:
    """Key data points (popularity lists, item metadata, user last-N): generic pk/sk layout."""
    return _two_key_table(name, "pk", "sk")


def region_table_specs(region: RegionSettings) -> list[dict[str, Any]]:
    return [
        lease_table_spec(region.tables.leases),
        recs_table_spec(region.tables.recs),
        features_table_spec(region.tables.features),
    ]
