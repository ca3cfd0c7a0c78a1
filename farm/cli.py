"""The `farm` command: run the farm (up, worker, web), feed it (submit, cancel), read it (status, workers)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from farm.broker import CONTROL_QUEUE
from farm.config import ConfigError, Settings, load_settings
from farm.states import BATCH_CLOSED, BatchStatus, CandidateStatus

EXAMPLE = Path(__file__).resolve().parent.parent / "batches" / "example.yaml"


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def cli() -> None:
    """A batch image-generation farm: YAML manifests in, moderated and ranked candidates out."""


# ------------------------------------------------------------------------------------------- running


@cli.command()
@click.option("--no-web", is_flag=True, help="Do not start the dashboard.")
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
def up(no_web: bool, no_flower: bool) -> None:
    """Start everything this host runs: embedded Redis (unless FARM_BROKER_URL is set), a worker per device in
    FARM_DEVICES, the control worker, the dashboard and Flower.

    Ctrl-C or SIGTERM stops all of it: the device workers drain (their slices in flight are recorded) while
    Redis stays up, and Redis stops last. A second Ctrl-C stops at once (Celery's cold shutdown: what was in
    hand goes back to the queue). If `farm up` is killed outright, everything it started dies with it."""
    import threading

    from farm.stack import Stack

    settings = _settings()
    stack = Stack(settings)
    stopping = False
    hurry = threading.Event()

    def say(text: str, err: bool = False) -> None:
        """Print, unless the terminal is gone: after a hangup a write fails, and the stop must go on."""
        try:
            click.echo(text, err=err)
        except OSError:
            pass

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            return
        if not hurry.is_set():
            hurry.set()
            say(
                f"{signal.Signals(signum).name} again: stopping now without waiting for the slices in flight "
                "(their messages go back to the queue; the farm picks them up when it starts again)",
                err=True,
            )

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _stop)
    try:
        stack.prepare()
        stack.start_workers()
        if not no_web:
            stack.start_web()
        if not no_flower:
            stack.start_flower()
        say(f"broker     {settings.broker_url}")
        say(f"database   {settings.database_url}")
        say(f"artifacts  {settings.artifacts_dir}")
        qc = " and its QC worker (FARM_QC=worker)" if settings.qc == "worker" else ""
        for queue, device in settings.devices.items():
            say(f"worker     {queue} on {device}{qc}")
        if not no_web:
            say(f"dashboard  {settings.web_url}")
        if not no_flower:
            say(
                f"flower     http://{settings.web_host}:{settings.flower_port} "
                "(basic auth from FARM_FLOWER_AUTH)"
            )
        say(f"logs       {stack.log_dir}\nPress Ctrl-C to stop.")
        while not stopping:
            for name in stack.supervise():
                say(f"{name} exited; restarted it (see {stack.log_dir / (name + '.log')})", err=True)
            time.sleep(1.0)
    finally:
        say(
            "stopping: the workers finish the slices in flight, then Redis stops "
            f"(up to FARM_DRAIN_TIMEOUT={settings.drain_timeout}s; Ctrl-C again to stop now)"
        )
        stack.stop(
            stack.drain_allowance,
            report=lambda what: say(f"stopping: waiting for {what}"),
            hurry=hurry,
        )
        say("stopped")


@cli.command()
@click.option("--device", "queue", help="Queue name from FARM_DEVICES (e.g. cuda0) this worker serves.")
@click.option("--control", is_flag=True, help="Run the control worker (ranking, dispatch) instead.")
@click.option(
    "--qc",
    is_flag=True,
    help="With --device and FARM_QC=worker: run that device's quality-control worker on this host.",
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queue: str | None, control: bool, qc: bool, loglevel: str) -> None:
    """Run one Celery worker: pinned to one device, named after it, loading its models once."""
    from farm.broker import local_queue, qc_queue
    from farm.gpu_pinning.pinning import apply_pinning, plan_pinning

    settings = _settings()
    if control == bool(queue):
        raise click.UsageError("give exactly one of --device NAME or --control")
    if qc and control:
        raise click.UsageError("--qc goes with --device NAME: it runs that device's QC worker")
    if qc and settings.qc != "worker":
        raise click.UsageError(
            "--qc runs a device's QC worker, which only FARM_QC=worker uses: set FARM_QC=worker for this "
            "worker and the device's own one, or drop --qc"
        )
    if control:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            "worker",
            "-Q",
            CONTROL_QUEUE,
            "-n",
            f"{CONTROL_QUEUE}@%h",
            "-c",
            "2",
            "-B",
            "-s",
            str(settings.run_dir / "beat-schedule"),
        ]
    else:
        try:
            pin = plan_pinning(queue, settings.devices, settings.worker_threads)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--device") from None
        apply_pinning(pin)
        if qc:
            from farm.worker import term_with_parent

            term_with_parent()
            os.environ["FARM_PINNED_ROLE"] = "qc"
            name = qc_queue(queue)
            argv = ["worker", "-Q", name, "-n", name, "-c", "1"]
        else:
            from farm.placement import device_worker_queues

            queues = device_worker_queues(queue, settings.preload_generator, settings.preload_dtype)
            argv = ["worker", "-Q", ",".join(queues), "-n", local_queue(queue), "-c", "1"]
    from farm.celery_app import app
    from farm.db import migrate

    migrate(settings.database_url)
    app.worker_main(
        [*argv, "-P", "prefork", f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]
    )


@cli.command()
def web() -> None:
    """Serve the dashboard on FARM_WEB_HOST:FARM_WEB_PORT (loopback by default)."""
    from web import create_app

    settings = _settings()
    create_app().run(host=settings.web_host, port=settings.web_port, threaded=True, use_reloader=False)


# ------------------------------------------------------------------------------------------- feeding


@cli.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate and print the expanded counts; enqueue nothing.")
@click.option("--wait", is_flag=True, help="Show a progress bar until the batch finishes.")
def submit(manifest: Path, dry_run: bool, wait: bool) -> None:
    """Validate MANIFEST fully, then queue it (or, with --dry-run, only show what it expands to)."""
    from farm import dispatch
    from farm.manifest import ManifestError

    settings = _settings()
    text = manifest.read_bytes()
    try:
        if dry_run:
            click.echo(
                json.dumps(dispatch.dry_run(text, settings=settings, base_dir=manifest.parent), indent=2)
            )
            return
        from farm.db import migrate

        migrate(settings.database_url)
        done = dispatch.submit(text, settings=settings, base_dir=manifest.parent)
    except ManifestError as exc:
        raise click.ClickException(f"{manifest}: the manifest is not valid:\n{exc}") from None
    click.echo(f"batch {done.batch_id}: {done.items} items, {done.candidates} candidates queued")
    if wait:
        status = wait_for(settings, done.batch_id)
        print_ranked(settings, done.batch_id)
        if status != BatchStatus.DONE:
            sys.exit(1)


def wait_for(settings: Settings, batch_id: str, *, poll: float = 0.5, check: Any = None) -> str:
    """Progress bar over the batch's candidates until the batch is closed; returns its final status."""
    from farm import views
    from farm.db import Batch, session_scope

    with session_scope(settings.database_url) as s:
        total = s.get(Batch, batch_id).candidates_total
    shown = 0
    with click.progressbar(length=total, label="candidates", show_pos=True, show_eta=True) as bar:
        while True:
            with session_scope(settings.database_url) as s:
                batch = s.get(Batch, batch_id)
                prog = views.progress(s, batch_id)
                status = batch.status
            bar.length = max(prog["total"], 1)
            bar.update(prog["done"] - shown)
            shown = prog["done"]
            if status in BATCH_CLOSED:
                return status
            if check is not None:
                check()
            time.sleep(poll)


