"""Evaluation: top-1 / top-5 / loss with the model's eval transform, and a small per-class report."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import all_reduce_sum
from ..engine.precision import autocast_context, describe

_logger = logging.getLogger("visionzoo")


def merge_outputs(output) -> torch.Tensor:
    """Eval logits from a model that returns several heads (tuple/list) in eval: their sum, as GA does."""
    if isinstance(output, (tuple, list)):
        return torch.stack(list(output)).sum(0)
    return output


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    amp="fp32",
    channels_last: bool = False,
    progress: bool = False,
) -> dict:
    """Loss, top-1 and top-5 (%) and per-class counts, summed over DDP ranks when distributed; ``amp`` is a
    precision name (auto, bf16, fp16, fp32)."""
    was_training = model.training
    model.eval()
    k5 = min(5, num_classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct1 = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.float64, device=device)
    class_total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
    for images, target in iterator:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            logits = merge_outputs(model(images))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        top = logits.topk(k5, dim=1).indices
        hit = top.eq(target[:, None])
        hit1 = hit[:, 0].double()
        correct1 += hit1.sum()
        correct5 += hit.any(dim=1).double().sum()
        class_total.index_add_(0, target, torch.ones_like(hit1))
        class_correct.index_add_(0, target, hit1)
    for t in (loss_sum, correct1, correct5, class_total, class_correct):
        all_reduce_sum(t)
    model.train(was_training)
    n = class_total.sum().clamp_min(1)
    return {
        "loss": float(loss_sum / n),
        "top1": float(100 * correct1 / n),
        "top5": float(100 * correct5 / n),
        "count": int(class_total.sum()),
        "class_total": class_total.cpu(),
        "class_correct": class_correct.cpu(),
    }


def per_class_report(result: dict, classes: list[str] | None = None, worst: int = 5) -> str:
    total, correct = result["class_total"], result["class_correct"]
    acc = 100 * correct / total.clamp_min(1)
    names = classes or [str(i) for i in range(len(total))]
    present = [i for i in range(len(total)) if total[i] > 0]
    order = sorted(present, key=lambda i: float(acc[i]))
    lines = [f"per-class accuracy ({len(present)} classes present); worst {min(worst, len(order))}:"]
    for i in order[:worst]:
        lines.append(f"  {names[i]:>20s}: {float(acc[i]):6.2f}%  ({int(correct[i])}/{int(total[i])})")
    if len(order) <= 20:
        lines.append("  all: " + ", ".join(f"{names[i]}={float(acc[i]):.1f}" for i in present))
    return "\n".join(lines)


def load_model_or_run(model_or_path: str, checkpoint: str | None = None, use_ema: bool = False,
                      **kwargs) -> tuple[nn.Module, str]:
    """(model, its name) for what a user names on a command line: a model name (+ ``checkpoint``, any weights the
    checkpoint resolver takes), a save_pretrained folder, or a run folder (its ``ema/`` with ``use_ema``, else
    ``last/``). ``kwargs`` go to the model constructor."""
    from ..models import create_model, load_pretrained

    path = Path(model_or_path)
    if path.is_dir():
        folder = path / ("ema" if use_ema and (path / "ema").is_dir() else "last") if (path / "last").is_dir() else path
        model = load_pretrained(folder, **kwargs)
        return model, model.pretrained_cfg.get("architecture", str(path))
    return create_model(model_or_path, checkpoint_path=checkpoint, **kwargs), model_or_path


def validate(
    model_or_path: str,
    data: str = "digits",
    data_dir: str | None = None,
    split: str = "val",
    checkpoint: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    img_size: int | None = None,
    crop_pct: float | None = None,
    amp="fp32",
    use_ema: bool = False,
    device: str | None = None,
    results_file: str | None = None,
) -> dict:
    """Evaluate a model name (+ ``checkpoint``), a weights file, an HF-layout folder or a run directory."""
    from ..data.datasets import build_dataset
    from ..data.transforms import build_eval_transform

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = {}
    if not Path(model_or_path).is_dir():  # a model name: its classifier is sized for the dataset
        kwargs["num_classes"] = len(build_dataset(data, data_dir, split, transform=None).classes)
    model, name = load_model_or_run(model_or_path, checkpoint=checkpoint, use_ema=use_ema, **kwargs)
    model.to(dev).eval()
    transform = build_eval_transform(model=model, img_size=img_size, crop_pct=crop_pct)
    dataset = build_dataset(data, data_dir, split, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    num_classes = getattr(model, "num_classes", None) or len(dataset.classes)
    result = evaluate(model, loader, dev, num_classes, amp=amp, progress=True)
    skipped = getattr(dataset, "num_skipped", 0)
    summary = {
        "model": name, "top1": round(result["top1"], 3), "top1_err": round(100 - result["top1"], 3),
        "top5": round(result["top5"], 3), "loss": round(result["loss"], 5), "count": result["count"],
        "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 4), "skipped_images": skipped,
        "precision": describe(amp, dev), "device": str(dev),
    }
    print(json.dumps(summary, indent=1))
    print(per_class_report(result, getattr(dataset, "classes", None)))
    if results_file:
        Path(results_file).write_text(json.dumps(summary, indent=1))
    return {**summary, "per_class": result}
