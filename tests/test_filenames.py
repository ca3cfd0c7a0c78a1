"""Names made from prompts are safe on every file system, and the export name template says what is wrong."""

from __future__ import annotations

import unicodedata

import pytest

from farm.filenames import (
    DEFAULT_EXPORT_NAME,
    MAX_SEGMENT_BYTES,
    NameTemplate,
    TemplateError,
    cut,
    safe_segment,
    safe_text,
    unique,
)

VALUES = {
    "batch": "5f1c0d2e9a8b4c7d",
    "batch_name": "spring shoot",
    "item": 7,
    "candidate": "5f1c0d2e-00007-002",
    "index": 2,
    "prompt": "a red fox in the snow",
    "seed": 1234,
    "model": "tiny",
    "rank": 1,
}

WINDOWS_REFUSED = set('<>:"/\\|?*')


def assert_safe_everywhere(name: str) -> None:
    """One path component that Linux, macOS and Windows all take as it is."""
    assert name and name not in (".", "..")
    assert not WINDOWS_REFUSED & set(name)
    assert all(unicodedata.category(ch) not in ("Cc", "Cs", "Zl", "Zp") for ch in name)
    assert name == unicodedata.normalize("NFC", name)
    assert not name.endswith((".", " ")) and not name.startswith((".", " "))
    assert name.split(".")[0].casefold() not in {"con", "prn", "aux", "nul", "com1", "lpt1"}
    assert len(name.encode("utf-8")) <= 255


@pytest.mark.parametrize(
    ("hostile", "expected"),
    [
        ("../../etc/passwd", "_.._etc_passwd"),
        ("..", "_"),
        ("/", "_"),
        ("C:\\Windows\\system32", "C__Windows_system32"),
        ("CON", "CON_"),
        ("con.png", "con_.png"),
        ("Lpt9", "Lpt9_"),
        ("nul ", "nul_"),
        ("COM¹", "COM¹_"),
        ("CONSOLE", "CONSOLE"),
        ("line one\nline two\r\n\tend", "line one line two end"),
        ("bell\x07 and nul\x00 and del\x7f", "bell and nul and del"),
        ("trailing dots...", "trailing dots"),
        ("  padded  ", "padded"),
        ('what? <why> *now* |pipe| "quoted"', "what_ _why_ _now_ _pipe_ _quoted_"),
        ("\u202egnp.exe", "gnp.exe"),
        ("lone \ud800 surrogate", "lone surrogate"),
        ("fox 🦊 and 👩🏽‍🚀", "fox 🦊 and 👩🏽‍🚀"),
        ("", "_"),
    ],
)
def test_hostile_names_become_one_safe_name(hostile, expected):
    name = safe_segment(hostile)
    assert name == expected
    assert_safe_everywhere(name)


def test_text_is_nfc_normalised_so_one_name_is_spelled_one_way():
    decomposed = "cafe\u0301 e\u0301te\u0301"
    assert safe_text(decomposed) == "café été" == unicodedata.normalize("NFC", decomposed)


