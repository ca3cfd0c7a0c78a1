"""The batch manifest: a YAML file -> validated pydantic models -> a flat list of item plans.

Why this module is strict and self-contained: a manifest is the one thing a user writes by hand, and the farm
promises that a bad one costs nothing but a clear message. So everything is checked here, before a single row
is written or a single task is sent (the way diffusers' ``check_inputs`` fails before any GPU work): YAML
syntax, types, ranges, unknown keys, regexes, template variables, the model reference, item and candidate
totals. Every problem comes back at once as a ``ManifestError`` whose lines name the place in the user's own
terms (``items[3].size``) and say what would be valid. Nothing else escapes ``parse_manifest``.

It is pure Python on purpose (no torch, Flask, Celery or SQL): the web process, the CLI and the workers all
import it, and validating a manifest must stay cheap.

Shape of a manifest (see ``json_schema()`` for every field)::

    version: 1
    name: example
    model: tiny
    defaults: {candidates: 4, steps: 2, size: 64x64, seed: 1234}
    items:
      - "a red fox in the snow"
      - prompt: "a lighthouse at dusk"
        size: 64x96
      - template: "a {animal} in {style} style"
        vars: {animal: [cat, dog], style: [watercolor, pixel art]}

Anchors, aliases and merge keys (``<<: *common``) work, within limits that stop alias bombs.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import string
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from farm.assets import FOLDER_REFUSED, AssetPolicy, is_hub_id, looks_like_path
from farm.formats import CLIP_SCORE, FormatError, model_folder_problem, parse_pdq_blocklist
from farm.prompts import (
    MAX_FILE_BYTES as MAX_STYLES_FILE_BYTES,
)
from farm.prompts import (
    SHIPPED_STYLES,
    STYLE_PARAMS,
    Style,
    StyleError,
    WildcardError,
    WildcardSource,
    apply_styles,
    combinations,
    contributions,
    has_wildcards,
    parse_styles_csv,
    parse_styles_yaml,
    pick,
    read_text,
    wildcard_seed,
)

__all__ = [
    "MANIFEST_VERSION",
    "MAX_CANDIDATES",
    "MAX_CANDIDATES_PER_ITEM",
    "MAX_ITEMS",
    "MODEL_PRESETS",
    "PIPELINE_SCHEDULER",
    "SCHEDULERS",
    "FieldError",
    "ItemPlan",
    "Manifest",
    "ManifestError",
    "Planned",
    "expand",
    "json_schema",
    "parse_manifest",
    "parse_size",
    "plan_manifest",
    "stored_manifest",
    "summary",
]

# ----------------------------------------------------------------------------------------------------------
# Limits and vocabularies. One place, so the docs, the schema and the checks cannot drift apart.
# ----------------------------------------------------------------------------------------------------------

#: The only manifest format version this module reads.
MANIFEST_VERSION = 1

#: Most items a manifest may expand to (templates included).
MAX_ITEMS = 20_000
#: Most candidates a whole manifest may ask for.
MAX_CANDIDATES = 100_000
#: Most candidates one item may ask for (one item is ranked as a unit).
MAX_CANDIDATES_PER_ITEM = 64
#: Most items whose final prompts a dry run lists (its counts cover every item).
MAX_PROMPTS_SHOWN = 500
#: Longest prompt, negative prompt or template, in characters (also after template expansion).
MAX_PROMPT_CHARS = 4_000
#: Image side limits, in pixels; sides must be multiples of ``SIZE_MULTIPLE`` (the VAE downsamples by 8).
MIN_SIDE, MAX_SIDE, SIZE_MULTIPLE = 8, 2048, 8
#: Largest seed (seeds are 32-bit so every backend's generator accepts them).
MAX_SEED = 2**32 - 1

#: YAML guards. Nodes are counted *after* alias expansion, which is what a billion-laughs document inflates.
MAX_YAML_NODES = 1_000_000
MAX_YAML_DEPTH = 50
#: Largest PDQ blocklist file read at parse time.
MAX_PDQ_FILE_BYTES = 64 * 1024 * 1024
#: How many error lines ``str(ManifestError)`` shows (``.errors`` keeps them all).
MAX_ERROR_LINES = 50

#: Generator presets a manifest may name in ``model``. ``tiny`` and ``tiny-xl`` are random-weight models the
#: farm builds locally (tests, demo); the others map to real hub checkpoints in ``farm.ml.presets``.
MODEL_PRESETS: tuple[str, ...] = (
    "tiny", "tiny-xl", "random-sdxl", "sd-turbo", "sdxl-turbo", "sdxl-base", "flux-schnell",
)

#: Scheduler short names a manifest may use (``null`` keeps the pipeline's own). The generator maps each to a
#: diffusers class; ``flow_euler`` is for flow-matching pipelines (FLUX), the rest for noise-prediction ones.
SCHEDULERS: tuple[str, ...] = (
    "ddim",
    "ddpm",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2s_a",
    "lms",
    "pndm",
    "unipc",
    "deis",
    "lcm",
    "flow_euler",
)

#: Scheduler value that asks for the pipeline's own scheduler even where ``defaults.scheduler`` names another.
#: (An item's ``scheduler: null`` inherits, like every other override, so a dumped manifest reloads the same.)
PIPELINE_SCHEDULER = "default"

DTYPES: tuple[str, ...] = ("fp16", "bf16", "fp32")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$"
_SIZE_RE = re.compile(r"([0-9]{1,6})[xX]([0-9]{1,6})")
_SIZE_PATTERN = r"^[0-9]+[xX][0-9]+$"
_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/+-]{0,39}")

# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldError:
    """One problem in a manifest: where (``items[3].size``, ``(root)``) and what would be valid."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ManifestError(ValueError):
    """A manifest that cannot run, with every problem found, each at its path in the user's terms.

    Why a ValueError: callers that only know "bad input" can catch ValueError; the web layer and the CLI read
    ``.errors`` to show one line per problem next to the field that caused it.
    """

    def __init__(self, errors: Iterable[FieldError]) -> None:
        self.errors: list[FieldError] = list(errors) or [FieldError("(root)", "invalid manifest")]
        super().__init__(self._render())

    @classmethod
    def at(cls, path: str, message: str) -> ManifestError:
        """A ManifestError with a single problem."""
        return cls([FieldError(path, message)])

    def _render(self) -> str:
        lines = [str(e) for e in self.errors[:MAX_ERROR_LINES]]
        if len(self.errors) > MAX_ERROR_LINES:
            lines.append(f"... and {len(self.errors) - MAX_ERROR_LINES} more problems")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the structured errors (the default would call __init__ with the rendered string).
        return (type(self), (self.errors,))


# ----------------------------------------------------------------------------------------------------------
# Field validators shared by several models. They raise ValueError with the user-facing message.
# ----------------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> ``(640, 480)``, or ValueError saying what a valid size looks like."""
    hint = (
        f"must be WxH with both sides multiples of {SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, "
        "e.g. 512x512"
    )
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{hint}; got {_describe(text)}")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"{hint}; {side} is out of range")
    for side in (width, height):
        if side % SIZE_MULTIPLE:
            lower = max(MIN_SIDE, side - side % SIZE_MULTIPLE)
            higher = min(MAX_SIDE, lower + SIZE_MULTIPLE)
            raise ValueError(f"{hint}; {side} is not a multiple of {SIZE_MULTIPLE} (try {lower} or {higher})")
    return width, height


def _check_size(text: str) -> str:
    width, height = parse_size(text)
    return f"{width}x{height}"


def _check_name(text: str) -> str:
    if _NAME_RE.fullmatch(text) is None:
        raise ValueError(
            "must be 1 to 80 letters, digits, '.', '_' or '-', starting with a letter or digit "
            f"(it names files and folders); got {_describe(text)}"
        )
    return text


def _check_text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    return text


