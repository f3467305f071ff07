"""The pieces the segment task gives the engine: mmcv-style parameter groups and the per-iteration lr factor."""
from __future__ import annotations

from .config import SegmentationConfig

# ----------------------------------------------------------------------------------------------------------------
# training pieces (the loop is the engine's: visionzoo/tasks/segment.py)

def build_optimizer(model, cfg: SegmentationConfig, lr: float | None = None):
    """The recipe's AdamW / SGD over mmcv-style parameter groups (``no_decay_keys``, ``lr_mults``)."""
    from ..common import mmcv_optimizer

    return mmcv_optimizer(model, cfg.lr if lr is None else lr, cfg.opt, cfg.weight_decay, cfg.no_decay_keys,
                          cfg.lr_mults, betas=cfg.opt_betas, eps=cfg.opt_eps)


def lr_factor(cfg: SegmentationConfig, it: int, lr: float | None = None) -> float:
    """mmcv's per-iteration lr factor at iteration ``it`` (poly / step / constant with a linear warm-up)."""
    from ...engine.schedule import mmcv_factor

    lr = cfg.lr if lr is None else lr
    return mmcv_factor(it, cfg.iters, policy=cfg.sched, warmup_iters=cfg.warmup_iters,
                       warmup_ratio=cfg.warmup_ratio, power=cfg.poly_power,
                       min_ratio=cfg.min_lr / lr if lr else 0.0)


def train(cfg: SegmentationConfig, out=None, resume=None, device: str | None = None, log=None) -> dict:
    """Iteration-based training on the engine (``out``: the run folder itself; ``resume``: a run folder to continue
    exactly). Returns the run's summary. See ``visionzoo.tasks.segment.train``."""
    from ...tasks.segment import train as _train

    return _train(cfg, out=out, resume=resume, device=device)
