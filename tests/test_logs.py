"""Structured logs: fields on every farm event, as key=value text or as JSON lines."""

from __future__ import annotations

import io
import json
import logging

from farm.logs import event, install


def _capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    log = logging.getLogger(f"farm.test.{fmt}")
    log.handlers[:] = [logging.StreamHandler(stream)]
    log.handlers[0].setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.propagate = False
    log.setLevel(logging.INFO)
    install(log, fmt)
    return log, stream


def test_json_logs_carry_batch_item_and_candidate_ids():
    log, stream = _capture("json")
    event(log, "generate done", batch="b1", item="b1-00002", candidates=["b1-00002-000", "b1-00002-001"])
    record = json.loads(stream.getvalue())
    assert record["message"] == "generate done" and record["level"] == "INFO"
    assert record["batch"] == "b1" and record["item"] == "b1-00002"
    assert record["candidates"] == ["b1-00002-000", "b1-00002-001"]


def test_text_logs_append_the_fields_as_key_value():
    log, stream = _capture("text")
    event(log, "item ranked", item="b1-00000", winners=["b1-00000-003"], batch_closed=True)
    line = stream.getvalue().strip()
    assert line.startswith("INFO item ranked")
    assert "item=b1-00000" in line and "winners=[b1-00000-003]" in line and "batch_closed=True" in line
