"""farm.manifest: a bad manifest fails with a ManifestError naming the place; good ones expand predictably."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import farm.manifest as manifest_module
from farm.assets import FILE_REFUSED, FOLDER_REFUSED, AssetPolicy, UploadRefused
from farm.manifest import (
    MAX_CANDIDATES,
    MAX_ITEMS,
    MODEL_PRESETS,
    SCHEDULERS,
    FieldError,
    ItemPlan,
    Manifest,
    ManifestError,
    ScoringWeights,
    expand,
    json_schema,
    parse_manifest,
    plan_manifest,
    stored_manifest,
    summary,
)

BATCHES = Path(__file__).resolve().parent.parent / "batches"
PDQ_HASH = "f" * 64


def doc(**fields: Any) -> str:
    """A minimal valid manifest with ``fields`` replacing or adding top-level keys (None removes one)."""
    base: dict[str, Any] = {"name": "t", "model": "tiny", "items": ["a red fox"]}
    base.update(fields)
    return yaml.safe_dump({k: v for k, v in base.items() if v is not None}, sort_keys=False)


def errors_of(text: str | bytes, **kwargs: Any) -> dict[str, str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, **kwargs)
    return {e.path: e.message for e in info.value.errors}


def pipeline_folder(root: Path, name: str = "pipe") -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


# --- good input


def test_minimal_manifest_parses_with_documented_defaults() -> None:
    m = parse_manifest(doc())
    assert isinstance(m, Manifest)
    assert (m.name, m.model, m.version, m.dtype, m.priority) == ("t", "tiny", 1, "fp32", 5)
    assert m.defaults.candidates == 4 and m.defaults.scheduler is None
    assert m.moderation.nsfw_detector.threshold == 0.5 and m.moderation.nsfw_classifier.threshold == 0.8


@pytest.mark.parametrize("path", sorted(BATCHES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_batches_parse_and_expand(path: Path) -> None:
    planned = plan_manifest(path.read_bytes(), base_dir=path.parent)  # base_dir: its wildcards/ folder
    m = planned.manifest
    assert m.model == "tiny"
    plans = planned.items
    assert plans and all(p.width <= 128 and p.height <= 128 for p in plans)


def test_batches_folder_has_the_three_examples() -> None:
    assert {"example.yaml", "templates.yaml", "quality.yaml"} <= {p.name for p in BATCHES.glob("*.yaml")}


def test_example_batch_is_small_enough_for_a_laptop_cpu() -> None:
    planned = plan_manifest((BATCHES / "example.yaml").read_bytes())
    s = summary(planned.manifest, planned.items)
    assert s["name"] == "example" and 6 <= s["items"] <= 8
    assert s["candidates"] <= 40 and s["denoising_steps"] <= 100


def test_quality_batch_shows_selection_and_moderation() -> None:
    m = parse_manifest((BATCHES / "quality.yaml").read_bytes())
    assert m.selection.winners == 2 and m.selection.min_accepted > 0
    assert m.moderation.blocked_terms and m.moderation.blocked_patterns
    assert m.validation.min_alignment is not None
    assert any(p.required_attributes for p in expand(m))


def test_bytes_with_utf8_bom_parse() -> None:
    assert parse_manifest("\ufeff".encode() + doc().encode()).name == "t"


def test_anchors_and_merge_keys_work(yaml_loader: str) -> None:
    text = """
name: t
items:
  - &big {prompt: a, size: 64x96, candidates: 2}
  - {<<: *big, prompt: b}
"""
    plans = expand(parse_manifest(text))
    got = [(p.prompt, p.width, p.height, p.candidates) for p in plans]
    assert got == [("a", 64, 96, 2), ("b", 64, 96, 2)]


def test_dates_stay_strings_in_tags(yaml_loader: str) -> None:
    assert parse_manifest(doc(tags=["demo"]).replace("- demo", "- 2024-05-01")).tags == ["2024-05-01"]


def test_numbers_in_template_vars_become_text() -> None:
    text = 'name: t\nitems:\n  - {template: "{n} apples", vars: {n: [1, 2.5]}}\n'
    assert [p.prompt for p in expand(parse_manifest(text))] == ["1 apples", "2.5 apples"]


# --- syntax, bytes


@pytest.fixture(params=[loader.__name__ for loader in manifest_module._LOADERS])
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a YAML guard test over each loader: libyaml events when present, and the pure-Python fallback."""
    chosen = [loader for loader in manifest_module._LOADERS if loader.__name__ == request.param]
    monkeypatch.setattr(manifest_module, "_LOADERS", chosen)
    return request.param


def test_invalid_yaml_reports_line_and_column(yaml_loader: str) -> None:
    errs = errors_of("name: t\nitems: [a\n  b: c\n")
    assert list(errs) == ["(root)"]
    assert "invalid YAML at line" in errs["(root)"] and "column" in errs["(root)"]


def test_duplicate_keys_are_an_error_with_position(yaml_loader: str) -> None:
    errs = errors_of("name: t\nitems: [a]\nname: u\n")
    assert "duplicate key 'name'" in errs["(root)"] and "line 3" in errs["(root)"]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text", "42", "[]"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert "expected a mapping" in errors_of(text)["(root)"]


@pytest.mark.parametrize("text", ["", "   \n# only a comment\n", "~"])
def test_empty_document_is_an_error(text: str) -> None:
    assert "empty" in errors_of(text)["(root)"]


