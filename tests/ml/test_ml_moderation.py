"""Moderation layers on real algorithms and shipped weights, and the combine() rule."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from ml_images import grey, noise, skin_ellipse
from PIL import Image

from farm.ml.moderation import (
    HashIndex,
    LayerVerdict,
    NudeNetLayer,
    OpenNsfwLayer,
    check_pdq_blocklist,
    check_prompt_terms,
    combine,
    find_near_duplicates,
    hamming,
    load_blocklist,
    pdq_hash,
)


@pytest.fixture(scope="module")
def nudenet() -> NudeNetLayer:
    return NudeNetLayer()


@pytest.fixture(scope="module")
def opennsfw() -> OpenNsfwLayer:
    return OpenNsfwLayer()


def jpeg_resized(im: Image.Image, size: int) -> Image.Image:
    buf = io.BytesIO()
    im.resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=60)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# ------------------------------------------------------------------------------------------ prompt terms


def test_prompt_term_rejects_whole_words_case_insensitively() -> None:
    v = check_prompt_terms("A photo of GORE on the wall", terms=["gore"], patterns=[])
    assert v.verdict == "reject" and v.layer == "prompt_terms" and v.details["terms"] == ["gore"]


def test_prompt_term_ignores_substrings() -> None:
    assert check_prompt_terms("a gorgeous class photo", terms=["gore", "ass"], patterns=[]).verdict == "pass"


def test_prompt_multiword_term_and_pattern() -> None:
    assert check_prompt_terms("blood   Bath art", terms=["blood bath"], patterns=[]).verdict == "reject"
    v = check_prompt_terms("a k1ll scene", terms=[], patterns=[r"k[i1]ll"])
    assert v.verdict == "reject" and v.details["patterns"] == [r"k[i1]ll"]
    with pytest.raises(ValueError, match="bad prompt pattern"):
        check_prompt_terms("x", terms=[], patterns=["("])


# ------------------------------------------------------------------------------------------ PDQ


def test_pdq_survives_jpeg_and_resize_but_separates_unrelated() -> None:
    original = noise(1, 256)
    h, quality = pdq_hash(original)
    assert len(h) == 64 and int(h, 16) >= 0 and 0 <= quality <= 100
    assert hamming(h, pdq_hash(jpeg_resized(original, 160))[0]) <= 31
    assert hamming(h, pdq_hash(noise(2, 256))[0]) > 80


def test_hamming() -> None:
    assert hamming("0" * 64, "f" * 64) == 256
    assert hamming("0" * 63 + "3", "0" * 64) == 2
    with pytest.raises(ValueError):
        hamming("00", "000")


def test_blocklist_match_and_miss(tmp_path: Path) -> None:
    blocked, _ = pdq_hash(noise(3, 256))
    path = tmp_path / "block.txt"
    path.write_text(f"# known bad images\n\n{blocked.upper()}  # from report 12\n{'0' * 64}\n")
    blocklist = load_blocklist(path)
    assert blocklist == [blocked, "0" * 64]
    hit = check_pdq_blocklist(pdq_hash(jpeg_resized(noise(3, 256), 200))[0], blocklist, max_distance=31)
    assert hit.verdict == "reject" and hit.details["nearest"] == blocked and hit.details["distance"] <= 31
    miss = check_pdq_blocklist(pdq_hash(noise(4, 256))[0], blocklist, max_distance=31)
    assert miss.verdict == "pass" and miss.details["distance"] > 31
    assert check_pdq_blocklist(blocked, [], max_distance=31).verdict == "pass"


def test_blocklist_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("# ok\n" + "a" * 64 + "\nnot-a-hash\n")
    with pytest.raises(ValueError, match=r"block\.txt:3: not a PDQ hash"):
        load_blocklist(path)


BLOCKLIST_MANIFEST = """
name: blocklisted
items: [a red fox]
moderation: {pdq_blocklist: block.txt}
"""


def test_blocklist_that_validates_also_loads_and_rejects_a_matching_image(tmp_path: Path) -> None:
    """The shapes hash lists are exported in (hash,label; hash<TAB>label; hash and spaces; comments) pass
    manifest validation, and the loader a worker runs reads the same file and rejects a matching image."""
    from farm.manifest import parse_manifest

    blocked, _ = pdq_hash(noise(3, 256))
    other, _ = pdq_hash(noise(5, 256))
    path = tmp_path / "block.txt"
    path.write_text(
        "# exported from the hash service\n"
        f"{'0' * 64},known-bad-image\n"
        f"{other.upper()}\treport 12\n"
        "\n"
        f"   {blocked}   seen twice, # not a comment\n"
        f"{'1' * 64}\n"
    )
    manifest = parse_manifest(BLOCKLIST_MANIFEST, base_dir=tmp_path)
    assert manifest.moderation.pdq_blocklist == str(path.resolve())
    blocklist = load_blocklist(manifest.moderation.pdq_blocklist)
    assert blocklist == ["0" * 64, other, blocked, "1" * 64]
    verdict = check_pdq_blocklist(pdq_hash(jpeg_resized(noise(3, 256), 200))[0], blocklist, max_distance=31)
    assert verdict.verdict == "reject" and verdict.details["nearest"] == blocked


@pytest.mark.parametrize(
    "line",
    [
        "a" * 64,
        "A" * 64 + ",label",
        "a" * 64 + "\tlabel",
        "a" * 64 + "  label with spaces",
        "a" * 64 + " # a comment",
        "  " + "a" * 64 + "  ",
        "# only a comment",
        "",
        "a" * 63,
        "a" * 65,
        "a" * 64 + ";label",
        "a" * 64 + "#label",
        "label," + "a" * 64,
        "g" * 64,
        "0x" + "a" * 62,
    ],
)
def test_validation_and_the_runtime_loader_agree_on_every_line(tmp_path: Path, line: str) -> None:
    from farm.manifest import ManifestError, parse_manifest

    path = tmp_path / "block.txt"
    path.write_text("a" * 64 + "\n" + line + "\n")
    try:
        parse_manifest(BLOCKLIST_MANIFEST, base_dir=tmp_path)
        validated = True
    except ManifestError as exc:
        assert "line 2" in str(exc)
        validated = False
    try:
        load_blocklist(path)
        loaded = True
    except ValueError as exc:
        assert "block.txt:2:" in str(exc)
        loaded = False
    assert validated == loaded


def test_blocklist_error_names_the_line_and_quotes_nothing_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("a" * 64 + "\nadmin:x:0:0:hunter2\n")
    with pytest.raises(ValueError) as info:
        load_blocklist(path)
    assert "block.txt:2:" in str(info.value)
    assert "admin" not in str(info.value) and "hunter2" not in str(info.value)


def test_near_duplicates() -> None:
    a = noise(10, 256)
    hashes = {
        "c1": pdq_hash(a)[0],
        "c2": pdq_hash(jpeg_resized(a, 180))[0],
        "c3": pdq_hash(noise(11, 256))[0],
    }
    near = find_near_duplicates(hashes, max_distance=31)
    assert near == {"c1": ["c2"], "c2": ["c1"]}
    assert find_near_duplicates(hashes, max_distance=256)["c3"] == ["c1", "c2"]


def random_hashes(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(n)]


def test_hash_index_distances_match_hamming_for_every_pair() -> None:
    hashes = random_hashes(60, 1)
    # Near neighbours too, so small distances are covered, not only the ~128 of unrelated hashes.
    hashes += [f"{int(h, 16) ^ (1 << (7 * k)) ^ (1 << 255):064x}" for k, h in enumerate(hashes[:20])]
    index = HashIndex((str(i), h) for i, h in enumerate(hashes))
    for probe in hashes[:25]:
        assert index.distances(probe).tolist() == [hamming(probe, h) for h in hashes]
        for limit in (0, 2, 120, 256):
            assert index.within(probe, limit) == [
                str(i) for i, h in enumerate(hashes) if hamming(probe, h) <= limit
            ]


def test_hash_index_update_replaces_a_keys_hash_and_keeps_order() -> None:
    a, b, c = random_hashes(3, 2)
    index = HashIndex([("x", a), ("y", b)])
    index.update([("z", c), ("x", c), ("z", b)])
    assert len(index) == 3 and index["x"] == c and index["z"] == b and "w" not in index
    assert index.within(c, 0) == ["x"]
    assert index.within(b, 0) == ["y", "z"]
    assert index.nearest(b) == (b, 0)
    assert HashIndex().nearest(a) is None and HashIndex().within(a, 256) == []


def test_hash_index_refuses_a_malformed_hash() -> None:
    with pytest.raises(ValueError, match="not a 256-bit PDQ hash"):
        HashIndex([("x", "ab" * 31)])


def test_blocklist_check_takes_an_index_or_a_list_alike() -> None:
    blocked = random_hashes(500, 3)
    probe = f"{int(blocked[321], 16) ^ 0b1011:064x}"
    as_list = check_pdq_blocklist(probe, blocked, max_distance=31)
    as_index = check_pdq_blocklist(probe, HashIndex((h, h) for h in blocked), max_distance=31)
    assert as_list == as_index
    assert as_list.verdict == "reject" and as_list.details["nearest"] == blocked[321]
    assert as_list.details["distance"] == 3 and as_list.details["entries"] == 500


# ------------------------------------------------------------------------------------------ NudeNet


def test_nudenet_rejects_skin_ellipse_passes_grey(nudenet: NudeNetLayer) -> None:
    # A flat light skin-tone ellipse on blue-grey: BUTTOCKS_EXPOSED about 0.55 (on white it is ~0.41, on dark
    # ~0.31), so it rejects at the default threshold 0.5 with the default labels.
    ellipse, plain = nudenet.check([skin_ellipse(), grey()])
    assert ellipse.verdict == "reject" and "BUTTOCKS_EXPOSED" in ellipse.reason
    det = ellipse.details["detections"][0]
    assert det["label"] == "BUTTOCKS_EXPOSED" and det["score"] >= 0.5 and len(det["box"]) == 4
    assert plain.verdict == "pass" and plain.details["detections"] == []


def test_nudenet_threshold_and_labels_are_configurable(nudenet: NudeNetLayer) -> None:
    score = nudenet.detect([skin_ellipse()])[0][0]["score"]
    assert nudenet.check([skin_ellipse()], threshold=score + 0.01)[0].verdict == "pass"
    assert nudenet.check([skin_ellipse()], threshold=score)[0].verdict == "reject"
    assert nudenet.threshold == 0.5  # a per-call threshold leaves the layer's default alone
    only_breasts = NudeNetLayer(labels=["FEMALE_BREAST_EXPOSED"])
    assert only_breasts.check([skin_ellipse()])[0].verdict == "pass"
    assert nudenet.check([]) == []


# ------------------------------------------------------------------------------------------ OpenNSFW


def test_opennsfw_returns_probabilities(opennsfw: OpenNsfwLayer) -> None:
    probs = opennsfw.probabilities([skin_ellipse(), grey(), noise(5)])
    assert len(probs) == 3
    for sfw, nsfw in probs:
        assert 0.0 <= sfw <= 1.0 and 0.0 <= nsfw <= 1.0 and abs(sfw + nsfw - 1.0) < 1e-4
    verdicts = opennsfw.check([grey()])
    assert verdicts[0].verdict == "pass" and set(verdicts[0].details) == {"sfw", "nsfw", "threshold"}


def test_opennsfw_decision_at_threshold(opennsfw: OpenNsfwLayer) -> None:
    assert opennsfw.threshold == 0.8
    assert opennsfw.decide(0.2, 0.8).verdict == "reject"
    assert opennsfw.decide(0.21, 0.79).verdict == "pass"
    assert opennsfw.decide(0.5, 0.5, threshold=0.5).verdict == "reject"
    sfw, nsfw = opennsfw.probabilities([skin_ellipse()])[0]
    assert opennsfw.check([skin_ellipse()], threshold=nsfw)[0].verdict == "reject"
    assert opennsfw.check([skin_ellipse()], threshold=min(1.0, nsfw + 1e-3))[0].verdict == "pass"
    assert OpenNsfwLayer(threshold=nsfw).check([skin_ellipse()])[0].verdict == "reject"


# ------------------------------------------------------------------------------------------ combine


def test_combine_rules() -> None:
    ok = LayerVerdict("a", "pass")
    flag = LayerVerdict("b", "flag", "near duplicate of c7")
    bad = LayerVerdict("c", "reject", "blocked term 'gore'")
    assert combine([]) == ("passed", [])
    assert combine([ok, ok]) == ("passed", [])
    assert combine([ok, flag]) == ("passed", ["b: near duplicate of c7"])
    assert combine([flag, ok, bad]) == ("rejected", ["c: blocked term 'gore'", "b: near duplicate of c7"])
    with pytest.raises(ValueError, match="unknown verdict"):
        combine([LayerVerdict("x", "maybe")])  # type: ignore[arg-type]
