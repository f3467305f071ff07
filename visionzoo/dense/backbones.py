"""Any registered model as a dense-prediction backbone: a list of NCHW maps of increasing stride.

``build_backbone(name, neck=...)`` picks how the maps are made:

* ``native``: the model's own multi-scale maps (``forward_intermediates``, i.e. what ``features_only=True`` gives):
  CoC with its ``fork_feat`` stage norms (strides 4/8/16/32), CSWin, timm CNNs; for GPViT this is the official
  ``GPViTSeg`` (4 maps at stride 8 from layers (2, 5, 8, 11), each with its own LayerNorm).
* ``simple``: a single-scale backbone (a ViT, GPViT) turned into a 4/8/16/32 pyramid the way UDI's (iBOT/BEiT)
  ``ViTDeiT`` does it: ConvTranspose-BN-GELU-ConvTranspose (x4) / ConvTranspose (x2) / identity / MaxPool (/2) on the
  maps of four layers, generalised to the backbone's stride (a stride-8 GPViT needs one ConvTranspose for stride 4
  and pools by 2 and 4 for 16 and 32).
* ``adapter`` / ``adapter_single``: the official GPViT adapter (``visionzoo.dense.gpvit_adapter``), 4 maps at
  4/8/16/32 (Mask R-CNN) or 3 at 8/16/32 (RetinaNet).
* ``auto``: ``native`` for multi-scale backbones, ``simple`` for single-scale ones.

ViTs run on any input size: their patch position embedding is resampled to the input grid and, as in DINO/UDI dense
work, no class token takes part (the class/register tokens are frozen and unused). Inputs whose sides are not a
multiple of ``size_divisor`` are zero-padded at the bottom/right, so the maps describe the padded image.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["DenseBackbone", "SimplePyramid", "build_backbone", "NECKS"]

NECKS = ("auto", "native", "simple", "adapter", "adapter_single")
_PYRAMID = (4, 8, 16, 32)


def _lcm(*values: int) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def _pad_to(x: torch.Tensor, divisor: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    ph, pw = (-H) % divisor, (-W) % divisor
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class DenseBackbone(nn.Module):
    """Base class: ``forward(x (B, 3, H, W)) -> list of NCHW maps`` with ``out_channels``/``strides`` per map
    (increasing stride) and ``size_divisor`` (inputs are padded to a multiple of it)."""

    out_channels: list[int]
    strides: list[int]
    size_divisor: int

    def __init__(self):
        super().__init__()
        self.mean = (0.485, 0.456, 0.406)  # the body's normalisation (pretrained cfg), for the data pipeline
        self.std = (0.229, 0.224, 0.225)

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def keep_levels(self, levels: Sequence[int]) -> "DenseBackbone":
        """Return only these output levels from now on and drop what only the others used (so every parameter
        still gets a gradient, e.g. RetinaNet, which starts at stride 8)."""
        raise UserError(f"{type(self).__name__} cannot drop output levels")

    def _select(self, levels: Sequence[int]) -> list[int]:
        levels = list(levels)
        if not levels or any(not 0 <= i < len(self.strides) for i in levels):
            raise UserError(f"levels {levels} out of range for {len(self.strides)} maps")
        self.out_channels = [self.out_channels[i] for i in levels]
        self.strides = [self.strides[i] for i in levels]
        return levels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_maps(_pad_to(x, self.size_divisor))


class SimplePyramid(nn.Module):
    """Single-stride maps -> one map per target stride (UDI/iBOT ``ViTDeiT`` fpn1..fpn4, generalised): upsampling by
    2^k uses k ConvTranspose(2, 2) with BN + GELU between them, stride kept is identity, downsampling is MaxPool."""

    def __init__(self, channels: int, in_stride: int, out_strides: Sequence[int] = _PYRAMID):
        super().__init__()
        self.ops = nn.ModuleList()
        for s in out_strides:
            if s < in_stride:
                k = int(round(math.log2(in_stride / s)))
                if 2 ** k * s != in_stride:
                    raise UserError(f"stride {in_stride} cannot be upsampled to {s} by powers of 2")
                layers: list[nn.Module] = []
                for j in range(k):
                    if j:
                        layers += [nn.BatchNorm2d(channels), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
                self.ops.append(nn.Sequential(*layers))
            elif s == in_stride:
                self.ops.append(nn.Identity())
            else:
                f = s // in_stride
                if f * in_stride != s:
                    raise UserError(f"stride {in_stride} cannot be pooled to {s}")
                self.ops.append(nn.MaxPool2d(kernel_size=f, stride=f))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(m) for op, m in zip(self.ops, maps)]


class _NativeBackbone(DenseBackbone):
    """A model's own ``forward_intermediates`` maps (timm ``features_only`` semantics)."""

    def __init__(self, model: nn.Module, out_indices, size_divisor: int):
        super().__init__()
        n_levels = len(model.feature_info)
        if out_indices is None:  # every level from stride 4 on (timm CNNs also list a stride-2 stem map)
            out_indices = tuple(i for i in range(n_levels) if model.feature_info[i]["reduction"] >= 4)
        _check_indices(type(model).__name__, out_indices, n_levels, "feature levels")
        if hasattr(model, "forward_intermediates"):
            # prune what the maps do not need (later stages, classifier) so every parameter is trained
            take = model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
            self.indices = list(take)
            self.body = model
            self._getter = True
            info = [model.feature_info[i] for i in self.indices]
        else:  # a timm model without forward_intermediates: hook-free FeatureListNet over its feature_info
            from timm.models._features import FeatureListNet

            info = [model.feature_info[i] for i in out_indices]
            self.body = FeatureListNet(model, out_indices=tuple(out_indices))
            self._getter = False
        self.out_channels = [int(f["num_chs"]) for f in info]
        self.strides = [int(f["reduction"]) for f in info]
        self.size_divisor = _lcm(size_divisor, max(self.strides))

    def keep_levels(self, levels):
        levels = self._select(levels)
        if not self._getter:
            raise UserError("this timm model has no forward_intermediates: pass out_indices instead")
        for j, i in enumerate(self.indices):
            # a dropped level's own output norm (CoC fork_feat norm{i}, official FORK_LAST3) becomes unused
            name = self.body.feature_info[i]["module"]
            if j not in levels and name.startswith("norm") and "." not in name:
                setattr(self.body, name, nn.Identity())
        self.indices = [self.indices[j] for j in levels]
        return self

    def forward_maps(self, x):
        if self._getter:
            return list(self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True))
        return list(self.body(x))


