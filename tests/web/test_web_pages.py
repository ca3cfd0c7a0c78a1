"""The HTML dashboard over real SQLite, real PNGs in the artifact store and, to submit, a real Redis."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile

import pytest
from markupsafe import escape
from PIL import Image
from sqlalchemy import func, select, update
from web_helpers import EXAMPLE_MANIFEST, PDQ_HASH, csrf_from, queued_messages

from farm.assets import FILE_REFUSED, FOLDER_REFUSED
from farm.db import Batch, Worker, session_scope
from farm.manifest import ScoringWeights
from web import readers


def _batches(settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Batch))


def _csrf(client) -> str:
    return csrf_from(client.get("/upload").get_data(as_text=True))


# -- batches list --------------------------------------------------------------------------------------------


def test_batches_list_shows_status_progress_counts(client, make_batch):
    done = make_batch("done", name="product-shots")
    running = make_batch("running", name="game-assets")
    html = client.get("/").get_data(as_text=True)
    assert "product-shots" in html and "game-assets" in html
    assert f'data-batch-id="{done.batch_id}"' in html and f'data-batch-id="{running.batch_id}"' in html
    assert "8 / 8" in html and "4 / 8" in html
    assert 'data-field="rejected">3<' in html and 'data-field="failed">2<' in html
    assert "/min" in html  # throughput of 8 candidates in 100 s
    assert "progress.js" in html and "/api/v1/batches" in html


def test_empty_batches_list_points_to_upload(client):
    html = client.get("/").get_data(as_text=True)
    assert "No batches yet" in html and 'href="/upload"' in html


def test_live_progress_script_is_served(client):
    r = client.get("/static/progress.js")
    assert r.status_code == 200 and b"fetch(" in r.data


# -- one batch -----------------------------------------------------------------------------------------------


def test_batch_page_rows_winners_and_badges(client, make_batch):
    made = make_batch("done")
    html = client.get(f"/batches/{made.batch_id}").get_data(as_text=True)
    assert "a red fox in the snow" in html and "a lighthouse at dusk" in html
    winner = f"{made.item_ids[0]}-000"
    assert f'src="/artifacts/{made.batch_id}/{winner}.png"' in html
    assert "rejected: nudenet" in html
    assert "rejected: validation" in html
    assert "failed in generate" in html
    assert "winner" in html and "rank 1" in html
    assert html.count('class="muted rounds"') == 1 and "top-up → ranked" in html, "item 0 was topped up"
    assert f"/batches/{made.batch_id}/contact-sheet.png" in html
    assert f"/batches/{made.batch_id}/scores.png" in html
    assert "Cancel batch" not in html  # a finished batch cannot be cancelled
    assert "Resume" not in html  # nor resumed
    assert "Retry 2 failed" in html and f'action="/batches/{made.batch_id}/retry"' in html


def test_batch_page_filters_candidates_by_status(client, make_batch):
    made = make_batch("done")
    html = client.get(f"/batches/{made.batch_id}?status=failed").get_data(as_text=True)
    assert "failed in generate" in html
    assert "rejected: nudenet" not in html and "passed · winner" not in html
    html = client.get(f"/batches/{made.batch_id}?status=cancelled").get_data(as_text=True)
    assert "No items with cancelled candidates" in html
    running = make_batch("running")
    html = client.get(f"/batches/{running.batch_id}?status=in_progress").get_data(as_text=True)
    assert "a lighthouse at dusk" in html and "a red fox" not in html


def test_batch_page_bad_filter_is_400(client, make_batch):
    made = make_batch("done")
    assert client.get(f"/batches/{made.batch_id}?status=bogus").status_code == 400


def test_running_batch_page_offers_cancel_and_polls(client, make_batch):
    made = make_batch("running")
    html = client.get(f"/batches/{made.batch_id}").get_data(as_text=True)
    assert "Cancel batch" in html
    assert f"/api/v1/batches/{made.batch_id}?items=0" in html


def test_unknown_batch_and_candidate_pages_are_404(client):
    assert client.get("/batches/nope").status_code == 404
    assert client.get("/candidates/nope").status_code == 404
    assert client.get("/batches/nope/contact-sheet.png").status_code == 404
    assert client.get("/batches/nope/scores.png").status_code == 404
    assert client.get("/batches/nope/export.zip").status_code == 404


def _png_of(response) -> Image.Image:
    assert response.status_code == 200 and response.mimetype == "image/png"
    image = Image.open(io.BytesIO(response.data))
    image.load()
    return image


def test_contact_sheet_is_a_png_of_the_winners(client, make_batch):
    made = make_batch("done")
    sheet = _png_of(client.get(f"/batches/{made.batch_id}/contact-sheet.png"))
    assert sheet.width > 160 * 2 and sheet.height > 160
    # the first winner's colour (60, 120, 200) appears in the sheet
    colours = {c for _, c in sheet.convert("RGB").getcolors(1_000_000)}
    assert (0, 120, 200) in colours and (60, 120, 200) in colours


def test_contact_sheet_without_winners_still_renders(client, make_batch):
    made = make_batch("queued")
    assert _png_of(client.get(f"/batches/{made.batch_id}/contact-sheet.png")).width > 0


def test_score_histogram_is_a_png_with_both_groups(client, make_batch):
    made = make_batch("done")
    plot = _png_of(client.get(f"/batches/{made.batch_id}/scores.png"))
    colours = {c for _, c in plot.convert("RGB").getcolors(1_000_000)}
    assert (46, 139, 87) in colours  # passed bars
    assert (200, 60, 60) in colours  # rejected bars (validation reject has an alignment-only composite)
    empty = make_batch("queued")
    assert _png_of(client.get(f"/batches/{empty.batch_id}/scores.png")).size == (640, 320)


def test_scores_of_settings_stored_without_the_alignment_weight_use_its_default(settings, make_batch):
    made = make_batch("done")
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, made.batch_id)
        older = json.loads(json.dumps(batch.settings))
        del older["scoring"]["weights"]["alignment"]  # written before the weight was a setting
        batch.settings = older
    with session_scope(settings.database_url) as s:
        spread = readers.scores(s, s.get(Batch, made.batch_id))
    # The validation reject has only an alignment (0.1): its composite is the alignment weight's share.
    assert spread.rejected == [pytest.approx(0.1 * ScoringWeights().alignment)]
    assert ScoringWeights().alignment == 0.5


def test_ui_export_zip(client, make_batch):
    made = make_batch("done")
    r = client.get(f"/batches/{made.batch_id}/export.zip")
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.data)).namelist()
    assert sum(n.endswith(".png") for n in names) == 2 and sum(n.endswith(".json") for n in names) == 3


def test_ui_cancel_with_csrf(client, settings, make_batch):
    made = make_batch("running")
    token = csrf_from(client.get(f"/batches/{made.batch_id}").get_data(as_text=True))
    r = client.post(f"/batches/{made.batch_id}/cancel", data={"csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"].endswith(f"/batches/{made.batch_id}")
    with session_scope(settings.database_url) as s:
        assert s.get(Batch, made.batch_id).status in ("cancelling", "cancelled")
    html = client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Batch cancelled." in html and "Cancel batch" not in html


def test_ui_cancel_finished_batch_says_why(client, make_batch):
    made = make_batch("done")
    r = client.post(
        f"/batches/{made.batch_id}/cancel", data={"csrf_token": _csrf(client)}, follow_redirects=True
    )
    assert "only a queued or running batch can be cancelled" in r.get_data(as_text=True)


# -- candidate -----------------------------------------------------------------------------------------------


def test_candidate_page_shows_layers_recipe_scores_timings(client, make_batch):
    made = make_batch("done")
    cid = f"{made.item_ids[0]}-002"
    html = client.get(f"/candidates/{cid}").get_data(as_text=True)
    assert f'src="/artifacts/{made.batch_id}/{cid}.png"' in html
    assert "nudenet" in html and "layer-reject" in html and "exposed content (0.91)" in html
    assert "opennsfw" in html and "layer-flag" in html
    assert "Rejected by" in html
    assert "&#34;seed&#34;: 1002" in html or '"seed": 1002' in html
    assert "generate" in html and "0.250" in html and "cuda0" in html
    failed = client.get(f"/candidates/{made.item_ids[0]}-003").get_data(as_text=True)
    assert "CUDA out of memory" in failed and "no image" in failed
    winner = client.get(f"/candidates/{made.item_ids[0]}-000").get_data(as_text=True)
    assert "winner" in winner and "0.800" in winner and "1.100" in winner


# -- workers -------------------------------------------------------------------------------------------------


def test_workers_page_lists_models_and_links_flower(make_app, make_worker, monkeypatch):
    monkeypatch.setenv("FARM_FLOWER_PORT", "5999")
    client = make_app().test_client()
    make_worker("w-cuda0", current="farm.generate")
    make_worker("w-cuda1", queue="cuda1", age=500)
    html = client.get("/workers").get_data(as_text=True)
    assert "w-cuda0" in html and "w-cuda1" in html
    assert "generator:tiny</code> × 1" in html and "scorer:tiny</code> × 2" in html
    assert "farm.generate" in html and "idle" in html
    assert 'href="http://127.0.0.1:5999"' in html
    assert "8m" in html  # 500 s heartbeat age


def test_workers_page_shows_the_denoising_step_of_a_slice_in_flight_and_polls(client, make_worker, settings):
    make_worker("w-cuda0", current="farm.generate c-1 (+1)")
    make_worker("w-cuda1", queue="cuda1")
    with session_scope(settings.database_url) as s:
        s.execute(update(Worker).where(Worker.name == "w-cuda0").values(step=12, steps=150))
    html = client.get("/workers").get_data(as_text=True)
    assert '<progress data-field="step-bar" max="150" value="12">' in html and "step 12/150" in html
    assert html.count('data-field="stepping" hidden') == 1  # the idle worker's progress is hidden
    assert 'data-poll="/api/v1/workers"' in html and "progress.js" in html


def test_workers_page_empty(client):
    assert "No worker has reported yet" in client.get("/workers").get_data(as_text=True)


# -- artifacts -----------------------------------------------------------------------------------------------


def test_artifact_is_served_from_the_store(client, make_batch):
    made = make_batch("done")
    r = client.get(f"/artifacts/{made.batch_id}/{made.item_ids[0]}-000.png")
    assert r.status_code == 200 and r.data.startswith(b"\x89PNG")
    sidecar = client.get(f"/artifacts/{made.batch_id}/{made.item_ids[0]}-000.json")
    assert sidecar.status_code == 200 and sidecar.json["seed"] == 1


@pytest.mark.parametrize(
    "url",
    [
        "/artifacts/../farm.db",
        "/artifacts/%2e%2e/farm.db",
        "/artifacts/..%2ffarm.db",
        "/artifacts//etc/passwd",
        "/artifacts/%2fetc%2fpasswd",
        "/artifacts/x/../../farm.db",
        "/artifacts/outside-link/farm.db",
        "/artifacts/missing.png",
        "/artifacts/",
    ],
)
def test_artifact_traversal_and_missing_are_404(client, settings, make_batch, url):
    make_batch("done")
    (settings.artifacts_dir / "outside-link").symlink_to(settings.home)
    assert (settings.home / "farm.db").exists()
    r = client.get(url, follow_redirects=True)  # werkzeug first merges "//" with a redirect
    assert r.status_code == 404, url
    assert b"SQLite" not in r.data and b"root:" not in r.data


def test_artifact_directory_is_404(client, make_batch):
    made = make_batch("done")
    assert client.get(f"/artifacts/{made.batch_id}").status_code == 404


# -- upload --------------------------------------------------------------------------------------------------


def test_upload_page_has_file_text_preview_submit(client):
    html = client.get("/upload").get_data(as_text=True)
    assert 'type="file"' in html and "<textarea" in html
    assert 'value="preview"' in html and 'value="submit"' in html
    assert 'name="csrf_token"' in html


def test_preview_shows_counts_and_queues_nothing(client, settings):
    r = client.post(
        "/upload", data={"csrf_token": _csrf(client), "manifest_text": EXAMPLE_MANIFEST, "action": "preview"}
    )
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert 'id="preview"' in html
    assert 'data-field="items">4<' in html and 'data-field="candidates">12<' in html
    assert "64x96" in html
    assert "web-test" in html  # the text stays in the textarea for the submit that follows
    assert _batches(settings) == 0


def test_preview_lists_each_items_prompt_with_its_styles_and_wildcards_applied(client, settings):
    text = (
        "name: styled\nmodel: tiny\ndefaults: {candidates: 1, seed: 3}\n"
        "styles:\n  ink: {prompt: 'ink drawing of {prompt}', negative_prompt: colour}\n"
        "items:\n  - prompt: a <b>{red|blue}</b> kite\n    style: ink\n"
    )
    r = client.post("/upload", data={"csrf_token": _csrf(client), "manifest_text": text, "action": "preview"})
    assert r.status_code == 200, r.get_data(as_text=True)[:2000]
    html = r.get_data(as_text=True)
    assert 'id="prompts"' in html
    shown = re.search(r'data-field="prompt">([^<]*)<', html).group(1)
    assert shown in (
        "ink drawing of a &lt;b&gt;red&lt;/b&gt; kite",
        "ink drawing of a &lt;b&gt;blue&lt;/b&gt; kite",
    )
    assert "<td>colour</td>" in html and "<td>ink</td>" in html, "the style's negative prompt and its name"
    assert _batches(settings) == 0


def test_upload_errors_are_shown_at_their_field_path(client, settings):
    bad = "name: x\nitems:\n  - prompt: a\n    size: 3x3\n"
    r = client.post("/upload", data={"csrf_token": _csrf(client), "manifest_text": bad, "action": "submit"})
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert 'data-path="items[0].size"' in html and "<code>items[0].size</code>" in html
    assert "nothing was queued" in html and 'aria-invalid="true"' in html
    assert _batches(settings) == 0


def test_upload_bad_yaml_file(client, settings):
    r = client.post(
        "/upload",
        data={
            "csrf_token": _csrf(client),
            "action": "preview",
            "manifest_file": (io.BytesIO(b"name: [oops"), "bad.yaml"),
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert 'data-path="(root)"' in html and "invalid YAML" in html


def test_upload_nothing_is_400(client):
    r = client.post("/upload", data={"csrf_token": _csrf(client), "manifest_text": "  ", "action": "submit"})
    assert r.status_code == 400 and "Choose a manifest file" in r.get_data(as_text=True)


def test_upload_oversize_is_413(make_app, monkeypatch, settings):
    monkeypatch.setenv("FARM_MAX_UPLOAD_BYTES", "2048")
    client = make_app().test_client()
    token = csrf_from(client.get("/upload").get_data(as_text=True))
    big = EXAMPLE_MANIFEST + "#" * 3000
    r = client.post("/upload", data={"csrf_token": token, "manifest_text": big, "action": "submit"})
    assert r.status_code == 413
    assert "limit is 2048 bytes" in r.get_data(as_text=True)
    # A multipart upload may also carry files (FARM_MAX_ASSET_BYTES each), so its manifest is measured by the
    # view against the manifest's own limit.
    r = client.post(
        "/upload",
        data={
            "csrf_token": token,
            "action": "submit",
            "manifest_file": (io.BytesIO(b"#" * 400_000), "big.yaml"),
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 413 and "limit is 2048 bytes" in r.get_data(as_text=True)
    assert _batches(settings) == 0


def test_submit_file_through_the_form(client, settings, broker):
    r = client.post(
        "/upload",
        data={
            "csrf_token": _csrf(client),
            "action": "submit",
            "manifest_file": (io.BytesIO(EXAMPLE_MANIFEST.encode()), "m.yaml"),
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 302
    batch_id = r.headers["Location"].rsplit("/", 1)[-1]
    with session_scope(settings.database_url) as s:
        assert s.get(Batch, batch_id).candidates_total == 12
    assert [m["headers"]["task"] for m in queued_messages(broker, "control")] == ["farm.dispatch_batch"]
    page = client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Submitted 4 items, 12 candidates." in page and "queued" in page


def _page_manifest(**moderation: str) -> str:
    return (
        "name: page-files\nmodel: tiny\ndefaults: {candidates: 2, steps: 1, size: 64x64}\n"
        f"items: [a red fox]\nmoderation: {json.dumps(moderation)}\n"
    )


def test_upload_page_refuses_every_path_outside_with_one_message_and_keeps_nothing(
    server_disk, make_app, broker
):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    token = _csrf(client)
    texts = [(_page_manifest(pdq_blocklist=v), FILE_REFUSED) for v in server_disk.refused_files()]
    texts += [
        (_page_manifest().replace("model: tiny", f"model: {json.dumps(v)}"), FOLDER_REFUSED)
        for v in server_disk.refused_models()
    ]
    for text, message in texts:
        for action in ("preview", "submit"):
            r = client.post(
                "/upload",
                data={
                    "csrf_token": token,
                    "action": action,
                    "manifest_text": text,
                    "files": [(io.BytesIO(b""), "")],
                },
                content_type="multipart/form-data",
            )
            html = r.get_data(as_text=True)
            assert r.status_code == 400, (text, html)
            assert html.count('class="field-error"') == 1 and escape(message) in html, text
    assert _batches(settings) == 0 and server_disk.uploads(settings) == []
    assert queued_messages(broker, "control") == []


def test_upload_page_submits_a_manifest_with_the_blocklist_file_it_names(server_disk, make_app, broker):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    assert 'name="files"' in client.get("/upload").get_data(as_text=True)
    listing = f"{PDQ_HASH}\tfrom the hash service\n".encode()
    r = client.post(
        "/upload",
        data={
            "csrf_token": _csrf(client),
            "action": "submit",
            "manifest_text": _page_manifest(pdq_blocklist="bad-images.txt"),
            "files": [(io.BytesIO(listing), "bad-images.txt")],
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 302, r.get_data(as_text=True)
    batch_id = r.headers["Location"].rsplit("/", 1)[-1]
    with session_scope(settings.database_url) as s:
        ref = s.get(Batch, batch_id).settings["moderation"]["pdq_blocklist"]
    assert ref.startswith("store:uploads/") and ref.endswith("/bad-images.txt")
    assert [p.read_bytes() for p in server_disk.uploads(settings)] == [listing]


def test_upload_page_preview_with_a_file_stores_nothing(server_disk, make_app):
    client = make_app().test_client()
    settings = client.application.config["FARM_SETTINGS"]
    r = client.post(
        "/upload",
        data={
            "csrf_token": _csrf(client),
            "action": "preview",
            "manifest_text": _page_manifest(pdq_blocklist="b.txt"),
            "files": [(io.BytesIO(PDQ_HASH.encode()), "b.txt")],
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 200 and 'id="preview"' in r.get_data(as_text=True)
    assert server_disk.uploads(settings) == [] and _batches(settings) == 0


def test_upload_page_refuses_a_hidden_or_pathed_file_name(server_disk, make_app):
    client = make_app().test_client()
    for name in (".bashrc", "../b.txt"):
        r = client.post(
            "/upload",
            data={
                "csrf_token": _csrf(client),
                "action": "submit",
                "manifest_text": _page_manifest(pdq_blocklist="b.txt"),
                "files": [(io.BytesIO(PDQ_HASH.encode()), name)],
            },
            content_type="multipart/form-data",
        )
        html = r.get_data(as_text=True)
        assert r.status_code == 400 and 'data-path="uploads"' in html and "not allowed" in html


def test_artifacts_dir_is_inside_farm_home(settings):
    assert os.fspath(settings.artifacts_dir).startswith(os.fspath(settings.home))


def test_pasted_manifest_larger_than_werkzeugs_form_default_is_accepted(client, settings):
    # Werkzeug keeps form fields under 500 kB by default; the manifest limit (1 MB here) must win.
    big = EXAMPLE_MANIFEST + ("# padding line\n" * 40_000)
    assert 500_000 < len(big) < settings.max_upload_bytes
    r = client.post(
        "/upload",
        data={"csrf_token": _csrf(client), "manifest_text": big, "action": "preview"},
        content_type="multipart/form-data",
    )
    assert r.status_code == 200 and 'id="preview"' in r.get_data(as_text=True)
