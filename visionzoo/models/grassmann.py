"""GCR: Grassmann Class Representation (ICCV 2023) as a head on any timm / visionzoo backbone.

Each class i is a k-dimensional subspace of the feature space, stored as k orthonormal rows of one weight matrix
W of shape (num_classes * k, in_features) (rows [i*k, (i+1)*k) span class i, the official layout). The logit is
``gamma * || S_i^T normalize(x) ||``, bounded in [0, gamma]. The subspaces must be trained on the Grassmann manifold
with the Riemannian optimizer in ``visionzoo.optim.grassmann`` (plain SGD/AdamW would leave the manifold).

* :class:`GrassmannHead` - the head alone (official QR initialisation and forward).
* :class:`GrassmannClassifier` - backbone (anything with ``forward_features``/``forward_head``, e.g. any timm model)
  + :class:`GrassmannHead`, with the timm classifier API. :func:`to_grassmann` wraps an existing classifier.
* Registered ``<timm backbone>_gcr<k>`` models for every official config, and ``gcr_test`` for CPU tests.
* :func:`checkpoint_filter_fn` converts official mmpretrain checkpoints (``backbone.*``, ``head.fc.weight``).
"""
from __future__ import annotations

import re
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..errors import UserError
from ._attention import follow_cpu_rule
from ._registry import accepts_factory_kwargs, is_tracing

__all__ = ["GrassmannHead", "GrassmannClassifier", "to_grassmann", "checkpoint_filter_fn", "grassmann_heads"]


