"""The farm's Celery tasks and the stages they run. Tasks, named in farm.canvas: farm.dispatch_batch
(dispatch_batch.py), the stage tasks of a slice's chain, farm.generate, farm.moderate, farm.validate and
farm.score (chain.py), farm.rank (rank.py), farm.reap (reap.py). Stages, one module each, each run by its
stage task through farm.tasks.stage with a lease (lease.py): generate, moderate, validate, score. Each is a
thin wrapper: decode ids, call farm.ml, record in SQL.

Importing the package connects the worker signal handlers: model preload in each pool child
(farm.tasks.runtime) and the graceful SIGTERM of device workers (farm.worker).
"""

from farm import worker as _lifecycle  # noqa: F401
from farm.tasks import runtime as _runtime  # noqa: F401