@cli.command()
@click.argument("batch_id")
def cancel(batch_id: str) -> None:
    """Cancel a batch: queued work never runs, running slices stop at their next stage."""
    from farm import dispatch

    if dispatch.cancel(batch_id, settings=_settings()):
        click.echo(f"batch {batch_id} cancelled")
    else:
        raise click.ClickException(f"batch {batch_id} is unknown or already finished")


@cli.command()
@click.argument("device")
def drain(device: str) -> None:
    """Stop DEVICE (a queue name such as cuda0) taking new slices; its in-flight slices still finish."""
    names = _take_slices(device, take=False)
    click.echo(f"drained {', '.join(names)}: no new slices; `farm undrain {device}` to resume")


@cli.command()
@click.argument("device")
def undrain(device: str) -> None:
    """Let a drained DEVICE take new slices again."""
    names = _take_slices(device, take=True)
    click.echo(f"{', '.join(names)} takes new slices again")


def _take_slices(device: str, *, take: bool) -> list[str]:
    from farm.celery_app import app
    from farm.worker import set_taking_slices

    names = set_taking_slices(app, device, take, database_url=_settings().database_url)
    if not names:
        raise click.ClickException(f"no live worker serves {device}")
    return names


@cli.command()
@click.argument("candidate")
@click.option(
    "--device",
    default=None,
    help="Where to regenerate (cpu, cuda:0, ...); default: the recorded device where this host has it, "
    "else cpu.",
)
def replay(candidate: str, device: str | None) -> None:
    """Regenerate CANDIDATE (an id or a PNG path) from its recorded recipe; say whether the pixels match.

    Its whole slice is regenerated in order under the recorded torch thread count, so on the recording host
    the pixels are equal bit for bit. Exit status: 0 identical, 1 the pixels differ, 2 cannot replay.
    """
    from sqlalchemy import select

    from farm.db import Candidate, session_scope
    from farm.replay import ReplayError
    from farm.replay import replay as replay_png

    settings = _settings()
    path = Path(candidate)
    if not path.exists():
        # Only the image path: a database of an older schema still answers (replay never writes to it).
        with session_scope(settings.database_url) as s:
            name = s.scalar(select(Candidate.image_path).where(Candidate.id == candidate))
        if not name:
            raise _cannot_replay(f"{candidate} is neither a PNG file nor a candidate with an image")
        path = _local_copy(settings, name)
    try:
        result = replay_png(path, models_dir=settings.models_dir, device=device)
    except ReplayError as exc:
        raise _cannot_replay(str(exc)) from None
    verdict = "identical pixels" if result.identical else "pixels differ"
    click.echo(
        f"{path.name}: {verdict} (max difference {result.max_abs_diff}, "
        f"{result.differing_fraction:.4%} of values differ)"
    )
    seeds = result.replayed.get("slice_seeds", [])
    threads = result.replayed.get("numerics", {}).get("torch_threads")
    click.echo(
        f"  regenerated a slice of {len(seeds)} seed(s) {seeds} on {result.replayed.get('device')} "
        f"with {threads} torch thread(s)"
    )
    for note in result.notes:
        click.echo(f"  note: {note}")
    sys.exit(0 if result.identical else 1)


