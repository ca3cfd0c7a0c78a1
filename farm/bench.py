"""`farm bench`: what the farm costs over a bare loop, and what a second device buys, measured in one run.

Runs of the same manifest on the same models on the same machine:

- A: a bare in-process loop over the same stages (generate, moderate, validate, score) with no Celery, no SQL
  and no files, in a subprocess pinned exactly like one device worker (same torch threads);
- B: the farm end to end (embedded Redis, real workers, SQL, PNGs) with one device;
- C: the farm with two devices (on CPU each worker gets its share of the cores);
- D: the farm with one device and its QC worker (FARM_QC=worker): the checks run beside generation (on a
  GPU host, beside it on the same GPU and the CPU; on CPU, on a second core), so D is compared with a loop
  that only generates.

A's and B's compute budget is one device: with FARM_DEVICES=cuda0=cpu,cuda1=cpu each worker gets half the
cores,
so A and B run with that same thread count. Ratios compare throughputs from the same run, never wall-clock
thresholds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from farm.lifeline import tied
from farm.procs import children, parent_of

STAGES = ("generate", "moderate", "validate", "score")


@dataclass(frozen=True)
class Workload:
    items: int = 24
    candidates: int = 4
    size: int = 64
    steps: int = 8
    slice_size: int = 4
    model: str = "tiny"
    dtype: str = "fp32"

    @property
    def total(self) -> int:
        return self.items * self.candidates

    def manifest(self, name: str = "bench") -> str:
        prompts = "\n".join(f'  - "benchmark prompt {i}: a lighthouse on a cliff"' for i in range(self.items))
        return (
            f"name: {name}\nmodel: {self.model}\ndtype: {self.dtype}\n"
            f"defaults: {{candidates: {self.candidates}, steps: {self.steps}, "
            f"size: {self.size}x{self.size}, seed: 99}}\nitems:\n{prompts}\n"
        )


@dataclass
class RunResult:
    name: str
    seconds: float
    candidates: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    devices: dict[str, int] = field(default_factory=dict)
    #: Median gap (ms) between one stage task's work ending and the next one's beginning, per hop.
    hops_ms: dict[str, float] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.candidates / self.seconds


# ----------------------------------------------------------------------------------------------- A: bare loop


def bare_loop(workload: Workload, models_dir: Path) -> dict[str, Any]:
    """Run the stages in-process on the models a worker would load; called inside a pinned subprocess."""
    from farm.config import load_settings
    from farm.gpu_pinning.pinning import limit_torch_threads
    from farm.manifest import plan_manifest
    from farm.ml import moderation as mod
    from farm.tasks.runtime import Runtime

    limit_torch_threads()
    rt = Runtime(load_settings())
    rt.preload()
    planned = plan_manifest(workload.manifest())
    manifest, plans = planned.manifest, planned.items
    models = rt.models
    gen = models.generator(manifest.model, dtype=manifest.dtype, memory=manifest.memory.model_dump())
    validator, scorer = models.validator(manifest.validation.model), models.scorer(manifest.scoring.model)
    stage = dict.fromkeys(STAGES, 0.0)
    hashes = mod.HashIndex()
    barrier = os.environ.get("FARM_BENCH_BARRIER")
    if barrier:
        Path(barrier, f"ready-{os.getpid()}").touch()
        while not Path(barrier, "go").exists():
            time.sleep(0.01)
    t_all = time.perf_counter()
    for plan in plans:
        for start in range(0, plan.candidates, workload.slice_size):
            seeds = list(plan.seeds[start : start + workload.slice_size])
            t = time.perf_counter()
            mod.check_prompt_terms(plan.prompt, terms=[], patterns=[])
            images = gen.generate(
                prompt=plan.prompt,
                negative_prompt=plan.negative_prompt,
                seeds=seeds,
                steps=plan.steps,
                guidance=plan.guidance,
                width=plan.width,
                height=plan.height,
                scheduler=plan.scheduler,
            )
            t1 = time.perf_counter()
            for k, im in zip(seeds, images, strict=True):
                h, _q = mod.pdq_hash(im.convert("RGB"))
                _near = hashes.within(h, 20)
                hashes.update([(f"{plan.index}-{k}", h)])
            verdicts = [models.nudenet().check(images), models.opennsfw().check(images)]
            [mod.combine([v[i] for v in verdicts]) for i in range(len(images))]
            t2 = time.perf_counter()
            validator.alignment(images, plan.prompt)
            t3 = time.perf_counter()
            scorer.score(images, plan.prompt)
            t4 = time.perf_counter()
            for name, dt in zip(STAGES, (t1 - t, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stage[name] += dt
    return {
        "seconds": time.perf_counter() - t_all,
        "candidates": workload.total,
        "stage_seconds": stage,
        "peak_rss_mb": {"loop": _peak_rss_mb(os.getpid())},
    }


def run_bare(
    workload: Workload, env: dict[str, str], queues: list[str], devices: dict[str, str], name: str
) -> RunResult:
    """The bare loop in one pinned subprocess per queue, the work split between them; with several, the
    loops start together (a start barrier after their models are loaded), which measures what the machine
    itself gives two devices."""
    from dataclasses import replace

    from farm.gpu_pinning.pinning import pinning_env, plan_pinning

    share = replace(workload, items=workload.items // len(queues))
    barrier = Path(tempfile.mkdtemp(prefix="farm-bench-go-"))
    procs, errs = [], []
    for queue in queues:
        child_env = {
            **env,
            **pinning_env(plan_pinning(queue, devices, _threads(env))),
            "FARM_BENCH_BARRIER": str(barrier),
        }
        errs.append(barrier / f"stderr-{queue}.log")
        with errs[-1].open("w") as err:
            procs.append(
                subprocess.Popen(
                    tied([sys.executable, "-m", "farm", "bench", "--inner-loop", json.dumps(asdict(share))]),
                    env=child_env,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            )
    while len(list(barrier.glob("ready-*"))) < len(procs):
        if any(p.poll() not in (None, 0) for p in procs):
            _fail_bare(procs, errs, "before its loop started")
        time.sleep(0.05)
    (barrier / "go").touch()
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        _fail_bare(procs, errs, "in its loop")
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    stage = {s: sum(r["stage_seconds"][s] for r in results) for s in STAGES}
    peaks = {f"loop-{q}": r["peak_rss_mb"]["loop"] for q, r in zip(queues, results, strict=True)}
    return RunResult(
        name, max(r["seconds"] for r in results), sum(r["candidates"] for r in results), stage, peaks
    )


def _fail_bare(procs: list[subprocess.Popen], errs: list[Path], when: str) -> None:
    """Stop the bare loops and raise with the failed one's own last words (its stderr's tail)."""
    failed = next(i for i, p in enumerate(procs) if p.poll() not in (None, 0))
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    tail = errs[failed].read_text(errors="replace")[-3000:]
    raise RuntimeError(f"a bare-loop process failed {when} (exit {procs[failed].returncode}):\n{tail}")


def _threads(env: dict[str, str]) -> int | None:
    raw = env.get("FARM_WORKER_THREADS")
    return int(raw) if raw else None


# ------------------------------------------------------------------------------------ B, C: the farm


def run_farm(name: str, workload: Workload, env: dict[str, str]) -> RunResult:
    """Start a farm of its own (embedded Redis, workers, control, web), wait for its models, time a batch."""
    from sqlalchemy import select

    from farm import dispatch
    from farm.config import load_settings
    from farm.db import Batch, Candidate, Worker, session_scope
    from farm.stack import Stack
    from farm.states import BATCH_CLOSED

    settings = load_settings(env)
    stack = Stack(settings, env=env)
    with stack:
        stack.start_workers()
        if importlib.util.find_spec("flask") is not None:
            stack.start_web()
        per_device = 2 if settings.qc == "worker" else 1
        _wait_for_models(settings, per_device * len(settings.devices), stack)
        _warm_client(settings)
        t0 = time.time()
        done = dispatch.submit(workload.manifest(name.split()[0]), settings=settings)
        while True:
            with session_scope(settings.database_url) as s:
                batch = s.get(Batch, done.batch_id)
            if batch.status in BATCH_CLOSED:
                break
            stack.check_alive()
            time.sleep(0.2)
        # Until the batch closed by its own record, not by this poll (up to 0.2 s later).
        closed = batch.finished_at.replace(tzinfo=UTC).timestamp() if batch.finished_at else None
        seconds = (closed or time.time()) - t0
        stage = dict.fromkeys(STAGES, 0.0)
        devices: dict[str, int] = {}
        timings = []
        with session_scope(settings.database_url) as s:
            for c in s.scalars(select(Candidate).where(Candidate.batch_id == done.batch_id)):
                for st, t in c.timings.items():
                    stage[st] += t["s"]
                devices[c.device] = devices.get(c.device, 0) + 1
                timings.append(c.timings)
            workers = [(w.name, w.pid) for w in s.scalars(select(Worker))]
        peaks = {p.name: _peak_rss_mb(p.popen.pid) for p in stack.procs}
        peaks.update({f"child-{pid}": _peak_rss_mb(pid) for _, pid in workers})
        # A QC worker (FARM_QC=worker) runs under its device worker: its main is its pool child's parent.
        qc = {n.split("@")[0]: parent_of(pid) for n, pid in workers if n.startswith("qc-")}
        peaks.update({name: _peak_rss_mb(main) for name, main in qc.items()})
    return RunResult(name, seconds, workload.total, stage, peaks, devices, hop_gaps(timings))


def hop_gaps(timings: list[dict[str, Any]]) -> dict[str, float]:
    """Median milliseconds from one stage's work ending to the next stage's work beginning, per hop of the
    chain, over the slices of a run (``timings``: each candidate's). A gap holds the stage's own write, the
    send of the next task, its delivery and the next task's delivery count; with FARM_QC=worker the
    generate -> moderate gap also holds the wait for the QC worker, which runs beside generation."""
    calls: dict[tuple[str, float], int] = {}
    for t in timings:
        for st, v in t.items():
            if "at" in v:
                calls[(st, v["at"])] = calls.get((st, v["at"]), 0) + 1
    gaps: dict[str, dict[tuple[float, float], float]] = {}
    for t in timings:
        for prev, nxt in zip(STAGES, STAGES[1:], strict=False):
            a, b = t.get(prev), t.get(nxt)
            if not a or not b or "at" not in a or "at" not in b:
                continue
            ended = a["at"] + a["s"] * calls[(prev, a["at"])]
            gaps.setdefault(f"{prev}->{nxt}", {})[(a["at"], b["at"])] = (b["at"] - ended) * 1000
    return {hop: round(statistics.median(g.values()), 2) for hop, g in gaps.items()}


def _warm_client(settings: Any) -> None:
    """Set up this process's Celery client before the clock starts, as A loads its models first: the first
    send of a process looks up the result backend among every installed package's entry points and opens
    the broker connection, 40-80 ms here, once per process (the dashboard pays it on its first submit, a
    `farm submit` process on each), not per batch or candidate."""
    from farm.celery_app import app_for

    app = app_for(settings)
    app.finalize(auto=True)
    _ = app.backend, app.amqp.router
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection()


def _wait_for_models(settings: Any, workers: int, stack: Any, timeout: float = 300) -> None:
    from sqlalchemy import func, select

    from farm.db import Worker, session_scope

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        with session_scope(settings.database_url) as s:
            if s.scalar(select(func.count()).select_from(Worker)) >= workers:
                return
        time.sleep(0.2)
    raise RuntimeError("workers did not load their models in time")


def _peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """A process's peak resident memory (``VmHWM``), or its current one with ``field="VmRSS"``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# ----------------------------------------------------------------------------------------------- the report


def bench(
    workload: Workload, *, devices: str = "cuda0=cpu,cuda1=cpu", repeat: int = 1, qc_worker: bool = True
) -> dict[str, Any]:
    """Runs A, A2, B, C and D in turn, ``repeat`` rounds of them; each keeps its fastest round, so a noisy
    moment on a shared machine penalises neither the baseline nor the farm (every round is reported)."""
    from farm.config import parse_devices

    base = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    base.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "FARM_SLICE_SIZE": str(workload.slice_size),
        }
    )
    # Workers preload the manifest's own generator, so B's first slice loads nothing that A loaded untimed.
    base.update({"FARM_PRELOAD_GENERATOR": workload.model, "FARM_PRELOAD_DTYPE": workload.dtype})
    two = parse_devices(devices)
    if workload.items < len(two):
        raise RuntimeError(
            f"--items {workload.items} is fewer than the {len(two)} devices of --devices: run A2 splits the "
            f"items between one bare loop per device, so give at least {len(two)}"
        )
    one = dict(list(two.items())[:1])
    from farm.gpu_pinning.pinning import cpu_share

    per_device_threads = cpu_share(two) if "cpu" in two.values() else None
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        models = Path(tmp) / "shared-models"
        common = {**base}
        if per_device_threads:
            common["FARM_WORKER_THREADS"] = str(per_device_threads)

        def env_for(label: str, devices: dict[str, str]) -> dict[str, str]:
            home = Path(tmp) / label
            (home / "models").parent.mkdir(parents=True, exist_ok=True)
            if not (home / "models").exists():
                (home).mkdir(parents=True, exist_ok=True)
                (home / "models").symlink_to(models, target_is_directory=True)
            models.mkdir(exist_ok=True)
            return {
                **common,
                "FARM_HOME": str(home),
                "FARM_DEVICES": ",".join(f"{q}={d}" for q, d in devices.items()),
            }

        runs: dict[str, list[RunResult]] = {"A": [], "A2": [], "B": [], "C": [], "D": []}
        for n in range(repeat):
            runs["A"].append(run_bare(workload, env_for(f"a{n}", one), list(one), one, "A bare loop"))
            if len(two) > 1:
                runs["A2"].append(
                    run_bare(workload, env_for(f"a2{n}", two), list(two), two, "A2 2 bare loops")
                )
            runs["B"].append(run_farm("B farm, 1 device", workload, env_for(f"b{n}", one)))
            if len(two) > 1:
                runs["C"].append(run_farm("C farm, 2 devices", workload, env_for(f"c{n}", two)))
            if qc_worker:
                d_env = {**env_for(f"d{n}", one), "FARM_QC": "worker"}
                d_env["FARM_HANDOFF_DIR"] = str(Path(tmp) / f"d{n}" / "handoff")
                runs["D"].append(run_farm("D 1 device + QC", workload, d_env))
    best = {k: min(v, key=lambda r: r.seconds) for k, v in runs.items() if v}
    data = report(
        workload,
        best["A"],
        best["B"],
        best.get("C"),
        threads=per_device_threads,
        a2=best.get("A2"),
        d=best.get("D"),
    )
    data["repeat"] = repeat
    for key, results in runs.items():
        if results:
            data["runs"][key]["seconds_each"] = [round(r.seconds, 3) for r in results]
    return data


