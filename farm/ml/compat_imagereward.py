"""Make the image-reward package (ImageReward 1.5) import and load with the farm's torch/transformers.

Why a module of our own instead of pinning old versions: image-reward 1.5 was written against transformers
4.2x and a torchvision built for the same CUDA torch. Pinning those would drag the whole farm (diffusers,
transformers, the CPU torch build) back by years. What actually breaks is small and well defined, so each
break gets one shim here, applied before ``import ImageReward``, each a no-op where the installed library
still has what ImageReward expects:

1. torchvision's custom ops (``declare_torchvision_ops``). image-reward pins timm 0.6.13, which pulls the
   index's torchvision build; its C++ extension links CUDA torch libraries that the CPU torch does not ship,
   so the extension fails to load. torchvision then still registers fake (meta) kernels for ``nms`` and
   ``qnms`` unconditionally, which raises "operator torchvision::nms does not exist" and makes every later
   ``import torchvision`` (diffusers, transformers image processors, ImageReward itself) fail. Declaring
   those two operator signatures through ``torch.library`` first lets torchvision import; the operators
   have no kernel, so calling them still fails loudly (ImageReward never does: it uses only transforms).
2. ``apply_chunking_to_forward``, ``prune_linear_layer`` and ``find_pruneable_heads_and_indices`` used to
   live in ``transformers.modeling_utils``; transformers 5 keeps the first two in ``pytorch_utils`` and
   dropped the third. ImageReward's BLIP text encoder (``med.py``) imports all three from the old place.
3. ``init_weights`` versus ``post_init``: ImageReward's ``BertModel`` calls ``self.init_weights()`` at the
   end of ``__init__``, as transformers 4 models did. In transformers 5 ``init_weights`` assumes
   ``post_init`` has already run (it ties weights from a mapping ``post_init`` computes), so the model must
   run ``post_init`` instead, which initialises the weights itself.
4. ``invert_attention_mask`` and 5. ``get_head_mask`` were methods every transformers 4 model inherited
   (``ModuleUtilsMixin``); transformers 5 removed them. The BLIP encoder calls both in every forward pass.
6. ``additional_special_tokens_ids`` is gone from transformers 5 tokenizers; BLIP's ``init_tokenizer`` reads
   it to find the ``[ENC]`` token. ``blip_overrides`` installs a tokenizer factory that asks for the id by
   token instead, and can take the BERT vocabulary from a local folder rather than the hub.
7. ``pkg_resources`` (setuptools < 81) is imported by the ``clip`` package (openai-clip), which ImageReward
   imports for its CLIP and aesthetic baselines; importing it warns about its own deprecation, which is
   silenced here so worker logs stay readable.
8. Import side effects: BLIP's modules call ``warnings.filterwarnings("ignore")`` and set transformers'
   log verbosity to "error" for the whole process; ``import_image_reward`` puts both back.

``blip_overrides`` also lets a test-sized ImageReward (small ViT instead of ViT-L, one BERT layer) load
through the package's own ``ImageReward.load``: BLIP hard-codes ``vit='large'`` and the hub tokenizer
``bert-base-uncased``, and both are looked up by name at construction time, so they can be swapped for the
duration of one load without touching the package's files.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

#: The BERT vocabulary ImageReward's BLIP was trained with; used when no local tokenizer folder is given.
HUB_TOKENIZER = "bert-base-uncased"

#: Signatures of the two torchvision operators that torchvision registers fake kernels for unconditionally.
TORCHVISION_OP_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_lock = threading.RLock()
# The torch.library handle must stay alive: dropping it would unregister the declared operators again.
_torchvision_lib: torch.library.Library | None = None
_image_reward: ModuleType | None = None


@dataclass(frozen=True)
class VitSpec:
    """Size of the BLIP vision transformer to build instead of the package's hard-coded ViT-L/16.

    ``width`` becomes BLIP's ``vision_width`` (the cross-attention input of the text encoder).
    """

    width: int
    depth: int
    heads: int
    patch_size: int = 16


# --------------------------------------------------------------------------------------------- torchvision


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _torchvision_extension_loads() -> bool:
    """Whether torchvision's own C++ extension loads here (then its real operators are registered)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for location in spec.submodule_search_locations:
        for lib in sorted(Path(location).glob("_C*.so")) + sorted(Path(location).glob("_C*.pyd")):
            try:
                torch.ops.load_library(str(lib))
            except (OSError, RuntimeError):
                return False
            return True
    return False