def _cannot_replay(message: str) -> click.ClickException:
    """Exit status 2, so a script tells "cannot replay" from "the pixels differ" (1)."""
    error = click.ClickException(message)
    error.exit_code = 2
    return error


@cli.command()
def doctor() -> None:
    """Check broker, database, artifact store, devices and models, and say what to fix."""
    from farm.doctor import main_report

    text, ok = main_report()
    click.echo(text)
    sys.exit(0 if ok else 1)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the batch manifest."""
    from farm.manifest import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


# ------------------------------------------------------------------------------------------- reading


@cli.command()
@click.argument("batch_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(batch_id: str | None, as_json: bool) -> None:
    """One batch with its items and candidates, or (no BATCH_ID) every batch."""
    from sqlalchemy import select

    from farm import views
    from farm.db import Batch, migrate, session_scope

    settings = _settings()
    migrate(settings.database_url)
    with session_scope(settings.database_url) as s:
        if batch_id:
            batch = s.get(Batch, batch_id)
            if batch is None:
                raise click.ClickException(f"no batch {batch_id}")
            data: Any = views.batch_dict(s, batch)
        else:
            batches = s.scalars(select(Batch).order_by(Batch.created_at.desc())).all()
            data = [views.batch_dict(s, b, with_items=False) for b in batches]
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif batch_id:
        print_ranked(settings, batch_id)
    else:
        for b in data:
            p = b["progress"]
            click.echo(f"{b['id']}  {b['status']:<9} {p['done']:>6}/{p['total']:<6} {b['name']}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def workers(as_json: bool) -> None:
    """Device workers: their device, the models they loaded and how many times, what they hold and consume
    now, what they run now (and the denoising step a slice in flight has reached)."""
    from sqlalchemy import select

    from farm.db import Worker, migrate, session_scope

    settings = _settings()
    migrate(settings.database_url)
    with session_scope(settings.database_url) as s:
        rows = [
            {
                "name": w.name,
                "queue": w.queue,
                "device": w.device,
                "pid": w.pid,
                "models": w.models,
                "loaded": w.loaded or [],
                "queues": w.queues or [],
                "current": w.current,
                "step": w.step,
                "steps": w.steps,
                "tasks_done": w.tasks_done,
                "heartbeat_at": w.heartbeat_at.isoformat() + "Z",
            }
            for w in s.scalars(select(Worker).order_by(Worker.name))
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for w in rows:
        models = ", ".join(f"{k} x{v}" for k, v in w["models"].items())
        click.echo(f"{w['name']:<30} {w['device']:<8} tasks={w['tasks_done']:<5} {models}")
        if w["queues"]:
            click.echo(f"{'':<30} consumes {', '.join(w['queues'])}")
        if w["current"]:
            at = f" (step {w['step']}/{w['steps']})" if w["step"] is not None else ""
            click.echo(f"{'':<30} running {w['current']}{at}")


def print_ranked(settings: Settings, batch_id: str) -> None:
    """The ranked result as a person reads it: each prompt's winner, its scores, and why others fell."""
    from farm import views
    from farm.db import Batch, session_scope

    with session_scope(settings.database_url) as s:
        data = views.batch_dict(s, s.get(Batch, batch_id))
    p = data["progress"]
    click.echo(
        f"\nbatch {data['name']} ({data['id']}): {data['status']}, {p['done']}/{p['total']} candidates "
        f"({p.get(CandidateStatus.PASSED, 0)} passed, {p.get(CandidateStatus.REJECTED, 0)} rejected, "
        f"{p.get(CandidateStatus.FAILED, 0)} failed)"
    )
    header = (
        f"{'#':>3}  {'prompt':<42} {'winner':<10} {'score':>8} {'pref':>8} {'align':>7}  rejected / failed"
    )
    click.echo(header)
    click.echo("-" * len(header))
    winners = []
    for it in data["items"]:
        by_id = {c["id"]: c for c in it["candidates"]}
        win = by_id.get(it["winners"][0]) if it["winners"] else None
        why = Counter(
            r.split(":", 1)[0]
            for c in it["candidates"]
            if c["status"] == CandidateStatus.REJECTED
            for r in c["reasons"][:1]
        )
        failed = sum(1 for c in it["candidates"] if c["status"] == CandidateStatus.FAILED)
        fell = ", ".join(f"{n} {layer}" for layer, n in why.items()) or "-"
        if failed:
            fell += f" / {failed} failed"
        prompt = it["prompt"] if len(it["prompt"]) <= 42 else it["prompt"][:41] + "…"
        if win:
            winners.extend(by_id[w] for w in it["winners"])
            click.echo(
                f"{it['index']:>3}  {prompt:<42} #{win['index']:<9} {win['score']:>8.3f} "
                f"{win['preference']:>8.3f} {win['alignment']:>7.3f}  {fell}"
            )
        else:
            click.echo(f"{it['index']:>3}  {prompt:<42} {'(none)':<10} {'':>8} {'':>8} {'':>7}  {fell}")
    if winners:
        click.echo("\nwinning images:")
        for w in winners:
            click.echo(f"  {_where(settings, w['image_path'])}")
    click.echo(f"\nread it back:  farm status {batch_id} --json")
    click.echo(f"browse it:     farm up, then open {settings.web_url}/batches/{batch_id}")


