"""Semantic segmentation on any dense backbone: Semantic FPN, UperNet and the SegFormer head, ADE20K-layout data with
the official mmseg pipelines, whole-image / sliding-window inference, mIoU, an iteration-based trainer and the CLI.

The official CoC (mmseg 0.19), GPViT (mmseg 0.23) and UDI (mmseg 0.30) recipes (specs coc.md section 6, gpvit.md
section 5.2, udi.md section 7) are reproduced in plain PyTorch, without mmcv:

* heads: ``FPNNeck`` + ``FPNHead`` (Semantic FPN), ``UPerHead`` (+ ``FCNHead`` auxiliary), ``SegformerHead``; module
  names mirror mmseg's (``lateral_convs``, ``scale_heads``, ``psp_modules``, ``conv_seg``, ConvModule ``conv``/``bn``)
  so official head weights map by name. Every head takes any list of maps: a 4/8/16/32 pyramid or GPViTSeg's four
  stride-8 maps.
* ``Segmentor`` = backbone (``visionzoo.dense.backbones.build_backbone``) + optional FPN neck + decode head (+ aux
  head); logits are upsampled to the input size; the loss is mmseg's cross-entropy with ignore index 255 (by default
  averaged over ALL pixels, ignored ones counting 0, as mmseg's ``avg_non_ignore=False``).
* data: ADE20K layout, ``reduce_zero_label``, Resize(2048x512, ratio 0.5-2) -> RandomCrop(cat_max_ratio 0.75) ->
  flip -> PhotoMetricDistortion -> Normalize -> Pad(255); test: keep-ratio resize + AlignedResize (multiple of 32).
* training: per-iteration poly lr with linear warm-up (``dense.common``), AdamW with mmcv paramwise keys, AMP on
  CUDA, DDP (torchrun), atomic ``iter_N.pth`` checkpoints and exact resume: sample order and augmentation are a pure
  function of (seed, global sample position) and dropout is reseeded per iteration, so a resumed run repeats the
  same batches and masks.

torch is imported lazily so that ``visionzoo --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.config import TaskConfig

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
HEADS = ("fpn", "upernet", "segformer")


# ----------------------------------------------------------------------------------------------------------------
# config

@dataclass
class SegmentationConfig(TaskConfig):
    """One segmentation recipe (flat keys, ``visionzoo/recipes/segmentation/*.yaml``)."""

    # backbone (visionzoo.dense.backbones.build_backbone)
    model: str = "coc_small_feat5"
    model_kwargs: dict = field(default_factory=dict)
    backbone_neck: str = "auto"  # auto | native | simple | adapter | adapter_single
    out_indices: list | None = None
    pretrained: str | None = None  # backbone weights (any file/run folder create_model accepts)
    drop_path: float | None = None
    # head
    head: str = "fpn"  # fpn (Semantic FPN: FPN neck + FPNHead) | upernet | segformer
    fpn_channels: int = 256  # Semantic FPN neck width
    head_channels: int = 128  # decode head width (mmseg ``channels``)
    pool_scales: list = field(default_factory=lambda: [1, 2, 3, 6])  # UperNet PPM
    dropout: float = 0.1
    aux_head: bool = False  # FCNHead auxiliary (UperNet recipes)
    aux_index: int = 3
    aux_channels: int = 256
    aux_weight: float = 0.4
    sync_bn: bool = True  # convert BN to SyncBN under DDP
    # data
    dataset: str = "ade20k"  # ade20k (ADE20K layout under data_dir) | shapes (embedded, generated on first use)
    data_dir: str | None = None
    num_classes: int = 150
    reduce_zero_label: bool = True
    ignore_index: int = 255
    img_scale: list = field(default_factory=lambda: [2048, 512])  # (long, short) edge bounds of the resize
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    crop_size: list = field(default_factory=lambda: [512, 512])  # (h, w)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    size_divisor: int = 32  # test AlignedResize; 0 = plain keep-ratio resize
    test_mode: str = "whole"  # whole | slide
    slide_crop: list = field(default_factory=lambda: [512, 512])
    slide_stride: list = field(default_factory=lambda: [341, 341])
    # mmseg's `test.py --aug-test`: every ratio of img_scale, each also flipped; softmax averaged at the label size
    aug_test_ratios: list = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    aug_test_flip: bool = True
    shapes_size: list = field(default_factory=lambda: [128, 128])  # dataset shapes: image size, counts
    shapes_train: int = 64
    shapes_val: int = 16
    # optimisation
    iters: int = 80000
    batch_size: int = 4  # PER PROCESS
    world_size: int = 8  # processes the recipe was written for (documentation)
    opt: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    opt_betas: list = field(default_factory=lambda: [0.9, 0.999])
    opt_eps: float = 1e-8
    no_decay_keys: list = field(default_factory=list)  # mmcv custom_keys with decay_mult 0; "1d": norms + biases
    lr_mults: dict = field(default_factory=dict)  # mmcv custom_keys lr_mult, e.g. {decode_head: 10}
    sched: str = "poly"  # poly | step | constant (per iteration)
    poly_power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    clip_grad: float | None = None
    avg_non_ignore: bool = False
    amp: bool = True
    amp_dtype: str = "bfloat16"  # bfloat16 | float16 (CUDA only)
    workers: int = 4
    eval_interval: int = 8000
    ckpt_interval: int = 8000
    max_keep_ckpts: int = 2
    log_interval: int = 50
    seed: int = 0
    notes: str = ""

    def check(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.dataset not in ("ade20k", "shapes"):
            raise ValueError(f"dataset must be 'ade20k' (with data_dir) or 'shapes', got {self.dataset!r}")
        if self.test_mode not in ("whole", "slide"):
            raise ValueError(f"test_mode must be 'whole' or 'slide', got {self.test_mode!r}")
        if self.opt not in ("adamw", "sgd"):
            raise ValueError(f"opt must be 'adamw' or 'sgd', got {self.opt!r}")
        if not self.aug_test_ratios or min(self.aug_test_ratios) <= 0:
            raise ValueError(f"aug_test_ratios must be a non-empty list of positive scales, got {self.aug_test_ratios}")
        if self.sched not in ("poly", "step", "constant"):
            raise ValueError(f"sched must be poly, step or constant, got {self.sched!r}")


# ----------------------------------------------------------------------------------------------------------------
# heads (plain torch; mmseg semantics)

def _nn():
    import torch.nn as nn

    return nn


def _resize(x, size):
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _conv_module(cin: int, cout: int, k: int, norm: bool = True, act: bool = True):
    """mmcv ConvModule: conv (bias only without a norm) -> BN -> ReLU, with mmcv's submodule names."""
    nn = _nn()
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm))
    if norm:
        m.add_module("bn", nn.BatchNorm2d(cout))
    if act:
        m.add_module("activate", nn.ReLU(inplace=True))
    return m


def _decode_base(self, channels: int, num_classes: int, dropout: float) -> None:
    nn = _nn()
    self.num_classes = num_classes
    self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()  # mmseg BaseDecodeHead: Dropout2d
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(self.conv_seg.weight, 0, 0.01)  # mmseg init_weights: normal(0, 0.01) on conv_seg
    nn.init.zeros_(self.conv_seg.bias)


def _make_classes():
    """Head classes are created on first use so that importing this module does not import torch."""
    nn = _nn()
    import torch

    class FPNNeck(nn.Module):
        """mmseg/mmdet FPN with ``num_outs == len(inputs)``: 1x1 laterals, nearest top-down sums, 3x3 outputs."""

        def __init__(self, in_channels, out_channels: int = 256):
            super().__init__()
            self.lateral_convs = nn.ModuleList(_conv_module(c, out_channels, 1, False, False) for c in in_channels)
            self.fpn_convs = nn.ModuleList(_conv_module(out_channels, out_channels, 3, False, False)
                                           for _ in in_channels)
            for m in self.modules():  # mmdet FPN init: xavier_uniform on every conv
                if isinstance(m, nn.Conv2d):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            self.out_channels = [out_channels] * len(in_channels)

        def forward(self, feats):
            import torch.nn.functional as F

            lat = [conv(x) for conv, x in zip(self.lateral_convs, feats)]
            for i in range(len(lat) - 1, 0, -1):
                up = lat[i] if lat[i].shape[-2:] == lat[i - 1].shape[-2:] else \
                    F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
                lat[i - 1] = lat[i - 1] + up
            return [conv(x) for conv, x in zip(self.fpn_convs, lat)]

    class FPNHead(nn.Module):
        """Semantic FPN head: per level ``max(1, log2(s_i / s_0))`` 3x3 ConvModules, each followed by a 2x bilinear
        upsample while the level is coarser than the first; the levels are summed at the first map's size."""

        def __init__(self, in_channels, strides, channels: int = 128, num_classes: int = 150, dropout: float = 0.1):
            super().__init__()
            self.scale_heads = nn.ModuleList()
            for c, s in zip(in_channels, strides):
                n = max(1, int(round(math.log2(s / strides[0]))))
                layers = []
                for k in range(n):
                    layers.append(_conv_module(c if k == 0 else channels, channels, 3))
                    if s != strides[0]:
                        layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
                self.scale_heads.append(nn.Sequential(*layers))
            _decode_base(self, channels, num_classes, dropout)

        def forward(self, feats):
            out = self.scale_heads[0](feats[0])
            for head, x in zip(self.scale_heads[1:], feats[1:]):
                out = out + _resize(head(x), out.shape[-2:])
            return self.conv_seg(self.dropout(out))

    class UPerHead(nn.Module):
        """UperNet: a pyramid pooling module (PPM) on the last map, an FPN over the others, every level resized to
        the first map, concatenated and fused by a 3x3 ConvModule."""

        def __init__(self, in_channels, channels: int = 512, num_classes: int = 150, dropout: float = 0.1,
                     pool_scales=(1, 2, 3, 6)):
            super().__init__()
            self.psp_modules = nn.ModuleList(
                nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_module(in_channels[-1], channels, 1))
                for s in pool_scales)
            self.bottleneck = _conv_module(in_channels[-1] + len(pool_scales) * channels, channels, 3)
            self.lateral_convs = nn.ModuleList(_conv_module(c, channels, 1) for c in in_channels[:-1])
            self.fpn_convs = nn.ModuleList(_conv_module(channels, channels, 3) for _ in in_channels[:-1])
            self.fpn_bottleneck = _conv_module(len(in_channels) * channels, channels, 3)
            _decode_base(self, channels, num_classes, dropout)

        def psp_forward(self, x):
            pooled = [_resize(m(x), x.shape[-2:]) for m in self.psp_modules]
            return self.bottleneck(torch.cat([x] + pooled, dim=1))

        def forward(self, feats):
            lat = [conv(x) for conv, x in zip(self.lateral_convs, feats)] + [self.psp_forward(feats[-1])]
            for i in range(len(lat) - 1, 0, -1):
                lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
            outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
            size = outs[0].shape[-2:]
            fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
            return self.conv_seg(self.dropout(fused))

    class FCNHead(nn.Module):
        """mmseg FCNHead (the UperNet auxiliary head): ``num_convs`` 3x3 ConvModules on one map, no concat_input."""

        def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, dropout: float = 0.1,
                     num_convs: int = 1):
            super().__init__()
            self.convs = nn.Sequential(*[_conv_module(in_channels if i == 0 else channels, channels, 3)
                                         for i in range(num_convs)])
            _decode_base(self, channels, num_classes, dropout)

        def forward(self, x):
            return self.conv_seg(self.dropout(self.convs(x)))

    class SegformerHead(nn.Module):
        """mmseg SegformerHead: per level a 1x1 ConvModule (BN + ReLU) to ``channels``, bilinear resize to the first
        map, concatenation, 1x1 ConvModule fusion, dropout, classifier."""

        def __init__(self, in_channels, channels: int = 256, num_classes: int = 150, dropout: float = 0.1):
            super().__init__()
            self.convs = nn.ModuleList(_conv_module(c, channels, 1) for c in in_channels)
            self.fusion_conv = _conv_module(len(in_channels) * channels, channels, 1)
            _decode_base(self, channels, num_classes, dropout)

        def forward(self, feats):
            size = feats[0].shape[-2:]
            outs = [_resize(conv(x), size) for conv, x in zip(self.convs, feats)]
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
            import torch.nn.functional as F

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

    return dict(FPNNeck=FPNNeck, FPNHead=FPNHead, UPerHead=UPerHead, FCNHead=FCNHead, SegformerHead=SegformerHead,
                Segmentor=Segmentor)


_CLASSES: dict = {}


def __getattr__(name):  # FPNHead, UPerHead, ... created lazily (module-level torch import would slow the CLI)
    if name in ("FPNNeck", "FPNHead", "UPerHead", "FCNHead", "SegformerHead", "Segmentor"):
        if not _CLASSES:
            _CLASSES.update(_make_classes())
        return _CLASSES[name]
    raise AttributeError(name)


def seg_ce(logits, target, ignore_index: int = 255, avg_non_ignore: bool = False):
    """mmseg CrossEntropyLoss: per-pixel CE in fp32; mean over all pixels (ignored ones count 0) unless
    ``avg_non_ignore``, then over the valid pixels only."""
    import torch.nn.functional as F

    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if avg_non_ignore:
        return loss.sum() / (target != ignore_index).sum().clamp_min(1)
    return loss.mean()


def build_head(cfg: SegmentationConfig, in_channels, strides):
    """(neck, decode_head, auxiliary_head) for the recipe's head on maps with ``in_channels`` / ``strides``."""
    in_channels, strides = list(in_channels), list(strides)
    if len(in_channels) != len(strides) or not in_channels:
        raise ValueError(f"need one stride per feature map, got channels {in_channels} and strides {strides}")
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
        raise ValueError(f"head must be one of {HEADS}, got {cfg.head!r}")
    if cfg.aux_head:
        chans = neck.out_channels if neck is not None else in_channels
        if not -len(chans) <= cfg.aux_index < len(chans):
            raise ValueError(f"aux_index {cfg.aux_index} out of range for {len(chans)} feature maps")
        aux = mod.FCNHead(chans[cfg.aux_index], cfg.aux_channels, k, cfg.dropout)
    return neck, head, aux


def build_segmentor(cfg: SegmentationConfig, backbone=None):
    """Backbone from ``dense.backbones.build_backbone`` (or the given module with ``out_channels``/``strides``) plus
    the recipe's head."""
    if backbone is None:
        from .backbones import build_backbone

        backbone = build_backbone(cfg.model, neck=cfg.backbone_neck, out_indices=cfg.out_indices,
                                  checkpoint=cfg.pretrained, drop_path_rate=cfg.drop_path,
                                  model_kwargs=dict(cfg.model_kwargs))
    neck, head, aux = build_head(cfg, backbone.out_channels, backbone.strides)
    return sys.modules[__name__].Segmentor(backbone, head, neck, aux, cfg.aux_index, cfg.aux_weight,
                                           cfg.ignore_index, cfg.avg_non_ignore)


# ----------------------------------------------------------------------------------------------------------------
# inference

def slide_windows(h: int, w: int, crop, stride) -> list[tuple[int, int, int, int]]:
    """mmseg slide_inference windows (y1, y2, x1, x2): a grid with ``stride``, the last window pushed back inside the
    image, so every window has size min(crop, image)."""
    (ch, cw), (sh, sw) = crop, stride
    ny = max(h - ch + sh - 1, 0) // sh + 1
    nx = max(w - cw + sw - 1, 0) // sw + 1
    out = []
    for iy in range(ny):
        for ix in range(nx):
            y2, x2 = min(iy * sh + ch, h), min(ix * sw + cw, w)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def slide_logits(model, img, crop, stride, num_classes: int, batch: int = 8):
    """Sliding-window logits for ``img`` (1, 3, H, W): windows run in batches (they all have one size); overlapping
    logits are averaged."""
    import torch

    h, w = img.shape[-2:]
    wins = slide_windows(h, w, crop, stride)
    out = img.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        logits = model(torch.cat([img[..., y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])).float()
        for (y1, y2, x1, x2), lg in zip(chunk, logits):
            out[0, :, y1:y2, x1:x2] += lg
            count[..., y1:y2, x1:x2] += 1
    return out / count


def predict_logits(model, img, mode: str = "whole", crop=(512, 512), stride=(341, 341), out_size=None):
    """Logits for a normalised image (1, 3, h, w), resized (bilinear) to ``out_size`` (the original label size)."""
    if mode == "whole":
        logits = model(img).float()
    elif mode == "slide":
        logits = slide_logits(model, img, crop, stride, model.num_classes)
    else:
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    return _resize(logits, tuple(out_size)) if out_size is not None else logits


def aug_test_probs(model, imgs, out_size, flip: bool = True, mode: str = "whole", crop=(512, 512),
                   stride=(341, 341)):
    """mmseg ``aug_test``: class probabilities (1, K, *out_size) averaged over the images of every test scale
    ``imgs`` (each normalised (1, 3, h, w)) and, with ``flip``, their horizontal mirrors (the prediction flipped
    back). Each prediction is resized to ``out_size`` before its softmax, as mmseg's ``inference`` does."""
    total, n = None, 0
    for img in imgs:
        for flipped in ((False, True) if flip else (False,)):
            x = img.flip(-1) if flipped else img
            p = predict_logits(model, x, mode, crop, stride, out_size=out_size).softmax(1)
            p = p.flip(-1) if flipped else p
            total, n = (p if total is None else total + p), n + 1
    return total / n


# ----------------------------------------------------------------------------------------------------------------
# metrics

def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255):
    """(K, K) int64 matrix, rows = ground truth, columns = prediction, over pixels whose label is not ignored."""
    import torch

    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm, class_names=None) -> dict:
    """mmseg metrics from a confusion matrix: aAcc, mIoU and mAcc (NaN-mean over classes present in the union /
    in the labels), with per-class IoU and Acc (None where undefined)."""
    cm = cm.double()
    inter = cm.diagonal()
    area_label, area_pred = cm.sum(1), cm.sum(0)
    union = area_label + area_pred - inter
    iou = inter / union  # 0/0 -> NaN, as mmseg
    acc = inter / area_label
    out = {"aAcc": float(inter.sum() / cm.sum().clamp_min(1)), "mIoU": float(iou.nanmean()),
           "mAcc": float(acc.nanmean())}
    names = class_names or [str(i) for i in range(len(iou))]

    def num(v):  # JSON has no NaN: undefined per-class values are None
        return None if math.isnan(float(v)) else float(v)

    out["per_class"] = {n: {"IoU": num(i), "Acc": num(a)} for n, i, a in zip(names, iou, acc)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# data: ADE20K layout and the official pipelines (numpy, per sample, RNG passed in)

def ade20k_pairs(root, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of ``root/images/<split>/*.jpg`` with ``root/annotations/<split>/<stem>.png``."""
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise FileNotFoundError(f"ADE20K layout not found under {root}: expected {img_dir} and {ann_dir} "
                                f"(ADEChallengeData2016 has images/{{training,validation}} and "
                                f"annotations/{{training,validation}})")
    imgs = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not imgs:
        raise FileNotFoundError(f"no images in {img_dir}")
    pairs = [(p, ann_dir / f"{p.stem}.png") for p in imgs]
    missing = [str(a) for _, a in pairs if not a.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} label PNGs missing in {ann_dir}, e.g. {missing[0]}")
    return pairs


def class_names(root, num_classes: int) -> list[str]:
    path = Path(root) / "classes.json" if root else None
    if path is not None and path.is_file():
        names = json.loads(path.read_text()).get("classes", [])
        if len(names) == num_classes:
            return list(names)
    return [str(i) for i in range(num_classes)]


def load_pair(img_path, ann_path, reduce_zero_label: bool = True):
    """uint8 RGB image (H, W, 3) and uint8 label (H, W); ``reduce_zero_label``: 0 -> 255, k -> k - 1."""
    from PIL import Image

    img = np.array(Image.open(img_path).convert("RGB"), dtype=np.uint8)
    label = np.array(Image.open(ann_path), dtype=np.uint8)
    if label.ndim != 2 or label.shape != img.shape[:2]:
        raise ValueError(f"{ann_path}: label shape {label.shape} does not match image {img.shape[:2]}")
    return img, reduce_labels(label) if reduce_zero_label else label


def reduce_labels(label: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: 0 (other) -> 255 (ignored), k -> k - 1 (255 stays 255)."""
    out = label.astype(np.int16) - 1
    out[label == 0] = 255
    out[label == 255] = 255
    return out.astype(np.uint8)


def rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv ``imrescale`` size: the largest keep-ratio size with long edge <= max(scale) and short <= min(scale)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_image(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear, half-pixel centres, no antialias (cv2 INTER_LINEAR, which mmcv uses)."""
    if img.shape[:2] == (h, w):
        return img
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest neighbour (cv2 INTER_NEAREST: source index floor(dst * scale))."""
    H, W = label.shape
    if (H, W) == (h, w):
        return label
    rows = np.minimum((np.arange(h) * (H / h)).astype(np.int64), H - 1)
    cols = np.minimum((np.arange(w) * (W / w)).astype(np.int64), W - 1)
    return label[rows[:, None], cols[None, :]]


def random_crop_box(label: np.ndarray, crop, rng, cat_max_ratio: float = 0.75, ignore_index: int = 255):
    """mmseg RandomCrop: a uniform box of size ``crop`` (clipped to the image); with ``cat_max_ratio < 1`` redraw
    (up to 10 times) while one class covers >= cat_max_ratio of the box's non-ignored pixels or only one class is
    there. Returns (y1, y2, x1, x2)."""
    h, w = label.shape
    ch, cw = crop

    def draw():
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, min(y + ch, h), x, min(x + cw, w)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            cnt = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
            cnt = np.delete(cnt, ignore_index) if 0 <= ignore_index < 256 else cnt
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def _rgb_to_hsv(img):
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(img / 255.0)


def photometric_distortion(img: np.ndarray, rng, brightness_delta: int = 32, contrast=(0.5, 1.5),
                           saturation=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 RGB: random brightness, contrast (before or after the HSV part, at
    random), saturation, hue (delta in OpenCV's 0-180 hue units); each step with probability 0.5, clipped to uint8."""
    from matplotlib.colors import hsv_to_rgb

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = int(rng.integers(2))
    if mode == 1 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation), 0, 1)
        img = np.clip(hsv_to_rgb(hsv) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-hue_delta, hue_delta)) / 180.0) % 1.0
        img = np.clip(hsv_to_rgb(hsv) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if mode == 0 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast))
    return img


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW with the ImageNet mean/std of the official configs (0-255 scale)."""
    x = (img.astype(np.float32) - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def train_transform(img: np.ndarray, label: np.ndarray, cfg: SegmentationConfig, rng):
    """The official train pipeline: Resize(img_scale, ratio_range, keep ratio) -> RandomCrop(cat_max_ratio) ->
    RandomFlip -> PhotoMetricDistortion -> Normalize -> Pad(crop, 0 / 255). Returns (float32 CHW, int64 HW)."""
    lo, hi = cfg.ratio_range
    ratio = rng.uniform(lo, hi)
    h, w = rescale_size(*label.shape, (int(cfg.img_scale[0] * ratio), int(cfg.img_scale[1] * ratio)))
    img, label = resize_image(img, h, w), resize_label(label, h, w)
    y1, y2, x1, x2 = random_crop_box(label, cfg.crop_size, rng, cfg.cat_max_ratio, cfg.ignore_index)
    img, label = img[y1:y2, x1:x2], label[y1:y2, x1:x2]
    if rng.random() < cfg.flip_prob:
        img, label = img[:, ::-1], label[:, ::-1]
    if cfg.photometric:
        img = photometric_distortion(np.ascontiguousarray(img), rng)
    x = normalize(img)
    ch, cw = cfg.crop_size
    out_x = np.zeros((3, ch, cw), np.float32)
    out_y = np.full((ch, cw), cfg.ignore_index, np.int64)
    out_x[:, :x.shape[1], :x.shape[2]] = x
    out_y[:label.shape[0], :label.shape[1]] = label
    return out_x, out_y


def test_size(h: int, w: int, img_scale, size_divisor: int = 32) -> tuple[int, int]:
    """Keep-ratio resize to ``img_scale`` then, with a divisor, AlignedResize's round-up of both sides."""
    h, w = rescale_size(h, w, img_scale)
    if size_divisor:
        h = int(math.ceil(h / size_divisor)) * size_divisor
        w = int(math.ceil(w / size_divisor)) * size_divisor
    return h, w


class SegDataset:
    """Map-style dataset over ADE20K-layout pairs. Training: item = global sample position in an endless stream
    (epoch = position // len, order = a permutation seeded by (seed, epoch), augmentation RNG seeded by (seed,
    position)), so the data are a pure function of the position. Test: item = index, returns (image, label)."""

    def __init__(self, pairs, cfg: SegmentationConfig, train: bool, aug_test: bool = False):
        self.pairs, self.cfg, self.train, self.aug_test = list(pairs), cfg, train, aug_test
        self._perm = (None, None)

    def __len__(self) -> int:
        return len(self.pairs)

    def _index(self, pos: int) -> int:
        epoch, k = divmod(pos, len(self.pairs))
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.cfg.seed, epoch, 11]).permutation(len(self.pairs)))
        return int(self._perm[1][k])

    def __getitem__(self, pos: int):
        import torch

        cfg = self.cfg
        if self.train:
            img, label = load_pair(*self.pairs[self._index(pos)], cfg.reduce_zero_label)
            x, y = train_transform(img, label, cfg, np.random.default_rng([cfg.seed, pos, 13]))
            return torch.from_numpy(x), torch.from_numpy(y)
        img, label = load_pair(*self.pairs[pos], cfg.reduce_zero_label)
        y = torch.from_numpy(label.astype(np.int64))
        if self.aug_test:  # one image per ratio of img_scale (mmseg MultiScaleFlipAug)
            return [torch.from_numpy(normalize(resize_image(img, *test_size(
                *label.shape, [int(v * r) for v in cfg.img_scale], cfg.size_divisor))))
                for r in cfg.aug_test_ratios], y
        h, w = test_size(*label.shape, cfg.img_scale, cfg.size_divisor)
        return torch.from_numpy(normalize(resize_image(img, h, w))), y


class TrainBatches:
    """Batch sampler for iterations ``start..iters-1``: rank r of W takes positions it*B*W + r*B + j, j < B."""

    def __init__(self, start: int, iters: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.iters, self.b, self.rank, self.world = start, iters, batch_size, rank, world_size

    def __len__(self) -> int:
        return max(self.iters - self.start, 0)

    def __iter__(self):
        g = self.b * self.world
        for it in range(self.start, self.iters):
            base = it * g + self.rank * self.b
            yield list(range(base, base + self.b))


def dataset_root(cfg: SegmentationConfig, out: str | os.PathLike | None = None) -> Path:
    """The data folder; for ``shapes`` it is generated (deterministically from the seed) on first use."""
    if cfg.dataset == "ade20k":
        if not cfg.data_dir:
            raise ValueError("dataset ade20k needs data_dir (ADEChallengeData2016 with images/ and annotations/): "
                             "pass --data-dir or set data_dir in the recipe")
        return Path(cfg.data_dir)
    root = Path(cfg.data_dir) if cfg.data_dir else Path(out or ".") / "shapes_ade20k"
    if not (root / "classes.json").is_file():
        from .shapes import write_ade20k

        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        write_ade20k(tmp, n_train=cfg.shapes_train, n_val=cfg.shapes_val, size=tuple(cfg.shapes_size),
                     seed=cfg.seed)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------------------------
# evaluation

def evaluate(model, pairs, cfg: SegmentationConfig, device, mode: str | None = None, names=None, rank: int = 0,
             world_size: int = 1, amp_dtype=None, workers: int = 0, aug_test: bool = False) -> dict:
    """mIoU / aAcc / mAcc over ``pairs`` (each rank takes every world_size-th image; the confusion matrices are
    summed with all_reduce). Logits are resized to the original label size before the argmax, as mmseg does.
    ``aug_test``: multi-scale (``cfg.aug_test_ratios``) and flip (``cfg.aug_test_flip``) test, see
    :func:`aug_test_probs`."""
    import torch

    from ..engine.distributed import all_reduce_sum

    mode = mode or cfg.test_mode
    ds = SegDataset(pairs, cfg, train=False, aug_test=aug_test)
    cm = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(rank, len(ds), world_size)),
                                         batch_size=None, num_workers=workers)  # images differ in size: no batching
    with torch.no_grad():
        for x, y in loader:
            y = y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if aug_test:
                    logits = aug_test_probs(model, [v[None].to(device) for v in x], y.shape, cfg.aug_test_flip,
                                            mode, cfg.slide_crop, cfg.slide_stride)
                else:
                    logits = predict_logits(model, x[None].to(device), mode, cfg.slide_crop, cfg.slide_stride,
                                            out_size=y.shape)
            cm += confusion_matrix(logits.argmax(1)[0], y, cfg.num_classes, cfg.ignore_index)
    all_reduce_sum(cm)
    model.train(was_training)
    out = segmentation_metrics(cm.cpu(), names)
    out["confusion_matrix"] = cm.cpu().tolist()
    out["mode"], out["images"] = mode, len(ds)
    if aug_test:
        out["aug_test"] = {"ratios": list(cfg.aug_test_ratios), "flip": bool(cfg.aug_test_flip)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# training

def build_optimizer(model, cfg: SegmentationConfig):
    import torch

    from .common import param_groups

    groups = param_groups(model, cfg.weight_decay, tuple(cfg.no_decay_keys), dict(cfg.lr_mults))
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps,
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def lr_factor(cfg: SegmentationConfig, it: int) -> float:
    from .common import iter_lr_factor

    return iter_lr_factor(it, cfg.iters, policy=cfg.sched, warmup_iters=cfg.warmup_iters,
                          warmup_ratio=cfg.warmup_ratio, power=cfg.poly_power,
                          min_ratio=cfg.min_lr / cfg.lr if cfg.lr else 0.0)


_CKPT = re.compile(r"iter_(\d+)\.pth$")


def latest_checkpoint(path) -> Path:
    """A checkpoint file, or the highest ``iter_N.pth`` of a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _CKPT.search(p.name)))
        if found:
            return found[-1][1]
        raise FileNotFoundError(f"no iter_N.pth checkpoint in {path} (is it a `visionzoo segment train` folder?)")
    raise FileNotFoundError(f"checkpoint not found: {path} (give a run folder or one of its iter_N.pth files)")


def load_checkpoint(path) -> dict:
    import torch

    return torch.load(latest_checkpoint(path), map_location="cpu", weights_only=False)


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def train(cfg: SegmentationConfig, out, resume: str | None = None, device: str | None = None, log=print) -> dict:
    """Iteration-based training with periodic evaluation; writes ``iter_N.pth`` checkpoints (full state),
    ``log.jsonl`` and ``results.json`` (final and best metrics) to ``out``. Returns the results."""
    import torch

    from ..files import atomic_torch_save
    from ..engine.distributed import cleanup, init_distributed
    from .common import set_lr

    cfg.check()
    out = Path(out)
    dist = init_distributed(device)
    dev = dist.device
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    root = dataset_root(cfg, out) if dist.is_main else None
    if dist.distributed:
        import torch.distributed as tdist

        box = [str(root) if root else None]
        tdist.broadcast_object_list(box, 0)
        root = Path(box[0])
    train_pairs, val_pairs = ade20k_pairs(root, "training"), ade20k_pairs(root, "validation")
    names = class_names(root, cfg.num_classes)

    state = None
    if resume:
        state = load_checkpoint(resume)
        old = state.get("config", {})
        changed = [k for k in ("model", "model_kwargs", "head", "num_classes", "iters", "batch_size", "seed", "lr")
                   if k in old and old[k] != getattr(cfg, k)]
        if changed:
            raise ValueError(f"--resume: the checkpoint was trained with other {changed} "
                             f"({ {k: old[k] for k in changed} }); resume with the same recipe")
    torch.manual_seed(cfg.seed)
    model = build_segmentor(cfg).to(dev)
    if dist.distributed and cfg.sync_bn and dev.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = build_optimizer(model, cfg)
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.amp_dtype)
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, history = state["iter"], state["history"]
        if start >= cfg.iters:
            raise ValueError(f"nothing to do: the checkpoint is already at iteration {start} of {cfg.iters}")
        log(f"resumed at iteration {start}")
    net = model
    if dist.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    ds = SegDataset(train_pairs, cfg, train=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=TrainBatches(start, cfg.iters, cfg.batch_size, dist.rank, dist.world_size),
        num_workers=cfg.workers, pin_memory=dev.type == "cuda", persistent_workers=False,
        generator=torch.Generator())  # the loader's seed draw must not touch the global RNG (exact resume)

    def save(it: int) -> None:
        if not dist.is_main:
            return
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                           "iter": it, "history": history, "config": dataclasses.asdict(cfg),
                           "data_root": str(root)}, out / f"iter_{it}.pth")
        old = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT.search(p.name)))
        for _, p in old[:-max(cfg.max_keep_ckpts, 1)]:
            p.unlink(missing_ok=True)

    def log_row(row: dict) -> None:
        history.append(row)
        if dist.is_main:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    model.train()
    loss_sum = torch.zeros((), device=dev)
    n_sum, t0 = 0, time.time()
    it = start
    for it, (x, y) in enumerate(loader, start):
        torch.manual_seed(cfg.seed * 1_000_003 + it * 1009 + dist.rank)  # dropout masks depend on the iteration only
        factor = lr_factor(cfg, it)
        set_lr(opt, cfg.lr, factor)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
            losses = net(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if cfg.clip_grad:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(opt)
        scaler.update()
        loss_sum += losses["loss"].detach()
        n_sum += 1
        done = it + 1
        if done % cfg.log_interval == 0 or done == cfg.iters:
            row = {"iter": done, "lr": cfg.lr * factor, "loss": float(loss_sum) / n_sum,
                   "seconds": round(time.time() - t0, 3)}
            log_row(row)
            if dist.is_main:
                log(f"iter {done}/{cfg.iters}: lr {row['lr']:.3g} loss {row['loss']:.4f} ({row['seconds']:.1f}s)")
            loss_sum.zero_()
            n_sum, t0 = 0, time.time()
        if done % cfg.eval_interval == 0 or done == cfg.iters:
            m = evaluate(model, val_pairs, cfg, dev, names=names, rank=dist.rank, world_size=dist.world_size,
                         amp_dtype=amp_dtype if use_amp else None, workers=cfg.workers)
            log_row({"iter": done, "mIoU": m["mIoU"], "aAcc": m["aAcc"], "mAcc": m["mAcc"]})
            if dist.is_main:
                log(f"iter {done}: val mIoU {m['mIoU']:.4f} aAcc {m['aAcc']:.4f} mAcc {m['mAcc']:.4f}")
                _write_json({"iter": done, "final": m, "config": dataclasses.asdict(cfg),
                             "history": history}, out / "results.json")
        if done % cfg.ckpt_interval == 0 or done == cfg.iters:
            save(done)
    cleanup()
    results = json.loads((out / "results.json").read_text()) if dist.is_main else {}
    evals = [r for r in history if "mIoU" in r]
    if dist.is_main and evals:
        results["best"] = max(evals, key=lambda r: r["mIoU"])
        _write_json(results, out / "results.json")
    return results


# ----------------------------------------------------------------------------------------------------------------
# visualisation

def palette(n: int) -> np.ndarray:
    """Distinct, deterministic colours (n, 3) uint8."""
    rng = np.random.default_rng(3)
    return rng.integers(40, 256, size=(n, 3)).astype(np.uint8)


def overlay(img: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colours = palette(int(pred.max()) + 1)[pred]
    return (img.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# CLI (registered as `visionzoo segment`)

HELP = "semantic segmentation (Semantic FPN, UperNet, SegFormer head) on ADE20K-layout data or embedded shapes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train / evaluate / visualise semantic segmentation. Recipes: visionzoo list recipes "
                          "'segmentation/*'; segmentation/semfpn_shapes_cpu runs on CPU in a few minutes.")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("train", help="train from a recipe (iteration based, exact --resume)")
    p.add_argument("--recipe", "-r", required=True, help="recipe name (segmentation/...) or YAML path")
    p.add_argument("--out", required=True, help="run folder (checkpoints iter_N.pth, log.jsonl, results.json)")
    p.add_argument("--resume", nargs="?", const="__out__", default=None,
                   help="continue exactly: a run folder or iter_N.pth (no value: the --out folder)")
    p.add_argument("--data", "--data-dir", dest="data_dir", default=None, help="ADE20K root (images/, annotations/)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other recipe keys (YAML values)")
    _common(p)
    p = sub.add_parser("eval", help="mIoU / aAcc / mAcc of a trained run on the validation split")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="run folder or iter_N.pth")
    g.add_argument("--recipe", help="evaluate the recipe's UNTRAINED model (seeded as `train` seeds it; with its "
                                    "`pretrained` backbone if set): the learning-check baseline")
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="default: the recipe's test_mode")
    p.add_argument("--aug-test", action="store_true",
                   help="multi-scale + flip test as mmseg's test.py --aug-test (ratios 0.5-1.75 of img_scale; "
                        "recipe keys aug_test_ratios, aug_test_flip)")
    p.add_argument("--data", "--data-dir", dest="data_dir", default=None,
                   help="ADE20K root; default: the folder the run trained on")
    p.add_argument("--out", "--results", dest="results", default=None, help="write the metrics JSON here")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    _common(p)
    p = sub.add_parser("visualize", help="colour overlay of the predicted classes on one image")
    p.add_argument("--checkpoint", required=True, help="run folder or iter_N.pth")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--mode", choices=["whole", "slide"], default=None)
    _common(p)


def _common(p) -> None:
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from_args(args) -> SegmentationConfig:
    from ..engine.config import apply_overrides

    cfg = SegmentationConfig.from_yaml(args.recipe)
    data = dataclasses.asdict(cfg)
    for key in ("data_dir", "iters", "batch_size", "lr", "workers"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    data = apply_overrides(data, args.set, SegmentationConfig)
    return SegmentationConfig.from_dict(data, "--set")


def _model_from_checkpoint(path, device):
    state = load_checkpoint(path)
    cfg = SegmentationConfig.from_dict(state["config"], f"checkpoint {path}")
    cfg = dataclasses.replace(cfg, pretrained=None)  # the weights come from the checkpoint
    model = build_segmentor(cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, state


def run(args) -> int:
    import torch

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.action == "train":
            cfg = config_from_args(args)
            resume = args.out if args.resume == "__out__" else args.resume
            print(f"segment: {cfg.model} + {cfg.head} on {cfg.dataset}, {cfg.iters} iters, batch {cfg.batch_size}")
            train(cfg, args.out, resume=resume, device=device)
            return 0
        if args.action == "eval" and args.recipe:
            cfg = SegmentationConfig.from_yaml(args.recipe)
            if args.data_dir:
                cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
            torch.manual_seed(cfg.seed)
            model, state = build_segmentor(cfg).to(device).eval(), {"iter": 0, "data_root": str(dataset_root(cfg))}
        else:
            model, cfg, state = _model_from_checkpoint(args.checkpoint, device)
        if args.action == "eval":
            root = Path(args.data_dir) if args.data_dir else Path(state.get("data_root") or dataset_root(cfg))
            m = evaluate(model, ade20k_pairs(root, "validation"), cfg, torch.device(device), args.mode,
                         class_names(root, cfg.num_classes), workers=args.workers, aug_test=args.aug_test)
            mode = m["mode"] + (" + aug-test" if args.aug_test else "")
            print(f"{mode}: mIoU {m['mIoU']:.4f} aAcc {m['aAcc']:.4f} mAcc {m['mAcc']:.4f} ({m['images']} images)")
            if args.results:
                src = str(latest_checkpoint(args.checkpoint)) if args.checkpoint else f"untrained {args.recipe}"
                _write_json({"checkpoint": src, "iter": state["iter"], **m},
                            Path(args.results))
            return 0
        # visualize
        from PIL import Image

        img = np.array(Image.open(args.image).convert("RGB"), dtype=np.uint8)
        h, w = test_size(*img.shape[:2], cfg.img_scale, cfg.size_divisor)
        x = torch.from_numpy(normalize(resize_image(img, h, w)))[None].to(device)
        with torch.no_grad():
            logits = predict_logits(model, x, args.mode or cfg.test_mode, cfg.slide_crop, cfg.slide_stride,
                                    out_size=img.shape[:2])
        pred = logits.argmax(1)[0].cpu().numpy()
        Image.fromarray(overlay(img, pred)).save(args.out)
        print(f"wrote {args.out} ({len(np.unique(pred))} classes predicted)")
        return 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
