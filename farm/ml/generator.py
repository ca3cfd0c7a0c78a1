"""Generator: a thin adapter over a diffusers pipeline that turns (prompt, seeds) into images.

Why an adapter: the generate stage must not care whether the pipeline is the tiny preset, SD-Turbo, SDXL or
FLUX; it asks for one batched forward pass over a slice of seeds and a recipe for provenance. Each seed gets
its own ``torch.Generator`` so a candidate's picture depends on its seed, not on the slice it landed in; its
exact pixels do not: float sums over a batch of another size round differently (one uint8 level here and
there on a CPU). So the recipe also records what decides the numerics (the slice's seeds in order, torch's
thread count, the CPU's kernel level or the GPU's name, the precision flags), and ``numerics_as`` puts the
recorded ones back for a replay.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from PIL import Image

from farm.infotext import SCHEDULER_OPTION_KEYS
from farm.ml.hashes import model_hash
from farm.ml.presets import ResolvedModel, model_folder

log = logging.getLogger(__name__)

#: Scheduler short name -> diffusers class name, swapped in with ``from_config`` of the pipeline's own one.
SCHEDULER_CLASSES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2s_a": "DPMSolverSinglestepScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "lcm": "LCMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}

#: Scheduler names a manifest may use.
SCHEDULERS: list[str] = list(SCHEDULER_CLASSES)

#: Schedulers that solve a flow-matching ODE (FLUX, SD3); they and the noise-prediction ones do not mix.
FLOW_SCHEDULERS = frozenset({"flow_euler"})

#: Config overrides applied when swapping in a scheduler. PNDM's Runge-Kutta warm-up breaks with few steps;
#: Stable Diffusion checkpoints ship it with the warm-up skipped, so do the same.
_SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {"pndm": {"skip_prk_steps": True}}


def compatible_schedulers(scheduler_class: str) -> list[str]:
    """Scheduler names that can replace a pipeline's own ``scheduler_class`` (by family: flow vs noise)."""
    is_flow = scheduler_class.startswith("FlowMatch")
    return [n for n in SCHEDULERS if (n in FLOW_SCHEDULERS) == is_flow]


DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@functools.cache
def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the pixels, for provenance (read once: they cannot change under
    a running process, and reading package metadata costs milliseconds per slice)."""
    versions: dict[str, str] = {}
    for name in ("torch", "diffusers", "transformers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def numerics(device: str) -> dict[str, Any]:
    """The process settings that decide how this device's float sums round, read at generation time.

    ``torch_threads`` splits a CPU matmul's sums differently per count (a CPU-backed worker runs with its
    share of the cores, FARM_WORKER_THREADS); ``cpu_capability`` is the SIMD kernel level torch dispatched to;
    on a GPU its name and the TF32/cuDNN flags decide the kernels."""
    out: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if device.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name(torch.device(device))
        out["cudnn_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        out["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    return out


@contextmanager
def numerics_as(recorded: dict[str, Any] | None) -> Iterator[None]:
    """Run the block with the recorded thread count and precision flags, then put this process's back.

    Keys the recording lacks are left as they are (an old recipe, or a CPU recipe replayed on a GPU)."""
    recorded = recorded or {}
    before = (
        torch.get_num_threads(),
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    try:
        if recorded.get("torch_threads"):
            torch.set_num_threads(int(recorded["torch_threads"]))
        if recorded.get("matmul_precision"):
            torch.set_float32_matmul_precision(str(recorded["matmul_precision"]))
        if "cudnn_tf32" in recorded:
            torch.backends.cudnn.allow_tf32 = bool(recorded["cudnn_tf32"])
        if "cudnn_benchmark" in recorded:
            torch.backends.cudnn.benchmark = bool(recorded["cudnn_benchmark"])
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.set_float32_matmul_precision(before[1])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before[2], before[3]


_hasher: tuple[int, ThreadPoolExecutor] | None = None


def hash_in_background(folder: str) -> Future[str | None]:
    """Start hashing a loaded model's files (``farm.ml.hashes.model_hash``) on this process's hashing thread.

    Why in the background: a real checkpoint's weights are gigabytes, and the first slice's forward pass does
    not need their hash, only its recipe does; hashlib and file reads release the GIL, so the hash is done
    beside that pass instead of before it. One thread per process (made after any fork), so two models never
    compete for the disk."""
    global _hasher
    if _hasher is None or _hasher[0] != os.getpid():
        _hasher = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="farm-model-hash"))
    return _hasher[1].submit(model_hash, folder)


def scheduler_options(scheduler: Any) -> dict[str, Any]:
    """The scheduler config values that name its A1111 sampler and schedule type (``farm.infotext``), as
    recorded in the recipe: those this scheduler has, JSON-ready."""
    config = getattr(scheduler, "config", {}) or {}
    out: dict[str, Any] = {}
    for key in SCHEDULER_OPTION_KEYS:
        value = config.get(key) if hasattr(config, "get") else None
        if isinstance(value, bool | int | float | str):
            out[key] = value
    return out


def _step_callback(on_step: Callable[[int, int], None], steps: int) -> Callable[..., dict[str, Any]]:
    """``on_step`` as diffusers' ``callback_on_step_end(pipe, i, t, callback_kwargs)``, which must hand the
    tensors it was given back unchanged."""

    def step_end(pipe: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(i + 1, int(getattr(pipe, "num_timesteps", 0) or steps))
        return callback_kwargs

    return step_end


def replay_device(recorded: str | None) -> str:
    """Where to replay by default: the recorded device when this host has it, else the CPU."""
    if recorded and recorded.startswith("cuda") and torch.cuda.is_available():
        index = int(recorded.partition(":")[2] or 0)
        if index < torch.cuda.device_count():
            return recorded
    return "cpu"


@dataclass
class Generator:
    """A loaded diffusers pipeline plus what is needed to describe how it made its images."""

    pipe: Any
    resolved: ResolvedModel
    device: str
    dtype: str
    scheduler_name: str | None = None
    options: dict[str, bool] = field(default_factory=dict)
    #: The last slice's seeds in order and the numerics it ran under (see ``numerics``), for its recipe.
    last_slice: dict[str, Any] = field(default_factory=dict)
    #: The model's hash (``farm.ml.hashes``), being computed since the load (``hash_in_background``).
    hashing: Future[str | None] | None = field(default=None, repr=False)
    _original_scheduler: Any = field(default=None, init=False, repr=False)

    @classmethod
    def load(
        cls,
        resolved: ResolvedModel,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
        attention_slicing: bool = False,
        cpu_offload: bool = False,
    ) -> Generator:
        """Load the pipeline once (a worker keeps it) through ``DiffusionPipeline.from_pretrained``.

        ``cpu_offload`` only means something on a CUDA device; on a CPU device it is ignored (and logged)
        so the same manifest runs on a CPU-mapped test farm.
        """
        from diffusers import DiffusionPipeline

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        # A folder, never a hub id: from_pretrained would look for the id in the working folder first.
        folder = model_folder(resolved)
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=DTYPES[dtype])
        pipe.set_progress_bar_config(disable=True)
        if attention_slicing and hasattr(pipe, "enable_attention_slicing"):
            pipe.enable_attention_slicing()
        offloaded = False
        if cpu_offload and device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=device)
            offloaded = True
        else:
            if cpu_offload:
                log.warning("cpu_offload ignored on device %s", device)
            pipe.to(device)
        options = {"attention_slicing": attention_slicing, "cpu_offload": offloaded}
        return cls(
            pipe=pipe,
            resolved=resolved,
            device=device,
            dtype=dtype,
            options=options,
            hashing=hash_in_background(folder),
        )

    def model_hash(self) -> str | None:
        """The loaded model's hash (A1111's "Model hash"; ``farm.ml.hashes``), waiting for it if it is still
        being computed. None when it could not be (the files went away, unreadable): the hash is provenance
        for other tools, so its failure is logged and the slice goes on without it."""
        if self.hashing is None:
            return None
        try:
            return self.hashing.result()
        except OSError as exc:
            log.warning("could not hash model %s: %s", self.resolved.ref, exc)
            return None

    def set_scheduler(self, name: str | None) -> None:
        """Swap the pipeline's scheduler by short name; None keeps the current one. No-op if unchanged.

        Raises ValueError naming the valid choices for an unknown name, or for a scheduler this pipeline's
        scheduler is not compatible with (e.g. DDIM on a flow-matching FLUX pipeline).
        """
        if name is None or name == self.scheduler_name:
            return
        if name not in SCHEDULER_CLASSES:
            raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
        import diffusers
        from diffusers.utils import is_scipy_available

        if self._original_scheduler is None:
            self._original_scheduler = self.pipe.scheduler
        original = self._original_scheduler
        valid = compatible_schedulers(type(original).__name__)
        if name not in valid:
            raise ValueError(
                f"scheduler {name!r} does not fit {type(self.pipe).__name__} "
                f"(its own scheduler is {type(original).__name__}); valid here: {', '.join(valid)}"
            )
        if name == "lms" and not is_scipy_available():
            raise ValueError("scheduler 'lms' needs the scipy package, which is not installed")
        target = getattr(diffusers, SCHEDULER_CLASSES[name])
        overrides = _SCHEDULER_OVERRIDES.get(name, {})
        if type(original) is target and not overrides:
            self.pipe.scheduler = original
        else:
            self.pipe.scheduler = target.from_config(original.config, **overrides)
        self.scheduler_name = name

    def generate(
        self,
        *,
        prompt: str,
        negative_prompt: str,
        seeds: list[int],
        steps: int,
        guidance: float,
        width: int,
        height: int,
        scheduler: str | None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """One image per seed in ONE batched forward pass; image i shows seeds[i] whatever the slice, and its
        pixels are reproduced bit for bit by the same slice under the same numerics (``last_slice``).

        ``on_step(step, steps)`` is called after each denoising step (diffusers' ``callback_on_step_end``;
        ``steps`` counts the pipeline's timesteps, which a second-order scheduler doubles). What it raises
        ends the pass there and propagates: that is how a cancelled batch's slice stops at its next step
        (farm.tasks.interrupt). A pipeline without ``callback_on_step_end`` runs without it."""
        if not seeds:
            return []
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.set_scheduler(scheduler)
        # CPU generators on every device: the initial noise for a seed is then the same on a CPU test farm and
        # on any GPU, which keeps seeds meaningful in provenance (diffusers moves the latents to the device).
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = {
            "prompt": [prompt] * len(seeds),
            "generator": generators,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "width": width,
            "height": height,
            "output_type": "pil",
        }
        if negative_prompt and guidance > 1.0:
            kwargs["negative_prompt"] = [negative_prompt] * len(seeds)
        if on_step is not None and self.takes_step_callback:
            kwargs["callback_on_step_end"] = _step_callback(on_step, steps)
        self.last_slice = {"slice_seeds": [int(s) for s in seeds], "numerics": numerics(self.device)}
        try:
            with torch.inference_mode():
                result = self.pipe(**kwargs)
        except BaseException:
            # Stopped mid-pass, the pipeline skipped its own end: offloaded models go back to the CPU as
            # they would have (a no-op without cpu_offload).
            free = getattr(self.pipe, "maybe_free_model_hooks", None)
            if free is not None:
                free()
            raise
        return list(result.images)

    @functools.cached_property
    def takes_step_callback(self) -> bool:
        """Whether the pipeline calls ``callback_on_step_end`` (every diffusers text-to-image pipeline the
        farm loads does; a custom one may not), read once from its signature."""
        try:
            return "callback_on_step_end" in inspect.signature(self.pipe.__call__).parameters
        except (TypeError, ValueError):
            return False

    def recipe(self) -> dict[str, Any]:
        """Everything needed to say how the last slice was made: model, fingerprint and hash, classes (with
        the scheduler options that name its A1111 sampler), options, versions, and that slice's seeds and
        numerics (a candidate's recipe adds its ``slice_position``)."""
        return {
            "model_ref": self.resolved.ref,
            "model_source": self.resolved.source,
            "model_path_or_id": self.resolved.path_or_id,
            "fingerprint": self.resolved.fingerprint,
            "model_hash": self.model_hash(),
            "pipeline_class": type(self.pipe).__name__,
            "scheduler_class": type(self.pipe.scheduler).__name__,
            "scheduler_options": scheduler_options(self.pipe.scheduler),
            "scheduler": self.scheduler_name,
            "device": self.device,
            "dtype": self.dtype,
            **self.options,
            "versions": dict(package_versions()),
            **self.last_slice,
        }
