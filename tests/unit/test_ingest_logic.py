"""The consumer's pure decisions, as tables of cases: dedup window, lease eligibility / take / steal /
expiry, record transform outcomes, and the per-shard buffer (due, drain, receive-hour partitions,
batch file names)."""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.fs as pafs
import pytest

from ingest.buffer import DEAD_LETTER_SCHEMA, MS_PER_HOUR, RAW_SCHEMA, ShardBuffer, hour_partition
from ingest.dedup import DedupWindow
from ingest.leases import SHARD_END, TRIM_HORIZON, ExpiryTracker, Lease, eligible, plan_takes
from ingest.sinks import LakeSink
from ingest.transform import TransformConfig, Transformer, hash_pii
from streamrec.events import canonical_json
from streamrec.lake import LakeLayout, batch_file_name

pytestmark = pytest.mark.unit

REGION = "us-east-1"
# 2026-11-26T10:30:00Z in epoch ms: the server receive time most cases use.
RECEIVED_MS = int(datetime(2026, 11, 26, 10, 30, tzinfo=UTC).timestamp() * 1000)


def ms_to_iso(ms: int) -> str:
    ts = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def make_event(**changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "user_id": "u1",
        "session_id": "s1",
        "item_id": "i1",
        "event_type": "view",
        "ts": ms_to_iso(RECEIVED_MS - 1000),
        "region": REGION,
    }
    out.update(changes)
    return out


def encode(obj: dict[str, Any]) -> bytes:
    return canonical_json(obj)


# ---------------------------------------------------------------------------------------------------
# dedup window


@pytest.mark.parametrize(("capacity", "keys", "expected"), [
    (3, ["a", "b", "a"], [True, True, False]),
    (3, ["a", "b", "c", "a"], [True, True, True, False]),
    # "a" falls out of a window of 2 when "c" arrives, so it is accepted again.
    (2, ["a", "b", "c", "a"], [True, True, True, True]),
    (2, ["a", "b", "c", "b"], [True, True, True, False]),
    (1, ["a", "a", "b", "a"], [True, False, True, True]),
    # Capacity 0 disables dedup entirely.
    (0, ["a", "a", "a"], [True, True, True]),
])
def test_dedup_window(capacity: int, keys: list[str], expected: list[bool]) -> None:
    window = DedupWindow(capacity)
    assert [window.add(k) for k in keys] == expected
    assert len(window) <= capacity


def test_dedup_window_is_fifo_and_bounded() -> None:
    window = DedupWindow(100)
    for i in range(1000):
        assert window.add(str(i))
    assert len(window) == 100
    assert "899" not in window and "900" in window and "999" in window
    # A duplicate does not refresh its position: it still leaves after 100 newer keys.
    assert not window.add("900")
    for i in range(1000, 1001):
        window.add(str(i))
    assert "900" not in window


# ---------------------------------------------------------------------------------------------------
# lease decisions


def leases(spec: dict[str, str | None], **kw: Any) -> list[Lease]:
    return [Lease(shard_id=s, owner=o, **kw) for s, o in spec.items()]


def owners(table: list[Lease]) -> Counter[str | None]:
    return Counter(l.owner for l in table)


def apply_plan(table: list[Lease], worker: str, expired: set[str] | None = None,
               seed: int = 0) -> list[Lease]:
    plan = plan_takes(worker, table, expired or set(), random.Random(seed))
    moved = set(plan.take) | ({plan.steal} if plan.steal else set())
    return [Lease(l.shard_id, worker if l.shard_id in moved else l.owner, l.counter + (l.shard_id in moved),
                  l.checkpoint, l.parents) for l in table]


FOUR = ["s0", "s1", "s2", "s3"]


def test_one_worker_takes_every_free_lease() -> None:
    table = leases({s: None for s in FOUR})
    plan = plan_takes("A", table, set(), random.Random(1))
    assert plan.take == tuple(FOUR)
    assert plan.steal is None


