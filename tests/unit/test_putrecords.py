"""The PutRecords rules as tables: batching limits, which records to retry (backoff and rate are in
test_pacing)."""

from __future__ import annotations

import pytest

from streamrec.clickstream.putrecords import (
    MAX_BYTES_PER_CALL,
    MAX_BYTES_PER_RECORD,
    batches,
    read_response,
    record_size,
)
from streamrec.clickstream.records import GeneratedRecord

MiB = 1024 * 1024


def _record(size: int, key: str = "k") -> GeneratedRecord:
    """A record counting exactly ``size`` bytes (data plus partition key) against the limits."""
    return GeneratedRecord("us-east-1", key, b"x" * (size - len(key.encode())), "valid")


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ([], []),
        ([10], [1]),
        ([10] * 500, [500]),
        ([10] * 501, [500, 1]),
        ([10] * 1234, [500, 500, 234]),
        # Five records of 1 MiB fill a call exactly; the sixth starts the next one.
        ([MiB] * 6, [5, 1]),
        ([MiB] * 5 + [1], [5, 1]),
        ([MiB - 1] * 5 + [5], [6]),  # 5 MiB - 5 + 5 = exactly 5 MiB
        # A record at the per-record limit that would overflow the call starts the next one.
        ([100] + [MAX_BYTES_PER_RECORD] * 5, [5, 1]),
        ([MAX_BYTES_PER_RECORD], [1]),
        ([100, MiB, MiB, MiB, MiB, MiB - 100, 1], [6, 1]),
    ],
)
def test_batches_respect_the_count_and_byte_limits(sizes: list[int], expected: list[int]) -> None:
    records = [_record(s) for s in sizes]
    out = list(batches(records))
    assert [len(b) for b in out] == expected
    assert [r for b in out for r in b] == records  # order kept, nothing lost
    assert all(sum(record_size(r) for r in b) <= MAX_BYTES_PER_CALL for b in out)


def test_batches_count_the_partition_key_in_utf8() -> None:
    key = "ü" * 100  # 200 bytes
    record = _record(MiB, key)
    assert record_size(record) == MiB
    assert [len(b) for b in batches([record] * 6)] == [5, 1]


def test_smaller_batch_limits_apply() -> None:
    assert [len(b) for b in batches([_record(10)] * 7, max_records=3)] == [3, 3, 1]
    assert [len(b) for b in batches([_record(10)] * 7, max_bytes=25)] == [2, 2, 2, 1]


@pytest.mark.parametrize(
    "record, message",
    [
        (_record(MAX_BYTES_PER_RECORD + 1), "exceeds"),
        (GeneratedRecord("us-east-1", "", b"{}", "valid"), "partition key"),
        (GeneratedRecord("us-east-1", "k" * 257, b"{}", "valid"), "partition key"),
    ],
)
def test_records_kinesis_would_refuse_are_refused_before_the_call(
    record: GeneratedRecord, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        list(batches([_record(10), record]))


def _ok(shard: str) -> dict:
    return {"SequenceNumber": "1", "ShardId": shard}


def _failed(code: str = "ProvisionedThroughputExceededException") -> dict:
    return {"ErrorCode": code, "ErrorMessage": "Rate exceeded for shard"}


@pytest.mark.parametrize(
    "entries, failed, shards",
    [
        ([_ok("s-0"), _ok("s-1"), _ok("s-0")], [], {"s-0": 2, "s-1": 1}),
        ([_failed(), _ok("s-1"), _failed("InternalFailure")], [0, 2], {"s-1": 1}),
        ([_failed()] * 3, [0, 1, 2], {}),
        ([_ok("s-2"), _ok("s-2"), _failed()], [2], {"s-2": 2}),
    ],
)
def test_read_response_picks_exactly_the_failed_indices(
    entries: list[dict], failed: list[int], shards: dict
) -> None:
    outcome = read_response({"FailedRecordCount": len(failed), "Records": entries})
    assert outcome.failed == failed
    assert outcome.shard_counts == shards
    assert (outcome.last_error is None) == (not failed)


def test_read_response_refuses_an_inconsistent_failure_count() -> None:
    with pytest.raises(ValueError, match="FailedRecordCount"):
        read_response({"FailedRecordCount": 2, "Records": [_failed(), _ok("s-0")]})
