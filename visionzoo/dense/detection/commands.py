"""What ``visionzoo detect`` runs (its flags are in visionzoo/cli/tools.py)."""
from __future__ import annotations

import json

import torch

from ...engine.config import read_recipe
from ...errors import UserError
from .checkpoints import evaluate_checkpoint, visualize
from .config import DetectionConfig, _logger

# ----------------------------------------------------------------------------------------------------------------
# CLI (registered as `visionzoo detect`)

def config_from_args(args) -> DetectionConfig:
    """recipe < flags < --set (old key names accepted with a note), then the values checked."""
    from ...engine.config import _split_override, apply_overrides, config_overrides, split_run_path

    source = f"recipe {args.recipe}" if args.recipe else "flags"
    data = DetectionConfig.upgrade_keys(read_recipe(args.recipe), source) if args.recipe else {}
    if args.data is not None:
        data["data_dir"] = args.data
    if getattr(args, "max_iters", None) is not None:
        _logger.info("--max-iters is now spelled --max-steps")
        data["max_steps"] = args.max_iters
    if getattr(args, "out", None):
        data.update(split_run_path(args.out))
    data.update(config_overrides(args, DetectionConfig))
    sets = dict(_split_override(o) for o in args.set or [])
    sets = DetectionConfig.upgrade_keys({k.replace("-", "_"): v for k, v in sets.items()}, "--set")
    data = apply_overrides(data, sets, DetectionConfig)
    return DetectionConfig.from_dict(data, source)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.action == "train":
        if not args.recipe and not args.resume:
            raise UserError("detect train needs --recipe (or --resume RUN to continue a run)")
        cfg = config_from_args(args)
        if args.profile:
            from ...engine.profile import profile, report
            from ...tasks.detect import DetectTask

            print(report(profile(DetectTask(cfg), args.profile, args.device), f"detect {cfg.detector}"))
            return 0
        if args.resume:
            print(f"detect: resuming {args.resume} with its own settings, device {args.device}")
        else:
            print(f"detect: {cfg.detector} on {cfg.model} (neck {cfg.neck}), {cfg.dataset}, {cfg.epochs} "
                  f"epochs, batch {cfg.batch_size}/process, device {args.device}")
        from ...tasks.detect import train as train_task

        train_task(cfg, resume=args.resume, device=args.device, check_recipe=args.recipe is not None)
        return 0
    from ...engine.distributed import resolve_device

    device = str(resolve_device(args.device))
    if args.action == "eval":
        cfg = DetectionConfig.from_yaml(args.recipe) if args.recipe else None
        m = evaluate_checkpoint(args.checkpoint, args.data, device, args.max_images, args.out, cfg, amp=args.amp)
        print(json.dumps(m, indent=2))
    else:
        n = visualize(args.checkpoint, args.image, args.out, args.score_thresh, device, amp=args.amp)
        print(f"{n} detections above {args.score_thresh} drawn to {args.out}")
    return 0