def declare_torchvision_ops() -> list[str]:
    """Declare torchvision's ``nms``/``qnms`` operator signatures if its extension cannot provide them.

    Must run before the first ``import torchvision``. Returns the operators declared (empty when
    torchvision is absent, already imported, or its extension loads and registers the real ones).
    """
    global _torchvision_lib
    with _lock:
        if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
            return []
        missing = [name for name in TORCHVISION_OP_SCHEMAS if not _op_exists(name)]
        if not missing or _torchvision_extension_loads():
            return []
        _torchvision_lib = _torchvision_lib or torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _torchvision_lib.define(TORCHVISION_OP_SCHEMAS[name])
        return missing


# -------------------------------------------------------------------------------------- transformers 5


def find_pruneable_heads_and_indices(
    heads: Sequence[int] | set[int], n_heads: int, head_size: int, already_pruned_heads: set[int]
) -> tuple[set[int], torch.LongTensor]:
    """Which heads to prune (not pruned before) and the flat indices of the weight rows to keep.

    Head numbers refer to the original model; heads pruned earlier are gone from the layer, so a later
    head's rows start that many heads earlier.
    """
    to_prune = set(heads) - set(already_pruned_heads)
    keep = torch.ones(n_heads, head_size)
    for head in to_prune:
        shift = sum(1 for pruned in already_pruned_heads if pruned < head)
        keep[head - shift] = 0
    index = torch.arange(n_heads * head_size)[keep.view(-1).eq(1)].long()
    return to_prune, index  # type: ignore[return-value]


def _prune_linear_layer(layer: nn.Linear, index: torch.LongTensor, dim: int = 0) -> nn.Linear:
    """A copy of ``layer`` keeping only the rows (dim 0) or input columns (dim 1) listed in ``index``."""
    index = index.to(layer.weight.device)
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = None
    if layer.bias is not None:
        bias = (layer.bias if dim == 1 else layer.bias[index]).detach().clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None).to(layer.weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _apply_chunking_to_forward(
    forward_fn: Callable[..., torch.Tensor], chunk_size: int, chunk_dim: int, *input_tensors: torch.Tensor
) -> torch.Tensor:
    """Run ``forward_fn`` on slices of ``chunk_size`` along ``chunk_dim``, concatenated (0: no chunking)."""
    if chunk_size <= 0:
        return forward_fn(*input_tensors)
    length = input_tensors[0].shape[chunk_dim]
    if length % chunk_size:
        raise ValueError(f"dimension {chunk_dim} has size {length}, not a multiple of {chunk_size}")
    pieces = zip(*(t.split(chunk_size, dim=chunk_dim) for t in input_tensors), strict=True)
    return torch.cat([forward_fn(*piece) for piece in pieces], dim=chunk_dim)


def patch_transformers_modeling_utils() -> list[str]:
    """Put the three helpers ImageReward imports back into ``transformers.modeling_utils`` where missing.

    Prefers transformers' own implementation where it merely moved (``pytorch_utils``). Returns the names set.
    """
    import transformers.modeling_utils as modeling_utils

    try:
        from transformers import pytorch_utils
    except ImportError:  # pragma: no cover - every transformers the farm supports has it
        pytorch_utils = None  # type: ignore[assignment]
    wanted: dict[str, Callable[..., Any]] = {
        "apply_chunking_to_forward": getattr(pytorch_utils, "apply_chunking_to_forward", None)
        or _apply_chunking_to_forward,
        "prune_linear_layer": getattr(pytorch_utils, "prune_linear_layer", None) or _prune_linear_layer,
        "find_pruneable_heads_and_indices": getattr(pytorch_utils, "find_pruneable_heads_and_indices", None)
        or find_pruneable_heads_and_indices,
    }
    added = []
    for name, fn in wanted.items():
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, fn)
            added.append(name)
    return added