class GrassmannHead(nn.Module):
    """Logits ``gamma * ||S_i^T x / ||x|| ||`` for ``num_classes`` subspaces of dimension ``dim``.

    ``weight`` has shape ``(num_classes * dim, in_features)``; rows ``[i*dim, (i+1)*dim)`` are an orthonormal basis
    of class i. Input ``(..., in_features)`` -> logits ``(..., num_classes)``. ``gamma`` is fixed (not learned).
    """

    on_manifold = True  # its parameters are orthonormal bases: nothing may rescale them

    def __init__(self, in_features: int, num_classes: int, dim: int = 8, gamma: float = 25.0,
                 device=None, dtype=None):
        super().__init__()
        if dim < 1 or dim > in_features:
            raise UserError(f"GrassmannHead: subspace dim must be in [1, in_features={in_features}], got {dim}.")
        if num_classes < 1:
            raise UserError(f"GrassmannHead: num_classes must be >= 1, got {num_classes} (use nn.Identity for 0).")
        self.in_features, self.num_classes, self.dim, self.gamma = in_features, num_classes, dim, float(gamma)
        self.weight = nn.Parameter(torch.empty(num_classes * dim, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: i.i.d. N(0, 1), then each class block replaced by the Q of its reduced QR (no sign fix)."""
        nn.init.normal_(self.weight)
        if self.weight.device.type == "meta":
            return
        blocks = self.weight.view(self.num_classes, self.dim, self.in_features).transpose(1, 2).float()
        q = torch.linalg.qr(blocks).Q  # (K, n, k), Householder convention as torch/LAPACK gives it
        self.weight.copy_(q.transpose(1, 2).reshape_as(self.weight))

    def subspaces(self) -> torch.Tensor:
        """Bases as a ``(num_classes, in_features, dim)`` tensor (orthonormal columns)."""
        return self.weight.view(self.num_classes, self.dim, self.in_features).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_tracing() and x.shape[-1] != self.in_features:
            raise UserError(f"GrassmannHead expects features of width {self.in_features}, got shape {tuple(x.shape)}.")
        z = self.gamma * F.linear(F.normalize(x, dim=-1), self.weight)  # gamma before the norm, as official
        return torch.linalg.vector_norm(z.unflatten(-1, (self.num_classes, self.dim)), dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, dim={self.dim}, gamma={self.gamma}"


def grassmann_heads(model: nn.Module) -> list[tuple[str, GrassmannHead]]:
    """All GrassmannHead submodules of ``model`` as (name, module); the optimizer uses this to find subspaces."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GrassmannHead)]


@accepts_factory_kwargs
class GrassmannClassifier(nn.Module):
    """Any backbone + a GCR head, with the timm classifier API.

    Args:
        backbone: a timm / visionzoo model name (built with ``num_classes=0``) or a model instance (its classifier
            is reset to 0). It must have ``forward_features`` and ``forward_head(x, pre_logits=True)``.
        num_classes: number of classes (0: no head, ``forward`` returns pooled features).
        dim: subspace dimension k of each class.
        gamma: logit scale (25 in every official config).
        drop_rate: dropout right before the GCR head (the backbone's own classifier dropout is not used).
        pre_logits_drop: dropout inside the backbone's pre-logits MLP (timm VGG ``pre_logits.drop``); the official
            VGG13-BN GCR keeps 0.5 there and no dropout after the last fc.
        backbone_kwargs / **kwargs: passed to ``timm.create_model`` for the backbone (drop_path_rate, img_size, ...).
    """

    def __init__(self, backbone: str | nn.Module = "resnet50d", num_classes: int = 1000, dim: int = 8,
                 gamma: float = 25.0, drop_rate: float = 0.0, pre_logits_drop: float | None = None,
                 backbone_kwargs: dict | None = None, **kwargs: Any):
        super().__init__()
        if isinstance(backbone, str):
            backbone = timm.create_model(backbone, num_classes=0, **{**(backbone_kwargs or {}), **kwargs})
        else:
            if kwargs or backbone_kwargs:
                raise UserError(f"GrassmannClassifier: backbone kwargs {sorted({**(backbone_kwargs or {}), **kwargs})}"
                                " only apply when the backbone is given by name.")
            backbone.reset_classifier(0)
        for attr in ("forward_features", "forward_head"):
            if not hasattr(backbone, attr):
                raise TypeError(f"GrassmannClassifier: backbone {type(backbone).__name__} has no {attr}(); "
                                "use a timm or visionzoo classifier.")
        if pre_logits_drop is not None:
            drop = getattr(getattr(backbone, "pre_logits", None), "drop", None)
            if not isinstance(drop, nn.Dropout):
                raise UserError(f"pre_logits_drop: backbone {type(backbone).__name__} has no pre_logits.drop "
                                "(only timm VGG-style backbones have one); leave it None.")
            drop.p = float(pre_logits_drop)
        self.backbone = follow_cpu_rule(backbone)  # timm's ViT attention: fp32 on CPUs under bf16
        self.output_fmt = getattr(backbone, "output_fmt", "NCHW")  # timm's swin: NHWC maps
        self.in_chans = getattr(backbone, "in_chans", None) or {**(backbone_kwargs or {}), **kwargs}.get("in_chans", 3)
        self.dim, self.gamma, self.drop_rate = dim, float(gamma), drop_rate
        self.num_features = backbone.num_features
        self.head_hidden_size = getattr(backbone, "head_hidden_size", backbone.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head = GrassmannHead(self.head_hidden_size, num_classes, dim, gamma) if num_classes > 0 else nn.Identity()
        info = getattr(backbone, "feature_info", None) or []
        self.feature_info = [dict(f, module=f"backbone.{f['module']}") if f.get("module") else dict(f) for f in info]

    # --- timm API ---------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        nwd = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in nwd}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, dim: int | None = None) -> None:
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool)
        self.dim = dim or self.dim
        self.num_classes = num_classes
        ref = next(self.parameters(), None)
        dd = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        self.head = GrassmannHead(self.head_hidden_size, num_classes, self.dim, self.gamma, **dd) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.backbone.forward_head(x, pre_logits=True)  # pooled classifier input (GAP / cls token / VGG fc2)
        if pre_logits:
            return x
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        if not hasattr(self.backbone, "forward_intermediates"):
            raise NotImplementedError(f"backbone {type(self.backbone).__name__} has no forward_intermediates().")
        return self.backbone.forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early,
                                                   output_fmt=output_fmt, intermediates_only=intermediates_only)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head:
            self.reset_classifier(0)
        return take


def to_grassmann(model: str | nn.Module, dim: int = 8, gamma: float = 25.0, num_classes: int | None = None,
                 drop_rate: float = 0.0, **kwargs: Any) -> GrassmannClassifier:
    """Turn a timm / visionzoo classifier (instance or name) into a GCR classifier with ``dim``-dim class subspaces.

    ``num_classes`` defaults to the model's. The backbone's weights are kept (only its classifier is dropped); the
    eval transform config (``pretrained_cfg``) is carried over with ``classifier='head'``.
    """
    if isinstance(model, str):
        model = timm.create_model(model, **kwargs)
    elif kwargs:
        raise UserError(f"to_grassmann: extra kwargs {sorted(kwargs)} only apply when the model is given by name.")
    n = model.num_classes if num_classes is None else num_classes
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    out = GrassmannClassifier(model, num_classes=n, dim=dim, gamma=gamma, drop_rate=drop_rate)
    first = cfg.get("first_conv")
    cfg.update(classifier="head", num_classes=n,
               first_conv=f"backbone.{first}" if isinstance(first, str) else first)
    out.pretrained_cfg = out.default_cfg = cfg
    return out


# ----------------------------------------------------------------------------------------------------------------
# official mmpretrain checkpoints -> timm backbone + our head

def _swin_merge_perm(channels_4c: int) -> torch.Tensor:
    """Index map for PatchMerging: ours[t] = official[perm[t]].

    mmcv's Unfold(2, 2) orders the 4C merged channels as c*4 + 2*i + j (i: row offset, j: column offset); timm
    concatenates the 2x2 neighbours as (2*j + i)*C + c.
    """
    c_ = channels_4c // 4
    t = torch.arange(channels_4c)
    j, i, c = t // (2 * c_), (t // c_) % 2, t % c_
    return c * 4 + 2 * i + j


def _convert_resnet(sd: dict, model: nn.Module) -> dict:
    own = model.state_dict()
    out = {}
    # downsample: official param-holding indices (0,1 or 1,2) map in order onto ours (timm has a pool slot at 0)
    ours_ds: dict[str, list[int]] = {}
    for k in own:
        m = re.match(r"(layer\d+\.\d+\.downsample)\.(\d+)\.", k)
        if m:
            ours_ds.setdefault(m.group(1), [])
            if int(m.group(2)) not in ours_ds[m.group(1)]:
                ours_ds[m.group(1)].append(int(m.group(2)))
    off_ds: dict[str, list[int]] = {}
    for k in sd:
        m = re.match(r"(layer\d+\.\d+\.downsample)\.(\d+)\.", k)
        if m and int(m.group(2)) not in off_ds.setdefault(m.group(1), []):
            off_ds[m.group(1)].append(int(m.group(2)))
    stem = {"stem.0.conv": "conv1.0", "stem.0.bn": "conv1.1", "stem.1.conv": "conv1.3", "stem.1.bn": "conv1.4",
            "stem.2.conv": "conv1.6", "stem.2.bn": "bn1"}
    for k, v in sd.items():
        m = re.match(r"(stem\.\d\.(?:conv|bn))\.(.*)", k)
        if m:
            k = f"{stem[m.group(1)]}.{m.group(2)}"
        m = re.match(r"(layer\d+\.\d+\.downsample)\.(\d+)\.(.*)", k)
        if m:
            pos = sorted(off_ds[m.group(1)]).index(int(m.group(2)))
            k = f"{m.group(1)}.{sorted(ours_ds.get(m.group(1), [0, 1]))[pos]}.{m.group(3)}"
        out[k] = v
    return out


def _convert_vgg(sd: dict, model: nn.Module) -> dict:
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    official = sorted({int(m.group(1)) for k in sd if (m := re.match(r"features\.(\d+)\.conv\.", k))})
    where = {o: convs[n] for n, o in enumerate(official)}
    out = {}
    for k, v in sd.items():
        m = re.match(r"features\.(\d+)\.(conv|bn)\.(.*)", k)
        if m:
            idx = where[int(m.group(1))] + (1 if m.group(2) == "bn" else 0)
            out[f"features.{idx}.{m.group(3)}"] = v
            continue
        m = re.match(r"classifier\.(\d+)\.(weight|bias)", k)
        if m:
            fc = {"0": "pre_logits.fc1", "3": "pre_logits.fc2", "6": "head.fc"}[m.group(1)]
            if m.group(2) == "weight" and fc.startswith("pre_logits"):  # Linear -> conv (7x7 on 512, 1x1)
                conv = model.get_submodule(fc)
                v = v.reshape(v.shape[0], conv.in_channels, *conv.kernel_size)
            out[f"{fc}.{m.group(2)}"] = v
            continue
        out[k] = v
    return out


def _convert_swin(sd: dict, model: nn.Module) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        k = k.replace("patch_embed.projection", "patch_embed.proj").replace("attn.w_msa.", "attn.")
        k = k.replace("ffn.layers.0.0", "mlp.fc1").replace("ffn.layers.1", "mlp.fc2")
        m = re.match(r"stages\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)", k)
        if m:
            perm = _swin_merge_perm(v.shape[-1])
            v = v[perm] if v.ndim == 1 else v[:, perm]
            k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}.{m.group(3)}"
        k = re.sub(r"^stages\.", "layers.", k)
        k = re.sub(r"^norm3\.", "norm.", k)
        out[k] = v
    return out


