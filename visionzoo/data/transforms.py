"""Train/eval transforms and Mixup/CutMix, thin over timm.data (RandAugment, RandomErasing, Mixup are timm's)."""
from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform, resolve_data_config

from ..errors import UserError

__all__ = ["build_train_transform", "build_eval_transform", "build_mixup", "resolve_eval_config"]


def build_train_transform(img_size, aa=None, reprob=0.0, remode="pixel", color_jitter=0.4, interpolation="bicubic",
                          mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, scale=(0.08, 1.0),
                          ratio=(3 / 4, 4 / 3), hflip=0.5, recount=1):
    """timm's training pipeline: RandomResizedCrop(scale, ratio) + flip + (RandAugment/AutoAugment ``aa`` or
    color jitter) + ToTensor/Normalize + RandomErasing(``reprob``, ``remode``).

    Small inputs work (32x32 digits); there a milder crop such as ``scale=(0.35, 1)`` keeps the digit visible, and
    ``hflip=0`` avoids mirrored digits.
    """
    return create_transform(
        input_size=img_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
        color_jitter=color_jitter, auto_augment=aa or None, interpolation=interpolation, mean=tuple(mean),
        std=tuple(std), re_prob=reprob, re_mode=remode, re_count=recount)


def _base_model(model):
    return getattr(model, "module", model)  # DDP / compiled wrappers keep the real model in .module


def resolve_eval_config(model=None, img_size=None, crop_pct=None, interpolation=None, mean=None, std=None,
                        crop_mode=None) -> dict:
    """The model's pretrained cfg (input size, crop pct, interpolation, mean/std) with explicit overrides."""
    args = dict(crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std, crop_mode=crop_mode)
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)[-2:]
        args["input_size"] = (3, *size)
    if model is None and all(v is None for v in args.values()):
        raise UserError("build_eval_transform needs a model (its pretrained cfg) or at least img_size")
    return resolve_data_config(args, model=_base_model(model) if model is not None else None)


def build_eval_transform(model=None, img_size=None, crop_pct=None, interpolation=None, mean=None, std=None,
                         crop_mode=None):
    """Eval transform (resize to size/crop_pct, center crop, normalize) driven by ``model.pretrained_cfg``."""
    cfg = resolve_eval_config(model, img_size, crop_pct, interpolation, mean, std, crop_mode)
    return create_transform(is_training=False, **cfg)


def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def build_mixup(cfg_like):
    """timm ``Mixup`` from recipe-style fields (``mixup``, ``cutmix``, ``cutmix_minmax``, ``mixup_prob``,
    ``mixup_switch_prob``, ``mixup_mode``, ``smoothing``, ``num_classes``) of a dict or object; None when off.

    Mixup needs an even batch size: use ``drop_last=True`` for the train loader. It applies label smoothing
    itself, so pair it with a soft-target loss.
    """
    mixup = _get(cfg_like, "mixup", 0.0) or 0.0
    cutmix = _get(cfg_like, "cutmix", 0.0) or 0.0
    cutmix_minmax = _get(cfg_like, "cutmix_minmax")
    prob = _get(cfg_like, "mixup_prob", 1.0)
    if (mixup <= 0 and cutmix <= 0 and cutmix_minmax is None) or not prob:
        return None
    return Mixup(
        mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=prob,
        switch_prob=_get(cfg_like, "mixup_switch_prob", 0.5), mode=_get(cfg_like, "mixup_mode", "batch") or "batch",
        label_smoothing=_get(cfg_like, "smoothing", 0.1) or 0.0, num_classes=_get(cfg_like, "num_classes", 1000))