def _check_optional_text(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    return text


def _check_scheduler(name: str) -> str:
    if name != PIPELINE_SCHEDULER and name not in SCHEDULERS:
        close = difflib.get_close_matches(name, SCHEDULERS, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown scheduler {_describe(name)}; {guess}use one of {', '.join(SCHEDULERS)}, "
            f"or {PIPELINE_SCHEDULER!r} for the pipeline's own"
        )
    return name


def _check_var_name(name: str) -> str:
    if _VAR_RE.fullmatch(name) is None:
        raise ValueError(
            f"template variable names must be identifiers (letters, digits, '_', not starting with a digit); "
            f"got {_describe(name)}"
        )
    return name


def _var_value_to_text(value: Any) -> Any:
    """Let ``vars: {n: [1, 2]}`` mean the texts "1" and "2"; booleans stay errors (YAML's yes/no trap)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _check_tag(text: str) -> str:
    if _TAG_RE.fullmatch(text) is None:
        raise ValueError(
            "tags are 1 to 40 letters, digits, spaces or ._:/+- starting with a letter or digit; "
            f"got {_describe(text)}"
        )
    return text


def _check_term(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    return text.strip()


def _check_pattern(text: str) -> str:
    try:
        re.compile(text)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return text


def _check_plain_ref(text: str) -> str:
    """Validator and scorer references: non-blank, one line. ``farm.ml`` resolves them at run time."""
    if not text.strip() or any(c in text for c in "\x00\r\n"):
        raise ValueError("must be a model name, hub id or folder path on one line")
    return text


# ----------------------------------------------------------------------------------------------------------
# Field types. Constraints live in the type, so defaults and per-item overrides share them (and the schema).
# ----------------------------------------------------------------------------------------------------------

CandidateCount = Annotated[int, Field(ge=1, le=MAX_CANDIDATES_PER_ITEM)]
StepCount = Annotated[int, Field(ge=1, le=150)]
Guidance = Annotated[float, Field(ge=0.0, le=30.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Size = Annotated[
    str,
    AfterValidator(_check_size),
    WithJsonSchema({"type": "string", "pattern": _SIZE_PATTERN, "examples": ["512x512", "64x96"]}),
]
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_check_text)]
NegativeText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_check_optional_text)]
SchedulerName = Annotated[
    str,
    AfterValidator(_check_scheduler),
    WithJsonSchema({"type": "string", "enum": [PIPELINE_SCHEDULER, *SCHEDULERS]}),
]
Attribute = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_check_text)]
VarName = Annotated[str, AfterValidator(_check_var_name)]
VarValue = Annotated[str, BeforeValidator(_var_value_to_text), Field(min_length=1, max_length=500)]
TagText = Annotated[str, AfterValidator(_check_tag)]
Distance = Annotated[int, Field(ge=0, le=256)]
Threshold = Annotated[float, Field(ge=0.0, le=1.0)]
Similarity = Annotated[float, Field(ge=-1.0, le=1.0)]
Weight = Annotated[float, Field(ge=0.0, le=100.0)]
BlockedTerm = Annotated[str, Field(max_length=200), AfterValidator(_check_term)]
BlockedPattern = Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_check_pattern)]
PlainModelRef = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_check_plain_ref)]
StyleName = Annotated[str, Field(min_length=1, max_length=80), AfterValidator(_check_text)]


def _one_or_many(value: Any) -> Any:
    """Let ``style: cinematic`` mean the list ``[cinematic]`` (one style is the common case)."""
    return [value] if isinstance(value, str) else value


StyleList = Annotated[
    list[StyleName],
    BeforeValidator(_one_or_many),
    Field(max_length=10),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": 80},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": 80},
                    "maxItems": 10,
                },
            ]
        }
    ),
]
#: How wildcards and {a|b} variants expand: one seeded pick per item, or one item per combination.
WILDCARD_MODES: tuple[str, ...] = ("random", "combinatorial")
WildcardMode = Literal["random", "combinatorial"]


class _Strict(BaseModel):
    """Base of every manifest model: unknown keys are errors, and YAML's own types are taken as they are.

    Why strict: YAML already types its scalars, so ``candidates: "4"`` or ``steps: 2.5`` is a mistake worth
    reporting rather than silently coercing. Floats accept integers (``guidance: 5``).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys_when_stored(cls, data: Any, info: ValidationInfo) -> Any:
        """Stored settings (``stored_manifest``) keep only the fields this version knows: a batch written by a
        newer version, with a field added since, is read by the workers not yet upgraded during a rolling
        restart, and must not fail there. A manifest being submitted still gets every unknown key refused."""
        if not (_stored(info) and isinstance(data, dict)):
            return data
        return {key: value for key, value in data.items() if key in cls.model_fields}


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


class MemoryOptions(_Strict):
    """Trade speed for memory on small GPUs."""

    attention_slicing: bool = Field(
        False, description="Compute attention in slices: less peak memory, somewhat slower."
    )
    cpu_offload: bool = Field(
        False, description="Keep model parts on the CPU until needed: fits big models on small GPUs, slower."
    )


class GenerationDefaults(_Strict):
    """Generation parameters every item inherits unless it overrides them."""

    candidates: CandidateCount = Field(
        4, description=f"Images generated per item (1..{MAX_CANDIDATES_PER_ITEM}); the best are kept."
    )
    steps: StepCount = Field(25, description="Denoising steps (1..150). Turbo models want 1..4.")
    guidance: Guidance = Field(
        7.5, description="Classifier-free guidance scale (0..30); 0 turns guidance off (turbo models)."
    )
    size: Size = Field(
        "512x512",
        description=(
            f"Image size as WxH, each side a multiple of {SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}."
        ),
    )
    negative_prompt: NegativeText = Field("", description="What the images should not show; empty for none.")
    seed: Seed = Field(
        0,
        description=(
            f"Base seed (0..{MAX_SEED}). Items without their own seed get per-candidate seeds derived "
            "deterministically from it, the item's index and the candidate's number."
        ),
    )
    scheduler: SchedulerName | None = Field(
        None,
        description=(
            f"Sampler: null (or {PIPELINE_SCHEDULER!r}) keeps the pipeline's own, "
            f"else one of {', '.join(SCHEDULERS)}."
        ),
    )
    style: StyleList = Field(
        default_factory=list,
        description=(
            "Style preset name, or a list applied in order: each adds its prompt (at its {prompt} "
            "placeholder, else after a comma), its negative prompt and its parameters (between these "
            "defaults and an item's own fields). From the manifest's styles, $FARM_HOME/styles.yaml or "
            "styles.csv, or the shipped farm/styles.yaml, in that order of precedence."
        ),
    )
    wildcards: WildcardMode = Field(
        "random",
        description=(
            "How {a|b|c} variants and __name__ word files expand: 'random' picks one per item, seeded by "
            "the item's seed (or defaults.seed and its index), the same on every run; 'combinatorial' makes "
            "one item per combination (counted against the item and candidate limits)."
        ),
    )


class _ItemOverrides(_Strict):
    """Per-item overrides of ``defaults``; a field left out (or null) inherits the default."""

    candidates: CandidateCount | None = Field(
        None, description="Overrides defaults.candidates for this item."
    )
    steps: StepCount | None = Field(None, description="Overrides defaults.steps for this item.")
    guidance: Guidance | None = Field(None, description="Overrides defaults.guidance for this item.")
    size: Size | None = Field(None, description="Overrides defaults.size for this item, e.g. 64x96.")
    negative_prompt: NegativeText | None = Field(
        None, description="Overrides defaults.negative_prompt for this item."
    )
    seed: Seed | None = Field(
        None,
        description=(
            "Explicit seed: candidate k gets seed + k (wrapping at 2**32), the same for every item a "
            "template expands to. Left out, seeds are derived from defaults.seed."
        ),
    )
    scheduler: SchedulerName | None = Field(
        None,
        description=f"Overrides defaults.scheduler; {PIPELINE_SCHEDULER!r} means the pipeline's own.",
    )
    required_attributes: list[Attribute] = Field(
        default_factory=list,
        max_length=20,
        description="Phrases the validator must find in every accepted image, e.g. 'lighthouse' (literal).",
    )
    style: StyleList | None = Field(
        None, description="Replaces defaults.style for this item (a name or a list; [] for none)."
    )
    wildcards: WildcardMode | None = Field(None, description="Overrides defaults.wildcards for this item.")


class StyleDef(_Strict):
    """A style preset written in the manifest's ``styles:`` section or a styles.yaml file."""

    prompt: NegativeText = Field(
        "", description="Style text; {prompt} marks where the item's prompt goes, else it is appended."
    )
    negative_prompt: NegativeText = Field(
        "", description="Combined with the item's negative prompt like the prompt ({prompt} or appended)."
    )
    candidates: CandidateCount | None = Field(None, description="Default candidates for items in this style.")
    steps: StepCount | None = Field(None, description="Default steps for items in this style.")
    guidance: Guidance | None = Field(None, description="Default guidance for items in this style.")
    size: Size | None = Field(None, description="Default size for items in this style.")
    scheduler: SchedulerName | None = Field(None, description="Default scheduler for items in this style.")

    def to_style(self, name: str, origin: str) -> Style:
        params = {key: getattr(self, key) for key in STYLE_PARAMS if getattr(self, key) is not None}
        return Style(name, self.prompt, self.negative_prompt, params, origin)


class PromptItem(_ItemOverrides):
    """One prompt with optional overrides."""

    prompt: PromptText = Field(description="The text to generate images of.")


class TemplateItem(_ItemOverrides):
    """A prompt template expanded over every combination of its variables' values."""

    template: PromptText = Field(
        description=(
            "Prompt with {name} placeholders, one per key of vars; {{ and }} give literal braces. "
            "Positional {}, {0}, format specs and attribute access are not allowed."
        )
    )
    vars: dict[VarName, Annotated[list[VarValue], Field(min_length=1, max_length=1000)]] = Field(
        min_length=1,
        max_length=10,
        description=(
            "Variable -> list of values. Items are the cartesian product, in the order the variables are "
            "given, the last varying fastest. Overrides on this entry apply to every expanded item."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _not_both(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prompt" in data:
            raise PydanticCustomError(
                "prompt_and_template", "an item has either 'prompt' or 'template' (with 'vars'), not both"
            )
        return data


def _item_kind(value: Any) -> str | None:
    """Pick the item model by shape, so errors point at one model instead of every union member."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "template" if "template" in value else "prompt"
    if isinstance(value, PromptItem):
        return "prompt"
    if isinstance(value, TemplateItem):
        return "template"
    return None


ItemEntry = Annotated[
    Union[  # noqa: UP007 - tagged members read better spelled out
        Annotated[PromptText, Tag("text")],
        Annotated[PromptItem, Tag("prompt")],
        Annotated[TemplateItem, Tag("template")],
    ],
    Discriminator(
        _item_kind,
        custom_error_type="item_kind",
        custom_error_message="expected a prompt string, or a mapping with 'prompt' or 'template'",
    ),
]

#: Union tag -> what it selects; used to read error locations back into models.
_ITEM_TAGS: dict[str, Any] = {"text": str, "prompt": PromptItem, "template": TemplateItem}


class NsfwDetector(_Strict):
    """Region detector (NudeNet): rejects an image if any exposed-body box scores at least the threshold."""

    enabled: bool = Field(True, description="Run the detector.")
    threshold: Threshold = Field(0.5, description="Box score (0..1) at or above which an image is rejected.")


class NsfwClassifier(_Strict):
    """Whole-image classifier (OpenNSFW): rejects an image whose NSFW probability reaches the threshold."""

    enabled: bool = Field(True, description="Run the classifier.")
    threshold: Threshold = Field(0.8, description="NSFW probability (0..1) at or above which to reject.")


class Moderation(_Strict):
    """What must never come out of the farm: blocked prompts and unsafe or blocklisted images."""

    blocked_terms: list[BlockedTerm] = Field(
        default_factory=list,
        max_length=1000,
        description="Words or phrases, matched case-insensitively as whole words in prompts.",
    )
    blocked_patterns: list[BlockedPattern] = Field(
        default_factory=list,
        max_length=200,
        description="Python regexes; a prompt matching any of them (case-insensitively) is refused.",
    )
    pdq_blocklist: str | None = Field(
        None,
        max_length=4096,
        description=(
            "Text file of PDQ hashes: per line 64 hex digits, alone or followed by a comma, tab or space "
            "and a label; blank lines and lines starting with # are skipped. From the CLI, relative paths "
            "resolve against the manifest's folder and may not climb out of it, absolute paths are taken "
            "as given. An uploaded manifest names a file uploaded with it (by its file name) or one inside "
            "a folder listed in FARM_ASSET_DIRS. Read and checked at parse time, stored resolved."
        ),
    )
    pdq_max_distance: Distance = Field(
        31, description="Hamming distance (0..256) at or below which an image matches a blocklisted hash."
    )
    nsfw_detector: NsfwDetector = Field(default_factory=NsfwDetector, description="NudeNet region detector.")
    nsfw_classifier: NsfwClassifier = Field(
        default_factory=NsfwClassifier, description="OpenNSFW whole-image classifier."
    )
    near_duplicate_distance: Distance = Field(
        20,
        description=(
            "PDQ distance (0..256) at or below which two candidates of an item are flagged (not rejected) "
            "as near duplicates."
        ),
    )

    @field_validator("pdq_blocklist")
    @classmethod
    def _resolve_blocklist(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or _stored(info):
            return value
        return _check_pdq_file(value, _base_dir(info), _assets(info))


class Validation(_Strict):
    """Does the image show what was asked? A text-image model scores prompt and attribute alignment."""

    model: PlainModelRef = Field("tiny-clip", description="Text-image model: a preset, hub id or folder.")
    min_alignment: Similarity | None = Field(
        None, description="Reject candidates whose prompt alignment (-1..1) is below this; null rejects none."
    )
    attribute_threshold: Similarity = Field(
        0.0, description="Similarity (-1..1) each required attribute must reach for the candidate to pass."
    )

    @field_validator("model")
    @classmethod
    def _check_model_path(cls, value: str, info: ValidationInfo) -> str:
        if _stored(info):
            return value
        ref = _check_plain_model_path(value, _base_dir(info), _assets(info), "validator")
        return _checked_ref(ref, "validator", info)


class ScoringWeights(_Strict):
    """How the final score mixes preference and alignment."""

    preference: Weight = Field(1.0, description="Weight of the aesthetic / preference score (>= 0).")
    alignment: Weight = Field(0.5, description="Weight of the prompt alignment score (>= 0).")

    @model_validator(mode="after")
    def _not_all_zero(self) -> ScoringWeights:
        if self.preference == 0 and self.alignment == 0:
            raise ValueError("preference and alignment cannot both be 0; nothing would rank the candidates")
        return self


class Scoring(_Strict):
    """Ranking of the accepted candidates."""

    model: PlainModelRef = Field(
        "tiny-aesthetic", description="Preference model: a preset (tiny-aesthetic, ...), hub id or folder."
    )
    weights: ScoringWeights = Field(default_factory=ScoringWeights, description="Score = weighted sum.")

    @field_validator("model")
    @classmethod
    def _check_model_path(cls, value: str, info: ValidationInfo) -> str:
        if _stored(info):
            return value
        ref = _check_plain_model_path(value, _base_dir(info), _assets(info), "scorer")
        return _checked_ref(ref, "scorer", info)


class Selection(_Strict):
    """How many winners each item keeps, and how hard the farm tries to have enough accepted candidates."""

    winners: int = Field(
        1, ge=1, le=MAX_CANDIDATES_PER_ITEM, description="Winners per item (1..the item's candidates)."
    )
    min_accepted: int = Field(
        0,
        ge=0,
        le=MAX_CANDIDATES_PER_ITEM,
        description="If fewer candidates of an item pass moderation and validation, generate more (top-up).",
    )
    max_topup_rounds: int = Field(2, ge=0, le=5, description="Most top-up rounds per item (0..5).")


class Manifest(_Strict):
    """A batch: what to generate, with which model, and how to moderate, validate, score and select."""

    model_config = ConfigDict(
        title="farm batch manifest",
        json_schema_extra={"$id": f"urn:farm:batch-manifest:v{MANIFEST_VERSION}"},
    )

    version: Literal[1] = Field(1, description="Manifest format version; only 1 exists.")
    name: Annotated[str, AfterValidator(_check_name)] = Field(
        description="Batch name, used in file names: 1..80 of A-Z a-z 0-9 . _ -, starting alphanumeric.",
        json_schema_extra={"pattern": _NAME_PATTERN},
    )
    model: str = Field(
        "tiny",
        min_length=1,
        max_length=1000,
        description=(
            f"Generator: a preset ({', '.join(MODEL_PRESETS)}), a hub id owner/name, or a local diffusers "
            "folder (with model_index.json; relative to the manifest's folder)."
        ),
    )
    dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp32", description="Weights precision: fp32 runs everywhere; fp16/bf16 halve GPU memory."
    )
    memory: MemoryOptions = Field(default_factory=MemoryOptions, description="Memory savers.")
    priority: int = Field(5, ge=0, le=9, description="0 (background) .. 9 (most urgent).")
    tags: list[TagText] = Field(
        default_factory=list, max_length=32, description="Short labels to find the batch by: [demo, fox]."
    )
    defaults: GenerationDefaults = Field(
        default_factory=GenerationDefaults, description="Generation parameters each item inherits."
    )
    items: list[ItemEntry] = Field(
        min_length=1,
        max_length=MAX_ITEMS,
        description=(
            "What to generate: prompt strings, {prompt: ..., <overrides>} mappings, or "
            "{template: ..., vars: {...}, <overrides>} mappings. "
            f"At most {MAX_ITEMS} items and {MAX_CANDIDATES} candidates after expansion."
        ),
    )
    styles: dict[StyleName, StyleDef] = Field(
        default_factory=dict,
        max_length=200,
        description="Style presets of this manifest, by name; they win over every other registry's.",
    )
    styles_csv: str | None = Field(
        None,
        max_length=4096,
        description=(
            "An AUTOMATIC1111 styles.csv (columns name, prompt, negative_prompt) whose styles this manifest "
            "may use, relative to the manifest's folder (an uploaded manifest: a file uploaded with it). "
            "Its styles win over $FARM_HOME's and the shipped ones; the styles section wins over it."
        ),
    )
    moderation: Moderation = Field(default_factory=Moderation, description="Safety checks.")
    validation: Validation = Field(default_factory=Validation, description="Prompt alignment checks.")
    scoring: Scoring = Field(default_factory=Scoring, description="Ranking.")
    selection: Selection = Field(default_factory=Selection, description="Winners and top-up.")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str, info: ValidationInfo) -> str:
        if _stored(info):
            return value
        policy = _assets(info)
        ref = _resolve_model_ref(value, _base_dir(info), policy)
        # An uploaded manifest's hub id goes to no check that could look at the disk: its folders, all inside
        # FARM_ASSET_DIRS, are absolute paths by now.
        if policy.trusted or not is_hub_id(ref):
            _run_check(info, "check_model", ref)
        return ref

    @field_validator("styles_csv")
    @classmethod
    def _read_styles_csv(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Read and parse the CSV now, through the asset policy; ``_plan`` takes its styles from context."""
        if value is None or _stored(info):
            return value
        asset = _assets(info).read_file(value, base_dir=_base_dir(info), max_bytes=MAX_STYLES_FILE_BYTES)
        try:
            text = asset.data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValueError(f"{_clip(value)} is not UTF-8 text; save it as UTF-8") from None
        styles = parse_styles_csv(text, _clip(value))
        if isinstance(info.context, dict):
            info.context["csv_styles"] = styles
        return asset.ref


# ----------------------------------------------------------------------------------------------------------
# Paths: model folders and the PDQ blocklist
# ----------------------------------------------------------------------------------------------------------


def _stored(info: ValidationInfo) -> bool:
    """Whether this is a read of settings stored at submit (``stored_manifest``): each validator that looks
    at files, folders, the asset policy or a plugged-in model check returns the value as stored instead."""
    return isinstance(info.context, dict) and info.context.get("stored") is True


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context if isinstance(info.context, dict) else {}
    base = context.get("base_dir")
    return Path(base) if base is not None else None


def _assets(info: ValidationInfo) -> AssetPolicy:
    """The policy deciding which files this manifest may name; the operator's when none was given."""
    context = info.context if isinstance(info.context, dict) else {}
    policy = context.get("assets")
    return policy if isinstance(policy, AssetPolicy) else AssetPolicy.operator()


def _resolve_model_ref(value: str, base_dir: Path | None, policy: AssetPolicy) -> str:
    """Preset name -> itself; existing folder -> its absolute path; ``owner/name`` -> itself; else ValueError.

    Why absolute: workers and ``farm.ml`` resolve paths against their own working directory, not the
    manifest's folder. A folder wins over a hub id of the same spelling because it is what the user can see.
    Folders are looked for where ``policy`` allows: anywhere for the operator, only inside FARM_ASSET_DIRS
    for an uploaded manifest, whose other paths all get the one ``FOLDER_REFUSED`` message.
    """
    if value in MODEL_PRESETS:
        return value
    if any(c in value for c in "\x00\r\n"):
        raise ValueError("must not contain NUL or line breaks")
    folder = _model_folder(
        value, base_dir, policy, "generator", if_file="a local model must be a diffusers pipeline folder"
    )
    if folder is not None:
        return folder
    if is_hub_id(value):
        return value
    if looks_like_path(value):
        if not policy.trusted:
            raise ValueError(FOLDER_REFUSED)
        raise ValueError(f"folder {_clip(value)} does not exist")
    close = difflib.get_close_matches(value, MODEL_PRESETS, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"unknown model {_describe(value)}; {guess}use a preset ({', '.join(MODEL_PRESETS)}), a hub id like "
        "owner/name, or a local diffusers folder"
    )


def _check_plain_model_path(value: str, base_dir: Path | None, policy: AssetPolicy, kind: str) -> str:
    """A validator or scorer reference under ``policy``, a folder in it recorded as its absolute path.

    The operator's: a relative path (``models/clip``, ``./clip``) that names a folder in the manifest's
    folder, else in the current one, is recorded absolute (workers look up no relative ``owner/name`` in
    their own working folder); anything else is kept as written for ``farm.ml`` to resolve on the worker.
    An uploaded manifest's must be a preset or hub id, or a folder inside FARM_ASSET_DIRS; any other path
    gets ``FOLDER_REFUSED``. ``clip-score:<validator>`` is checked as its validator.
    """
    prefix = ""
    if kind == "scorer" and value.startswith(CLIP_SCORE + ":"):
        prefix, value, kind = CLIP_SCORE + ":", value[len(CLIP_SCORE) + 1 :], "validator"
    if policy.trusted:
        if "/" in value or value.startswith((".", "~")):
            for base in dict.fromkeys((base_dir, None)):
                found = policy.find_folder(value, base_dir=base)
                if found is not None and found.is_dir():
                    return prefix + str(found)
        return prefix + value
    folder = _model_folder(value, base_dir, policy, kind, if_file=f"a local {kind} model must be a folder")
    if folder is not None:
        return prefix + folder
    if looks_like_path(value) or ":" in value:
        raise ValueError(FOLDER_REFUSED)
    return prefix + value


def _model_folder(
    value: str, base_dir: Path | None, policy: AssetPolicy, kind: str, *, if_file: str
) -> str | None:
    """The absolute path of the ``kind`` model folder ``value`` names where ``policy`` allows, or None where
    it names nothing there; ValueError for a file (``if_file`` says what it should be) or for a folder that
    is no ``kind`` model."""
    found = policy.find_folder(value, base_dir=base_dir)
    if found is None:
        return None
    if not found.is_dir():
        raise ValueError(f"{_clip(value)} is a file; {if_file}")
    problem = model_folder_problem(found, kind)
    if problem:
        raise ValueError(f"folder {_clip(value)} {problem}")
    return str(found)


def _checked_ref(ref: str, kind: str, info: ValidationInfo) -> str:
    """``ref`` once the plugged-in ``check_ref`` (the ML layer's) has no objection to it as a ``kind``."""
    _run_check(info, "check_ref", ref, kind)
    return ref


def _run_check(info: ValidationInfo, key: str, *args: str) -> None:
    """Call the plugged-in check the validation context holds under ``key`` (``check_model``, ``check_ref``),
    if any, with ``args``; ValueError with its message when it objects, or when it raises."""
    hook = info.context.get(key) if isinstance(info.context, dict) else None
    if hook is None:
        return
    try:
        problem = hook(*args)
    except Exception as exc:  # noqa: BLE001 - a plugged-in check must not crash parsing
        problem = f"model check failed: {type(exc).__name__}: {exc}"
    if problem:
        raise ValueError(str(problem))


def _check_pdq_file(value: str, base_dir: Path | None, policy: AssetPolicy) -> str:
    """Find and read the blocklist once, with the parser workers use, so a typo in its path or a malformed
    line fails before dispatch instead of failing every candidate at moderate.

    Which paths may be read is ``policy``'s to say (see farm.assets). Line contents are never echoed.
    """
    if not value.strip():
        raise ValueError("path must not be blank; use null for no blocklist")
    asset = policy.read_file(value, base_dir=base_dir, max_bytes=MAX_PDQ_FILE_BYTES)
    try:
        parse_pdq_blocklist(asset.data)
    except FormatError as exc:
        where = f", line {exc.line}" if exc.line is not None else ""
        raise ValueError(f"PDQ blocklist {_clip(value)}{where}: {exc.reason}") from None
    return asset.ref


# ----------------------------------------------------------------------------------------------------------
# YAML loading with guards
# ----------------------------------------------------------------------------------------------------------

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Guards:
    """Loader mixin that measures the document as it would be after alias expansion, and refuses it early.

    Why: PyYAML shares aliased nodes, so a billion-laughs document loads in little memory, but anything that
    walks the result (validation, JSON) walks every expansion. Each composed node records its expanded size
    and depth; since an anchor is complete before any alias to it, the totals are known without expanding.
    Also: duplicate keys are errors (PyYAML keeps the last silently), dates stay strings, and a bad explicit
    tag value (``!!int x``) is a YAML error with a position rather than a stray ValueError.
    """

    anchors: dict[str, Any]
    check_event: Callable[..., bool]
    peek_event: Callable[[], Any]

    def _init_guards(self, max_nodes: int, max_depth: int) -> None:
        self._max_nodes = max_nodes
        self._max_depth = max_depth
        self._depth = 0
        self._measured: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._measured:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} refers to a node that contains it", event.start_mark
                )
            return super().compose_node(parent, index)  # type: ignore[misc]
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {self._max_depth} levels", self.peek_event().start_mark
                )
            node = super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self._depth -= 1
        self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.ScalarNode):
            size, depth = 1, 1
        else:
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    children += (key, value)
            else:
                children = list(node.value)
            sizes = [self._measured[id(child)] for child in children]
            size = 1 + sum(s for s, _ in sizes)
            depth = 1 + max((d for _, d in sizes), default=0)
        if size > self._max_nodes:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"the document expands to more than {self._max_nodes} values through aliases (alias bomb?)",
                node.start_mark,
            )
        if depth > self._max_depth:
            raise yaml.composer.ComposerError(
                None, None, f"aliases nest the document deeper than {self._max_depth} levels", node.start_mark
            )
        self._measured[id(node)] = (size, depth)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_describe(key_node.value)}", key_node.start_mark
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc]

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)  # type: ignore[misc]
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value: {exc}", node.start_mark
            ) from None