def test_non_utf8_bytes_are_rejected_with_offset() -> None:
    errs = errors_of(b"name: caf\xe9\nitems: [a]\n")
    assert "not valid UTF-8" in errs["(root)"] and "offset 9" in errs["(root)"]


def test_control_characters_are_a_yaml_error(yaml_loader: str) -> None:
    assert "invalid YAML" in errors_of("name: t\x07\nitems: [a]\n")["(root)"]


def test_lone_surrogate_in_text_is_rejected() -> None:
    assert "(root)" in errors_of("name: a\ud800b\nitems: [a]\n")


@pytest.mark.parametrize("data", [b"x" * 2_000, "x" * 2_000], ids=["bytes", "str"])
def test_oversize_input_is_rejected_before_parsing(data: str | bytes) -> None:
    errs = errors_of(data, max_bytes=1_000)
    assert "limit is 1000 bytes" in errs["(root)"]


def test_oversize_counts_utf8_bytes_not_characters() -> None:
    text = "name: t\nitems: [" + "é" * 600 + "]\n"
    assert len(text) < 1_000 < len(text.encode())
    assert "limit" in errors_of(text, max_bytes=1_000)["(root)"]


def test_alias_bomb_is_refused_fast(yaml_loader: str) -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = "\n".join(lines) + "\nname: t\nitems: *i\n"
    start = time.perf_counter()
    errs = errors_of(bomb)
    assert time.perf_counter() - start < 2.0
    assert "alias" in errs["(root)"]


def test_recursive_alias_is_refused(yaml_loader: str) -> None:
    assert "contains it" in errors_of("name: t\nitems: &x [a, *x]\n")["(root)"]


def test_deep_nesting_is_refused_without_recursion_error(yaml_loader: str) -> None:
    text = "name: t\nitems: " + "[" * 5_000 + "]" * 5_000 + "\n"
    # The farm's own limit, or libyaml's (PyYAML >= 6.0.3's C loader stops at 1,000 flow levels first).
    message = errors_of(text)["(root)"]
    assert "nesting deeper" in message or "exceeded maximum nesting depth" in message, message


def test_bad_explicit_tag_value_is_a_yaml_error(yaml_loader: str) -> None:
    errs = errors_of("name: t\nitems: [a]\npriority: !!int nine\n")
    assert "line 3" in errs["(root)"]


def test_huge_integer_literal_is_a_yaml_error(yaml_loader: str) -> None:
    assert "(root)" in errors_of("name: t\nitems: [a]\npriority: " + "9" * 5_000 + "\n")


# --- types and keys


def test_wrong_type_says_what_was_expected_and_got() -> None:
    errs = errors_of(doc(defaults={"candidates": "four"}))
    assert errs["defaults.candidates"] == "expected an integer, got 'four'"


def test_float_for_integer_is_rejected() -> None:
    assert "expected an integer, got 2.5" in errors_of(doc(defaults={"steps": 2.5}))["defaults.steps"]


def test_unquoted_yes_in_a_string_list_gets_a_quoting_hint() -> None:
    errs = errors_of("name: t\nitems: [a]\ntags: [yes]\n")
    assert "expected a string, got true" in errs["tags[0]"] and "quotes" in errs["tags[0]"]


def test_unknown_key_suggests_the_close_match() -> None:
    errs = errors_of(doc(defaults={"stpes": 2}))
    assert errs["defaults.stpes"] == "unknown field 'stpes'; did you mean 'steps'?"


def test_section_field_at_top_level_points_to_its_section() -> None:
    assert "under 'defaults'" in errors_of(doc(candidates=2))["candidates"]


def test_unknown_key_without_close_match_lists_valid_fields() -> None:
    assert "expected one of" in errors_of(doc(selection={"zzz": 1}))["selection.zzz"]


def test_every_problem_is_reported_at_once() -> None:
    errs = errors_of(doc(priority=12, dtype="fp64", defaults={"guidance": 99}))
    assert {"priority", "dtype", "defaults.guidance"} <= set(errs)
    assert errs["priority"] == "must be between 0 and 9, got 12"
    assert errs["dtype"] == "must be 'fp16', 'bf16' or 'fp32', got 'fp64'"


def test_missing_required_fields_are_named() -> None:
    errs = errors_of(yaml.safe_dump({"model": "tiny"}))
    assert errs["name"] == "this field is required" and errs["items"] == "this field is required"


def test_only_version_1_is_accepted() -> None:
    assert "must be 1" in errors_of(doc(version=2))["version"]


def test_str_of_error_lists_path_colon_message_lines() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc(items=["a", "b", "c", {"prompt": "d", "size": "64x65"}]))
    text = str(info.value)
    assert text.startswith("items[3].size: must be WxH with both sides multiples of 8")
    assert "e.g. 512x512" in text
    assert isinstance(info.value, ValueError)
    assert info.value.errors[0] == FieldError("items[3].size", info.value.errors[0].message)


def test_manifest_error_survives_pickling() -> None:
    err = ManifestError([FieldError("items[0].size", "bad"), FieldError("(root)", "worse")])
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == err.errors and str(again) == str(err)


# --- names, paths


@pytest.mark.parametrize("name", ["../etc", "a/b", "a\\b", "a\x00b", "", ".hidden", "..", "x" * 81, "sp ace"])
def test_batch_name_must_be_safe_for_file_names(name: str) -> None:
    errs = errors_of(doc(name=name))
    assert "name" in errs


