"""Per-step schedules for every task. Before optimizer step ``s`` (0-based: the steps done so far) the loop calls
``schedule.apply(optimizer, s)``, which sets each group's lr (times its ``lr_scale``) and whatever else the schedule
drives, and returns the values of the step for the task and the metrics. A schedule is a pure function of the step,
so it needs no state of its own to resume.

Three kinds cover the official recipes: timm's schedulers (``cosine``, ``step``, ... stepped per update), mmcv's
``LrUpdaterHook`` policies (``step``/``poly``/``constant`` with a linear warm-up, per iteration), and dinov2-style
arrays (one value per iteration for lr, weight decay, teacher momentum, temperature, ...).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import UserError


class Schedule:
    def apply(self, optimizer, step: int) -> dict:
        raise NotImplementedError


class NoSchedule(Schedule):
    def apply(self, optimizer, step: int) -> dict:
        return {"lr": optimizer.param_groups[0]["lr"]}


class TimmSchedule(Schedule):
    """A timm scheduler stepped per update (``step_on_epochs=False``): its lr depends on the step alone."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def apply(self, optimizer, step: int) -> dict:
        self.scheduler.step_update(step)
        return {"lr": optimizer.param_groups[0]["lr"]}


def timm_schedule(optimizer, sched: str, epochs: float, steps_per_epoch: int, warmup_epochs: float = 0,
                  warmup_lr: float = 1e-6, warmup_prefix: bool = False, min_lr: float = 0.0,
                  decay_epochs: float = 30, decay_rate: float = 0.1) -> Schedule:
    from timm.scheduler import create_scheduler_v2

    if sched in (None, "none"):
        return NoSchedule()
    if warmup_prefix and warmup_epochs >= epochs:
        raise UserError(f"warmup_epochs ({warmup_epochs:g}) must be shorter than the run ({epochs:g} epochs) when "
                        f"warmup_prefix is set: lower warmup_epochs or raise epochs.")
    # timm's warmup_prefix runs the whole decay AFTER the warm-up; mmengine's LinearLR + CosineAnnealing(begin=w)
    # decays over the remaining epochs, so the decay gets epochs - warmup_epochs to keep the run length
    decay_len = epochs - warmup_epochs if warmup_prefix else epochs
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=decay_len, decay_epochs=decay_epochs, decay_rate=decay_rate,
        min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs, warmup_prefix=warmup_prefix,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return TimmSchedule(scheduler)


def set_lr(optimizer, lr: float) -> None:
    """Every group's lr to ``lr * lr_scale`` (mmcv's ``lr_mult``, layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class FactorSchedule(Schedule):
    """lr = ``base_lr * factor(step)`` (times each group's ``lr_scale``)."""

    def __init__(self, base_lr: float, factor: Callable[[int], float]):
        self.base_lr, self.factor = base_lr, factor

    def apply(self, optimizer, step: int) -> dict:
        lr = self.base_lr * self.factor(step)
        set_lr(optimizer, lr)
        return {"lr": lr}


def mmcv_factor(it: int, total_iters: int, policy: str = "step", warmup_iters: int = 0,
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
        raise UserError(f"unknown lr policy {policy!r}: use step, poly or constant")
    if it < warmup_iters:
        factor *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return factor


def cosine_array(base: float, final: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                 start_warmup_value: float = 0.0) -> np.ndarray:
    """dinov2's per-iteration cosine schedule with a linear warm-up (``linspace(start, base, W)``)."""
    warmup = np.array([])
    warmup_epochs = min(warmup_epochs, epochs)
    w_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base, w_iters)
    t = np.arange(epochs * niter_per_ep - w_iters)
    sched = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate((warmup, sched))


class ArraySchedule(Schedule):
    """One value per step for each name. ``lr`` goes to every group (times ``lr_scale``), ``wd`` to the groups that
    decay (initial ``weight_decay`` != 0); the other values (teacher momentum, temperature) are returned."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def apply(self, optimizer, step: int) -> dict:
        values = {k: float(v[min(step, len(v) - 1)]) for k, v in self.arrays.items()}
        if "lr" in values:
            set_lr(optimizer, values["lr"])
        if "wd" in values:
            for group in optimizer.param_groups:
                if group.setdefault("decays", group.get("weight_decay", 0.0) != 0.0):
                    group["weight_decay"] = values["wd"]
        return values
