"""The DynamoDB lease table: one item per shard, every change a conditional write.

Item layout (attribute names are quoted through ExpressionAttributeNames; several are reserved words):
``shard_id`` (key), ``owner`` (absent when free), ``counter`` (bumped by every write, which is how other
workers see that the owner is alive), ``checkpoint`` (TRIM_HORIZON, a sequence number, or SHARD_END),
``parents`` (list), ``pending_first``/``pending_last`` (a batch being written, see ingest.worker),
``owner_switches``.
"""

from __future__ import annotations

import re
from typing import Any

from botocore.exceptions import ClientError

from ingest.leases import TRIM_HORIZON, Lease

_NAMES = {"#o": "owner", "#c": "counter", "#cp": "checkpoint", "#pf": "pending_first", "#pl": "pending_last",
          "#sw": "owner_switches"}


class LeaseTableMissing(RuntimeError):
    pass


def _lease(item: dict[str, Any]) -> Lease:
    pending = None
    if "pending_first" in item and "pending_last" in item:
        pending = (item["pending_first"]["S"], item["pending_last"]["S"])
    return Lease(
        shard_id=item["shard_id"]["S"],
        owner=item["owner"]["S"] if "owner" in item else None,
        counter=int(item.get("counter", {"N": "0"})["N"]),
        checkpoint=item.get("checkpoint", {"S": TRIM_HORIZON})["S"],
        parents=tuple(p["S"] for p in item.get("parents", {"L": []})["L"]),
        pending=pending,
    )


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response["Error"]["Code"] == "ConditionalCheckFailedException"


class LeaseTable:
    def __init__(self, client: Any, table_name: str) -> None:
        self.client = client
        self.name = table_name

    def check_exists(self) -> None:
        try:
            self.client.describe_table(TableName=self.name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                raise LeaseTableMissing(
                    f"lease table {self.name!r} does not exist (create it with `streamrec dev up` locally, "
                    "or the chart's provisioning in AWS)") from None
            raise

    def scan(self) -> list[Lease]:
        leases, kwargs = [], {"TableName": self.name, "ConsistentRead": True}
        while True:
            page = self.client.scan(**kwargs)
            leases.extend(_lease(item) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return sorted(leases, key=lambda l: l.shard_id)
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def create_if_missing(self, shard_id: str, parents: tuple[str, ...]) -> bool:
        try:
            self.client.put_item(
                TableName=self.name,
                Item={"shard_id": {"S": shard_id}, "counter": {"N": "0"}, "checkpoint": {"S": TRIM_HORIZON},
                      "parents": {"L": [{"S": p} for p in parents]}, "owner_switches": {"N": "0"}},
                ConditionExpression="attribute_not_exists(shard_id)",
            )
            return True
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise

    def _update(self, shard_id: str, update: str, condition: str, values: dict[str, Any]) -> Lease | None:
        """One conditional update; None when the condition failed (someone else changed the lease)."""
        used = set(re.findall(r"#\w+", f"{update} {condition}"))
        names = {k: v for k, v in _NAMES.items() if k in used}
        try:
            out = self.client.update_item(
                TableName=self.name, Key={"shard_id": {"S": shard_id}}, UpdateExpression=update,
                ConditionExpression=condition, ExpressionAttributeNames=names,
                ExpressionAttributeValues=values, ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return None
            raise
        return _lease(out["Attributes"])

    def take(self, lease: Lease, worker_id: str) -> Lease | None:
        """Take a free, expired or stolen lease, provided it is still exactly as we last saw it."""
        return self._update(
            lease.shard_id,
            "SET #o = :me, #c = #c + :one, #sw = if_not_exists(#sw, :zero) + :one",
            "#c = :seen",
            {":me": {"S": worker_id}, ":one": {"N": "1"}, ":zero": {"N": "0"}, ":seen": {"N": str(lease.counter)}},
        )

    def renew(self, lease: Lease, worker_id: str) -> Lease | None:
        return self._update(lease.shard_id, "SET #c = #c + :one", "#o = :me",
                            {":me": {"S": worker_id}, ":one": {"N": "1"}})

    def set_pending(self, lease: Lease, worker_id: str, first_seq: str, last_seq: str) -> Lease | None:
        """Record the batch about to be written, so a successor can rewrite exactly the same files."""
        return self._update(lease.shard_id, "SET #pf = :f, #pl = :l, #c = #c + :one", "#o = :me",
                            {":me": {"S": worker_id}, ":one": {"N": "1"}, ":f": {"S": first_seq},
                             ":l": {"S": last_seq}})

    def checkpoint(self, lease: Lease, worker_id: str, sequence_number: str) -> Lease | None:
        return self._update(lease.shard_id, "SET #cp = :cp, #c = #c + :one REMOVE #pf, #pl", "#o = :me",
                            {":me": {"S": worker_id}, ":one": {"N": "1"}, ":cp": {"S": sequence_number}})

    def release(self, lease: Lease, worker_id: str) -> Lease | None:
        return self._update(lease.shard_id, "SET #c = #c + :one REMOVE #o", "#o = :me",
                            {":me": {"S": worker_id}, ":one": {"N": "1"}})
