"""Replaying MovieLens, DIGINETICA and JSONL files: small samples written by the tests themselves."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamrec.cli.common import UserError
from streamrec.cli.events import app
from streamrec.clickstream.config import GeneratorConfig
from streamrec.clickstream.generate import generate_region
from streamrec.clickstream.publish import write_jsonl
from streamrec.clickstream.replay import ReplayError, replay
from streamrec.events import parse_event

# user item rating unix_ts, deliberately out of time order, as in u.data.
MOVIELENS = """196\t242\t3\t881250949
186\t302\t3\t891717742
196\t377\t1\t881250000
196\t51\t5\t881251000
196\t346\t4\t881260000
22\t377\t2\t878887116
"""
DIGINETICA = """session_id;user_id;item_id;timeframe;eventdate
1;NA;81766;526309;2016-05-09
1;NA;31331;1031018;2016-05-09
2;2;24764;8863;2016-04-09
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _events(records) -> list[dict]:
    return [json.loads(r.data) for r in records]


def test_movielens_ratings_become_events_by_rating_in_time_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "u.data", MOVIELENS)
    records = list(replay(path, "movielens", "eu-west-1"))
    events = _events(records)
    assert [(e["user_id"], e["item_id"], e["event_type"]) for e in events] == [
        ("ml-u22", "ml-i377", "view"),  # rating 2
        ("ml-u196", "ml-i377", "view"),  # rating 1
        ("ml-u196", "ml-i242", "click"),  # rating 3
        ("ml-u196", "ml-i51", "purchase"),  # rating 5
        ("ml-u196", "ml-i346", "add_to_cart"),  # rating 4
        ("ml-u186", "ml-i302", "click"),
    ]
    assert events[0]["ts"] == "1997-11-07T07:18:36.000Z"  # the real timestamp, 878887116
    assert all(
        r.kind == "valid" and r.region == "eu-west-1" and r.partition_key == e["user_id"]
        for r, e in zip(records, events)
    )
    for r in records:
        parse_event(r.data)
    # u196's first three ratings are within 30 minutes: one session; the fourth, hours later, another.
    sessions = [e["session_id"] for e in events if e["user_id"] == "ml-u196"]
    assert sessions[0] == sessions[1] == sessions[2] != sessions[3]


def test_replaying_twice_gives_the_same_event_ids(tmp_path: Path) -> None:
    path = _write(tmp_path, "u.data", MOVIELENS)
    first = list(replay(path, "movielens", "us-east-1"))
    assert first == list(replay(path, "movielens", "us-east-1"))
    ids = [e["event_id"] for e in _events(first)]
    assert len(set(ids)) == len(ids)
    # Ids do not depend on the shift: a shifted replay is recognisably the same events.
    shifted = _events(replay(path, "movielens", "us-east-1", shift_to_now=True))
    assert [e["event_id"] for e in shifted] == ids


def test_diginetica_views_use_session_users_where_the_user_is_unknown(tmp_path: Path) -> None:
    path = _write(tmp_path, "views.csv", DIGINETICA)
    events = _events(replay(path, "diginetica", "us-east-1"))
    assert [(e["user_id"], e["session_id"], e["item_id"], e["ts"]) for e in events] == [
        ("dg-u2", "dg-s2", "dg-i24764", "2016-04-09T00:00:08.863Z"),
        ("dg-s1", "dg-s1", "dg-i81766", "2016-05-09T00:08:46.309Z"),  # midnight + 526309 ms
        ("dg-s1", "dg-s1", "dg-i31331", "2016-05-09T00:17:11.018Z"),
    ]
    assert {e["event_type"] for e in events} == {"view"}


def test_shift_to_now_moves_the_latest_event_to_now_and_keeps_gaps(tmp_path: Path) -> None:
    path = _write(tmp_path, "views.csv", DIGINETICA)
    now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    original = [parse_event(r.data).ts for r in replay(path, "diginetica", "us-east-1")]
    shifted = [
        parse_event(r.data).ts for r in replay(path, "diginetica", "us-east-1", shift_to_now=True, now=now)
    ]
    assert shifted[-1] == int(now.timestamp() * 1000)
    assert [b - a for a, b in zip(shifted, shifted[1:])] == [b - a for a, b in zip(original, original[1:])]