def invert_attention_mask(self: nn.Module, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """1/0 keep-mask -> additive mask (0 where kept, the dtype's minimum where masked) for all heads.

    A 2-D mask (batch, keys) becomes (batch, 1, 1, keys); a 3-D one (batch, queries, keys) gets the head axis.
    """
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    elif encoder_attention_mask.dim() == 2:
        extended = encoder_attention_mask[:, None, None, :]
    else:
        shape = tuple(encoder_attention_mask.shape)
        raise ValueError(f"attention mask must be 2-D or 3-D, got shape {shape}")
    dtype = _float_dtype(self)
    extended = extended.to(dtype=dtype)
    return (1.0 - extended) * torch.finfo(dtype).min


def get_head_mask(
    self: nn.Module,
    head_mask: torch.Tensor | None,
    num_hidden_layers: int,
    is_attention_chunked: bool = False,
) -> torch.Tensor | list[None]:
    """Per-layer head mask: ``[None] * layers`` when none is given, else a 5-D tensor (layers, batch, heads,
    queries, keys) broadcastable onto the attention probabilities.

    A 1-D mask (heads) applies to every layer; a 2-D one (layers, heads) gives each layer its own.
    """
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    else:
        raise ValueError(f"head mask must be 1-D or 2-D, got shape {tuple(head_mask.shape)}")
    head_mask = head_mask.to(dtype=_float_dtype(self))
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask


def _float_dtype(module: nn.Module) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _init_weights_via_post_init(self: Any) -> None:
    """``init_weights`` for transformers-4-style models: run ``post_init`` once, which initialises.

    ``post_init`` ends by calling ``self.init_weights()`` again; that inner call (flagged) goes on to
    transformers' own ``init_weights``, now with the bookkeeping ``post_init`` prepared. On transformers 4,
    where ``post_init`` also just initialises, the result is the same as the old direct call.
    """
    from transformers.modeling_utils import PreTrainedModel

    if self.__dict__.get("_farm_in_post_init"):
        PreTrainedModel.init_weights(self)
        return
    self.__dict__["_farm_in_post_init"] = True
    try:
        self.post_init()
    finally:
        del self.__dict__["_farm_in_post_init"]


def patch_blip_text_encoder(med: ModuleType) -> list[str]:
    """Give ImageReward's ``med.BertPreTrainedModel`` what transformers 5 took away. Returns the names set."""
    base = med.BertPreTrainedModel
    added = []
    for name, fn in (("invert_attention_mask", invert_attention_mask), ("get_head_mask", get_head_mask)):
        if not hasattr(base, name):
            setattr(base, name, fn)
            added.append(name)
    if base.__dict__.get("init_weights") is not _init_weights_via_post_init:
        base.init_weights = _init_weights_via_post_init
        added.append("init_weights")
    return added


# ------------------------------------------------------------------------------------------------- import


def import_image_reward() -> ModuleType:
    """Apply the shims and import the ``ImageReward`` package once per process; returns it (``RM``)."""
    global _image_reward
    with _lock:
        if _image_reward is not None:
            return _image_reward
        declare_torchvision_ops()
        patch_transformers_modeling_utils()
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        # catch_warnings also undoes the package's own process-wide warnings.filterwarnings("ignore").
        with warnings.catch_warnings():
            # pkg_resources (imported by the clip package) announces its own deprecation on import.
            warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            try:
                import ImageReward as RM  # noqa: N813 - the package's own documented alias
                from ImageReward.models.BLIP import med
            finally:
                # BLIP sets transformers' verbosity to "error" for the whole process on import.
                hf_logging.set_verbosity(verbosity)
        patch_blip_text_encoder(med)
        _image_reward = RM
        return RM


def make_blip_tokenizer(source: str | Path = HUB_TOKENIZER) -> Any:
    """BLIP's text tokenizer: BERT WordPiece plus ``[DEC]`` as BOS and ``[ENC]`` as an extra special token.

    Same result as the package's ``init_tokenizer``, but the ``[ENC]`` id is looked up by token (transformers
    5 has no ``additional_special_tokens_ids``) and the vocabulary may come from a local folder.
    """
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(source))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


@contextmanager
def blip_overrides(*, tokenizer: str | Path = HUB_TOKENIZER, vit: VitSpec | None = None) -> Iterator[None]:
    """While active, BLIP models built by ImageReward use ``tokenizer`` and (if given) a ViT of size ``vit``.

    Holds a process-wide lock: the swapped names are module globals of ``ImageReward.models.BLIP``.
    """
    import_image_reward()
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    def create_vit(
        vit_name: str, image_size: int, use_grad_checkpointing: bool = False, ckpt_layer: int = 0,
        drop_path_rate: float = 0,
    ) -> tuple[nn.Module, int]:
        assert vit is not None
        encoder = VisionTransformer(
            img_size=image_size, patch_size=vit.patch_size, embed_dim=vit.width, depth=vit.depth,
            num_heads=vit.heads, use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
            drop_path_rate=drop_path_rate,
        )
        return encoder, vit.width

    with _lock:
        saved = blip_pretrain.init_tokenizer, blip_pretrain.create_vit
        blip_pretrain.init_tokenizer = lambda: make_blip_tokenizer(tokenizer)
        if vit is not None:
            blip_pretrain.create_vit = create_vit
        try:
            yield
        finally:
            blip_pretrain.init_tokenizer, blip_pretrain.create_vit = saved