def report(
    workload: Workload,
    a: RunResult,
    b: RunResult,
    c: RunResult | None,
    *,
    threads: int | None,
    a2: RunResult | None = None,
    d: RunResult | None = None,
) -> dict[str, Any]:
    """Throughputs, ratios against A, overhead per candidate, stage shares, and B against generation alone.

    A2 (two bare loops at once) is the machine's own ceiling for two devices: C/A2 says how much of it the
    farm keeps, whatever the hardware gives."""
    overhead_ms = (b.seconds - a.seconds) / workload.total * 1000
    outside_models_ms = (b.seconds - sum(b.stage_seconds.values())) / workload.total * 1000
    # B - A with the model calls' own drift between the runs taken out: each run's time outside its models.
    a_outside_ms = (a.seconds - sum(a.stage_seconds.values())) / workload.total * 1000
    runs = [("A", a), ("B", b)] + [(k, r) for k, r in (("C", c), ("A2", a2), ("D", d)) if r]
    generate_only = workload.total / a.stage_seconds["generate"]
    out = {
        "workload": {
            **asdict(workload),
            "candidates_total": workload.total,
            "torch_threads_per_device": threads,
        },
        "runs": {
            key: {
                "name": r.name,
                "seconds": round(r.seconds, 3),
                "candidates_per_s": round(r.per_second, 3),
                "stage_share": {
                    k: round(v / max(sum(r.stage_seconds.values()), 1e-9), 3)
                    for k, v in r.stage_seconds.items()
                },
                "model_seconds_per_candidate": round(sum(r.stage_seconds.values()) / r.candidates, 4),
                "peak_rss_mb": r.peak_rss_mb,
                "devices": r.devices,
                **({"hop_ms": r.hops_ms} if r.hops_ms else {}),
            }
            for key, r in runs
        },
        "ratios": {
            "B/A": round(b.per_second / a.per_second, 3),
            **({"C/A": round(c.per_second / a.per_second, 3)} if c else {}),
            "B/A_generate_only": round(b.per_second / generate_only, 3),
            **({"A2/A": round(a2.per_second / a.per_second, 3)} if a2 else {}),
            **({"C/A2": round(c.per_second / a2.per_second, 3)} if a2 and c else {}),
            **({"D/A_generate_only": round(d.per_second / generate_only, 3)} if d else {}),
            **({"D/B": round(d.per_second / b.per_second, 3)} if d else {}),
        },
        "generate_only_candidates_per_s": round(generate_only, 3),
        "overhead_ms_per_candidate": round(overhead_ms, 2),
        "overhead_model_matched_ms_per_candidate": round(outside_models_ms - a_outside_ms, 2),
        "b_outside_models_ms_per_candidate": round(outside_models_ms, 2),
        "a_outside_models_ms_per_candidate": round(a_outside_ms, 2),
    }
    return out


