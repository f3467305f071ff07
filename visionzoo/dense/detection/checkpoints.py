"""Reading a trained detector: eval and visualize."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ...data.image_io import read_image
from ...engine.precision import autocast_context, describe
from ...errors import UserError
from ...files import atomic_write_text
from .config import DetectionConfig
from .data import CocoDetection, prepare_data
from .evaluation import evaluate

# ----------------------------------------------------------------------------------------------------------------
# loading a trained detector, eval and visualize

def load_detector(checkpoint, device="cpu"):
    """(model in eval mode, config, class names) from a run folder (best/, else last/), an exported folder, a
    train_state.pt or an older last.pth; see ``visionzoo.tasks.detect.load_detector``."""
    from ...tasks.detect import load_detector as _load

    model, cfg, classes, _ = _load(checkpoint, device)
    return model, cfg, classes


def untrained_detector(cfg: DetectionConfig, device="cpu"):
    """The recipe's detector as training starts (the loop's seeded init, pretrained backbone if the recipe has one):
    the baseline of the learning checks. Class names come from the training annotations."""
    from ...tasks.detect import untrained_detector as _untrained

    return _untrained(cfg, device)


def evaluate_checkpoint(checkpoint, data_dir: str | None = None, device="cpu", max_images: int | None = None,
                        out: str | None = None, cfg: DetectionConfig | None = None, amp="fp32") -> dict:
    """COCO AP of a trained run (``checkpoint``) or, with ``cfg`` and no checkpoint, of the untrained detector, in
    the precision ``amp`` (auto, bf16, fp16, fp32)."""
    if checkpoint is None:
        if cfg is None:
            raise UserError("eval needs --checkpoint (a trained run) or --recipe (the untrained baseline)")
        if data_dir:
            cfg = dataclasses.replace(cfg, data_dir=data_dir)
        model, run_dir = untrained_detector(cfg, device), None
    else:
        from ...tasks.detect import load_detector as _load

        model, cfg, _, info = _load(checkpoint, device)
        if data_dir:
            cfg = dataclasses.replace(cfg, data_dir=data_dir)
        run_dir = info["run_dir"]
    root = prepare_data(cfg, run_dir if cfg.dataset == "shapes" else None)
    val_set = CocoDetection(root, cfg.val_split, train=False, masks=False)
    metrics = evaluate(model, val_set, torch.device(device), cfg.batch_size, max_images=max_images,
                       workers=cfg.workers, amp=amp)
    metrics["precision"] = describe(amp, device)
    if out:
        result = {"checkpoint": str(checkpoint), "data": str(root), "split": cfg.val_split, **metrics}
        atomic_write_text(Path(out), json.dumps(result, indent=2))
    return metrics


def draw_predictions(image: np.ndarray, output: dict, classes, score_thresh: float = 0.5, alpha: float = 0.45,
                     min_side: int = 0):
    """PIL image: masks blended in a per-detection colour, boxes and non-overlapping ``label score`` tags, at the
    image's own size (``min_side``: zoom smaller images up to it; visionzoo/viz/detections.py)."""
    from ...viz.detections import draw_detections

    return draw_detections(image, output, classes, score_thresh, alpha, min_side=min_side)


def visualize(checkpoint, image_path, out_path, score_thresh: float = 0.5, device="cpu", amp="fp32") -> int:
    from ...viz.common import MIN_DISPLAY_SIDE

    model, _, classes = load_detector(checkpoint, device)
    img = np.asarray(read_image(image_path))
    with torch.no_grad(), autocast_context(device, amp):
        output = model([torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255).to(device)])[0]
    draw_predictions(img, output, classes, score_thresh, min_side=MIN_DISPLAY_SIDE).save(out_path)
    return int((output["scores"] >= score_thresh).sum())
