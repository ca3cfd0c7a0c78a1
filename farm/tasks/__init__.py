"""Celery tasks, one module per stage. Each is a thin wrapper: decode ids, call farm.ml, record in SQL."""
