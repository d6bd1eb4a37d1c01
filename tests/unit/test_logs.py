"""Structured logs (streamrec.logs): one JSON object per line, written to the current sys.stderr."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from streamrec.logs import configure_logging

pytestmark = pytest.mark.unit


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_records_are_json_lines_with_the_context(root_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    configure_logging("ingest", region="us-east-1", run_id="r1")
    logging.getLogger("streamrec.test").info("batch written", extra={"rows": 3})
    record = json.loads(err.getvalue().splitlines()[-1])
    assert {k: record[k] for k in ("component", "region", "run_id", "rows")} == {
        "component": "ingest", "region": "us-east-1", "run_id": "r1", "rows": 3}
    assert record["msg"] == "batch written" and record["level"] == "INFO"


def test_a_swapped_and_closed_stderr_is_not_written_to(root_logging: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in-process by a test runner configures logging while sys.stderr is the runner's
    capture file, which is closed afterwards; later records must go to the stderr of their time."""
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    configure_logging("cli")
    captured.close()
    after = io.StringIO()
    monkeypatch.setattr(sys, "stderr", after)
    logging.getLogger("py4j.clientserver").warning("Closing down clientserver connection")
    assert "Closing down clientserver connection" in after.getvalue()
    assert "Logging error" not in after.getvalue()
