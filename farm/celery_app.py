"""The Celery app: broker and result backend on Redis, routes, and the settings that keep work from being
lost or doubled (late acks, requeue on a lost worker, prefetch of one, JSON only). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from celery import Celery

from farm.broker import CONTROL_QUEUE, PRIORITY_SEP, PRIORITY_STEPS
from farm.canvas import CONTROL_TASKS, REAP_TASK
from farm.config import Settings, load_settings
from farm.gpu_pinning.bootstep import DEVICE_OPTION, DeviceWorker

#: A worker's life beyond its tasks (farm.lifecycle), one bootstep per concern, added to each blueprint by
#: name: Celery loads them when a worker starts. Importing them imports farm.worker, which registers the
#: workers' control commands, and a process that only sends (the web, the CLI) must not.
LIFECYCLE_STEPS = {
    "worker": ["farm.lifecycle:QcWorkerBeside"],
    "consumer": [
        "farm.lifecycle:ReapOnStart",
        "farm.lifecycle:FollowModelQueues",
        "farm.lifecycle:DrainOnSigterm",
        "farm.lifecycle:SweepHandoff",
    ],
}

TASK_MODULES = [
    "farm.tasks.dispatch_batch",
    "farm.tasks.chain",
    "farm.tasks.rank",
    "farm.tasks.reap",
]


def celery_config(settings: Settings) -> dict:
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        "priority_steps": list(PRIORITY_STEPS),
        "sep": PRIORITY_SEP,
        # Messages of a worker killed outright come back once their visibility timeout passes, found by a
        # sweep every interval x throttle seconds (kombu's default is about 100 s).
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_time_limit": settings.task_time_limit,
        # The soft limit raises inside the stage, which fails the slice's candidates and passes the slice on.
        "task_soft_time_limit": int(settings.task_time_limit * 0.9),
        # Model loads happen in worker_process_init; give them time before the child is declared dead.
        "worker_proc_alive_timeout": 600.0,
        "result_expires": 7 * 24 * 3600,
        "task_default_queue": CONTROL_QUEUE,
        "task_routes": {name: {"queue": CONTROL_QUEUE} for name in CONTROL_TASKS},
        "beat_schedule": {
            "reap-stalled-work": {
                "task": REAP_TASK,
                "schedule": float(settings.reaper_interval),
                "options": {"queue": CONTROL_QUEUE, "expires": settings.reaper_interval},
            },
        },
        # Task events cost a device worker 2-4 ms per slice (three publishes to Redis, and one more per task
        # it sends); nothing in the farm reads them. Flower switches them on in every worker while it runs
        # (its enable_events broadcast every 5 s), so it sees each task from the moment a worker receives it.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
    }


def make_app(settings: Settings | None = None) -> Celery:
    """The app, with the ``--device`` worker option and the bootstep that makes a plain
    `celery -A farm.celery_app worker -Q cuda0` the device worker `farm worker --device cuda0` starts, and
    the bootsteps of a worker's life (``LIFECYCLE_STEPS``), which each worker started from it runs."""
    settings = settings or load_settings()
    app = Celery("farm", include=TASK_MODULES)
    app.conf.update(celery_config(settings))
    app.user_options["worker"].add(DEVICE_OPTION)
    app.steps["worker"].add(DeviceWorker)
    for blueprint, steps in LIFECYCLE_STEPS.items():
        app.steps[blueprint].update(steps)
    return app


_apps: dict[str, Celery] = {}


def app_for(settings: Settings) -> Celery:
    """The app to send with for these settings: the process-wide one, or one per other broker (`farm bench`,
    tests and tools that drive a second farm from one process)."""
    if settings.broker_url == app.conf.broker_url:
        return app
    if settings.broker_url not in _apps:
        _apps[settings.broker_url] = make_app(settings)
    return _apps[settings.broker_url]


app = make_app()
