"""Decode heads and the segmentor, in plain torch with mmseg's semantics and module names."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from .config import HEADS, SegmentationConfig

# ----------------------------------------------------------------------------------------------------------------
# heads (plain torch; mmseg semantics)

def _resize(x, size, align_corners: bool = False):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _conv_module(cin: int, cout: int, k: int, norm: bool = True, act: bool = True, stride: int = 1,
                 dilation: int = 1):
    """mmcv ConvModule: conv (bias only without a norm) -> BN -> ReLU, with mmcv's submodule names."""
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(cin, cout, k, stride=stride, padding=(k // 2) * dilation, dilation=dilation,
                                   bias=not norm))
    if norm:
        m.add_module("bn", nn.BatchNorm2d(cout))
    if act:
        m.add_module("activate", nn.ReLU(inplace=True))
    return m


def _decode_base(self, channels: int, num_classes: int, dropout: float, align_corners: bool = False) -> None:
    self.num_classes = num_classes
    self.align_corners = align_corners
    self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()  # mmseg BaseDecodeHead: Dropout2d
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(self.conv_seg.weight, 0, 0.01)  # mmseg init_weights: normal(0, 0.01) on conv_seg
    nn.init.zeros_(self.conv_seg.bias)


class FPNNeck(nn.Module):
    """mmseg FPN: 1x1 laterals on input levels ``start_level..end_level-1``, top-down sums (``upsample`` are the
    F.interpolate arguments, mmseg's ``upsample_cfg``; nearest to the lower level's size by default), 3x3 outputs;
    with ``num_outs`` above the level count, the extra outputs are stride-2 max pools of the last one or, with
    ``extra_convs`` ('on_input' | 'on_lateral' | 'on_output'), stride-2 3x3 convs appended to ``fpn_convs``."""

    def __init__(self, in_channels, out_channels: int = 256, num_outs: int | None = None, start_level: int = 0,
                 end_level: int | None = None, extra_convs: str | None = None, relu_before_extra_convs: bool = False,
                 norm: bool = False, lateral_norm: bool | None = None, act: bool = False,
                 upsample: dict | None = None):
        super().__init__()
        in_channels = list(in_channels)
        self.start_level = start_level
        self.end_level = len(in_channels) if end_level is None else end_level
        levels = self.end_level - start_level
        self.num_outs = levels if num_outs is None else num_outs
        if self.num_outs < levels:
            raise UserError(f"FPN num_outs {self.num_outs} is below its {levels} input levels")
        if extra_convs not in (None, "on_input", "on_lateral", "on_output"):
            raise UserError(f"FPN extra_convs must be on_input, on_lateral or on_output, got {extra_convs!r}")
        self.extra_convs, self.relu_before_extra_convs = extra_convs, relu_before_extra_convs
        self.upsample = dict(upsample or {"mode": "nearest"})
        lateral_norm = norm if lateral_norm is None else lateral_norm
        self.lateral_convs = nn.ModuleList(_conv_module(in_channels[i], out_channels, 1, lateral_norm, act)
                                           for i in range(start_level, self.end_level))
        self.fpn_convs = nn.ModuleList(_conv_module(out_channels, out_channels, 3, norm, act) for _ in range(levels))
        if extra_convs:
            for i in range(self.num_outs - levels):
                cin = in_channels[self.end_level - 1] if i == 0 and extra_convs == "on_input" else out_channels
                self.fpn_convs.append(_conv_module(cin, out_channels, 3, norm, act, stride=2))
        for m in self.modules():  # mmseg/mmdet FPN init: xavier_uniform on every conv
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.out_channels = [out_channels] * self.num_outs

    def forward(self, feats):
        lat = [conv(feats[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(lat) - 1, 0, -1):
            if "scale_factor" in self.upsample:
                up = F.interpolate(lat[i], **self.upsample)
            else:
                up = F.interpolate(lat[i], size=lat[i - 1].shape[-2:], **self.upsample)
            lat[i - 1] = lat[i - 1] + up
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat)]
        n = len(lat)
        if self.num_outs > n and not self.extra_convs:
            for _ in range(self.num_outs - n):
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        elif self.num_outs > n:
            source = {"on_input": feats[self.end_level - 1], "on_lateral": lat[-1], "on_output": outs[-1]}
            outs.append(self.fpn_convs[n](source[self.extra_convs]))
            for i in range(n + 1, self.num_outs):
                x = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                outs.append(self.fpn_convs[i](x))
        return outs