def test_first_worker_does_not_count_absent_workers() -> None:
    # With no other live owner the fair share is everything, even if another worker will come later.
    table = leases({"s0": "A", "s1": None, "s2": None, "s3": None})
    assert plan_takes("A", table, set(), random.Random(0)).take == ("s1", "s2", "s3")


@pytest.mark.parametrize("seed", range(5))
def test_two_workers_converge_to_two_each(seed: int) -> None:
    table = leases({s: None for s in FOUR})
    table = apply_plan(table, "A", seed=seed)
    assert owners(table) == {"A": 4}
    # B arrives: it steals one lease per round from the most loaded worker until the split is fair.
    for _ in range(10):
        table = apply_plan(table, "B", seed=seed)
        table = apply_plan(table, "A", seed=seed)
    assert owners(table) == {"A": 2, "B": 2}
    # Balanced: neither worker plans anything (no churn).
    for worker in ("A", "B"):
        plan = plan_takes(worker, table, set(), random.Random(seed))
        assert plan.take == () and plan.steal is None


def test_three_workers_converge_without_churn() -> None:
    table = leases({f"s{i}": None for i in range(8)})
    for _ in range(12):
        for worker in ("A", "B", "C"):
            table = apply_plan(table, worker)
    assert sorted(owners(table).values()) == [2, 3, 3] and None not in owners(table)
    for worker in ("A", "B", "C"):
        plan = plan_takes(worker, table, set(), random.Random(0))
        assert plan.take == () and plan.steal is None


@pytest.mark.parametrize(("spec", "worker", "steal_from"), [
    pytest.param({"s0": "A", "s1": "A", "s2": "A", "s3": "A"}, "B", "A", id="4-0-steals"),
    pytest.param({"s0": "A", "s1": "A", "s2": "A", "s3": "B"}, "B", "A", id="3-1-steals"),
    pytest.param({"s0": "A", "s1": "A", "s2": "A", "s3": "B"}, "C", "A",
                 id="new-worker-steals-from-most-loaded"),
    pytest.param({"s0": "B", "s1": "A", "s2": "A", "s3": "A", "s4": "B", "s5": "C"}, "D", "A",
                 id="most-loaded-of-three"),
    pytest.param({"s0": "B", "s1": "A", "s2": "A", "s3": "B"}, "C", "A", id="tie-breaks-by-name"),
])
def test_steal_from_most_loaded(spec: dict[str, str], worker: str, steal_from: str) -> None:
    table = leases(spec)
    plan = plan_takes(worker, table, set(), random.Random(3))
    assert plan.take == ()
    assert plan.steal is not None
    assert spec[plan.steal] == steal_from


@pytest.mark.parametrize(("spec", "worker"), [
    pytest.param({"s0": "A", "s1": "A", "s2": "B", "s3": "B"}, "B", id="2-2"),
    pytest.param({"s0": "A", "s1": "A", "s2": "B", "s3": "B"}, "A", id="2-2-other"),
    pytest.param({"s0": "A", "s1": "A", "s2": "B"}, "B", id="2-1-odd-count"),
    pytest.param({"s0": "A", "s1": "B", "s2": "C"}, "C", id="1-1-1"),
    pytest.param({"s0": "A"}, "B", id="one-lease-two-workers"),
    pytest.param({"s0": "A", "s1": "A", "s2": "A"}, "A", id="owner-of-all"),
])
def test_no_steal_when_balanced(spec: dict[str, str], worker: str) -> None:
    plan = plan_takes(worker, leases(spec), set(), random.Random(0))
    assert plan.take == () and plan.steal is None


def test_free_leases_are_taken_before_stealing() -> None:
    table = leases({"s0": "A", "s1": "A", "s2": "A", "s3": None})
    plan = plan_takes("B", table, set(), random.Random(0))
    assert plan.take == ("s3",) and plan.steal is None


