"""The PNG ``parameters`` text as AUTOMATIC1111 writes it ("infotext"), so other tools read our images.

Why this format: A1111's PNG Info tab, Civitai's upload page, sd-parsers and most image browsers look for a
``parameters`` text chunk laid out the way A1111 writes it, and nothing else. Its layout:

    <prompt, any number of lines>
    Negative prompt: <negative prompt>          (only when there is one)
    Steps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: ...

The last line is ``Key: value`` pairs separated by ``, ``; a value holding a comma, a colon, a newline or a
double quote is written as a JSON string (A1111's readers unquote it). The farm's full recipe stays in its own
``farm:recipe`` chunk and in the JSON sidecar: this text is derived from it, for other tools, and never read
back by the farm.

Samplers: a diffusers scheduler class (plus a few of its config options) maps to one A1111 sampler name and
one schedule type, in ``SAMPLER_NAMES``, ``DPM_MULTISTEP_NAMES`` and ``schedule_type`` below, the one place
that mapping lives. The names follow the table in diffusers' scheduler overview:

==================================  ======================================================================
diffusers class (farm name)         A1111 sampler
==================================  ======================================================================
DDIMScheduler (ddim)                DDIM
DDPMScheduler (ddpm)                DDPM (A1111 has no DDPM sampler; the name says what ran)
EulerDiscreteScheduler (euler)      Euler
EulerAncestralDiscreteScheduler     Euler a
HeunDiscreteScheduler (heun)        Heun
DPMSolverMultistepScheduler         DPM++ 2M; DPM++ 2M SDE with ``algorithm_type="sde-dpmsolver++"``;
(dpmpp_2m)                          DPM++ 3M SDE with that and ``solver_order=3``
DPMSolverSinglestepScheduler        DPM++ 2S a (the nearest A1111 name: diffusers' singlestep solver is
(dpmpp_2s_a)                        not ancestral)
LMSDiscreteScheduler (lms)          LMS
PNDMScheduler (pndm)                PLMS (the farm runs PNDM with its Runge-Kutta warm-up skipped: PLMS)
UniPCMultistepScheduler (unipc)     UniPC
DEISMultistepScheduler (deis)       DEIS (no A1111 equivalent; ComfyUI's name)
LCMScheduler (lcm)                  LCM
FlowMatchEulerDiscreteScheduler     Euler (as Forge names it for FLUX)
KDPM2DiscreteScheduler              DPM2 (a pipeline's own scheduler may be one of these three)
KDPM2AncestralDiscreteScheduler     DPM2 a
DPMSolverSDEScheduler               DPM++ SDE
==================================  ======================================================================

A class missing from the table is written under its own class name, so the text never claims a sampler that
did not run. Schedule type (A1111's separate field since 1.9), from the scheduler's config: ``Karras``,
``Exponential`` or ``Beta`` when ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` is
set; else ``Simple`` on a flow-matching scheduler; else by ``timestep_spacing``: ``linspace`` is A1111's
``Uniform`` (the model's own sigmas at evenly spaced timesteps, both ends included), ``leading`` its ``DDIM``
schedule (a fixed stride from the first timestep, as SD 1.x configs ask with ``steps_offset=1``), ``trailing``
its ``SGM Uniform`` (evenly spaced, counted down from the last timestep). ``Automatic`` where the recipe does
not say (recipes written before ``scheduler_options`` was recorded).

Model hash: the recipe's ``model_hash`` (farm.ml.hashes: A1111's "AutoV2", the first 10 hex digits of a
single-file checkpoint's sha256, or the documented hash of a diffusers folder's weight files). LoRAs (a
recipe ``loras`` list of ``{name or ref, sha256, scale}``) are written the way A1111 writes them: a
``<lora:NAME:SCALE>`` tag after the prompt, which is what makes a prompt pasted into A1111 apply them, and
``Lora hashes: "NAME: HASH, ..."`` with the first 10 hex digits of each file's sha256, by which Civitai links
the resources.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from farm.assets import looks_like_path

#: diffusers scheduler class -> A1111 sampler name (DPMSolverMultistepScheduler: ``DPM_MULTISTEP_NAMES``).
SAMPLER_NAMES: dict[str, str] = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ 2S a",
    "LMSDiscreteScheduler": "LMS",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "DEISMultistepScheduler": "DEIS",
    "LCMScheduler": "LCM",
    "FlowMatchEulerDiscreteScheduler": "Euler",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
}

#: DPMSolverMultistepScheduler's (algorithm_type, solver_order) -> A1111 sampler; others have no A1111 name.
DPM_MULTISTEP_NAMES: dict[tuple[str, int], str] = {
    ("dpmsolver++", 2): "DPM++ 2M",
    ("sde-dpmsolver++", 2): "DPM++ 2M SDE",
    ("sde-dpmsolver++", 3): "DPM++ 3M SDE",
}

#: Config flags that choose the sigmas, in the order diffusers checks them -> A1111 schedule type.
SIGMA_SCHEDULES: tuple[tuple[str, str], ...] = (
    ("use_karras_sigmas", "Karras"),
    ("use_exponential_sigmas", "Exponential"),
    ("use_beta_sigmas", "Beta"),
)

#: ``timestep_spacing`` -> A1111 schedule type (see the module docstring for why each is the match).
SPACING_SCHEDULES: dict[str, str] = {"linspace": "Uniform", "leading": "DDIM", "trailing": "SGM Uniform"}

#: The scheduler config keys the mapping reads; the generator records them in the recipe
#: (``scheduler_options``), so the text is derived from the recipe alone.
SCHEDULER_OPTION_KEYS: tuple[str, ...] = (
    *(flag for flag, _ in SIGMA_SCHEDULES),
    "timestep_spacing",
    "algorithm_type",
    "solver_order",
)

#: Digits of a LoRA file's sha256 written in ``Lora hashes`` (A1111's "AutoV2" length, as for the model).
LORA_HASH_DIGITS = 10


def sampler_name(scheduler_class: str | None, options: Mapping[str, Any] | None = None) -> str | None:
    """A1111's sampler name for a diffusers scheduler class and its recorded options (None: no class)."""
    if not scheduler_class:
        return None
    options = options or {}
    if scheduler_class == "DPMSolverMultistepScheduler" and "algorithm_type" in options:
        key = (str(options["algorithm_type"]), int(options.get("solver_order") or 2))
        return DPM_MULTISTEP_NAMES.get(key, scheduler_class)
    return SAMPLER_NAMES.get(scheduler_class, scheduler_class)