@pytest.mark.parametrize("name", ["a", "my-batch_2.v1", "A" * 80])
def test_batch_name_accepts_safe_names(name: str) -> None:
    assert parse_manifest(doc(name=name)).name == name


# --- counts, limits


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("candidates", 0),
        ("candidates", -3),
        ("candidates", 65),
        ("steps", 0),
        ("steps", 10**9),
        ("seed", -1),
        ("seed", 2**32),
        ("guidance", -0.5),
    ],
)
def test_out_of_range_defaults_name_the_valid_range(field: str, value: int) -> None:
    message = errors_of(doc(defaults={field: value}))[f"defaults.{field}"]
    assert message.startswith("must be between") and str(value) in message


def test_out_of_range_item_override_names_the_item() -> None:
    errs = errors_of(doc(items=["a", {"prompt": "b", "candidates": 100}]))
    assert errs["items[1].candidates"] == "must be between 1 and 64, got 100"


def test_empty_items_list_is_an_error() -> None:
    assert "at least one item" in errors_of(doc(items=[]))["items"]


def test_too_many_total_candidates_is_an_error() -> None:
    a, b = [str(i) for i in range(100)], [str(i) for i in range(50)]
    items = [{"template": "{a} {b}", "vars": {"a": a, "b": b}}]
    errs = errors_of(doc(items=items, defaults={"candidates": 64}))
    assert f"the limit is {MAX_CANDIDATES}" in errs["items"]


def test_template_product_over_item_limit_is_refused_without_expanding() -> None:
    values = [str(i) for i in range(1000)]
    items = [{"template": "{a}{b}{c}{d}", "vars": {"a": values, "b": values, "c": values, "d": values}}]
    start = time.perf_counter()
    errs = errors_of(doc(items=items))
    assert time.perf_counter() - start < 2.0
    assert f"more than {MAX_ITEMS} items" in errs["items"]


def test_total_items_limit_counts_plain_items_and_templates_together() -> None:
    items = ["p"] * (MAX_ITEMS - 1) + [{"template": "{x}", "vars": {"x": ["a", "b"]}}]
    assert "items" in errors_of(doc(items=items, defaults={"candidates": 1}))


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ("64x90", "90 is not a multiple of 8"),
        ("4096x64", "out of range"),
        ("0x64", "out of range"),
        ("64", "got '64'"),
        ("64 by 64", "got '64 by 64'"),
        ("-8x8", "got"),
        ("", "got"),
    ],
)
def test_bad_sizes_say_what_is_valid(size: str, fragment: str) -> None:
    message = errors_of(doc(defaults={"size": size}))["defaults.size"]
    assert "multiples of 8" in message and fragment in message


def test_size_given_as_list_is_a_type_error() -> None:
    assert "expected a string" in errors_of(doc(defaults={"size": [64, 64]}))["defaults.size"]


def test_winners_cannot_exceed_an_items_candidates() -> None:
    errs = errors_of(doc(items=["a", {"prompt": "b", "candidates": 1}], selection={"winners": 2}))
    assert "items[1]" in errs["selection.winners"]


def test_min_accepted_cannot_exceed_candidates() -> None:
    errs = errors_of(doc(defaults={"candidates": 2}, selection={"min_accepted": 3}))
    assert "selection.min_accepted" in errs


def test_scoring_weights_cannot_both_be_zero() -> None:
    errs = errors_of(doc(scoring={"weights": {"preference": 0, "alignment": 0}}))
    assert "both be 0" in errs["scoring.weights"]


def test_negative_scoring_weight_is_rejected() -> None:
    assert "scoring.weights.alignment" in errors_of(doc(scoring={"weights": {"alignment": -1}}))


def test_unknown_scheduler_suggests_and_lists() -> None:
    message = errors_of(doc(defaults={"scheduler": "eular"}))["defaults.scheduler"]
    assert "did you mean 'euler'" in message and "dpmpp_2m" in message


def test_every_listed_scheduler_is_accepted() -> None:
    for name in SCHEDULERS:
        assert parse_manifest(doc(defaults={"scheduler": name})).defaults.scheduler == name


def test_non_finite_guidance_is_rejected() -> None:
    assert "defaults.guidance" in errors_of("name: t\nitems: [a]\ndefaults: {guidance: .nan}\n")


def test_blank_prompt_is_rejected() -> None:
    assert errors_of(doc(items=["   "]))["items[0]"] == "must not be blank"


def test_item_of_wrong_kind_explains_the_item_shapes() -> None:
    assert "'prompt' or 'template'" in errors_of(doc(items=[5]))["items[0]"]


def test_item_with_both_prompt_and_template_is_rejected() -> None:
    errs = errors_of(doc(items=[{"prompt": "a", "template": "{x}", "vars": {"x": ["b"]}}]))
    assert "not both" in errs["items[0]"]


def test_mapping_item_without_prompt_says_so() -> None:
    assert "needs a 'prompt'" in errors_of(doc(items=[{"candidates": 2}]))["items[0].prompt"]


# --- templates


def test_template_variable_missing_from_vars_is_named() -> None:
    errs = errors_of(doc(items=[{"template": "a {animal} in {color}", "vars": {"animal": ["cat"]}}]))
    assert "{color}" in errs["items[0].template"]


def test_unused_template_variable_is_named() -> None:
    item = {"template": "a {animal}", "vars": {"animal": ["cat"], "style": ["ink"]}}
    errs = errors_of(doc(items=["x", item]))
    assert "'style'" in errs["items[1].template"]


