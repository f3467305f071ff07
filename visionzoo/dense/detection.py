"""Object detection and instance segmentation: torchvision Mask R-CNN / RetinaNet + FPN on any library backbone.

The official CoC, GPViT and UDI detection results come from mmdet 2.x configs (spec coc.md 6, gpvit.md 5.1,
udi.md 7); mmcv no longer installs, so this module rebuilds those setups on ``torchvision.models.detection``:

* backbone: :func:`visionzoo.dense.backbones.build_backbone` (native pyramids, the simple ViT pyramid, the GPViT
  adapter), then ``torchvision.ops.FeaturePyramidNetwork`` with 256 channels. Mask R-CNN: 5 levels (P2-P5 +
  max-pool P6), anchors ``8 x stride`` x ratios (0.5, 1, 2). RetinaNet: the levels from stride 8 on + P6/P7 convs on
  the FPN output (``add_extra_convs='on_output'``), anchors ``4 x stride x 2^(k/3)``, k = 0, 1, 2.
* data: COCO layout read with pycocotools (xywh -> xyxy, polygons / RLE -> bitmasks, crowd boxes skipped and
  images without boxes dropped in training, as mmdet does), flip 0.5, and the DETR-style multi-scale / random-crop
  augmentation of the 3x recipes.
* where resizing lives: in the model. torchvision's ``GeneralizedRCNNTransform`` resizes keep-ratio to
  (short ``min_size``, long ``max_size``) = mmdet's ``Resize(img_scale=(1333, 800), keep_ratio=True)``, normalises
  with the BACKBONE's mean/std, pads to the backbone's size divisor (>= 32), and maps predictions back to the original
  image; a tuple ``min_size`` draws one short side per batch in training (multi-scale). The dataset only flips and
  (3x) crops, so evaluation always sees original-size images and original-coordinate predictions.
* training: AdamW with mmcv-style parameter groups, per-iteration step schedule with linear warm-up (``common.py``),
  optional grad clipping, AMP on CUDA, DDP via ``torchrun``, atomic per-epoch checkpoints and exact resume (each
  epoch's order, augmentation and torch RNG come from (seed, epoch)), COCO box / mask AP with pycocotools.

RoIs are pooled as mmdet does (``mmdet_roi_pool``: RoIAlign aligned=True, adaptive sampling; ``roi_align:
torchvision`` restores torchvision's aligned=False, sampling 2) and batches are grouped by aspect ratio as mmdet's
GroupSampler does. Known difference to mmdet (documented in docs/dense/detection.md): Mask R-CNN's box regression
loss is smooth-L1 (beta 1/9) instead of L1.

CLI (``visionzoo detect``): ``train --recipe ... --out RUN``, ``eval --checkpoint RUN``, ``visualize --checkpoint
RUN --image img.jpg --out pred.png``. torch is imported lazily so ``visionzoo --help`` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.config import TaskConfig

DETECTORS = ("mask_rcnn", "retinanet")
MULTISCALE_DETR = tuple(range(480, 801, 32))  # DETR-style short sides (mmdet 3x / UDI configs)


# ----------------------------------------------------------------------------------------------------------------
# config

@dataclass
class DetectionConfig(TaskConfig):
    """A detection recipe (YAML, flat keys; unknown keys are an error)."""

    detector: str = "mask_rcnn"  # mask_rcnn | retinanet
    model: str = "coc_small_feat2"  # registered backbone name
    model_kwargs: dict = field(default_factory=dict)
    neck: str = "auto"  # auto | native | simple | adapter | adapter_single (see dense/backbones.py)
    out_indices: list | None = None
    pretrained: str | None = None  # backbone weights (classification / SSL checkpoint, save_pretrained or run folder)
    drop_path: float | None = None
    fpn_channels: int = 256
    box_head: str = "2fc"  # 2fc (mmdet Shared2FCBBoxHead) | 4conv1fc (Shared4Conv1FCBBoxHead with BN, GPViT)
    representation_size: int = 1024  # box-head FC width
    mask_head_channels: int | None = None  # default: fpn_channels
    anchor_scale: float | None = None  # anchor size / stride; default 8 (Mask R-CNN) or 4 (RetinaNet octave base)
    retina_head_norm: str | None = None  # null (official mmdet RetinaHead) | gn (GroupNorm(16) after each head conv)
    roi_align: str = "mmdet"  # mmdet (mmcv RoIAlign: aligned=True, adaptive sampling) | torchvision (aligned=False, 2)
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_post_nms_top_n_train: int = 1000  # mmdet rpn train max_per_img
    detections_per_img: int = 100
    # data
    dataset: str = "coco"  # coco | shapes (embedded procedural scenes, generated on first use)
    data_dir: str | None = None  # COCO root: annotations/instances_<split>.json + <split>/ images
    train_split: str = "train2017"
    val_split: str = "val2017"
    shapes_kwargs: dict = field(default_factory=dict)  # write_coco(n_train, n_val, size, seed)
    img_scale: list = field(default_factory=lambda: [1333, 800])  # (long max, short) keep-ratio resize
    multiscale: str | None = None  # null | detr (short side 480..800 step 32 + a random-crop branch, p 0.5)
    flip_prob: float = 0.5
    group_by_aspect: bool = True  # mmdet GroupSampler: a batch holds only landscape or only portrait images
    # optimisation
    epochs: int = 12
    lr_steps: list = field(default_factory=lambda: [8, 11])  # epochs at which lr x 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    batch_size: int = 2  # per process
    world_size: int = 8  # processes the recipe was written for (documentation; the lr is absolute)
    opt: str = "adamw"  # adamw | sgd
    lr: float = 2e-4
    weight_decay: float = 1e-4
    opt_betas: list | None = None
    momentum: float = 0.9
    no_decay_keys: list = field(default_factory=list)  # names containing these (or "1d": 1-D params) get wd 0
    lr_mults: dict = field(default_factory=dict)
    clip_grad: float | None = None  # max global grad norm
    amp: bool = False
    amp_dtype: str = "float16"
    sync_bn: bool = True  # convert BN to SyncBN under DDP (the official configs use SyncBN)
    find_unused_parameters: bool = False
    workers: int = 2
    eval_interval: int = 1  # epochs
    checkpoint_interval: int = 0  # iterations between mid-epoch checkpoints (0: at the end of each epoch only)
    log_interval: int = 50  # iterations
    seed: int = 0
    notes: str = ""

    def check(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {self.detector!r}")
        if self.dataset not in ("coco", "shapes"):
            raise ValueError(f"dataset must be 'coco' or 'shapes', got {self.dataset!r}")
        if self.multiscale not in (None, "detr"):
            raise ValueError(f"multiscale must be null or 'detr', got {self.multiscale!r}")
        if self.opt not in ("adamw", "sgd"):
            raise ValueError(f"opt must be 'adamw' or 'sgd', got {self.opt!r}")
        if len(self.img_scale) != 2:
            raise ValueError(f"img_scale is [long max, short], got {self.img_scale}")
        if self.retina_head_norm not in (None, "gn"):
            raise ValueError(f"retina_head_norm must be null or 'gn', got {self.retina_head_norm!r}")
        if self.retina_head_norm == "gn" and self.fpn_channels % 16:
            raise ValueError(f"retina_head_norm 'gn' uses 16 groups: fpn_channels must be a multiple of 16, got "
                             f"{self.fpn_channels}")
        if self.roi_align not in ("mmdet", "torchvision"):
            raise ValueError(f"roi_align must be 'mmdet' or 'torchvision', got {self.roi_align!r}")
        if self.box_head not in ("2fc", "4conv1fc"):
            raise ValueError(f"box_head must be '2fc' or '4conv1fc', got {self.box_head!r}")


# ----------------------------------------------------------------------------------------------------------------
# data

def shapes_root(cfg: DetectionConfig, out: str | os.PathLike | None) -> Path:
    """Where the embedded shapes dataset of this config lives (written on first use, deterministically)."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    kw = {**dict(n_train=64, n_val=16, size=(128, 128), seed=0), **cfg.shapes_kwargs}
    tag = f"shapes_coco_{kw['n_train']}_{kw['n_val']}_{kw['size'][0]}x{kw['size'][1]}_s{kw['seed']}"
    base = Path(out) if out else Path(os.environ.get("VISIONZOO_CACHE", Path.home() / ".cache" / "visionzoo"))
    return base / tag


