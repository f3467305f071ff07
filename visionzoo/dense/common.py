"""Training pieces shared by the detection and segmentation tools: mmcv-style parameter groups and learning rates.

The official dense recipes were written for mmcv's ``paramwise_cfg`` and ``LrUpdaterHook``; these two functions
reproduce their semantics (documented in gpvit.md section 5 and coc.md section 6) without mmcv, per iteration.
"""
from __future__ import annotations

from typing import Iterable, Sequence


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


def iter_lr_factor(it: int, total_iters: int, policy: str = "step", warmup_iters: int = 0,
                   warmup_ratio: float = 0.001, steps: Sequence[int] = (), gamma: float = 0.1, power: float = 1.0,
                   min_ratio: float = 0.0) -> float:
    """The lr at iteration ``it`` (0-based) as a fraction of the base lr, as mmcv computes it: the regular schedule
    (``step``: gamma per passed step, steps in iterations; ``poly``: (1 - it/total)^power down to ``min_ratio``;
    ``constant``) times a linear warm-up that rises from ``warmup_ratio`` over ``warmup_iters``."""
    if policy == "step":
        factor = gamma ** sum(it >= s for s in steps)
    elif policy == "poly":
        factor = (1.0 - min(it, total_iters) / max(total_iters, 1)) ** power * (1.0 - min_ratio) + min_ratio
    elif policy == "constant":
        factor = 1.0
    else:
        raise ValueError(f"unknown lr policy {policy!r}: use step, poly or constant")
    if it < warmup_iters:
        factor *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return factor


def set_lr(optimizer, base_lr: float, factor: float) -> None:
    """Set every group's lr to ``base_lr * factor * lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_scale", 1.0)


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
