"""``visionzoo pretrain``: self-supervised pretraining (``--method udi``) with online k-NN.

Values come from ``--recipe`` (a UDI YAML), then the explicit flags, then ``--set key=value`` (any ``UDIConfig``
field). torch is imported only in ``run`` so that ``visionzoo --help`` stays fast; that is also why the flags are
not generated from ``UDIConfig`` (udi.py imports torch).
"""
from __future__ import annotations

import argparse

METHODS = ("udi",)

# explicit flag -> UDIConfig field (the common ones; every other field goes through --set)
_FLAGS = {
    "model": ("--model", str, "backbone, e.g. udi_vit_small_patch16 or udi_vit_test"),
    "dataset": ("--dataset", str, "folder (data_dir/train, data_dir/val) | digits"),
    "data_dir": ("--data-dir", str, "root with train/ and val/ class folders"),
    "epochs": ("--epochs", int, None),
    "batch_size": ("--batch-size", int, "per process"),
    "lr": ("--lr", float, "absolute peak lr (default: lr_base * global_batch / lr_base_size)"),
    "global_size": ("--global-size", int, "global crop size"),
    "local_size": ("--local-size", int, "local crop size"),
    "local_crops_number": ("--local-crops-number", int, None),
    "out_dim": ("--out-dim", int, "DINO head output dimension"),
    "workers": ("--workers", int, "data loader workers"),
    "seed": ("--seed", int, None),
    "stop_after_steps": ("--stop-after-steps", int, "stop (after saving an exact-resume checkpoint) at this step"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Self-supervised pretraining. Values come from --recipe, then the flags below, then "
                          "--set key=value (any UDIConfig field, e.g. --set knn_every=5 --set amp=false).")
    parser.add_argument("--method", default="udi", choices=METHODS, help="pretraining method (default: udi)")
    parser.add_argument("--recipe", default=None, help="UDI recipe YAML (keys = UDIConfig fields)")
    parser.add_argument("--output", default="runs/udi", help="run directory (checkpoints, metrics.csv, curves.png)")
    parser.add_argument("--resume", action="store_true", help="continue exactly from the state in --output")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help="do not train: time N loader batches and N train steps and print both img/s")
    for name, (flag, typ, help_text) in _FLAGS.items():
        parser.add_argument(flag, dest=f"cfg_{name}", type=typ, default=None, metavar=name.upper(), help=help_text)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any UDIConfig field (repeatable); values are parsed as YAML")


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE (e.g. --set knn_every=5).")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def build_config(args):
    """The ``UDIConfig`` for parsed ``args`` (unknown keys raise a ValueError naming the valid ones)."""
    from .udi import UDIConfig

    overrides = {n: getattr(args, f"cfg_{n}") for n in _FLAGS if getattr(args, f"cfg_{n}", None) is not None}
    overrides.update(_parse_sets(args.set or []))
    if args.recipe:
        return UDIConfig.from_yaml(args.recipe, **overrides)
    return UDIConfig.from_dict(overrides)


def run(args) -> int:
    if args.method not in METHODS:  # argparse checks too; kept for programmatic callers
        raise ValueError(f"unknown pretraining method {args.method!r}; available: {', '.join(METHODS)}.")
    cfg = build_config(args)
    if args.profile is not None:
        from .udi import profile_pretrain

        r = profile_pretrain(cfg, args.profile, device=args.device)
        print(f"UDI {cfg.model} batch {r['batch_size']} on {r['device']}: loader {r['loader_img_s']:.1f} img/s "
              f"({r['workers']} workers), train step {r['step_img_s']:.1f} img/s over {r['steps']} batches -> the "
              + ("loader keeps up" if r["loader_img_s"] >= r["step_img_s"] else "loader is the bottleneck"))
        return 0
    from .udi import pretrain

    summary = pretrain(cfg, args.output, resume=args.resume, device=args.device, progress=args.progress)

    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}%"

    print(f"UDI pretraining done: {summary.get('steps')} steps, {summary.get('epochs_done')} epochs.")
    print(f"k-NN top-1: init {fmt(summary.get('knn_init'))} -> final {fmt(summary.get('knn_final'))}")
    print(f"run directory: {args.output}  (teacher_backbone.safetensors, metrics.csv, curves.png, config.json)")
    return 0
