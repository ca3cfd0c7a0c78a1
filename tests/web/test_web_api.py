"""The JSON API over a real SQLite database (and a real Redis where a batch is submitted)."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select, update
from web_helpers import EXAMPLE_MANIFEST, PDQ_HASH, queued_messages

from farm.assets import FILE_REFUSED, FOLDER_REFUSED
from farm.db import Batch, Candidate, Item, Worker, session_scope
from farm.states import RoundKind


def _count(settings: Any, model: Any) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(model))


# -- submitting ----------------------------------------------------------------------------------------------


def test_submit_yaml_body_writes_rows_and_queues_dispatch(client, settings, broker):
    r = client.post("/api/v1/batches", data=EXAMPLE_MANIFEST, content_type="text/yaml")
    assert r.status_code == 202, r.json
    batch_id = r.json["id"]
    assert r.json["items"] == 4 and r.json["candidates"] == 12
    assert r.headers["Location"] == f"/api/v1/batches/{batch_id}"
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, batch_id)
        assert batch.status == "queued" and batch.name == "web-test"
        assert s.scalar(select(func.count()).where(Item.batch_id == batch_id)) == 4
        assert s.scalar(select(func.count()).where(Candidate.batch_id == batch_id)) == 12
    messages = queued_messages(broker, "control")
    assert [m["headers"]["task"] for m in messages] == ["farm.dispatch_batch"]
    assert batch_id in messages[0]["headers"]["argsrepr"]


def test_submit_multipart_field_and_x_yaml(client, settings, broker):
    r = client.post(
        "/api/v1/batches",
        data={"manifest": (io.BytesIO(EXAMPLE_MANIFEST.encode()), "m.yaml")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 202, r.json
    r2 = client.post("/api/v1/batches", data=EXAMPLE_MANIFEST, content_type="application/x-yaml")
    assert r2.status_code == 202, r2.json
    assert _count(settings, Batch) == 2
    assert len(queued_messages(broker, "control")) == 2


def test_dry_run_counts_and_writes_nothing(client, settings):
    r = client.post("/api/v1/batches?dry_run=1", data=EXAMPLE_MANIFEST, content_type="text/yaml")
    assert r.status_code == 200
    summary = r.json["summary"]
    assert r.json["dry_run"] is True
    assert (summary["items"], summary["candidates"], summary["name"]) == (4, 12, "web-test")
    assert summary["sizes"]["64x96"] == {"items": 1, "candidates": 3}
    assert _count(settings, Batch) == 0


@pytest.mark.parametrize(
    ("body", "path", "words"),
    [
        ("name: [unclosed", "(root)", "invalid YAML"),
        ("name: x\nitems: [a fox]\ndefaults: {size: 7x7}\n", "defaults.size", "multiples of 8"),
        ("name: x\nitems: [a fox]\ncolour: red\n", "colour", ""),
        ("- just\n- a list\n", "(root)", "mapping"),
    ],
)
def test_bad_manifest_is_400_with_the_field_path(client, settings, body, path, words):
    r = client.post("/api/v1/batches", data=body, content_type="text/yaml")
    assert r.status_code == 400
    errors = r.json["errors"]
    assert path in [e["path"] for e in errors], errors
    assert words in " ".join(e["message"] for e in errors)
    assert _count(settings, Batch) == 0


def test_bad_manifest_lists_every_problem(client):
    body = "name: x\nitems:\n  - prompt: a\n    size: 3x3\n  - prompt: b\n    steps: -1\n"
    r = client.post("/api/v1/batches", data=body, content_type="text/yaml")
    assert r.status_code == 400
    paths = {e["path"] for e in r.json["errors"]}
    assert {"items[0].size", "items[1].steps"} <= paths


def test_dry_run_reports_errors_too(client):
    r = client.post("/api/v1/batches?dry_run=1", data="name: x\nitems: []\n", content_type="text/yaml")
    assert r.status_code == 400
    assert r.json["errors"][0]["path"] == "items"


def test_missing_manifest_is_400(client):
    r = client.post("/api/v1/batches", data=b"", content_type="text/yaml")
    assert r.status_code == 400
    assert "manifest" in r.json["errors"][0]["message"]
    r = client.post("/api/v1/batches", data={"other": "x"}, content_type="multipart/form-data")
    assert r.status_code == 400
    r = client.post("/api/v1/batches", json={"name": "x"})
    assert r.status_code == 400


def test_oversize_manifest_is_413(make_app, monkeypatch):
    monkeypatch.setenv("FARM_MAX_UPLOAD_BYTES", "2048")
    client = make_app().test_client()
    just_over = EXAMPLE_MANIFEST + "#" * (2049 - len(EXAMPLE_MANIFEST)) + "\n"
    r = client.post("/api/v1/batches", data=just_over, content_type="text/yaml")
    assert r.status_code == 413
    assert "limit is 2048 bytes" in r.json["errors"][0]["message"]
    huge = "#" * 500_000
    r = client.post("/api/v1/batches", data=huge, content_type="text/yaml")
    assert r.status_code == 413 and "limit of 2048 bytes" in r.json["errors"][0]["message"]
    r = client.post(
        "/api/v1/batches",
        data={"manifest": (io.BytesIO(just_over.encode()), "m.yaml")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 413


# -- files a manifest names (farm.assets) --------------------------------------------------------------------


def manifest_naming(**fields: Any) -> str:
    doc: dict[str, Any] = {
        "name": "files",
        "model": "tiny",
        "defaults": {"candidates": 2, "steps": 1, "size": "64x64"},
        "items": ["a red fox"],
    }
    doc.update(fields)
    return yaml.safe_dump(doc, sort_keys=False)


def multipart(manifest: str, **files: bytes) -> dict[str, Any]:
    """A multipart body: the manifest, and each file under the field ``files`` with its keyword as its name
    (``block_txt`` -> ``block.txt``)."""
    return {
        "manifest": (io.BytesIO(manifest.encode()), "m.yaml"),
        "files": [(io.BytesIO(data), name.replace("_", ".")) for name, data in files.items()],
    }


def _refused_cases(disk: Any) -> list[tuple[str, dict[str, Any], str]]:
    cases = [
        ("moderation.pdq_blocklist", {"moderation": {"pdq_blocklist": v}}, FILE_REFUSED)
        for v in disk.refused_files()
    ]
    for field in ("model", "validation.model", "scoring.model"):
        for v in disk.refused_models():
            fields = {"model": v} if field == "model" else {field.split(".")[0]: {"model": v}}
            cases.append((field, fields, FOLDER_REFUSED))
    return cases


def test_api_refuses_every_path_outside_uploads_and_asset_dirs_with_one_message_and_keeps_nothing(
    server_disk, make_app, broker
):
    """/etc/passwd, ../ paths, links out of an asset folder, ~root, folders and files that exist outside:
    one message per kind of thing named, whatever is on the disk, and no row, no file, no message."""
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    for path, fields, message in _refused_cases(server_disk):
        for data, kind in (
            (manifest_naming(**fields), "text/yaml"),
            (multipart(manifest_naming(**fields)), "multipart/form-data"),
        ):
            r = client.post("/api/v1/batches", data=data, content_type=kind)
            assert r.status_code == 400, (path, fields, r.json)
            assert r.json["errors"] == [{"path": path, "message": message}], fields
    assert _count(settings, Batch) == 0 and server_disk.uploads(settings) == []
    assert queued_messages(broker, "control") == []


def test_api_dry_run_refuses_paths_outside_as_submit_does(server_disk, make_app):
    client = make_app().test_client()
    r = client.post(
        "/api/v1/batches?dry_run=1",
        content_type="text/yaml",
        data=manifest_naming(moderation={"pdq_blocklist": str(server_disk.outside / "x.txt")}),
    )
    assert r.status_code == 400 and r.json["errors"][0]["message"] == FILE_REFUSED


def test_api_blocklist_uploaded_with_the_manifest_is_stored_and_read_back_by_the_worker_loader(
    make_app, broker
):
    from farm.artifacts import store_for
    from farm.ml.moderation import load_blocklist

    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    listing = f"# exported\n{PDQ_HASH},known-bad-image\n{'0' * 64}\tother\n".encode()
    text = manifest_naming(moderation={"pdq_blocklist": "block.txt"})
    r = client.post(
        "/api/v1/batches", content_type="multipart/form-data", data=multipart(text, block_txt=listing)
    )
    assert r.status_code == 202, r.json
    with session_scope(settings.database_url) as s:
        ref = s.get(Batch, r.json["id"]).settings["moderation"]["pdq_blocklist"]
    assert ref.startswith("store:uploads/") and ref.endswith("/block.txt")
    stored = settings.artifacts_dir / ref.removeprefix("store:")
    assert stored.read_bytes() == listing
    assert load_blocklist(ref, store=store_for(settings)) == [PDQ_HASH, "0" * 64]


def test_api_dry_run_with_an_uploaded_file_stores_nothing(make_app, server_disk):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    r = client.post(
        "/api/v1/batches?dry_run=1",
        content_type="multipart/form-data",
        data=multipart(
            manifest_naming(moderation={"pdq_blocklist": "block.txt"}), block_txt=PDQ_HASH.encode()
        ),
    )
    assert r.status_code == 200, r.json
    assert server_disk.uploads(settings) == [] and _count(settings, Batch) == 0


def test_api_refused_submission_leaves_no_uploaded_file(make_app, server_disk, broker):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    bad = manifest_naming(moderation={"pdq_blocklist": "block.txt"}, defaults={"size": "7x7"})
    r = client.post(
        "/api/v1/batches",
        content_type="multipart/form-data",
        data=multipart(bad, block_txt=PDQ_HASH.encode()),
    )
    assert r.status_code == 400 and r.json["errors"][0]["path"] == "defaults.size"
    malformed = manifest_naming(moderation={"pdq_blocklist": "block.txt"})
    r = client.post(
        "/api/v1/batches",
        content_type="multipart/form-data",
        data=multipart(malformed, block_txt=b"not a hash\n"),
    )
    assert r.status_code == 400 and "line 1" in r.json["errors"][0]["message"]
    assert server_disk.uploads(settings) == [] and _count(settings, Batch) == 0


@pytest.mark.slow
def test_api_upload_with_the_broker_down_removes_the_stored_file_and_the_rows(
    make_app, server_disk, broker_down
):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    r = client.post(
        "/api/v1/batches",
        content_type="multipart/form-data",
        data=multipart(
            manifest_naming(moderation={"pdq_blocklist": "block.txt"}), block_txt=PDQ_HASH.encode()
        ),
    )
    assert r.status_code == 503, r.json
    assert server_disk.uploads(settings) == []
    assert list((settings.artifacts_dir / "uploads").iterdir()) == []
    assert _count(settings, Batch) == 0 and _count(settings, Candidate) == 0


def test_api_upload_the_manifest_does_not_name_is_refused(make_app, server_disk, broker):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    r = client.post(
        "/api/v1/batches",
        content_type="multipart/form-data",
        data=multipart(manifest_naming(), spare_txt=b"x"),
    )
    assert r.status_code == 400
    assert r.json["errors"][0]["path"] == "uploads" and "spare.txt" in r.json["errors"][0]["message"]
    assert server_disk.uploads(settings) == [] and _count(settings, Batch) == 0


def test_api_file_in_an_asset_dir_is_accepted(server_disk, make_app, broker):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    for value in ("ok.txt", str(server_disk.assets / "ok.txt")):
        r = client.post(
            "/api/v1/batches",
            content_type="text/yaml",
            data=manifest_naming(moderation={"pdq_blocklist": value}),
        )
        assert r.status_code == 202, r.json
        with session_scope(settings.database_url) as s:
            recorded = s.get(Batch, r.json["id"]).settings["moderation"]["pdq_blocklist"]
        assert recorded == str((server_disk.assets / "ok.txt").resolve())


@pytest.mark.parametrize("name", ["../evil.txt", ".hidden", "a b.txt", "..", "x" * 129])
def test_api_upload_names_must_be_plain_file_names(make_app, server_disk, name):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    data = multipart(manifest_naming(moderation={"pdq_blocklist": "block.txt"}))
    data["files"] = [(io.BytesIO(PDQ_HASH.encode()), name)]
    r = client.post("/api/v1/batches", content_type="multipart/form-data", data=data)
    assert r.status_code == 400, r.json
    assert r.json["errors"][0]["path"] == "uploads" and "not allowed" in r.json["errors"][0]["message"]
    assert server_disk.uploads(settings) == [] and _count(settings, Batch) == 0


def test_api_uploaded_file_over_its_own_limit_is_413(make_app, server_disk, monkeypatch):
    monkeypatch.setenv("FARM_MAX_ASSET_BYTES", "2048")
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    big = (PDQ_HASH + "\n").encode() * 40  # 2600 bytes: over the file limit, under the manifest's
    r = client.post(
        "/api/v1/batches",
        content_type="multipart/form-data",
        data=multipart(manifest_naming(moderation={"pdq_blocklist": "block.txt"}), block_txt=big),
    )
    assert r.status_code == 413 and "FARM_MAX_ASSET_BYTES" in r.json["errors"][0]["message"]
    assert server_disk.uploads(settings) == [] and _count(settings, Batch) == 0


@pytest.mark.parametrize(
    ("fields", "path", "words"),
    [
        ({"validation": {"model": "tinny-clip"}}, "validation.model", "unknown validator model 'tinny-clip'"),
        ({"scoring": {"model": "tiny-clip"}}, "scoring.model", "validator preset, not a scorer"),
        (
            {"scoring": {"model": "clip-score:tiny-aesthetic"}},
            "scoring.model",
            "scorer preset, not a validator",
        ),
    ],
)
def test_a_validator_or_scorer_no_worker_knows_is_refused_at_validation(client, fields, path, words):
    """They used to pass validation and fail every candidate at validate or score."""
    r = client.post("/api/v1/batches?dry_run=1", data=manifest_naming(**fields), content_type="text/yaml")
    assert r.status_code == 400, r.json
    assert r.json["errors"][0]["path"] == path and words in r.json["errors"][0]["message"]


def test_cli_submit_still_accepts_absolute_paths(server_disk, settings, broker):
    """The operator's own manifest (farm submit) names files and model folders anywhere, as before."""
    from farm import dispatch

    hashes = server_disk.outside / "hashes.txt"
    text = manifest_naming(moderation={"pdq_blocklist": str(hashes)})
    done = dispatch.submit(text, settings=settings, base_dir=server_disk.assets)
    with session_scope(settings.database_url) as s:
        assert s.get(Batch, done.batch_id).settings["moderation"]["pdq_blocklist"] == str(hashes.resolve())
    manifest, _ = dispatch.plan(manifest_naming(model=str(server_disk.pipe)), settings=settings)
    assert manifest.model == str(server_disk.pipe.resolve())