def test_limit_keeps_the_earliest_records(tmp_path: Path) -> None:
    path = _write(tmp_path, "u.data", MOVIELENS)
    everything = list(replay(path, "movielens", "us-east-1"))
    assert list(replay(path, "movielens", "us-east-1", limit=2)) == everything[:2]


def test_jsonl_replays_every_record_byte_for_byte(tmp_path: Path) -> None:
    config = GeneratorConfig(
        seed=3,
        regions=("us-east-1",),
        users_per_region=50,
        items=100,
        events_per_region=2_000,
        malformed_share=0.05,
        end=datetime(2024, 5, 1, tzinfo=UTC),
    )
    generated = list(generate_region(config, "us-east-1"))
    path = tmp_path / "capture.jsonl"
    assert write_jsonl(path, generated).records_put == len(generated)
    replayed = list(replay(path, "jsonl", "us-east-1"))
    assert [r.data for r in replayed] == [r.data for r in generated]  # invalid UTF-8 and all
    # Kind comes from parsing: what the generator made malformed (but future-dated) is malformed again.
    for before, after in zip(generated, replayed):
        broken = before.kind == "malformed" and before.reason != "future_ts"
        assert after.kind == ("malformed" if broken else "valid")
        if not broken:
            assert after.partition_key == json.loads(before.data)["user_id"]
    assert list(replay(path, "jsonl", "us-east-1", limit=10)) == replayed[:10]


def test_jsonl_lines_keep_their_bytes_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b'{"a":1}\n\n  \nnot json\ncaf\xe9\n{"last":true}')  # no newline at the end
    records = list(replay(path, "jsonl", "us-east-1"))
    assert [r.data for r in records] == [b'{"a":1}', b"not json", b"caf\xe9", b'{"last":true}']
    assert [r.reason for r in records] == ["schema", "malformed_json", "invalid_utf8", "schema"]
    assert all(1 <= len(r.partition_key) <= 256 for r in records)


@pytest.mark.parametrize(
    "fmt, text, line",
    [
        ("movielens", "196\t242\t3\t881250949\n196\t242\tthree\t881250949\n", ":2:"),
        ("movielens", "196\t242\t9\t881250949\n", ":1:"),
        ("diginetica", "session;user\n1;NA;2;3;2016-05-09\n", ":1:"),
        ("diginetica", DIGINETICA + "3;NA;5;6;09/05/2016\n", ":5:"),
    ],
)
def test_a_wrong_line_is_named(tmp_path: Path, fmt: str, text: str, line: str) -> None:
    path = _write(tmp_path, "data.txt", text)
    with pytest.raises(ReplayError, match=line):
        list(replay(path, fmt, "us-east-1"))


def test_impossible_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        replay(tmp_path / "missing.csv", "diginetica", "us-east-1")
    path = _write(tmp_path, "x.jsonl", "{}\n")
    with pytest.raises(ValueError, match="shift-to-now"):
        replay(path, "jsonl", "us-east-1", shift_to_now=True)
    with pytest.raises(ValueError, match="unknown format"):
        replay(path, "parquet", "us-east-1")  # type: ignore[arg-type]


def test_cli_replay_to_jsonl(tmp_path: Path) -> None:
    path = _write(tmp_path, "u.data", MOVIELENS)
    out = tmp_path / "out" / "ml-{region}.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "replay",
            str(path),
            "--format",
            "movielens",
            "--region",
            "eu-west-1",
            "--to",
            "jsonl",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    written = (tmp_path / "out" / "ml-eu-west-1.jsonl").read_bytes().splitlines()
    assert written == [r.data for r in replay(path, "movielens", "eu-west-1")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.data", "--format", "movielens", "--to", "jsonl", "--out", "o.jsonl"], "no such file"),
        (["bad.data", "--format", "movielens", "--to", "jsonl", "--out", "o.jsonl"], "bad.data:1:"),
        (
            ["bad.data", "--format", "jsonl", "--shift-to-now", "--to", "jsonl", "--out", "o.jsonl"],
            "shift-to-now",
        ),
        (["bad.data", "--format", "movielens", "--to", "jsonl"], "needs --out"),
    ],
)
def test_cli_replay_user_mistakes_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "bad.data", "not\ta\trating\n")
    result = CliRunner().invoke(app, ["replay", *args])
    assert isinstance(result.exception, UserError) and message in str(result.exception)


def test_cli_rejects_an_unknown_format(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["replay", "x", "--format", "csv"])
    assert result.exit_code == 2 and "csv" in result.output