def _convert_vit(sd: dict, model: nn.Module) -> dict:
    out = {}
    for k, v in sd.items():
        k = k.replace("patch_embed.projection", "patch_embed.proj")
        k = re.sub(r"^layers\.(\d+)\.", r"blocks.\1.", k)
        k = k.replace(".ln1.", ".norm1.").replace(".ln2.", ".norm2.")
        k = k.replace("attn.gamma1.weight", "ls1.gamma").replace("ffn.gamma2.weight", "ls2.gamma")
        k = k.replace("ffn.layers.0.0", "mlp.fc1").replace("ffn.layers.1", "mlp.fc2")
        k = re.sub(r"^ln1\.", "norm.", k)
        out[k] = v
    return out


def _convert_backbone(sd: dict, model: nn.Module) -> dict:
    """Official mmpretrain backbone keys (``backbone.`` stripped) -> keys of the timm ``model``."""
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vgg import VGG
    from timm.models.vision_transformer import VisionTransformer

    for cls, fn in ((ResNet, _convert_resnet), (VGG, _convert_vgg), (SwinTransformer, _convert_swin),
                    (VisionTransformer, _convert_vit)):
        if isinstance(model, cls):
            return fn(sd, model)
    return dict(sd)  # other backbones have no official GCR checkpoint: keys are taken as ours


