"""Styles and wildcards in manifests (farm.prompts through farm.manifest): registries and their precedence,
A1111's styles.csv, the {prompt} placeholder, style defaults between batch defaults and item fields, seeded
and combinatorial wildcards, word files and the folders they may come from."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from farm import dispatch
from farm.assets import AssetPolicy
from farm.config import load_settings
from farm.db import Batch, Item, session_scope
from farm.manifest import MAX_ITEMS, ManifestError, plan_manifest


def plan(text: str, **options):
    return plan_manifest(text, **options).items


def test_shipped_style_places_the_prompt_at_its_placeholder_and_adds_its_negative():
    [item] = plan("name: s\nitems: [{prompt: a fox, style: cinematic}]")
    assert item.prompt.startswith("cinematic still of a fox, ")
    assert item.negative_prompt.startswith("cartoon")
    assert item.styles == ("cinematic",)


def test_style_without_placeholder_is_appended_and_negatives_are_combined_in_order():
    text = """
name: s
defaults: {negative_prompt: blurry}
styles:
  warm: {prompt: warm tones, negative_prompt: cold}
  frame: {prompt: "[{prompt}]", negative_prompt: "no {prompt}"}
items: [{prompt: a fox, style: [warm, frame]}]
"""
    [item] = plan(text)
    assert item.prompt == "[a fox, warm tones]"
    assert item.negative_prompt == "no blurry, cold"
    assert item.styles == ("warm", "frame")


def test_style_defaults_sit_between_batch_defaults_and_item_fields():
    text = """
name: s
defaults: {steps: 3, guidance: 2, size: 64x64, style: quick}
styles:
  quick: {steps: 9, size: 64x96, scheduler: euler}
items:
  - a fox
  - {prompt: a cat, steps: 4}
  - {prompt: a dog, style: []}
"""
    fox, cat, dog = plan(text)
    assert (fox.steps, fox.height, fox.guidance, fox.scheduler) == (9, 96, 2.0, "euler")
    assert (cat.steps, cat.height) == (4, 96)
    assert (dog.steps, dog.height, dog.scheduler, dog.styles) == (3, 64, None, ())


def test_precedence_is_manifest_then_farm_home_then_shipped_and_a1111_csv_is_read_as_is(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "styles.yaml").write_text(
        "cinematic: {prompt: 'home {prompt}'}\nmine: {prompt: 'yaml {prompt}'}\n"
    )
    (home / "styles.csv").write_text(
        'name,prompt,negative_prompt\n"Oil, thick",{prompt} in thick oil paint,"photo, 3d"\n'
        "mine,csv {prompt},\n,,\n",
        encoding="utf-8",
    )
    text = """
name: s
styles:
  photo: {prompt: 'manifest {prompt}'}
items:
  - {prompt: a, style: cinematic}
  - {prompt: b, style: photo}
  - {prompt: c, style: "Oil, thick"}
  - {prompt: d, style: mine}
  - {prompt: e, style: watercolor}
"""
    a, b, c, d, e = plan(text, farm_home=home)
    assert a.prompt == "home a"
    assert b.prompt == "manifest b"
    assert (c.prompt, c.negative_prompt) == ("c in thick oil paint", "photo, 3d")
    assert d.prompt == "yaml d"  # styles.yaml wins over styles.csv in FARM_HOME
    assert e.prompt.startswith("watercolor painting of e")
    # Without FARM_HOME the shipped cinematic is used again.
    assert plan("name: s\nitems: [{prompt: a, style: cinematic}]")[0].prompt.startswith("cinematic still")


def test_manifest_styles_csv_is_read_relative_to_the_manifest(tmp_path):
    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\nnoir,{prompt} in film noir,colour\n")
    text = "name: s\nstyles_csv: styles.csv\nitems: [{prompt: a cat, style: noir}]"
    [item] = plan(text, base_dir=tmp_path)
    assert (item.prompt, item.negative_prompt) == ("a cat in film noir", "colour")
    with pytest.raises(ManifestError) as err:
        plan(text.replace("styles.csv\n", "../x.csv\n"), base_dir=tmp_path)
    assert err.value.errors[0].path == "styles_csv"


def test_unknown_style_is_refused_with_a_suggestion_and_nothing_written(monkeypatch, tmp_path):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    from farm.db import migrate

    migrate(settings.database_url)
    text = "name: s\nmodel: tiny\ndefaults: {steps: 1, size: 64x64}\nitems: [a, {prompt: b, style: cinematc}]"
    with pytest.raises(ManifestError) as err:
        dispatch.submit(text, settings=settings)
    [error] = err.value.errors
    assert error.path == "items[1].style[0]"
    assert "did you mean 'cinematic'?" in error.message
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Batch)) == 0


def test_submit_stores_the_final_prompt_and_the_styles_applied(monkeypatch, tmp_path):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    from farm.db import migrate

    migrate(settings.database_url)
    text = "name: s\nmodel: tiny\ndefaults: {steps: 1, size: 64x64}\nitems: [{prompt: a fox, style: photo}]"
    manifest, items = dispatch.plan(text, settings=settings)
    done = dispatch.create_batch(manifest, items, text, settings=settings)
    with session_scope(settings.database_url) as s:
        row = s.scalars(select(Item).where(Item.batch_id == done.batch_id)).one()
        assert row.prompt.startswith("photograph of a fox")
        assert row.params["styles"] == ["photo"]
    summary = dispatch.dry_run(text, settings=settings)
    assert summary["prompts"][0]["styles"] == ["photo"]
    assert summary["prompts"][0]["prompt"] == row.prompt


# ------------------------------------------------------------------------------------------- wildcards


def test_random_wildcards_are_reproducible_and_follow_the_seed():
    text = "name: w\ndefaults: {seed: SEED}\nitems:\n" + "".join(
        f"  - a {{red|green|blue|white|black|pink}} fox {k}\n" for k in range(12)
    )
    first = [p.prompt for p in plan(text.replace("SEED", "1"))]
    assert first == [p.prompt for p in plan(text.replace("SEED", "1"))]
    assert first != [p.prompt for p in plan(text.replace("SEED", "2"))]
    assert all("{" not in p and "|" not in p for p in first)
    assert len({p.split()[1] for p in first}) > 1  # items pick independently


def test_combinatorial_wildcards_make_one_item_each_and_templates_keep_their_variables():
    text = """
