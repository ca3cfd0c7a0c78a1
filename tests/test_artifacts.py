"""The artifact stores: a local folder, and an S3-compatible bucket on a real moto server on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from farm.artifacts import (
    ArtifactPathError,
    Handoff,
    LocalStore,
    S3Store,
    candidate_of,
    image_name,
    png_bytes,
    safe_name,
)

RECIPE = {"seed": 5, "prompt": "a red fox", "model_ref": "tiny"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server (a real HTTP S3 API, not an in-process mock) with an empty bucket."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT
        )
    endpoint = f"http://127.0.0.1:{port}"
    creds = {
        "AWS_ACCESS_KEY_ID": "farm",
        "AWS_SECRET_ACCESS_KEY": "farm-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="farm-test")
        yield {"endpoint": endpoint, "creds": creds}
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _image() -> Image.Image:
    return Image.new("RGB", (16, 16), (200, 30, 30))


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/x.png", "a/../../b.png", "", "a\x00b"])
def test_names_outside_the_store_are_refused(bad, tmp_path):
    with pytest.raises(ArtifactPathError):
        safe_name(bad)
    with pytest.raises(ArtifactPathError):
        LocalStore(tmp_path).read_bytes(bad)


def test_the_local_store_writes_the_png_with_its_recipe_and_a_sidecar(tmp_path):
    store = LocalStore(tmp_path)
    store.save_png("b1/c1.png", _image(), RECIPE)
    assert store.names("b1") == ["b1/c1.json", "b1/c1.png"]
    with Image.open(tmp_path / "b1" / "c1.png") as im:
        assert json.loads(im.text["farm:recipe"]) == RECIPE
    assert json.loads(store.read_bytes("b1/c1.json")) == RECIPE
    assert store.open_image("b1/c1.png").getpixel((0, 0)) == (200, 30, 30)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_start_pngs_writes_a_slice_in_the_background_and_reports_each_failure_on_its_own_future(tmp_path):
    store = LocalStore(tmp_path)
    futures = store.start_pngs(
        [
            ("b1/c1.png", _image(), RECIPE),
            ("../escape.png", _image(), RECIPE),
            ("b1/c2.png", _image(), RECIPE),
        ]
    )
    assert [type(f.exception(timeout=30)) for f in futures] == [type(None), ArtifactPathError, type(None)]
    assert store.names("b1") == ["b1/c1.json", "b1/c1.png", "b1/c2.json", "b1/c2.png"]
    assert not (tmp_path.parent / "escape.png").exists()


def test_a_handoff_returns_the_exact_pixels_once_written_and_nothing_after_it_is_deleted(tmp_path):
    import numpy as np

    pixels = np.random.default_rng(7).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    handoff = Handoff(tmp_path / "handoff")
    assert handoff.open("b1/c1.png") is None
    handoff.put("b1/c1.png", Image.fromarray(pixels))
    assert sorted(p.name for p in (tmp_path / "handoff").iterdir()) == [".tmp", "c1.npy"]
    image = handoff.open("b1/c1.png")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)
    handoff.drop(["c1"])
    assert handoff.open("b1/c1.png") is None
    assert sorted(p.name for p in (tmp_path / "handoff").iterdir()) == [".tmp"], "no folder left behind"
    handoff.drop(["c1"])  # twice is harmless (a redelivered task)
    # Only the file name counts, so whatever path is asked for, the file stays inside the folder.
    handoff.put("../../etc/outside.png", Image.fromarray(pixels))
    assert (tmp_path / "handoff" / "outside.npy").exists() and not (tmp_path / "etc").exists()


def test_listing_old_handoffs_skips_a_file_removed_while_the_folder_is_read(tmp_path, monkeypatch):
    # The sweep lists the folder while QC workers delete what they have stored: a file can go between the
    # folder read and its stat. The interleaving is forced by removing the file as its entry is handed out.
    handoff = Handoff(tmp_path / "handoff")
    for cid in ("c1", "c2", "c3"):
        handoff.put(f"b1/{cid}.png", Image.new("RGB", (8, 8)))
        os.utime(tmp_path / "handoff" / f"{cid}.npy", (time.time() - 600,) * 2)
    real_scandir = os.scandir

    class Racing:
        def __init__(self, path):
            self.inner = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def __iter__(self):
            for entry in self.inner:
                if entry.name == "c2.npy":
                    handoff.discard("c2.npy")
                yield entry

    monkeypatch.setattr("farm.artifacts.os.scandir", Racing)
    assert sorted(handoff.older_than(60)) == ["c1.npy", "c3.npy"]


def test_a_handoff_of_each_generation_has_a_file_of_its_own_and_a_drop_removes_every_generation(tmp_path):
    handoff = Handoff(tmp_path / "handoff")
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    handoff.put(image_name("b1", "c1"), red)
    handoff.put(image_name("b1", "c1", 3), blue)  # a later holder's, written while the first's is still there
    handoff.put(image_name("b1", "c2", 2), red)
    assert handoff.open(image_name("b1", "c1")).getpixel((0, 0)) == (255, 0, 0)
    assert handoff.open(image_name("b1", "c1", 3)).getpixel((0, 0)) == (0, 0, 255)
    handoff.drop(["c1"])
    assert sorted(handoff.older_than(-1)) == ["c2.g2.npy"]
    assert handoff.open(image_name("b1", "c1", 3)) is None


def test_image_names_differ_by_lease_generation_and_name_their_candidate():
    assert image_name("b", "b-00000-000") == image_name("b", "b-00000-000", 1) == "b/b-00000-000.png"
    names = {image_name("b", "b-00000-000", g) for g in (None, 1, 2, 3, 10)}
    assert names == {f"b/b-00000-000{s}.png" for s in ("", ".g2", ".g3", ".g10")}
    assert {candidate_of(n) for n in names} == {"b-00000-000"}
    assert candidate_of("b-00000-000.g3.npy") == "b-00000-000"


def test_the_s3_store_round_trips_images_recipes_and_listings(s3):
    store = S3Store("s3://farm-test/unit", endpoint_url=s3["endpoint"])
    store.save_png("b1/c1.png", _image(), RECIPE)
    assert store.names("b1") == ["b1/c1.json", "b1/c1.png"]
    assert store.read_bytes("b1/c1.png") == png_bytes(_image(), RECIPE)
    assert json.loads(store.read_bytes("b1/c1.json")) == RECIPE
    assert store.open_image("b1/c1.png").getpixel((0, 0)) == (200, 30, 30)
    with pytest.raises(FileNotFoundError):
        store.read_bytes("b1/missing.png")
    with pytest.raises(ArtifactPathError):
        store.read_bytes("../unit2/b1/c1.png")
    store.check_writable()
    assert store.names("") == ["b1/c1.json", "b1/c1.png"], "the doctor's probe leaves nothing behind"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_exists_says_whether_the_store_holds_one_name(kind, tmp_path, request):
    """What the rank checks for an item's closed images instead of listing the batch's store."""
    if kind == "s3":
        s3 = request.getfixturevalue("s3")
        store = S3Store("s3://farm-test/exists", endpoint_url=s3["endpoint"])
    else:
        store = LocalStore(tmp_path)
    store.save_png("b1/c1.png", _image(), RECIPE)
    assert store.exists("b1/c1.png") and store.exists("b1/c1.json")
    assert not store.exists("b1/c2.png") and not store.exists("b2/c1.png")
    store.delete("b1/c1.png")
    assert not store.exists("b1/c1.png")
    with pytest.raises(ArtifactPathError):
        store.exists("../b1/c1.png")


@pytest.mark.slow
def test_a_batch_through_real_workers_stores_every_image_in_the_bucket(s3, tmp_path):
    from tests.faults.conftest import FaultFarm, manifest

    farm = FaultFarm(
        tmp_path / "s3farm",
        {**s3["creds"], "FARM_ARTIFACT_STORE": "s3://farm-test/e2e", "FARM_S3_ENDPOINT_URL": s3["endpoint"]},
    )
    farm.start()
    try:
        batch_id = farm.submit(manifest("s3-batch", ["a red kite", "a blue kite"]))
        assert farm.wait(batch_id, timeout=300) == "done"
        rows = farm.candidates(batch_id)
        assert len(rows) == 8 and {c.status for c in rows} <= {"passed", "rejected", "failed"}
        store = S3Store("s3://farm-test/e2e", endpoint_url=s3["endpoint"])
        stored = set(store.names(batch_id))
        expected = {c.image_path for c in rows if c.image_path}
        assert expected and stored == expected | {p.replace(".png", ".json") for p in expected}
        assert not (farm.settings.artifacts_dir / batch_id).exists(), "nothing written to the local folder"
        sample = next(c for c in rows if c.image_path)
        with Image.open(__import__("io").BytesIO(store.read_bytes(sample.image_path))) as im:
            assert json.loads(im.text["farm:recipe"])["seed"] == sample.seed
    finally:
        farm.stack.stop()


def test_a_write_removes_temporary_files_left_by_a_writer_killed_mid_write(tmp_path):
    import subprocess

    from farm.artifacts import _HOST, TMP_DIR

    store = LocalStore(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / TMP_DIR
    folder.mkdir()
    orphan = folder / f".{_HOST}.{dead.pid}.abc123.tmp"
    live = folder / f".{_HOST}.{os.getpid()}.def456.tmp"
    other_host = folder / ".otherhost.1.xyz.tmp"
    for f in (orphan, live, other_host):
        f.write_bytes(b"half an image")
    store.save_png("b1/c1.png", _image(), RECIPE)
    assert not orphan.exists(), "a dead writer's temporary file is removed"
    assert live.exists() and other_host.exists(), "live writers and other hosts are left alone"


def test_read_recipe_is_the_one_reader_of_the_recipe_chunk_and_says_what_is_wrong(tmp_path: Path) -> None:
    """farm replay reads recipes through farm.artifacts.read_recipe: a PNG without one, a broken chunk and a
    missing file are each refused with a message naming the file, not a KeyError."""
    from farm.artifacts import RecipeError, read_recipe
    from farm.replay import ReplayError
    from farm.replay import read_recipe as replay_read_recipe

    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(Image.new("RGB", (8, 8)), RECIPE))
    assert read_recipe(good) == RECIPE
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    for path, words in ((plain, "no farm:recipe text chunk"), (tmp_path / "gone.png", "does not exist")):
        with pytest.raises(RecipeError, match=words):
            read_recipe(path)
        with pytest.raises(ReplayError, match=words):
            replay_read_recipe(path)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_files_uploaded_with_a_manifest_are_stored_read_back_through_the_store_and_removed_when_refused(
    kind, tmp_path, request
):
    """What lets a worker on another host read an uploaded blocklist: it lives in the artifact store (the
    shared folder or the bucket) and the batch records a store: name; a refused submission leaves none."""
    from farm.assets import AssetPolicy, read_asset
    from farm.manifest import parse_manifest

    if kind == "s3":
        store = S3Store("s3://farm-test/assets", endpoint_url=request.getfixturevalue("s3")["endpoint"])
    else:
        store = LocalStore(tmp_path / "artifacts")
    listing = b"ab" * 32 + b",known-bad\n"
    text = "name: up\nitems: [a cat]\nmoderation: {pdq_blocklist: block.txt}\n"
    kept = AssetPolicy.uploaded(asset_dirs=[], uploads={"block.txt": listing})
    ref = parse_manifest(text, assets=kept).moderation.pdq_blocklist
    with kept.stored(store) as keys:
        assert keys == [ref.removeprefix("store:")]
    assert read_asset(ref, store=store) == listing
    refused = AssetPolicy.uploaded(asset_dirs=[], uploads={"block.txt": listing})
    parse_manifest(text, assets=refused)
    with pytest.raises(RuntimeError), refused.stored(store):
        raise RuntimeError("the broker said no")
    with pytest.raises(FileNotFoundError):
        read_asset(refused.store_ref("block.txt"), store=store)
    if kind == "s3":
        assert store.names("uploads") == [ref.removeprefix("store:")]
    else:
        assert [p.name for p in (tmp_path / "artifacts" / "uploads").iterdir()] == [kept.folder]


#: A recipe as the generate stage writes one (farm/tasks/generate.py), with what other tools read from it.
A1111_RECIPE = {
    "model_ref": "tiny",
    "model_hash": "9464630561",
    "fingerprint": "0123456789abcdef",
    "scheduler_class": "EulerAncestralDiscreteScheduler",
    "scheduler_options": {"use_karras_sigmas": False, "timestep_spacing": "trailing"},
    "scheduler": "euler_a",
    "prompt": "a red fox in the snow, golden hour, 35mm",
    "negative_prompt": "blurry, lowres",
    "seed": 3141592653,
    "steps": 30,
    "guidance": 6.5,
    "width": 640,
    "height": 384,
}


def parsed_by_sd_parsers(data: bytes):
    """What sd-parsers (the package PNG-reading tools build on) reads from a PNG's bytes."""
    import io

    from sd_parsers import ParserManager

    info = ParserManager().parse(io.BytesIO(data))
    assert info is not None, "sd-parsers found no generation parameters"
    return info