def test_expired_leases_of_a_dead_worker_are_taken() -> None:
    table = leases({"s0": "dead", "s1": "dead", "s2": "B", "s3": "B"})
    plan = plan_takes("B", table, {"s0", "s1"}, random.Random(0))
    assert set(plan.take) == {"s0", "s1"}
    assert plan.steal is None
    # Not expired: the same leases belong to a live worker and B is at its fair share.
    assert plan_takes("B", table, set(), random.Random(0)) == type(plan)()


def test_expired_leases_are_taken_only_up_to_the_fair_share() -> None:
    table = leases({"s0": "dead", "s1": "dead", "s2": "dead", "s3": "dead", "s4": "C", "s5": "C"})
    plan = plan_takes("B", table, {"s0", "s1", "s2", "s3"}, random.Random(0))
    # live workers: B and C → fair share ceil(6 / 2) = 3.
    assert len(plan.take) == 3 and set(plan.take) <= {"s0", "s1", "s2", "s3"}


def test_own_expired_leases_are_not_taken() -> None:
    table = leases({"s0": "A", "s1": None})
    plan = plan_takes("A", table, {"s0"}, random.Random(0))
    assert "s0" not in plan.take
    assert plan.take == ("s1",)
    assert plan_takes("A", leases({"s0": "A"}), {"s0"}, random.Random(0)).take == ()


@pytest.mark.parametrize(("table", "expected"), [
    pytest.param([Lease("p"), Lease("c1", parents=("p",)), Lease("c2", parents=("p",))], ["p"],
                 id="split-parent-open"),
    pytest.param([Lease("p", checkpoint="495"), Lease("c1", parents=("p",)), Lease("c2", parents=("p",))],
                 ["p"],
                 id="split-parent-partly-read"),
    pytest.param([Lease("p", checkpoint=SHARD_END), Lease("c1", parents=("p",)), Lease("c2", parents=("p",))],
                 ["c1", "c2"], id="split-parent-ended"),
    pytest.param([Lease("p1"), Lease("p2"), Lease("c", parents=("p1", "p2"))], ["p1", "p2"],
                 id="merge-parents-open"),
    pytest.param([Lease("p1", checkpoint=SHARD_END), Lease("p2"), Lease("c", parents=("p1", "p2"))], ["p2"],
                 id="merge-one-parent-ended"),
    pytest.param([Lease("p1"), Lease("p2", checkpoint=SHARD_END), Lease("c", parents=("p1", "p2"))], ["p1"],
                 id="merge-other-parent-ended"),
    pytest.param([Lease("p1", checkpoint=SHARD_END), Lease("p2", checkpoint=SHARD_END),
                  Lease("c", parents=("p1", "p2"))], ["c"], id="merge-both-ended"),
    pytest.param([Lease("c", parents=("gone",))], ["c"], id="parent-missing-counts-as-finished"),
    pytest.param([Lease("p1", checkpoint=SHARD_END), Lease("c", parents=("p1", "gone"))], ["c"],
                 id="merge-one-ended-one-missing"),
    pytest.param([Lease("g"), Lease("p", parents=("g",)), Lease("c", parents=("p",))], ["g"],
                 id="grandchild-waits"),
    pytest.param([Lease("s", checkpoint=SHARD_END)], [], id="finished-is-not-eligible"),
    pytest.param([Lease("s", checkpoint=TRIM_HORIZON, owner="A")], ["s"], id="owned-is-eligible"),
])
def test_eligible_respects_parents(table: list[Lease], expected: list[str]) -> None:
    assert [l.shard_id for l in eligible(table)] == expected


