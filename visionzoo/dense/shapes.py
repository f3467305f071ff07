"""An embedded dense dataset: procedurally drawn shapes with boxes, instance masks and semantic masks.

Every image is a function of (seed, index) only, so a dataset written twice is identical and tests need no downloads.
Scenes hold 1-4 non-overlapping shapes (circle, square, triangle) of random size, rotation and colour over a smooth
random background with noise; the colour says nothing about the class, so a model has to learn the shape.
``write_coco`` and ``write_ade20k`` lay the same kind of scenes out exactly like COCO and ADE20K, so the dense tools
read them through the same code paths as the real datasets.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle")
ADE_CLASSES = ("background",) + SHAPE_CLASSES  # label k+1 in the PNGs; 0 is "other" (ignored, as in ADE20K)
_CIRCLE_VERTICES = 48


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices (n, 2) of a shape inscribed in the circle (cx, cy, r)."""
    n = {"circle": _CIRCLE_VERTICES, "square": 4, "triangle": 3}[kind]
    t = angle + 2 * math.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    c0, c1, c2 = rng.uniform(0, 255, size=(3, 3))
    img = c0 + (c1 - c0) * xx[..., None] + (c2 - c0) * yy[..., None]
    return img + rng.normal(0, 12, size=(h, w, 3))


def render_scene(seed: int, size: tuple[int, int] = (128, 128), max_shapes: int = 4):
    """One scene: ``(image uint8 HxWx3, instances)``; each instance has ``category_id`` (1-based index into
    SHAPE_CLASSES), ``mask`` (bool HxW), ``bbox`` [x, y, w, h] of the mask and ``polygon`` [x0, y0, x1, y1, ...]."""
    h, w = size
    rng = np.random.default_rng(seed)
    img = _background(rng, h, w)
    placed: list[tuple[float, float, float]] = []
    instances = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(20):  # rejection sampling: shapes never overlap, so the polygon is the mask
            r = rng.uniform(0.08, 0.22) * min(h, w)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if all(math.hypot(cx - x, cy - y) > r + s + 2 for x, y, s in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        kind = int(rng.integers(len(SHAPE_CLASSES)))
        poly = _polygon(SHAPE_CLASSES[kind], cx, cy, r, rng.uniform(0, 2 * math.pi))
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in poly.tolist()], fill=1)
        mask = np.asarray(canvas, dtype=bool)
        if not mask.any():
            continue
        colour = rng.uniform(0, 255, size=3)
        img[mask] = colour + rng.normal(0, 12, size=(int(mask.sum()), 3))
        ys, xs = np.nonzero(mask)
        x0, y0 = float(xs.min()), float(ys.min())
        instances.append(dict(category_id=kind + 1, mask=mask,
                              bbox=[x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0],
                              polygon=[round(float(v), 2) for v in poly.reshape(-1)]))
    return np.clip(img, 0, 255).astype(np.uint8), instances


def semantic_mask(instances: list, size: tuple[int, int]) -> np.ndarray:
    """ADE20K-style uint8 label map: 1 = background, 2.. = the shape classes (0, "other", is never drawn)."""
    label = np.ones(size, dtype=np.uint8)
    for inst in instances:
        label[inst["mask"]] = inst["category_id"] + 1
    return label


def _scene_seed(seed: int, split: str, index: int) -> int:
    return (seed * 1_000_003 + (0 if split == "train" else 500_000) + index) % (2 ** 63)


def write_coco(root, n_train: int = 64, n_val: int = 16, size: tuple[int, int] = (128, 128), seed: int = 0) -> Path:
    """COCO layout: ``root/{train2017,val2017}/<id>.jpg`` and ``root/annotations/instances_<split>.json`` with
    polygon segmentations, ``iscrowd`` 0 and categories 1..3. Returns ``root``."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(SHAPE_CLASSES)]
    ann_id = 1
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            image_id = i + 1
            img, instances = render_scene(_scene_seed(seed, split[:-4], i), size)
            name = f"{image_id:012d}.jpg"
            Image.fromarray(img).save(root / split / name, quality=95)
            images.append(dict(id=image_id, file_name=name, height=size[0], width=size[1]))
            for inst in instances:
                annotations.append(dict(id=ann_id, image_id=image_id, category_id=inst["category_id"],
                                        bbox=[round(v, 2) for v in inst["bbox"]], area=float(inst["mask"].sum()),
                                        iscrowd=0, segmentation=[inst["polygon"]]))
                ann_id += 1
        payload = dict(info=dict(description=f"visionzoo procedural shapes, seed {seed}"), licenses=[],
                       images=images, annotations=annotations, categories=categories)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    return root


def write_ade20k(root, n_train: int = 64, n_val: int = 16, size: tuple[int, int] = (128, 128),
                 seed: int = 0) -> Path:
    """ADE20K layout: ``root/images/{training,validation}/ADE_{train,val}_<8 digits>.jpg``, label PNGs with the same
    stem under ``root/annotations/...`` (0 other, 1 background, 2.. shapes) and ``root/classes.json``."""
    root = Path(root)
    for split, tag, n in (("training", "train", n_train), ("validation", "val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, instances = render_scene(_scene_seed(seed, tag, i), size)
            stem = f"ADE_{tag}_{i + 1:08d}"
            Image.fromarray(img).save(root / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(semantic_mask(instances, size)).save(root / "annotations" / split / f"{stem}.png")
    (root / "classes.json").write_text(json.dumps(dict(classes=list(ADE_CLASSES), reduce_zero_label=True)))
    return root