class FPNHead(nn.Module):
    """Semantic FPN head: per level ``max(1, log2(s_i) - log2(s_0))`` (floored) 3x3 ConvModules, each followed by a
    2x bilinear upsample while the level is coarser than the first; the levels are summed at the first map's
    size."""

    def __init__(self, in_channels, strides, channels: int = 128, num_classes: int = 150, dropout: float = 0.1, *,
                 norm: bool = True, act: bool = True, align_corners: bool = False):
        super().__init__()
        if min(strides) != strides[0]:
            raise UserError(f"FPNHead needs the finest map first, got strides {list(strides)}")
        self.scale_heads = nn.ModuleList()
        for c, s in zip(in_channels, strides):
            n = max(1, int(math.log2(s) - math.log2(strides[0])))
            layers = []
            for k in range(n):
                layers.append(_conv_module(c if k == 0 else channels, channels, 3, norm, act))
                if s != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners))
            self.scale_heads.append(nn.Sequential(*layers))
        _decode_base(self, channels, num_classes, dropout, align_corners)

    def forward(self, feats):
        out = self.scale_heads[0](feats[0])
        for head, x in zip(self.scale_heads[1:], feats[1:]):
            out = out + _resize(head(x), out.shape[-2:], self.align_corners)
        return self.conv_seg(self.dropout(out))


class UPerHead(nn.Module):
    """UperNet: a pyramid pooling module (PPM) on the last map, an FPN over the others, every level resized to
    the first map, concatenated and fused by a 3x3 ConvModule."""

    def __init__(self, in_channels, channels: int = 512, num_classes: int = 150, dropout: float = 0.1,
                 pool_scales=(1, 2, 3, 6), *, norm: bool = True, act: bool = True, align_corners: bool = False):
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_module(in_channels[-1], channels, 1, norm, act))
            for s in pool_scales)
        self.bottleneck = _conv_module(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm, act)
        self.lateral_convs = nn.ModuleList(_conv_module(c, channels, 1, norm, act) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_module(channels, channels, 3, norm, act) for _ in in_channels[:-1])
        self.fpn_bottleneck = _conv_module(len(in_channels) * channels, channels, 3, norm, act)
        _decode_base(self, channels, num_classes, dropout, align_corners)

    def psp_forward(self, x):
        pooled = [_resize(m(x), x.shape[-2:], self.align_corners) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))

    def forward(self, feats):
        lat = [conv(x) for conv, x in zip(self.lateral_convs, feats)] + [self.psp_forward(feats[-1])]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size, self.align_corners) for o in outs], dim=1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """mmseg FCNHead (the UperNet auxiliary head): ``num_convs`` ConvModules on one map; with ``concat_input`` the
    input is concatenated to their output and fused by one more ConvModule (``conv_cat``)."""

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, dropout: float = 0.1,
                 num_convs: int = 1, *, concat_input: bool = False, kernel_size: int = 3, dilation: int = 1,
                 norm: bool = True, act: bool = True):
        super().__init__()
        if num_convs == 0 and in_channels != channels:
            raise UserError(f"FCNHead with num_convs=0 needs in_channels == channels, got {in_channels}, {channels}")
        self.convs = nn.Sequential(*[
            _conv_module(in_channels if i == 0 else channels, channels, kernel_size, norm, act, dilation=dilation)
            for i in range(num_convs)])
        self.conv_cat = _conv_module(in_channels + channels, channels, kernel_size, norm, act) \
            if concat_input else None
        _decode_base(self, channels, num_classes, dropout)

    def forward(self, x):
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


