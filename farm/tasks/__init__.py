"""Celery tasks, one module per stage. Each is a thin wrapper: decode ids, call farm.ml, record in SQL."""

from farm import worker as _lifecycle  # noqa: E402,F401  (connects the graceful SIGTERM of device workers)