def _vector_head_key(key: str, model: nn.Module) -> str:
    """Official vector-baseline classifier keys -> the plain timm model's classifier."""
    m = re.match(r"head\.(?:fc|layers\.head)\.(weight|bias)$", key)
    if not m:
        return key
    name = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    return f"{name}.{m.group(1)}"


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official GCR (mmpretrain) state dict -> ours; our own state dicts pass through unchanged.

    Handles ``GrassmannClassifier`` models (``backbone.*`` -> timm backbone keys, ``head.fc.weight`` ->
    ``head.weight``), a bare ``GrassmannHead`` (``fc.weight``), any module holding GrassmannHeads, and the plain timm
    models of the official vector baselines (``backbone.*`` + ``head.fc`` / ``head.layers.head`` /
    ``backbone.classifier.6``). ``state_dict`` / ``module.`` wrappers are unwrapped.
    """
    for key in ("state_dict", "model", "module"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("data_preprocessor.")}
    own = model.state_dict()
    if all(k in own for k in state_dict):
        return dict(state_dict)  # already ours
    heads = {n for n, _ in grassmann_heads(model)}
    out: dict[str, torch.Tensor] = {}
    backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
    if isinstance(model, GrassmannClassifier):
        out.update({f"backbone.{k}": v for k, v in _convert_backbone(backbone_sd, model.backbone).items()})
    elif backbone_sd:  # a plain timm model (vector baseline)
        out.update({_vector_head_key(k, model): v for k, v in _convert_backbone(backbone_sd, model).items()})
    for k, v in rest.items():
        name = k[: -len("fc.weight")].rstrip(".") if k.endswith("fc.weight") else None
        if name is not None and name in heads:  # official GrassmannClsHead: <head>.fc.weight -> <head>.weight
            out[f"{name}.weight" if name else "weight"] = v
        else:
            out[_vector_head_key(k, model)] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# registered models

def _cfg(first_conv: str, crop_pct: float = 0.875, interpolation: str = "bilinear", **kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": crop_pct,
        "interpolation": interpolation, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv, "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2308.01547", "origin_url": "https://github.com/innerlee/GCR", **kwargs,
    }


_RD = "backbone.conv1.0"
# Tags name the official config; crop_pct / interpolation follow its test pipeline (spec section 3).
default_cfgs = generate_default_cfgs({
    "resnet50_gcr8.in1k": _cfg("backbone.conv1"),
    "resnet50d_gcr1.coslr_in1k": _cfg(_RD),
    "resnet50d_gcr4.coslr_in1k": _cfg(_RD),
    "resnet50d_gcr8.coslr_in1k": _cfg(_RD),
    "resnet50d_gcr8.rsb_a1_in1k": _cfg(_RD, crop_pct=224 / 236, interpolation="bicubic"),
    "resnet50d_gcr8.rsb_a1_fixres_in1k": _cfg(_RD, crop_pct=224 / 232, interpolation="bicubic"),
    "resnet50d_gcr8.rsb_a2_in1k": _cfg(_RD, crop_pct=224 / 236, interpolation="bicubic"),
    "resnet50d_gcr8.rsb_a2_fixres_in1k": _cfg(_RD, crop_pct=224 / 232, interpolation="bicubic"),
    "resnet50d_gcr8.rsb_a3_in1k": _cfg(_RD, crop_pct=224 / 236, interpolation="bicubic"),
    "resnet50d_gcr8.rsb_a3_fixres_in1k": _cfg(_RD, crop_pct=224 / 232, interpolation="bicubic"),
    "resnet50d_gcr16.coslr_in1k": _cfg(_RD),
    "resnet50d_gcr32.coslr_in1k": _cfg(_RD),
    "resnet101d_gcr8.coslr_in1k": _cfg(_RD),
    "resnet152d_gcr8.coslr_in1k": _cfg(_RD),
    "vgg13_bn_gcr8.in1k": _cfg("backbone.features.0"),
    "swin_tiny_patch4_window7_224_gcr8.in1k": _cfg("backbone.patch_embed.proj", interpolation="bicubic",
                                                   fixed_input_size=True),
    "deit3_small_patch16_224_gcr8.in1k": _cfg("backbone.patch_embed.proj", crop_pct=1.0, interpolation="bicubic",
                                              fixed_input_size=True),
    "gcr_test.untrained": _cfg("backbone.conv1.0", crop_pct=1.0, input_size=(3, 32, 32), pool_size=(1, 1)),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> GrassmannClassifier:
    # features_only: the backbone builder's own default levels (timm: swin 4 stages, ViT the last 3 blocks)
    out_indices = kwargs.pop("out_indices", _OUT_INDICES.get(kwargs.get("backbone"), (0, 1, 2, 3, 4)))
    return build_model_with_cfg(GrassmannClassifier, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)


_OUT_INDICES = {"swin_tiny_patch4_window7_224": (0, 1, 2, 3), "deit3_small_patch16_224": 3}


def _gcr(variant: str, backbone: str, dim: int, pretrained: bool, kwargs: dict, **defaults) -> GrassmannClassifier:
    return _create(variant, pretrained, **dict(dict(backbone=backbone, dim=dim, gamma=25.0, **defaults), **kwargs))


@register_model
def resnet50_gcr8(pretrained=False, **kwargs) -> GrassmannClassifier:
    """ResNet-50 (torchvision style) + 8-dim class subspaces (configs/resnet/resnet50_8xb32_in1k_gcr8)."""
    return _gcr("resnet50_gcr8", "resnet50", 8, pretrained, kwargs)


@register_model
def resnet50d_gcr1(pretrained=False, **kwargs) -> GrassmannClassifier:
    """ResNet-50-D + 1-dim class subspaces (logit = gamma |cos|)."""
    return _gcr("resnet50d_gcr1", "resnet50d", 1, pretrained, kwargs)


@register_model
def resnet50d_gcr4(pretrained=False, **kwargs) -> GrassmannClassifier:
    return _gcr("resnet50d_gcr4", "resnet50d", 4, pretrained, kwargs)


@register_model
def resnet50d_gcr8(pretrained=False, **kwargs) -> GrassmannClassifier:
    """ResNet-50-D + 8-dim class subspaces (coslr SGD, RSB A1/A2/A3 and FixRes configs)."""
    return _gcr("resnet50d_gcr8", "resnet50d", 8, pretrained, kwargs)


@register_model
def resnet50d_gcr16(pretrained=False, **kwargs) -> GrassmannClassifier:
    return _gcr("resnet50d_gcr16", "resnet50d", 16, pretrained, kwargs)


@register_model
def resnet50d_gcr32(pretrained=False, **kwargs) -> GrassmannClassifier:
    return _gcr("resnet50d_gcr32", "resnet50d", 32, pretrained, kwargs)


@register_model
def resnet101d_gcr8(pretrained=False, **kwargs) -> GrassmannClassifier:
    return _gcr("resnet101d_gcr8", "resnet101d", 8, pretrained, kwargs)


@register_model
def resnet152d_gcr8(pretrained=False, **kwargs) -> GrassmannClassifier:
    return _gcr("resnet152d_gcr8", "resnet152d", 8, pretrained, kwargs)


@register_model
def vgg13_bn_gcr8(pretrained=False, **kwargs) -> GrassmannClassifier:
    """VGG13-BN + 8-dim subspaces; as the official VGG_, dropout 0.5 between fc1 and fc2 and none after fc2."""
    return _gcr("vgg13_bn_gcr8", "vgg13_bn", 8, pretrained, kwargs, pre_logits_drop=0.5)


@register_model
def swin_tiny_patch4_window7_224_gcr8(pretrained=False, **kwargs) -> GrassmannClassifier:
    return _gcr("swin_tiny_patch4_window7_224_gcr8", "swin_tiny_patch4_window7_224", 8, pretrained, kwargs)


@register_model
def deit3_small_patch16_224_gcr8(pretrained=False, **kwargs) -> GrassmannClassifier:
    return _gcr("deit3_small_patch16_224_gcr8", "deit3_small_patch16_224", 8, pretrained, kwargs)


@register_model
def gcr_test(pretrained=False, **kwargs) -> GrassmannClassifier:
    """Tiny ResNet-D (one block per stage, 8-32 channels) + 2-dim subspaces, ~90k params, 32x32 input."""
    return _gcr("gcr_test", "resnet18d", 2, pretrained, kwargs,
                backbone_kwargs=dict(layers=(1, 1, 1, 1), channels=(8, 16, 24, 32), stem_width=8))
