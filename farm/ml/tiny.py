"""Tiny random-weight models of the real classes, built offline and deterministically.

Why: machines here reach no model hub and CI has no GPU, yet the farm must exercise the very same loading path
a real checkpoint takes (``DiffusionPipeline.from_pretrained``, ``CLIPModel.from_pretrained`` ...). So each
tiny preset is a folder written with ``save_pretrained`` from small configs of the real classes and seeded
weights.

Every ``build_*(path)`` writes a complete folder at ``path``; ``farm.ml.builds`` decides when to build one and
where (once per models folder), and ``farm.ml.layout`` names the folders and files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from farm.ml.layout import (
    AESTHETIC_CONFIG,
    AESTHETIC_HEAD,
    IMAGE_REWARD_CHECKPOINT,
    IMAGE_REWARD_CONFIG,
    IMAGE_REWARD_MED_CONFIG,
    IMAGE_REWARD_TOKENIZER,
)

_SEED = 1234
_TEXT_HIDDEN = 32
_MAX_LENGTH = 77
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# A few merges so the BPE path is really exercised; each merged token is also in the vocabulary.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>")]


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses to stand for the 256 byte values.

    Printable Latin-1 bytes stand for themselves; the rest are shifted past 255 so none is whitespace or a
    control character. This is the convention the CLIP tokenizer decodes with, so it must match exactly.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in keep:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _tokenizer_files(path: Path) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json for a small byte-level CLIP tokenizer.

    Returns the vocabulary size, which the text encoders' configs must match.
    """
    path.mkdir(parents=True, exist_ok=True)
    tokens: list[str] = []
    alphabet = _byte_alphabet()
    tokens.extend(alphabet)
    tokens.extend(ch + "</w>" for ch in alphabet)
    tokens.extend(a + b for a, b in _MERGES)
    tokens.extend([_BOS, _EOS])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (path / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _MAX_LENGTH,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": _EOS,
        "do_lower_case": True,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def _text_config(vocab_size: int, tokenizer, *, projection_dim: int = _TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vision_config(*, projection_dim: int = _TEXT_HIDDEN):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim,
    )


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd(path: Path) -> Path:
    """Write a tiny StableDiffusionPipeline (real classes, seeded random weights) to ``path``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    tok_dir = path / "_tokenizer_src"
    vocab_size = _tokenizer_files(tok_dir)
    tokenizer = _load_tokenizer(tok_dir)
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    torch.manual_seed(_SEED + 1)
    vae = _vae()
    torch.manual_seed(_SEED + 2)
    text_encoder = CLIPTextModel(_text_config(vocab_size, tokenizer))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))
    shutil.rmtree(tok_dir)
    return path


def build_tiny_sdxl(path: Path) -> Path:
    """Write a tiny StableDiffusionXLPipeline (two text encoders, text_time embedding) to ``path``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    tok_dir = path / "_tokenizer_src"
    vocab_size = _tokenizer_files(tok_dir)
    tokenizer = _load_tokenizer(tok_dir)
    tokenizer_2 = _load_tokenizer(tok_dir)
    time_dim = 8
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        # pooled text embedding (projection of encoder 2) + six time ids of time_dim each
        projection_class_embeddings_input_dim=_TEXT_HIDDEN + 6 * time_dim,
        # hidden states of both encoders are concatenated
        cross_attention_dim=2 * _TEXT_HIDDEN,
        norm_num_groups=32,
    )
    torch.manual_seed(_SEED + 1)
    vae = _vae()
    torch.manual_seed(_SEED + 2)
    text_encoder = CLIPTextModel(_text_config(vocab_size, tokenizer))
    torch.manual_seed(_SEED + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, tokenizer_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(path))
    shutil.rmtree(tok_dir)
    return path


