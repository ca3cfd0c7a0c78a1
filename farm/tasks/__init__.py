"""Celery tasks and the stages they run, one module per stage (generate, moderate, validate, score; check runs
the last three on a slice). Each is a thin wrapper: decode ids, call farm.ml, record in SQL.

Importing the package connects the worker signal handlers: model preload in each pool child
(farm.tasks.runtime) and the graceful SIGTERM of device workers (farm.worker).
"""

from farm import worker as _lifecycle  # noqa: F401
from farm.tasks import runtime as _runtime  # noqa: F401