@pytest.mark.parametrize(
    "template", ["a {}", "a {0}", "a {x:>10}", "a {x!r}", "a {x.y}", "a {x[0]}", "a {x", "a }"]
)
def test_positional_formatted_or_malformed_placeholders_are_rejected(template: str) -> None:
    assert "items[0].template" in errors_of(doc(items=[{"template": template, "vars": {"x": ["b"]}}]))


def test_template_var_names_must_be_identifiers() -> None:
    errs = errors_of(doc(items=[{"template": "{a-b}", "vars": {"a-b": ["x"]}}]))
    assert "identifiers" in errs["items[0].vars.a-b"]


def test_empty_var_value_list_is_rejected() -> None:
    assert "items[0].vars.x" in errors_of(doc(items=[{"template": "{x}", "vars": {"x": []}}]))


def test_duplicate_var_value_is_rejected() -> None:
    errs = errors_of(doc(items=[{"template": "{x}", "vars": {"x": ["a", "b", "a"]}}]))
    assert "duplicate" in errs["items[0].vars.x[2]"]


# --- regexes


def test_bad_blocked_pattern_is_reported_at_its_index() -> None:
    errs = errors_of(doc(moderation={"blocked_patterns": ["ok", "(unclosed"]}))
    assert "not a valid regular expression" in errs["moderation.blocked_patterns[1]"]
    assert "moderation.blocked_patterns[0]" not in errs


def test_blank_blocked_term_is_rejected() -> None:
    assert "moderation.blocked_terms[0]" in errors_of(doc(moderation={"blocked_terms": [" "]}))


# --- model


@pytest.mark.parametrize("model", MODEL_PRESETS)
def test_model_presets_are_accepted(model: str) -> None:
    assert parse_manifest(doc(model=model)).model == model


def test_hub_id_is_accepted() -> None:
    assert parse_manifest(doc(model="stabilityai/sd-turbo")).model == "stabilityai/sd-turbo"


def test_unknown_model_string_lists_presets() -> None:
    message = errors_of(doc(model="tinny"))["model"]
    assert "unknown model 'tinny'" in message and "did you mean 'tiny'" in message
    assert all(p in message for p in MODEL_PRESETS)


def test_local_pipeline_folder_resolves_against_base_dir(tmp_path: Path) -> None:
    folder = pipeline_folder(tmp_path)
    assert parse_manifest(doc(model="pipe"), base_dir=tmp_path).model == str(folder.resolve())
    assert parse_manifest(doc(model=str(folder))).model == str(folder.resolve())


def test_folder_without_model_index_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    errs = errors_of(doc(model="weights"), base_dir=tmp_path)
    assert errs["model"] == "folder weights is not a diffusers pipeline: it has no model_index.json"


def test_missing_local_folder_is_reported(tmp_path: Path) -> None:
    assert "does not exist" in errors_of(doc(model="./nowhere"), base_dir=tmp_path)["model"]


def test_model_with_nul_is_rejected() -> None:
    assert "model" in errors_of(doc(model="ti\x00ny"))


def test_check_model_hook_gets_the_resolved_ref_and_its_message_is_reported() -> None:
    seen: list[str] = []

    def check(ref: str) -> str | None:
        seen.append(ref)
        return "not on this farm"

    assert errors_of(doc(model="tiny-xl"), check_model=check)["model"] == "not on this farm"
    assert seen == ["tiny-xl"]


def test_check_model_hook_returning_none_accepts() -> None:
    assert parse_manifest(doc(), check_model=lambda ref: None).model == "tiny"


def test_check_model_hook_that_raises_becomes_a_manifest_error() -> None:
    def broken(ref: str) -> str | None:
        raise RuntimeError("boom")

    assert "boom" in errors_of(doc(), check_model=broken)["model"]


# --- pdq blocklist


def test_pdq_blocklist_resolves_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "hashes.txt").write_text(f"# blocked\n{PDQ_HASH},100\n\n{'0' * 64}\n")
    m = parse_manifest(doc(moderation={"pdq_blocklist": "hashes.txt"}), base_dir=tmp_path)
    assert m.moderation.pdq_blocklist == str((tmp_path / "hashes.txt").resolve())


def test_pdq_blocklist_may_not_climb_out_of_base_dir(tmp_path: Path) -> None:
    (tmp_path / "hashes.txt").write_text(PDQ_HASH + "\n")
    inner = tmp_path / "batches"
    inner.mkdir()
    errs = errors_of(doc(moderation={"pdq_blocklist": "../hashes.txt"}), base_dir=inner)
    assert "outside" in errs["moderation.pdq_blocklist"]


def test_pdq_blocklist_with_nul_is_rejected(tmp_path: Path) -> None:
    errs = errors_of(doc(moderation={"pdq_blocklist": "a\x00b"}), base_dir=tmp_path)
    assert "NUL" in errs["moderation.pdq_blocklist"]


def test_missing_pdq_blocklist_is_reported(tmp_path: Path) -> None:
    errs = errors_of(doc(moderation={"pdq_blocklist": "nope.txt"}), base_dir=tmp_path)
    assert "does not exist" in errs["moderation.pdq_blocklist"]


