"""Running UDI: ``pretrain`` (the task on the one training loop, visionzoo/tasks/udi.py) and ``profile_pretrain``."""
from __future__ import annotations

import os
import time

import torch

from .config import UDIConfig


def profile_pretrain(cfg: UDIConfig, steps: int = 10, device: str | None = None) -> dict:
    """Loader img/s (the augmentation pipeline alone, ``cfg.workers`` processes) and step img/s (the task's train
    step + optimizer step + teacher update on one batch held on the device) over ``steps`` batches each: whether the
    data pipeline keeps up with training. Returns ``{"loader_img_s", "step_img_s", "batch_size", "workers",
    "device", "steps"}``. (UDI-specific for now: the engine has no profiling mode.)"""
    from ...engine.distributed import resolve_device
    from ...engine.precision import Precision
    from ...engine.sampling import SeededDataset
    from ...engine.task import Context, to_device
    from ...tasks.udi import UDITask

    dev = resolve_device(device)
    task = UDITask(cfg)
    ctx = Context(cfg=cfg, device=dev)
    task.prepare(ctx)
    udi = task.build_model(ctx).to(dev)
    workers = cfg.workers
    loader = torch.utils.data.DataLoader(SeededDataset(task.train_dataset(ctx), cfg.seed), batch_size=cfg.batch_size,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) < 2:
        raise ValueError(f"profiling needs at least 2 batches of {cfg.batch_size}: lower batch_size.")
    steps = min(steps, len(loader) - 1)
    batches = iter(loader)
    first = next(batches)  # worker start-up is not counted
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    loader_s = time.perf_counter() - t0
    batch = to_device(first, dev)
    ctx.steps_per_epoch, ctx.total_steps = max(steps + 1, 2), cfg.epochs * max(steps + 1, 2)
    lr = cfg.resolved_lr()
    optimizer = task.build_optimizer(udi, lr)
    schedule = task.build_schedule(optimizer, ctx, lr)
    precision = Precision(dev, cfg.amp, cfg.amp_dtype)

    def step(i: int) -> None:
        ctx.step, ctx.values = i, schedule.apply(optimizer, i)
        with precision.autocast():
            out = task.train_step(udi.student, batch, ctx)
        precision.backward(out["loss"])
        precision.step(optimizer, task.clip_parameters(udi, optimizer), cfg.clip_grad, cfg.clip_mode,
                       lambda: task.before_optimizer_step(udi, ctx))
        task.after_update(udi, ctx)

    step(0)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    step_s = time.perf_counter() - t0
    n = steps * cfg.batch_size
    return {"loader_img_s": n / loader_s, "step_img_s": n / step_s, "batch_size": cfg.batch_size,
            "workers": workers, "device": str(dev), "steps": steps}


def pretrain(cfg: UDIConfig, out_dir: str | os.PathLike | None = None, resume: bool | str | os.PathLike = False,
             device: str | None = None, progress: bool = True) -> dict:
    """UDI pretraining on the one training loop (``visionzoo.tasks.udi``): see ``visionzoo.tasks.udi.pretrain``."""
    from ...tasks.udi import pretrain as _pretrain

    return _pretrain(cfg, out_dir, resume=resume, device=device, progress=progress)
