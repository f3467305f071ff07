"""``visionzoo finetune``: supervised fine-tuning of pretrained weights, for any model of the library.

It is ``visionzoo train`` with the pretrained weights as ``initial_checkpoint`` and fine-tuning defaults under the
recipe and flags. Without ``--recipe`` the defaults are the optimisation values of UDI's (BEiT) fine-tuning
protocol (spec udi.md section 7): AdamW, absolute peak lr 1e-3 (not batch-scaled), layer-wise lr decay 0.55,
weight decay 0.05, min lr 1e-6, drop path 0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, RandAugment
rand-m9-mstd0.5-inc1, color jitter 0.4, random erasing 0.25, classifier init scaled by 0.001; the schedule length
(epochs, warmup) comes from the TrainConfig defaults or your flags. The ImageNet recipe with the README's
200 epochs is ``udi/finetune_vit_small`` (and ``_1gpu``).

``--checkpoint`` takes a weights file (ours or official: UDI/DINO checkpoints load their teacher backbone), a
folder written by ``save_pretrained`` (``best/``, ``last/`` of a training run), or a ``visionzoo pretrain`` run
folder (its ``teacher_backbone.safetensors``). A checkpoint without a classifier keeps the new one.

Semi-supervised fine-tuning is the same command on a labelled subset of the train split: ``--label-percent P``
(class-balanced by default, drawn with the seed) or ``--label-subset-file 1percent.txt`` (SimCLRv2's split files);
the official 1 % / 10 % values are the recipes ``udi/semisup_finetune_vit_small_1pct`` / ``_10pct``.

"""
from __future__ import annotations

FINETUNE_DEFAULTS = dict(
    opt="adamw", lr=1e-3, layer_decay=0.55, weight_decay=0.05, opt_eps=1e-8, min_lr=1e-6, warmup_lr=1e-6,
    drop_path=0.1, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, smoothing=0.1, aa="rand-m9-mstd0.5-inc1",
    color_jitter=0.4, reprob=0.25, train_interpolation="bicubic", head_init_scale=0.001,
)


def build_config(args):
    from ..engine.config import (TrainConfig, apply_overrides, config_from_dict, config_overrides, load_config,
                                 split_run_path)
    from ..models import resolve_checkpoint

    overrides = config_overrides(args, TrainConfig)
    if getattr(args, "out", None):
        overrides.update(split_run_path(args.out))
    if args.data is not None:
        overrides.setdefault("data_dir", args.data)
        overrides.setdefault("dataset", "auto")
    elif "data_dir" in overrides:  # timm's --data-dir ROOT alone: read ROOT, not the default digits
        overrides.setdefault("dataset", "auto")
    overrides = apply_overrides(overrides, args.set or [])
    if args.recipe:
        cfg = load_config(args.recipe, overrides)
    else:
        cfg = config_from_dict(apply_overrides(FINETUNE_DEFAULTS, overrides))
    cfg.initial_checkpoint = str(resolve_checkpoint(args.checkpoint))
    if cfg.experiment is None:
        import time

        cfg.experiment = f"finetune-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def run(args) -> int:
    cfg = build_config(args)
    from .classify import train

    summary = train(cfg, resume=args.resume, device=args.device)
    best = summary.get("best_top1")
    print(f"fine-tuned {cfg.model} from {cfg.initial_checkpoint}: best val top-1 "
          + ("n/a" if best is None or best < 0 else f"{best:.2f}%"))
    return 0
