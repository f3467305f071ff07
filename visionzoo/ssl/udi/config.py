"""The UDI recipe (``UDIConfig``, a ``RunConfig``) and the old recipe key aliases."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ...engine.config import RunConfig

_logger = logging.getLogger("visionzoo")


# ================================================================================================================
# config

# old recipe keys -> RunConfig names (knn_every and save_every are handled in ``UDIConfig.from_dict``)
_RENAMED = {"log_every": "log_interval", "stop_after_steps": "max_steps", "save_every": "save_every_epochs"}


@dataclass
class UDIConfig(RunConfig):
    """UDI pretraining recipe. Defaults are the official argparse defaults / hard-coded values (spec section 6).
    The shared run settings (epochs, batch_size, lr, clip_grad, amp, log_interval, eval_every, max_steps, output,
    experiment, ...) are ``RunConfig``'s; ``eval_every`` is the online k-NN period in epochs."""

    task: str = "udi"
    # backbone
    model: str = "udi_vit_small_patch16"
    model_kwargs: dict = field(default_factory=dict)
    drop_path: float = 0.1  # student only (teacher 0)
    # data
    dataset: str = "folder"  # folder | lmdb | auto (data_dir/train, data_dir/val) | digits (embedded)
    data_dir: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    global_size: int = 224
    local_size: int = 96
    global_crops_scale: list = field(default_factory=lambda: [0.25, 1.0])
    local_crops_scale: list = field(default_factory=lambda: [0.05, 0.25])
    local_crops_number: int = 10
    window_global: int = 3  # SRS window (global_sampling_window_size)
    window_local: int = 2
    horizontal_flip: float = 0.5
    # head and objective
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    norm_last_layer: bool = True
    srs_heads: Optional[int] = None  # None: the backbone's number of heads
    alpha: float = 0.5
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    # optimisation (lr: absolute peak lr; None: lr_base * global_batch / lr_base_size)
    epochs: int = 300
    batch_size: int = 128  # per process
    world_size: int = 8  # processes the recipe was written for (documentation)
    lr_base: float = 0.0005
    lr_base_size: int = 256
    min_lr: float = 1e-5
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.1
    momentum_teacher: float = 0.996
    clip_grad: Optional[float] = 3.0  # per tensor (DINO); 0 or null disables
    clip_mode: str = "per_tensor"
    freeze_last_layer: int = 1
    amp: str = "fp16"  # official: fp16 with the grad scaler on GPUs (fp32 on CPUs, where fp16 is slow); bf16 | auto
    AMP_TRUE: ClassVar[str] = "fp16"  # the older amp: true
    # loop
    workers: int = 10  # official value; capped at the machine's CPU count
    log_interval: int = 10
    save_every_epochs: int = 20  # official saveckp_freq: a teacher snapshot in snapshots/ every N epochs; 0: none
    online_knn: bool = True  # weighted k-NN of the teacher on the val split every eval_every epochs
    knn_k: int = 20
    knn_t: float = 0.07
    knn_max_train: int = 20000  # labelled train images used as the k-NN memory bank
    knn_max_val: int = 10000
    max_train_images: Optional[int] = None  # pretrain on a fixed random subset of this size (smoke runs, tests)

    @classmethod
    def from_dict(cls, d: dict) -> "UDIConfig":
        from ...engine.config import check_config_keys

        d = _renamed_keys(d)
        check_config_keys(d, cls, "UDI")
        for k in ("global_crops_scale", "local_crops_scale"):
            if k in d and d[k] is not None:
                d[k] = [float(v) for v in d[k]]
        cfg = cls(**d)
        cfg.check()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "UDIConfig":
        from ...engine.config import read_recipe

        data = read_recipe(str(path))  # a YAML path or a shipped name such as udi/pretrain_vit_small_300ep
        data.update(_renamed_keys(overrides))  # an override in the new spelling wins over the recipe's old one
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def peak_lr(self, world_size: int = 1) -> float:
        return self.resolved_lr(world_size)

    def check(self) -> None:
        from ...engine.config import RecipeError

        super().check()
        if self.grad_accum_steps != 1:
            raise RecipeError("UDI has no gradient accumulation (the EMA teacher, the centers and the schedules are "
                              "per step): set grad_accum_steps=1 and choose batch_size and lr instead.")
        if self.steps is not None:
            raise RecipeError("UDI schedules are defined per epoch: set epochs (and max_steps to stop early), "
                              "not steps.")
        if self.model_ema:
            raise RecipeError("UDI's teacher is already an EMA of the student: set model_ema=false.")


def _renamed_keys(d: dict) -> dict:
    """Old UDI recipe keys in their RunConfig spelling (a logged note each); ``knn_every: 0`` / ``eval_every: 0``
    turn the online k-NN off."""
    d = dict(d)
    for old, new in _RENAMED.items():
        if old in d:
            _logger.warning("UDI config: '%s' is now spelled '%s'", old, new)
            value = d.pop(old)
            d.setdefault(new, value)
    if "knn_every" in d:
        _logger.warning("UDI config: 'knn_every' is now spelled 'eval_every' (knn_every 0: online_knn false)")
        d.setdefault("eval_every", d.pop("knn_every"))
    if d.get("eval_every") is not None and int(d["eval_every"]) == 0:
        d["eval_every"], d["online_knn"] = 1, False
    return d
