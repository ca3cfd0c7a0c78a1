"""ImageReward through the image-reward package's own loader, the shims it needs, and the CLIP score.

The tiny ImageReward is the package's real ``ImageReward`` class at test size (small ViT, one BERT layer)
with a seeded head, saved as a checkpoint and loaded back with ``ImageReward.load(path, med_config=...)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ml_images import grey, noise, skin_ellipse
from torch import nn

from farm.ml import compat_imagereward as compat
from farm.ml import layout, tiny
from farm.ml.builds import build_and_resolve, ensure_preset
from farm.ml.presets import ModelRefError, check_model_ref, folder_fingerprint, resolve_model
from farm.ml.scoring import ClipScoreScorer, ImageRewardScorer, Scorer, load_scorer
from farm.ml.validation import ClipAlignment

IMAGES = [skin_ellipse(64), grey(64), noise(4, 64), noise(5, 64)]


@pytest.fixture(scope="module")
def ir_folder(models_dir: Path) -> Path:
    return ensure_preset("tiny-image-reward", models_dir)


@pytest.fixture(scope="module")
def image_reward(models_dir: Path) -> ImageRewardScorer:
    scorer = load_scorer(build_and_resolve("tiny-image-reward", kind="scorer", models_dir=models_dir))
    assert isinstance(scorer, ImageRewardScorer)
    return scorer


# ------------------------------------------------------------------------------------------- compat shims


def test_fresh_process_imports_torchvision_diffusers_and_image_reward() -> None:
    """Regression: with image-reward's torchvision installed, importing diffusers or a transformers image
    processor failed with "operator torchvision::nms does not exist". Importing farm.ml installs a hook that
    declares the ops first; importing ImageReward then leaves no process-wide side effects behind."""
    script = textwrap.dedent(
        """
        import json, warnings
        import farm.ml
        import torch
        from transformers import CLIPImageProcessor
        from diffusers import StableDiffusionPipeline
        import torchvision
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_warning()
        before = hf_logging.get_verbosity()
        from farm.ml.compat_imagereward import import_image_reward
        rm = import_image_reward()
        blanket = [f for f in warnings.filters if f[0] == "ignore" and f[1] is None and f[2] is Warning]
        print(json.dumps({
            "nms": hasattr(torch.ops.torchvision, "nms"),
            "load": callable(rm.load),
            "verbosity_kept": hf_logging.get_verbosity() == before,
            "blanket_ignore": len(blanket),
        }))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"nms": True, "load": True, "verbosity_kept": True, "blanket_ignore": 0}


def test_declare_torchvision_ops_is_a_no_op_once_torchvision_is_imported() -> None:
    import torchvision  # noqa: F401 - the point is that it imports

    assert compat.declare_torchvision_ops() == []
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")


def test_modeling_utils_helpers_are_importable_where_med_py_looks() -> None:
    compat.patch_transformers_modeling_utils()
    from transformers.modeling_utils import (
        apply_chunking_to_forward,
        find_pruneable_heads_and_indices,
        prune_linear_layer,
    )

    x = torch.arange(24.0).reshape(2, 4, 3)
    assert torch.equal(apply_chunking_to_forward(lambda t: t * 2, 2, 1, x), x * 2)
    assert torch.equal(compat._apply_chunking_to_forward(lambda t: t + 1, 2, 1, x), x + 1)
    assert torch.equal(compat._apply_chunking_to_forward(lambda t: t + 1, 0, 1, x), x + 1)

    heads, index = find_pruneable_heads_and_indices({1}, 3, 2, set())
    assert heads == {1} and index.tolist() == [0, 1, 4, 5]
    # Head 0 went earlier: original head 2 now sits at position 1; head 0 is not pruned twice.
    heads, index = find_pruneable_heads_and_indices({0, 2}, 2, 2, {0})
    assert heads == {2} and index.tolist() == [0, 1]

    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    for prune in (prune_linear_layer, compat._prune_linear_layer):
        rows = prune(layer, torch.tensor([0, 2]), dim=0)
        assert torch.equal(rows.weight, layer.weight[[0, 2]]) and torch.equal(rows.bias, layer.bias[[0, 2]])
        cols = prune(layer, torch.tensor([1]), dim=1)
        assert torch.equal(cols.weight, layer.weight[:, [1]]) and torch.equal(cols.bias, layer.bias)


