"""ADE20K-layout data and the official mmseg train / test pipelines (numpy, per sample)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InputNotFoundError, UserError
from .config import IMAGENET_MEAN, IMAGENET_STD, SegmentationConfig

# ----------------------------------------------------------------------------------------------------------------
# data: ADE20K layout and the official pipelines (numpy, per sample, RNG passed in)

def ade20k_pairs(root, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of ``root/images/<split>/*.jpg`` with ``root/annotations/<split>/<stem>.png``."""
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise InputNotFoundError(f"ADE20K layout not found under {root}: expected {img_dir} and {ann_dir} "
                                 f"(ADEChallengeData2016 has images/{{training,validation}} and "
                                 f"annotations/{{training,validation}})")
    imgs = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not imgs:
        raise InputNotFoundError(f"no images in {img_dir}")
    pairs = [(p, ann_dir / f"{p.stem}.png") for p in imgs]
    missing = [str(a) for _, a in pairs if not a.is_file()]
    if missing:
        raise InputNotFoundError(f"{len(missing)} label PNGs missing in {ann_dir}, e.g. {missing[0]}")
    return pairs


def class_names(root, num_classes: int) -> list[str]:
    path = Path(root) / "classes.json" if root else None
    if path is not None and path.is_file():
        names = json.loads(path.read_text()).get("classes", [])
        if len(names) == num_classes:
            return list(names)
    return [str(i) for i in range(num_classes)]


def load_pair(img_path, ann_path, reduce_zero_label: bool = True):
    """uint8 RGB image (H, W, 3) and uint8 label (H, W); ``reduce_zero_label``: 0 -> 255, k -> k - 1."""
    from PIL import Image

    from ...data.image_io import decode_image  # the one decoder: 16-bit and other modes scaled, not clipped

    img = np.array(decode_image(img_path), dtype=np.uint8)
    raw = np.asarray(Image.open(ann_path))
    if raw.ndim == 2 and raw.size and (raw.min() < 0 or raw.max() > 255):  # a 16-bit label map would wrap silently
        raise UserError(f"{ann_path}: label values {int(raw.min())}..{int(raw.max())} do not fit the 8-bit ADE20K "
                        f"layout (class ids 0-255, 255 = ignore); remap the classes to 0-254 and save 8-bit PNGs.")
    label = raw.astype(np.uint8)
    if label.ndim != 2 or label.shape != img.shape[:2]:
        raise UserError(f"{ann_path}: label shape {label.shape} does not match image {img.shape[:2]}")
    return img, reduce_labels(label) if reduce_zero_label else label


def reduce_labels(label: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: 0 (other) -> 255 (ignored), k -> k - 1 (255 stays 255)."""
    out = label.astype(np.int16) - 1
    out[label == 0] = 255
    out[label == 255] = 255
    return out.astype(np.uint8)


def rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv ``imrescale`` size: the largest keep-ratio size with long edge <= max(scale) and short <= min(scale)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_image(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear, half-pixel centres, no antialias (cv2 INTER_LINEAR, which mmcv uses)."""
    if img.shape[:2] == (h, w):
        return img

    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest neighbour (cv2 INTER_NEAREST: source index floor(dst * scale))."""
    H, W = label.shape
    if (H, W) == (h, w):
        return label
    rows = np.minimum((np.arange(h) * (H / h)).astype(np.int64), H - 1)
    cols = np.minimum((np.arange(w) * (W / w)).astype(np.int64), W - 1)
    return label[rows[:, None], cols[None, :]]


def random_crop_box(label: np.ndarray, crop, rng, cat_max_ratio: float = 0.75, ignore_index: int = 255):
    """mmseg RandomCrop: a uniform box of size ``crop`` (clipped to the image); with ``cat_max_ratio < 1`` redraw
    (up to 10 times) while one class covers >= cat_max_ratio of the box's non-ignored pixels or only one class is
    there. Returns (y1, y2, x1, x2)."""
    h, w = label.shape
    ch, cw = crop

    def draw():
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, min(y + ch, h), x, min(x + cw, w)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            cnt = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
            cnt = np.delete(cnt, ignore_index) if 0 <= ignore_index < 256 else cnt
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def _rgb_to_hsv(img):
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(img / 255.0)


def photometric_distortion(img: np.ndarray, rng, brightness_delta: int = 32, contrast=(0.5, 1.5),
                           saturation=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 RGB: random brightness, contrast (before or after the HSV part, at
    random), saturation, hue (delta in OpenCV's 0-180 hue units); each step with probability 0.5, clipped to uint8."""
    from matplotlib.colors import hsv_to_rgb

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = int(rng.integers(2))
    if mode == 1 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation), 0, 1)
        img = np.clip(hsv_to_rgb(hsv) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-hue_delta, hue_delta)) / 180.0) % 1.0
        img = np.clip(hsv_to_rgb(hsv) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if mode == 0 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast))
    return img


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW with the ImageNet mean/std of the official configs (0-255 scale)."""
    x = (img.astype(np.float32) - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def train_transform(img: np.ndarray, label: np.ndarray, cfg: SegmentationConfig, rng):
    """The official train pipeline: Resize(img_scale, ratio_range, keep ratio) -> RandomCrop(cat_max_ratio) ->
    RandomFlip -> PhotoMetricDistortion -> Normalize -> Pad(crop, 0 / 255). Returns (float32 CHW, int64 HW)."""
    lo, hi = cfg.ratio_range
    ratio = rng.uniform(lo, hi)
    h, w = rescale_size(*label.shape, (int(cfg.img_scale[0] * ratio), int(cfg.img_scale[1] * ratio)))
    img, label = resize_image(img, h, w), resize_label(label, h, w)
    y1, y2, x1, x2 = random_crop_box(label, cfg.crop_size, rng, cfg.cat_max_ratio, cfg.ignore_index)
    img, label = img[y1:y2, x1:x2], label[y1:y2, x1:x2]
    if rng.random() < cfg.flip_prob:
        img, label = img[:, ::-1], label[:, ::-1]
    if cfg.photometric:
        img = photometric_distortion(np.ascontiguousarray(img), rng)
    x = normalize(img)
    ch, cw = cfg.crop_size
    out_x = np.zeros((3, ch, cw), np.float32)
    out_y = np.full((ch, cw), cfg.ignore_index, np.int64)
    out_x[:, :x.shape[1], :x.shape[2]] = x
    out_y[:label.shape[0], :label.shape[1]] = label
    return out_x, out_y


def _align(h: int, w: int, size_divisor: int) -> tuple[int, int]:
    return int(math.ceil(h / size_divisor)) * size_divisor, int(math.ceil(w / size_divisor)) * size_divisor


def test_size(h: int, w: int, img_scale, size_divisor: int = 32) -> tuple[int, int]:
    """Keep-ratio resize to ``img_scale`` then, with a divisor, AlignedResize's round-up of both sides."""
    h, w = rescale_size(h, w, img_scale)
    return _align(h, w, size_divisor) if size_divisor else (h, w)


