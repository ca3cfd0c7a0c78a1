"""Scorers: how good a candidate looks, as one float per image, so rank() can sort survivors.

A ``Scorer`` is a small interface (``score(images, prompt) -> list[float]``) so that other scorers drop in
beside the aesthetic predictor without touching the score stage. ``load_scorer`` picks the implementation from
what the resolved model folder holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from farm.ml.presets import ResolvedModel


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

        from farm.ml.tiny import AESTHETIC_CONFIG

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


def load_scorer(resolved: ResolvedModel, device: str = "cpu") -> Scorer:
    """Pick and load the scorer a resolved model folder describes.

    The folder's marker file decides: ``aesthetic.json`` -> ``AestheticScorer``. Other scorers (ImageReward is
    the next one planned) are added here as another branch keyed on their own marker or preset name, and
    implement the same ``Scorer`` protocol.
    """
    from farm.ml.tiny import AESTHETIC_CONFIG

    if resolved.source in ("preset", "folder") and (Path(resolved.path_or_id) / AESTHETIC_CONFIG).is_file():
        return AestheticScorer.load(resolved, device)
    raise ValueError(
        f"scorer {resolved.ref!r}: no scorer implementation recognises {resolved.path_or_id!r} "
        f"(expected a folder with {AESTHETIC_CONFIG}, e.g. the 'tiny-aesthetic' preset)"
    )