def test_attention_and_head_masks() -> None:
    module = nn.Linear(2, 2)
    inverted = compat.invert_attention_mask(module, torch.tensor([[1, 0, 1]]))
    assert inverted.shape == (1, 1, 1, 3) and inverted.dtype == torch.float32
    assert inverted[0, 0, 0].tolist() == [0.0, torch.finfo(torch.float32).min, 0.0]
    assert compat.invert_attention_mask(module, torch.ones(2, 4, 3)).shape == (2, 1, 4, 3)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        compat.invert_attention_mask(module, torch.ones(3))

    assert compat.get_head_mask(module, None, 3) == [None, None, None]
    per_model = compat.get_head_mask(module, torch.tensor([1.0, 0.0]), 3)
    assert isinstance(per_model, torch.Tensor) and per_model.shape == (3, 1, 2, 1, 1)
    per_layer = compat.get_head_mask(module, torch.ones(3, 2), 3)
    assert isinstance(per_layer, torch.Tensor) and per_layer.shape == (3, 1, 2, 1, 1)


def test_blip_text_encoder_builds_and_initialises_with_transformers_5(ir_folder: Path) -> None:
    compat.import_image_reward()
    from ImageReward.models.BLIP import med

    config = med.BertConfig.from_json_file(str(ir_folder / layout.IMAGE_REWARD_MED_CONFIG))
    torch.manual_seed(0)
    model = med.BertModel(config=config, add_pooling_layer=False)  # calls self.init_weights()
    weight = model.embeddings.word_embeddings.weight
    assert weight.std().item() == pytest.approx(config.initializer_range, rel=0.2)  # _init_weights ran
    ids = torch.tensor([[2, 10, 11, 3, 0]])
    image = torch.randn(1, 5, config.encoder_width)
    out = model(ids, attention_mask=(ids > 0).long(), encoder_hidden_states=image, return_dict=True)
    assert out.last_hidden_state.shape == (1, 5, 768)


def test_blip_tokenizer_from_local_folder(ir_folder: Path) -> None:
    tok = compat.make_blip_tokenizer(ir_folder / layout.IMAGE_REWARD_TOKENIZER)
    assert tok.enc_token_id == tok.convert_tokens_to_ids("[ENC]") != tok.unk_token_id
    assert tok.bos_token == "[DEC]"
    ids = tok("A red cat, xyz!")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[:4] == ["[CLS]", "a", "red", "cat"]


# ---------------------------------------------------------------------------------------- tiny ImageReward


def test_tiny_image_reward_loads_through_the_packages_own_loader(ir_folder: Path) -> None:
    rm = compat.import_image_reward()
    config = json.loads((ir_folder / layout.IMAGE_REWARD_CONFIG).read_text())
    checkpoint = ir_folder / config["checkpoint"]
    vit = compat.VitSpec(**config["vit"])
    with compat.blip_overrides(tokenizer=ir_folder / config["tokenizer"], vit=vit):
        model = rm.load(str(checkpoint), device="cpu", med_config=str(ir_folder / config["med_config"]))
    assert type(model).__name__ == "ImageReward" and not model.training
    saved = torch.load(str(checkpoint), map_location="cpu")
    state = model.state_dict()
    assert set(saved) == set(state)  # RM.load loads with strict=False: make sure nothing was skipped
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert model.mlp.layers[0].in_features == 768
    # The package's own per-image API agrees with it.
    rewards = model.inference_rank("a photo of a cat", IMAGES[:2])[1]
    assert len(rewards) == 2 and rewards[0] != rewards[1]