def test_children_are_not_taken_before_parents_end() -> None:
    table = [Lease("p"), Lease("c1", parents=("p",)), Lease("c2", parents=("p",))]
    assert plan_takes("A", table, set(), random.Random(0)).take == ("p",)
    ended = [Lease("p", checkpoint=SHARD_END), Lease("c1", parents=("p",)), Lease("c2", parents=("p",))]
    assert plan_takes("A", ended, set(), random.Random(0)).take == ("c1", "c2")
    # A child owned by nobody while its parent is owned by a live worker: nothing to take, nothing to steal.
    owned = [Lease("p", owner="B"), Lease("c1", parents=("p",)), Lease("c2", parents=("p",))]
    plan = plan_takes("A", owned, set(), random.Random(0))
    assert plan.take == () and plan.steal is None


def test_no_eligible_leases_no_plan() -> None:
    assert plan_takes("A", [], set()) == plan_takes("A", [Lease("s", checkpoint=SHARD_END)], set())
    assert plan_takes("A", [], set()).take == ()


def test_expiry_only_after_the_duration_with_an_unchanged_counter() -> None:
    tracker = ExpiryTracker(duration=10.0)
    lease = Lease("s0", owner="A", counter=5)
    assert tracker.observe([lease], 100.0) == set()   # first sight: a full duration of grace
    assert tracker.observe([lease], 109.9) == set()
    assert tracker.observe([lease], 110.0) == {"s0"}
    assert tracker.observe([lease], 500.0) == {"s0"}


def test_expiry_resets_when_the_counter_moves() -> None:
    tracker = ExpiryTracker(duration=10.0)
    tracker.observe([Lease("s0", owner="A", counter=5)], 100.0)
    assert tracker.observe([Lease("s0", owner="A", counter=6)], 109.0) == set()
    assert tracker.observe([Lease("s0", owner="A", counter=6)], 118.9) == set()
    assert tracker.observe([Lease("s0", owner="A", counter=6)], 119.0) == {"s0"}


def test_expiry_resets_when_the_owner_changes() -> None:
    tracker = ExpiryTracker(duration=10.0)
    tracker.observe([Lease("s0", owner="A", counter=5)], 100.0)
    assert tracker.observe([Lease("s0", owner="B", counter=5)], 111.0) == set()
    assert tracker.observe([Lease("s0", owner="B", counter=5)], 121.0) == {"s0"}


def test_free_leases_never_expire() -> None:
    tracker = ExpiryTracker(duration=1.0)
    tracker.observe([Lease("s0")], 0.0)
    assert tracker.observe([Lease("s0")], 100.0) == set()


def test_expiry_is_per_lease() -> None:
    tracker = ExpiryTracker(duration=10.0)
    tracker.observe([Lease("a", owner="A", counter=1), Lease("b", owner="B", counter=1)], 0.0)
    scan = [Lease("a", owner="A", counter=2), Lease("b", owner="B", counter=1)]
    assert tracker.observe(scan, 10.0) == {"b"}


# ---------------------------------------------------------------------------------------------------
# transform (through the shard buffer, whose drained Arrow tables are what reaches the lake)

SHARD = "shardId-000000000001"


def transformer(skew_ms: int = 300_000, window: int = 1000, salt: bytes = b"salt") -> Transformer:
    config = TransformConfig(region=REGION, max_future_skew_ms=skew_ms, pii_salt=salt)
    return Transformer(config, DedupWindow(window))


def buffer(max_records: int = 100_000, max_bytes: int = 1 << 30, max_age_ms: float = 1e12,
           t: Transformer | None = None) -> ShardBuffer:
    return ShardBuffer(SHARD, t or transformer(), max_records, max_bytes, max_age_ms)


def feed_one(buf: ShardBuffer, data: bytes, seq: str, received_ms: int = RECEIVED_MS, now_ms: float = 0,
             pk: str = "pk") -> str:
    """Add one record; return 'ok', 'duplicate' or 'dead:<reason>'."""
    out = buf.extend([(data, seq, pk, received_ms)], now_ms)
    if out.ok:
        return "ok"
    if out.duplicate:
        return "duplicate"
    (reason,) = out.dead
    return f"dead:{reason}"


