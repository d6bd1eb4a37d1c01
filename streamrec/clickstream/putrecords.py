"""The rules of Kinesis PutRecords, as pure functions: batching, what to retry, backoff, rate.

Kept apart from the client calls (:mod:`.publish`) so each rule is tested with a table of cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from streamrec.clickstream.records import GeneratedRecord

# Kinesis limits: per PutRecords call, and per record (data plus partition key).
MAX_RECORDS_PER_CALL = 500
MAX_BYTES_PER_CALL = 5 * 1024 * 1024
MAX_BYTES_PER_RECORD = 1024 * 1024
MAX_PARTITION_KEY_CHARS = 256


def record_size(record: GeneratedRecord) -> int:
    """What a record counts against the call and record limits: data plus UTF-8 partition key."""
    return len(record.data) + len(record.partition_key.encode("utf-8"))


def batches(
    records: Iterable[GeneratedRecord],
    max_records: int = MAX_RECORDS_PER_CALL,
    max_bytes: int = MAX_BYTES_PER_CALL,
) -> Iterator[list[GeneratedRecord]]:
    """Group records, in order, into PutRecords calls of at most ``max_records`` and ``max_bytes``.

    A record Kinesis would refuse on its own (over 1 MiB, or a partition key of the wrong length) raises
    ValueError here: one such record would otherwise fail the whole call.
    """
    batch: list[GeneratedRecord] = []
    size = 0
    for record in records:
        n = record_size(record)
        if n > MAX_BYTES_PER_RECORD:
            raise ValueError(f"record of {n} bytes exceeds the Kinesis limit of {MAX_BYTES_PER_RECORD} bytes")
        if not 1 <= len(record.partition_key) <= MAX_PARTITION_KEY_CHARS:
            raise ValueError(f"partition key must have 1 to {MAX_PARTITION_KEY_CHARS} characters")
        if batch and (len(batch) >= max_records or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(record)
        size += n
    if batch:
        yield batch


@dataclass(frozen=True)
class CallOutcome:
    """What one PutRecords response says: which request indices failed, and where the rest went."""

    failed: list[int]
    shard_counts: dict[str, int]
    last_error: str | None


def read_response(response: Mapping[str, Any]) -> CallOutcome:
    """Failed indices (their position in the request = position in ``Records``) and per-shard successes."""
    failed: list[int] = []
    shards: dict[str, int] = {}
    last_error = None
    for i, entry in enumerate(response["Records"]):
        if entry.get("ErrorCode"):
            failed.append(i)
            last_error = f"{entry['ErrorCode']}: {entry.get('ErrorMessage', '')}".rstrip(": ")
        else:
            shards[entry["ShardId"]] = shards.get(entry["ShardId"], 0) + 1
    if len(failed) != response.get("FailedRecordCount", len(failed)):
        raise ValueError(
            f"PutRecords response lists {len(failed)} failed records but FailedRecordCount is "
            f"{response['FailedRecordCount']}"
        )
    return CallOutcome(failed=failed, shard_counts=shards, last_error=last_error)
