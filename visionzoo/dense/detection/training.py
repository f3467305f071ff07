"""What the detect task gives the engine: mmcv-style parameter groups."""
from __future__ import annotations

from .config import DetectionConfig

# ----------------------------------------------------------------------------------------------------------------
# training pieces (the loop is the engine's: visionzoo/tasks/detect.py)

def build_optimizer(model, cfg: DetectionConfig, lr: float | None = None):
    """The recipe's AdamW / SGD over mmcv-style parameter groups (``no_decay_keys``, ``lr_mults``)."""
    from ..common import mmcv_optimizer

    return mmcv_optimizer(model, cfg.lr if lr is None else lr, cfg.opt, cfg.weight_decay, cfg.no_decay_keys,
                          cfg.lr_mults, betas=cfg.opt_betas or (0.9, 0.999), momentum=cfg.momentum)


def train(cfg: DetectionConfig, out=None, resume=None, device: str | None = None, max_iters: int | None = None,
          log=None) -> dict:
    """Epoch-based training on the engine (``out``: the run folder itself; ``resume``: a run folder to continue
    exactly; ``max_iters``: stop after this many iterations). Returns the run's summary. See
    ``visionzoo.tasks.detect.train``."""
    from ...tasks.detect import train as _train

    return _train(cfg, out=out, resume=resume, device=device, max_iters=max_iters)