def schedule_type(scheduler_class: str | None, options: Mapping[str, Any] | None = None) -> str:
    """A1111's schedule type for the recorded scheduler options ("Automatic" when they are not recorded)."""
    options = options or {}
    for flag, name in SIGMA_SCHEDULES:
        if options.get(flag):
            return name
    if scheduler_class and scheduler_class.startswith("FlowMatch"):
        return "Simple"
    return SPACING_SCHEDULES.get(str(options.get("timestep_spacing")), "Automatic")


def quote(value: str) -> str:
    """``value`` as it may stand in the ``Key: value, ...`` line: as it is, or as a JSON string when it holds
    what would split the line (a comma, a colon, a newline) or starts a quoted value (a double quote)."""
    if any(c in value for c in ',:\n\r"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def number(value: Any) -> str:
    """A number as A1111 writes one: ``7`` for a whole float, else the shortest exact form (``7.5``)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def model_name(ref: str | None) -> str | None:
    """The name A1111 shows for a checkpoint: a preset or hub id as it is, a folder or file by its last
    part without a weights suffix (never the server's path)."""
    if not ref:
        return None
    ref = str(ref)
    if looks_like_path(ref):
        name = PurePosixPath(ref.replace("\\", "/")).name or ref
        for suffix in (".safetensors", ".ckpt", ".gguf"):
            name = name.removesuffix(suffix)
        return name
    return ref


def lora_name(lora: Mapping[str, Any]) -> str:
    """A LoRA's name in the tag and the hash list: its ``name``, else its ref's file stem; with the characters
    that would split those (``,``, ``:``, ``<``, ``>``) replaced."""
    name = str(lora.get("name") or "")
    if not name:
        ref = str(lora.get("ref") or "lora")
        name = model_name(ref) or ref
        name = name.removesuffix(".safetensors")
        if "/" in name:  # a hub id: its repository name, as A1111 names a file by its stem
            name = name.rsplit("/", 1)[1]
    for bad in ",:<>\n\r":
        name = name.replace(bad, "_")
    return name.strip() or "lora"


def lora_hash(lora: Mapping[str, Any]) -> str | None:
    """A LoRA's short hash: its recorded ``hash`` when it has one, else the first digits of its sha256."""
    if lora.get("hash"):
        return str(lora["hash"])
    sha = lora.get("sha256")
    return str(sha)[:LORA_HASH_DIGITS] if sha else None


def parameters_text(recipe: Mapping[str, Any]) -> str:
    """The A1111 infotext of a recipe (see the module docstring). Keys the recipe lacks are left out, so an
    old or partial recipe still gives a well-formed text."""
    loras = [lora for lora in recipe.get("loras") or [] if isinstance(lora, Mapping)]
    prompt = str(recipe.get("prompt") or "")
    tags = " ".join(f"<lora:{lora_name(lora)}:{number(lora.get('scale', 1.0))}>" for lora in loras)
    lines = [f"{prompt} {tags}" if prompt and tags else prompt or tags]
    negative = str(recipe.get("negative_prompt") or "")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    options = recipe.get("scheduler_options") or {}
    pairs: list[tuple[str, str | None]] = [
        ("Steps", number(recipe["steps"]) if "steps" in recipe else None),
        ("Sampler", sampler_name(recipe.get("scheduler_class"), options)),
        (
            "Schedule type",
            schedule_type(recipe.get("scheduler_class"), options) if recipe.get("scheduler_class") else None,
        ),
        ("CFG scale", number(recipe["guidance"]) if "guidance" in recipe else None),
        ("Seed", number(recipe["seed"]) if "seed" in recipe else None),
        (
            "Size",
            f"{recipe['width']}x{recipe['height']}" if "width" in recipe and "height" in recipe else None,
        ),
        ("Model hash", str(recipe["model_hash"]) if recipe.get("model_hash") else None),
        ("Model", model_name(recipe.get("model_ref"))),
    ]
    hashes = [(lora_name(lora), lora_hash(lora)) for lora in loras]
    if any(h for _, h in hashes):
        pairs.append(("Lora hashes", ", ".join(f"{name}: {h}" for name, h in hashes if h)))
    line = ", ".join(f"{key}: {quote(value)}" for key, value in pairs if value is not None)
    if line:
        lines.append(line)
    return "\n".join(lines)