def prepare_data(cfg: DetectionConfig, out: str | os.PathLike | None = None) -> Path:
    """The COCO root for this config; the shapes dataset is generated if missing. Clear error if COCO is absent."""
    if cfg.dataset == "shapes":
        root = shapes_root(cfg, out)
        done = root / "annotations" / f"instances_{cfg.val_split}.json"
        if not done.is_file():
            from .shapes import write_coco

            kw = dict(cfg.shapes_kwargs)
            if "size" in kw:
                kw["size"] = tuple(kw["size"])
            write_coco(root, **kw)  # deterministic: a rewrite after an interrupted one gives the same files
        return root
    if not cfg.data_dir:
        raise ValueError("dataset 'coco' needs data_dir (the folder holding annotations/ and train2017/ val2017/)")
    root = Path(cfg.data_dir)
    for split in (cfg.train_split, cfg.val_split):
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file() or not (root / split).is_dir():
            raise FileNotFoundError(
                f"COCO data not found: expected {ann} and the image folder {root / split}/ (COCO layout: "
                f"<root>/annotations/instances_{split}.json, <root>/{split}/*.jpg). Set data_dir or --data.")
    return root


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


class CocoDetection:
    """A COCO-format split for torchvision detectors: ``ds[i]`` or ``ds[(i, epoch)]`` -> (image float CHW in [0, 1],
    target dict with boxes xyxy, labels 1..K, masks uint8 NxHxW, image_id). Training transforms draw their random
    numbers from (seed, epoch, index), so batches are identical whatever the worker count or a resume."""

    def __init__(self, root, split: str, train: bool = False, flip_prob: float = 0.5,
                 multiscale: str | None = None, masks: bool = True, seed: int = 0):
        from pycocotools.coco import COCO

        root = Path(root)
        self.img_dir = root / split
        with _quiet():
            self.coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        self.cat_ids = sorted(self.coco.getCatIds())
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}  # 0 is background in torchvision
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        ids = sorted(self.coco.getImgIds())
        if train:  # mmdet filter_empty_gt: images without a usable (non-crowd) box teach nothing
            ids = [i for i in ids if any(not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
                                         for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids
        self.train, self.flip_prob, self.multiscale, self.masks, self.seed = train, flip_prob, multiscale, masks, seed

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def load(self, index: int):
        """Image (uint8 HxWx3) and its non-crowd annotations as numpy arrays (boxes xyxy, labels, masks)."""
        from PIL import Image

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        img = np.asarray(Image.open(self.img_dir / info["file_name"]).convert("RGB"))
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = np.array([self.cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        if self.masks:
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else \
                np.zeros((0, img.shape[0], img.shape[1]), np.uint8)
        else:
            masks = None
        return img, boxes, labels, masks, image_id

    def __getitem__(self, key):
        import torch

        index, epoch = key if isinstance(key, tuple) else (key, 0)
        img, boxes, labels, masks, image_id = self.load(index)
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, index])
            img, boxes, labels, masks = train_augment(img, boxes, labels, masks, rng, self.flip_prob,
                                                      self.multiscale)
        image = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255)
        target = {"boxes": torch.from_numpy(boxes).float().reshape(-1, 4), "labels": torch.from_numpy(labels),
                  "image_id": image_id}
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        return image, target


def train_augment(img, boxes, labels, masks, rng, flip_prob: float = 0.5, multiscale: str | None = None):
    """Training-time geometry that is not the resize: the DETR random-crop branch (3x recipes) and the flip."""
    H, W = img.shape[:2]
    if multiscale == "detr" and rng.random() < 0.5:
        # mmdet AutoAugment branch 2: Resize short side to one of 400/500/600 (max 1333), RandomCrop of an absolute
        # size in [384, 600] (allow_negative_crop); the multi-scale resize that follows happens in the model.
        short = rng.choice([400, 500, 600])
        scale = min(short / min(H, W), 1333 / max(H, W))
        ch = min(H, int(round(rng.integers(384, 601) / scale)))
        cw = min(W, int(round(rng.integers(384, 601) / scale)))
        y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        img = img[y0:y0 + ch, x0:x0 + cw]
        boxes = boxes - np.array([x0, y0, x0, y0], np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, ch)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], labels[keep]
        if masks is not None:
            masks = masks[keep][:, y0:y0 + ch, x0:x0 + cw]
        H, W = ch, cw
    if rng.random() < flip_prob:
        img = img[:, ::-1]
        boxes = boxes.copy()
        boxes[:, [0, 2]] = W - boxes[:, [2, 0]]
        if masks is not None:
            masks = masks[:, :, ::-1]
    return img, boxes, labels, masks