class _ViTMaps(nn.Module):
    """Patch-token maps of a timm ``VisionTransformer`` after chosen blocks, without class tokens (DINO/UDI dense
    protocol), with the patch position embedding resampled to the input grid."""

    def __init__(self, vit: nn.Module, indices: Sequence[int]):
        super().__init__()
        if not isinstance(getattr(vit.patch_embed, "proj", None), nn.Conv2d):
            raise UserError(f"{type(vit).__name__}: only ViTs with a convolutional patch embedding (patch_embed.proj) "
                            f"are supported as dense backbones")
        self.vit = vit
        self.indices = sorted(set(int(i) for i in indices))
        self.last = self.indices[-1]
        vit.blocks = vit.blocks[:self.last + 1]
        # parts the dense forward does not use: freeze the tokens (kept for checkpoint compatibility), drop the rest
        for name in ("cls_token", "reg_token"):
            p = getattr(vit, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)
        vit.reset_classifier(0, "")
        for name in ("norm", "fc_norm", "head_drop", "head"):
            if isinstance(getattr(vit, name, None), nn.Module):
                setattr(vit, name, nn.Identity())
        if getattr(vit, "attn_pool", None) is not None:
            vit.attn_pool = None
        self.patch = int(vit.patch_embed.patch_size[0])
        self.dim = int(vit.embed_dim)

    def _patch_pos(self, grid: tuple[int, int]) -> torch.Tensor:
        vit = self.vit
        skip = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        old = tuple(vit.patch_embed.grid_size)
        try:  # UDI: resample the DINO way (scale factor (g + 0.1) / G), as its official dense backbone does
            from ..models.vit_udi import UDIVisionTransformer, dino_resample_pos_embed
            if isinstance(vit, UDIVisionTransformer):
                return dino_resample_pos_embed(vit.pos_embed[:, skip:], grid, 0, old_grid=old)
        except ImportError:  # pragma: no cover
            pass
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(vit.pos_embed[:, skip:], new_size=list(grid), old_size=list(old),
                                      num_prefix_tokens=0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        vit = self.vit
        B = x.shape[0]
        x = vit.patch_embed.proj(x)  # (B, C, h, w): the conv only, so any padded size works
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = vit.patch_embed.norm(x)
        if vit.pos_embed is not None:
            x = x + self._patch_pos((h, w))
        x = vit.norm_pre(vit.pos_drop(x))
        out = {}
        for i, blk in enumerate(vit.blocks):
            x = blk(x)
            if i in self.indices:
                out[i] = x.transpose(1, 2).reshape(B, self.dim, h, w)
        return [out[i] for i in self.indices]


class _SimpleBackbone(DenseBackbone):
    """Single-stride maps (ViT blocks, or GPViT's own normed layer maps) -> a 4/8/16/32 pyramid."""

    def __init__(self, maps: nn.Module, indices: list[int], channels: int, stride: int, size_divisor: int):
        super().__init__()
        self.maps = maps
        # four levels, each fed by its own layer (out_indices may repeat a layer for shallow test models)
        uniq = sorted(set(indices))
        self.pick = [uniq.index(i) for i in indices]
        self.pyramid = SimplePyramid(channels, stride, _PYRAMID)
        self.out_channels = [channels] * 4
        self.strides = list(_PYRAMID)
        self.size_divisor = _lcm(size_divisor, 32, stride)

    def keep_levels(self, levels):
        levels = self._select(levels)
        self.pyramid.ops = nn.ModuleList([self.pyramid.ops[j] for j in levels])
        self.pick = [self.pick[j] for j in levels]
        return self

    def forward_maps(self, x):
        maps = self.maps(x)
        return self.pyramid([maps[j] for j in self.pick])


class _GPViTLayerMaps(nn.Module):
    """GPViT stride-8 maps of chosen layers with their own LayerNorms (the official ``GPViTSeg`` outputs)."""

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        super().__init__()
        self.indices = sorted(set(int(i) for i in indices))
        model.prune_intermediate_layers(self.indices, prune_norm=False, prune_head=True)
        self.model = model

    def forward(self, x):
        return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)


