"""`make demo` end to end, small: the local stack, two regions, two workers each, full accounting."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.demo import DEMO_REGIONS, run_demo
from streamrec.devstack import stack

pytestmark = pytest.mark.e2e


def test_demo_accounts_for_every_record_and_tears_down(tmp_path: Path) -> None:
    state_dir = tmp_path / "demo"
    lines: list[str] = []
    reports, etl = run_demo(state_dir, events_per_region=2_000, users=200, items=300, days=3,
                            say=lines.append)

    assert [r.region for r in reports] == list(DEMO_REGIONS)
    for r in reports:
        assert r.produced == 2_000
        assert r.balanced, (r.region, r.produced, r.lake_rows, r.dead_lettered, r.duplicates)
        # The generator's shares: 1% malformed (all dead-lettered), 0.5% duplicate sends.
        assert r.produced_by_kind["duplicate"] == r.duplicates
        assert sum(r.dead_lettered.values()) == r.produced_by_kind["malformed"]
        assert {"schema", "malformed_json", "invalid_utf8", "oversize", "future_ts"} <= set(r.dead_lettered)
        assert r.users_online > 0
    # The ETL cleaned every full day of the window and accounts for every raw row of those days.
    assert [e.region for e in etl] == list(DEMO_REGIONS)
    for e in etl:
        assert len(e.days) in (3, 4)  # a 3-day window ending now spans 3 or 4 calendar days, the last partial
        assert e.balanced, (e.region, e.raw_rows, e.clean_rows, e.removed)
        # Bots are the only events removed (consumer-side dedup already caught the duplicate sends), and
        # never more than were sent (a bot's burst may fall on today, which the demo does not clean).
        assert set(e.removed) <= {"bot_session", "bot_user"}
        assert sum(e.removed.values()) <= reports[DEMO_REGIONS.index(e.region)].produced_by_kind["bot"]
        assert e.features["items"] > 0 and e.features["examples_eval"] > 0 and e.features["examples_train"] > 0
        assert e.keys["popular"] == 1 and e.keys["users"] == e.features["users"]
    # The servers are stopped; the lake stays for inspection.
    assert stack.status(state_dir) == []
    assert any((state_dir / "lake").rglob("*.parquet"))
    # Rerunnable: a second run starts from a clean slate and gives the same counts.
    again, etl_again = run_demo(state_dir, events_per_region=2_000, users=200, items=300, days=3,
                                say=lines.append)
    assert [(r.lake_rows, r.duplicates, dict(r.dead_lettered)) for r in again] == \
        [(r.lake_rows, r.duplicates, dict(r.dead_lettered)) for r in reports]
    assert [(e.clean_rows, dict(e.removed), e.features) for e in etl_again] == \
        [(e.clean_rows, dict(e.removed), e.features) for e in etl]
