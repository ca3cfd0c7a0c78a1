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
    status = subprocess.run([*farm, "status", batch_id, "--json"], env=env, capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    data = json.loads(status.stdout)
    assert data["status"] == "done" and len(data["items"]) == 8
    for item in data["items"]:
        assert len(item["candidates"]) == item["params"].get("candidates", len(item["candidates"]))
        for c in item["candidates"]:
            assert {"seed", "device", "status", "image_path", "verdict", "reasons", "score", "rank", "error"} <= set(c)
        winner = next(c for c in item["candidates"] if c["id"] == item["winners"][0])
        assert winner["rank"] == 1 and Path(env["FARM_HOME"], "artifacts", winner["image_path"]).exists()
    assert not list(Path(env["FARM_HOME"]).glob("redis/*.sock")), "the demo stops its embedded redis"