def collate(batch):
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------------------------------------------
# model

def _backbone_with_fpn(cfg: DetectionConfig, pretrained: bool = True):
    """DenseBackbone + torchvision FPN as the ``backbone`` torchvision detectors expect (an ``out_channels`` attr and
    an OrderedDict of maps). Returns (module, strides of the FPN outputs)."""
    from collections import OrderedDict

    import torch.nn as nn
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

    from .backbones import build_backbone

    body = build_backbone(cfg.model, neck=cfg.neck, out_indices=cfg.out_indices,
                          checkpoint=cfg.pretrained if pretrained else None, drop_path_rate=cfg.drop_path,
                          model_kwargs=cfg.model_kwargs)
    strides = list(body.strides)
    if any(b <= a for a, b in zip(strides, strides[1:])):
        raise ValueError(f"{cfg.model} with neck={cfg.neck!r} gives maps at strides {strides}; an FPN needs "
                         f"increasing strides: use neck='simple' or 'adapter' for single-scale backbones")
    if cfg.detector == "retinanet":  # RetinaNet starts at stride 8 (mmdet start_level=1 for 4-level backbones)
        keep = [i for i, s in enumerate(strides) if s >= 8]
        if len(keep) < len(strides):
            body.keep_levels(keep)
            strides = list(body.strides)
        extra = LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels)  # in == out: convs on the FPN output P5
        out_strides = strides + [strides[-1] * 2, strides[-1] * 4]
    else:
        extra = LastLevelMaxPool()
        out_strides = strides + [strides[-1] * 2]

    class BackboneWithFPN(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.fpn = FeaturePyramidNetwork(list(body.out_channels), cfg.fpn_channels, extra_blocks=extra)
            self.out_channels = cfg.fpn_channels

        def forward(self, x):
            maps = self.body(x)
            return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))

    return BackboneWithFPN(), out_strides


