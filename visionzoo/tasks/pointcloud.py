"""Point-cloud classification (``visionzoo pointcloud``): the CoC PointMLP (``coc_pointmlp``) on ScanObjectNN or the
embedded shapes. Data, loss and metrics live in ``dense/pointcloud/``; everything else is the loop's."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..dense.pointcloud import (PointCloudConfig, PointCloudSplit, augment, build_model, load_data, metrics_from_counts,
                                smooth_ce)
from ..engine.config import split_run_path
from ..engine.distributed import all_reduce_sum
from ..engine.loop import fit
from ..engine.schedule import FactorSchedule
from ..engine.state import resume_folder
from ..engine.task import Context, Task, load_model_state
from ..errors import InputNotFoundError, UserError
from ..files import safe_torch_load


class PointCloudItems(Dataset):
    """One cloud per item, ``([3, P] float32, label)``; training items are augmented from numpy's global RNG, which
    the loop seeds from (seed, epoch, index) just before the item is built."""

    def __init__(self, split: PointCloudSplit, train: bool = True):
        self.split, self.train = split, train

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        points = self.split.points[index]
        if self.train:
            points = augment(points)
        return torch.from_numpy(np.ascontiguousarray(points.T)), int(self.split.labels[index])


def cosine_epoch_factor(lr: float, min_lr: float, epochs: float, steps_per_epoch: int):
    """torch's per-epoch ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)`` as a per-step factor of ``lr``: constant
    within an epoch, ``min_lr + (lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2`` with epoch = step // spe."""
    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        return (min_lr + (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs)) / 2) / lr

    return factor


