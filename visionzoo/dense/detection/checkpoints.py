"""Reading a trained detector: eval and visualize."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ...data.image_io import read_image
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
                        out: str | None = None, cfg: DetectionConfig | None = None) -> dict:
    """COCO AP of a trained run (``checkpoint``) or, with ``cfg`` and no checkpoint, of the untrained detector."""
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
                       workers=cfg.workers)
    if out:
        result = {"checkpoint": str(checkpoint), "data": str(root), "split": cfg.val_split, **metrics}
        atomic_write_text(Path(out), json.dumps(result, indent=2))
    return metrics


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_predictions(image: np.ndarray, output: dict, classes, score_thresh: float = 0.5, alpha: float = 0.45):
    """PIL image: masks blended in a per-detection colour, boxes and ``label score`` text (torchvision.utils)."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = output["scores"] >= score_thresh
    boxes = output["boxes"][keep].cpu()
    colours = [_PALETTE[i % len(_PALETTE)] for i in range(len(boxes))]
    names = [f"{classes[lab - 1] if classes and 0 < lab <= len(classes) else lab} {score:.2f}"
             for lab, score in zip(output["labels"][keep].tolist(), output["scores"][keep].tolist())]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if len(boxes):
        if "masks" in output:
            masks = output["masks"][keep][:, 0].cpu() > 0.5
            canvas = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colours)
        canvas = draw_bounding_boxes(canvas, boxes, labels=names, colors=colours, width=2)
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def visualize(checkpoint, image_path, out_path, score_thresh: float = 0.5, device="cpu") -> int:
    model, _, classes = load_detector(checkpoint, device)
    img = np.asarray(read_image(image_path))
    with torch.no_grad():
        output = model([torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255).to(device)])[0]
    draw_predictions(img, output, classes, score_thresh).save(out_path)
    return int((output["scores"] >= score_thresh).sum())