def mmdet_roi_pool(featmap_names, strides, output_size: int):
    """mmdet's SingleRoIExtractor with mmcv's RoIAlign (``aligned=True``: pixel centres at +0.5, and
    ``sampling_ratio=0``: an adaptive ceil(roi size / output size) grid), a drop-in for torchvision's
    ``MultiScaleRoIAlign``, whose ``roi_align`` call is fixed to aligned=False. Level of a box:
    floor(log2(sqrt(w * h) / 56 + 1e-6)) clamped to the levels, which is torchvision's LevelMapper too."""
    import torch
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    class MMDetRoIAlign(MultiScaleRoIAlign):  # a subclass: torchvision's MaskRCNN checks the type
        def __init__(self):
            super().__init__([str(n) for n in featmap_names], int(output_size), sampling_ratio=0)
            self.strides = [int(v) for v in strides]

        def forward(self, features, boxes, image_shapes=None):
            maps = [features[name] for name in self.featmap_names]
            rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
            size = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
            levels = torch.floor(torch.log2(size / 56 + 1e-6)).clamp(0, len(maps) - 1)
            out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1]) + self.output_size)
            # one roi_align per level (4 calls): the RoIs of a level are a data-dependent subset, as in mmdet
            for level, (fmap, stride) in enumerate(zip(maps, self.strides)):
                idx = torch.nonzero(levels == level).squeeze(1)
                if idx.numel():
                    out[idx] = roi_align(fmap, rois[idx], self.output_size, 1.0 / stride, sampling_ratio=0,
                                         aligned=True).to(out.dtype)
            return out

    return MMDetRoIAlign()


