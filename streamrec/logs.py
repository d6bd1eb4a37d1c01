"""Structured JSON logs: one object per line with region, component and run id."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, **static: str) -> None:
        super().__init__()
        self.static = {k: v for k, v in static.items() if v}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        # Extra fields passed as logger.info("...", extra={...}) become top-level keys.
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler on whatever ``sys.stderr`` is when a record is written, not when the handler was
    made: a command run in-process by a test runner (or any caller that swaps and later closes
    ``sys.stderr``) would otherwise leave the root logger writing to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(component: str, *, region: str = "", run_id: str = "", level: str = "INFO") -> None:
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter(component=component, region=region, run_id=run_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # botocore and urllib3 are chatty at INFO, and py4j logs every Spark gateway connection it closes.
    for noisy in ("botocore", "urllib3", "boto3", "py4j"):
        logging.getLogger(noisy).setLevel("WARNING")
