"""Prompt alignment: does the image show what was asked? CLIP-style image/text similarity.

Why: safe images can still be off-prompt. The validate stage records a cosine similarity per candidate and,
for the attributes a manifest insists on ("red", "a dog"), the margin by which the image matches the phrase
better than its negation. CLIP and SigLIP both expose ``get_image_features``/``get_text_features``, so one
adapter over ``AutoModel``/``AutoProcessor`` serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from farm.ml.presets import ResolvedModel, model_folder


def negate(phrase: str) -> str:
    """The contrast text an attribute is compared against."""
    return f"a photo without {phrase}"


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` return a tensor in some versions, an output with ``pooler_output`` in others."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


@dataclass
class ClipAlignment:
    """A loaded CLIP (or SigLIP) model and processor that score image/text agreement."""

    model: Any
    processor: Any
    device: str
    ref: str
    is_siglip: bool = False

    @classmethod
    def load(cls, resolved: ResolvedModel, device: str = "cpu") -> ClipAlignment:
        """Load through ``AutoModel``/``AutoProcessor.from_pretrained`` from a folder: a hub id's is its
        cached snapshot (``model_folder``): transformers would look for an id in the working folder first."""
        from transformers import AutoModel, AutoProcessor

        folder = model_folder(resolved)
        model = AutoModel.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise ValueError(
                f"validator {resolved.ref!r} is a {type(model).__name__}, not a CLIP-style model"
            )
        model.to(device).eval()
        is_siglip = "siglip" in type(model).__name__.lower()
        return cls(model=model, processor=processor, device=device, ref=resolved.ref, is_siglip=is_siglip)

    @torch.inference_mode()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-normalised image embeddings, one batched forward pass."""
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        feats = _features(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
        return feats / feats.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-normalised text embeddings; SigLIP wants max-length padding, CLIP the longest in the batch."""
        padding = "max_length" if self.is_siglip else True
        inputs = self.processor(text=texts, return_tensors="pt", padding=padding, truncation=True)
        kwargs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        feats = _features(self.model.get_text_features(**kwargs))
        return feats / feats.norm(dim=-1, keepdim=True)

    def alignment(self, images: list[Image.Image], prompt: str) -> list[float]:
        """Cosine similarity of each image with the prompt, in [-1, 1]."""
        if not images:
            return []
        sims = self.image_embeddings(images) @ self.text_embeddings([prompt]).T
        return [float(x) for x in sims[:, 0].clamp(-1.0, 1.0).cpu()]

    def attributes(self, images: list[Image.Image], phrases: list[str]) -> list[dict[str, float]]:
        """Per image, per phrase: similarity to the phrase minus similarity to its negation.

        Positive means the image looks more like "<phrase>" than like "a photo without <phrase>".
        """
        if not images:
            return []
        if not phrases:
            return [{} for _ in images]
        texts = [*phrases, *(negate(p) for p in phrases)]
        sims = self.image_embeddings(images) @ self.text_embeddings(texts).T
        n = len(phrases)
        margins = (sims[:, :n] - sims[:, n:]).cpu()
        return [{p: float(row[i]) for i, p in enumerate(phrases)} for row in margins]
