"""A full-size SDXL-architecture pipeline with random weights, built from configs where it is needed.

Why: a GPU benchmark needs realistic compute (a 2.6 B-parameter UNet, two real-size text encoders, the real
VAE), and machines here reach no hub. The architecture is what costs time, not the values of the weights, so
the real configs with seeded random weights, saved in fp16 and loaded back through
``DiffusionPipeline.from_pretrained``, exercise exactly what a real SDXL checkpoint would. Its images are
noise. Built once per models folder (a few GB), on the GPU when there is one, else on the CPU (slow).
"""

from __future__ import annotations

from pathlib import Path

import torch

from farm.ml.tiny import _load_tokenizer, _tokenizer_files


def build_random_sdxl(path: Path) -> Path:
    """Write the random full-size SDXL pipeline (fp16, seeded) to ``path``; farm.ml.builds decides when."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    tok_dir = path / "_tokenizer_src"
    _tokenizer_files(tok_dir)
    tokenizer, tokenizer_2 = _load_tokenizer(tok_dir), _load_tokenizer(tok_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2024)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
        )
        common = {
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        }
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
                hidden_act="quick_gelu",
                **common,
            )
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
                hidden_act="gelu",
                **common,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(str(path), variant=None)
    import shutil

    shutil.rmtree(tok_dir)
    return path
