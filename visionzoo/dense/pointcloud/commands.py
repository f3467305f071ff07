"""What ``visionzoo pointcloud`` runs (its flags are in visionzoo/cli/tools.py)."""
from __future__ import annotations

import torch

from ...engine.config import read_recipe
from .config import SMALL_MODEL_KWARGS, PointCloudConfig
from .data import parse_data
from .training import train

# ----------------------------------------------------------------------------------------------------------------
# CLI (registered as `visionzoo pointcloud`)

def config_from_args(args) -> PointCloudConfig:
    """recipe < flags < --set, then the values checked."""
    from ...engine.config import apply_overrides, config_overrides, split_run_path

    data = read_recipe(args.recipe) if args.recipe else {}
    data.update(config_overrides(args, PointCloudConfig))
    kw = dict(data.get("model_kwargs") or {})
    if getattr(args, "small", False):
        kw = {**SMALL_MODEL_KWARGS, **{k: v for k, v in kw.items() if k != "points"}}
    if getattr(args, "points", None) is not None:
        kw["points"] = args.points
    data["model_kwargs"] = kw
    if getattr(args, "data", None) is not None:
        data["dataset"], data["data_dir"] = parse_data(args.data)
    if getattr(args, "out", None):
        data.update(split_run_path(args.out))
    data = apply_overrides(data, getattr(args, "set", None) or [], PointCloudConfig)
    source = f"recipe {args.recipe}" if args.recipe else "flags"
    return PointCloudConfig.from_dict(data, source)


def run(args) -> int:
    cfg = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "checkpoint", None):
        from ...tasks.pointcloud import evaluate_checkpoint

        m = evaluate_checkpoint(args.checkpoint, cfg, device=args.device)
        print(f"{args.checkpoint}: test OA {m['test_oa']:.4f}, mAcc {m['test_macc']:.4f} "
              f"({m['test_size']} clouds, {m['num_classes']} classes, {m['precision']})")
        return 0
    if args.profile:
        from ...engine.profile import profile, report
        from ...tasks.pointcloud import PointCloudTask

        print(report(profile(PointCloudTask(cfg), args.profile, args.device), f"point cloud {cfg.model}"))
        return 0
    if args.resume:
        print(f"point cloud: resuming {args.resume} with its own settings, device {args.device}")
    else:
        print(f"point cloud: {cfg.model} {cfg.model_kwargs} on {cfg.dataset} ({cfg.points} points), "
              f"{cfg.epochs} epochs, batch {cfg.batch_size}, device {args.device}")
    train(cfg, resume=args.resume, device=args.device)
    return 0