def test_resize(img: np.ndarray, img_scale, size_divisor: int = 32) -> np.ndarray:
    """The test image as mmseg's AlignedResize makes it: a keep-ratio rescale to ``img_scale``, then (with a
    divisor) a second resize of that uint8 image to its sides rounded up to multiples of ``size_divisor``."""
    h, w = rescale_size(*img.shape[:2], img_scale)
    img = resize_image(img, h, w)
    return resize_image(img, *_align(h, w, size_divisor)) if size_divisor else img


class SegDataset:
    """Map-style dataset over ADE20K-layout pairs. Training: item ``i`` is pair ``i`` through the train pipeline,
    its randomness drawn from numpy's global RNG (which the engine seeds from (seed, epoch, index) just before the
    item is built), so an item is a pure function of (seed, epoch, index). Test: returns (image, label)."""

    def __init__(self, pairs, cfg: SegmentationConfig, train: bool, aug_test: bool = False):
        self.pairs, self.cfg, self.train, self.aug_test = list(pairs), cfg, train, aug_test

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        cfg = self.cfg
        img, label = load_pair(*self.pairs[index], cfg.reduce_zero_label)
        if self.train:
            # one Generator seeded from the (per-item seeded) global RNG: the pipeline's helpers take a Generator
            rng = np.random.default_rng(np.random.randint(0, 2**31, size=4))
            x, y = train_transform(img, label, cfg, rng)
            return torch.from_numpy(x), torch.from_numpy(y)
        y = torch.from_numpy(label.astype(np.int64))
        if self.aug_test:  # one image per ratio of img_scale (mmseg MultiScaleFlipAug)
            return [torch.from_numpy(normalize(test_resize(img, [int(v * r) for v in cfg.img_scale],
                                                           cfg.size_divisor)))
                    for r in cfg.aug_test_ratios], y
        return torch.from_numpy(normalize(test_resize(img, cfg.img_scale, cfg.size_divisor))), y


def dataset_root(cfg: SegmentationConfig, out: str | os.PathLike | None = None) -> Path:
    """The data folder; for ``shapes`` it is generated (deterministically from the seed) on first use."""
    if cfg.dataset == "ade20k":
        if not cfg.data_dir:
            raise UserError("dataset ade20k needs data_dir (ADEChallengeData2016 with images/ and annotations/): "
                            "pass --data-dir or set data_dir in the recipe")
        return Path(cfg.data_dir)
    root = Path(cfg.data_dir) if cfg.data_dir else Path(out or ".") / "shapes_ade20k"
    if not (root / "classes.json").is_file():
        from ...files import atomic_write_dir
        from ..shapes import write_ade20k

        atomic_write_dir(root, lambda tmp: write_ade20k(Path(tmp), n_train=cfg.shapes_train, n_val=cfg.shapes_val,
                                                        size=tuple(cfg.shapes_size), seed=cfg.seed))
    return root