@cli.command()
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=EXAMPLE,
    show_default=True,
)
def demo(manifest: Path) -> None:
    """Start the embedded stack, run a real batch to the end, print the ranked result, stop everything."""
    from farm import dispatch
    from farm.stack import Stack

    settings = _settings()
    click.echo(f"farm demo: FARM_HOME={settings.home}, devices {', '.join(settings.devices)}")
    with Stack(settings) as stack:
        stack.start_workers()
        done = dispatch.submit(manifest.read_bytes(), settings=settings, base_dir=manifest.parent)
        click.echo(
            f"batch {done.batch_id}: {done.items} items, {done.candidates} candidates "
            f"(workers load their models first; the bar starts moving after that)"
        )
        status = wait_for(settings, done.batch_id, check=stack.check_alive)
        print_ranked(settings, done.batch_id)
    if status != BatchStatus.DONE:
        raise click.ClickException(f"the batch ended {status}")


@cli.command()
@click.option("--items", default=24, show_default=True)
@click.option("--candidates", default=4, show_default=True, help="Candidates per item.")
@click.option("--size", default=64, show_default=True, help="Square image side in pixels.")
@click.option("--steps", default=8, show_default=True)
@click.option("--slice-size", default=4, show_default=True)
@click.option("--model", default="tiny", show_default=True, help="Generator preset (random-sdxl on a GPU).")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option(
    "--devices",
    default="cuda0=cpu,cuda1=cpu",
    show_default=True,
    help="Device map of run C (two devices); run B uses its first. One device: no run C.",
)
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--scale",
    is_flag=True,
    help="Measure submit/enqueue/page latency at 100 and 10,000 items, and every process's memory after "
    "batches of 100 and 10,000 candidates.",
)
@click.option(
    "--repeat", default=2, show_default=True, help="Rounds of the runs; each run keeps its fastest round."
)
@click.option(
    "--qc-worker/--no-qc-worker",
    default=True,
    show_default=True,
    help="Also run D: one device with its QC worker (FARM_QC=worker), against a loop that only generates.",
)
@click.option("--inner-loop", hidden=True, help="Internal: run the bare loop A in this (pinned) process.")
def bench(
    items: int,
    candidates: int,
    size: int,
    steps: int,
    slice_size: int,
    model: str,
    dtype: str,
    devices: str,
    as_json: bool,
    scale: bool,
    repeat: int,
    qc_worker: bool,
    inner_loop: str | None,
) -> None:
    """Measure the farm against a bare loop of the same stages (A), with one device (B), two (C), and one
    with its QC worker (D)."""
    from farm import bench as b

    if scale:
        click.echo(json.dumps({"enqueue": b.scale(), "device_workers": b.worker_memory()}, indent=2))
        return
    if inner_loop:
        workload = b.Workload(**json.loads(inner_loop))
        click.echo(json.dumps(b.bare_loop(workload, _settings().models_dir)))
        return
    workload = b.Workload(
        items=items,
        candidates=candidates,
        size=size,
        steps=steps,
        slice_size=slice_size,
        model=model,
        dtype=dtype,
    )
    click.echo(
        f"farm bench: {workload.total} candidates per run: A bare loop, B farm on one device, "
        f"C farm on two devices (if --devices names two), D one device with its QC worker...",
        err=True,
    )
    try:
        data = b.bench(workload, devices=devices, repeat=repeat, qc_worker=qc_worker)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(data, indent=2) if as_json else b.format_report(data))


