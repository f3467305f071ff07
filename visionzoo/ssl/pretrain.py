"""``visionzoo pretrain``: self-supervised pretraining (``--method udi``) with online k-NN, on the one training loop.

Values come from ``--recipe`` (a UDI YAML), then the explicit flags, then ``--set key=value`` (any ``UDIConfig``
field). torch is imported only in ``run`` so that ``visionzoo --help`` stays fast; that is also why the flags are
not generated from ``UDIConfig`` (udi.py imports torch).

The run folder: ``--out RUN`` (or ``--output RUN`` without ``--experiment``, the older spelling) is the run folder
itself; ``--output PARENT --experiment NAME`` is ``PARENT/NAME``; with neither, ``runs/<model>-<time>``.
``--resume RUN`` continues a run folder exactly (``--resume`` alone: the folder named by ``--out``/``--output``).
"""
from __future__ import annotations

import argparse

METHODS = ("udi",)

# explicit flag -> UDIConfig field (the common ones; every other field goes through --set)
_FLAGS = {
    "model": (("--model",), str, "backbone, e.g. udi_vit_small_patch16 or udi_vit_test"),
    "dataset": (("--dataset",), str, "folder (data_dir/train, data_dir/val) | digits"),
    "data_dir": (("--data-dir", "--data"), str, "root with train/ and val/ class folders"),
    "epochs": (("--epochs",), int, None),
    "batch_size": (("-b", "--batch-size"), int, "per process"),
    "lr": (("--lr",), float, "absolute peak lr (default: lr_base * global_batch / lr_base_size)"),
    "global_size": (("--global-size",), int, "global crop size"),
    "local_size": (("--local-size",), int, "local crop size"),
    "local_crops_number": (("--local-crops-number",), int, None),
    "out_dim": (("--out-dim",), int, "DINO head output dimension"),
    "workers": (("-j", "--workers"), int, "data loader workers"),
    "seed": (("--seed",), int, None),
    "max_steps": (("--max-steps", "--stop-after-steps"), int,
                  "stop at this step, saving an exact-resume state (the schedules stay those of the full run)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Self-supervised pretraining. Values come from --recipe, then the flags below, then "
                          "--set key=value (any UDIConfig field, e.g. --set eval_every=5 --set amp=false).")
    parser.add_argument("--method", default="udi", choices=METHODS, help="pretraining method (default: udi)")
    parser.add_argument("--recipe", default=None, help="UDI recipe YAML (keys = UDIConfig fields)")
    parser.add_argument("--out", default=None, metavar="RUN", help="the run folder itself")
    parser.add_argument("--output", default=None,
                        help="with --experiment: the parent folder of the run folder; alone: the run folder itself "
                             "(as before). Default: runs/<model>-<time>")
    parser.add_argument("--experiment", "--exp", default=None, help="the run folder's name inside --output")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                        help="continue a run folder exactly (alone: the one named by --out/--output)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (kept for older scripts: the bar only shows on a terminal)")
    parser.add_argument("--profile", type=int, default=None, metavar="N",
                        help="do not train: time N loader batches and N train steps and print both img/s")
    for name, (flags, typ, help_text) in _FLAGS.items():
        parser.add_argument(*flags, dest=f"cfg_{name}", type=typ, default=None, metavar=name.upper(),
                            help=help_text)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any UDIConfig field (repeatable); values are parsed as YAML")


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE (e.g. --set eval_every=5).")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def build_config(args):
    """The ``UDIConfig`` for parsed ``args`` (unknown keys raise a ValueError naming the valid ones)."""
    from .udi import UDIConfig

    overrides = {n: getattr(args, f"cfg_{n}") for n in _FLAGS if getattr(args, f"cfg_{n}", None) is not None}
    overrides.update(_parse_sets(args.set or []))
    if getattr(args, "output", None) and getattr(args, "experiment", None):
        overrides.update(output=args.output, experiment=args.experiment)
    elif getattr(args, "experiment", None):
        overrides.update(experiment=args.experiment)
    if args.recipe:
        return UDIConfig.from_yaml(args.recipe, **overrides)
    return UDIConfig.from_dict(overrides)


def run_folder(args) -> str | None:
    """The run folder given as such (``--out``, or ``--output`` without ``--experiment``), else None."""
    if getattr(args, "out", None):
        return args.out
    if getattr(args, "output", None) and not getattr(args, "experiment", None):
        import logging

        logging.getLogger("visionzoo").warning(
            "note: --output %s without --experiment names the run folder itself (visionzoo <= 0.1); the shared "
            "spelling is --out %s (or --output PARENT --experiment NAME)", args.output, args.output)
        return args.output
    return None


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

    out = run_folder(args)
    if args.resume is True and out is None:
        raise ValueError("--resume alone continues the run folder named by --out (or --output): name it, or pass "
                         "--resume RUN.")
    summary = pretrain(cfg, out, resume=args.resume or False, device=args.device, progress=args.progress)

    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}%"

    print(f"UDI pretraining done: {summary.get('steps')} steps, {summary.get('epochs_done')} epochs.")
    print(f"k-NN top-1: init {fmt(summary.get('knn_init'))} -> final {fmt(summary.get('knn_final'))}")
    print(f"run folder: {summary.get('run_dir')}  (last/ and best/: the teacher backbone; metrics.csv, curves.png, "
          f"config.yaml, train_state.pt)")
    return 0
