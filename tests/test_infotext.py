"""The A1111 ``parameters`` text of a recipe: its exact layout, the scheduler table, quoting and LoRAs."""

from __future__ import annotations

import pytest

from farm.infotext import (
    SAMPLER_NAMES,
    SCHEDULER_OPTION_KEYS,
    model_name,
    number,
    parameters_text,
    quote,
    sampler_name,
    schedule_type,
)
from farm.manifest import SCHEDULERS

#: A recipe shaped like the generate stage's (farm/tasks/generate.py), trimmed to what the text reads and a
#: few keys it must ignore.
RECIPE = {
    "model_ref": "tiny",
    "model_hash": "9464630561",
    "fingerprint": "0123456789abcdef",
    "scheduler_class": "DPMSolverMultistepScheduler",
    "scheduler_options": {
        "use_karras_sigmas": True,
        "timestep_spacing": "leading",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
    },
    "scheduler": "dpmpp_2m",
    "prompt": "a red fox in the snow, golden hour",
    "negative_prompt": "blurry, lowres",
    "seed": 1234567,
    "slice_seeds": [1234567, 42],
    "slice_position": 0,
    "steps": 25,
    "guidance": 7.0,
    "width": 512,
    "height": 768,
}


def test_the_text_of_a_known_recipe_is_exactly_a1111s_layout():
    assert parameters_text(RECIPE) == (
        "a red fox in the snow, golden hour\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567, Size: 512x768, "
        "Model hash: 9464630561, Model: tiny"
    )


def test_no_negative_prompt_line_without_a_negative_prompt_and_a_fractional_cfg_stays_exact():
    recipe = {**RECIPE, "negative_prompt": "", "guidance": 4.5, "scheduler_options": {}}
    assert parameters_text(recipe).splitlines() == [
        "a red fox in the snow, golden hour",
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 4.5, Seed: 1234567, "
        "Size: 512x768, Model hash: 9464630561, Model: tiny",
    ]


def test_a_multi_line_prompt_stays_above_the_parameters_line():
    text = parameters_text({**RECIPE, "prompt": "line one\nline two"})
    assert text.splitlines()[:3] == ["line one", "line two", "Negative prompt: blurry, lowres"]
    assert text.splitlines()[3].startswith("Steps: 25, ")


def test_loras_are_tagged_in_the_prompt_and_listed_with_their_hashes_in_one_quoted_value():
    recipe = {
        **RECIPE,
        "negative_prompt": "",
        "loras": [
            {"ref": "/srv/loras/film-grain.safetensors", "sha256": "ab" * 32, "scale": 0.8},
            {"name": "pixel art", "sha256": "0f" * 32, "scale": 1.0},
            {"ref": "owner/watercolor-lora", "sha256": "c3" * 32, "scale": 0.55},
        ],
    }
    lines = parameters_text(recipe).splitlines()
    assert lines[0] == (
        "a red fox in the snow, golden hour "
        "<lora:film-grain:0.8> <lora:pixel art:1> <lora:watercolor-lora:0.55>"
    )
    assert lines[1].endswith(
        ", Model: tiny, "
        'Lora hashes: "film-grain: ababababab, pixel art: 0f0f0f0f0f, watercolor-lora: c3c3c3c3c3"'
    )


def test_a_partial_or_old_recipe_gives_a_well_formed_text():
    assert parameters_text({"seed": 1, "colour": [1, 2, 3]}) == "\nSeed: 1"
    old = {k: v for k, v in RECIPE.items() if k not in ("model_hash", "scheduler_options")}
    assert parameters_text(old).splitlines()[-1] == (
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Seed: 1234567, Size: 512x768, "
        "Model: tiny"
    )


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("tiny", "tiny"),
        ("a, b", '"a, b"'),
        ("k: v", '"k: v"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("two\nlines", '"two\\nlines"'),
        ("café", "café"),
    ],
)
def test_values_that_would_split_the_line_are_quoted_as_json(value, written):
    assert quote(value) == written


def test_numbers_are_written_as_a1111_writes_them():
    assert [number(7.0), number(7.5), number(25), number(0.125)] == ["7", "7.5", "25", "0.125"]


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("tiny", "tiny"),
        ("stabilityai/sd-turbo", "stabilityai/sd-turbo"),
        ("/srv/models/my-model", "my-model"),
        ("/srv/models/dream.safetensors", "dream"),
        ("./models/x", "x"),
        (None, None),
    ],
)
def test_model_names_never_show_the_servers_path(ref, name):
    assert model_name(ref) == name


def test_a_model_folder_whose_name_holds_a_comma_is_quoted():
    assert parameters_text({"model_ref": "/srv/models/fox, v2"}).endswith('Model: "fox, v2"')


#: The farm's scheduler names -> the A1111 sampler each is written as (farm.infotext's table).
EXPECTED_SAMPLERS = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2s_a": "DPM++ 2S a",
    "lms": "LMS",
    "pndm": "PLMS",
    "unipc": "UniPC",
    "deis": "DEIS",
    "lcm": "LCM",
    "flow_euler": "Euler",
}


def test_every_scheduler_a_manifest_may_name_has_an_a1111_sampler():
    from farm.ml.generator import SCHEDULER_CLASSES

    assert set(EXPECTED_SAMPLERS) == set(SCHEDULERS) == set(SCHEDULER_CLASSES)
    for name, cls in SCHEDULER_CLASSES.items():
        assert cls in SAMPLER_NAMES, f"{cls} ({name}) is missing from farm.infotext.SAMPLER_NAMES"
        assert sampler_name(cls) == EXPECTED_SAMPLERS[name]


@pytest.mark.parametrize(
    ("options", "sampler"),
    [
        ({"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
        ({"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "DPM++ 2M SDE"),
        ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "DPM++ 3M SDE"),
        ({"algorithm_type": "dpmsolver", "solver_order": 2}, "DPMSolverMultistepScheduler"),
        ({}, "DPM++ 2M"),
    ],
)
def test_dpm_multistep_variants_have_their_own_names_and_others_their_class(options, sampler):
    assert sampler_name("DPMSolverMultistepScheduler", options) == sampler


def test_an_unknown_scheduler_class_is_written_under_its_own_name():
    assert sampler_name("TCDScheduler", {}) == "TCDScheduler"
    assert sampler_name(None) is None


@pytest.mark.parametrize(
    ("cls", "options", "schedule"),
    [
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "trailing"}, "Karras"),
        ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, "Exponential"),
        ("EulerDiscreteScheduler", {"use_beta_sigmas": True}, "Beta"),
        ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, "Uniform"),
        ("DDIMScheduler", {"timestep_spacing": "leading"}, "DDIM"),
        ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "SGM Uniform"),
        ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": False}, "Simple"),
        ("EulerDiscreteScheduler", {}, "Automatic"),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": False, "timestep_spacing": "odd"}, "Automatic"),
    ],
)
def test_schedule_types_follow_the_scheduler_options(cls, options, schedule):
    assert schedule_type(cls, options) == schedule


def test_the_options_the_generator_records_are_those_the_table_reads():
    assert set(SCHEDULER_OPTION_KEYS) == {
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "timestep_spacing",
        "algorithm_type",
        "solver_order",
    }
