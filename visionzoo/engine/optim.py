"""The optimizer of every task: timm's ``create_optimizer_v2``, or an entry of ``OPTIMIZER_FAMILIES`` for a method
whose optimizer is its own (GCR's Riemannian composite, ``gcr_<base>``)."""
from __future__ import annotations

import importlib

import torch
from torch import nn

# opt-name prefix -> "module:function(model, opt=<rest of the name>, lr=, weight_decay=, momentum=, **kwargs)"
OPTIMIZER_FAMILIES = {"gcr_": "visionzoo.optim.grassmann:create_grassmann_optimizer"}


def create_optimizer(cfg, model: nn.Module | list, lr: float) -> torch.optim.Optimizer:
    """From the config fields ``opt``, ``weight_decay``, ``momentum``, ``opt_eps``, ``opt_betas``, ``opt_kwargs``
    and ``layer_decay`` (timm's train.py names). ``model`` may also be a list of param groups."""
    kwargs = dict(getattr(cfg, "opt_kwargs", None) or {})
    if getattr(cfg, "opt_eps", None) is not None:
        kwargs["eps"] = cfg.opt_eps
    if getattr(cfg, "opt_betas", None) is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    for prefix, target in OPTIMIZER_FAMILIES.items():
        if cfg.opt.startswith(prefix):
            module, fn = target.split(":")
            create = getattr(importlib.import_module(module), fn)
            return create(model, opt=cfg.opt[len(prefix):], lr=lr, weight_decay=cfg.weight_decay,
                          momentum=cfg.momentum, **kwargs)
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               layer_decay=getattr(cfg, "layer_decay", None), **kwargs)