def test_malformed_pdq_line_is_reported_by_number(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_text(f"{PDQ_HASH}\nnot-a-hash\n")
    errs = errors_of(doc(moderation={"pdq_blocklist": "h.txt"}), base_dir=tmp_path)
    assert "line 2" in errs["moderation.pdq_blocklist"]


# --- which files a manifest may name (farm.assets)


def web_policy(*dirs: Path, **uploads: bytes) -> AssetPolicy:
    files = {k.replace("_", "."): v for k, v in uploads.items()}
    return AssetPolicy.uploaded(asset_dirs=list(dirs), uploads=files)


@pytest.fixture
def disk(tmp_path: Path) -> dict[str, Path]:
    """A server's disk as an uploader would probe it: an asset folder, and beside it a valid blocklist, a
    pipeline folder, a plain folder and a link inside the asset folder that points out of it."""
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "ok.txt").write_text(PDQ_HASH + "\n")
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "hashes.txt").write_text(PDQ_HASH + "\n")
    (outside / "empty").mkdir()
    pipe = pipeline_folder(outside)
    (assets / "link-out.txt").symlink_to(outside / "hashes.txt")
    (assets / "pipe-out").symlink_to(pipe)
    return {"assets": assets, "outside": outside, "pipe": pipe}


def _outside_files(disk: dict[str, Path]) -> list[str]:
    outside = disk["outside"]
    return [
        "/etc/passwd",
        "/etc",
        str(outside / "hashes.txt"),  # a valid blocklist, outside every allowed folder
        str(outside / "missing.txt"),
        str(outside / "empty"),
        "../private/hashes.txt",
        "assets/../../private/hashes.txt",
        "../../../../../../etc/passwd",
        "link-out.txt",  # a link in the asset folder to a file outside it
        str(disk["assets"] / "link-out.txt"),
        "~root/.bashrc",
        "~/.bashrc",
        "hashes.txt",  # a plain name that was not uploaded
        "ok.txt/../../private/hashes.txt",
    ]


def test_uploaded_manifest_gets_one_message_for_every_file_outside_its_uploads_and_asset_dirs(
    disk: dict[str, Path],
) -> None:
    seen = set()
    for value in _outside_files(disk):
        text = doc(moderation={"pdq_blocklist": value})
        errs = errors_of(text, base_dir=disk["outside"], assets=web_policy(disk["assets"]))
        seen.add(errs["moderation.pdq_blocklist"])
    assert seen == {FILE_REFUSED}


def test_uploaded_manifest_gets_one_message_for_every_model_path_outside_the_asset_dirs(
    disk: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(disk["outside"])
    values = [
        str(disk["pipe"]),  # a valid pipeline folder, outside every allowed folder
        str(disk["outside"] / "empty"),
        str(disk["outside"] / "hashes.txt"),
        str(disk["outside"] / "nowhere"),
        "./pipe",
        "../private/pipe",
        "~root",
        "~/models",
        "/etc",
        "a/b/c",
    ]
    for field in ("model", "validation", "scoring"):
        seen = set()
        for value in values:
            fields: dict[str, Any] = {"model": value} if field == "model" else {field: {"model": value}}
            errs = errors_of(doc(**fields), base_dir=disk["outside"], assets=web_policy(disk["assets"]))
            seen.add(errs["model" if field == "model" else f"{field}.model"])
        assert seen == {FOLDER_REFUSED}, field
    errs = errors_of(doc(scoring={"model": f"clip-score:{disk['pipe']}"}), assets=web_policy(disk["assets"]))
    assert errs["scoring.model"] == FOLDER_REFUSED
    # A plain name is not looked for outside the asset folders: a link there to a pipeline outside reads as a
    # name that names nothing.
    policy = web_policy(disk["assets"])
    linked = errors_of(doc(model="pipe-out"), assets=policy)
    unknown = errors_of(doc(model="zzz"), assets=policy)
    assert linked["model"] == unknown["model"].replace("'zzz'", "'pipe-out'")


def test_uploaded_manifest_hub_id_is_not_looked_up_on_the_servers_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "owner" / "name").mkdir(parents=True)  # a folder of a hub id's spelling, no model_index.json
    monkeypatch.chdir(tmp_path)
    assert "model_index.json" in errors_of(doc(model="owner/name"))["model"]
    calls: list[str] = []
    m = parse_manifest(
        doc(model="owner/name"), assets=web_policy(), check_model=lambda ref: calls.append(ref) or None
    )
    assert m.model == "owner/name" and calls == []


def test_file_inside_an_asset_dir_is_accepted_by_name_path_or_link(disk: dict[str, Path]) -> None:
    assets = disk["assets"]
    (assets / "lists").mkdir()
    (assets / "lists" / "more.txt").write_text(f"{PDQ_HASH},label\n")
    (assets / "link-in.txt").symlink_to(assets / "lists" / "more.txt")
    for value, found in [
        ("ok.txt", assets / "ok.txt"),
        (str(assets / "ok.txt"), assets / "ok.txt"),
        ("lists/more.txt", assets / "lists" / "more.txt"),
        ("lists/../ok.txt", assets / "ok.txt"),
        ("link-in.txt", assets / "lists" / "more.txt"),
    ]:
        text = doc(moderation={"pdq_blocklist": value})
        m = parse_manifest(text, assets=web_policy(disk["outside"], assets))
        assert m.moderation.pdq_blocklist == str(found.resolve()), value


def test_file_inside_an_asset_dir_is_still_checked_line_by_line(disk: dict[str, Path]) -> None:
    (disk["assets"] / "bad.txt").write_text(f"{PDQ_HASH}\nnot a hash\n")
    errs = errors_of(doc(moderation={"pdq_blocklist": "bad.txt"}), assets=web_policy(disk["assets"]))
    message = errs["moderation.pdq_blocklist"]
    assert "line 2" in message and "not a hash" not in message


