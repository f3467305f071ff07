"""``visionzoo segment train | eval | visualize``."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from ...engine.config import RecipeError, read_recipe
from .config import SegmentationConfig, _logger
from .data import ade20k_pairs, class_names, dataset_root, normalize, resize_image, test_size
from .inference import evaluate, predict_logits

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...engine.config import add_config_flags

    parser.description = ("Train / evaluate / visualise semantic segmentation. Recipes: visionzoo list recipes "
                          "'segmentation/*'; segmentation/semfpn_shapes_cpu runs on CPU in a few minutes.")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("train", help="train from a recipe (iteration based, exact --resume)",
                       description="Values come from --recipe, then flags, then --set key=value. The run folder is "
                                   "--output/--experiment (or --out RUN); --resume RUN continues it exactly.")
    p.add_argument("--recipe", "-r", default=None, help="recipe name (segmentation/...) or YAML path; with --resume "
                                                        "the run's own config is used")
    p.add_argument("--out", default=None, metavar="RUN", help="the run folder itself (= --output PARENT "
                                                              "--experiment NAME)")
    p.add_argument("--resume", nargs="?", const="__out__", default=None, metavar="RUN",
                   help="continue the run in folder RUN exactly (no value: the --out folder)")
    p.add_argument("--data", dest="data_flag", default=None, metavar="ROOT", help="the same as --data-dir")
    p.add_argument("--iters", type=int, default=None, help="the older name of --steps")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other recipe keys (YAML values)")
    _common(p)
    add_config_flags(p, SegmentationConfig)
    p = sub.add_parser("eval", help="mIoU / aAcc / mAcc of a trained run on the validation split")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a run folder (best/, else last/), an exported folder, a train_state.pt or "
                                        "an older run's iter_N.pth")
    g.add_argument("--recipe", help="evaluate the recipe's UNTRAINED model (seeded as `train` seeds it; with its "
                                    "`pretrained` backbone if set): the learning-check baseline")
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="default: the recipe's test_mode")
    p.add_argument("--aug-test", action="store_true",
                   help="multi-scale + flip test as mmseg's test.py --aug-test (ratios 0.5-1.75 of img_scale; "
                        "recipe keys aug_test_ratios, aug_test_flip)")
    p.add_argument("--data", "--data-dir", dest="data_dir", default=None,
                   help="ADE20K root; default: the folder the run trained on")
    p.add_argument("--out", "--results", dest="results", default=None, help="write the metrics JSON here")
    p.add_argument("-j", "--workers", type=int, default=2, help="data-loading processes")
    _common(p)
    p = sub.add_parser("visualize", help="colour overlay of the predicted classes on one image")
    p.add_argument("--checkpoint", required=True, help="a run folder, an exported folder or an older iter_N.pth")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--mode", choices=["whole", "slide"], default=None)
    _common(p)


def _common(p) -> None:
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


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
    import yaml

    file = (run.parent if run.is_file() else run) / "config.yaml"
    if not file.is_file():
        raise FileNotFoundError(f"--resume {run}: no config.yaml there (is it a `visionzoo segment train` run "
                                f"folder?); give --recipe too for a run of an older visionzoo.")
    data = yaml.safe_load(file.read_text()) or {}
    data.pop("resolved", None)
    return data


def run(args) -> int:
    import torch

    from ...engine.distributed import resolve_device
    from ...files import atomic_write_text
    from ...tasks import segment as task

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.action == "train":
        cfg = config_from_args(args)
        resume = _resume_path(args)
        print(f"segment: {cfg.model} + {cfg.head} on {cfg.dataset}, {cfg.steps} iterations, batch {cfg.batch_size}"
              + (f", resuming {resume}" if resume else ""))
        summary = task.train(cfg, resume=resume, device=args.device)
        print(f"run folder: {summary['run_dir']}")
        return 0
    device = resolve_device(args.device)
    if args.action == "eval" and args.recipe:
        cfg = SegmentationConfig.from_yaml(args.recipe)
        if args.data_dir:
            cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
        model, info = task.untrained_segmentor(cfg).to(device).eval(), {"step": 0}
        info["data_root"], info["source"] = str(dataset_root(cfg)), f"untrained {args.recipe}"
    else:
        model, cfg, info = task.load_segmentor(args.checkpoint, device)
    if args.action == "eval":
        root = Path(args.data_dir or info.get("data_root") or dataset_root(cfg))
        m = evaluate(model, ade20k_pairs(root, "validation"), cfg, device, args.mode,
                     class_names(root, cfg.num_classes), workers=args.workers, aug_test=args.aug_test)
        mode = m["mode"] + (" + aug-test" if args.aug_test else "")
        print(f"{mode}: mIoU {m['mIoU']:.4f} aAcc {m['aAcc']:.4f} mAcc {m['mAcc']:.4f} ({m['images']} images)")
        if args.results:
            atomic_write_text(Path(args.results), json.dumps({"checkpoint": info["source"], "iter": info.get("step", 0), **m}, indent=2))
        return 0
    # visualize
    from PIL import Image

    img = np.array(Image.open(args.image).convert("RGB"), dtype=np.uint8)
    h, w = test_size(*img.shape[:2], cfg.img_scale, cfg.size_divisor)
    x = torch.from_numpy(normalize(resize_image(img, h, w)))[None].to(device)
    with torch.no_grad():
        logits = predict_logits(model, x, args.mode or cfg.test_mode, cfg.slide_crop, cfg.slide_stride,
                                out_size=img.shape[:2])
    pred = logits.argmax(1)[0].cpu().numpy()
    Image.fromarray(overlay(img, pred)).save(args.out)
    print(f"wrote {args.out} ({len(np.unique(pred))} classes predicted)")
    return 0
