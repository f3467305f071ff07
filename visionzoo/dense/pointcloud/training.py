"""The official smoothed cross-entropy, OA / mAcc, the model builder and ``train``."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .config import PointCloudConfig

# ----------------------------------------------------------------------------------------------------------------
# loss and metrics

def smooth_ce(logits, target, eps: float = 0.2):
    """PointMLP ``cal_loss``: target ``1 - eps``, every other class ``eps / (K - 1)``."""
    k = logits.shape[1]
    one_hot = F.one_hot(target, k).to(logits.dtype)
    soft = one_hot * (1 - eps) + (1 - one_hot) * (eps / (k - 1))
    return -(soft * F.log_softmax(logits, dim=1)).sum(1).mean()


def classification_metrics(pred, target, num_classes: int) -> dict:
    """OA and mAcc (mean per-class recall over the classes present = sklearn's balanced accuracy)."""
    total = torch.bincount(target, minlength=num_classes).float()
    hits = torch.bincount(target, weights=(pred == target).float(), minlength=num_classes)
    return metrics_from_counts(hits, total)


def metrics_from_counts(hits, total) -> dict:
    """OA and mAcc from per-class hit and item counts."""
    present = total > 0
    return {"oa": float(hits.sum() / total.sum()), "macc": float((hits[present] / total[present]).mean())}


def build_model(cfg: PointCloudConfig, num_classes: int):
    from ...models import create_model  # coc_pointmlp is not in timm's (image-model) registry

    return create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)


def train(cfg: PointCloudConfig, out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          device: str | None = None, data: tuple | None = None) -> dict:
    """Train ``cfg`` on the engine (``tasks/pointcloud.py``); ``out`` is the run folder itself (the older spelling of
    ``output``/``experiment``), ``resume`` an earlier run folder to continue exactly, ``data`` = (train, test) splits
    that replace the config's dataset (tests). Returns the run's summary."""
    from ...tasks.pointcloud import train as train_task

    return train_task(cfg, out=out, resume=resume, device=device, data=data)