def test_model_folder_inside_an_asset_dir_is_accepted(disk: dict[str, Path]) -> None:
    pipe = pipeline_folder(disk["assets"], "sd")
    (disk["assets"] / "clip").mkdir()
    (disk["assets"] / "clip" / "config.json").write_text("{}")
    policy = web_policy(disk["assets"])
    m = parse_manifest(doc(model="sd", validation={"model": "clip"}, scoring={"model": "clip-score:clip"}),
                       assets=policy)
    assert m.model == str(pipe.resolve())
    assert m.validation.model == str((disk["assets"] / "clip").resolve())
    assert m.scoring.model == f"clip-score:{(disk['assets'] / 'clip').resolve()}"
    assert parse_manifest(doc(model=str(pipe)), assets=policy).model == str(pipe.resolve())
    errs = errors_of(doc(model="clip"), assets=policy)
    assert "model_index.json" in errs["model"]  # inside an asset folder, what is wrong may be said


def test_uploaded_manifest_may_name_presets_and_hub_ids(disk: dict[str, Path]) -> None:
    m = parse_manifest(
        doc(model="stabilityai/sd-turbo", validation={"model": "openai/clip-vit-base-patch32"},
            scoring={"model": "clip-score"}),
        assets=web_policy(),
    )
    assert (m.model, m.validation.model, m.scoring.model) == (
        "stabilityai/sd-turbo", "openai/clip-vit-base-patch32", "clip-score"
    )


def test_file_uploaded_with_the_manifest_is_named_by_its_file_name(tmp_path: Path) -> None:
    policy = web_policy(block_txt=f"{PDQ_HASH}\tlabel\n".encode())
    m = parse_manifest(doc(moderation={"pdq_blocklist": "block.txt"}), assets=policy)
    assert m.moderation.pdq_blocklist == f"store:uploads/{policy.folder}/block.txt"
    assert policy.named == {"block.txt"}
    bad = web_policy(block_txt=b"# list\n\nnot-a-hash\n")
    errs = errors_of(doc(moderation={"pdq_blocklist": "block.txt"}), assets=bad)
    assert "line 3" in errs["moderation.pdq_blocklist"]


def test_an_uploaded_file_the_manifest_does_not_name_is_refused() -> None:
    errs = errors_of(doc(), assets=web_policy(spare_txt=b"x"))
    assert "'spare.txt' was uploaded but the manifest names no such file" in errs["uploads"]


@pytest.mark.parametrize("name", ["../evil.txt", "a/b.txt", ".hidden", "", "a\\b.txt", "x" * 200, "é.txt"])
def test_uploaded_file_names_must_be_plain_names(name: str) -> None:
    with pytest.raises(UploadRefused, match="not allowed"):
        AssetPolicy.uploaded(asset_dirs=[], uploads={name: b""})


def test_operator_manifest_still_names_any_path(disk: dict[str, Path]) -> None:
    """The CLI's manifests are the operator's: absolute paths outside every folder are theirs to name."""
    hashes, pipe = disk["outside"] / "hashes.txt", disk["pipe"]
    for policy in (None, AssetPolicy.operator()):
        m = parse_manifest(
            doc(model=str(pipe), moderation={"pdq_blocklist": str(hashes)},
                validation={"model": "/abs/clip"}),
            base_dir=disk["assets"], assets=policy,
        )
        assert m.model == str(pipe.resolve()) and m.moderation.pdq_blocklist == str(hashes.resolve())
        assert m.validation.model == "/abs/clip"


def test_operator_relative_validator_and_scorer_folders_are_recorded_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers look up no relative owner/name in their working folder, so the operator's relative folders
    are resolved here: against the manifest's folder, else the current one."""
    batches, cwd = tmp_path / "batches", tmp_path / "cwd"
    (batches / "models" / "clip").mkdir(parents=True)
    (cwd / "models" / "aesthetic").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    m = parse_manifest(
        doc(validation={"model": "models/clip"}, scoring={"model": "models/aesthetic"}), base_dir=batches
    )
    assert m.validation.model == str((batches / "models" / "clip").resolve())
    assert m.scoring.model == str((cwd / "models" / "aesthetic").resolve())
    m = parse_manifest(doc(scoring={"model": "clip-score:models/clip"}), base_dir=batches)
    assert m.scoring.model == f"clip-score:{(batches / 'models' / 'clip').resolve()}"
    preset = parse_manifest(doc(validation={"model": "tiny-clip"}), base_dir=batches)
    assert preset.validation.model == "tiny-clip"


# --- expansion


TEMPLATE_DOC = """
name: t
defaults: {candidates: 2, size: 64x64, seed: 99}
items:
  - "a red fox"
  - prompt: "a lighthouse"
    candidates: 3
    size: 64x96
    steps: 7
    guidance: 1.5
    negative_prompt: "fog"
    scheduler: euler_a
    required_attributes: [lighthouse]
  - template: "a {animal} in {style} style"
    vars: {animal: [cat, dog], style: [watercolor, pixel art]}
    candidates: 1
"""


