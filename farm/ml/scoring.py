"""Scorers: how good a candidate looks, as one float per image, so rank() can sort survivors.

A ``Scorer`` is a small interface (``score(images, prompt) -> list[float]``) so that scorers drop in without
touching the score stage. Three implement it:

- ``AestheticScorer``: a CLIP vision tower plus an MLP head, prompt-free (``tiny-aesthetic``).
- ``ImageRewardScorer``: ImageReward (human preference for a prompt/image pair) through the image-reward
  package's own loader ``ImageReward.load`` (``image-reward`` on real weights, ``tiny-image-reward`` offline).
- ``ClipScoreScorer``: CLIP score, 100 x the cosine of image and prompt embeddings of a validator model
  (``clip-score`` or ``clip-score:<validator>``), for a manifest that ranks by alignment alone.

``load_scorer`` picks the implementation from the resolved reference (its preset, or the files its folder
holds).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from farm.ml.layout import (
    AESTHETIC_CONFIG,
    IMAGE_REWARD_CHECKPOINT,
    IMAGE_REWARD_CONFIG,
    IMAGE_REWARD_MED_CONFIG,
)
from farm.ml.presets import CLIP_SCORE, IMAGE_REWARD_HUB_NAMES, ResolvedModel

log = logging.getLogger(__name__)


@runtime_checkable
class Scorer(Protocol):
    """Turns images (and the prompt they were made for) into one score each; higher is better."""

    def score(self, images: list[Image.Image], prompt: str) -> list[float]: ...


class AestheticHead(nn.Module):
    """MLP over a unit-normalised CLIP image embedding, in the style of the LAION aesthetic predictor.

    Why a separate module: the head is what distinguishes an aesthetic model from plain CLIP; it is saved as
    its own safetensors file beside the vision tower so either can be swapped.
    """

    def __init__(self, *, embed_dim: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = embed_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.mlp(embeddings).squeeze(-1)


class AestheticScorer:
    """CLIP vision tower + aesthetic head; the prompt is ignored (aesthetics is prompt-free)."""

    def __init__(self, vision, processor, head: AestheticHead, *, device: str, ref: str) -> None:
        self.vision = vision
        self.processor = processor
        self.head = head
        self.device = device
        self.ref = ref

    @classmethod
    def load(cls, resolved: ResolvedModel, device: str = "cpu") -> AestheticScorer:
        """Load a folder written by ``farm.ml.tiny.build_tiny_aesthetic`` (or one laid out the same way)."""
        from safetensors.torch import load_file
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        folder = Path(resolved.path_or_id)
        config = json.loads((folder / AESTHETIC_CONFIG).read_text(encoding="utf-8"))
        head = AestheticHead(embed_dim=int(config["embed_dim"]), hidden=[int(h) for h in config["hidden"]])
        head.load_state_dict(load_file(str(folder / config["head"])))
        vision = CLIPVisionModelWithProjection.from_pretrained(str(folder))
        processor = CLIPImageProcessor.from_pretrained(str(folder))
        vision.to(device).eval()
        head.to(device).eval()
        return cls(vision, processor, head, device=device, ref=resolved.ref)

    @torch.inference_mode()
    def score(self, images: list[Image.Image], prompt: str = "") -> list[float]:
        """Score all images in one batch; deterministic for the same images."""
        if not images:
            return []
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device)
        embeds = self.vision(pixel_values=pixels).image_embeds
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return [float(x) for x in self.head(embeds).cpu()]


class ImageRewardScorer:
    """ImageReward: a BLIP image encoder cross-attended by a BERT text encoder, then a reward MLP.

    Loaded only through the package's own ``ImageReward.load`` (after ``farm.ml.compat_imagereward`` made it
    importable with transformers 5). Scores a whole slice in one forward pass with the package's own
    ``score_gard`` (batched image tensor, prompt tokens repeated per image); the package's list API would run
    one image at a time. The rewards are its normalised scale: about N(0, 1) over real images.
    """

    def __init__(self, model: Any, *, device: str, ref: str) -> None:
        self.model = model
        self.device = device
        self.ref = ref

    @classmethod
    def load(cls, resolved: ResolvedModel, device: str = "cpu") -> ImageRewardScorer:
        """Load a checkpoint name (``ImageReward-v1.0``) or a folder with ImageReward.pt + med_config.json.

        A folder may add ``imagereward.json`` (written by ``farm.ml.tiny``) naming a local BERT tokenizer
        folder and a ViT size; without it the package's defaults apply (ViT-L, the hub's bert-base-uncased).
        """
        from farm.ml.compat_imagereward import HUB_TOKENIZER, VitSpec, blip_overrides, import_image_reward

        rm = import_image_reward()
        tokenizer: str | Path = HUB_TOKENIZER
        vit: VitSpec | None = None
        kwargs: dict[str, Any] = {}
        if resolved.source == "hub":
            name = resolved.path_or_id
        else:
            folder = Path(resolved.path_or_id)
            config: dict[str, Any] = {}
            if (folder / IMAGE_REWARD_CONFIG).is_file():
                config = json.loads((folder / IMAGE_REWARD_CONFIG).read_text(encoding="utf-8"))
            name = str(folder / config.get("checkpoint", IMAGE_REWARD_CHECKPOINT))
            kwargs["med_config"] = str(folder / config.get("med_config", IMAGE_REWARD_MED_CONFIG))
            if config.get("tokenizer"):
                tokenizer = folder / config["tokenizer"]
            if config.get("vit"):
                vit = VitSpec(**config["vit"])
        printed = io.StringIO()
        # ImageReward.load reports progress with print(); keep it out of the worker's stdout, in the log.
        try:
            with blip_overrides(tokenizer=tokenizer, vit=vit), contextlib.redirect_stdout(printed):
                model = rm.load(name, device=device, **kwargs)
        except OSError as exc:
            if resolved.source != "hub":
                raise
            raise RuntimeError(
                f"scorer {resolved.ref!r}: ImageReward checkpoint {name!r} (and the bert-base-uncased "
                f"tokenizer) could not be fetched: {exc}. On an offline host, let ImageReward.load download "
                "them once into ~/.cache/ImageReward and the Hugging Face cache, or name a local folder "
                "holding ImageReward.pt and med_config.json"
            ) from exc
        log.debug("ImageReward.load(%s): %s", name, printed.getvalue().strip())
        model.eval()
        return cls(model, device=device, ref=resolved.ref)

    @torch.inference_mode()
    def score(self, images: list[Image.Image], prompt: str) -> list[float]:
        """One reward per image for ``prompt``, higher is preferred; deterministic for the same inputs."""
        if not images:
            return []
        model = self.model
        # Same tokenisation as ImageReward.score/inference_rank: padded to 35 tokens.
        text = model.blip.tokenizer(
            prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(self.device)
        pixels = torch.stack([model.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        ids = text.input_ids.expand(len(images), -1)
        mask = text.attention_mask.expand(len(images), -1)
        rewards = model.score_gard(ids, mask, pixels)
        return [float(r) for r in rewards.float().reshape(-1).cpu()]


class ClipScoreScorer:
    """CLIP score: 100 x cosine(image, prompt) from a CLIP or SigLIP validator model; 0 when unrelated.

    Why offer it: a manifest that only cares about prompt faithfulness can rank by it, and it needs no
    model beyond the validator the farm already has.
    """

    def __init__(self, alignment: Any, *, ref: str) -> None:
        self.alignment = alignment
        self.ref = ref

    @classmethod
    def load(cls, resolved: ResolvedModel, device: str = "cpu") -> ClipScoreScorer:
        """``resolved`` points at the validator model (``resolve_model`` maps ``clip-score:<ref>`` so)."""
        from farm.ml.validation import ClipAlignment

        return cls(ClipAlignment.load(resolved, device), ref=resolved.ref)

    def score(self, images: list[Image.Image], prompt: str) -> list[float]:
        """100 x cosine similarity per image, clamped at 0 (the usual CLIP-score convention)."""
        return [100.0 * max(cos, 0.0) for cos in self.alignment.alignment(images, prompt)]


def load_scorer(resolved: ResolvedModel, device: str = "cpu") -> Scorer:
    """Pick and load the scorer a resolved reference describes.

    - preset ``clip-score`` (``clip-score`` or ``clip-score:<validator>``) -> ``ClipScoreScorer``;
    - a hub checkpoint name the image-reward package knows (``ImageReward-v1.0``, preset ``image-reward``),
      or a folder with ``imagereward.json`` or ``ImageReward.pt`` -> ``ImageRewardScorer``;
    - a folder with ``aesthetic.json`` -> ``AestheticScorer``.
    """
    if resolved.preset == CLIP_SCORE:
        return ClipScoreScorer.load(resolved, device)
    if resolved.source == "hub" and resolved.path_or_id in IMAGE_REWARD_HUB_NAMES:
        return ImageRewardScorer.load(resolved, device)
    if resolved.source in ("preset", "folder"):
        folder = Path(resolved.path_or_id)
        if (folder / IMAGE_REWARD_CONFIG).is_file() or (folder / IMAGE_REWARD_CHECKPOINT).is_file():
            return ImageRewardScorer.load(resolved, device)
        if (folder / AESTHETIC_CONFIG).is_file():
            return AestheticScorer.load(resolved, device)
    raise ValueError(
        f"scorer {resolved.ref!r}: no scorer implementation recognises {resolved.path_or_id!r} "
        f"(expected a folder with {AESTHETIC_CONFIG} or {IMAGE_REWARD_CHECKPOINT}, an ImageReward checkpoint "
        f"name ({', '.join(IMAGE_REWARD_HUB_NAMES)}), or {CLIP_SCORE}[:<validator>])"
    )
