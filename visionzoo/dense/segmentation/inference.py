"""Whole-image / sliding-window / multi-scale inference, the confusion-matrix metrics and the evaluation."""
from __future__ import annotations

import math

import torch

from ...engine.precision import autocast_context
from ...errors import UserError
from .config import SegmentationConfig
from .data import SegDataset
from .heads import _resize

# ----------------------------------------------------------------------------------------------------------------
# inference

def slide_windows(h: int, w: int, crop, stride) -> list[tuple[int, int, int, int]]:
    """mmseg slide_inference windows (y1, y2, x1, x2): a grid with ``stride``, the last window pushed back inside the
    image, so every window has size min(crop, image)."""
    (ch, cw), (sh, sw) = crop, stride
    ny = max(h - ch + sh - 1, 0) // sh + 1
    nx = max(w - cw + sw - 1, 0) // sw + 1
    out = []
    for iy in range(ny):
        for ix in range(nx):
            y2, x2 = min(iy * sh + ch, h), min(ix * sw + cw, w)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def slide_logits(model, img, crop, stride, num_classes: int, batch: int = 8):
    """Sliding-window logits for ``img`` (1, 3, H, W): windows run in batches (they all have one size); overlapping
    logits are averaged."""
    h, w = img.shape[-2:]
    wins = slide_windows(h, w, crop, stride)
    out = img.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        logits = model(torch.cat([img[..., y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])).float()
        for (y1, y2, x1, x2), lg in zip(chunk, logits):
            out[0, :, y1:y2, x1:x2] += lg
            count[..., y1:y2, x1:x2] += 1
    return out / count


def predict_logits(model, img, mode: str = "whole", crop=(512, 512), stride=(341, 341), out_size=None):
    """Logits for a normalised image (1, 3, h, w), resized (bilinear) to ``out_size`` (the original label size)."""
    if mode == "whole":
        logits = model(img).float()
    elif mode == "slide":
        logits = slide_logits(model, img, crop, stride, model.num_classes)
    else:
        raise UserError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    return _resize(logits, tuple(out_size)) if out_size is not None else logits


def aug_test_probs(model, imgs, out_size, flip: bool = True, mode: str = "whole", crop=(512, 512),
                   stride=(341, 341)):
    """mmseg ``aug_test``: class probabilities (1, K, *out_size) averaged over the images of every test scale
    ``imgs`` (each normalised (1, 3, h, w)) and, with ``flip``, their horizontal mirrors (the prediction flipped
    back). Each prediction is resized to ``out_size`` before its softmax, as mmseg's ``inference`` does."""
    total, n = None, 0
    for img in imgs:
        for flipped in ((False, True) if flip else (False,)):
            x = img.flip(-1) if flipped else img
            p = predict_logits(model, x, mode, crop, stride, out_size=out_size).softmax(1)
            p = p.flip(-1) if flipped else p
            total, n = (p if total is None else total + p), n + 1
    return total / n


# ----------------------------------------------------------------------------------------------------------------
# metrics

def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255):
    """(K, K) int64 matrix, rows = ground truth, columns = prediction, over pixels whose label is not ignored."""
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm, class_names=None) -> dict:
    """mmseg metrics from a confusion matrix: aAcc, mIoU and mAcc (NaN-mean over classes present in the union /
    in the labels), with per-class IoU and Acc (None where undefined)."""
    cm = cm.double()
    inter = cm.diagonal()
    area_label, area_pred = cm.sum(1), cm.sum(0)
    union = area_label + area_pred - inter
    iou = inter / union  # 0/0 -> NaN, as mmseg
    acc = inter / area_label
    out = {"aAcc": float(inter.sum() / cm.sum().clamp_min(1)), "mIoU": float(iou.nanmean()),
           "mAcc": float(acc.nanmean())}
    names = class_names or [str(i) for i in range(len(iou))]

    def num(v):  # JSON has no NaN: undefined per-class values are None
        return None if math.isnan(float(v)) else float(v)

    out["per_class"] = {n: {"IoU": num(i), "Acc": num(a)} for n, i, a in zip(names, iou, acc)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# evaluation

def evaluate(model, pairs, cfg: SegmentationConfig, device, mode: str | None = None, names=None, rank: int = 0,
             world_size: int = 1, amp="fp32", workers: int = 0, aug_test: bool = False) -> dict:
    """mIoU / aAcc / mAcc over ``pairs`` (each rank takes every world_size-th image; the confusion matrices are
    summed with all_reduce). Logits are resized to the original label size before the argmax, as mmseg does.
    ``aug_test``: multi-scale (``cfg.aug_test_ratios``) and flip (``cfg.aug_test_flip``) test, see
    :func:`aug_test_probs`. ``amp``: the precision (auto, bf16, fp16, fp32)."""
    from ...engine.distributed import all_reduce_sum

    mode = mode or cfg.test_mode
    ds = SegDataset(pairs, cfg, train=False, aug_test=aug_test)
    cm = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(rank, len(ds), world_size)),
                                         batch_size=None, num_workers=workers)  # images differ in size: no batching
    with torch.no_grad():
        for x, y in loader:
            y = y.to(device)
            with autocast_context(device, amp):
                if aug_test:
                    logits = aug_test_probs(model, [v[None].to(device) for v in x], y.shape, cfg.aug_test_flip,
                                            mode, cfg.slide_crop, cfg.slide_stride)
                else:
                    logits = predict_logits(model, x[None].to(device), mode, cfg.slide_crop, cfg.slide_stride,
                                            out_size=y.shape)
            cm += confusion_matrix(logits.argmax(1)[0], y, cfg.num_classes, cfg.ignore_index)
    all_reduce_sum(cm)
    model.train(was_training)
    out = segmentation_metrics(cm.cpu(), names)
    out["confusion_matrix"] = cm.cpu().tolist()
    out["mode"], out["images"] = mode, len(ds)
    if aug_test:
        out["aug_test"] = {"ratios": list(cfg.aug_test_ratios), "flip": bool(cfg.aug_test_flip)}
    return out
