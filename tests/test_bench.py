"""`farm bench` runs its runs and reports them; speed itself is judged in BENCHMARKS.md, never in a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import pgutil

# farm bench runs stacks of its own on the embedded default (the test clears FARM_*): a PostgreSQL pass
# would repeat the same run.
pytestmark = [pytest.mark.slow, pgutil.sqlite_pass_only]


def test_farm_bench_reports_runs_ratios_and_devices_keeping_each_runs_fastest_round(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "farm",
            "bench",
            "--items",
            "2",
            "--candidates",
            "2",
            "--steps",
            "1",
            "--slice-size",
            "2",
            "--repeat",
            "2",
            "--json",
        ],
        env={**env, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(run.stdout)
    assert set(data["runs"]) == {"A", "B", "C", "A2", "D"}
    for r in data["runs"].values():
        assert r["seconds"] > 0 and r["candidates_per_s"] > 0
        assert set(r["stage_share"]) == {"generate", "moderate", "validate", "score"}
    assert data["runs"]["B"]["devices"] == data["runs"]["D"]["devices"] == {"cuda0": 4}
    assert data["runs"]["D"]["peak_rss_mb"]["qc-cuda0"] > 50, "the QC worker's main process is measured"
    assert sum(data["runs"]["C"]["devices"].values()) == 4
    assert {"B/A", "C/A", "A2/A", "C/A2", "B/A_generate_only", "D/A_generate_only", "D/B"} <= set(
        data["ratios"]
    )
    assert "overhead_ms_per_candidate" in data
    assert 0 < data["b_outside_models_ms_per_candidate"] < data["runs"]["B"]["seconds"] * 1000 / 4
    assert data["repeat"] == 2
    for r in data["runs"].values():
        assert len(r["seconds_each"]) == 2 and r["seconds"] == min(r["seconds_each"]), "the fastest round"
    hops = {"generate->moderate", "moderate->validate", "validate->score"}
    for key in ("B", "C", "D"):
        gaps = data["runs"][key]["hop_ms"]
        assert set(gaps) == hops and all(ms >= 0 for ms in gaps.values()), (key, gaps)
    assert "hop_ms" not in data["runs"]["A"], "a bare loop has no hops"


def _farm_bench(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    """`farm bench ARGS` on the embedded default (no FARM_* of the suite), its temporary files in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    return subprocess.run(
        [sys.executable, "-m", "farm", "bench", *args],
        env={**env, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_bare_loop_that_fails_stops_the_bench_with_its_own_error(tmp_path):
    run = _farm_bench(tmp_path, "--model", str(tmp_path / "no-such-model"), "--items", "2")
    assert run.returncode == 1
    assert "Error: a bare-loop process failed before its loop started (exit 1)" in run.stderr
    assert f"generator model folder '{tmp_path / 'no-such-model'}' does not exist" in run.stderr


def test_fewer_items_than_devices_is_refused_before_any_run_starts(tmp_path):
    # Run A2 gives each device's bare loop its share of the items: with --items 1 on two devices the second
    # loop got none and failed after the models had loaded, with a manifest error about 'items'.
    run = _farm_bench(tmp_path, "--items", "1", "--devices", "cuda0=cpu,cuda1=cpu")
    assert run.returncode == 1
    assert "--items 1 is fewer than the 2 devices of --devices" in run.stderr
    assert not list(tmp_path.glob("farm-bench-*")), "nothing started"


def test_overhead_with_model_time_matched_is_each_runs_time_outside_its_models_subtracted():
    from farm.bench import RunResult, Workload, format_report, report

    workload = Workload(items=2, candidates=5)
    stages = dict.fromkeys(("generate", "moderate", "validate", "score"), 0.0)
    a = RunResult("A bare loop", 10.0, 10, {**stages, "generate": 9.9})
    b = RunResult(
        "B farm, 1 device", 10.5, 10, {**stages, "generate": 10.3}
    )  # its model calls ran 0.4 s slower
    data = report(workload, a, b, None, threads=1)
    assert data["overhead_ms_per_candidate"] == 50.0
    assert data["a_outside_models_ms_per_candidate"] == 10.0
    assert data["b_outside_models_ms_per_candidate"] == 20.0
    assert data["overhead_model_matched_ms_per_candidate"] == 10.0
    assert (
        "with model time matched (B's time outside model calls minus A's, 10.0 ms): 10.0 ms"
        in format_report(data)
    )


def test_a_hop_is_the_gap_from_one_stages_work_ending_to_the_next_ones_beginning_per_slice():
    from farm.bench import hop_gaps

    def slice_of(t0: float, n: int) -> list[dict]:
        # generate took 0.4 s for the slice (0.1 s a candidate), moderate began 5 ms after it ended, ...
        return [
            {
                "generate": {"s": 0.4 / n, "at": t0},
                "moderate": {"s": 0.02 / n, "at": t0 + 0.405},
                "validate": {"s": 0.01 / n, "at": t0 + 0.425 + 0.003},
                "score": {"s": 0.01 / n, "at": t0 + 0.438 + 0.007},
            }
            for _ in range(n)
        ]

    gaps = hop_gaps([*slice_of(100.0, 4), *slice_of(200.0, 4), *slice_of(300.0, 2)])
    assert gaps == {"generate->moderate": 5.0, "moderate->validate": 3.0, "validate->score": 7.0}
    assert hop_gaps([{"generate": {"s": 0.1}}]) == {}, "timings from before stages were timestamped"
