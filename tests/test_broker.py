"""farm.broker: the queue names and lists the transport uses, and reading queues without becoming a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from farm import broker
from farm.celery_app import app

#: Run in a fresh interpreter: what a web process has registered after reading the queue lengths.
WEB_PROCESS = """
import json
from celery.worker.control import Panel
import web, web.api, web.ops, web.ui
from farm.config import load_settings
from web import metrics
depths = metrics.queue_depths(load_settings(), ["slices", "control"])
print(json.dumps({"depths": depths, "commands": sorted(Panel.data)}))
"""


def test_the_web_reads_queue_lengths_without_registering_worker_control_commands(tmp_path):
    env = {**os.environ, "FARM_HOME": str(tmp_path), "FARM_BROKER_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-c", WEB_PROCESS], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["depths"] is None, "the broker is unreachable: no lengths"
    assert not [c for c in seen["commands"] if c.startswith("farm")], seen["commands"]


def test_a_worker_process_registers_the_commands_the_farm_sends():
    from celery.worker.control import Panel

    import farm.worker  # noqa: F401

    assert {broker.MODELS_COMMAND, broker.TAKE_SLICES_COMMAND} <= set(Panel.data)


def test_queue_keys_are_the_lists_the_transport_keeps_for_each_priority_step():
    transport = app.conf.broker_transport_options
    assert transport["priority_steps"] == list(broker.PRIORITY_STEPS)
    assert transport["sep"] == broker.PRIORITY_SEP
    assert broker.queue_keys("cuda0") == ["cuda0", "cuda0:3", "cuda0:6", "cuda0:9"]


def test_a_qc_workers_queue_is_its_name_and_bound_to_its_host():
    assert broker.qc_queue("cuda0", "gpu-box-1") == "qc-cuda0@gpu-box-1"
    assert broker.qc_queue("cuda0", "h").startswith(broker.QC_PREFIX)
