"""The `farm` command as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_schema_prints_the_manifest_json_schema():
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert "items" in json.dumps(schema)


def test_dry_run_prints_expanded_counts_and_enqueues_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["submit", "--dry-run", str(ROOT / "batches" / "example.yaml")])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert counts["items"] == 8 and counts["candidates"] == 32
    assert not (tmp_path / "home" / "farm.db").exists()


def test_dry_run_of_the_operators_manifest_still_names_absolute_paths(tmp_path, monkeypatch):
    """The CLI is the operator: files and model folders anywhere on the disk, as before uploads were
    limited to FARM_ASSET_DIRS (which is empty here)."""
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "pipe").mkdir(parents=True)
    (elsewhere / "pipe" / "model_index.json").write_text("{}")
    (elsewhere / "blocked.txt").write_text("ab" * 32 + ",known-bad\n")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    path = manifests / "m.yaml"
    path.write_text(f"name: op\nmodel: {elsewhere / 'pipe'}\nitems: [a cat]\n"
                    f"moderation: {{pdq_blocklist: {elsewhere / 'blocked.txt'}}}\n")
    result = CliRunner().invoke(cli, ["submit", "--dry-run", str(path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"] == str((elsewhere / "pipe").resolve())


def test_submit_of_an_invalid_manifest_names_the_field_and_exits_nonzero(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: tiny\nitems: [a cat]\ndefaults: {size: 100x64}\n")
    result = CliRunner().invoke(cli, ["submit", str(bad)])
    assert result.exit_code != 0
    assert "defaults.size" in result.output


def test_worker_refuses_a_device_missing_from_farm_devices(monkeypatch):
    result = CliRunner().invoke(cli, ["worker", "--device", "cuda7"])
    assert result.exit_code != 0 and "cuda7" in result.output


def test_a_qc_worker_is_refused_unless_farm_qc_is_worker_and_a_device_is_named(monkeypatch):
    result = CliRunner().invoke(cli, ["worker", "--device", "cuda0", "--qc"])
    assert result.exit_code == 2 and "set FARM_QC=worker" in result.output
    monkeypatch.setenv("FARM_QC", "worker")
    result = CliRunner().invoke(cli, ["worker", "--control", "--qc"])
    assert result.exit_code == 2 and "--qc goes with --device NAME" in result.output


@pytest.mark.slow
def test_farm_demo_runs_the_example_to_a_ranked_table_readable_with_status_json(tmp_path):
    env = {**os.environ, "FARM_HOME": str(tmp_path / "demo")}
    env.pop("FARM_DEVICES", None)
    farm = [sys.executable, "-m", "farm"]
    run = subprocess.run([*farm, "demo"], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "winning images:" in out and "farm up" in out and "a red fox in the snow" in out
    batch_id = out.split("farm status ", 1)[1].split()[0]
    status = subprocess.run(
        [*farm, "status", batch_id, "--json"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    data = json.loads(status.stdout)
    assert data["status"] == "done" and len(data["items"]) == 8
    for item in data["items"]:
        assert len(item["candidates"]) == item["params"].get("candidates", len(item["candidates"]))
        for c in item["candidates"]:
            assert {
                "seed",
                "device",
                "status",
                "image_path",
                "verdict",
                "reasons",
                "score",
                "rank",
                "error",
            } <= set(c)
        winner = next(c for c in item["candidates"] if c["id"] == item["winners"][0])
        assert winner["rank"] == 1 and Path(env["FARM_HOME"], "artifacts", winner["image_path"]).exists()
        *_, last = item["rounds"]
        assert (last["kind"], last["winners"]) == ("ranked", item["winners"])
        assert [r["number"] for r in item["rounds"]] == list(range(len(item["rounds"])))
    assert not list(Path(env["FARM_HOME"]).glob("redis/*.sock")), "the demo stops its embedded redis"


@pytest.mark.slow
def test_farm_up_serves_dashboard_and_authenticated_flower_and_ctrl_c_stops_everything(tmp_path):
    import signal
    import socket
    import time
    import urllib.error
    import urllib.request

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    web, flower = free_port(), free_port()
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path / "up"),
        "FARM_DEVICES": "cuda0=cpu",
        "FARM_WEB_PORT": str(web),
        "FARM_FLOWER_PORT": str(flower),
        "FARM_FLOWER_AUTH": "ops:s3cret",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm", "up"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(banner)
        assert (
            f"dashboard  http://127.0.0.1:{web}" in text and f"flower     http://127.0.0.1:{flower}" in text
        )

        def get(url: str, auth: str | None = None) -> int:
            req = urllib.request.Request(url)
            if auth:
                import base64

                req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                return urllib.request.urlopen(req, timeout=5).status
            except urllib.error.HTTPError as exc:
                return exc.code

        deadline = time.monotonic() + 120
        while True:
            try:
                if (
                    get(f"http://127.0.0.1:{web}/") == 200
                    and get(f"http://127.0.0.1:{flower}/api/workers", "ops:s3cret") == 200
                ):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "dashboard or flower did not come up"
            time.sleep(1)
        assert get(f"http://127.0.0.1:{flower}/api/workers") == 401
        assert get(f"http://127.0.0.1:{flower}/api/workers", "ops:wrong") == 401
        children = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(children) >= 5, "redis, a worker, control, web and flower"
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
        assert proc.wait(120) == 0
        from farm.procs import leftovers

        deadline = time.monotonic() + 10
        while leftovers(env["FARM_HOME"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftovers(env["FARM_HOME"]), "processes left running after Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_cancel_status_and_workers_commands_against_real_workers(settings, stack, wait_batch):
    from farm import dispatch

    runner = CliRunner()
    head = "name: to-cancel\nmodel: tiny\ndefaults: {candidates: 4, steps: 2, size: 64x64}\nitems:\n"
    big = head + "".join(f"  - prompt {i}\n" for i in range(30))
    done = dispatch.submit(big, settings=settings)
    result = runner.invoke(cli, ["cancel", done.batch_id])
    assert result.exit_code == 0 and "cancelled" in result.output
    assert wait_batch(done.batch_id) == "cancelled"
    again = runner.invoke(cli, ["cancel", done.batch_id])
    assert again.exit_code != 0 and "already finished" in again.output
    data = json.loads(runner.invoke(cli, ["status", done.batch_id, "--json"]).output)
    statuses = {c["status"] for it in data["items"] for c in it["candidates"]}
    assert statuses <= {"cancelled", "passed", "rejected", "failed"} and "cancelled" in statuses
    listing = runner.invoke(cli, ["status"]).output
    assert done.batch_id in listing and "cancelled" in listing
    import time

    deadline = time.monotonic() + 180
    while True:  # each worker writes its row once its models are loaded
        workers = json.loads(runner.invoke(cli, ["workers", "--json"]).output)
        serving = {w["queue"]: w for w in workers}
        if {"cuda0", "cuda1"} <= set(serving) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {"cuda0", "cuda1"} <= set(serving)
    for queue in ("cuda0", "cuda1"):
        assert serving[queue]["device"] == "cpu" and serving[queue]["models"]


def test_workers_shows_the_step_a_slice_in_flight_has_reached(tmp_path, monkeypatch):
    from farm.config import load_settings
    from farm.db import Worker, migrate, session_scope

    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    url = load_settings().database_url
    migrate(url)
    common = {"device": "cpu", "pid": 1, "hostname": "h", "models": {}}
    busy = {"current": "farm.generate c-1 (+1)", "step": 37, "steps": 150}
    with session_scope(url) as s:
        s.add(Worker(name="cuda0@h", queue="cuda0", **busy, **common))
        s.add(Worker(name="cuda1@h", queue="cuda1", **common))
    runner = CliRunner()
    text = runner.invoke(cli, ["workers"]).output
    assert "running farm.generate c-1 (+1) (step 37/150)" in text
    rows = {w["name"]: w for w in json.loads(runner.invoke(cli, ["workers", "--json"]).output)}
    assert (rows["cuda0@h"]["step"], rows["cuda0@h"]["steps"]) == (37, 150)
    assert rows["cuda1@h"]["step"] is None and rows["cuda1@h"]["current"] is None
