"""UDI backbone: a ViT with two class tokens, [CLS] and [CLS+] (Unsqueeze [CLS] Bottleneck, ECCV 2024).

The official backbone (DINO's ViT with ``num_class_token=2``) is timm's ``VisionTransformer`` with ``reg_tokens=1``:
same blocks, same key names, the only difference is that the official ``cls_token`` [1, 2, C] holds both tokens
while timm splits it into ``cls_token`` ([CLS]) and ``reg_token`` ([CLS+]). The sequence is [cls, cls+, patches]
and ``pos_embed`` has a row for each class token in both codes. So we subclass timm's model and change two things:

* the position embedding is resampled the DINO way for other input sizes (bicubic with ``scale_factor=(g+0.1)/G``,
  no antialias), which the 96-px local crops of pretraining need for exactness (timm resamples by size, with
  antialias, and differs by up to 0.1 at 96 px);
* the init of the two class tokens follows the official code (trunc normal .02, timm uses 1e-6).

``forward_features(x)`` returns all final-normed tokens [B, 2+N, C] (token 0 = [CLS], token 1 = [CLS+]);
``forward_head`` pools the [CLS] token as timm does. ``reg_tokens=0`` builds the 1-token (DINO) layout the official
evaluation scripts use.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import UserError
from ._attention import Attention
from ._registry import is_tracing

__all__ = [
    "UDIVisionTransformer", "dino_resample_pos_embed", "checkpoint_filter_fn", "to_timm_vit_state_dict",
    "official_backbone_state_dict",
]

_logger = logging.getLogger(__name__)


@register_notrace_function  # torch.fx: shape logic; a leaf call in traced graphs (as timm's resample_abs_pos_embed)
def dino_resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int,
                            old_grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding``: bicubic with ``scale_factor=(g + 0.1) / G`` (not a resize to ``g``).

    ``pos_embed`` is [1, prefix + G_h*G_w, C]; returns [1, prefix + g_h*g_w, C]. The +0.1 and the use of a scale
    factor (not a size) are what the official code does; resizing to (g_h, g_w) gives other numbers.
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(math.sqrt(n))
        old_grid = (side, side)
    if tuple(old_grid) == tuple(grid):
        return pos_embed
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    patch = patch.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch.float(), scale_factor=((grid[0] + 0.1) / old_grid[0], (grid[1] + 0.1) / old_grid[1]),
        mode="bicubic", align_corners=False,
    ).to(pos_embed.dtype)
    if tuple(patch.shape[-2:]) != tuple(grid):  # cannot happen for sane sizes; guard against silent misuse
        raise UserError(f"DINO pos-embed resampling produced grid {tuple(patch.shape[-2:])}, wanted {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([prefix, patch], dim=1)


torch.fx.wrap("dino_resample_pos_embed")  # called from a method: wrapped in every trace, not just autowrapped


class UDIVisionTransformer(VisionTransformer):
    """timm ViT with [CLS] + [CLS+] (``reg_tokens=1``) and DINO-style position-embedding resampling."""

    def __init__(self, *args, reg_tokens: int = 1, dynamic_img_size: bool = True, head_hidden_dim: int = 0,
                 **kwargs):
        """``head_hidden_dim`` > 0 puts the first layer of UDI's projection head (Linear C -> hidden + GELU) between
        the pooled [CLS] and the classifier, as the official semi-supervised fine-tuning does
        (``--finetune_head_layer 1``: hidden 2048); official checkpoints load it from ``head.0.mlp.0``."""
        kwargs.setdefault("class_token", True)
        kwargs.setdefault("no_embed_class", False)
        kwargs.setdefault("attn_layer", Attention)  # timm's, with the CPU bf16 rule of models/_attention.py
        if not kwargs["class_token"] or kwargs["no_embed_class"]:
            raise UserError("UDIVisionTransformer needs class_token=True and no_embed_class=False "
                            "(the official layout has a pos_embed row per class token).")
        self.head_hidden_dim = head_hidden_dim
        super().__init__(*args, reg_tokens=reg_tokens, dynamic_img_size=dynamic_img_size, **kwargs)
        self.head_hidden = None
        if head_hidden_dim:
            self.head_hidden = nn.Sequential(nn.Linear(self.embed_dim, head_hidden_dim), nn.GELU())
            trunc_normal_(self.head_hidden[0].weight, std=0.02)
            nn.init.zeros_(self.head_hidden[0].bias)
            self.reset_classifier(self.num_classes)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if self.head_hidden_dim and num_classes > 0:  # the classifier reads the hidden layer's output
            self.head = nn.Linear(self.head_hidden_dim, num_classes).to(self.cls_token.device, self.cls_token.dtype)
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = super().forward_head(x, pre_logits=True)
        if pre_logits:
            return x
        return self.head(self.head_hidden(x) if self.head_hidden is not None and self.num_classes else x)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset=needs_reset)
        # official init: both class tokens trunc_normal(.02) like pos_embed (timm: normal 1e-6)
        for t in (self.cls_token, self.reg_token):
            if t is not None:
                trunc_normal_(t, std=0.02)

    def _check_input(self, x: torch.Tensor) -> None:
        p = self.patch_embed.patch_size
        if is_tracing():  # torch.fx: the shape is symbolic
            return
        if x.ndim != 4 or x.shape[-2] % p[0] or x.shape[-1] % p[1]:
            raise UserError(
                f"{type(self).__name__} takes [B, C, H, W] images with H and W multiples of the patch size {p[0]} "
                f"(e.g. 224 or 96 for patch 16); got shape {tuple(x.shape)}.")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:  # patch_embed returns NHWC (a static test: torch.fx traces it)
            B, H, W, C = x.shape
            x = x.reshape(B, H * W, C)
            grid = (H, W)
        else:
            grid = tuple(self.patch_embed.grid_size)
        pos_embed = dino_resample_pos_embed(
            self.pos_embed, grid, self.num_prefix_tokens, tuple(self.patch_embed.grid_size))
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_input(x)
        return super().forward_features(x, *args, **kwargs)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Block output BEFORE the final norm, [B, prefix + N, C] (what UDI's SRS module consumes)."""
        self._check_input(x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return self.blocks(x)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block, [B, heads, prefix + N, prefix + N] (for attention maps).

        Computed explicitly from the last block's weights (the blocks themselves use fused SDPA).
        """
        self._check_input(x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for blk in self.blocks[:-1]:
            x = blk(x)
        attn = self.blocks[-1].attn
        B, N, C = x.shape
        qkv = attn.qkv(self.blocks[-1].norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

_OFFICIAL_WRAPPERS = ("teacher", "student", "state_dict", "model", "module")
_CLASSIFIER = ("head.weight", "head.bias")  # a fine-tuned classifier (ours, or a fine-tuned official ViT's)


def _unwrap_official(state_dict: Dict, key: str = "teacher") -> Dict:
    sd = state_dict
    if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
        sd = sd[key]
    for k in _OFFICIAL_WRAPPERS:
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    return sd


def official_head_first_layer(state_dict: Dict, key: str = "teacher") -> Dict[str, torch.Tensor]:
    """``head_hidden.0.*`` from the first layer of an official checkpoint's projection head: ``head.0.mlp.0.*``
    (MultiCropWrapper's list of shared heads) or ``head.mlp.0.*``; empty when it has none."""
    out = {}
    for k, v in _unwrap_official(state_dict, key).items():
        k = k[len("module."):] if k.startswith("module.") else k
        for prefix in ("head.0.mlp.0.", "head.mlp.0."):
            if k.startswith(prefix) and isinstance(v, torch.Tensor):
                out["head_hidden.0." + k[len(prefix):]] = v
    return out


def official_backbone_state_dict(state_dict: Dict, key: str = "teacher") -> Dict[str, torch.Tensor]:
    """The bare ViT keys of an official UDI checkpoint (full, backbone-only, or with ``module.``/``backbone.``).

    A full pretraining checkpoint holds ``student`` and ``teacher``: ``key`` picks one (the evaluation scripts use
    the teacher). SRS-module and projection-head keys are dropped.
    """
    out = {}
    for k, v in _unwrap_official(state_dict, key).items():
        if not isinstance(v, torch.Tensor):
            continue
        if k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("backbone.backbone."):  # MultiCropWrapper(UDIWrapper(ViT))
            k = k[len("backbone.backbone."):]
        elif k.startswith(("backbone.attn.", "backbone.norm1.")) or (k.startswith("head.") and k not in _CLASSIFIER):
            continue  # SRS module and projection head (head.mlp.*, head.0.*, ...): not part of the backbone
        elif k.startswith("backbone."):
            k = k[len("backbone."):]
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict, model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Official UDI checkpoint (any of its forms) or our own state dict -> ``model``'s state dict.

    Handles: full checkpoints (``teacher`` is used), ``module.`` and ``backbone.``/``backbone.backbone.`` prefixes,
    the 2-token ``cls_token`` [1,2,C] (split into timm's ``cls_token`` + ``reg_token``, or its [CLS+] dropped for a
    1-token model), DINO-style resampling of ``pos_embed`` to the model's grid, and a missing classifier (the
    pretraining checkpoints have none: the model's own initial head is kept).
    """
    sd = official_backbone_state_dict(state_dict)
    own = model.state_dict()
    n_reg = 0 if getattr(model, "reg_token", None) is None else model.reg_token.shape[1]
    npt = 1 + n_reg
    cls = sd.get("cls_token")
    if cls is not None and "reg_token" not in sd:
        n_ckpt = cls.shape[1]
        if n_ckpt < npt:
            raise UserError(f"checkpoint has {n_ckpt} class token(s), the model needs {npt}: build the model "
                            "with reg_tokens=0 for a 1-token (DINO) checkpoint.")
        sd["cls_token"] = cls[:, :1]
        if n_reg:
            sd["reg_token"] = cls[:, 1:npt]
        if "pos_embed" in sd and n_ckpt > npt:  # 2-token checkpoint into a 1-token model: drop the [CLS+] row
            pe = sd["pos_embed"]
            sd["pos_embed"] = torch.cat([pe[:, :npt], pe[:, n_ckpt:]], dim=1)
    elif "reg_token" in sd and not n_reg:  # our [CLS]+[CLS+] layout (a pretrain run) into a 1-token model
        n_ckpt = 1 + sd.pop("reg_token").shape[1]
        if "pos_embed" in sd:
            pe = sd["pos_embed"]
            sd["pos_embed"] = torch.cat([pe[:, :1], pe[:, n_ckpt:]], dim=1)
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        n_old = sd["pos_embed"].shape[1] - npt
        side = int(math.sqrt(n_old))
        if side * side == n_old and sd["pos_embed"].device.type != "meta":
            sd["pos_embed"] = dino_resample_pos_embed(sd["pos_embed"], tuple(model.patch_embed.grid_size), npt,
                                                      (side, side))
    if "head_hidden.0.weight" in own and "head_hidden.0.weight" not in sd:
        first = official_head_first_layer(state_dict)
        if first:
            sd.update(first)
        else:
            _logger.warning("the checkpoint has no projection head: the head's first layer (head_hidden) keeps its "
                            "new initialisation")
            sd.update({k: v for k, v in own.items() if k.startswith("head_hidden.")})
    for k in _CLASSIFIER:
        if k in own and k not in sd:
            sd[k] = own[k]
        elif k not in own:  # a classifier run used as a backbone (num_classes=0): its head is not wanted
            sd.pop(k, None)
    return sd


def to_timm_vit_state_dict(state_dict: Dict, keep_head: bool = False) -> Dict[str, torch.Tensor]:
    """A state dict ``timm.create_model('vit_small_patch16_224', reg_tokens=1, num_classes=0)`` loads strictly.

    Accepts our model's state dict or any official UDI checkpoint form. The result's ``reg_token`` is [CLS+].
    (timm resamples ``pos_embed`` its own way at other input sizes; at the training size the two agree.)
    """
    sd = official_backbone_state_dict(state_dict)
    if "reg_token" not in sd and sd["cls_token"].shape[1] == 2:
        sd["reg_token"] = sd["cls_token"][:, 1:2]
        sd["cls_token"] = sd["cls_token"][:, :1]
    if not keep_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------
# builders

def _create(variant: str, pretrained: bool = False, **kwargs) -> UDIVisionTransformer:
    return build_model_with_cfg(
        UDIVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=3),
        **kwargs,
    )


def _cfg(**kwargs):
    # SSL backbones: the official checkpoints carry no classifier, so num_classes defaults to 0 (features).
    return {
        "num_classes": 0, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "udi_vit_tiny_patch16.untrained": _cfg(),
    "udi_vit_small_patch16.untrained": _cfg(),
    "udi_vit_base_patch16.untrained": _cfg(),
    "udi_vit_test.untrained": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
})


@register_model
def udi_vit_tiny_patch16(pretrained: bool = False, **kwargs) -> UDIVisionTransformer:
    """ViT-Ti/16 with [CLS] and [CLS+] (5.52 M parameters)."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create("udi_vit_tiny_patch16", pretrained, **dict(args, **kwargs))


@register_model
def udi_vit_small_patch16(pretrained: bool = False, **kwargs) -> UDIVisionTransformer:
    """ViT-S/16 with [CLS] and [CLS+] (21.67 M parameters), the README's pretraining backbone."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("udi_vit_small_patch16", pretrained, **dict(args, **kwargs))


@register_model
def udi_vit_base_patch16(pretrained: bool = False, **kwargs) -> UDIVisionTransformer:
    """ViT-B/16 with [CLS] and [CLS+] (85.80 M parameters)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create("udi_vit_base_patch16", pretrained, **dict(args, **kwargs))


@register_model
def udi_vit_test(pretrained: bool = False, **kwargs) -> UDIVisionTransformer:
    """Tiny CPU variant: 32x32 input, patch 4, dim 32, depth 3 (for tests and the digits learning check)."""
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
    return _create("udi_vit_test", pretrained, **dict(args, **kwargs))
