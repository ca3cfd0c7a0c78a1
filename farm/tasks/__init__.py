"""The farm's Celery tasks and the stages they run. Tasks, named in farm.canvas: farm.dispatch_batch
(dispatch_batch.py), the stage tasks of a slice's chain, farm.generate, farm.moderate, farm.validate and
farm.score (chain.py), farm.rank (rank.py), farm.reap (reap.py). Stages, one module each, each run by its
stage task through farm.tasks.stage with a lease (lease.py): generate, moderate, validate, score. Each is a
thin wrapper: decode ids, call farm.ml, record in SQL.

Importing the package, which every worker does, connects the worker signal handlers, model preload in each
pool child (farm.tasks.runtime) and the embedded beat's lifeline (farm.worker), and registers the device
workers' control commands (farm.worker). The rest of a worker's life is in its bootsteps (farm.lifecycle).
"""

from farm import worker as _worker  # noqa: F401
from farm.tasks import runtime as _runtime  # noqa: F401