@pytest.mark.slow
def test_submit_with_the_broker_down_is_503_and_leaves_no_rows(client, settings, broker_down):
    r = client.post("/api/v1/batches", data=EXAMPLE_MANIFEST, content_type="text/yaml")
    assert r.status_code == 503
    assert "broker" in r.json["errors"][0]["message"]
    assert _count(settings, Batch) == 0 and _count(settings, Candidate) == 0


# -- reading -------------------------------------------------------------------------------------------------


def test_list_batches_with_progress_throughput_and_eta(client, make_batch):
    done = make_batch("done")
    running = make_batch("running")
    r = client.get("/api/v1/batches")
    assert r.status_code == 200
    rows = {b["id"]: b for b in r.json["batches"]}
    assert r.json["total"] == 2 and set(rows) == {done.batch_id, running.batch_id}
    d = rows[done.batch_id]
    assert d["progress"]["done"] == 8 and d["progress"]["rejected"] == 3 and d["progress"]["failed"] == 2
    assert d["throughput"] == pytest.approx(8 / 100, rel=0.1)
    assert d["eta_seconds"] is None  # finished
    assert "items" not in d
    run = rows[running.batch_id]
    assert run["progress"] == {**run["progress"], "done": 4, "total": 8}
    assert run["throughput"] > 0 and run["eta_seconds"] == pytest.approx(100, rel=0.2)
    only = client.get("/api/v1/batches?status=running").json
    assert [b["id"] for b in only["batches"]] == [running.batch_id]
    assert client.get("/api/v1/batches?limit=1").json["limit"] == 1


