"""The method: student + EMA teacher + loss (dinov2's meta-arch spirit), its schedules, param groups and
builder."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .config import UDIConfig
from .heads import DINOHead, UDINetwork
from .loss import UDILoss


# ================================================================================================================
# the method

def split_maps(src_maps: Sequence[torch.Tensor], tgt_maps: Sequence[torch.Tensor], n_local: int):
    """Official map lists (after collation) -> (src_map_g [2B,S,N], tgt_map_g [2B,S,N], tgt_map_l [nl,2B,Sl,N])."""
    src_g = torch.cat(list(src_maps[:2]), dim=0)
    tgt_g = torch.cat(list(tgt_maps[:2]), dim=0)
    tgt_l = None
    if n_local:
        tl = torch.cat(list(tgt_maps[2:2 + 2 * n_local]), dim=0)  # [l1->v2, l1->v1, l2->v2, ...] each [B,Sl,N]
        B = tgt_maps[0].shape[0]
        tgt_l = tl.reshape(n_local, 2 * B, *tl.shape[1:])
    return src_g, tgt_g, tgt_l


class UDI(nn.Module):
    """Student and EMA teacher ``UDINetwork`` + ``UDILoss``. ``forward(crops, maps, epoch) -> (loss, parts)``.

    ``crops`` = [v1, v2, l1, ..., l_nl] batches; ``maps`` = (src_maps, tgt_maps) in the official list orders.
    """

    def __init__(self, student_backbone: nn.Module, teacher_backbone: nn.Module, cfg: UDIConfig):
        super().__init__()
        dim = student_backbone.embed_dim

        def head(norm_last_layer):
            return DINOHead(dim, cfg.out_dim, norm_last_layer=norm_last_layer, nlayers=cfg.head_nlayers,
                            hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)

        self.cfg = cfg
        self.student = UDINetwork(student_backbone, head(cfg.norm_last_layer), cfg.srs_heads)
        self.teacher = UDINetwork(teacher_backbone, head(True), cfg.srs_heads)
        self.teacher.load_state_dict(self.student.state_dict())  # the teacher starts as an exact copy
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = UDILoss(cfg.out_dim, cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                            cfg.warmup_teacher_temp_epochs, cfg.epochs, cfg.alpha, cfg.student_temp,
                            cfg.center_momentum)
        self._pairs: Optional[tuple[list, list]] = None

    def forward(self, crops: Sequence[torch.Tensor], maps: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
                epoch: int, student: nn.Module | None = None, teacher_temp: torch.Tensor | None = None):
        """``student`` may be a DDP wrapper of ``self.student``; ``teacher_temp`` (a 0-d tensor) replaces the
        temperature of ``epoch``. Returns (loss, parts) and keeps the network outputs in ``self.last_outputs``."""
        src_maps, tgt_maps = maps
        n_local = len(crops) - 2
        src_g, tgt_g, tgt_l = split_maps(src_maps, tgt_maps, n_local)
        with torch.no_grad():
            t_out = self.teacher.forward_teacher(torch.cat([crops[1], crops[0]]), tgt_g, tgt_l)
        local = torch.cat(list(crops[2:])) if n_local else None
        s_out = (student or self.student)(torch.cat([crops[0], crops[1]]), local, src_g)
        loss, parts = self.loss(s_out, t_out, epoch, teacher_temp=teacher_temp)
        self.last_outputs = {"student": s_out, "teacher": t_out}
        return loss, parts

    def _param_pairs(self):
        if self._pairs is None:
            s = [p for p in self.student.parameters()]
            t = [p for p in self.teacher.parameters()]
            self._pairs = (s, t)
        return self._pairs

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s over every parameter (fused foreach ops, no host sync)."""
        s, t = self._param_pairs()
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)


def cosine_schedule(base: float, final: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                    start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-iteration cosine schedule with a linear warm-up (``linspace(start, base, W)``), section 5.2
    (``engine.schedule.cosine_array``, one value per iteration)."""
    from ...engine.schedule import cosine_array

    sched = cosine_array(base, final, epochs, niter_per_ep, warmup_epochs, start_warmup_value)
    assert len(sched) == epochs * niter_per_ep
    return sched


def build_schedules(cfg: UDIConfig, niter_per_ep: int, world_size: int = 1,
                    lr: float | None = None) -> dict[str, np.ndarray]:
    """lr (peak ``lr`` or the config's, cosine to min_lr after the warm-up), weight decay and teacher momentum, one
    value per iteration."""
    peak = cfg.peak_lr(world_size) if lr is None else lr
    return {
        "lr": cosine_schedule(peak, cfg.min_lr, cfg.epochs, niter_per_ep, cfg.warmup_epochs),
        "wd": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter_per_ep),
        "momentum": cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, niter_per_ep),
    }


def param_groups(model: nn.Module) -> list[dict]:
    """Group 0 (weight decay): tensors with ndim >= 2 not ending in .bias (includes cls/pos tokens, weight_g);
    group 1: biases and 1-D tensors (no decay). Frozen tensors are left out."""
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_reg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]


def clip_gradients_per_tensor(params: Sequence[torch.Tensor], clip: float) -> None:
    """Each gradient scaled by min(1, clip / (||g|| + 1e-6)) separately (DINO's clip_gradients): the engine's
    ``clip_mode: per_tensor``."""
    from ...engine.precision import clip_per_tensor_

    clip_per_tensor_(params, clip)


# ================================================================================================================
# building (the loop itself is engine/loop.py; the task is visionzoo/tasks/udi.py)

def backbone_kwargs(cfg: UDIConfig) -> dict:
    """Constructor arguments of the student/teacher backbones (also written to the exported ``config.json``)."""
    kw = dict(num_classes=0, **cfg.model_kwargs)
    kw.setdefault("img_size", cfg.global_size)
    if not cfg.model.startswith("udi_"):
        kw.setdefault("dynamic_img_size", True)
        kw.setdefault("reg_tokens", 1)
    return kw


def build_udi(cfg: UDIConfig, device: torch.device | str = "cpu") -> UDI:
    """Student/teacher backbones from ``cfg.model`` (+ ``model_kwargs``) and the UDI module."""
    import timm

    import visionzoo  # noqa: F401  (registers our models)

    kw = backbone_kwargs(cfg)
    torch.manual_seed(cfg.seed)
    student = timm.create_model(cfg.model, drop_path_rate=cfg.drop_path, **kw)
    teacher = timm.create_model(cfg.model, drop_path_rate=0.0, **kw)
    return UDI(student, teacher, cfg).to(device)
