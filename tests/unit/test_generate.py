"""The synthetic clickstream: determinism, the record mix, schema validity and the planted truth."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from streamrec.cli.events import app
from streamrec.clickstream.config import GeneratorConfig
from streamrec.clickstream.generate import SESSION_GAP_MS, generate, generate_region
from streamrec.clickstream.malformed import MALFORMED_REASONS, PARSE_REASON
from streamrec.clickstream.records import GeneratedRecord
from streamrec.clickstream.truth import Truth, build_truth, write_truth
from streamrec.events import EVENT_TYPES, InvalidEvent, encode_event, parse_event

END = datetime(2024, 5, 1, tzinfo=UTC)
CONFIG = GeneratorConfig(seed=7, users_per_region=300, items=600, events_per_region=20_000, end=END)


def _ms(ts: str) -> int:
    return int(datetime.fromisoformat(ts).timestamp() * 1000)


@pytest.fixture(scope="module")
def truth() -> Truth:
    return build_truth(CONFIG)


@pytest.fixture(scope="module")
def records() -> list[GeneratedRecord]:
    return list(generate(CONFIG))


@pytest.fixture(scope="module")
def events(records: list[GeneratedRecord]) -> list[tuple[GeneratedRecord, dict]]:
    """Every valid and bot record (duplicates left out) with its decoded event."""
    return [(r, json.loads(r.data)) for r in records if r.kind in ("valid", "bot")]


def test_same_seed_gives_identical_bytes_and_another_seed_does_not() -> None:
    small = CONFIG.model_copy(update={"events_per_region": 2_000})
    first = list(generate(small))
    assert first == list(generate(small))
    other = [r.data for r in generate(small.model_copy(update={"seed": 8}))]
    assert len(set(other) & {r.data for r in first}) == 0


def test_each_region_gets_the_configured_mix(records: list[GeneratedRecord]) -> None:
    for region in CONFIG.regions:
        kinds = Counter(r.kind for r in records if r.region == region)
        assert sum(kinds.values()) == CONFIG.events_per_region
        for kind, share in (("bot", 0.02), ("malformed", 0.01), ("duplicate", 0.005)):
            assert kinds[kind] == pytest.approx(share * CONFIG.events_per_region, rel=0.05)
        assert kinds == Counter(CONFIG.counts_per_region())


def test_every_non_malformed_record_is_a_valid_canonical_event(records: list[GeneratedRecord]) -> None:
    for record in records:
        if record.kind == "malformed":
            continue
        event = parse_event(record.data)
        assert encode_event(event) == record.data  # already canonical: same bytes as the schema's encoder
        assert event.region == record.region
        assert record.partition_key == event.user_id


def test_malformed_records_fail_for_their_stated_reason(records: list[GeneratedRecord]) -> None:
    malformed = [r for r in records if r.kind == "malformed"]
    assert {r.reason for r in malformed} == set(MALFORMED_REASONS)
    for record in malformed:
        assert b"\n" not in record.data  # stays one line in a JSONL file
        if record.reason == "future_ts":
            # Schema-valid: only the consumer's clock can reject it.
            assert parse_event(record.data).ts > _ms(END.isoformat()) + 23 * 3600 * 1000
            continue
        with pytest.raises(InvalidEvent) as exc:
            parse_event(record.data)
        assert exc.value.reason == PARSE_REASON[record.reason], record


def test_duplicates_resend_the_exact_bytes_of_an_earlier_record(records: list[GeneratedRecord]) -> None:
    seen: set[bytes] = set()
    duplicates = 0
    for record in records:
        if record.kind == "duplicate":
            assert record.data in seen
            duplicates += 1
        elif record.kind in ("valid", "bot"):
            seen.add(record.data)
    assert duplicates == 2 * CONFIG.counts_per_region()["duplicate"]
    assert len(seen) == sum(1 for r in records if r.kind in ("valid", "bot"))  # event ids are unique


def test_records_come_in_time_order_and_regions_interleave(
    events: list[tuple[GeneratedRecord, dict]],
) -> None:
    for region in CONFIG.regions:
        ts = [_ms(e["ts"]) for r, e in events if r.region == region]
        assert ts == sorted(ts)
        assert _ms(CONFIG.window[0].isoformat()) <= ts[0] and ts[-1] < _ms(END.isoformat())
    first_hundred = {r.region for r, _ in events[:100]}
    assert first_hundred == set(CONFIG.regions)


def test_generate_region_is_that_region_of_generate(records: list[GeneratedRecord]) -> None:
    region = CONFIG.regions[1]
    assert list(generate_region(CONFIG, region)) == [r for r in records if r.region == region]


def test_users_belong_to_one_region_and_ids_have_the_documented_shape(
    events: list[tuple[GeneratedRecord, dict]], truth: Truth
) -> None:
    region_of: dict[str, set[str]] = defaultdict(set)
    for _, e in events:
        region_of[e["user_id"]].add(e["region"])
        assert e["user_id"][0] == "u" and len(e["user_id"]) == 7
        assert e["item_id"][0] == "i" and len(e["item_id"]) == 7
    assert all(len(regions) == 1 for regions in region_of.values())
    for region, users in truth.regions.items():
        assert {u for u, regions in region_of.items() if regions == {region}} <= set(
            users.user_ids + users.bot_ids
        )


def test_users_interact_mostly_with_their_planted_topic(
    events: list[tuple[GeneratedRecord, dict]], truth: Truth
) -> None:
    top_topic = {
        u: t for users in truth.regions.values() for u, t in zip(users.user_ids, users.top_topic.tolist())
    }
    item_topic = dict(zip(truth.item_ids, truth.item_topic.tolist()))
    human = [e for r, e in events if r.kind == "valid"]
    share = np.mean([item_topic[e["item_id"]] == top_topic[e["user_id"]] for e in human])
    assert share > 3 / truth.topics  # uniform choice would give about 1/K
    # And per user: the topic a user interacts with most is, for most users, the planted one.
    per_user: dict[str, Counter[int]] = defaultdict(Counter)
    for e in human:
        per_user[e["user_id"]][item_topic[e["item_id"]]] += 1
    active = [u for u, c in per_user.items() if c.total() >= 20]
    assert len(active) > 100
    assert np.mean([per_user[u].most_common(1)[0][0] == top_topic[u] for u in active]) > 0.6


def test_item_popularity_is_heavy_tailed(events: list[tuple[GeneratedRecord, dict]]) -> None:
    views = Counter(e["item_id"] for r, e in events if r.kind == "valid" and e["event_type"] == "view")
    counts = np.sort(np.array(list(views.values()) + [0] * (CONFIG.items - len(views))))[::-1]
    top_decile = counts[: CONFIG.items // 10].sum() / counts.sum()
    assert top_decile > 0.4  # uniform popularity would give 0.1
    assert counts[0] > 20 * np.median(counts)


def test_no_item_appears_before_it_is_first_seen(
    events: list[tuple[GeneratedRecord, dict]], truth: Truth
) -> None:
    first_seen = dict(zip(truth.item_ids, truth.item_first_seen_ms.tolist()))
    assert all(_ms(e["ts"]) >= first_seen[e["item_id"]] for _, e in events)
    start = _ms(CONFIG.window[0].isoformat())
    new_items = {i for i, t in first_seen.items() if t > start}
    assert len(new_items) > 0.1 * CONFIG.items
    assert {e["item_id"] for _, e in events} & new_items  # new items do get traffic once they appear


def test_sessions_follow_the_funnel_in_time_and_users_rest_between_sessions(
    events: list[tuple[GeneratedRecord, dict]],
) -> None:
    human = [e for r, e in events if r.kind == "valid"]
    types = Counter(e["event_type"] for e in human)
    assert types["view"] > types["click"] > types["add_to_cart"] > types["purchase"] > 0
    sessions: dict[str, list[dict]] = defaultdict(list)
    for e in human:
        sessions[e["session_id"]].append(e)
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for evs in sessions.values():
        ts = [_ms(e["ts"]) for e in evs]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)  # strictly increasing within a session
        assert len({e["user_id"] for e in evs}) == 1
        reached: Counter[tuple[str, int]] = (
            Counter()
        )  # each step of the funnel follows the step before, same item
        for e in evs:
            step = EVENT_TYPES.index(e["event_type"])
            if step > 0:
                assert reached[(e["item_id"], step - 1)] > 0, evs
            reached[(e["item_id"], step)] += 1
        spans[evs[0]["user_id"]].append((ts[0], ts[-1]))
    for user_spans in spans.values():
        user_spans.sort()
        for (_, end), (start, _) in zip(user_spans, user_spans[1:]):
            assert start - end >= SESSION_GAP_MS


def test_bots_are_fast_uniform_and_valid(events: list[tuple[GeneratedRecord, dict]], truth: Truth) -> None:
    bot_ids = {b for users in truth.regions.values() for b in users.bot_ids}
    bots = [e for r, e in events if r.kind == "bot"]
    assert {e["user_id"] for e in bots} == bot_ids
    per_bot: dict[str, list[int]] = defaultdict(list)
    for e in bots:
        per_bot[e["user_id"]].append(_ms(e["ts"]))
    for ts in per_bot.values():
        assert np.median(np.diff(ts)) <= 1000 / CONFIG.bot_rate_per_s * 1.5  # sustained, machine-like rate
    # Uniform items: bots do not follow popularity (many distinct items, none dominant).
    items = Counter(e["item_id"] for e in bots)
    assert items.most_common(1)[0][1] < 0.02 * len(bots)
    assert not ({e["user_id"] for r, e in events if r.kind == "valid"} & bot_ids)


def test_truth_file_holds_what_was_planted(tmp_path, truth: Truth) -> None:
    doc = json.loads(write_truth(tmp_path / "truth.json", CONFIG, truth).read_text())
    assert doc["format"] == "streamrec-clickstream-truth/1"
    assert GeneratorConfig.model_validate(doc["config"]) == CONFIG
    assert len(doc["items"]) == CONFIG.items
    assert len(doc["users"]) == len(CONFIG.regions) * (CONFIG.users_per_region + CONFIG.bots_per_region)
    human = next(u for u in doc["users"] if not u["bot"])
    assert human["top_topic"] == int(np.argmax(human["topic_preferences"]))
    item = doc["items"][0]
    assert {"item_id", "category", "topic", "vector", "popularity", "first_seen", "price"} <= set(item)
    assert len(item["vector"]) == CONFIG.latent_dim


@pytest.mark.parametrize(
    "overrides",
    [
        {"unknown_knob": 1},
        {"bot_share": 0.5, "malformed_share": 0.3, "duplicate_share": 0.2},
        {"regions": ("us-east-1", "us-east-1")},
        {"regions": ("mars-1",)},
        {"events_per_region": 1, "bot_share": 0.6},
        {"end": datetime(2024, 5, 1)},  # a time without zone is ambiguous
    ],
)
def test_config_rejects_mistakes(overrides: dict) -> None:
    with pytest.raises(ValidationError):
        GeneratorConfig(**{**CONFIG.model_dump(), **overrides})


def test_config_without_end_ends_at_the_current_hour() -> None:
    end = GeneratorConfig().resolved().end
    assert end is not None and end.minute == end.second == end.microsecond == 0
    assert datetime.now(UTC) - end < timedelta(hours=1, minutes=1)


def test_too_dense_a_config_is_refused_with_advice() -> None:
    dense = GeneratorConfig(
        users_per_region=2, events_per_region=20_000, days=1, regions=("us-east-1",), end=END
    )
    with pytest.raises(ValueError, match="30 minutes apart"):
        list(generate(dense))


def test_cli_generate_writes_replayable_jsonl_and_truth(tmp_path) -> None:
    out = tmp_path / "clicks-{region}.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--to",
            "jsonl",
            "--out",
            str(out),
            "-n",
            "500",
            "--users",
            "50",
            "--items",
            "100",
            "--end",
            "2024-05-01T00:00:00Z",
            "--truth-out",
            str(tmp_path / "truth.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    expected = GeneratorConfig(users_per_region=50, items=100, events_per_region=500, end=END)
    for region in expected.regions:
        lines = (tmp_path / f"clicks-{region}.jsonl").read_bytes().split(b"\n")
        assert lines[:-1] == [r.data for r in generate_region(expected, region)] and lines[-1] == b""
    assert json.loads((tmp_path / "truth.json").read_text())["config"]["events_per_region"] == 500
    assert "records per region" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--to", "jsonl"], "needs --out"),
        (["--to", "jsonl", "--out", "x.jsonl"], "must contain {region}"),
        (["--region", "mars-1", "--to", "jsonl", "--out", "x.jsonl"], "regions"),
        (["--end", "yesterday", "--to", "jsonl", "--out", "x.jsonl"], "ISO 8601"),
    ],
)
def test_cli_generate_user_mistakes_are_one_line_errors(
    tmp_path, monkeypatch, args: list[str], message: str
) -> None:
    from streamrec.cli.common import UserError

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["generate", "-n", "100", *args])
    assert isinstance(result.exception, UserError) and message in str(result.exception)