def rows(batch: Any) -> list[dict[str, Any]]:
    return [r for _, t in sorted(batch.raw.items()) for r in t.to_pylist()]


def dead_rows(batch: Any) -> list[dict[str, Any]]:
    return [r for _, t in sorted(batch.dead.items()) for r in t.to_pylist()]


def one(data: bytes, received_ms: int = RECEIVED_MS, **kw: Any) -> tuple[str, Any]:
    buf = buffer(t=transformer(**kw))
    outcome = feed_one(buf, data, "4960", received_ms)
    return outcome, buf.drain()


def epoch_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


@pytest.mark.parametrize(("ts_offset_ms", "outcome"), [
    (-86_400_000, "ok"),            # a day late: fine (late data is normal)
    (0, "ok"),
    (300_000, "ok"),                # exactly at the allowed skew
    (300_001, "dead:future_ts"),
    (3 * 86_400_000, "dead:future_ts"),   # days ahead
])
def test_future_timestamps_are_dead_lettered(ts_offset_ms: int, outcome: str) -> None:
    data = encode(make_event(ts=ms_to_iso(RECEIVED_MS + ts_offset_ms)))
    got, batch = one(data)
    assert got == outcome
    if outcome == "ok":
        assert [epoch_ms(r["ts"]) for r in rows(batch)] == [RECEIVED_MS + ts_offset_ms]
        assert dead_rows(batch) == []
    else:
        (dead,) = dead_rows(batch)
        assert dead["reason"] == "future_ts" and dead["data"] == data
        assert f"{ts_offset_ms // 1000} s" in dead["detail"]
        assert rows(batch) == []


@pytest.mark.parametrize(("data", "reason", "detail"), [
    (b"{nope", "malformed_json", "Invalid JSON"),
    (b"\xff\xfe", "invalid_utf8", "0xff"),
    (b"[]", "not_an_object", "object"),
    (b"x" * 9000, "oversize", "9000"),
    (encode(make_event(user_id=7)), "schema", "user_id"),
    (encode(make_event(event_type="hover")), "schema", "event_type"),
    (encode(make_event(ts="2026-11-26T10:00:00")), "schema", "ts"),
])
def test_invalid_records_are_dead_lettered_with_their_bytes(data: bytes, reason: str, detail: str) -> None:
    got, batch = one(data)
    assert got == f"dead:{reason}"
    assert rows(batch) == []
    (dead,) = dead_rows(batch)
    assert dead["reason"] == reason and detail in dead["detail"]
    assert dead["data"] == data
    assert (dead["partition_key"], dead["sequence_number"], dead["shard_id"]) == ("pk", "4960", SHARD)
    assert epoch_ms(dead["received_at"]) == RECEIVED_MS
    assert batch.dead_reasons == Counter({reason: 1})


def test_dead_letter_detail_is_bounded() -> None:
    obj = make_event(**{f"unknown_field_{i:03d}": i for i in range(200)})
    got, batch = one(encode(obj))
    assert got == "dead:schema"
    (dead,) = dead_rows(batch)
    assert 0 < len(dead["detail"]) <= 2000


def test_duplicates_are_dropped_within_the_window() -> None:
    buf = buffer(t=transformer(window=10))
    obj = make_event()
    outcomes = [feed_one(buf, encode(obj), str(i)) for i in range(3)]
    assert outcomes == ["ok", "duplicate", "duplicate"]
    # The same id in another spelling (upper case) is the same event.
    assert feed_one(buf, encode({**obj, "event_id": obj["event_id"].upper()}), "9") == "duplicate"
    batch = buf.drain()
    assert [(r["event_id"], r["sequence_number"]) for r in rows(batch)] == [(obj["event_id"], "0")]
    assert batch.duplicates == 3 and batch.records == 4