class _AdapterBackbone(DenseBackbone):
    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.out_channels = [int(c) for c in adapter.out_channels]
        self.strides = [int(s) for s in adapter.strides]
        self.size_divisor = _lcm(32, int(getattr(adapter, "size_divisor", 32)))

    def keep_levels(self, levels):
        if list(levels) == list(range(len(self.strides))):
            return self
        raise UserError("the GPViT adapter's output levels are fixed: use neck='adapter_single' (strides 8/16/32) "
                        "for RetinaNet and neck='adapter' (4/8/16/32) for Mask R-CNN")

    def forward_maps(self, x):
        return list(self.adapter(x))


def _even_indices(depth: int, n: int = 4) -> list[int]:
    """n layers spread over depth, ending with the last ((2, 5, 8, 11) for 12 layers)."""
    return [max(0, round((k + 1) * depth / n) - 1) for k in range(n)]


def _check_indices(model: str, idx, count: int, what: str = "blocks") -> None:
    """out_indices written for a deeper model (a recipe's [2, 5, 8, 11] on a 4-block test model) name the fix."""
    bad = [i for i in idx if not -count <= int(i) < count]
    if bad:
        raise UserError(f"{model} has {count} {what}; out_indices must be < {count}, got {list(idx)}: set "
                        f"out_indices for this backbone (e.g. --set \"out_indices={_even_indices(count)}\").")


def _checkpoint_path(checkpoint: str | None) -> str | None:
    if checkpoint is None:
        return None
    if os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "config.json")):
        return checkpoint  # a save_pretrained folder
    from ..models import resolve_checkpoint

    return str(resolve_checkpoint(checkpoint))


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _is_gpvit(model: nn.Module) -> bool:
    from ..models.gpvit import GPViT

    return isinstance(model, GPViT)


