"""Structured logs: every record about farm work carries its batch, item and candidate ids.

``event(log, msg, **fields)`` logs with the fields attached; with FARM_LOG_FORMAT=json, workers write one JSON
object per line (time, level, logger, message, the fields, and Celery's task id and name), which a log stack
can index by batch or candidate; otherwise the fields are appended to the message as ``key=value``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

FIELDS = "farm"


def event(log: logging.Logger, msg: str, *, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, msg, extra={FIELDS: fields})


class KeyValueFormatter(logging.Formatter):
    """The usual text line, with the event's fields appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, FIELDS, None)
        if fields:
            line += " " + " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **(getattr(record, FIELDS, None) or {}),
        }
        for attr in ("task_id", "task_name"):
            if hasattr(record, attr):
                out[attr] = getattr(record, attr)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _short(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) > 4:
        return f"[{','.join(map(str, value[:4]))},...+{len(value) - 4}]"
    if isinstance(value, list | tuple):
        return f"[{','.join(map(str, value))}]"
    return str(value)


def install(root: logging.Logger, fmt: str) -> None:
    """Put the farm's formatter on every handler of ``root`` (Celery's, once it has set them up)."""
    for handler in root.handlers:
        if fmt == "json":
            handler.setFormatter(JsonFormatter())
        else:
            base = handler.formatter._fmt if handler.formatter else None  # noqa: SLF001
            handler.setFormatter(KeyValueFormatter(base))