def test_dead_letters_do_not_enter_the_dedup_window() -> None:
    buf = buffer()
    obj = make_event(ts=ms_to_iso(RECEIVED_MS + 86_400_000))
    assert feed_one(buf, encode(obj), "1") == "dead:future_ts"
    # The same event later arrives with a sane clock: it is accepted, not called a duplicate.
    assert feed_one(buf, encode({**obj, "ts": ms_to_iso(RECEIVED_MS)}), "2") == "ok"


def test_pii_is_hashed_and_never_stored_raw() -> None:
    ip, ua = "203.0.113.77", "Mozilla/5.0 (SecretBrowser)"
    obj = make_event(context={"ip": ip, "user_agent": ua, "device": "mobile", "price": 12.5, "category": "c"})
    got, batch = one(encode(obj), salt=b"pepper")
    assert got == "ok"
    (row,) = rows(batch)
    assert row["ip_hash"] == hash_pii(ip, b"pepper") and row["ua_hash"] == hash_pii(ua, b"pepper")
    assert (row["device"], row["price"], row["category"]) == ("mobile", 12.5, "c")
    assert "ip" not in row and "user_agent" not in row
    assert not any(ip in str(v) or ua in str(v) for v in row.values())
    # Another salt gives other hashes; the same salt the same ones (joinable across batches).
    _, other = one(encode(obj), salt=b"other")
    assert rows(other)[0]["ip_hash"] != row["ip_hash"]
    _, same = one(encode(obj), salt=b"pepper")
    assert rows(same)[0]["ip_hash"] == row["ip_hash"]


@pytest.mark.parametrize(("a", "b", "same"), [
    (("203.0.113.7", b"s1"), ("203.0.113.7", b"s1"), True),
    (("203.0.113.7", b"s1"), ("203.0.113.7", b"s2"), False),
    (("203.0.113.7", b"s1"), ("203.0.113.8", b"s1"), False),
])
def test_hash_pii_is_stable_and_salted(a: tuple[str, bytes], b: tuple[str, bytes], same: bool) -> None:
    assert (hash_pii(*a) == hash_pii(*b)) is same
    assert a[0] not in hash_pii(*a) and len(hash_pii(*a)) >= 32


def test_missing_context_gives_null_columns() -> None:
    got, batch = one(encode(make_event()))
    assert got == "ok"
    (row,) = rows(batch)
    columns = ("device", "page", "referrer", "price", "category", "ip_hash", "ua_hash")
    assert [row[c] for c in columns] == [None] * 7


def test_accepted_row_carries_the_event_and_server_fields() -> None:
    obj = make_event(event_id=str(uuid.uuid4()).upper(), context={"price": 3.5, "page": "/x"},
                     ts="2026-11-26T12:29:58.5+02:00")
    got, batch = one(json.dumps(obj, indent=2).encode())
    assert got == "ok"
    (row,) = rows(batch)
    assert row["event_id"] == obj["event_id"].lower()
    assert (row["user_id"], row["session_id"], row["item_id"], row["event_type"], row["client_region"]) == (
        "u1", "s1", "i1", "view", REGION)
    assert (row["price"], row["page"]) == (3.5, "/x")
    assert epoch_ms(row["ts"]) == RECEIVED_MS - 1500
    assert epoch_ms(row["received_at"]) == RECEIVED_MS
    assert (row["shard_id"], row["sequence_number"]) == (SHARD, "4960")


# ---------------------------------------------------------------------------------------------------
# buffer


def test_empty_buffer_is_never_due() -> None:
    assert not buffer(max_records=1, max_bytes=1024, max_age_ms=0).due(1e12)