def test_get_batch_is_the_records_batch_dict(client, make_batch):
    made = make_batch("done")
    r = client.get(f"/api/v1/batches/{made.batch_id}")
    assert r.status_code == 200
    body = r.json
    assert body["id"] == made.batch_id and body["status"] == "done"
    assert [it["id"] for it in body["items"]] == made.item_ids
    first = body["items"][0]
    assert first["winners"] == [f"{made.item_ids[0]}-000"]
    assert {c["status"] for c in first["candidates"]} == {"passed", "rejected", "failed"}
    rounds = [(r["number"], r["kind"], r["winners"]) for r in first["rounds"]]
    assert rounds == [(0, "top_up", [f"{made.item_ids[0]}-001"]), (1, "ranked", first["winners"])]
    assert all(r["created_at"].endswith("Z") for r in first["rounds"])
    assert [r["kind"] for r in body["items"][1]["rounds"]] == ["ranked"]
    assert "items" not in client.get(f"/api/v1/batches/{made.batch_id}?items=0").json


def test_unknown_batch_and_endpoint_are_json_404(client):
    for url in ("/api/v1/batches/nope", "/api/v1/batches/nope/export", "/api/v1/nothing/here"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert r.is_json and r.json["errors"][0]["message"]
    r = client.post("/api/v1/batches/nope/cancel")
    assert r.status_code == 404 and r.is_json


def test_wrong_method_is_json(client):
    r = client.delete("/api/v1/batches")
    assert r.status_code == 405 and r.is_json


# -- actions -------------------------------------------------------------------------------------------------


def test_cancel_running_batch(client, settings, make_batch):
    made = make_batch("running")
    r = client.post(f"/api/v1/batches/{made.batch_id}/cancel")
    assert r.status_code == 202 and r.json == {"id": made.batch_id, "cancelled": True}
    with session_scope(settings.database_url) as s:
        # "cancelling" until the slices in flight stop and the last item closes (no workers here)
        assert s.get(Batch, made.batch_id).status in ("cancelling", "cancelled")


def test_cancel_queued_batch_closes_unsent_items_through_the_broker(client, settings, make_batch, broker):
    made = make_batch("queued")
    r = client.post(f"/api/v1/batches/{made.batch_id}/cancel")
    assert r.status_code == 202
    messages = queued_messages(broker, "control")
    assert [m["headers"]["task"] for m in messages] == ["farm.rank"]
    assert made.item_ids[0] in messages[0]["headers"]["argsrepr"]


def test_cancel_finished_batch_is_409(client, settings, make_batch):
    made = make_batch("done")
    r = client.post(f"/api/v1/batches/{made.batch_id}/cancel")
    assert r.status_code == 409
    assert "done" in r.json["errors"][0]["message"]


def test_export_zip_has_winners_with_json_sidecars(client, make_batch):
    made = make_batch("done", name="shots")
    r = client.get(f"/api/v1/batches/{made.batch_id}/export")
    assert r.status_code == 200 and r.mimetype == "application/zip"
    assert "shots-" in r.headers["Content-Disposition"]
    zf = zipfile.ZipFile(io.BytesIO(r.data))
    names = zf.namelist()
    pngs = sorted(n for n in names if n.endswith(".png"))
    assert len(pngs) == 2  # one winner per item
    for name in pngs:
        assert zf.read(name).startswith(b"\x89PNG")
        sidecar = json.loads(zf.read(name[: -len(".png")] + ".json"))
        assert sidecar["batch"] == made.batch_id
        assert sidecar["candidate"]["is_winner"] is True
        assert sidecar["recipe"]["seed"] == sidecar["candidate"]["seed"]
    assert json.loads(zf.read("batch.json"))["id"] == made.batch_id
    assert zf.read("manifest.yaml").decode().startswith("version: 1")


def test_export_of_a_batch_without_winners_is_an_empty_zip(client, make_batch):
    made = make_batch("queued")
    zf = zipfile.ZipFile(io.BytesIO(client.get(f"/api/v1/batches/{made.batch_id}/export").data))
    assert sorted(zf.namelist()) == ["batch.json", "manifest.yaml"]


# -- workers and descriptions --------------------------------------------------------------------------------


def test_workers_from_the_workers_table(client, make_worker):
    make_worker("w-cuda0", current="farm.generate", age=5)
    make_worker("w-cuda1", queue="cuda1", age=400, models={})
    r = client.get("/api/v1/workers")
    rows = {w["name"]: w for w in r.json["workers"]}
    assert rows["w-cuda0"]["models"] == {"generator:tiny": 1, "scorer:tiny": 2}
    assert rows["w-cuda0"]["current"] == "farm.generate"
    assert rows["w-cuda0"]["heartbeat_age_seconds"] == pytest.approx(5, abs=3)
    assert rows["w-cuda1"]["heartbeat_age_seconds"] >= 400
    assert rows["w-cuda0"]["step"] is None and rows["w-cuda0"]["steps"] is None


def test_workers_carry_the_step_of_the_slice_in_flight(client, make_worker, settings):
    make_worker("w-cuda0", current="farm.generate")
    with session_scope(settings.database_url) as s:
        s.execute(update(Worker).where(Worker.name == "w-cuda0").values(step=40, steps=300))
    row = client.get("/api/v1/workers").json["workers"][0]
    assert (row["current"], row["step"], row["steps"]) == ("farm.generate", 40, 300)


def test_schema_is_the_manifest_json_schema(client):
    r = client.get("/api/v1/schema")
    assert r.status_code == 200
    schema = json.loads(r.data)
    assert schema["$schema"].endswith("2020-12/schema")
    assert {"name", "items"} <= set(schema["properties"])


def test_openapi_describes_the_files_sent_with_a_manifest(client):
    body = client.get("/api/v1/openapi.json").json["paths"]["/batches"]["post"]["requestBody"]["content"]
    schema = body["multipart/form-data"]["schema"]
    assert schema["required"] == ["manifest"]
    files = schema["properties"]["files"]
    assert files["type"] == "array" and files["maxItems"] == 16
    assert "FARM_MAX_ASSET_BYTES" in files["description"] and "FARM_ASSET_DIRS" in files["description"]


def test_openapi_describes_every_endpoint(client, app):
    doc = client.get("/api/v1/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("api.") and "<path:" not in rule.rule:
            path = rule.rule.removeprefix("/api/v1").replace("<batch_id>", "{batch_id}")
            served |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented
    kinds = doc["components"]["schemas"]["Round"]["properties"]["kind"]["enum"]
    assert kinds == [k.value for k in RoundKind] and "ranked" in kinds
    refs = json.dumps(doc)
    for name in doc["components"]["schemas"]:
        assert f"#/components/schemas/{name}" in refs or name == "Errors"