# Dates are plain strings in a manifest (a tag "2024-05-01" must not become a datetime.date).
_Guards.yaml_implicit_resolvers = {  # type: ignore[attr-defined]
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _GuardedLoader(_Guards, yaml.SafeLoader):
    """The guards over PyYAML's pure-Python parser: always available."""

    def __init__(
        self, stream: str, *, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_YAML_DEPTH
    ) -> None:
        yaml.SafeLoader.__init__(self, stream)
        self._init_guards(max_nodes, max_depth)


_LOADERS: list[type[Any]] = [_GuardedLoader]

if getattr(yaml, "__with_libyaml__", False):

    class _GuardedCLoader(
        _Guards,
        yaml.composer.Composer,
        yaml.cyaml.CParser,
        yaml.constructor.SafeConstructor,
        yaml.resolver.Resolver,
    ):
        """The same guards over libyaml's parser (about 15x faster at tokens and events).

        Only the events come from C: composing stays in Python (``Composer`` precedes ``CParser``), so the
        guards see every node, and a deeply nested document cannot recurse in C.
        """

        def __init__(
            self, stream: str, *, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_YAML_DEPTH
        ) -> None:
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            self._init_guards(max_nodes, max_depth)

    _LOADERS.insert(0, _GuardedCLoader)


def _yaml_error_message(exc: yaml.YAMLError, text: str) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "malformed document"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        extra = f" ({exc.context})" if exc.problem and exc.context else ""
        return f"invalid YAML{where}: {what}{extra}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return (
            f"invalid YAML at line {line}, column {column}: control character U+{exc.character:04X} "
            "is not allowed"
        )
    return "invalid YAML: " + " ".join(str(exc).split())


