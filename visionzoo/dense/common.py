"""mmcv-style parameter groups, shared by the detection and segmentation tasks.

The official dense recipes were written for mmcv's ``paramwise_cfg``; ``param_groups`` reproduces its semantics
(gpvit.md section 5, coc.md section 6) without mmcv. mmcv's ``LrUpdaterHook`` is ``engine.schedule.mmcv_factor``.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import UserError


def param_groups(model, weight_decay: float, no_decay_keys: Iterable[str] = (),
                 lr_mults: dict[str, float] | None = None) -> list[dict]:
    """Optimizer groups: a parameter whose name contains one of ``no_decay_keys`` gets no weight decay, and with
    ``"1d"`` among the keys so does every 1-D parameter (norms, biases: mmcv's ``norm/bias_decay_mult=0``). A name
    containing a key of ``lr_mults`` gets its lr multiplied (the first matching key wins); every group carries that
    factor as ``lr_scale``, which ``set_lr`` applies."""
    keys = tuple(k for k in no_decay_keys if k != "1d")
    decay_1d = "1d" in tuple(no_decay_keys)
    lr_mults = lr_mults or {}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = any(k in name for k in keys) or (decay_1d and (p.ndim <= 1 or name.endswith(".bias")))
        scale = next((m for k, m in lr_mults.items() if k in name), 1.0)
        groups.setdefault((0.0 if no_decay else weight_decay, scale), []).append(p)
    return [dict(params=ps, weight_decay=wd, lr_scale=scale) for (wd, scale), ps in groups.items()]


def mmcv_optimizer(model, lr: float, opt: str, weight_decay: float, no_decay_keys: Iterable[str] = (),
                   lr_mults: dict | None = None, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9):
    """AdamW or SGD over :func:`param_groups`; each group starts at ``lr * lr_scale`` (the engine's schedule keeps
    applying ``lr_scale``)."""
    groups = param_groups(model, weight_decay, tuple(no_decay_keys), dict(lr_mults or {}))
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise UserError(f"opt must be 'adamw' or 'sgd', got {opt!r}")
