"""COCO box / mask AP (pycocotools) of a detector, sharded over processes."""
from __future__ import annotations

import numpy as np
import torch

from ...engine.precision import autocast_context
from .data import CocoDetection, _quiet, collate

# ----------------------------------------------------------------------------------------------------------------
# evaluation

def to_coco_results(outputs, image_ids, label_to_cat: dict, mask_thresh: float = 0.5) -> tuple[list, list]:
    """torchvision outputs (boxes xyxy in original pixels, labels, scores, masks N x 1 x H x W probabilities) ->
    COCO result lists (bbox, segm with RLE)."""
    import pycocotools.mask as mask_util

    bbox, segm = [], []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu().numpy()
        scores = out["scores"].detach().float().cpu().numpy()
        labels = out["labels"].detach().cpu().numpy()
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        cats = [label_to_cat[int(v)] for v in labels]
        for b, s, c in zip(xywh.tolist(), scores.tolist(), cats):
            bbox.append(dict(image_id=int(image_id), category_id=c, bbox=[round(v, 3) for v in b],
                             score=round(s, 5)))
        if "masks" in out:
            masks = (out["masks"].detach()[:, 0] >= mask_thresh).cpu().numpy().astype(np.uint8)
            for m, s, c in zip(masks, scores.tolist(), cats):
                rle = mask_util.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                segm.append(dict(image_id=int(image_id), category_id=c, segmentation=rle, score=round(s, 5)))
    return bbox, segm


def coco_evaluate(coco_gt, results: dict, image_ids=None) -> dict:
    """COCOeval per iou type in ``results`` ({'bbox': [...], 'segm': [...]}) -> {'bbox_AP': .., 'bbox_AP50': ..,
    'bbox_AP75': .., 'bbox_APs/m/l': .., ...} in [0, 1] (-1 where undefined)."""
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    for iou_type, dets in results.items():
        if not dets:
            metrics.update({f"{iou_type}_{n}": 0.0 for n in names})
            continue
        with _quiet():
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics.update({f"{iou_type}_{n}": float(v) for n, v in zip(names, ev.stats[:6])})
    return metrics


def evaluate(model, dataset: CocoDetection, device, batch_size: int = 2, rank: int = 0, world_size: int = 1,
             amp="fp32", max_images: int | None = None, workers: int = 0) -> dict:
    """Box (and mask) AP of ``model`` (not a DDP wrapper: ranks may run different numbers of batches) on
    ``dataset``, scored against its COCO ground truth. Under DDP every rank runs a shard and rank 0 scores.
    ``amp``: the precision (auto, bf16, fp16, fp32)."""
    model = _unwrap(model).eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = list(range(rank, n, world_size))
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    # its own generator: creating the loader's iterator must not draw from the global RNG
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers, collate_fn=collate,
                                         generator=torch.Generator())
    bbox, segm = [], []
    with torch.no_grad():
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            with autocast_context(device, amp):
                outputs = model(images)
            b, s = to_coco_results(outputs, [t["image_id"] for t in targets], dataset.label_to_cat)
            bbox += b
            segm += s
    if world_size > 1:
        import torch.distributed as dist

        gathered = [None] * world_size
        dist.all_gather_object(gathered, (bbox, segm))
        bbox = [d for g in gathered for d in g[0]]
        segm = [d for g in gathered for d in g[1]]
    results = {"bbox": bbox}
    if hasattr(model, "roi_heads") and model.roi_heads.has_mask():
        results["segm"] = segm
    if rank != 0:
        return {}
    metrics = coco_evaluate(dataset.coco, results, image_ids=[dataset.ids[j] for j in range(n)])
    metrics["num_images"] = n
    metrics["num_detections"] = len(bbox)
    return metrics


def _unwrap(model):
    return model.module if hasattr(model, "module") else model