def _load_yaml(text: str) -> Any:
    loader: Any = None
    try:
        loader = _LOADERS[0](text)  # the reader checks for control characters here already
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ManifestError.at("(root)", _yaml_error_message(exc, text)) from None
    except RecursionError:
        raise ManifestError.at("(root)", "invalid YAML: the document nests too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


# ----------------------------------------------------------------------------------------------------------
# Turning pydantic errors into paths and sentences
# ----------------------------------------------------------------------------------------------------------


def _clip(text: str, limit: int = 120) -> str:
    """Shorten user text echoed in a message, so one bad value cannot flood the error list."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    """How a value reads in a message: texts quoted, numbers as written, containers by kind."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:56] + "...'"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _path(loc: tuple[Any, ...]) -> str:
    """``('items', 3, 'prompt', 'size')`` -> ``items[3].size`` (union tags dropped)."""
    parts = list(loc)
    if len(parts) >= 3 and parts[0] == "items" and isinstance(parts[1], int) and parts[2] in _ITEM_TAGS:
        del parts[2]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """Strip Annotated and Optional layers off a type, keeping the constraint metadata met on the way."""
    meta: list[Any] = []
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp, *extra = get_args(tp)
            meta.extend(extra)
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp, meta


def _locate(loc: tuple[Any, ...]) -> tuple[Any, list[Any]]:
    """Follow an error location through the models: the type found there and its constraint metadata."""
    tp: Any = Manifest
    meta: list[Any] = []
    for part in loc:
        tp, _ = _unwrap(tp)
        origin = get_origin(tp)
        if origin in (Union, types.UnionType) and part in _ITEM_TAGS:
            tp, meta = _ITEM_TAGS[part], []
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            field = tp.model_fields[part]
            tp, meta = field.annotation, list(field.metadata)
        elif origin is list and isinstance(part, int):
            tp, meta = get_args(tp)[0], []
        elif origin is dict:
            tp, meta = get_args(tp)[1], []
        else:
            return None, []
    tp, extra = _unwrap(tp)
    return tp, meta + extra


def _bounds(loc: tuple[Any, ...]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    _, meta = _locate(loc)
    flat: list[Any] = []
    for item in meta:
        flat.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    for item in flat:
        for name in ("ge", "gt", "le", "lt"):
            if hasattr(item, name):
                found[name] = getattr(item, name)
    return found


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _range_message(loc: tuple[Any, ...], ctx: dict[str, Any], got: str) -> str:
    bounds = {**_bounds(loc), **ctx}
    if "ge" in bounds and "le" in bounds:
        return f"must be between {_num(bounds['ge'])} and {_num(bounds['le'])}, got {got}"
    words = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
    limits = [f"{words[key]} {_num(bounds[key])}" for key in words if key in bounds]
    return f"must be {' and '.join(limits) or 'in range'}, got {got}"


_SECTIONS = ("defaults", "memory", "moderation", "validation", "scoring", "selection")


def _unknown_field_message(loc: tuple[Any, ...]) -> str:
    key = loc[-1] if loc else ""
    model, _ = _locate(loc[:-1])
    fields = list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
    name = str(key)
    shown = _describe(name)
    best: tuple[float, str, str | None] = (0.0, "", None)  # (similarity, field, section it lives in)
    for field in fields:
        ratio = difflib.SequenceMatcher(None, name, field).ratio()
        if ratio > best[0]:
            best = (ratio, field, None)
    if len(loc) == 1:
        # A section's field written at the top level (``steps: 2`` instead of under defaults) is common.
        for section in _SECTIONS:
            section_model, _ = _locate((section,))
            if name in section_model.model_fields:
                return f"unknown field {shown} at the top level; it belongs under '{section}'"
            for field in section_model.model_fields:
                ratio = difflib.SequenceMatcher(None, name, field).ratio()
                if ratio > best[0]:
                    best = (ratio, field, section)
    if best[0] >= 0.6:
        where = f" under '{best[2]}'" if best[2] else ""
        return f"unknown field {shown}; did you mean {best[1]!r}{where}?"
    if fields:
        return f"unknown field {shown}; expected one of {', '.join(fields)}"
    return f"unknown field {shown}"


_STRING_HINT = {
    bool: " (YAML reads unquoted yes/no/on/off/true/false as booleans; put the text in quotes)",
    int: " (put it in quotes to make it text)",
    float: " (put it in quotes to make it text)",
}


def _message(error: Any) -> str:
    """One pydantic error -> a sentence that says what would be valid."""
    kind: str = error["type"]
    loc: tuple[Any, ...] = tuple(error.get("loc", ()))
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    got = _describe(value)
    if kind == "missing":
        if loc and loc[-1] == "prompt" and len(loc) >= 3 and loc[0] == "items":
            return "each mapping item needs a 'prompt' (or a 'template' with 'vars')"
        return "this field is required"
    if kind == "extra_forbidden":
        return _unknown_field_message(loc)
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, got {got}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {got}"
    if kind == "finite_number":
        return f"must be a finite number, got {got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {got}"
    if kind == "string_type":
        return f"expected a string, got {got}{_STRING_HINT.get(type(value), '')}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return _range_message(loc, ctx, got)
    if kind == "string_too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"must be at least {ctx.get('min_length')} characters"
    if kind == "string_too_long":
        length = len(value) if isinstance(value, str) else "more"
        return f"must be at most {ctx.get('max_length')} characters, got {length}"
    if kind == "too_short":
        if loc == ("items",):
            return "the manifest needs at least one item"
        minimum = ctx.get("min_length")
        return f"must have at least {minimum} {'entry' if minimum == 1 else 'entries'}"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} entries, got {ctx.get('actual_length', 'more')}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}, got {got}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error.get("msg", "invalid value")))
    if kind == "item_kind":
        return f"expected a prompt string, or a mapping with 'prompt' or 'template'; got {got}"
    if kind == "invalid_key":
        return f"keys must be text, got {got}"
    if kind == "recursion_loop":
        return "the document refers to itself"
    return str(error.get("msg", "invalid value"))