def test_image_reward_scores_differ_and_are_deterministic(
    image_reward: ImageRewardScorer, models_dir: Path
) -> None:
    cat = image_reward.score(IMAGES, "a photo of a cat")
    car = image_reward.score(IMAGES, "an old red car on the beach")
    assert len(set(cat)) == 4 and all(isinstance(x, float) for x in cat)
    assert cat != car
    assert image_reward.score(IMAGES, "a photo of a cat") == cat
    reloaded = load_scorer(build_and_resolve("tiny-image-reward", kind="scorer", models_dir=models_dir))
    assert isinstance(reloaded, Scorer)
    assert reloaded.score(IMAGES, "a photo of a cat") == cat
    assert image_reward.score([], "x") == []


def test_image_reward_batch_matches_the_packages_per_image_scores(image_reward: ImageRewardScorer) -> None:
    batched = image_reward.score(IMAGES, "a dog in the city")
    _, per_image = image_reward.model.inference_rank("a dog in the city", IMAGES)
    assert batched == pytest.approx(per_image, abs=1e-5)
    assert image_reward.score(IMAGES[2:3], "a dog in the city")[0] == pytest.approx(batched[2], abs=1e-5)


def test_tiny_image_reward_build_is_deterministic(tmp_path: Path, ir_folder: Path) -> None:
    again = tiny.build_tiny_image_reward(tmp_path / "again")
    assert folder_fingerprint(again) == folder_fingerprint(ir_folder)
    name = layout.IMAGE_REWARD_CHECKPOINT
    assert (again / name).read_bytes() == (ir_folder / name).read_bytes()


def test_image_reward_folder_is_a_scorer_reference(ir_folder: Path, tmp_path: Path) -> None:
    assert check_model_ref(str(ir_folder), "scorer") is None
    as_folder = resolve_model(str(ir_folder), kind="scorer", models_dir=tmp_path)
    assert as_folder.source == "folder"
    assert isinstance(load_scorer(as_folder), ImageRewardScorer)


def test_image_reward_preset_names_the_packages_checkpoint(tmp_path: Path) -> None:
    r = resolve_model("image-reward", kind="scorer", models_dir=tmp_path)
    assert (r.source, r.path_or_id, r.preset) == ("hub", "ImageReward-v1.0", "image-reward")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    (Path.home() / ".cache" / "ImageReward" / "ImageReward.pt").exists(), reason="real checkpoint cached"
)
def test_image_reward_offline_without_checkpoint_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = resolve_model("image-reward", kind="scorer", models_dir=tmp_path)
    with pytest.raises(RuntimeError, match="could not be fetched"):
        load_scorer(r)


# -------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_uses_the_validator_model(models_dir: Path) -> None:
    r = build_and_resolve("clip-score", kind="scorer", models_dir=models_dir)
    named = build_and_resolve("clip-score:tiny-clip", kind="scorer", models_dir=models_dir)
    validator = build_and_resolve("tiny-clip", kind="validator", models_dir=models_dir)
    assert r.fingerprint == named.fingerprint == validator.fingerprint and r.preset == "clip-score"
    scorer = load_scorer(named)
    assert isinstance(scorer, ClipScoreScorer) and isinstance(scorer, Scorer)
    cosines = ClipAlignment.load(validator).alignment(IMAGES, "a red cat")
    scores = scorer.score(IMAGES, "a red cat")
    assert scores == pytest.approx([100 * max(c, 0.0) for c in cosines], abs=1e-4)
    assert all(0.0 <= s <= 100.0 for s in scores)


def test_clip_score_reference_checks_its_validator(tmp_path: Path) -> None:
    assert check_model_ref("clip-score", "scorer") is None
    assert check_model_ref("clip-score:openai/clip-vit-base-patch32", "scorer") is None
    msg = check_model_ref(f"clip-score:{tmp_path / 'nope'}", "scorer")
    assert msg is not None and "clip-score" in msg and "does not exist" in msg
    with pytest.raises(ModelRefError, match="tiny-clip"):
        resolve_model("clip-score:tiny", kind="scorer", models_dir=tmp_path)