class SegformerHead(nn.Module):
    """mmseg SegformerHead: per level a 1x1 ConvModule (BN + ReLU) to ``channels``, bilinear resize to the first
    map, concatenation, 1x1 ConvModule fusion, dropout, classifier."""

    def __init__(self, in_channels, channels: int = 256, num_classes: int = 150, dropout: float = 0.1, *,
                 norm: bool = True, act: bool = True, align_corners: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(_conv_module(c, channels, 1, norm, act) for c in in_channels)
        self.fusion_conv = _conv_module(len(in_channels) * channels, channels, 1, norm, act)
        _decode_base(self, channels, num_classes, dropout, align_corners)

    def forward(self, feats):
        size = feats[0].shape[-2:]
        outs = [_resize(conv(x), size, self.align_corners) for conv, x in zip(self.convs, feats)]
        return self.conv_seg(self.dropout(self.fusion_conv(torch.cat(outs, dim=1))))


class Segmentor(nn.Module):
    """mmseg EncoderDecoder: backbone -> (neck) -> decode head (+ auxiliary head in training). The input is padded
    (bottom/right, zeros) to the backbone's ``size_divisor``; logits come back at the input size."""

    def __init__(self, backbone, decode_head, neck=None, auxiliary_head=None, aux_index: int = 3,
                 aux_weight: float = 0.4, ignore_index: int = 255, avg_non_ignore: bool = False):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_index, self.aux_weight = aux_index, aux_weight
        self.ignore_index, self.avg_non_ignore = ignore_index, avg_non_ignore
        self.num_classes = decode_head.num_classes
        self.size_divisor = int(getattr(backbone, "size_divisor", 1) or 1)

    def _features(self, x):
        feats = list(self.backbone(x))
        return self.neck(feats) if self.neck is not None else feats

    def _pad(self, x):
        h, w = x.shape[-2:]
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)

    def forward(self, x, target=None, return_aux: bool = False):
        """Logits (B, K, H, W); with ``target`` (B, H, W) the loss dict instead (so DDP sees one forward)."""
        if target is not None:
            return self.loss(x, target)
        xp, (h, w) = self._pad(x)
        feats = self._features(xp)
        logits = _resize(self.decode_head(feats), xp.shape[-2:])[..., :h, :w]
        if not return_aux:
            return logits
        aux = None
        if self.auxiliary_head is not None:
            aux = _resize(self.auxiliary_head(feats[self.aux_index]), xp.shape[-2:])[..., :h, :w]
        return logits, aux

    def loss(self, x, target) -> dict:
        logits, aux = self.forward(x, return_aux=True)
        out = {"loss_decode": seg_ce(logits, target, self.ignore_index, self.avg_non_ignore)}
        loss = out["loss_decode"]
        if aux is not None:
            out["loss_aux"] = seg_ce(aux, target, self.ignore_index, self.avg_non_ignore) * self.aux_weight
            loss = loss + out["loss_aux"]
        out["loss"] = loss
        return out


def seg_ce(logits, target, ignore_index: int = 255, avg_non_ignore: bool = False):
    """mmseg CrossEntropyLoss: per-pixel CE in fp32; mean over all pixels (ignored ones count 0) unless
    ``avg_non_ignore``, then over the valid pixels only."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if avg_non_ignore:
        return loss.sum() / (target != ignore_index).sum().clamp_min(1)
    return loss.mean()


def build_head(cfg: SegmentationConfig, in_channels, strides):
    """(neck, decode_head, auxiliary_head) for the recipe's head on maps with ``in_channels`` / ``strides``."""
    in_channels, strides = list(in_channels), list(strides)
    if len(in_channels) != len(strides) or not in_channels:
        raise UserError(f"need one stride per feature map, got channels {in_channels} and strides {strides}")
    mod = sys.modules[__name__]
    neck = aux = None
    k = cfg.num_classes
    if cfg.head == "fpn":
        neck = mod.FPNNeck(in_channels, cfg.fpn_channels)
        head = mod.FPNHead(neck.out_channels, strides, cfg.head_channels, k, cfg.dropout)
    elif cfg.head == "upernet":
        head = mod.UPerHead(in_channels, cfg.head_channels, k, cfg.dropout, tuple(cfg.pool_scales))
    elif cfg.head == "segformer":
        head = mod.SegformerHead(in_channels, cfg.head_channels, k, cfg.dropout)
    else:
        raise UserError(f"head must be one of {HEADS}, got {cfg.head!r}")
    if cfg.aux_head:
        chans = neck.out_channels if neck is not None else in_channels
        if not -len(chans) <= cfg.aux_index < len(chans):
            raise UserError(f"aux_index {cfg.aux_index} out of range for {len(chans)} feature maps")
        aux = mod.FCNHead(chans[cfg.aux_index], cfg.aux_channels, k, cfg.dropout)
    return neck, head, aux


def build_segmentor(cfg: SegmentationConfig, backbone=None):
    """Backbone from ``dense.backbones.build_backbone`` (or the given module with ``out_channels``/``strides``) plus
    the recipe's head."""
    if backbone is None:
        from ..backbones import build_backbone

        backbone = build_backbone(cfg.model, neck=cfg.backbone_neck, out_indices=cfg.out_indices,
                                  checkpoint=cfg.pretrained, drop_path_rate=cfg.drop_path,
                                  model_kwargs=dict(cfg.model_kwargs))
    neck, head, aux = build_head(cfg, backbone.out_channels, backbone.strides)
    return sys.modules[__name__].Segmentor(backbone, head, neck, aux, cfg.aux_index, cfg.aux_weight,
                                           cfg.ignore_index, cfg.avg_non_ignore)