@torch.no_grad()
def evaluate_split(model: nn.Module, split: PointCloudSplit, device, rank: int = 0, world_size: int = 1,
                   batch_size: int = 64, autocast=None) -> dict:
    """Test OA and mAcc; under DDP each rank takes every ``world_size``-th cloud and the counts are summed."""
    import contextlib

    model.eval()
    k = len(split.classes)
    hits = torch.zeros(k, dtype=torch.float64, device=device)
    total = torch.zeros(k, dtype=torch.float64, device=device)
    index = np.arange(rank, len(split), world_size)
    for i in range(0, len(index), batch_size):
        idx = index[i:i + batch_size]
        x = torch.from_numpy(split.points[idx]).to(device).transpose(1, 2)
        y = torch.from_numpy(split.labels[idx]).to(device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            pred = model(x).argmax(1)
        total += torch.bincount(y, minlength=k).double()
        hits += torch.bincount(y, weights=(pred == y).double(), minlength=k)
    if world_size > 1:
        all_reduce_sum(hits), all_reduce_sum(total)
    return metrics_from_counts(hits.cpu(), total.cpu())


class PointCloudTask(Task):
    name = "pointcloud"
    best_metric = "test_oa"

    def __init__(self, cfg: PointCloudConfig, data: tuple | None = None):
        super().__init__(cfg)
        self.data = data  # (train, test) splits given by the caller (tests), else the config's dataset

    def prepare(self, ctx: Context) -> None:
        self.run_dir = ctx.run_dir  # summary() reads its metrics.csv
        self.train_split, self.test_split = self.data or load_data(self.cfg)
        self.num_classes = self.cfg.num_classes or len(self.train_split.classes)

    def build_model(self, ctx: Context) -> nn.Module:
        return build_model(self.cfg, self.num_classes)

    def train_dataset(self, ctx: Context):
        return PointCloudItems(self.train_split, train=True)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        # the official torch SGD: weight decay on every parameter, no Nesterov (timm's 'sgd' is Nesterov and skips
        # decay on biases and norms)
        cfg = self.cfg
        return torch.optim.SGD(self.trainable(model).parameters(), lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    def build_schedule(self, optimizer, ctx: Context, lr: float):
        cfg = self.cfg
        if cfg.sched == "none":
            return FactorSchedule(lr, lambda step: 1.0)
        epochs = ctx.total_steps / ctx.steps_per_epoch
        return FactorSchedule(lr, cosine_epoch_factor(lr, cfg.min_lr, epochs, ctx.steps_per_epoch))

    def train_step(self, net: nn.Module, batch, ctx: Context) -> dict:
        x, y = batch
        logits = net(x)
        return {"loss": smooth_ce(logits.float(), y, self.cfg.smoothing),
                "oa": (logits.detach().argmax(1) == y).float().mean()}

    def evaluate(self, model: nn.Module, ctx: Context) -> dict:
        m = evaluate_split(model, self.test_split, ctx.device, ctx.rank, ctx.world_size,
                           autocast=ctx.autocast)
        return {"test_oa": m["oa"], "test_macc": m["macc"]}

    def export(self, model: nn.Module, folder, metadata: dict) -> None:
        from ..models import save_pretrained

        # model_args in config.json: the folder rebuilds this size of the model (timm's local-dir: loader)
        save_pretrained(model, folder, model_args=dict(self.cfg.model_kwargs), metadata=metadata)

    def summary(self) -> dict:
        """The best test epoch (OA, its mAcc), the best mAcc and the last row, from metrics.csv."""
        out = {"chance": 1.0 / self.num_classes, "num_classes": self.num_classes,
               "train_size": len(self.train_split), "test_size": len(self.test_split)}
        path = Path(self.run_dir) / "metrics.csv"
        if not path.is_file():  # another rank than the first
            return out
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("test_oa")]
        if rows:
            best = max(rows, key=lambda r: (float(r["test_oa"]), -int(r["step"])))
            out.update(best_epoch=int(best["epoch"]), best_oa=float(best["test_oa"]),
                       best_oa_macc=float(best["test_macc"]), best_macc=max(float(r["test_macc"]) for r in rows),
                       last={k: _number(v) for k, v in rows[-1].items()})
        return out

    def header(self) -> str:
        return (f"{self.cfg.model}, {len(self.train_split)} train / {len(self.test_split)} test clouds of "
                f"{self.cfg.points} points, {self.num_classes} classes")


def _number(v: str):
    try:
        return float(v) if any(c in v for c in ".eEn") else int(v)
    except ValueError:
        return v


def train(cfg: PointCloudConfig, out=None, resume=None, device: str | None = None, data: tuple | None = None) -> dict:
    """Point-cloud training of ``cfg`` (``out``: the run folder itself; ``resume``: an earlier run folder to continue
    exactly). Returns the run's summary."""
    if out is not None:
        cfg = dataclasses.replace(cfg, **split_run_path(out))
    cfg.check()
    if resume is not None:
        resume = resume_folder(resume, "last.pth", "its weights still evaluate with --checkpoint. Start a new run.")
    return fit(PointCloudTask(cfg, data), resume=resume, device=device)


# ----------------------------------------------------------------------------------------------------------------
# evaluation of saved weights (`visionzoo pointcloud --checkpoint X`)

def _head_classes(state: dict) -> int | None:
    """num_classes of a coc_pointmlp state dict (its last classifier layer), None for another layout."""
    w = state.get("classifier.8.weight")
    return int(w.shape[0]) if torch.is_tensor(w) else None


def load_checkpoint_model(path: str | Path, cfg: PointCloudConfig) -> tuple[nn.Module, PointCloudConfig]:
    """The model in ``path`` and the config its data should be read with. ``path``: a run folder (best/, else
    last/; an older run's best.pth, else last.pth), a save_pretrained folder, a train_state.pt, an older last.pth /
    best.pth (they carry their config), or a bare weights file (built from ``cfg``). Torch files are read with
    weights_only=True."""
    from ..models import CheckpointMismatchError, load_pretrained, read_state_dict, saved_model_dir

    path = Path(path)
    folder = saved_model_dir(path) if path.is_dir() else None
    if folder is not None:
        model = load_pretrained(folder)
        args = json.loads((folder / "config.json").read_text()).get("model_args") or {}
        return model, dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, **args},
                                          num_classes=model.num_classes)
    if path.is_dir():
        for name in ("train_state.pt", "best.pth", "last.pth"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise InputNotFoundError(f"{path} holds no point-cloud weights (best/ or last/, train_state.pt, best.pth "
                                     f"or last.pth): pass a run folder, a save_pretrained folder or a weights file.")
    obj = safe_torch_load(path) if path.suffix != ".safetensors" else None
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and isinstance(obj.get("model"), dict):
        saved = obj["config"]  # an older last.pth / best.pth, or a train_state.pt: the run's own model settings
        cfg = dataclasses.replace(cfg, **{k: saved[k] for k in ("model", "model_kwargs") if k in saved})
        state = obj["model"]
    else:
        state = read_state_dict(path)
    num_classes = _head_classes(state) or cfg.num_classes
    if num_classes is None:
        raise CheckpointMismatchError(f"{path}: cannot tell its number of classes; set num_classes.")
    cfg = dataclasses.replace(cfg, num_classes=num_classes)
    model = load_model_state(build_model(cfg, num_classes), state, str(path),
                             f"{cfg.model} {cfg.model_kwargs}: is it a checkpoint of another model size? Pass the "
                             f"recipe it was trained with")
    return model, cfg


def evaluate_checkpoint(path: str | Path, cfg: PointCloudConfig, device: str | None = None) -> dict:
    """Test OA / mAcc of the weights in ``path`` on ``cfg``'s dataset (its number of points from the checkpoint)."""
    from ..engine.distributed import resolve_device
    from ..engine.precision import autocast_context, describe

    model, cfg = load_checkpoint_model(path, cfg)
    dev = resolve_device(device)
    _, test = load_data(cfg)
    if len(test.classes) != cfg.num_classes:
        raise UserError(f"{path} classifies {cfg.num_classes} classes but {cfg.dataset} has {len(test.classes)}: "
                        f"evaluate it on the dataset it was trained on (--data).")
    m = evaluate_split(model.to(dev), test, dev, autocast=lambda: autocast_context(dev, cfg.amp))
    return {"test_oa": m["oa"], "test_macc": m["macc"], "test_size": len(test), "num_classes": cfg.num_classes,
            "precision": describe(cfg.amp, dev)}
