"""``visionzoo pretrain``: self-supervised pretraining (``--method udi``) with online k-NN, on the one training loop.

Values come from ``--recipe`` (a UDI YAML), then the explicit flags, then ``--set key=value`` (any ``UDIConfig``
field; every field is a flag, generated in ``visionzoo/cli/tools.py``).

The run folder: ``--out RUN`` (or ``--output RUN`` without ``--experiment``, the older spelling) is the run folder
itself; ``--output PARENT --experiment NAME`` is ``PARENT/NAME``; with neither, ``runs/<model>-<time>``.
``--resume RUN`` continues a run folder exactly (``--resume`` alone: the folder named by ``--out``/``--output``).
"""
from __future__ import annotations

from ..engine.config import config_overrides, parse_yaml
from ..errors import UserError

METHODS = ("udi",)


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r} must look like KEY=VALUE (e.g. --set eval_every=5).")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = parse_yaml(v, f"--set {item}")
    return out


def build_config(args):
    """The ``UDIConfig`` for parsed ``args`` (unknown keys raise a ValueError naming the valid ones)."""
    from .udi import UDIConfig

    overrides = config_overrides(args, UDIConfig)
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
        raise UserError(f"unknown pretraining method {args.method!r}; available: {', '.join(METHODS)}.")
    cfg = build_config(args)
    if args.profile is not None:
        from ..engine.profile import report
        from .udi import profile_pretrain

        print(report(profile_pretrain(cfg, args.profile, device=args.device), f"UDI {cfg.model}"))
        return 0
    from .udi import pretrain

    out = run_folder(args)
    if args.resume is True and out is None:
        raise UserError("--resume alone continues the run folder named by --out (or --output): name it, or pass "
                        "--resume RUN.")
    print(f"UDI pretraining of {cfg.model}: last/ and best/ of the run folder will hold the teacher backbone (the "
          f"weights to evaluate and fine-tune)")
    pretrain(cfg, out, resume=args.resume or False, device=args.device, progress=args.progress)
    return 0  # the engine's last lines give the k-NN result and the run folder
