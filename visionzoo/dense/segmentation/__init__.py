"""Semantic segmentation on any dense backbone: Semantic FPN, UperNet and the SegFormer head, ADE20K-layout data with
the official mmseg pipelines, whole-image / sliding-window inference, mIoU, the pieces of the
``segment`` task (``visionzoo/tasks/segment.py``: the engine's loop trains it) and the CLI.

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
* training: per-iteration mmcv poly / step lr with a linear warm-up and AdamW / SGD with mmcv paramwise keys
  (``training.py``); the loop, DDP, autocast, the run folder and exact resume are the engine's.

Modules: ``config`` (SegmentationConfig), ``heads`` (heads, Segmentor), ``data`` (ADE20K layout, pipelines),
``inference`` (whole / slide / aug-test, metrics, evaluate), ``training``, ``commands`` (what `visionzoo segment`
runs), ``official`` (official mmseg heads / checkpoints -> ours, the dense parity hooks). Names are re-exported
lazily (``from visionzoo.dense.segmentation import X``), so reading the config does not import torch.

"""
from __future__ import annotations

from ..._lazy import lazy_exports

_EXPORTS = {
    "HEADS": "config", "IMAGENET_MEAN": "config",
    "IMAGENET_STD": "config", "SegmentationConfig": "config",
    "FCNHead": "heads", "FPNHead": "heads", "FPNNeck": "heads", "SegformerHead": "heads", "Segmentor": "heads",
    "UPerHead": "heads", "_resize": "heads", "build_head": "heads", "build_segmentor": "heads", "seg_ce": "heads",
    "SegDataset": "data", "ade20k_pairs": "data", "class_names": "data", "dataset_root": "data", "load_pair": "data",
    "normalize": "data", "photometric_distortion": "data", "random_crop_box": "data", "reduce_labels": "data",
    "rescale_size": "data", "resize_image": "data", "resize_label": "data", "test_resize": "data", "test_size": "data",
    "train_transform": "data",
    "aug_test_probs": "inference", "confusion_matrix": "inference", "evaluate": "inference",
    "predict_logits": "inference", "segmentation_metrics": "inference", "slide_logits": "inference",
    "slide_windows": "inference",
    "build_optimizer": "training", "lr_factor": "training", "train": "training",
    "config_from_args": "commands", "overlay": "commands", "palette": "commands", "run": "commands",
}
__all__ = sorted(n for n in _EXPORTS if not n.startswith("_"))
__getattr__ = lazy_exports(__name__, _EXPORTS)