def test_300_characters_are_cut_by_characters_to_the_width_and_to_the_byte_limit():
    assert safe_text("x" * 300, 40) == "x" * 40
    foxes = safe_segment("🦊" * 300)  # 4 bytes each: the byte limit, not the character count, decides
    assert foxes == "🦊" * (MAX_SEGMENT_BYTES // 4)
    accented = safe_segment("é" * 300)
    assert accented == "é" * (MAX_SEGMENT_BYTES // 2)
    assert_safe_everywhere(foxes)


def test_a_cut_never_splits_a_character_from_its_marks_or_joiners():
    astronaut = "👩🏽‍🚀"  # woman, skin tone, zero-width joiner, rocket
    assert cut("ab" + astronaut, 3) == "ab"
    assert cut("ab" + astronaut, 4) == "ab"
    assert cut("ab" + astronaut, 5) == "ab"
    assert cut("ab" + astronaut, 6) == "ab" + astronaut
    assert cut("xe\u0301\u0323z", 2) == "x"  # a letter whose two combining marks NFC cannot fold
    assert cut("xe\u0301\u0323z", 4) == "xe\u0301\u0323"


def test_the_default_template_names_batch_folder_item_prompt_and_seed():
    template = NameTemplate(DEFAULT_EXPORT_NAME)
    assert template.render(VALUES) == "5f1c0d2e9a8b4c7d/0007-a red fox in the snow-1234"
    long = {**VALUES, "prompt": "a very long prompt " * 20}
    # 40 characters, then the space they end on dropped (a name never ends in a space).
    assert template.render(long) == "5f1c0d2e9a8b4c7d/0007-a very long prompt a very long prompt a-1234"


@pytest.mark.parametrize(
    "prompt",
    ["../../../etc/cron.d/evil", "CON", "..", "a/b\\c", "\n\n", "🦊" * 300, "x" * 300, "?" * 50],
)
def test_a_hostile_prompt_stays_in_its_file_and_its_folder(prompt):
    path = NameTemplate(DEFAULT_EXPORT_NAME).render({**VALUES, "prompt": prompt})
    folder, name = path.split("/")
    assert folder == VALUES["batch"]
    assert name.startswith("0007-") and name.endswith("-1234")
    assert_safe_everywhere(name)


def test_every_field_is_sanitised_so_none_adds_a_folder():
    template = NameTemplate("{batch_name}/{model}/{candidate}-{index}-{rank}")
    values = {**VALUES, "batch_name": "../up", "model": "stabilityai/sd-turbo"}
    assert template.render(values) == "_up/stabilityai_sd-turbo/5f1c0d2e-00007-002-2-1"
    # Not even a fill character of a number's spec adds a folder.
    assert NameTemplate("{seed:/>8}").render(VALUES) == "____1234"


def test_a_template_may_end_in_png_and_a_segment_that_renders_empty_is_still_a_name():
    assert NameTemplate("{prompt}.png").render(VALUES) == "a red fox in the snow"
    assert NameTemplate("{batch}/{prompt}").render({**VALUES, "prompt": "..."}) == "5f1c0d2e9a8b4c7d/_"


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{promt:40}", "{promt} is not a field (did you mean {prompt}?)"),
        ("{batch.id}", "{batch.id} is not a field"),
        ("{item[0]}", "is not a field"),
        ("{}", "{} is not a field"),
        ("{0}", "{0} is not a field"),
        ("{prompt:04d}", "a text field takes only a width"),
        ("{prompt:>40}", "a text field takes only a width"),
        ("{prompt:0}", "a text field takes only a width"),
        ("{item:zz}", "a number takes an int format spec"),
        ("{seed:.2f}", None),  # an int formats with a float spec: allowed, it is Python's own
        ("{prompt!r}", "conversions are not allowed"),
        ("{prompt:{seed}}", "cannot hold another field"),
        ("{prompt", "not a format string"),
        ("prompt}", "not a format string"),
        ("", "it is empty"),
        ("winner", "names no field"),
        ("/srv/{seed}", "starts with '/'"),
        ("{batch}/../{seed}", "'..' folder"),
        ("{batch}//{seed}", "empty"),
        ("{batch}/", "empty"),
        ("a:b-{seed}", "':'"),
        ("a\\b-{seed}", "'\\\\'"),
        ("tab\there-{seed}", "'\\t'"),
    ],
)
def test_a_bad_template_is_refused_with_what_is_wrong(template, says):
    if says is None:
        NameTemplate(template)
        return
    with pytest.raises(TemplateError) as info:
        NameTemplate(template)
    assert says in str(info.value)


def test_two_winners_with_one_name_get_a_suffix_and_case_alone_does_not_separate_names():
    taken = {"batch.json", "manifest.yaml"}
    assert unique("b/0001-fox-5", taken) == "b/0001-fox-5"
    assert unique("b/0001-fox-5", taken) == "b/0001-fox-5-2"
    assert unique("b/0001-FOX-5", taken) == "b/0001-FOX-5-3"
    assert unique("batch", taken) == "batch-2", "a winner named batch would replace batch.json"
    assert "b/0001-fox-5-2.json" in taken and "b/0001-fox-5-2.png" in taken
