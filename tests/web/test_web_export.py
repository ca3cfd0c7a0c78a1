"""The winners zip: names from FARM_EXPORT_NAME, safe whatever the prompt, unique, sidecars beside images."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from farm.config import ConfigError
from farm.db import Item, session_scope


def _zip(client, batch_id: str, *, ui: bool = False) -> zipfile.ZipFile:
    url = f"/batches/{batch_id}/export.zip" if ui else f"/api/v1/batches/{batch_id}/export"
    r = client.get(url)
    assert r.status_code == 200, r.data[:300]
    return zipfile.ZipFile(io.BytesIO(r.data))


def _set_prompts(settings, batch_id: str, *prompts: str) -> None:
    with session_scope(settings.database_url) as s:
        items = s.scalars(select(Item).where(Item.batch_id == batch_id).order_by(Item.index)).all()
        for item, prompt in zip(items, prompts, strict=True):
            item.prompt = prompt


def test_the_default_names_are_batch_folder_item_prompt_and_seed(client, make_batch):
    made = make_batch("done", name="shots")
    b = made.batch_id
    for zf in (_zip(client, b), _zip(client, b, ui=True)):
        assert sorted(zf.namelist()) == sorted(
            [
                "batch.json",
                "manifest.yaml",
                f"{b}/0000-a red fox in the snow-1000.json",
                f"{b}/0000-a red fox in the snow-1000.png",
                f"{b}/0001-a lighthouse at dusk-1000.json",
                f"{b}/0001-a lighthouse at dusk-1000.png",
            ]
        )
        sidecar = json.loads(zf.read(f"{b}/0001-a lighthouse at dusk-1000.json"))
        assert sidecar["item"]["prompt"] == "a lighthouse at dusk"
        assert sidecar["candidate"]["id"] == made.candidate_ids[4]
        assert zf.read(f"{b}/0001-a lighthouse at dusk-1000.png").startswith(b"\x89PNG")


def test_a_template_from_farm_export_name_chooses_the_names(make_app, make_batch, monkeypatch):
    monkeypatch.setenv("FARM_EXPORT_NAME", "{batch_name}/{model}/r{rank:02d}-{prompt:9}-{candidate}.png")
    client = make_app().test_client()
    made = make_batch("done", name="spring: shoot")
    winners = [made.candidate_ids[0], made.candidate_ids[4]]
    assert sorted(n for n in _zip(client, made.batch_id).namelist() if n.endswith(".png")) == [
        f"spring_ shoot/tiny/r01-a lightho-{winners[1]}.png",
        f"spring_ shoot/tiny/r01-a red fox-{winners[0]}.png",
    ]


def test_hostile_prompts_give_safe_names_and_two_winners_of_one_name_get_a_suffix(
    make_app, make_batch, settings, monkeypatch, tmp_path
):
    monkeypatch.setenv("FARM_EXPORT_NAME", "{prompt:16}-{seed}")
    client = make_app().test_client()
    made = make_batch("done")
    hostile = "../../etc/CON\n<🦊>"  # both items: the same prompt and the same seed, so one name
    _set_prompts(settings, made.batch_id, hostile, hostile)
    zf = _zip(client, made.batch_id)
    assert sorted(zf.namelist()) == [
        "_.._etc_CON _🦊_-1000-2.json",
        "_.._etc_CON _🦊_-1000-2.png",
        "_.._etc_CON _🦊_-1000.json",
        "_.._etc_CON _🦊_-1000.png",
        "batch.json",
        "manifest.yaml",
    ]
    # Each sidecar follows its own image.
    first = json.loads(zf.read("_.._etc_CON _🦊_-1000.json"))
    second = json.loads(zf.read("_.._etc_CON _🦊_-1000-2.json"))
    assert [first["candidate"]["id"], second["candidate"]["id"]] == [
        made.candidate_ids[0],
        made.candidate_ids[4],
    ]
    out = tmp_path / "unpacked"
    zf.extractall(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(n).name for n in zf.namelist())


def test_a_winner_named_like_the_batch_record_does_not_replace_it(
    make_app, make_batch, settings, monkeypatch
):
    monkeypatch.setenv("FARM_EXPORT_NAME", "{prompt}")
    client = make_app().test_client()
    made = make_batch("done")
    _set_prompts(settings, made.batch_id, "batch", "Manifest")
    zf = _zip(client, made.batch_id)
    assert sorted(zf.namelist()) == [
        "Manifest.json",
        "Manifest.png",
        "batch-2.json",
        "batch-2.png",
        "batch.json",
        "manifest.yaml",
    ]
    assert json.loads(zf.read("batch.json"))["id"] == made.batch_id


def test_the_app_does_not_start_with_a_bad_export_name(make_app, monkeypatch):
    monkeypatch.setenv("FARM_EXPORT_NAME", "{batch}/{prompt:>40}")
    with pytest.raises(
        ConfigError, match=r"FARM_EXPORT_NAME='\{batch\}/\{prompt:>40\}' cannot be used: .*Fix"
    ):
        make_app()