def format_report(data: dict[str, Any]) -> str:
    w = data["workload"]
    lines = [
        f"workload: {w['items']} items x {w['candidates']} candidates = {w['candidates_total']} "
        f"on '{w['model']}' "
        f"({w['dtype']}), {w['size']}x{w['size']}, {w['steps']} steps, slices of {w['slice_size']}, "
        f"torch threads per device: {w['torch_threads_per_device'] or 'default'}",
        "",
        f"{'run':<20} {'seconds':>8} {'cand/s':>8} {'model s/cand':>13}  stage share (gen/mod/val/score)",
    ]
    for r in data["runs"].values():
        share = "/".join(f"{r['stage_share'].get(s, 0):.2f}" for s in STAGES)
        lines.append(
            f"{r['name']:<20} {r['seconds']:>8.2f} {r['candidates_per_s']:>8.2f} "
            f"{r['model_seconds_per_candidate']:>13.3f}  {share}"
        )
    lines += [
        "",
        f"B/A = {data['ratios']['B/A']:.3f}   (target >= 0.90)",
        *([f"C/A = {data['ratios']['C/A']:.3f}   (target >= 1.6)"] if "C/A" in data["ratios"] else []),
        *(
            [
                f"A2/A = {data['ratios']['A2/A']:.3f}   (two bare loops at once: what this machine gives two "
                f"devices); C/A2 = {data['ratios']['C/A2']:.3f}"
            ]
            if "A2/A" in data["ratios"]
            else []
        ),
        *(
            [
                f"each run repeated {data['repeat']} times, fastest kept: "
                + "; ".join(f"{k} {r['seconds_each']}" for k, r in data["runs"].items())
            ]
            if data.get("repeat", 1) > 1
            else []
        ),
        f"B against a loop that only generates = {data['ratios']['B/A_generate_only']:.3f}   "
        f"({data['generate_only_candidates_per_s']:.2f} cand/s generating alone)",
        *(
            [
                f"D (checks on the device's QC worker) against a loop that only generates = "
                f"{data['ratios']['D/A_generate_only']:.3f}   (target on a GPU >= 0.90); D/B = "
                f"{data['ratios']['D/B']:.3f}"
            ]
            if "D/B" in data["ratios"]
            else []
        ),
        f"orchestration overhead per candidate (B - A): {data['overhead_ms_per_candidate']:.1f} ms",
        f"  with model time matched (B's time outside model calls minus A's, "
        f"{data['a_outside_models_ms_per_candidate']:.1f} ms): "
        f"{data['overhead_model_matched_ms_per_candidate']:.1f} ms"
        "   (target < 8; the model calls alone drift by several ms per candidate between runs)",
        f"B's own time outside model calls per candidate: {data['b_outside_models_ms_per_candidate']:.1f} ms"
        "   (the farm's own cost inside one run: free of drift between runs)",
        *(
            f"{r['name']}: median gap between stage tasks (ms): "
            + ", ".join(f"{hop} {ms:.1f}" for hop, ms in r["hop_ms"].items())
            for r in data["runs"].values()
            if r.get("hop_ms")
        ),
        "",
        "peak memory (MB):",
    ]
    for r in data["runs"].values():
        mem = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb"].items() if v)
        lines.append(f"  {r['name']:<20} {mem}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- scale


def _latencies(url: str, seconds: float | None = None, until: Any = None, limit: int = 2000) -> list[float]:
    """Page latencies (ms) of ``url``: for ``seconds``, or while ``until()`` is false."""
    import urllib.request

    out: list[float] = []
    start = time.monotonic()
    while len(out) < limit:
        if seconds is not None and time.monotonic() - start > seconds:
            break
        if until is not None and until():
            break
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as resp:
            resp.read()
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.05)
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def scale(sizes: tuple[int, ...] = (100, 10_000, 10_000)) -> dict[str, Any]:
    """Submit latency, enqueue time, dashboard latency during the enqueue, and memory, per batch size.

    Only the control worker and the web app run (no device workers), so what is measured is the farm's own
    handling of a large batch: writing it, turning it into chords, and serving pages meanwhile. A size given
    twice runs twice in the same processes: a peak that does not rise the second time is a high-water mark
    the allocator reuses, not memory held per batch.
    """
    import socket

    from sqlalchemy import func, select

    from farm import dispatch
    from farm.config import load_settings
    from farm.db import Item, session_scope
    from farm.stack import Stack
    from farm.states import ItemStatus

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="farm-scale-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
        env.update({"FARM_HOME": tmp, "FARM_DEVICES": "cuda0=cpu", "FARM_WEB_PORT": str(port)})
        settings = load_settings(env)
        with Stack(settings, env=env) as stack:
            stack.start_control()
            web = stack.start_web()
            page = f"http://127.0.0.1:{port}/api/v1/batches"
            deadline = time.monotonic() + 120
            while True:
                try:
                    _latencies(page, limit=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            idle = _latencies(page, seconds=5)
            for n in sizes:
                text = (
                    "name: scale\nmodel: tiny\ndefaults: {candidates: 1, steps: 1, size: 64x64}\nitems:\n"
                    + ("".join(f"  - scale prompt {i}\n" for i in range(n)))
                )
                t0 = time.perf_counter()
                done = dispatch.submit(text, settings=settings)
                submit_s = time.perf_counter() - t0

                def enqueued(batch_id: str = done.batch_id, n: int = n) -> bool:
                    with session_scope(settings.database_url) as s:
                        sent = s.scalar(
                            select(func.count())
                            .select_from(Item)
                            .where(Item.batch_id == batch_id, Item.status != ItemStatus.PENDING)
                        )
                    return sent >= n

                during = _latencies(page, until=enqueued, limit=100_000)
                while not enqueued():
                    time.sleep(0.2)
                enqueue_s = time.perf_counter() - t0
                label = str(n) if str(n) not in results else f"{n} again"
                results[label] = {
                    "submit_s": round(submit_s, 3),
                    "enqueue_s": round(enqueue_s, 2),
                    "page_ms_p50_idle": _pct(idle, 0.5),
                    "page_ms_p95_idle": _pct(idle, 0.95),
                    "page_ms_p50_during_enqueue": _pct(during, 0.5),
                    "page_ms_p95_during_enqueue": _pct(during, 0.95),
                    "web_peak_rss_mb": _peak_rss_mb(web.popen.pid),
                    "control_peak_rss_mb": max(
                        _peak_rss_mb(p) for p in _with_children(stack.proc("control").popen.pid)
                    ),
                    "control_rss_after_mb": max(
                        _peak_rss_mb(p, "VmRSS") for p in _with_children(stack.proc("control").popen.pid)
                    ),
                }
    return results


def worker_memory(sizes: tuple[int, ...] = (100, 10_000)) -> dict[str, Any]:
    """Peak memory of every farm process after a batch of each size through two CPU device workers.

    A light workload (32x32, one step, slices of 4) so that 10,000 candidates take minutes; what grows with
    the batch (caches, hashes kept for near-duplicates, SQL rows read) shows as a higher peak at 10,000.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    base.update({"HF_HUB_OFFLINE": "1", "FARM_SLICE_SIZE": "4", "FARM_PRELOAD_GENERATOR": "tiny"})
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="farm-memory-") as tmp:
        for n in sizes:
            workload = Workload(items=max(1, n // 4), candidates=4, size=32, steps=1)
            env = {**base, "FARM_HOME": str(Path(tmp) / str(n)), "FARM_DEVICES": "cuda0=cpu,cuda1=cpu"}
            run = run_farm(f"memory-{n}", workload, env)
            out[str(n)] = {
                "candidates": run.candidates,
                "seconds": round(run.seconds, 1),
                "peak_rss_mb": run.peak_rss_mb,
                "devices": run.devices,
            }
    return out


def _with_children(pid: int) -> list[int]:
    """``pid`` and its direct children (the control worker's pool processes)."""
    return [pid, *children(pid)]
