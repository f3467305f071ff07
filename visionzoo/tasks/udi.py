"""UDI self-supervised pretraining as a task of the one training loop (engine/loop.py).

The method (visionzoo/ssl/udi/, dinov2's meta-arch spirit) owns its step, teacher update and centers: the model
is the ``UDI`` module (student + EMA teacher + loss with its center buffer), DDP wraps only the student, the loss
call takes the DDP student, and the teacher's EMA runs after each optimizer step with the step's momentum. lr,
weight decay and teacher momentum are dinov2-style per-iteration arrays; the teacher temperature is per epoch inside
``UDILoss``. Evaluation is the online weighted k-NN of the teacher backbone (``knn_top1``, also at step 0), and
``last/`` / ``best/`` hold the teacher backbone as a ``save_pretrained`` folder, so every ``--checkpoint RUN``
reads it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..engine.loop import NonFiniteLossError, fit  # noqa: F401  (NonFiniteLossError re-exported for callers)
from ..engine.schedule import ArraySchedule
from ..engine.task import Context, Task
from ..errors import UserError
from ..ssl.udi import (UDI, UDIConfig, _build_data, backbone_kwargs, build_schedules, build_udi, eval_crop_pct,
                       extract_features, knn_accuracy, param_groups)

_logger = logging.getLogger("visionzoo")

__all__ = ["UDIConfig", "UDITask", "pretrain"]


class UDITask(Task):
    name = "udi"
    best_metric = "knn_top1"
    eval_at_start = True  # the k-NN of the initial teacher (the baseline row at step 0)

    def prepare(self, ctx: Context) -> None:
        cfg = self.cfg
        cfg.workers = min(cfg.workers, os.cpu_count() or 1)  # more loader processes than cores only thrash
        self.udi: UDI | None = None
        self.step: nn.Module | None = None  # the compiled method step (--torchcompile)

    def build_model(self, ctx: Context) -> nn.Module:
        cfg = self.cfg
        udi = build_udi(cfg)
        patch = udi.student.backbone.patch_embed.patch_size[0]
        self.train_set, self.knn_train, self.knn_val, self.num_classes = _build_data(cfg, patch)
        self.knn = cfg.online_knn and self.knn_val is not None
        if not self.knn:
            self.best_metric = None  # no k-NN: last/ is the model
        self.udi = udi
        return udi

    def train_dataset(self, ctx: Context):
        return self.train_set

    def trainable(self, model: nn.Module) -> nn.Module:
        return model.student  # DDP wraps the student only; the teacher follows by EMA

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        groups = param_groups(model.student)
        groups[0]["weight_decay"], groups[0]["decays"] = self.cfg.weight_decay, True  # the wd schedule's group
        groups[1]["decays"] = False
        return torch.optim.AdamW(groups, lr=lr)

    def build_schedule(self, optimizer, ctx: Context, lr: float):
        return ArraySchedule(build_schedules(self.cfg, ctx.steps_per_epoch, ctx.world_size, lr=lr))

    def compile(self, net: nn.Module, mode: str) -> nn.Module:
        # the whole method step is one compiled callable: the teacher on the global crops, the (DDP) student on
        # every crop and the loss with its centre update; ``net`` itself stays as it is (no second compile)
        self.step = torch.compile(self.udi, mode=None if mode == "default" else mode)
        return net

    def train_step(self, net: nn.Module, batch, ctx: Context) -> dict:
        crops, src_maps, tgt_maps = batch
        step = self.step if self.step is not None else self.udi
        # the temperature as a tensor: a compiled step would otherwise recompile for each warm-up epoch's value
        temp = self.udi.loss.teacher_temp_tensor(ctx.epoch)
        loss, parts = step(crops, (src_maps, tgt_maps), ctx.epoch, student=net, teacher_temp=temp)
        return {"loss": loss, **{k: torch.as_tensor(v, device=loss.device) for k, v in parts.items()}}

    def before_optimizer_step(self, model: nn.Module, ctx: Context) -> None:
        if ctx.epoch < self.cfg.freeze_last_layer:  # DINO: the last layer stays fixed during the first epoch(s)
            for p in model.student.head.last_layer.parameters():
                p.grad = None

    def after_update(self, model: nn.Module, ctx: Context) -> None:
        model.update_teacher(ctx.values["momentum"])  # snapshots (save_every_epochs): the loop's, of export_model

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: Context) -> dict:
        if not self.knn or not ctx.is_main:  # rank 0 alone runs the k-NN (it writes the metrics and best/)
            return {}
        cfg = self.cfg

        def loader(ds):
            return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size * 2, shuffle=False,
                                               num_workers=cfg.workers, pin_memory=ctx.device.type == "cuda")

        backbone = model.teacher.backbone
        autocast = ctx.autocast() if ctx.autocast is not None else None
        ftr, ltr = extract_features(backbone, loader(self.knn_train), ctx.device, autocast=autocast)
        autocast = ctx.autocast() if ctx.autocast is not None else None
        fva, lva = extract_features(backbone, loader(self.knn_val), ctx.device, autocast=autocast)
        return {"knn_top1": knn_accuracy(ftr, ltr, fva, lva, cfg.knn_k, cfg.knn_t, self.num_classes)}

    def export_model(self, model: nn.Module) -> nn.Module:
        return model.teacher.backbone

    def export(self, model: nn.Module, folder, metadata: dict) -> None:
        from ..models import save_pretrained

        cfg = self.cfg
        data_config = {"input_size": (3, cfg.global_size, cfg.global_size), "crop_pct": eval_crop_pct(cfg),
                       "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic"}
        args = {k: v for k, v in backbone_kwargs(cfg).items() if k != "num_classes"}
        save_pretrained(self.export_model(model), folder, model_args=args, data_config=data_config,
                        metadata=metadata)

    def header(self) -> str:
        knn = (f"k-NN on {len(self.knn_train)} / {len(self.knn_val)} images" if self.knn else "no online k-NN")
        return f"{self.cfg.model}, {len(self.train_set)} images, {knn}"


def pretrain(cfg: UDIConfig, out_dir: str | os.PathLike | None = None, resume: bool | str | os.PathLike = False,
             device: str | None = None, progress: bool = True) -> dict:
    """UDI pretraining of ``cfg`` in the run folder ``out_dir`` (None: ``cfg.output/cfg.experiment``).
    ``resume``: True continues ``out_dir``, a path continues that run folder. Returns the loop's summary plus
    ``knn_init``, ``knn_final`` and ``steps``. ``progress`` is kept for callers (the bar shows on a terminal)."""
    from ..engine.config import split_run_path

    cfg.check()
    if out_dir is not None:
        for k, v in split_run_path(out_dir).items():
            setattr(cfg, k, v)
    run = None
    if resume:
        if resume is True and out_dir is None:
            raise UserError("resume=True needs the run folder (out_dir); or pass resume=RUN_FOLDER.")
        run = Path(out_dir if resume is True else resume)
        if (run / "udi_networks.safetensors").is_file() and not (run / "last").is_dir():
            raise UserError(f"{run} is a UDI run of an older visionzoo (udi_networks.safetensors) whose training "
                            f"state this one cannot resume; its teacher still loads (--checkpoint {run}). "
                            f"Start a new run.")
    summary = fit(UDITask(cfg), resume=run, device=device)
    summary["knn_init"] = summary.get("knn_top1_init")
    summary["knn_final"] = summary.get("knn_top1")
    summary["steps"] = summary.get("global_step")
    return summary
