"""`farm chaos`: the audit that judges a soak, and a short seeded soak of a real farm (SQLite pass only)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from farm.chaos import Chaos
from tests import pgutil

ROOT = Path(__file__).resolve().parent.parent


def test_the_audit_finds_lost_candidates_stuck_batches_and_files_without_rows(tmp_path):
    from farm import dispatch
    from farm.db import migrate

    soak = Chaos(tmp_path / "home", seed=1, minutes=0, settle_minutes=0)
    migrate(soak.settings.database_url)
    manifest, items = dispatch.plan("name: a\nmodel: tiny\nitems: [a fox]\n", settings=soak.settings)
    batch = dispatch.create_batch(manifest, items, "", settings=soak.settings).batch_id
    folder = soak.settings.artifacts_dir / batch
    folder.mkdir(parents=True)
    (folder / "stray.png").write_bytes(b"not a candidate's image")

    audit = soak.audit()
    assert audit.stuck == [batch]
    assert len(audit.lost) == audit.candidates == 4
    assert audit.orphan_files == ["stray.png"] and audit.unranked
    assert {p.split(":")[0] for p in audit.problems} == {"lost", "stuck", "unranked", "orphan files"}


@pytest.mark.slow
@pgutil.sqlite_pass_only
def test_a_two_minute_seeded_fault_soak_loses_doubles_and_leaves_nothing(tmp_path):
    env = {**os.environ, "FARM_FAULTS": "0"}
    run = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "farm", "chaos", "--minutes", "2", "--settle", "3"]
        + ["--seed", "7", "--home", str(tmp_path / "home")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    lines = [line.strip() for line in run.stdout.splitlines() if "  " in line.strip()]
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines)
    assert int(table["faults injected"]) >= 5, out
    for check in ("lost", "doubled", "stuck", "unranked items", "processes left"):
        assert table[check] == "0", out
    assert table["orphans"].startswith("0 files, 0 rows"), out
