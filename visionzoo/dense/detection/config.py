"""The detection recipe: ``DetectionConfig`` (RunConfig + the task's own keys, older names read with a note)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from ...engine.config import RecipeError, RunConfig

_logger = logging.getLogger("visionzoo")
DETECTORS = ("mask_rcnn", "retinanet")
MULTISCALE_DETR = tuple(range(480, 801, 32))  # DETR-style short sides (mmdet 3x / UDI configs)


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class DetectionConfig(RunConfig):
    """A detection recipe (YAML, flat keys; unknown keys are an error): the shared ``RunConfig`` fields (``epochs``,
    ``eval_every`` epochs, ``checkpoint_every_steps``, ``batch_size`` per process, ...) with mmdet's defaults, plus
    the task's own."""

    KIND = "detection"
    # old recipe keys -> RunConfig names (recipes and checkpoints of visionzoo <= 0.1; detection is epoch based)
    RENAMED_KEYS = {"eval_interval": "eval_every", "checkpoint_interval": "checkpoint_every_steps",
                    "ckpt_interval": "checkpoint_every_steps", "log_every": "log_interval", "max_iters": "max_steps"}
    IGNORED_KEYS = {"max_keep_ckpts": "a run keeps one train_state.pt (plus last/ and best/): nothing to rotate"}

    task: str = "detect"
    # the official mmdet config this recipe reproduces (its file name finds the recipe of an official checkpoint)
    official_config: str | None = None
    detector: str = "mask_rcnn"  # mask_rcnn | retinanet
    model: str = "coc_small"  # registered backbone name (CoC: fork_feat is set by build_backbone)
    model_kwargs: dict = field(default_factory=dict)
    neck: str = "auto"  # auto | native | simple | adapter | adapter_single (see dense/backbones.py)
    out_indices: list | None = None
    pretrained: str | None = None  # backbone weights: a file, a save_pretrained folder or a run folder (classify, UDI)
    drop_path: float | None = None
    fpn_channels: int = 256
    fpn_norm: str | None = None  # null (mmdet FPN default: conv bias, no norm) | bn (the GPViT configs' SyncBN)
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
    # optimisation (mmcv optimizer + paramwise groups, step lr with a linear warm-up per iteration)
    lr_steps: list = field(default_factory=lambda: [8, 11])  # epochs at which lr x 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    world_size: int = 8  # processes the recipe was written for (documentation; the lr is absolute)
    opt: str = "adamw"  # adamw | sgd
    weight_decay: float = 1e-4
    opt_betas: list | None = None
    momentum: float = 0.9
    no_decay_keys: list = field(default_factory=list)  # names containing these (or "1d": 1-D params) get wd 0
    lr_mults: dict = field(default_factory=dict)
    find_unused_parameters: bool = False
    # RunConfig fields whose default is mmdet's (1x schedule, 2 images per GPU, fp16 where amp is on)
    epochs: int = 12
    batch_size: int = 2  # per process
    lr: float | None = 2e-4
    AMP_TRUE: ClassVar[str] = "fp16"  # the older amp: true (mmdet's fp16 where amp is on)
    log_interval: int = 50  # iterations

    def check(self) -> None:
        super().check()
        if self.task != "detect":
            raise RecipeError(f"task is {self.task!r}: this is not a detection recipe (run `visionzoo {self.task}`).")
        if self.detector not in DETECTORS:
            raise RecipeError(f"detector must be one of {DETECTORS}, got {self.detector!r}")
        if self.dataset not in ("coco", "shapes"):
            raise RecipeError(f"dataset must be 'coco' or 'shapes', got {self.dataset!r}")
        if self.multiscale not in (None, "detr"):
            raise RecipeError(f"multiscale must be null or 'detr', got {self.multiscale!r}")
        if self.opt not in ("adamw", "sgd"):
            raise RecipeError(f"opt must be 'adamw' or 'sgd', got {self.opt!r}")
        if len(self.img_scale) != 2:
            raise RecipeError(f"img_scale is [long max, short], got {self.img_scale}")
        if self.retina_head_norm not in (None, "gn"):
            raise RecipeError(f"retina_head_norm must be null or 'gn', got {self.retina_head_norm!r}")
        if self.retina_head_norm == "gn" and self.fpn_channels % 16:
            raise RecipeError(f"retina_head_norm 'gn' uses 16 groups: fpn_channels must be a multiple of 16, got "
                              f"{self.fpn_channels}")
        if self.roi_align not in ("mmdet", "torchvision"):
            raise RecipeError(f"roi_align must be 'mmdet' or 'torchvision', got {self.roi_align!r}")
        if self.fpn_norm not in (None, "bn", "gn"):
            raise RecipeError(f"fpn_norm must be null, 'bn' or 'gn', got {self.fpn_norm!r}")
        if self.box_head not in ("2fc", "4conv1fc"):
            raise RecipeError(f"box_head must be '2fc' or '4conv1fc', got {self.box_head!r}")