def build_detector(cfg: DetectionConfig, num_classes: int, pretrained: bool = True):
    """A torchvision MaskRCNN / RetinaNet on the config's backbone. ``num_classes`` excludes the background."""
    import torch.nn as nn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    backbone, strides = _backbone_with_fpn(cfg, pretrained)
    mean, std = list(backbone.body.mean), list(backbone.body.std)
    long_max, short = int(cfg.img_scale[0]), int(cfg.img_scale[1])
    # a tuple: one short side drawn per training batch (multi-scale); evaluation uses the last one
    min_size = (short,)
    if cfg.multiscale == "detr":
        min_size = tuple(s for s in MULTISCALE_DETR if s < short) + (short,)
    C = cfg.fpn_channels
    if cfg.detector == "mask_rcnn":
        from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads
        from torchvision.ops import MultiScaleRoIAlign

        scale = cfg.anchor_scale or 8.0
        anchors = AnchorGenerator(tuple((scale * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
        names = [str(i) for i in range(len(strides) - 1)]  # RoIs pool from P2-P5, not the max-pool level
        if cfg.roi_align == "mmdet":
            box_pool, mask_pool = (mmdet_roi_pool(names, strides[:-1], n) for n in (7, 14))
        else:
            box_pool, mask_pool = MultiScaleRoIAlign(names, 7, 2), MultiScaleRoIAlign(names, 14, 2)
        if cfg.box_head == "4conv1fc":
            box_head = FastRCNNConvFCHead((C, 7, 7), [C] * 4, [cfg.representation_size], norm_layer=nn.BatchNorm2d)
        else:
            box_head = TwoMLPHead(C * 49, cfg.representation_size)
        mask_ch = cfg.mask_head_channels or C
        model = MaskRCNN(
            backbone, num_classes=num_classes + 1, min_size=min_size, max_size=long_max, image_mean=mean,
            image_std=std, rpn_anchor_generator=anchors, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_roi_pool=box_pool, box_head=box_head, mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(C, [mask_ch] * 4, 1), box_batch_size_per_image=cfg.box_batch_size_per_image,
            box_detections_per_img=cfg.detections_per_img)
        if mask_ch != 256:  # MaskRCNN's default predictor assumes 256 input channels
            from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

            model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_ch, mask_ch, num_classes + 1)
        if cfg.representation_size != 1024:
            from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

            model.roi_heads.box_predictor = FastRCNNPredictor(cfg.representation_size, num_classes + 1)
    else:
        from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

        scale = cfg.anchor_scale or 4.0
        anchors = AnchorGenerator(tuple(tuple(scale * s * 2 ** (k / 3) for k in range(3)) for s in strides),
                                  ((0.5, 1.0, 2.0),) * len(strides))
        # torchvision indexes the class logits by label (1..K here), so K + 1 outputs; column 0 is never positive
        norm = None
        if cfg.retina_head_norm == "gn":  # torchvision's retinanet_v2 head; converges much faster from scratch
            from functools import partial

            norm = partial(nn.GroupNorm, 16)
        head = RetinaNetHead(C, anchors.num_anchors_per_location()[0], num_classes + 1, norm_layer=norm)
        model = RetinaNet(backbone, num_classes + 1, min_size=min_size, max_size=long_max, image_mean=mean,
                          image_std=std, anchor_generator=anchors, head=head,
                          detections_per_img=cfg.detections_per_img)
    # pad to the backbone's size divisor (CoC folds, CSWin stripes, 32 for the pyramid), not torchvision's fixed 32
    model.transform = GeneralizedRCNNTransform(min_size, long_max, mean, std,
                                               size_divisible=backbone.body.size_divisor)
    model.classes = None
    return model


# ----------------------------------------------------------------------------------------------------------------
# evaluation

def to_coco_results(outputs, image_ids, label_to_cat: dict, mask_thresh: float = 0.5) -> tuple[list, list]:
    """torchvision outputs (boxes xyxy in original pixels, labels, scores, masks N x 1 x H x W probabilities) ->
    COCO result lists (bbox, segm with RLE)."""
    import pycocotools.mask as mask_util

    bbox, segm = [], []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu().numpy()
        scores = out["scores"].detach().float().cpu().numpy()
        labels = out["labels"].detach().cpu().numpy()
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        cats = [label_to_cat[int(v)] for v in labels]
        for b, s, c in zip(xywh.tolist(), scores.tolist(), cats):
            bbox.append(dict(image_id=int(image_id), category_id=c, bbox=[round(v, 3) for v in b],
                             score=round(s, 5)))
        if "masks" in out:
            masks = (out["masks"].detach()[:, 0] > mask_thresh).cpu().numpy().astype(np.uint8)
            for m, s, c in zip(masks, scores.tolist(), cats):
                rle = mask_util.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                segm.append(dict(image_id=int(image_id), category_id=c, segmentation=rle, score=round(s, 5)))
    return bbox, segm


def coco_evaluate(coco_gt, results: dict, image_ids=None) -> dict:
    """COCOeval per iou type in ``results`` ({'bbox': [...], 'segm': [...]}) -> {'bbox_AP': .., 'bbox_AP50': ..,
    'bbox_AP75': .., 'bbox_APs/m/l': .., ...} in [0, 1] (-1 where undefined)."""
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    for iou_type, dets in results.items():
        if not dets:
            metrics.update({f"{iou_type}_{n}": 0.0 for n in names})
            continue
        with _quiet():
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics.update({f"{iou_type}_{n}": float(v) for n, v in zip(names, ev.stats[:6])})
    return metrics


def evaluate(model, dataset: CocoDetection, device, batch_size: int = 2, rank: int = 0, world_size: int = 1,
             amp: bool = False, amp_dtype=None, max_images: int | None = None, workers: int = 0) -> dict:
    """Box (and mask) AP of ``model`` (not a DDP wrapper: ranks may run different numbers of batches) on
    ``dataset``, scored against its COCO ground truth. Under DDP every rank runs a shard and rank 0 scores."""
    import torch

    model = _unwrap(model).eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = list(range(rank, n, world_size))
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers, collate_fn=collate)
    bbox, segm = [], []
    with torch.no_grad():
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp else contextlib.nullcontext()
            with ctx:
                outputs = model(images)
            b, s = to_coco_results(outputs, [t["image_id"] for t in targets], dataset.label_to_cat)
            bbox += b
            segm += s
    if world_size > 1:
        import torch.distributed as dist

        gathered = [None] * world_size
        dist.all_gather_object(gathered, (bbox, segm))
        bbox = [d for g in gathered for d in g[0]]
        segm = [d for g in gathered for d in g[1]]
    results = {"bbox": bbox}
    if hasattr(model, "roi_heads") and model.roi_heads.has_mask():
        results["segm"] = segm
    if rank != 0:
        return {}
    metrics = coco_evaluate(dataset.coco, results, image_ids=[dataset.ids[j] for j in range(n)])
    metrics["num_images"] = n
    metrics["num_detections"] = len(bbox)
    return metrics


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------------------------------
# training

def epoch_batches(n: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
                  groups=None) -> list[list]:
    """This rank's batches of one epoch: a (seed, epoch) shuffle, padded by wrap-around to whole global batches
    (every image is seen; the last batch repeats a few, as DistributedSampler does). Items are (index, epoch).

    ``groups`` (an int per image, e.g. mmdet's aspect flag ``width / height > 1``): every batch comes from one group,
    as mmdet's (Distributed)GroupSampler builds them: each group shuffled and padded by wrap-around to whole global
    batches, cut into batches, the batches shuffled, rank r taking the r-th contiguous share. With a single group
    this is the plain shuffle above."""
    rng = np.random.default_rng([seed, epoch, 7])
    glob = batch_size * world_size
    if groups is not None and len(np.unique(groups)) > 1:
        groups = np.asarray(groups)
        chunks = []
        for g in np.unique(groups):
            members = rng.permutation(np.flatnonzero(groups == g))
            members = np.resize(members, math.ceil(len(members) / glob) * glob)
            chunks.append(members.reshape(-1, batch_size))
        chunks = np.concatenate(chunks)[rng.permutation(sum(len(c) for c in chunks))]
        share = len(chunks) // world_size
        return [[(int(i), epoch) for i in b] for b in chunks[rank * share:(rank + 1) * share]]
    order = rng.permutation(n)
    total = math.ceil(n / glob) * glob
    order = np.resize(order, total)  # repeats from the start (also when one global batch exceeds the dataset)
    batches = order.reshape(-1, world_size, batch_size)[:, rank]
    return [[(int(i), epoch) for i in b] for b in batches]


def _state_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "last.pth" if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike) -> dict:
    import torch

    path = _state_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (give a `visionzoo detect train` run folder or its "
                                f"last.pth)")
    return torch.load(path, map_location="cpu", weights_only=False)


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def train(cfg: DetectionConfig, out: str | os.PathLike, resume: str | None = None, device: str | None = None,
          max_iters: int | None = None, log=print) -> dict:
    """Train, evaluate every ``eval_interval`` epochs and at the end. Writes ``last.pth`` (full state, atomic, every
    epoch, and every ``checkpoint_interval`` iterations), ``metrics.jsonl`` and ``summary.json`` to ``out``; returns
    the summary. ``max_iters`` stops early (the schedule is still that of the full recipe); a stop inside an epoch
    leaves a mid-epoch checkpoint that ``resume`` continues exactly."""
    import torch

    from ..files import atomic_torch_save
    from .common import rng_state, set_rng_state
    from ..engine.distributed import init_distributed
    from .common import iter_lr_factor, param_groups, set_lr

    out = Path(out)
    dist_info = init_distributed(device)
    dev = dist_info.device
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    root = prepare_data(cfg, out if cfg.dataset == "shapes" else None) if dist_info.is_main else None
    if dist_info.distributed:
        import torch.distributed as dist

        holder = [str(root)]
        dist.broadcast_object_list(holder, src=0)
        root = Path(holder[0])
    want_masks = cfg.detector == "mask_rcnn"
    train_set = CocoDetection(root, cfg.train_split, train=True, flip_prob=cfg.flip_prob,
                              multiscale=cfg.multiscale, masks=want_masks, seed=cfg.seed)
    val_set = CocoDetection(root, cfg.val_split, train=False, masks=False)  # scored against the COCO api's GT
    if len(train_set) == 0:
        raise ValueError(f"no training image with a box in {root}/{cfg.train_split}")
    num_classes = len(train_set.classes)

    torch.manual_seed(cfg.seed)
    model = build_detector(cfg, num_classes).to(dev)
    model.classes = train_set.classes
    opt_groups = param_groups(model, cfg.weight_decay, cfg.no_decay_keys, cfg.lr_mults)
    if cfg.opt == "adamw":
        betas = tuple(cfg.opt_betas) if cfg.opt_betas else (0.9, 0.999)
        opt = torch.optim.AdamW(opt_groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(opt_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and dev.type == "cuda"
    amp_dtype = getattr(torch, cfg.amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    groups = (np.array(train_set.aspect_ratios()) > 1).astype(int) if cfg.group_by_aspect else None
    iters_per_epoch = len(epoch_batches(len(train_set), cfg.batch_size, dist_info.world_size, 0, cfg.seed, 0,
                                        groups))
    total_iters = cfg.epochs * iters_per_epoch
    steps = [int(e * iters_per_epoch) for e in cfg.lr_steps]
    start_epoch, it, history, skip, partial = 0, 0, [], 0, {}
    resume_rng = None
    if resume:
        state = load_checkpoint(resume)
        old = state.get("config", {})
        changed = [k for k in ("detector", "model", "model_kwargs", "neck", "dataset", "batch_size", "seed", "lr",
                               "lr_steps") if k in old and old[k] != getattr(cfg, k)]
        if changed:
            raise ValueError(f"--resume: the checkpoint was trained with other {changed} "
                             f"({ {k: old[k] for k in changed} }); resume with the same settings")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        it, history = state["iteration"], state["history"]
        skip = state.get("batch_in_epoch", 0)
        if skip:  # a mid-epoch checkpoint: finish that epoch from its next batch with this rank's saved RNG
            saved_world = state.get("world_size", 1)
            if saved_world != dist_info.world_size:
                raise ValueError(f"--resume: {_state_path(resume)} was written in the middle of an epoch by "
                                 f"{saved_world} process(es); resume it with {saved_world}, or from an "
                                 f"end-of-epoch checkpoint")
            start_epoch, partial = state["epoch"], state["partial_sums"]
            resume_rng = state.get("rng_per_rank", [state["rng"]])[dist_info.rank]
        else:
            start_epoch = state["epoch"] + 1
        log(f"resumed from {_state_path(resume)} at epoch {start_epoch}, batch {skip} (iteration {it})")

    net = model
    if dist_info.distributed:
        if cfg.sync_bn and dev.type == "cuda":  # SyncBN runs on GPUs only; CPU (gloo) runs keep per-process BN
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)
    params = [p for p in model.parameters() if p.requires_grad]

    def save(epoch: int, batch_in_epoch: int = 0, sums=None, rngs=None) -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "iteration": it, "history": history, "classes": train_set.classes,
                 "config": dataclasses.asdict(cfg), "batch_in_epoch": batch_in_epoch,
                 "world_size": dist_info.world_size}
        if batch_in_epoch:
            state["partial_sums"] = {k: float(v) for k, v in sums.items()}
            state["rng"], state["rng_per_rank"] = rngs[0], rngs  # RPN/RoI sampling differs between ranks
        atomic_torch_save(state, out / "last.pth")

    stop = False
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 100003 + epoch)  # RPN/RoI sampling and the multi-scale draw: resume-exact
        if resume_rng is not None:
            set_rng_state(resume_rng)
            resume_rng = None
        net.train()
        batches = epoch_batches(len(train_set), cfg.batch_size, dist_info.world_size, dist_info.rank, cfg.seed,
                                epoch, groups)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches[skip:], num_workers=cfg.workers,
                                             collate_fn=collate, pin_memory=dev.type == "cuda",
                                             # its own generator: the loader must not draw from the global RNG
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        sums: dict = dict(partial)
        n_done, skip, partial = skip, 0, {}
        for images, targets in loader:
            factor = iter_lr_factor(it, total_iters, "step", cfg.warmup_iters, cfg.warmup_ratio, steps)
            set_lr(opt, cfg.lr, factor)
            images = [im.to(dev, non_blocking=True) for im in images]
            targets = [{k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                losses = net(images, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            it += 1
            n_done += 1
            if it % cfg.log_interval == 0 and dist_info.is_main:
                parts = " ".join(f"{k} {float(v) / n_done:.4f}" for k, v in sums.items())
                log(f"epoch {epoch} iter {it}/{total_iters} lr {cfg.lr * factor:.2e} {parts}")
            stop = max_iters is not None and it >= max_iters
            if n_done < len(batches) and (stop or (cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0)):
                rngs = [rng_state()]  # a mid-epoch checkpoint keeps every rank's RNG (a collective under DDP)
                if dist_info.distributed:
                    import torch.distributed as dist

                    rngs = [None] * dist_info.world_size
                    dist.all_gather_object(rngs, rng_state())
                if dist_info.is_main:
                    save(epoch, n_done, sums, rngs)
            if stop:
                break
        if n_done < len(batches):  # stopped inside the epoch: its checkpoint is written, no epoch row
            break
        means = {(k if k.startswith("loss") else f"loss_{k}"): float(v) / n_done for k, v in sums.items()}
        row = {"epoch": epoch, "iteration": it, "lr": cfg.lr * factor, "loss": sum(means.values()), **means,
               "seconds": round(time.time() - t0, 2)}
        if not all(math.isfinite(v) for v in means.values()):
            raise FloatingPointError(f"non-finite training loss at epoch {epoch}: {row}. Lower the lr, enable "
                                     f"clip_grad or disable amp.")
        if (epoch + 1) % cfg.eval_interval == 0 or epoch == cfg.epochs - 1 or stop:
            m = evaluate(model, val_set, dev, cfg.batch_size, dist_info.rank, dist_info.world_size, use_amp,
                         amp_dtype, workers=cfg.workers)
            row.update(m)
        history.append(row)
        if dist_info.is_main:
            save(epoch)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            ap = f" box AP {row['bbox_AP']:.4f} AP50 {row['bbox_AP50']:.4f}" if "bbox_AP" in row else ""
            ap += f" mask AP {row['segm_AP']:.4f}" if "segm_AP" in row else ""
            log(f"epoch {epoch}: iter {it} loss {row['loss']:.4f}{ap} ({row['seconds']:.1f}s)")
        if stop:
            break
    summary = {"epochs_done": len(history), "iterations": it, "last": history[-1] if history else None,
               "classes": train_set.classes, "config": dataclasses.asdict(cfg)}
    if dist_info.is_main:
        _write_json(summary, out / "summary.json")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# loading a trained detector, eval and visualize

def load_detector(checkpoint: str | os.PathLike, device="cpu"):
    """(model in eval mode, config, class names) from a training checkpoint (run folder or last.pth)."""
    state = load_checkpoint(checkpoint)
    cfg = DetectionConfig.from_dict(state["config"], str(checkpoint))
    model = build_detector(cfg, len(state["classes"]), pretrained=False)
    model.load_state_dict(state["model"])
    model.classes = list(state["classes"])
    return model.to(device).eval(), cfg, model.classes


def untrained_detector(cfg: DetectionConfig, device="cpu"):
    """The recipe's detector as training starts (seeded init, pretrained backbone if the recipe has one): the
    baseline of the learning checks. Class names come from the training annotations."""
    import torch

    root = prepare_data(cfg, None)
    classes = CocoDetection(root, cfg.train_split, masks=False).classes
    torch.manual_seed(cfg.seed)
    model = build_detector(cfg, len(classes))
    model.classes = classes
    return model.to(device).eval()


def evaluate_checkpoint(checkpoint, data_dir: str | None = None, device="cpu", max_images: int | None = None,
                        out: str | None = None, cfg: DetectionConfig | None = None) -> dict:
    """COCO AP of a trained run (``checkpoint``) or, with ``cfg`` and no checkpoint, of the untrained detector."""
    import torch

    if checkpoint is None:
        if cfg is None:
            raise ValueError("eval needs --checkpoint (a trained run) or --recipe (the untrained baseline)")
        if data_dir:
            cfg = dataclasses.replace(cfg, data_dir=data_dir)
        model, run_dir = untrained_detector(cfg, device), None
    else:
        model, cfg, _ = load_detector(checkpoint, device)
        if data_dir:
            cfg = dataclasses.replace(cfg, data_dir=data_dir)
        run_dir = _state_path(checkpoint).parent
    root = prepare_data(cfg, run_dir if cfg.dataset == "shapes" else None)
    val_set = CocoDetection(root, cfg.val_split, train=False, masks=False)
    metrics = evaluate(model, val_set, torch.device(device), cfg.batch_size, max_images=max_images,
                       workers=cfg.workers)
    if out:
        _write_json({"checkpoint": str(checkpoint), "data": str(root), "split": cfg.val_split, **metrics}, Path(out))
    return metrics


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_predictions(image: np.ndarray, output: dict, classes, score_thresh: float = 0.5, alpha: float = 0.45):
    """PIL image: masks blended in a per-detection colour, boxes and ``label score`` text (torchvision.utils)."""
    import torch
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = output["scores"] >= score_thresh
    boxes = output["boxes"][keep].cpu()
    colours = [_PALETTE[i % len(_PALETTE)] for i in range(len(boxes))]
    names = [f"{classes[lab - 1] if classes and 0 < lab <= len(classes) else lab} {score:.2f}"
             for lab, score in zip(output["labels"][keep].tolist(), output["scores"][keep].tolist())]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if len(boxes):
        if "masks" in output:
            masks = output["masks"][keep][:, 0].cpu() > 0.5
            canvas = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colours)
        canvas = draw_bounding_boxes(canvas, boxes, labels=names, colors=colours, width=2)
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def visualize(checkpoint, image_path, out_path, score_thresh: float = 0.5, device="cpu") -> int:
    import torch
    from PIL import Image

    model, _, classes = load_detector(checkpoint, device)
    img = np.asarray(Image.open(image_path).convert("RGB"))
    with torch.no_grad():
        output = model([torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255).to(device)])[0]
    draw_predictions(img, output, classes, score_thresh).save(out_path)
    return int((output["scores"] >= score_thresh).sum())


# ----------------------------------------------------------------------------------------------------------------
# CLI (registered as `visionzoo detect`)

HELP = "object detection / instance segmentation (Mask R-CNN, RetinaNet + FPN) on COCO-format data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Mask R-CNN and RetinaNet (torchvision) with an FPN on any visionzoo/timm backbone. "
                          "Recipes: visionzoo/recipes/detection/ (e.g. detection/maskrcnn_shapes_cpu runs on CPU on "
                          "embedded shapes).")
    sub = parser.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a detector from a recipe")
    t.add_argument("--recipe", required=True, help="detection recipe name or YAML file")
    t.add_argument("--out", required=True, help="run folder (last.pth, metrics.jsonl, summary.json)")
    t.add_argument("--data", default=None, help="COCO root (annotations/ + train2017/ val2017/); overrides data_dir")
    t.add_argument("--pretrained", default=None, help="backbone weights; overrides the recipe")
    t.add_argument("--resume", default=None, help="run folder or last.pth to continue exactly")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--workers", type=int, default=None)
    t.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (smoke runs)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override any recipe key (YAML value), e.g. --set amp=true clip_grad=35")
    e = sub.add_parser("eval", help="COCO box/mask AP of a trained detector")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run folder or last.pth")
    src.add_argument("--recipe", help="evaluate this recipe's UNTRAINED detector (the learning-check baseline)")
    e.add_argument("--data", default=None, help="COCO root; default: the one the run trained on")
    e.add_argument("--out", default=None, help="write the metrics to this JSON file")
    e.add_argument("--max-images", type=int, default=None)
    v = sub.add_parser("visualize", help="draw a trained detector's predictions on an image")
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--image", required=True)
    v.add_argument("--out", required=True, help="output PNG")
    v.add_argument("--score-thresh", type=float, default=0.5)
    for p in (t, e, v):
        p.add_argument("--device", default="auto", help="cpu | cuda | auto")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from_args(args) -> DetectionConfig:
    from ..engine.config import apply_overrides

    data = apply_overrides(dataclasses.asdict(DetectionConfig.from_yaml(args.recipe)), args.set, DetectionConfig)
    if args.data is not None:
        data["data_dir"] = args.data
    for key in ("pretrained", "epochs", "batch_size", "lr", "workers"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    return DetectionConfig.from_dict(data, args.recipe)


def run(args) -> int:
    import torch

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.action == "train":
            cfg = config_from_args(args)
            print(f"detect: {cfg.detector} on {cfg.model} (neck {cfg.neck}), {cfg.dataset}, {cfg.epochs} epochs, "
                  f"batch {cfg.batch_size}/process, device {device}")
            train(cfg, args.out, resume=args.resume, device=device, max_iters=args.max_iters)
        elif args.action == "eval":
            cfg = DetectionConfig.from_yaml(args.recipe) if args.recipe else None
            m = evaluate_checkpoint(args.checkpoint, args.data, device, args.max_images, args.out, cfg)
            print(json.dumps(m, indent=2))
        else:
            n = visualize(args.checkpoint, args.image, args.out, args.score_thresh, device)
            print(f"{n} detections above {args.score_thresh} drawn to {args.out}")
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