@pytest.mark.parametrize(("limits", "adds", "now_ms", "due"), [
    pytest.param({"max_records": 3}, 2, 0, False, id="below-count"),
    pytest.param({"max_records": 3}, 3, 0, True, id="at-count"),
    pytest.param({"max_bytes": 1024}, 5, 0, False, id="below-bytes"),
    pytest.param({"max_bytes": 1024}, 6, 0, True, id="at-bytes"),
    pytest.param({"max_age_ms": 1000}, 1, 999, False, id="young"),
    pytest.param({"max_age_ms": 1000}, 1, 1000, True, id="old"),
])
def test_buffer_due(limits: dict[str, Any], adds: int, now_ms: float, due: bool) -> None:
    buf = buffer(**limits)
    for i in range(adds):
        # Exactly 200 bytes per record (padded with JSON whitespace).
        data = encode(make_event())
        feed_one(buf, data + b" " * (200 - len(data)), str(i))
    assert buf.due(now_ms) is due


def test_buffer_age_counts_from_the_first_record() -> None:
    buf = buffer(max_age_ms=1000)
    feed_one(buf, encode(make_event()), "1", now_ms=500)
    feed_one(buf, encode(make_event()), "2", now_ms=1400)
    assert not buf.due(1499)
    assert buf.due(1500)


def test_drain_hands_over_everything_and_resets() -> None:
    buf = buffer()
    first = make_event(user_id="u1")
    records = [
        encode(first),
        encode(first),                                   # duplicate
        b"{broken",                                      # dead: malformed_json
        encode(make_event(user_id="u2", item_id="i9", event_type="purchase")),
        encode(make_event(ts=ms_to_iso(RECEIVED_MS + 10 * 86_400_000))),  # dead: future_ts
    ]
    outcomes = [feed_one(buf, r, f"49{i:03d}") for i, r in enumerate(records)]
    assert outcomes == ["ok", "duplicate", "dead:malformed_json", "ok", "dead:future_ts"]
    assert len(buf) == 5
    batch = buf.drain()
    assert (batch.shard_id, batch.first_seq, batch.last_seq) == (SHARD, "49000", "49004")
    assert batch.records == 5 and batch.duplicates == 1
    assert batch.dead_reasons == Counter({"malformed_json": 1, "future_ts": 1})
    bucket = RECEIVED_MS // MS_PER_HOUR
    assert list(batch.raw) == [bucket] and list(batch.dead) == [bucket]
    raw = batch.raw[bucket]
    assert raw.schema == RAW_SCHEMA
    assert raw.column("user_id").to_pylist() == ["u1", "u2"]
    assert raw.column("sequence_number").to_pylist() == ["49000", "49003"]
    assert raw.column("shard_id").to_pylist() == [SHARD] * 2
    assert raw.column("event_type").to_pylist() == ["view", "purchase"]
    dead = batch.dead[bucket]
    assert dead.schema == DEAD_LETTER_SCHEMA
    assert dead.column("reason").to_pylist() == ["malformed_json", "future_ts"]
    assert dead.column("data").to_pylist() == [records[2], records[4]]
    assert dead.column("sequence_number").to_pylist() == ["49002", "49004"]
    # Empty again, and the next batch starts its own range and counts.
    assert len(buf) == 0 and not buf.due(1e12)
    with pytest.raises(AssertionError):
        buf.drain()
    feed_one(buf, encode(make_event()), "50000")
    again = buf.drain()
    assert (again.first_seq, again.last_seq, again.records, again.duplicates, again.dead_reasons) == (
        "50000", "50000", 1, 0, Counter())


def test_a_batch_of_only_duplicates_has_no_tables() -> None:
    t = transformer()
    obj = encode(make_event())
    first = buffer(t=t)
    feed_one(first, obj, "1")
    first.drain()
    second = buffer(t=t)
    assert feed_one(second, obj, "2") == "duplicate"
    batch = second.drain()
    assert batch.raw == {} and batch.dead == {} and (batch.first_seq, batch.last_seq) == ("2", "2")