def _errors_from_validation(exc: ValidationError) -> list[FieldError]:
    out: list[FieldError] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error.get("loc", ()))
        if loc and loc[-1] == "[key]":
            # A bad mapping key: report it at the key itself.
            loc = loc[:-1]
        elif error["type"] == "invalid_key":
            # A non-text key of a model: pydantic names it str(key), which reads like a field; use the parent.
            loc = loc[:-1]
        out.append(FieldError(_path(loc), _message(error)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------


def _decode(data: str | bytes, max_bytes: int) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise ManifestError.at(
                "(root)", f"the manifest is {len(raw)} bytes; the limit is {max_bytes} bytes"
            )
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise ManifestError.at(
                "(root)",
                f"the manifest is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                f"(line {line}); save the file as UTF-8",
            ) from None
    if not isinstance(data, str):
        raise TypeError(f"parse_manifest takes str or bytes, not {type(data).__name__}")
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ManifestError.at(
            "(root)", f"the manifest contains an invalid character (lone surrogate) at offset {exc.start}"
        ) from None
    if size > max_bytes:
        raise ManifestError.at("(root)", f"the manifest is {size} bytes; the limit is {max_bytes} bytes")
    return data.removeprefix("\ufeff")


@dataclass(frozen=True)
class Planned:
    """A manifest as ``plan_manifest`` read it: the validated model and the items it expands to, expanded once
    (a large templated manifest costs its expansion once per submit, not once per reader)."""

    manifest: Manifest
    items: list[ItemPlan]


def parse_manifest(data: str | bytes, **options: Any) -> Manifest:
    """The validated manifest alone (``plan_manifest`` with the same options); for callers that do not need
    its items."""
    return plan_manifest(data, **options).manifest


def plan_manifest(
    data: str | bytes,
    *,
    max_bytes: int = 1_000_000,
    base_dir: Path | None = None,
    check_model: Callable[[str], str | None] | None = None,
    assets: AssetPolicy | None = None,
    check_ref: Callable[[str, str], str | None] | None = None,
    farm_home: Path | None = None,
) -> Planned:
    """Parse, fully validate and expand a manifest; raise ``ManifestError`` listing every problem, and nothing
    else.

    ``base_dir`` is the manifest's folder: relative model folders and the PDQ blocklist resolve against it
    (the current directory when None). ``check_model``, if given, is called with the resolved model reference
    and returns an error message or None; the ML layer plugs in what only it knows. ``check_ref`` does the
    same for ``validation.model`` and ``scoring.model``, called with the reference and its kind ("validator"
    or "scorer"), so a name no worker knows fails here, not on every candidate. Expansion limits
    (item/candidate totals, template variables, winners vs candidates) are checked here too, so a manifest
    that parses will expand. ``assets`` decides which files and folders the manifest may name (farm.assets):
    the operator's policy when None (any path, as the CLI always allowed); the web passes an uploader's.
    ``farm_home`` (the settings' FARM_HOME) adds the operator's styles (``styles.yaml``, ``styles.csv``) and
    word files (``wildcards/``) to the shipped styles and the manifest's own.

    >>> planned = plan_manifest("name: demo\\nitems: [a fox]")
    >>> (planned.manifest.name, len(planned.items))
    ('demo', 1)
    """
    text = _decode(data, max_bytes)
    raw = _load_yaml(text)
    if raw is None:
        raise ManifestError.at(
            "(root)", "the manifest is empty; expected a mapping with at least 'name' and 'items'"
        )
    if not isinstance(raw, dict):
        raise ManifestError.at(
            "(root)", f"expected a mapping of fields at the top level, got {_describe(raw)}"
        )
    context = {
        "base_dir": base_dir,
        "check_model": check_model,
        "check_ref": check_ref,
        "assets": assets,
    }
    try:
        manifest = Manifest.model_validate(raw, context=context)
    except ValidationError as exc:
        raise ManifestError(_errors_from_validation(exc)) from None
    unnamed = assets.unnamed_uploads() if assets is not None else []
    if unnamed:
        raise ManifestError(
            FieldError("uploads", f"{name!r} was uploaded but the manifest names no such file; name it (e.g. "
                       "moderation.pdq_blocklist: " + name + ") or do not upload it")
            for name in unnamed
        )
    policy = assets if assets is not None else AssetPolicy.operator()
    library, problems = _library(
        manifest,
        farm_home=farm_home,
        wildcard_dirs=_wildcard_dirs(base_dir, policy, farm_home),
        csv_styles=context.get("csv_styles") or {},
    )
    if problems:
        raise ManifestError(problems)
    plans, problems = _plan(manifest, library)
    if problems:
        raise ManifestError(problems)
    return Planned(manifest, plans)


def stored_manifest(settings: Mapping[str, Any]) -> Manifest:
    """A batch's settings (``Batch.settings``, the manifest's ``model_dump(mode="json")`` written at submit)
    read back as the typed ``Manifest``; fields missing from settings an older version wrote take today's
    defaults, so each default lives only on the model.

    Why the checks that touch files are skipped (model folders, the PDQ blocklist, the asset policy, the ML
    layer's model checks): they ran at submit, and their results (absolute paths, resolved references) are
    what was stored. A worker or the web reading the batch later may not see those paths the same way (another
    host, a deleted upload, a folder moved since), and a batch already running must not fail on that here;
    the stage that uses a file reports its own error. Every other check (types, ranges, regexes) runs.

    >>> m = plan_manifest("name: demo\\nitems: [a fox]").manifest
    >>> stored_manifest(m.model_dump(mode="json")) == m
    True
    """
    try:
        return Manifest.model_validate(settings, context={"stored": True})
    except ValidationError as exc:
        raise ManifestError(_errors_from_validation(exc)) from None


# ----------------------------------------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemPlan:
    """One prompt to generate, with every parameter settled and one seed per candidate.

    ``index`` is the item's position after expansion (0-based); ``source`` points back into the manifest,
    e.g. ``items[2] {animal=cat, style=watercolor}``, so a result can be traced to the line that asked for it.
    """

    index: int
    prompt: str
    negative_prompt: str
    candidates: int
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str | None
    required_attributes: tuple[str, ...]
    source: str
    explicit_seed: int | None = None
    styles: tuple[str, ...] = ()


def candidate_seeds(
    base: int, explicit: int | None, index: int, start: int, count: int, taken: list[int]
) -> list[int]:
    """Seeds of candidates ``start .. start+count-1`` of item ``index``: ``explicit + k`` when the item sets
    its own seed, else derived from the manifest's base seed, stepping past seeds already ``taken``.

    Top-up rounds call this with ``start`` past the existing candidates, so their seeds are new and just as
    deterministic as the first round's.
    """
    if explicit is not None:
        return [(explicit + k) % (MAX_SEED + 1) for k in range(start, start + count)]
    chosen = list(taken)
    for k in range(start, start + count):
        attempt = 0
        seed = derive_seed(base, index, k)
        while seed in chosen:
            attempt += 1
            seed = derive_seed(base, index, k, attempt)
        chosen.append(seed)
    return chosen[len(taken) :]


def derive_seed(base: int, index: int, candidate: int, attempt: int = 0) -> int:
    """A 32-bit seed from (base seed, item index, candidate number) by blake2b: stable across runs and hosts.

    Why not ``hash()``: it is salted per process. Why a hash rather than ``base + k``: neighbouring items
    would share most of their seeds. ``attempt`` is there to step past the (rare) collision within an item.
    """
    digest = hashlib.blake2b(
        f"{base}:{index}:{candidate}:{attempt}".encode(), digest_size=8, person=b"farm.seed.v1"
    ).digest()
    return int.from_bytes(digest, "big") % (MAX_SEED + 1)


@dataclass
class _Library:
    """What expansion looks names up in: every style by name (precedence applied) and the word files."""

    styles: dict[str, Style]
    wildcards: WildcardSource


def _style_from_entry(name: str, entry: Any, origin: str) -> Style:
    """One styles.yaml entry, checked by the same model as a manifest's ``styles:`` section."""
    try:
        return StyleDef.model_validate(entry if entry is not None else {}).to_style(name, origin)
    except ValidationError as exc:
        raise ValueError(
            "; ".join(str(e) for e in _errors_from_validation(exc)).replace("(root): ", "")
        ) from None


def _wildcard_dirs(base_dir: Path | None, policy: AssetPolicy, farm_home: Path | None) -> tuple[Path, ...]:
    """Where word files are read: ``wildcards/`` next to a manifest the operator runs, then FARM_HOME's.

    An uploaded manifest gets FARM_HOME's folder only: the web has no manifest folder, and the operator
    decides what is in FARM_HOME.
    """
    folders: list[Path] = []
    if policy.trusted:
        folders.append((base_dir or Path.cwd()) / "wildcards")
    if farm_home is not None:
        folders.append(Path(farm_home) / "wildcards")
    return tuple(folders)


def _library(
    manifest: Manifest,
    *,
    farm_home: Path | None = None,
    wildcard_dirs: tuple[Path, ...] = (),
    csv_styles: Mapping[str, Style] | None = None,
) -> tuple[_Library, list[FieldError]]:
    """Every style the manifest may name, later registries winning: shipped, FARM_HOME's styles.csv then
    styles.yaml, the manifest's styles_csv then its styles section. A registry file that cannot be read is a
    problem reported at ``styles`` (naming the file), not skipped: a style silently missing changes images."""
    problems: list[FieldError] = []
    styles: dict[str, Style] = {}
    files: list[tuple[Path, str, str]] = [(SHIPPED_STYLES, "yaml", "shipped")]
    if farm_home is not None:
        home = Path(farm_home)
        files += [(home / "styles.csv", "csv", "FARM_HOME"), (home / "styles.yaml", "yaml", "FARM_HOME")]
    for path, kind, origin in files:
        try:
            text = read_text(path)
            if text is None:
                continue
            if kind == "csv":
                found = parse_styles_csv(text, str(path))
                found = {n: Style(n, st.prompt, st.negative_prompt, {}, origin) for n, st in found.items()}
            else:
                found = parse_styles_yaml(
                    text, str(path), lambda n, e, _o, o=origin: _style_from_entry(n, e, o)
                )
        except StyleError as exc:
            problems.append(FieldError("styles", str(exc)))
            continue
        styles.update(found)
    for name, style in (csv_styles or {}).items():
        styles[name] = Style(name, style.prompt, style.negative_prompt, {}, "styles_csv")
    for name, definition in manifest.styles.items():
        styles[name] = definition.to_style(name, "manifest")
    return _Library(styles, WildcardSource(wildcard_dirs)), problems


def _unknown_style(name: str, known: Iterable[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    guess = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
    return (
        f"unknown style {_describe(name)}; {guess}known styles: {shown} (define it under 'styles:', in "
        "$FARM_HOME/styles.yaml or $FARM_HOME/styles.csv)"
    )


_VARIANT_MARK = "\x00{}\x00"


def _protect_variants(template: str) -> tuple[str, list[str]]:
    """The template with each ``{a|b}`` variant (a brace group holding a ``|``) swapped for a marker, and the
    variants in order: ``str.format`` then sees only ``{name}`` variables, and the variants come back intact
    for the wildcard expansion. ``{{`` and ``}}`` stay literal braces as before."""
    out: list[str] = []
    stash: list[str] = []
    i = 0
    while i < len(template):
        if template.startswith(("{{", "}}"), i):
            out.append(template[i : i + 2])
            i += 2
            continue
        if template[i] == "{":
            depth, j = 0, i
            while j < len(template):
                depth += {"{": 1, "}": -1}.get(template[j], 0)
                if depth == 0:
                    break
                j += 1
            if j < len(template) and "|" in template[i + 1 : j]:
                stash.append(template[i : j + 1])
                out.append(_VARIANT_MARK.format(len(stash) - 1))
                i = j + 1
                continue
        out.append(template[i])
        i += 1
    return "".join(out), stash


def _fill(template: str, values: Mapping[str, str]) -> str:
    """The template with its variables replaced and its variants left for the wildcard expansion."""
    protected, stash = _protect_variants(template)
    text = protected.format(**values)
    for k, variant in enumerate(stash):
        text = text.replace(_VARIANT_MARK.format(k), variant)
    return text


def _template_fields(template: str) -> list[str]:
    """The variable names a template uses, in order; ValueError for anything but plain ``{name}``
    (``{a|b}`` variants are not variables: they are left for the wildcard expansion)."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(_protect_variants(template)[0]))
    except ValueError as exc:
        raise ValueError(f"invalid template: {exc} (use {{{{ and }}}} for literal braces)") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError(
                "positional placeholders like {} or {0} are not allowed; name them, e.g. {animal}"
            )
        if spec or conversion:
            raise ValueError(
                f"placeholder {{{field}}} may not have a format spec or conversion; use {{name}}"
            )
        if _VAR_RE.fullmatch(field) is None:
            raise ValueError(f"placeholder {{{field}}} must be a plain variable name like {{animal}}")
        if field not in names:
            names.append(field)
    return names


def _template_count(item: TemplateItem) -> int:
    """Items a template expands to, capped just above the limit so a huge product costs nothing."""
    count = 1
    for values in item.vars.values():
        count = min(count * len(values), MAX_ITEMS + 1)
    return count


def _check_template(item: TemplateItem) -> str | None:
    try:
        used = _template_fields(item.template)
    except ValueError as exc:
        return str(exc)
    declared = list(item.vars)
    missing = [name for name in used if name not in item.vars]
    if missing:
        listed = ", ".join(declared)
        return f"uses {{{missing[0]}}} but vars has no {missing[0]!r} (vars: {listed})"
    unused = [name for name in declared if name not in used]
    if unused:
        return f"vars {unused[0]!r} is not used in the template; add {{{unused[0]}}} or remove it"
    return None


def _duplicate_values(item: TemplateItem) -> tuple[str, int, str] | None:
    for name, values in item.vars.items():
        seen: set[str] = set()
        for position, value in enumerate(values):
            if value in seen:
                return name, position, value
            seen.add(value)
    return None


def _styles_of(manifest: Manifest, entry: Any) -> list[str]:
    """The style names an entry uses: its own ``style`` when set (``[]`` for none), else the defaults'."""
    if isinstance(entry, _ItemOverrides) and entry.style is not None:
        return list(entry.style)
    return list(manifest.defaults.style)


def _settled(manifest: Manifest, entry: Any, library: _Library | None = None) -> dict[str, Any]:
    """Defaults, then the entry's styles' parameters, then the entry's overrides (a plain string overrides
    nothing). Unknown style names are skipped here; ``_plan`` reports them."""
    d = manifest.defaults
    params: dict[str, Any] = {
        "candidates": d.candidates,
        "steps": d.steps,
        "guidance": d.guidance,
        "size": d.size,
        "negative_prompt": d.negative_prompt,
        "scheduler": d.scheduler,
        "seed": None,
        "required_attributes": (),
        "wildcards": d.wildcards,
        "styles": (),
    }
    if library is not None:
        styles = [library.styles[name] for name in _styles_of(manifest, entry) if name in library.styles]
        for style in styles:
            params.update(style.params)
        params["styles"] = tuple(styles)
    if isinstance(entry, _ItemOverrides):
        if entry.wildcards is not None:
            params["wildcards"] = entry.wildcards
        for key in ("candidates", "steps", "guidance", "size", "negative_prompt", "seed", "scheduler"):
            value = getattr(entry, key)
            if value is not None:
                params[key] = value
        params["required_attributes"] = tuple(entry.required_attributes)
    if params["scheduler"] == PIPELINE_SCHEDULER:
        params["scheduler"] = None
    return params


def _combinations(item: TemplateItem) -> Iterator[dict[str, str]]:
    names = list(item.vars)
    for values in product(*(item.vars[name] for name in names)):
        yield dict(zip(names, values, strict=True))


def _style_problems(manifest: Manifest, library: _Library) -> list[FieldError]:
    """Every style name no registry defines, at its field path, with the closest known name."""
    problems: list[FieldError] = []
    named: list[tuple[str, list[str]]] = [("defaults.style", list(manifest.defaults.style))]
    for i, entry in enumerate(manifest.items):
        if isinstance(entry, _ItemOverrides) and entry.style is not None:
            named.append((f"items[{i}].style", list(entry.style)))
    for path, names in named:
        for k, name in enumerate(names):
            if name not in library.styles:
                problems.append(FieldError(f"{path}[{k}]", _unknown_style(name, library.styles)))
    return problems


def _entry_prompts(entry: Any) -> Iterator[tuple[str, str]]:
    """(prompt, label) for each prompt an entry gives before styles and wildcards: its template's
    combinations, or its one prompt."""
    if isinstance(entry, TemplateItem):
        for combo in _combinations(entry):
            yield _fill(entry.template, combo), ", ".join(f"{k}={v}" for k, v in combo.items())
    else:
        yield (entry if isinstance(entry, str) else entry.prompt), ""


def _plan(manifest: Manifest, library: _Library | None = None) -> tuple[list[ItemPlan], list[FieldError]]:
    """Check what the models alone cannot (templates, styles, totals, winners vs candidates), then expand:
    template variables, then styles, then wildcards (so a style's text may hold wildcards too)."""
    if library is None:
        library, problems = _library(manifest)
        if problems:
            return [], problems
    problems = _style_problems(manifest, library)
    total_items = total_candidates = 0
    fewest: tuple[int, int] | None = None  # (candidates, entry index) of the smallest item
    for i, entry in enumerate(manifest.items):
        count = 1
        if isinstance(entry, TemplateItem):
            problem = _check_template(entry)
            if problem:
                problems.append(FieldError(f"items[{i}].template", problem))
                continue
            duplicate = _duplicate_values(entry)
            if duplicate:
                name, position, value = duplicate
                problems.append(
                    FieldError(f"items[{i}].vars.{name}[{position}]", f"duplicate value {_describe(value)}")
                )
            count = _template_count(entry)
        candidates = _settled(manifest, entry, library)["candidates"]
        total_items += count
        total_candidates += count * candidates
        if fewest is None or candidates < fewest[0]:
            fewest = (candidates, i)
    if total_items > MAX_ITEMS:
        problems.append(
            FieldError(
                "items", f"expands to more than {MAX_ITEMS} items; split the batch or use fewer values"
            )
        )
    elif total_candidates > MAX_CANDIDATES:
        problems.append(
            FieldError(
                "items",
                f"asks for {total_candidates} candidates in total; the limit is {MAX_CANDIDATES} "
                "(lower candidates or split the batch)",
            )
        )
    if fewest is not None:
        selection = manifest.selection
        if selection.winners > fewest[0]:
            problems.append(
                FieldError(
                    "selection.winners",
                    f"{selection.winners} winners per item, but items[{fewest[1]}] has only {fewest[0]} "
                    "candidates; winners must be at most every item's candidates",
                )
            )
        if selection.min_accepted > fewest[0]:
            problems.append(
                FieldError(
                    "selection.min_accepted",
                    f"{selection.min_accepted} accepted per item, but items[{fewest[1]}] has only "
                    f"{fewest[0]} candidates; min_accepted must be at most every item's candidates",
                )
            )
    if problems:
        return [], problems

    plans: list[ItemPlan] = []
    candidates_so_far = 0
    multiplied: list[str] = []  # how combinatorial wildcards multiplied each entry, for the limit message
    for i, entry in enumerate(manifest.items):
        params = _settled(manifest, entry, library)
        styles: tuple[Style, ...] = params["styles"]
        field_name = "template" if isinstance(entry, TemplateItem) else "prompt"
        where = f"items[{i}]" + (f".{field_name}" if not isinstance(entry, str) else "")
        for written, label in _entry_prompts(entry):
            styled, negative = apply_styles(written, params["negative_prompt"], styles)
            source = f"items[{i}] {{{label}}}" if label else f"items[{i}]"
            try:
                if not has_wildcards(styled):
                    expanded = [(styled, source)]
                elif params["wildcards"] == "combinatorial":
                    room = MAX_ITEMS - len(plans) + 1
                    variants = combinations(styled, library.wildcards, room)
                    parts = ", ".join(f"{w}: {n}" for w, n in contributions(styled, library.wildcards))
                    note = f"{where} gives {len(variants)}{'+' if len(variants) >= room else ''} ({parts})"
                    if note not in multiplied:
                        multiplied.append(note)
                    expanded = [(v, f"{source} #{k}") for k, v in enumerate(variants)]
                else:
                    index = len(plans)
                    seed = params["seed"] if params["seed"] is not None else manifest.defaults.seed
                    expanded = [(pick(styled, library.wildcards, wildcard_seed(seed, index)), source)]
                if has_wildcards(negative):
                    seed = params["seed"] if params["seed"] is not None else manifest.defaults.seed
                    negative = pick(negative, library.wildcards, wildcard_seed(seed, len(plans)))
            except WildcardError as exc:
                problems.append(FieldError(where, str(exc)))
                break
            for prompt, origin in expanded:
                if len(prompt) > MAX_PROMPT_CHARS or len(negative) > MAX_PROMPT_CHARS:
                    problems.append(
                        FieldError(
                            where,
                            f"expands to a prompt of {max(len(prompt), len(negative))} characters (styles "
                            f"and wildcards included); the limit is {MAX_PROMPT_CHARS}",
                        )
                    )
                    return [], problems
                if len(plans) >= MAX_ITEMS or candidates_so_far + params["candidates"] > MAX_CANDIDATES:
                    what = (
                        f"more than {MAX_ITEMS} items"
                        if len(plans) >= MAX_ITEMS
                        else f"more than {MAX_CANDIDATES} candidates"
                    )
                    problems.append(
                        FieldError(
                            "items",
                            f"combinatorial wildcards expand the batch to {what}: "
                            + "; ".join(multiplied)
                            + ". Use fewer variants or words, 'wildcards: random', or split the batch",
                        )
                    )
                    return [], problems
                plans.append(_item_plan(manifest, len(plans), prompt, params, origin, negative))
                candidates_so_far += params["candidates"]
    if problems:
        return [], problems
    return plans, []


def _item_plan(
    manifest: Manifest,
    index: int,
    prompt: str,
    params: dict[str, Any],
    source: str,
    negative: str | None = None,
) -> ItemPlan:
    count: int = params["candidates"]
    seeds = tuple(candidate_seeds(manifest.defaults.seed, params["seed"], index, 0, count, []))
    width, height = parse_size(params["size"])
    scheduler = params["scheduler"]
    return ItemPlan(
        explicit_seed=params["seed"],
        index=index,
        prompt=prompt,
        negative_prompt=params["negative_prompt"] if negative is None else negative,
        candidates=count,
        seeds=seeds,
        steps=params["steps"],
        guidance=float(params["guidance"]),
        width=width,
        height=height,
        scheduler=None if scheduler == PIPELINE_SCHEDULER else scheduler,
        required_attributes=params["required_attributes"],
        source=source,
        styles=tuple(style.name for style in params["styles"]),
    )


def expand(manifest: Manifest) -> list[ItemPlan]:
    """Every item the manifest asks for, templates expanded, styles and defaults applied, seeds chosen.

    Deterministic: the same manifest always gives the same plans and seeds. Raises ``ManifestError`` for what
    only expansion can see (already checked by ``parse_manifest``; this guards models built by hand). Only the
    shipped styles and the manifest's ``styles:`` are known here, and no word files: ``plan_manifest`` with
    ``farm_home`` and ``base_dir`` is what sees the operator's.
    """
    plans, problems = _plan(manifest)
    if problems:
        raise ManifestError(problems)
    return plans


# ----------------------------------------------------------------------------------------------------------
# Dry run and schema
# ----------------------------------------------------------------------------------------------------------


def summary(manifest: Manifest, plans: list[ItemPlan], *, slice_size: int = 4) -> dict[str, Any]:
    """What a run would cost, without running it: counts for the dry run and the upload preview.

    ``slices`` is how many slice tasks the farm will send: each item's candidates in slices of
    ``slice_size`` (the GPU batch). ``denoising_steps`` (candidates x steps) is the rough unit of GPU time.
    """
    if slice_size < 1:
        raise ValueError("slice_size must be at least 1")
    sizes: dict[str, dict[str, int]] = {}
    for plan in plans:
        entry = sizes.setdefault(f"{plan.width}x{plan.height}", {"items": 0, "candidates": 0})
        entry["items"] += 1
        entry["candidates"] += plan.candidates
    return {
        "name": manifest.name,
        "model": manifest.model,
        "dtype": manifest.dtype,
        "priority": manifest.priority,
        "tags": list(manifest.tags),
        "items": len(plans),
        "candidates": sum(p.candidates for p in plans),
        "sizes": sizes,
        "denoising_steps": sum(p.candidates * p.steps for p in plans),
        "slice_size": slice_size,
        "slices": sum(math.ceil(p.candidates / slice_size) for p in plans),
        "winners_per_item": manifest.selection.winners,
        # The final prompts, styles and wildcards applied, so a dry run shows what will be generated.
        "prompts": [
            {
                "index": plan.index,
                "source": plan.source,
                "prompt": plan.prompt,
                "negative_prompt": plan.negative_prompt,
                "styles": list(plan.styles),
            }
            for plan in plans[:MAX_PROMPTS_SHOWN]
        ],
        "prompts_shown": min(len(plans), MAX_PROMPTS_SHOWN),
    }


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12), for editors and the upload page's help."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"urn:farm:batch-manifest:v{MANIFEST_VERSION}"
    schema["title"] = "farm batch manifest"
    schema["description"] = (
        f"A farm batch manifest, format version {MANIFEST_VERSION}: prompts (plain, with overrides, or "
        "templates), candidates per prompt, the model and its parameters, moderation, validation, scoring "
        "and selection. Written in YAML; validated in full before anything runs."
    )
    return schema