def test_template_expands_in_product_order_last_var_fastest() -> None:
    plans = expand(parse_manifest(TEMPLATE_DOC))
    assert [p.prompt for p in plans[2:]] == [
        "a cat in watercolor style",
        "a cat in pixel art style",
        "a dog in watercolor style",
        "a dog in pixel art style",
    ]
    assert plans[2].source == "items[2] {animal=cat, style=watercolor}"
    assert [p.index for p in plans] == list(range(6))


def test_overrides_apply_to_their_item_and_template_items() -> None:
    plain, light, *templated = expand(parse_manifest(TEMPLATE_DOC))
    assert isinstance(light, ItemPlan)
    assert (plain.candidates, plain.width, plain.height) == (2, 64, 64)
    assert (plain.scheduler, plain.source) == (None, "items[0]")
    assert (light.candidates, light.width, light.height, light.steps, light.guidance) == (3, 64, 96, 7, 1.5)
    assert (light.negative_prompt, light.scheduler) == ("fog", "euler_a")
    assert light.required_attributes == ("lighthouse",)
    assert all(p.candidates == 1 and len(p.seeds) == 1 for p in templated)


def test_item_scheduler_default_asks_for_the_pipelines_own() -> None:
    text = "name: t\ndefaults: {scheduler: ddim}\nitems: [a, {prompt: b, scheduler: default}, {prompt: c}]\n"
    assert [p.scheduler for p in expand(parse_manifest(text))] == ["ddim", None, "ddim"]


def test_item_scheduler_null_inherits_like_other_overrides() -> None:
    text = "name: t\ndefaults: {scheduler: ddim}\nitems: [{prompt: b, scheduler: null}]\n"
    assert expand(parse_manifest(text))[0].scheduler == "ddim"


def test_dumped_manifest_reloads_to_the_same_plans(tmp_path: Path) -> None:
    pipeline_folder(tmp_path)
    text = TEMPLATE_DOC.replace("name: t", "name: t\nmodel: pipe")
    text = text.replace("seed: 99}", "seed: 99, scheduler: ddim}")
    m = parse_manifest(text, base_dir=tmp_path)
    assert {p.scheduler for p in expand(m)} == {"ddim", "euler_a"}
    again = Manifest.model_validate(json.loads(json.dumps(m.model_dump(mode="json"))))
    assert again == m and expand(again) == expand(m)


def test_seeds_are_deterministic_distinct_and_32_bit() -> None:
    first = expand(parse_manifest(TEMPLATE_DOC))
    again = expand(parse_manifest(TEMPLATE_DOC))
    assert [p.seeds for p in first] == [p.seeds for p in again]
    every = [s for p in first for s in p.seeds]
    assert len(set(every)) == len(every)
    assert all(0 <= s < 2**32 for s in every)
    assert all(len(p.seeds) == p.candidates for p in first)


def test_derived_seeds_depend_on_the_base_seed() -> None:
    a = expand(parse_manifest(TEMPLATE_DOC))
    b = expand(parse_manifest(TEMPLATE_DOC.replace("seed: 99", "seed: 100")))
    assert a[0].seeds != b[0].seeds


def test_explicit_item_seed_counts_up_per_candidate() -> None:
    text = (
        "name: t\nitems: [{prompt: a, seed: 10, candidates: 3}, "
        "{prompt: b, seed: 4294967295, candidates: 2}]\n"
    )
    plans = expand(parse_manifest(text))
    assert plans[0].seeds == (10, 11, 12)
    assert plans[1].seeds == (4294967295, 0)


def test_explicit_seed_on_a_template_is_shared_by_its_items() -> None:
    text = 'name: t\nitems: [{template: "{x}", vars: {x: [a, b]}, seed: 5, candidates: 2}]\n'
    assert [p.seeds for p in expand(parse_manifest(text))] == [(5, 6), (5, 6)]


def test_literal_braces_in_templates() -> None:
    text = 'name: t\nitems: [{template: "{{{x}}} sign", vars: {x: [open]}}]\n'
    assert expand(parse_manifest(text))[0].prompt == "{open} sign"


def test_expand_rechecks_a_hand_built_manifest() -> None:
    m = Manifest.model_validate({"name": "t", "items": [{"template": "{x}", "vars": {"y": ["a"]}}]})
    with pytest.raises(ManifestError) as info:
        expand(m)
    assert info.value.errors[0].path == "items[0].template"


# --- summary, schema


def _planned(text: str) -> tuple[Manifest, list[ItemPlan]]:
    planned = plan_manifest(text)
    return planned.manifest, planned.items


def test_summary_counts_items_candidates_sizes_and_slices() -> None:
    s = summary(*_planned(TEMPLATE_DOC), slice_size=2)
    assert (s["items"], s["candidates"]) == (6, 2 + 3 + 4)
    assert s["sizes"] == {"64x64": {"items": 5, "candidates": 6}, "64x96": {"items": 1, "candidates": 3}}
    assert s["slices"] == 1 + 2 + 4
    assert s["model"] == "tiny" and s["slice_size"] == 2
    assert summary(*_planned(TEMPLATE_DOC))["slices"] == 1 + 1 + 4


def test_summary_rejects_a_zero_slice_size() -> None:
    with pytest.raises(ValueError, match="slice_size"):
        summary(*_planned(doc()), slice_size=0)


def test_json_schema_is_json_and_describes_the_fields() -> None:
    schema = json.loads(json.dumps(json_schema()))
    assert schema["title"] and schema["$id"] and "items" in schema["properties"]
    assert schema["properties"]["items"]["description"]
    assert set(schema["required"]) == {"name", "items"}
    defaults = schema["$defs"]["GenerationDefaults"]["properties"]
    assert all(field.get("description") for field in defaults.values())


