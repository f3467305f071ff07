"""Semantic segmentation (``visionzoo segment``): Semantic FPN, UperNet or the SegFormer head on any dense backbone,
trained per iteration as mmseg does (``steps`` iterations, mmcv poly / step lr with a linear warm-up, mmcv paramwise
groups), evaluated by mIoU. Heads, data, metrics and inference live in ``dense/segmentation/``; the loop, the run
folder, resume and checkpoints are the engine's.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from ..dense import segmentation as seg
from ..dense.segmentation import SegmentationConfig
from ..engine.config import split_run_path
from ..engine.distributed import barrier, broadcast_object
from ..engine.loop import fit
from ..engine.sampling import seed_model_init
from ..engine.schedule import FactorSchedule, mmcv_factor
from ..engine.state import resume_folder
from ..engine.task import Context, Task, load_model_state, read_task_model, save_task_model
from ..errors import InputNotFoundError, UserError
from ..files import safe_torch_load

TASK = "segment"


class SegmentTask(Task):
    name = TASK
    best_metric = "mIoU"

    def prepare(self, ctx: Context) -> None:
        cfg = self.cfg
        # the embedded shapes are generated once, by the first rank, into data_dir or the run folder
        root = str(seg.dataset_root(cfg, ctx.run_dir)) if ctx.is_main else None
        barrier()
        self.root = Path(broadcast_object(root))
        self.train_pairs = seg.ade20k_pairs(self.root, "training")
        self.val_pairs = seg.ade20k_pairs(self.root, "validation")
        self.names = seg.class_names(self.root, cfg.num_classes)

    def build_model(self, ctx: Context) -> nn.Module:
        return seg.build_segmentor(self.cfg)

    def train_dataset(self, ctx: Context):
        return seg.SegDataset(self.train_pairs, self.cfg, train=True)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return seg.build_optimizer(model, self.cfg, lr)

    def build_schedule(self, optimizer, ctx: Context, lr: float):
        cfg = self.cfg
        min_ratio = cfg.min_lr / lr if lr else 0.0

        def factor(step: int) -> float:  # mmcv's LrUpdaterHook, per iteration
            return mmcv_factor(step, ctx.total_steps, policy=cfg.sched, warmup_iters=cfg.warmup_iters,
                               warmup_ratio=cfg.warmup_ratio, power=cfg.poly_power, min_ratio=min_ratio)

        return FactorSchedule(lr, factor)

    def train_step(self, net: nn.Module, batch, ctx: Context) -> dict:
        x, y = batch
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, y)  # {loss, loss_decode[, loss_aux]}: the segmentor computes its loss (one DDP forward)

    def evaluate(self, model: nn.Module, ctx: Context) -> dict:
        cfg = self.cfg
        m = seg.evaluate(model, self.val_pairs, cfg, ctx.device, names=self.names, rank=ctx.rank,
                         world_size=ctx.world_size, amp=cfg.amp,
                         workers=cfg.workers)
        return {"mIoU": m["mIoU"], "aAcc": m["aAcc"], "mAcc": m["mAcc"], "per_class": m["per_class"]}

    def export(self, model: nn.Module, folder, metadata: dict) -> None:
        # the config that rebuilds the segmentor; data_dir names the data it trained on (for eval / visualize)
        config = {**dataclasses.asdict(self.cfg), "data_dir": str(Path(self.root).resolve()), "pretrained": None}
        save_task_model(model, folder, TASK, config, metadata)

    def header(self) -> str:
        cfg = self.cfg
        return (f"{cfg.model} + {cfg.head}, {len(self.train_pairs)} train / {len(self.val_pairs)} val images "
                f"({cfg.dataset}), {cfg.num_classes} classes")


def untrained_segmentor(cfg: SegmentationConfig) -> nn.Module:
    """The segmentor with the initial weights a run of ``cfg`` starts from (the learning check's baseline)."""
    seed_model_init(cfg.seed)
    return seg.build_segmentor(cfg)


# ----------------------------------------------------------------------------------------------------------------
# train (the CLI's and older callers' entry point)

_OLD = re.compile(r"iter_(\d+)\.pth$")
_OLD_HINT = ("its weights still evaluate with `segment eval --checkpoint`. Start a new run (--set pretrained=... "
             "keeps the backbone).")
# what a resumed run may not change (it keeps its saved recipe)
RECIPE_KEYS = ("model", "model_kwargs", "head", "num_classes", "steps", "batch_size", "seed", "lr", "sched")


def train(cfg: SegmentationConfig, out=None, resume=None, device: str | None = None) -> dict:
    """Train ``cfg`` in a new run folder (``out``: the run folder itself, else ``output/experiment``) or continue
    ``resume`` (a run folder) exactly. Returns the run's summary (``mIoU`` etc. of the last evaluation, ``best``)."""
    if out is not None:
        cfg = dataclasses.replace(cfg, **split_run_path(out))
    cfg.check()
    if resume is not None:
        resume = resume_folder(resume, "iter_*.pth", _OLD_HINT, cfg, RECIPE_KEYS)
    return fit(SegmentTask(cfg), resume=resume, device=device)


# ----------------------------------------------------------------------------------------------------------------
# reading a trained segmentor (eval, visualize)

def load_segmentor(path, device="cpu", recipe: str | None = None) -> tuple[nn.Module, SegmentationConfig, dict]:
    """(model in eval mode, its config, info) from ``path``: a run folder (best/, else last/), an exported folder
    (config.json with task 'segment' + model.safetensors), a train_state.pt, an older iter_N.pth / run folder of
    iter_N.pth, or an official mmseg checkpoint (built from ``recipe``, by default the recipe of the official config
    it names). ``info``: ``step`` and ``data_root``. Torch files are read with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"checkpoint not found: {path} (give a run folder, its best/ or last/, or an "
                                 f"older iter_N.pth)")
    config = state = None
    info: dict = {"source": str(path)}
    if path.is_dir():
        try:
            config, state, meta = read_task_model(path, TASK)
            info["step"] = int(meta.get("step", 0))
        except FileNotFoundError:
            old = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _OLD.search(p.name)))
            if (path / "train_state.pt").is_file():
                old.append((float("inf"), path / "train_state.pt"))  # a run stopped before its first export
            if not old:
                raise InputNotFoundError(
                    f"{path} holds no segmentation model (best/ or last/ of a `visionzoo segment train` run, an "
                    f"exported folder, or an older run's iter_N.pth)") from None
            path = old[-1][1]
    elif path.suffix == ".safetensors":
        config, state, meta = read_task_model(path.parent, TASK)
        info["step"] = int(meta.get("step", 0))
    if state is None:
        obj = safe_torch_load(path)
        from ..dense.segmentation import official

        if official.is_official_checkpoint(obj):
            model, cfg, info["official_recipe"] = official.load_official_checkpoint(obj, recipe, info["source"])
            info["step"] = int((obj.get("meta") or {}).get("iter") or 0)
            info["data_root"] = cfg.data_dir
            return model.to(device).eval(), cfg, info
        if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)):
            raise UserError(f"{path} is not a segmentation checkpoint (no model + config): pass the run folder.")
        config, state = obj["config"], obj["model"]
        info["step"] = int(obj.get("iter") or (obj.get("progress") or {}).get("global_step") or 0)
        if obj.get("data_root"):
            info["data_root"] = obj["data_root"]
    cfg = SegmentationConfig.from_saved(config, f"checkpoint {info['source']}")
    cfg = dataclasses.replace(cfg, pretrained=None)  # the weights come from the checkpoint
    info.setdefault("data_root", cfg.data_dir)
    model = load_model_state(seg.build_segmentor(cfg), state, info["source"])
    return model.to(device).eval(), cfg, info
