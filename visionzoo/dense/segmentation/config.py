"""The segmentation recipe: ``SegmentationConfig`` (RunConfig + the task's own keys) and its older key names."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.config import RecipeError, RunConfig

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
HEADS = ("fpn", "upernet", "segformer")


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class SegmentationConfig(RunConfig):
    """One segmentation recipe (flat keys, ``visionzoo/recipes/segmentation/*.yaml``): the shared ``RunConfig``
    fields (``steps`` iterations, ``eval_every_steps``, ``checkpoint_every_steps``, ``batch_size`` per process, ...)
    with mmseg's defaults, plus the task's own."""

    KIND = "segmentation"
    # old recipe keys -> RunConfig names (iteration-based recipes of visionzoo <= 0.1 and the mmseg configs)
    RENAMED_KEYS = {"iters": "steps", "eval_interval": "eval_every_steps", "ckpt_interval": "checkpoint_every_steps"}
    IGNORED_KEYS = {"max_keep_ckpts": "a run keeps one train_state.pt (plus last/ and best/): nothing to rotate"}

    task: str = "segment"
    # the official mmseg config this recipe reproduces (its file name finds the recipe of an official checkpoint)
    official_config: str | None = None
    # backbone (visionzoo.dense.backbones.build_backbone)
    model: str = "coc_small_feat5"
    model_kwargs: dict = field(default_factory=dict)
    backbone_neck: str = "auto"  # auto | native | simple | adapter | adapter_single
    out_indices: list | None = None
    pretrained: str | None = None  # backbone weights: a file, a save_pretrained folder or a run folder (classify, UDI)
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
    # optimisation (mmcv optimizer + paramwise_cfg, LrUpdaterHook per iteration)
    world_size: int = 8  # processes the recipe was written for (documentation)
    opt: str = "adamw"
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
    avg_non_ignore: bool = False
    # RunConfig fields whose default is mmseg's (iteration-based: steps, not epochs)
    steps: int | None = 80000
    batch_size: int = 4  # PER PROCESS
    lr: float | None = 1e-4
    workers: int = 4
    eval_every_steps: int | None = 8000
    checkpoint_every_steps: int | None = 8000
    log_interval: int = 50

    @property
    def iters(self) -> int:
        """The older name of ``steps`` (the recipes' mmseg ``max_iters``)."""
        return int(self.steps or 0)

    def check(self) -> None:
        super().check()
        if not self.steps:
            raise RecipeError("segmentation recipes are iteration based: set steps (the older key: iters).")
        if self.head not in HEADS:
            raise RecipeError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.dataset not in ("ade20k", "shapes"):
            raise RecipeError(f"dataset must be 'ade20k' (with data_dir) or 'shapes', got {self.dataset!r}")
        if self.test_mode not in ("whole", "slide"):
            raise RecipeError(f"test_mode must be 'whole' or 'slide', got {self.test_mode!r}")
        if self.opt not in ("adamw", "sgd"):
            raise RecipeError(f"opt must be 'adamw' or 'sgd', got {self.opt!r}")
        if not self.aug_test_ratios or min(self.aug_test_ratios) <= 0:
            raise RecipeError(f"aug_test_ratios must be a non-empty list of positive scales, got "
                              f"{self.aug_test_ratios}")
        if self.sched not in ("poly", "step", "constant"):
            raise RecipeError(f"sched must be poly, step or constant, got {self.sched!r}")
