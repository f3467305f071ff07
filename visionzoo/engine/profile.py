"""``--profile N`` of every training command: does the data pipeline keep up with the train step?

The loader is timed alone (the task's dataset, sampler, collate and ``cfg.workers`` processes, as the loop builds
them), then the train step alone (forward + backward + clipping + optimizer step + the task's after-update hook) on
one batch held on the device, built by the loop's own ``set_up`` (compiled with ``--torchcompile``: the
warm-up step compiles). If the loader's img/s is below the step's, training waits for data: add workers or
cheapen the augmentation. No run folder is made (data a task generates goes to a temporary folder).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import UserError
from .config import RunConfig
from .distributed import resolve_device
from .loop import set_up
from .sampling import SeededDataset
from .task import Task, to_device


def profile(task: Task, steps: int = 10, device: str | None = None) -> dict:
    """Loader and train-step throughput of ``task`` over ``steps`` batches each. Returns ``{"loader_img_s",
    "step_img_s", "batch_size", "workers", "device", "steps"}``."""
    task.cfg.check()
    if steps < 1:
        raise UserError(f"--profile takes a number of batches >= 1, got {steps}.")
    with tempfile.TemporaryDirectory(prefix="visionzoo-profile-") as tmp:
        return _profile(task, steps, resolve_device(device), Path(tmp))


def _profile(task: Task, steps: int, dev: torch.device, tmp: Path) -> dict:
    cfg: RunConfig = task.cfg
    setup = set_up(task, cfg, dev, tmp)  # what ``fit`` builds, so the step timed is the step trained
    ctx, model, optimizer, schedule, precision = setup.ctx, setup.model, setup.optimizer, setup.schedule, setup.precision
    n_batches = len(setup.batches.epoch_batches(0))
    if n_batches < 2:
        raise UserError(f"profiling needs at least 2 batches of {cfg.batch_size}: lower batch_size.")
    steps = min(steps, n_batches - 1)
    loader = DataLoader(SeededDataset(setup.train_set, cfg.seed), batch_sampler=setup.batches,
                        num_workers=cfg.workers, collate_fn=task.collate(),
                        generator=torch.Generator().manual_seed(cfg.seed))
    it = iter(loader)
    first = next(it)  # worker start-up is not counted
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    loader_s = time.perf_counter() - t0
    del it

    batch = to_device(first, dev)
    net = task.compile(setup.trainable, cfg.torchcompile) if cfg.torchcompile else setup.trainable
    net.train()

    def step(i: int) -> None:
        ctx.step, ctx.values = i, schedule.apply(optimizer, i)
        with precision.autocast():
            out = task.train_step(net, batch, ctx)
        precision.backward(out["loss"])
        precision.step(optimizer, task.clip_parameters(model, optimizer), cfg.clip_grad, cfg.clip_mode,
                       lambda: task.before_optimizer_step(model, ctx))
        task.after_update(model, ctx)

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
            "workers": cfg.workers, "device": str(dev), "steps": steps, "precision": precision.describe()}


def report(r: dict, what: str = "") -> str:
    """One line for the command line."""
    verdict = "the loader keeps up" if r["loader_img_s"] >= r["step_img_s"] else "the loader is the bottleneck"
    return (f"{what + ': ' if what else ''}batch {r['batch_size']} on {r['device']} ({r.get('precision', 'fp32')}): "
            f"loader {r['loader_img_s']:.1f} "
            f"img/s ({r['workers']} workers), train step {r['step_img_s']:.1f} img/s over {r['steps']} batches -> "
            f"{verdict}")
