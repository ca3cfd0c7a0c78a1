"""Where the farm's own model folders lie under the models directory, and the files they hold.

Why a module of names only: the builders (farm.ml.tiny, farm.ml.fullsize, farm.ml.builds) write these folders,
and farm.ml.presets and the loaders (farm.ml.scoring) find and read them. Importing the names from here
costs nothing (no torch) and lets neither side import the other just to spell a file name.
"""

from __future__ import annotations

#: Bumped whenever a builder's output changes, so an old folder is never mistaken for the new recipe.
TINY_VERSION = 1

#: Preset name -> folder name under the models directory.
TINY_FOLDERS: dict[str, str] = {
    "tiny": f"tiny-sd-v{TINY_VERSION}",
    "tiny-xl": f"tiny-sdxl-v{TINY_VERSION}",
    "tiny-clip": f"tiny-clip-v{TINY_VERSION}",
    "tiny-aesthetic": f"tiny-aesthetic-v{TINY_VERSION}",
    "tiny-image-reward": f"tiny-image-reward-v{TINY_VERSION}",
    "random-sdxl": "random-sdxl-v1",
}

#: Files the aesthetic scorer folder holds beside the Hugging Face vision model.
AESTHETIC_CONFIG = "aesthetic.json"
AESTHETIC_HEAD = "aesthetic_head.safetensors"

#: Files of an ImageReward scorer folder: the farm's description of it, then the package's own files (the
#: checkpoint and med_config.json are what the hub repository THUDM/ImageReward ships).
IMAGE_REWARD_CONFIG = "imagereward.json"
IMAGE_REWARD_CHECKPOINT = "ImageReward.pt"
IMAGE_REWARD_MED_CONFIG = "med_config.json"
IMAGE_REWARD_TOKENIZER = "tokenizer"

#: Preset name -> the file whose presence says its folder is a complete build.
TINY_MARKERS: dict[str, str] = {
    "tiny": "model_index.json",
    "tiny-xl": "model_index.json",
    "tiny-clip": "config.json",
    "tiny-aesthetic": AESTHETIC_CONFIG,
    "tiny-image-reward": IMAGE_REWARD_CONFIG,
    "random-sdxl": "model_index.json",
}
