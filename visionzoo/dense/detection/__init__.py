"""Object detection and instance segmentation: torchvision Mask R-CNN / RetinaNet + FPN on any library backbone.

The official CoC, GPViT and UDI detection results come from mmdet 2.x configs (spec coc.md 6, gpvit.md 5.1,
udi.md 7); mmcv no longer installs, so this module rebuilds those setups on ``torchvision.models.detection``:

* backbone: :func:`visionzoo.dense.backbones.build_backbone` (native pyramids, the simple ViT pyramid, the GPViT
  adapter), then mmdet's FPN on torchvision's ``FeaturePyramidNetwork`` (``heads.build_fpn``) with 256 channels.
  Mask R-CNN: 5 levels (P2-P5 + max-pool P6), anchors ``8 x stride`` x ratios (0.5, 1, 2). RetinaNet: the levels
  from stride 8 on + P6/P7 convs on the FPN output (``add_extra_convs='on_output'``), anchors
  ``4 x stride x 2^(k/3)``, k = 0, 1, 2. Anchors, extra levels, predictors (K boxes, K masks, K RetinaNet logits),
  resize rounding and mask pasting follow mmdet 2.x (``heads.py``, ``model.py``); ``official.py`` converts official
  mmdet modules and checkpoints (docs/dense/detection.md lists every difference that remains).
* data: COCO layout read with pycocotools (xywh -> xyxy, polygons / RLE -> bitmasks, crowd boxes skipped and
  images without boxes dropped in training, as mmdet does), flip 0.5, and the DETR-style multi-scale / random-crop
  augmentation of the 3x recipes.
* where resizing lives: in the model. ``MMDetTransform`` (torchvision's ``GeneralizedRCNNTransform``) resizes
  keep-ratio to (short ``min_size``, long ``max_size``) = mmdet's ``Resize(img_scale=(1333, 800), keep_ratio=True)``,
  normalises with the BACKBONE's mean/std, pads to the backbone's size divisor (>= 32), and maps predictions back to
  the original image; a tuple ``min_size`` draws one short side per batch in training (multi-scale). The dataset only
  flips and (3x) crops, so evaluation always sees original-size images and original-coordinate predictions.
* training: the engine's loop through ``visionzoo/tasks/detect.py`` (run folder, DDP, AMP, clipping, exact resume,
  metrics.csv): AdamW / SGD with mmcv-style parameter groups (``build_optimizer``), mmcv's per-iteration step
  schedule with a linear warm-up, batches padded by wrap-around and grouped by aspect ratio; COCO box / mask AP with
  pycocotools.

RoIs are pooled as mmdet does (``mmdet_roi_pool``: RoIAlign aligned=True, adaptive sampling; ``roi_align:
torchvision`` restores torchvision's aligned=False, sampling 2) and batches are grouped by aspect ratio as mmdet's
GroupSampler does. Known difference to mmdet in training (documented in docs/dense/detection.md): the box
regression losses are smooth-L1 (beta 1/9) instead of L1.

Modules: ``config`` (DetectionConfig), ``data`` (COCO layout, shapes, augmentation), ``heads`` (the mmdet parts on
torchvision modules), ``model`` (backbone + FPN + heads, the input transform), ``official`` (official mmdet modules,
checkpoints and parity hooks), ``evaluation`` (COCO AP), ``training`` (parameter groups), ``checkpoints`` (load,
eval, visualize), ``commands`` (what ``visionzoo detect train | eval | visualize`` runs). Names are re-exported
lazily, so reading the config does not import torch.
"""
from __future__ import annotations

from ..._lazy import lazy_exports

_EXPORTS = {
    "DETECTORS": "config", "DetectionConfig": "config", "MULTISCALE_DETR": "config",
    "CocoDetection": "data", "_quiet": "data", "collate": "data", "prepare_data": "data", "shapes_root": "data",
    "train_augment": "data",
    "_backbone_with_fpn": "model", "build_detector": "model", "mmdet_roi_pool": "model",
    "_unwrap": "evaluation", "coco_evaluate": "evaluation", "evaluate": "evaluation", "to_coco_results": "evaluation",
    "build_optimizer": "training", "train": "training",
    "draw_predictions": "checkpoints", "evaluate_checkpoint": "checkpoints",
    "load_detector": "checkpoints", "untrained_detector": "checkpoints", "visualize": "checkpoints",
    "config_from_args": "commands", "run": "commands",
}
__all__ = sorted(n for n in _EXPORTS if not n.startswith("_"))
__getattr__ = lazy_exports(__name__, _EXPORTS)