def build_backbone(model: str, *, neck: str = "auto", out_indices=None, checkpoint: str | None = None,
                   drop_path_rate: float | None = None, model_kwargs: dict | None = None) -> DenseBackbone:
    """A :class:`DenseBackbone` from a registered model name (see the module docstring for ``neck``).

    ``checkpoint``: weights our ``visionzoo.create_model(checkpoint_path=...)`` accepts (official or ours), a
    ``save_pretrained`` folder or a ``visionzoo pretrain`` run folder; the classifier is dropped.
    ``out_indices``: which feature levels (native) or layers (simple) to use; defaults: all levels / four layers
    spread over the depth ((2, 5, 8, 11) for GPViT, (3, 5, 7, 11) for 12-layer ViTs as in UDI).
    """
    import visionzoo

    if neck not in NECKS:
        raise UserError(f"unknown neck {neck!r}: use one of {', '.join(NECKS)}")
    kwargs = dict(model_kwargs or {})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    ckpt = _checkpoint_path(checkpoint)

    if neck in ("adapter", "adapter_single"):
        try:
            from .gpvit_adapter import GPViTAdapter
        except ImportError as e:
            raise ImportError(f"neck={neck!r} needs visionzoo.dense.gpvit_adapter.GPViTAdapter, which could not be "
                              f"imported ({e}). Use neck='simple' for a light single-scale pyramid instead.") from e
        # the adapter loads GPViT classification weights or whole adapter checkpoints itself
        adapter = GPViTAdapter(model, single_stage=(neck == "adapter_single"), checkpoint=ckpt, **kwargs)
        return _finish(_AdapterBackbone(adapter), model)

    import timm

    from ..models import check_model_name, model_entrypoint

    check_model_name(model)  # a clear error with close matches for an unknown name
    entry_module = model_entrypoint(model).__module__  # older names kept loadable (coc_small_feat2) too
    if entry_module == "visionzoo.models.gpvit":
        # GPViT: the per-layer LNs of the chosen layers exist only when the model is built with out_norms
        with torch.device("meta"):  # the depth of this variant, without allocating it
            depth = len(timm.create_model(model, **kwargs).blocks)
        idx = list(out_indices) if out_indices is not None else (
            [2, 5, 8, 11] if depth == 12 else _even_indices(depth))
        _check_indices(model, idx, depth)
        kwargs.setdefault("out_norms", tuple(sorted(set(i for i in idx if i != depth - 1))))
    if entry_module == "visionzoo.models.context_cluster":
        # the official CoC dense backbone is the fork_feat model (a GroupNorm per stage output); building it directly
        # also lets mmdet/mmseg checkpoints (stage norms, no norm/head) load under a classification name (coc_small)
        kwargs.setdefault("fork_feat", True)
    net = visionzoo.create_model(model, checkpoint_path=ckpt, **kwargs)

    if _is_vit(net):
        if neck == "native":
            raise UserError(f"{model} is single-scale (a ViT): use neck='simple' (or 'auto')")
        depth = len(net.blocks)
        idx = list(out_indices) if out_indices is not None else (
            [3, 5, 7, 11] if depth == 12 else _even_indices(depth))
        _check_indices(model, idx, depth)
        if len(idx) != 4:
            raise UserError(f"neck='simple' takes 4 layer indices (one per stride 4/8/16/32), got {idx}")
        maps = _ViTMaps(net, idx)
        stride = maps.patch
        return _finish(_SimpleBackbone(maps, idx, maps.dim, stride, size_divisor=stride), model, net)

    if _is_gpvit(net):
        depth = len(net.blocks)
        idx = list(out_indices) if out_indices is not None else (
            [2, 5, 8, 11] if depth == 12 else _even_indices(depth))
        if neck == "native":
            bb = _NativeBackbone(net, sorted(set(idx)), size_divisor=16)
            bb.size_divisor = 16
            return _finish(bb, model, net)
        if len(idx) != 4:
            raise UserError(f"neck='simple' takes 4 layer indices (one per stride 4/8/16/32), got {idx}")
        maps = _GPViTLayerMaps(net, idx)
        return _finish(_SimpleBackbone(maps, idx, net.embed_dim, 8, size_divisor=16), model, net)

    if neck == "simple":
        raise UserError(f"{model} is multi-scale: use neck='native' (or 'auto'); 'simple' is for ViTs and GPViT")
    step = net.size_step() if hasattr(net, "size_step") else 32
    return _finish(_NativeBackbone(net, out_indices, size_divisor=step), model, net)


def _finish(bb: DenseBackbone, name: str, net: nn.Module | None = None) -> DenseBackbone:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if not cfg:
        try:
            import timm

            cfg = timm.models.get_pretrained_cfg(name).to_dict()
        except Exception:  # noqa: BLE001  (unknown cfg: keep ImageNet defaults)
            cfg = {}
    bb.mean = tuple(cfg.get("mean", bb.mean))
    bb.std = tuple(cfg.get("std", bb.std))
    bb.model_name = name
    return bb