def build_tiny_clip(path: Path) -> Path:
    """Write a tiny CLIPModel plus its CLIPProcessor (image processor + tokenizer) to ``path``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    path = Path(path)
    tok_dir = path / "_tokenizer_src"
    vocab_size = _tokenizer_files(tok_dir)
    tokenizer = _load_tokenizer(tok_dir)
    config = CLIPConfig(
        text_config=_text_config(vocab_size, tokenizer).to_dict(),
        vision_config=_vision_config().to_dict(),
        projection_dim=_TEXT_HIDDEN,
    )
    torch.manual_seed(_SEED + 4)
    model = CLIPModel(config)
    model.save_pretrained(str(path))
    CLIPProcessor(image_processor=_image_processor(), tokenizer=tokenizer).save_pretrained(str(path))
    shutil.rmtree(tok_dir)
    return path


def build_tiny_aesthetic(path: Path) -> Path:
    """Write a tiny CLIP-based aesthetic predictor: vision tower + processor + seeded MLP head.

    The head's weights are random but seeded and scaled up, so different images get visibly different (and
    reproducible) scores: the farm's ranking has something to sort.
    """
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    from farm.ml.scoring import AestheticHead

    path = Path(path)
    torch.manual_seed(_SEED + 5)
    vision = CLIPVisionModelWithProjection(_vision_config())
    vision.save_pretrained(str(path))
    _image_processor().save_pretrained(str(path))
    hidden = [64, 16]
    torch.manual_seed(_SEED + 6)
    head = AestheticHead(embed_dim=_TEXT_HIDDEN, hidden=hidden)
    with torch.no_grad():
        for param in head.parameters():
            param.mul_(4.0)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path / AESTHETIC_HEAD))
    config = {"format": "farm-aesthetic", "embed_dim": _TEXT_HIDDEN, "hidden": hidden, "head": AESTHETIC_HEAD}
    (path / AESTHETIC_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


# Words test prompts use get their own WordPiece; anything else still tokenizes, letter by letter.
_BERT_WORDS = (
    "a an the of in on with and photo picture painting drawing of cat dog car house tree red green blue "
    "yellow black white old new small big beach city forest night sky sun water portrait landscape"
).split()


def _bert_tokenizer_files(path: Path) -> None:
    """Write vocab.txt and tokenizer_config.json for a small uncased BERT WordPiece tokenizer.

    Every lowercase letter, digit and common punctuation mark is a token both word-initial and as a
    ``##`` continuation, so any ASCII prompt tokenizes without [UNK]; a few dozen whole words keep real
    prompts short. BLIP adds its own [DEC] and [ENC] tokens on load.
    """
    path.mkdir(parents=True, exist_ok=True)
    chars = [*"abcdefghijklmnopqrstuvwxyz0123456789", *".,;:!?'\"-()/&"]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    tokens += [w for w in dict.fromkeys(_BERT_WORDS) if w not in tokens]
    (path / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_tiny_image_reward(path: Path) -> Path:
    """Write a tiny ImageReward (the image-reward package's own model class) that loads with ``RM.load``.

    Same architecture as the real one except sizes: a 2-block ViT of width 64 instead of ViT-L/16, and a
    one-layer BERT. The BERT stays 768 wide because ImageReward's reward MLP is fixed at 768 inputs. The
    head is re-initialised (seeded) with unit-gain weights: ImageReward's own init gives weights so small
    that every image would get the same reward to float precision, leaving the ranking nothing to sort.
    """
    from farm.ml.compat_imagereward import VitSpec, blip_overrides, import_image_reward, make_blip_tokenizer

    path = Path(path)
    rm = import_image_reward()
    _bert_tokenizer_files(path / IMAGE_REWARD_TOKENIZER)
    vocab_size = len(make_blip_tokenizer(path / IMAGE_REWARD_TOKENIZER))
    med_config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": 768,
        "num_hidden_layers": 1,
        "num_attention_heads": 12,
        "intermediate_size": 256,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "add_cross_attention": True,
        "encoder_width": 64,
    }
    (path / IMAGE_REWARD_MED_CONFIG).write_text(json.dumps(med_config, indent=2), encoding="utf-8")
    vit = VitSpec(width=64, depth=2, heads=4, patch_size=32)
    torch.manual_seed(_SEED + 7)
    with blip_overrides(tokenizer=path / IMAGE_REWARD_TOKENIZER, vit=vit):
        model = rm.ImageReward(med_config=str(path / IMAGE_REWARD_MED_CONFIG), device="cpu")
    head = torch.Generator().manual_seed(_SEED + 8)
    with torch.no_grad():
        for name, param in model.mlp.layers.named_parameters():
            if name.endswith("weight"):
                param.copy_(torch.randn(param.shape, generator=head) / param.shape[1] ** 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=head) * 0.1)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, str(path / IMAGE_REWARD_CHECKPOINT))
    config = {
        "format": "farm-imagereward",
        "checkpoint": IMAGE_REWARD_CHECKPOINT,
        "med_config": IMAGE_REWARD_MED_CONFIG,
        "tokenizer": IMAGE_REWARD_TOKENIZER,
        "vit": {"width": vit.width, "depth": vit.depth, "heads": vit.heads, "patch_size": vit.patch_size},
    }
    (path / IMAGE_REWARD_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path