@cli.command()
@click.option("--minutes", default=2.0, show_default=True, help="How long faults are injected.")
@click.option(
    "--settle",
    "settle_minutes",
    default=3.0,
    show_default=True,
    help="Then, how long the batches may take to close.",
)
@click.option("--seed", type=int, default=None, help="Seed of the faults and the load (default: random).")
@click.option(
    "--database-url",
    default=None,
    help="An EMPTY database to run on, e.g. postgresql+psycopg2://... (default: SQLite under the soak's "
    "home); PostgreSQL adds pg_terminate_backend of the farm's connections to the faults.",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="FARM_HOME of the soak's own farm (default: a new temporary folder, removed when the soak passes).",
)
def chaos(
    minutes: float, settle_minutes: float, seed: int | None, database_url: str | None, home: Path | None
) -> None:
    """Soak a farm of its own under random faults, then check that nothing was lost, doubled or left behind.

    Starts two CPU-backed devices (one with a QC worker) and the control worker under a fresh FARM_HOME, feeds
    them batches, and kills, pauses and restarts their processes, Redis and (PostgreSQL) database connections
    at seeded random moments. Exits 1, printing the seed, when any check fails."""
    import random
    import shutil
    import tempfile

    from farm.chaos import Chaos

    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    own_home = home is None
    home = Path(tempfile.mkdtemp(prefix="farm-chaos-")) if home is None else home.resolve()
    soak = Chaos(
        home,
        seed=seed,
        minutes=minutes,
        settle_minutes=settle_minutes,
        database_url=database_url,
        say=click.echo,
    )
    report = soak.run()
    click.echo(report.table())
    if not report.ok:
        problems = report.audit.problems or ["batches still open when the settling time ran out"]
        click.echo(
            "FAILED: " + "; ".join(problems) + f"\nrerun with --seed {seed}; logs in {soak.stack.log_dir}",
            err=True,
        )
        sys.exit(1)
    if own_home:
        shutil.rmtree(home, ignore_errors=True)


def _where(settings: Settings, name: str) -> str:
    """Where a stored image is, as a person would open it."""
    if settings.artifact_store.startswith("s3://"):
        return f"{settings.artifact_store.rstrip('/')}/{name}"
    return str(settings.artifacts_dir / name)


def _local_copy(settings: Settings, name: str) -> Path:
    """A local file with the stored object's bytes (the object itself for the local store)."""
    import tempfile

    from farm.artifacts import store_for

    store = store_for(settings)
    local = store.local_path(name)
    if local is not None:
        return local
    tmp = Path(tempfile.mkdtemp(prefix="farm-replay-")) / Path(name).name
    tmp.write_bytes(store.read_bytes(name))
    return tmp


def main() -> None:
    cli(prog_name="farm")
