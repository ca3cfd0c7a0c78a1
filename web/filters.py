"""Jinja filters for figures on the pages: durations, rates, scores, times."""

from __future__ import annotations

from datetime import datetime

from flask import Flask

from farm.states import BatchStatus, CandidateStatus


def duration(seconds: float | None) -> str:
    """``3725`` -> ``1h 2m``; None -> an en dash."""
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def rate(per_second: float | None) -> str:
    if per_second is None:
        return "–"
    if per_second >= 1:
        return f"{per_second:.2f}/s"
    return f"{per_second * 60:.1f}/min"


def number(value: float | None, places: int = 3) -> str:
    return "–" if value is None else f"{value:.{places}f}"


def when(value: datetime | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        value = datetime.fromisoformat(value.removesuffix("Z"))
    return value.strftime("%Y-%m-%d %H:%M:%S")


def percent(done: int, total: int) -> int:
    return 0 if not total else int(100 * done / total)


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(duration=duration, rate=rate, number=number, when=when)
    app.jinja_env.globals["percent"] = percent
    # Templates compare statuses through farm.states too: one spelling of each.
    app.jinja_env.globals.update(BatchStatus=BatchStatus, CandidateStatus=CandidateStatus)