def test_rows_are_partitioned_by_receive_hour_not_event_time() -> None:
    hour_start = RECEIVED_MS - RECEIVED_MS % MS_PER_HOUR + MS_PER_HOUR  # 11:00:00.000
    buf = buffer()
    # The event's own time is in the previous day: the partition still follows the receive time.
    old_ts = ms_to_iso(hour_start - 86_400_000)
    buf.extend([
        (encode(make_event(item_id="a", ts=old_ts)), "1", "pk", hour_start - 1),
        (encode(make_event(item_id="b", ts=old_ts)), "2", "pk", hour_start),
        (b"bad", "3", "pk", hour_start),
        (encode(make_event(item_id="c", ts=old_ts)), "4", "pk", hour_start + MS_PER_HOUR - 1),
    ], 0)
    batch = buf.drain()
    before, after = (hour_start - 1) // MS_PER_HOUR, hour_start // MS_PER_HOUR
    assert sorted(batch.raw) == [before, after]
    assert batch.raw[before].column("item_id").to_pylist() == ["a"]
    assert batch.raw[after].column("item_id").to_pylist() == ["b", "c"]
    assert list(batch.dead) == [after]  # no empty dead-letter table for the hour without dead letters
    assert hour_partition(before) == ("2026-11-26", 10)
    assert hour_partition(after) == ("2026-11-26", 11)

    sink = LakeSink(LakeLayout("file:///lake"), pafs.LocalFileSystem(), REGION)
    name = batch_file_name(SHARD, "1", "4")
    assert sink.paths(batch) == [
        f"/lake/raw/region={REGION}/dt=2026-11-26/hour=10/{name}",
        f"/lake/raw/region={REGION}/dt=2026-11-26/hour=11/{name}",
        f"/lake/dead_letter/region={REGION}/dt=2026-11-26/hour=11/{name}",
    ]


@pytest.mark.parametrize(("received", "expected"), [
    (datetime(2026, 11, 26, 0, 0, tzinfo=UTC), ("2026-11-26", 0)),
    (datetime(2026, 11, 26, 23, 59, 59, 999000, tzinfo=UTC), ("2026-11-26", 23)),
    (datetime(2026, 12, 31, 23, 30, tzinfo=UTC), ("2026-12-31", 23)),
    (datetime(2027, 1, 1, 0, 0, tzinfo=UTC), ("2027-01-01", 0)),
    (datetime(2028, 2, 29, 12, 0, tzinfo=UTC), ("2028-02-29", 12)),
])
def test_hour_partition(received: datetime, expected: tuple[str, int]) -> None:
    assert hour_partition(epoch_ms(received) // MS_PER_HOUR) == expected


def test_lake_sink_writes_one_file_per_hour_named_after_the_range(tmp_path: Any) -> None:
    import pyarrow.parquet as pq

    buf = buffer()
    buf.extend([
        (encode(make_event(item_id="a")), "100", "pk", RECEIVED_MS),
        (b"{", "101", "pk", RECEIVED_MS),
        (encode(make_event(item_id="b")), "102", "pk", RECEIVED_MS + MS_PER_HOUR),
    ], 0)
    batch = buf.drain()
    sink = LakeSink(LakeLayout(f"file://{tmp_path}"), pafs.LocalFileSystem(), REGION)
    written = sink.write(batch)
    assert written == sink.paths(batch)
    name = f"{SHARD}-100-102.parquet"
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        f"dead_letter/region={REGION}/dt=2026-11-26/hour=10/{name}",
        f"raw/region={REGION}/dt=2026-11-26/hour=10/{name}",
        f"raw/region={REGION}/dt=2026-11-26/hour=11/{name}",
    ]
    assert pq.read_table(written[0]).column("item_id").to_pylist() == ["a"]
    assert pq.read_table(written[1]).column("item_id").to_pylist() == ["b"]
    assert pq.read_table(written[2]).column("data").to_pylist() == [b"{"]
    # Writing the same batch again (a replay) rewrites the same files and adds none.
    assert sink.write(batch) == written
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 3