def test_manifest_is_immutable() -> None:
    m = parse_manifest(doc())
    with pytest.raises(ValidationError, match="frozen"):
        m.name = "other"  # type: ignore[misc]


# --- properties


def _parse_outcome(data: str | bytes) -> None:
    try:
        result = parse_manifest(data, max_bytes=20_000)
    except ManifestError as exc:
        assert exc.errors and all(isinstance(e, FieldError) for e in exc.errors)
        str(exc)
    else:
        assert isinstance(result, Manifest)
        expand(result)


yaml_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=20)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "name",
        "model",
        "items",
        "defaults",
        "candidates",
        "size",
        "prompt",
        "template",
        "vars",
        "seed",
        "moderation",
        "blocked_patterns",
        "selection",
        "winners",
        "scoring",
        "weights",
        "tags",
        "priority",
        "dtype",
        "version",
    ]
)
manifest_like = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(field_names, children, max_size=5),
    max_leaves=25,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.text(max_size=300))
def test_any_text_gives_a_manifest_or_a_manifest_error(text: str) -> None:
    _parse_outcome(text)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_give_a_manifest_or_a_manifest_error(data: bytes) -> None:
    _parse_outcome(data)


@FAST
@given(yaml_values)
def test_any_yaml_structure_gives_a_manifest_or_a_manifest_error(value: Any) -> None:
    _parse_outcome(yaml.safe_dump(value))


@FAST
@given(st.dictionaries(field_names, manifest_like, max_size=6))
def test_any_manifest_shaped_mapping_gives_a_manifest_or_a_manifest_error(value: dict[str, Any]) -> None:
    _parse_outcome(yaml.safe_dump({"name": "t", "items": ["a"], **value}))


@FAST
@given(st.lists(manifest_like | st.text(min_size=1, max_size=20), min_size=1, max_size=4), manifest_like)
def test_any_items_and_defaults_give_a_manifest_or_a_manifest_error(items: list[Any], defaults: Any) -> None:
    _parse_outcome(yaml.safe_dump({"name": "t", "items": items, "defaults": defaults}))


# --- settings stored with a batch, read back


def _stored_json(m: Manifest) -> dict[str, Any]:
    """``m`` as a batch row holds it: dumped at submit, through JSON."""
    return json.loads(json.dumps(m.model_dump(mode="json")))


@pytest.mark.parametrize("path", sorted(BATCHES.glob("*.yaml")), ids=lambda p: p.name)
def test_stored_manifest_of_a_dump_equals_the_parsed_manifest(path: Path) -> None:
    m = parse_manifest(path.read_text(), base_dir=path.parent)
    assert stored_manifest(_stored_json(m)) == m


def test_stored_manifest_skips_the_checks_that_touch_files_and_models(tmp_path: Path) -> None:
    import shutil

    pipeline_folder(tmp_path)
    (tmp_path / "models" / "clip").mkdir(parents=True)
    (tmp_path / "hashes.txt").write_text(PDQ_HASH + "\n")
    m = parse_manifest(
        doc(model="pipe", moderation={"pdq_blocklist": "hashes.txt"}, validation={"model": "models/clip"},
            scoring={"model": "clip-score:models/clip"}),
        base_dir=tmp_path,
        check_model=lambda ref: None,
        check_ref=lambda ref, kind: None,
    )
    stored = _stored_json(m)
    shutil.rmtree(tmp_path)  # the submit host's files are gone, or this host never saw them
    with pytest.raises(ValidationError):
        Manifest.model_validate(stored)
    assert stored_manifest(stored) == m
    assert stored_manifest(stored).moderation.pdq_blocklist == m.moderation.pdq_blocklist


def test_stored_manifest_still_checks_types_and_ranges() -> None:
    stored = _stored_json(parse_manifest(doc()))
    stored["selection"]["winners"] = 0
    with pytest.raises(ManifestError, match="selection.winners"):
        stored_manifest(stored)


def test_settings_a_newer_version_stored_read_without_the_fields_this_version_does_not_know() -> None:
    # A rolling upgrade: the web and control run the new version, a device worker still the old one.
    m = parse_manifest(doc())
    stored = _stored_json(m)
    stored["added_later"] = {"x": 1}
    stored["moderation"]["new_layer"] = {"enabled": True}
    stored["items"][0] = {"prompt": stored["items"][0], "new_item_field": 2}
    read = stored_manifest(stored)
    assert read.model_copy(update={"items": m.items}) == m and read.items[0].prompt == m.items[0]
    with pytest.raises(ManifestError, match="added_later"):
        parse_manifest(json.dumps(stored))  # a manifest submitted with an unknown key is still refused


def test_settings_stored_before_a_field_existed_read_with_todays_default() -> None:
    stored = _stored_json(parse_manifest(doc(scoring={"weights": {"preference": 2.0, "alignment": 0.25}})))
    del stored["scoring"]["weights"]["alignment"]
    del stored["moderation"]["near_duplicate_distance"]
    del stored["memory"]
    m = stored_manifest(stored)
    assert m.scoring.weights.preference == 2.0
    assert m.scoring.weights.alignment == ScoringWeights().alignment == 0.5
    assert m.moderation.near_duplicate_distance == parse_manifest(doc()).moderation.near_duplicate_distance
    assert not m.memory.cpu_offload
