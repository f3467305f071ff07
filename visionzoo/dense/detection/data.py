"""COCO-layout data (pycocotools), the embedded shapes and the train augmentation."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch

from ...errors import InputNotFoundError, UserError
from .config import DetectionConfig

# ----------------------------------------------------------------------------------------------------------------
# data

def shapes_root(cfg: DetectionConfig, out: str | os.PathLike | None) -> Path:
    """Where the embedded shapes dataset of this config lives (written on first use, deterministically)."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    kw = {**dict(n_train=64, n_val=16, size=(128, 128), seed=0), **cfg.shapes_kwargs}
    tag = f"shapes_coco_{kw['n_train']}_{kw['n_val']}_{kw['size'][0]}x{kw['size'][1]}_s{kw['seed']}"
    base = Path(out) if out else Path(os.environ.get("VISIONZOO_CACHE", Path.home() / ".cache" / "visionzoo"))
    return base / tag


def prepare_data(cfg: DetectionConfig, out: str | os.PathLike | None = None) -> Path:
    """The COCO root for this config; the shapes dataset is generated if missing. Clear error if COCO is absent."""
    if cfg.dataset == "shapes":
        root = shapes_root(cfg, out)
        done = root / "annotations" / f"instances_{cfg.val_split}.json"
        if not done.is_file():
            from ..shapes import write_coco

            kw = dict(cfg.shapes_kwargs)
            if "size" in kw:
                kw["size"] = tuple(kw["size"])
            write_coco(root, **kw)  # deterministic: a rewrite after an interrupted one gives the same files
        return root
    if not cfg.data_dir:
        raise UserError("dataset 'coco' needs data_dir (the folder holding annotations/ and train2017/ val2017/)")
    root = Path(cfg.data_dir)
    for split in (cfg.train_split, cfg.val_split):
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file() or not (root / split).is_dir():
            raise InputNotFoundError(
                f"COCO data not found: expected {ann} and the image folder {root / split}/ (COCO layout: "
                f"<root>/annotations/instances_{split}.json, <root>/{split}/*.jpg). Set data_dir or --data.")
    return root


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


class CocoDetection:
    """A COCO-format split for torchvision detectors: ``ds[i]`` -> (image float CHW in [0, 1], target dict with boxes
    xyxy, labels 1..K, masks uint8 NxHxW, image_id). Training transforms draw from numpy's global RNG, which the
    engine seeds from (seed, epoch, index) just before the item is built, so an item is a pure function of those
    whatever the worker count or a resume; ``ds[(i, epoch)]`` seeds from (seed, epoch, i) itself (tools, tests)."""

    def __init__(self, root, split: str, train: bool = False, flip_prob: float = 0.5,
                 multiscale: str | None = None, masks: bool = True, seed: int = 0):
        from pycocotools.coco import COCO

        root = Path(root)
        self.img_dir = root / split
        with _quiet():
            self.coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        self.cat_ids = sorted(self.coco.getCatIds())
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}  # 0 is background in torchvision
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        ids = sorted(self.coco.getImgIds())
        if train:  # mmdet filter_empty_gt: images without a usable (non-crowd) box teach nothing
            ids = [i for i in ids if any(not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
                                         for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids
        self.train, self.flip_prob, self.multiscale, self.masks, self.seed = train, flip_prob, multiscale, masks, seed

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def load(self, index: int):
        """Image (uint8 HxWx3) and its non-crowd annotations as numpy arrays (boxes xyxy, labels, masks)."""
        from ...data.image_io import decode_image

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        img = np.asarray(decode_image(self.img_dir / info["file_name"]))  # 16-bit etc. scaled, not clipped
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = np.array([self.cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        if self.masks:
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else \
                np.zeros((0, img.shape[0], img.shape[1]), np.uint8)
        else:
            masks = None
        return img, boxes, labels, masks, image_id

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        img, boxes, labels, masks, image_id = self.load(index)
        if self.train:
            # one Generator seeded from the (per-item seeded) global RNG, or from (seed, epoch, index) when given
            seed = np.random.randint(0, 2**31, size=4) if epoch is None else [self.seed, epoch, index]
            rng = np.random.default_rng(seed)
            img, boxes, labels, masks = train_augment(img, boxes, labels, masks, rng, self.flip_prob,
                                                      self.multiscale)
        image = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255)
        target = {"boxes": torch.from_numpy(boxes).float().reshape(-1, 4), "labels": torch.from_numpy(labels),
                  "image_id": image_id}
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        return image, target


def train_augment(img, boxes, labels, masks, rng, flip_prob: float = 0.5, multiscale: str | None = None):
    """Training-time geometry that is not the resize: the DETR random-crop branch (3x recipes) and the flip."""
    H, W = img.shape[:2]
    if multiscale == "detr" and rng.random() < 0.5:
        # mmdet AutoAugment branch 2: Resize short side to one of 400/500/600 (max 1333), RandomCrop of an absolute
        # size in [384, 600] (allow_negative_crop); the multi-scale resize that follows happens in the model.
        short = rng.choice([400, 500, 600])
        scale = min(short / min(H, W), 1333 / max(H, W))
        ch = min(H, int(round(rng.integers(384, 601) / scale)))
        cw = min(W, int(round(rng.integers(384, 601) / scale)))
        y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        img = img[y0:y0 + ch, x0:x0 + cw]
        boxes = boxes - np.array([x0, y0, x0, y0], np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, ch)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], labels[keep]
        if masks is not None:
            masks = masks[keep][:, y0:y0 + ch, x0:x0 + cw]
        H, W = ch, cw
    if rng.random() < flip_prob:
        img = img[:, ::-1]
        boxes = boxes.copy()
        boxes[:, [0, 2]] = W - boxes[:, [2, 0]]
        if masks is not None:
            masks = masks[:, :, ::-1]
    return img, boxes, labels, masks


def collate(batch):
    return tuple(zip(*batch))