def assert_reads_back(info, recipe: dict) -> None:
    """sd-parsers' view of the image says what the recipe says, in A1111's names."""
    from farm.infotext import sampler_name, schedule_type

    assert info.generator.value == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert [p.value for p in sampler.prompts] == [recipe["prompt"]]
    negatives = [p.value for p in sampler.negative_prompts]
    assert negatives == ([recipe["negative_prompt"]] if recipe.get("negative_prompt") else [])
    options = recipe.get("scheduler_options")
    assert sampler.name == sampler_name(recipe["scheduler_class"], options)
    assert sampler.parameters["scheduler"] == schedule_type(recipe["scheduler_class"], options)
    assert int(sampler.parameters["steps"]) == recipe["steps"]
    assert float(sampler.parameters["cfg_scale"]) == recipe["guidance"]
    assert int(sampler.parameters["seed"]) == recipe["seed"]
    assert info.metadata["Size"] == f"{recipe['width']}x{recipe['height']}"
    assert sampler.model.hash == recipe["model_hash"]
    assert sampler.model.name == recipe["model_ref"]


def test_sd_parsers_reads_prompt_negative_sampler_cfg_seed_size_and_model_hash_from_our_png(tmp_path):
    store = LocalStore(tmp_path)
    store.save_png("b1/c1.png", _image(), A1111_RECIPE)
    data = store.read_bytes("b1/c1.png")
    assert_reads_back(parsed_by_sd_parsers(data), A1111_RECIPE)
    # The farm's own recipe is untouched beside it: the whole JSON in farm:recipe and in the sidecar.
    with Image.open(tmp_path / "b1" / "c1.png") as im:
        assert json.loads(im.text["farm:recipe"]) == A1111_RECIPE
        assert im.text["parameters"].startswith("a red fox in the snow, golden hour, 35mm\nNegative prompt: ")
    assert json.loads(store.read_bytes("b1/c1.json")) == A1111_RECIPE


def test_a_prompt_latin1_cannot_hold_goes_into_utf8_text_and_reads_back(tmp_path):
    recipe = {**A1111_RECIPE, "prompt": "un renard roux 🦊 dans la neige, 夕暮れ", "negative_prompt": ""}
    data = png_bytes(_image(), recipe)
    assert b"iTXtparameters" in data
    assert_reads_back(parsed_by_sd_parsers(data), recipe)
