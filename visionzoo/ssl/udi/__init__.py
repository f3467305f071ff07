"""UDI self-supervised pretraining (the method): nested multi-crop, stratified random sampling (SRS), one shared
DINO head, three-level self-distillation ([CLS], [CLS+], patches) with three centers, EMA teacher.

Spec: shared/specs/udi.md (section numbers below refer to it). Row orders are the official ones: the student sees the
global crops as [v1; v2], the teacher as [v2; v1], so row r of both is a cross-view pair of the same image.

Works with any timm ViT with at least two prefix tokens (token 0 = [CLS], token 1 = [CLS+]), e.g.
``timm.create_model('vit_small_patch16_224', reg_tokens=1, dynamic_img_size=True, num_classes=0)`` or our
``udi_vit_*`` models. Differences from the official code, all exact up to float rounding:

* the teacher backbone runs ONCE on [v2; v1] (the official code runs it twice on the same input, spec section 10),
  and the SRS module runs once on the global and local->global query points together;
* the student SRS module is not evaluated on the local crops (the official code computes and discards it);
* the teacher's [CLS+] token is not projected (never used);
* attention uses SDPA; the EMA update and the per-tensor gradient clipping use fused ``torch._foreach_*`` ops.

Modules: ``config`` (the recipe), ``augment`` (crops, SRS masks, maps, the data sets), ``heads`` (DINO head, SRS,
``UDINetwork``), ``loss`` (``UDILoss``), ``meta_arch`` (``UDI``: student + EMA teacher + loss, schedules, param
groups, builder), ``knn`` (the online k-NN), ``train`` (``pretrain``, ``profile_pretrain``). Every public name is
re-exported here lazily, so ``from visionzoo.ssl.udi import X`` works for all of them and reading the config does
not import torch.

Public API (what ``visionzoo pretrain --method udi`` wires):

* ``UDIConfig`` (+ ``UDIConfig.from_yaml(path, **overrides)``), the recipe;
* ``UDIAugmentation(cfg)`` -> per image ``(crops, src_maps, tgt_maps)``; ``create_maps`` / ``sampling_mask``;
* ``DINOHead``, ``SRSModule``, ``UDINetwork``, ``UDILoss``; ``UDI(student_backbone, teacher_backbone, cfg)`` with
  ``forward(crops, maps, epoch) -> (loss, parts)`` and ``update_teacher(momentum)``;
* ``cosine_schedule``, ``build_schedules``, ``param_groups``, ``clip_gradients_per_tensor``;
* ``knn_accuracy`` (weighted k-NN, T = 0.07), ``extract_features``;
* ``pretrain(cfg, out_dir, resume=False)``: runs ``visionzoo.tasks.udi.UDITask`` on the one training loop
  (engine/loop.py: CPU or GPU, DDP under torchrun, exact resume, run folder with last/ and best/ teacher backbones);
* ``profile_pretrain(cfg, steps)``: loader img/s against step img/s (``visionzoo pretrain --profile N``).
"""
from __future__ import annotations

from ..._lazy import lazy_exports

_EXPORTS = {
    "UDIAugmentation": "augment", "create_maps": "augment", "eval_crop_pct": "augment", "eval_transform": "augment",
    "sampling_mask": "augment", "_build_data": "augment", "_ref_box": "augment", "_rrc_box": "augment",
    "_SSLDataset": "augment",
    "UDIConfig": "config", "_RENAMED": "config", "_renamed_keys": "config",
    "DINOHead": "heads", "SRSModule": "heads", "UDINetwork": "heads", "WeightNormLinear": "heads",
    "backbone_tokens": "heads", "network_checkpoint_filter": "heads", "_num_heads": "heads",
    "extract_features": "knn", "knn_accuracy": "knn",
    "UDILoss": "loss", "teacher_temp_schedule": "loss",
    "UDI": "meta_arch", "backbone_kwargs": "meta_arch", "build_schedules": "meta_arch", "build_udi": "meta_arch",
    "clip_gradients_per_tensor": "meta_arch", "cosine_schedule": "meta_arch", "param_groups": "meta_arch",
    "split_maps": "meta_arch",
    "pretrain": "train", "profile_pretrain": "train",
}
__all__ = [
    "UDIConfig", "UDIAugmentation", "sampling_mask", "create_maps", "DINOHead", "SRSModule", "UDINetwork",
    "UDILoss", "UDI", "cosine_schedule", "build_schedules", "param_groups", "clip_gradients_per_tensor",
    "knn_accuracy", "extract_features", "pretrain", "profile_pretrain", "network_checkpoint_filter",
    "WeightNormLinear", "backbone_tokens", "teacher_temp_schedule", "split_maps", "backbone_kwargs", "build_udi",
    "eval_transform", "eval_crop_pct",
]
__getattr__ = lazy_exports(__name__, _EXPORTS)