name: w
items:
  - template: "a {animal} in {red|green} light"
    vars: {animal: [cat, dog]}
    wildcards: combinatorial
  - "a {x} stays literal"
"""
    items = plan(text)
    assert [p.prompt for p in items[:4]] == [
        "a cat in red light",
        "a cat in green light",
        "a dog in red light",
        "a dog in green light",
    ]
    assert [p.source for p in items[:2]] == ["items[0] {animal=cat} #0", "items[0] {animal=cat} #1"]
    assert items[4].prompt == "a {x} stays literal"


def test_combinatorial_limit_says_what_each_wildcard_contributes(tmp_path):
    words = tmp_path / "wildcards"
    words.mkdir()
    (words / "colors.txt").write_text("\n".join(f"c{k}" for k in range(200)) + "\n")
    (words / "things.txt").write_text("\n".join(f"t{k}" for k in range(50)) + "\n")
    text = (
        "name: w\ndefaults: {wildcards: combinatorial, candidates: 1}\n"
        "items: ['a {big|small|tiny} __colors__ __things__']"
    )
    with pytest.raises(ManifestError) as err:
        plan(text, base_dir=tmp_path)
    [error] = err.value.errors
    assert error.path == "items"
    assert f"more than {MAX_ITEMS} items" in error.message
    assert "items[0]" in error.message
    assert "{big|small|tiny}: 3, __colors__: 200, __things__: 50" in error.message
    # The same prompt picked at random is one item.
    assert len(plan(text.replace("combinatorial", "random"), base_dir=tmp_path)) == 1


def test_word_files_come_from_the_manifest_folder_then_farm_home(tmp_path):
    here, home = tmp_path / "m", tmp_path / "home"
    (here / "wildcards").mkdir(parents=True)
    (home / "wildcards" / "sub").mkdir(parents=True)
    (here / "wildcards" / "colors.txt").write_text("# a comment\nred\n\ngreen\n")
    (home / "wildcards" / "colors.txt").write_text("home-only\n")
    (home / "wildcards" / "sub" / "animals.txt").write_text("cat\ndog\n")
    text = "name: w\ndefaults: {wildcards: combinatorial}\nitems: ['a __colors__ __sub/animals__']"
    prompts = sorted(p.prompt for p in plan(text, base_dir=here, farm_home=home))
    assert prompts == ["a green cat", "a green dog", "a red cat", "a red dog"]
    # An uploaded manifest sees FARM_HOME's words only.
    uploaded = AssetPolicy.uploaded(asset_dirs=[])
    prompts = sorted(p.prompt for p in plan(text, assets=uploaded, farm_home=home))
    assert prompts == ["a home-only cat", "a home-only dog"]


def test_missing_word_file_names_the_file_to_create(tmp_path):
    with pytest.raises(ManifestError) as err:
        plan("name: w\nitems: [{prompt: 'a __nothing__ fox'}]", base_dir=tmp_path, farm_home=tmp_path / "h")
    [error] = err.value.errors
    assert error.path == "items[0].prompt"
    assert str(tmp_path / "wildcards" / "nothing.txt") in error.message


@pytest.mark.parametrize("name", ["../secret", "sub/../../secret", "/etc/passwd", "col*"])
def test_a_wildcard_name_that_escapes_its_folder_is_refused(tmp_path, name):
    (tmp_path / "secret.txt").write_text("leaked\n")
    (tmp_path / "m" / "wildcards").mkdir(parents=True)
    with pytest.raises(ManifestError) as err:
        plan(f"name: w\nitems: ['a __{name}__ fox']", base_dir=tmp_path / "m")
    assert "leaked" not in str(err.value)


def test_a_linked_word_file_pointing_outside_is_refused(tmp_path):
    (tmp_path / "secret.txt").write_text("leaked\n")
    (tmp_path / "m" / "wildcards").mkdir(parents=True)
    Path(tmp_path / "m" / "wildcards" / "colors.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ManifestError) as err:
        plan("name: w\nitems: ['a __colors__ fox']", base_dir=tmp_path / "m")
    assert "outside" in str(err.value)
