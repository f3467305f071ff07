"""Detections drawn over an image: masks blended in a colour per detection, boxes, and ``label score`` tags placed
so that no two overlap (a small image is zoomed first, so that the tags fit and stay readable).

Used by ``visionzoo detect visualize`` (visionzoo/dense/detection/checkpoints.py).
"""
from __future__ import annotations

import numpy as np
import torch

from .common import MIN_DISPLAY_SIDE, display_zoom, zoom

__all__ = ["PALETTE", "draw_detections"]

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_tag(box, size, placed: list, width: int, height: int):
    """Top-left corner for a tag of ``size`` (w, h) near ``box``: above it, inside its top, below it, inside its
    bottom, then further down in tag-height steps; the first spot that fits in the image and covers no earlier tag."""
    tw, th = size
    x1, y1, x2, y2 = box
    x = min(max(0, x1), max(0, width - tw))
    spots = [y1 - th, y1, y2, y2 - th] + [y1 + k * th for k in range(1, max(1, height // max(th, 1)))]
    for y in spots:
        rect = (x, y, x + tw, y + th)
        if 0 <= y and y + th <= height and not any(_overlaps(rect, r) for r in placed):
            return rect
    return (x, min(max(0, y1), max(0, height - th)), x + tw, min(max(0, y1), max(0, height - th)) + th)


def draw_detections(image: np.ndarray, output: dict, classes=None, score_thresh: float = 0.5, alpha: float = 0.45,
                    min_side: int = MIN_DISPLAY_SIDE):
    """PIL image of ``image`` (H, W, 3 uint8) with the detections of ``output`` (torchvision's dict: boxes, labels,
    scores, optional masks [N, 1, H, W]) scoring at least ``score_thresh``. Images whose short side is under
    ``min_side`` are zoomed whole-pixel first (0: drawn at their own size)."""
    from PIL import Image, ImageDraw
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    image = np.array(image, dtype=np.uint8)  # a copy: torch may write into it (and PIL's arrays are read-only)
    H, W = image.shape[:2]
    factor = display_zoom(H, W, min_side) if min_side else 1
    keep = output["scores"] >= score_thresh
    order = torch.argsort(output["scores"][keep].cpu(), descending=True)  # tags of confident detections go first
    boxes = output["boxes"][keep].cpu()[order].float() * factor
    labels = output["labels"][keep].cpu()[order].tolist()
    scores = output["scores"][keep].cpu()[order].tolist()
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    canvas = torch.from_numpy(zoom(image, factor)).permute(2, 0, 1).contiguous()
    if len(boxes):
        if "masks" in output:
            masks = output["masks"][keep].cpu()[order][:, 0] > 0.5
            if factor > 1:
                masks = masks.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
            canvas = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colours)
        canvas = draw_bounding_boxes(canvas, boxes, colors=colours, width=max(1, min(2, factor)))
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    if not len(boxes):
        return picture
    pen = ImageDraw.Draw(picture)
    font = _font(max(10, min(picture.size) // 24))
    placed: list = []
    for box, lab, score, colour in zip(boxes.tolist(), labels, scores, colours):
        name = classes[lab - 1] if classes and 0 < lab <= len(classes) else lab
        text = f"{name} {score:.2f}"
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        rect = _place_tag([round(v) for v in box], (right - left + 4, bottom - top + 4), placed, *picture.size)
        placed.append(rect)
        pen.rectangle(rect, fill=colour)
        light = sum(colour) > 450
        pen.text((rect[0] + 2 - left, rect[1] + 2 - top), text, fill=(0, 0, 0) if light else (255, 255, 255),
                 font=font)
    return picture
