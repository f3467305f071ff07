"""``visionzoo segment train | eval | visualize``."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ...data.image_io import read_image
from ...engine.config import RecipeError, parse_yaml, read_recipe
from ...engine.precision import autocast_context, describe
from ...errors import InputNotFoundError
from .config import SegmentationConfig
from .data import ade20k_pairs, class_names, dataset_root, normalize, test_resize
from .inference import evaluate, predict_logits

_logger = logging.getLogger("visionzoo")

# ----------------------------------------------------------------------------------------------------------------
# visualisation

def palette(n: int) -> np.ndarray:
    """Distinct, deterministic colours (n, 3) uint8."""
    rng = np.random.default_rng(3)
    return rng.integers(40, 256, size=(n, 3)).astype(np.uint8)


def overlay(img: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colours = palette(int(pred.max()) + 1)[pred]
    return (img.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# CLI (registered as `visionzoo segment`)

HELP = "semantic segmentation (Semantic FPN, UperNet, SegFormer head) on ADE20K-layout data or embedded shapes"


def config_from_args(args) -> SegmentationConfig:
    """recipe (or, with --resume and no --recipe, the run's saved config) < flags < --set."""
    from ...engine.config import apply_overrides, config_overrides, split_run_path

    resume = _resume_path(args)
    if args.recipe:
        data, source = read_recipe(args.recipe), f"recipe {args.recipe}"
    elif resume is not None:
        data, source = _saved_config(Path(resume)), f"run {resume}"
    else:
        raise RecipeError("segment train needs --recipe (visionzoo list recipes 'segmentation/*'), or --resume RUN.")
    data = SegmentationConfig.upgrade_keys(data, source)
    flags = config_overrides(args, SegmentationConfig)
    if args.iters is not None:
        _logger.info("--iters is now spelled --steps")
        flags.setdefault("steps", args.iters)
    if args.data_flag is not None:
        flags.setdefault("data_dir", args.data_flag)
    if args.out and resume is None:
        flags.update(split_run_path(args.out))
    data.update(flags)
    data = apply_overrides(SegmentationConfig.upgrade_keys(data), args.set, SegmentationConfig)
    return SegmentationConfig.from_dict(data, source)


def _resume_path(args) -> str | None:
    if args.resume == "__out__":
        if not args.out:
            raise RecipeError("--resume without a value continues the --out folder: give --resume RUN or --out RUN.")
        return args.out
    return args.resume


def _saved_config(run: Path) -> dict:
    file = (run.parent if run.is_file() else run) / "config.yaml"
    if not file.is_file():
        raise InputNotFoundError(f"--resume {run}: no config.yaml there (is it a `visionzoo segment train` run "
                                 f"folder?); give --recipe too for a run of an older visionzoo.")
    data = parse_yaml(file.read_text(), str(file)) or {}
    data.pop("resolved", None)
    return data


def run(args) -> int:
    from ...engine.distributed import resolve_device
    from ...files import atomic_write_text
    from ...tasks import segment as task

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.action == "train":
        cfg = config_from_args(args)
        if args.profile:
            from ...engine.profile import profile, report

            print(report(profile(task.SegmentTask(cfg), args.profile, args.device), f"segment {cfg.head}"))
            return 0
        resume = _resume_path(args)
        print(f"segment: {cfg.model} + {cfg.head} on {cfg.dataset}, {cfg.steps} iterations, batch {cfg.batch_size}"
              + (f", resuming {resume}" if resume else ""))
        task.train(cfg, resume=resume, device=args.device)
        return 0
    recipe = getattr(args, "recipe", None)
    if args.action == "eval" and not (args.checkpoint or recipe):
        raise RecipeError("segment eval needs --checkpoint (a run or an official mmseg .pth) or --recipe (its "
                          "untrained model).")
    device = resolve_device(args.device)
    if args.action == "eval" and recipe and not args.checkpoint:
        cfg = SegmentationConfig.from_yaml(args.recipe)
        if args.data_dir:
            cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
        model, info = task.untrained_segmentor(cfg).to(device).eval(), {"step": 0}
        info["data_root"], info["source"] = str(dataset_root(cfg)), f"untrained {args.recipe}"
    else:
        model, cfg, info = task.load_segmentor(args.checkpoint, device, recipe=recipe)
        if info.get("official_recipe"):
            print(f"{args.checkpoint}: official mmseg checkpoint, converted into {info['official_recipe']}")
    if args.action == "eval":
        root = Path(args.data_dir or info.get("data_root") or dataset_root(cfg))
        m = evaluate(model, ade20k_pairs(root, "validation"), cfg, device, args.mode,
                     class_names(root, cfg.num_classes), workers=args.workers, aug_test=args.aug_test, amp=args.amp)
        m["precision"] = describe(args.amp, device)
        mode = m["mode"] + (" + aug-test" if args.aug_test else "")
        print(f"{mode}: mIoU {m['mIoU']:.4f} aAcc {m['aAcc']:.4f} mAcc {m['mAcc']:.4f} ({m['images']} images, "
              f"{m['precision']})")
        if args.results:
            result = {"checkpoint": info["source"], "iter": info.get("step", 0), **m}
            atomic_write_text(Path(args.results), json.dumps(result, indent=2))
        return 0
    # visualize
    from PIL import Image

    img = np.array(read_image(args.image), dtype=np.uint8)
    x = torch.from_numpy(normalize(test_resize(img, cfg.img_scale, cfg.size_divisor)))[None].to(device)
    with torch.no_grad(), autocast_context(device, args.amp):
        logits = predict_logits(model, x, args.mode or cfg.test_mode, cfg.slide_crop, cfg.slide_stride,
                                out_size=img.shape[:2])
    pred = logits.argmax(1)[0].cpu().numpy()
    Image.fromarray(overlay(img, pred)).save(args.out)
    print(f"wrote {args.out} ({len(np.unique(pred))} classes predicted)")
    return 0
