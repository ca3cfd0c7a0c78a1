"""Generator adapter on the tiny preset: determinism, slice independence, scheduler swaps, recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from farm.ml.builds import build_and_resolve
from farm.ml.generator import SCHEDULERS, Generator, compatible_schedulers

KW = dict(prompt="a red cat", negative_prompt="blurry", steps=2, guidance=5.0, width=64, height=64)


def px(im) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def assert_nearly_equal(a, b) -> None:
    """Slice independence holds up to CPU batching round-off.

    Measured on torch 2.13 CPU: a batch of 3 vs 1 differs in at most 2 of 12,288 uint8 values and by at most 1
    (float sums land on the other side of a rounding edge); other batch sizes are often bitwise equal. So:
    max difference 1 level, and in fewer than 0.1% of values.
    """
    diff = np.abs(px(a) - px(b))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), int((diff > 0).sum()))


def test_generates_one_image_per_seed(tiny_generator: Generator) -> None:
    images = tiny_generator.generate(seeds=[1, 2, 3, 4], scheduler=None, **KW)
    assert len(images) == 4 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert np.abs(px(images[0]) - px(images[1])).max() > 0


def test_same_seed_same_pixels(tiny_generator: Generator) -> None:
    a = tiny_generator.generate(seeds=[7], scheduler="ddim", **KW)[0]
    b = tiny_generator.generate(seeds=[7], scheduler="ddim", **KW)[0]
    assert np.array_equal(px(a), px(b))


def test_slice_independence(tiny_generator: Generator) -> None:
    # One torch.Generator per seed makes each candidate's initial latents independent of its slice; the
    # remaining differences are CPU batching round-off (see assert_nearly_equal), not randomness.
    batch = tiny_generator.generate(seeds=[1, 2, 3], scheduler="ddim", **KW)
    alone = tiny_generator.generate(seeds=[2], scheduler="ddim", **KW)
    assert_nearly_equal(batch[1], alone[0])
    assert np.abs(px(batch[0]) - px(alone[0])).mean() > 10  # a different seed is a different picture


def test_slice_independence_with_ancestral_scheduler(tiny_generator: Generator) -> None:
    # euler_a draws fresh noise at every step; it too must come from the per-seed generators.
    batch = tiny_generator.generate(seeds=[5, 6], scheduler="euler_a", **KW)
    alone = tiny_generator.generate(seeds=[6], scheduler="euler_a", **KW)
    assert_nearly_equal(batch[1], alone[0])


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "unipc"])
def test_scheduler_swap(tiny_generator: Generator, name: str) -> None:
    images = tiny_generator.generate(seeds=[1], scheduler=name, **KW)
    assert len(images) == 1
    assert tiny_generator.scheduler_name == name
    assert tiny_generator.recipe()["scheduler_class"] == type(tiny_generator.pipe.scheduler).__name__


def test_scheduler_swaps_only_when_it_changes(tiny_generator: Generator) -> None:
    tiny_generator.set_scheduler("euler")
    first = tiny_generator.pipe.scheduler
    tiny_generator.set_scheduler("euler")
    tiny_generator.set_scheduler(None)
    assert tiny_generator.pipe.scheduler is first


def test_bad_scheduler_name_lists_valid_names(tiny_generator: Generator) -> None:
    with pytest.raises(ValueError) as info:
        tiny_generator.generate(seeds=[1], scheduler="warp_drive", **KW)
    assert "ddim" in str(info.value) and "euler_a" in str(info.value)


def test_flow_scheduler_does_not_fit_sd(tiny_generator: Generator) -> None:
    assert "flow_euler" in SCHEDULERS and "flow_euler" not in compatible_schedulers("DDIMScheduler")
    with pytest.raises(ValueError, match="does not fit"):
        tiny_generator.set_scheduler("flow_euler")


def test_recipe_records_provenance(tiny_generator: Generator) -> None:
    recipe = tiny_generator.recipe()
    assert recipe["model_ref"] == "tiny"
    assert recipe["pipeline_class"] == "StableDiffusionPipeline"
    assert len(recipe["fingerprint"]) == 16
    assert set(recipe["versions"]) == {"torch", "diffusers", "transformers", "numpy"}


def test_recipe_records_the_hash_of_the_loaded_models_weights(tiny_generator: Generator) -> None:
    from farm.ml.hashes import folder_hash

    recipe = tiny_generator.recipe()
    assert recipe["model_hash"] == folder_hash(Path(tiny_generator.resolved.path_or_id))
    assert len(recipe["model_hash"]) == 10


#: What the recipe's scheduler options name in A1111's terms for each scheduler swapped into the tiny SD
#: pipeline (its own is DDIM with leading spacing, which every swap keeps: from_config of its config).
A1111_NAMES = {
    "ddim": ("DDIM", "DDIM"),
    "ddpm": ("DDPM", "DDIM"),
    "euler": ("Euler", "DDIM"),
    "euler_a": ("Euler a", "DDIM"),
    "heun": ("Heun", "DDIM"),
    "dpmpp_2m": ("DPM++ 2M", "DDIM"),
    "dpmpp_2s_a": ("DPM++ 2S a", "DDIM"),
    "lms": ("LMS", "DDIM"),
    "pndm": ("PLMS", "DDIM"),
    "unipc": ("UniPC", "DDIM"),
    "deis": ("DEIS", "DDIM"),
    "lcm": ("LCM", "DDIM"),
}


@pytest.mark.parametrize("name", sorted(A1111_NAMES))
def test_each_swapped_scheduler_is_recorded_with_the_options_that_name_its_a1111_sampler(
    tiny_generator: Generator, name: str
) -> None:
    from diffusers.utils import is_scipy_available

    from farm.infotext import sampler_name, schedule_type

    if name == "lms" and not is_scipy_available():
        pytest.skip("lms needs scipy")
    try:
        tiny_generator.set_scheduler(name)
        recipe = tiny_generator.recipe()
    finally:
        tiny_generator.set_scheduler("ddim")  # leave the shared generator as the other tests expect
    cls, options = recipe["scheduler_class"], recipe["scheduler_options"]
    assert options["timestep_spacing"] == "leading"
    assert (sampler_name(cls, options), schedule_type(cls, options)) == A1111_NAMES[name]


def test_karras_sigmas_in_a_schedulers_config_are_recorded_and_named(tiny_generator: Generator) -> None:
    from diffusers import DPMSolverMultistepScheduler

    from farm.infotext import sampler_name, schedule_type

    original = tiny_generator.pipe.scheduler
    tiny_generator.pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        original.config, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"
    )
    try:
        recipe = tiny_generator.recipe()
    finally:
        tiny_generator.pipe.scheduler = original
    cls, options = recipe["scheduler_class"], recipe["scheduler_options"]
    assert options["use_karras_sigmas"] is True
    assert (sampler_name(cls, options), schedule_type(cls, options)) == ("DPM++ 2M SDE", "Karras")


def test_recipe_records_the_last_slice_and_the_threads_it_ran_under(tiny_generator: Generator) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_generator.generate(seeds=[8, 3, 5], scheduler=None, **KW)
    finally:
        torch.set_num_threads(threads)
    recipe = tiny_generator.recipe()
    assert recipe["slice_seeds"] == [8, 3, 5]
    assert recipe["numerics"]["torch_threads"] == 1
    assert recipe["numerics"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_tiny_xl_generates(models_dir: Path) -> None:
    gen = Generator.load(build_and_resolve("tiny-xl", kind="generator", models_dir=models_dir))
    a = gen.generate(seeds=[3, 4], scheduler=None, **KW)
    b = gen.generate(seeds=[4], scheduler=None, **KW)
    assert len(a) == 2
    assert_nearly_equal(a[1], b[0])
    assert gen.recipe()["pipeline_class"] == "StableDiffusionXLPipeline"


def test_bad_dtype_and_steps(models_dir: Path, tiny_generator: Generator) -> None:
    with pytest.raises(ValueError, match="dtype"):
        Generator.load(build_and_resolve("tiny", kind="generator", models_dir=models_dir), dtype="fp8")
    with pytest.raises(ValueError, match="steps"):
        tiny_generator.generate(seeds=[1], scheduler=None, **{**KW, "steps": 0})
