"""What the built-in subcommands do (each imports the library lazily, so that building the parser stays
torch-free)."""
from __future__ import annotations

from ..engine.config import config_overrides


def cmd_train(args) -> int:
    from ..engine.config import TrainConfig, apply_overrides, load_config, split_run_path

    overrides = config_overrides(args, TrainConfig)
    if getattr(args, "out", None):
        overrides.update(split_run_path(args.out))
    data = args.data if args.data is not None else args.data_flag
    if data == "digits":
        overrides.setdefault("dataset", "digits")
    elif data is not None:
        overrides.setdefault("data_dir", data)
        overrides.setdefault("dataset", "auto")
    elif "data_dir" in overrides:  # timm's --data-dir ROOT alone: read ROOT, not the default digits
        overrides.setdefault("dataset", "auto")
    overrides = apply_overrides(overrides, args.set or [])
    cfg = load_config(args.recipe, overrides)
    if args.profile:
        from ..engine.profile import profile, report
        from ..tasks.classify import ClassifyTask

        print(report(profile(ClassifyTask(cfg), args.profile, args.device), cfg.model))
        return 0
    from ..tasks.classify import train

    train(cfg, resume=args.resume, device=args.device)
    return 0


def cmd_demo(args) -> int:
    from ..engine.config import load_config, split_run_path

    overrides = split_run_path(args.out) if getattr(args, "out", None) else {"output": args.output}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.model is not None:
        overrides["model"] = args.model
    if args.amp is not None:
        overrides["amp"] = args.amp
    cfg = load_config("demo/digits", overrides)
    from ..tasks.classify import train

    print(f"visionzoo demo: training {cfg.model} on the embedded scikit-learn digits ({cfg.epochs} epochs, CPU ok)")
    train(cfg, device=args.device)  # the engine's last lines give val_top1 and the run folder
    return 0


def cmd_validate(args) -> int:
    from ..evals.evaluate import validate

    validate(args.model, data=args.dataset, data_dir=args.data_dir, split=args.split, checkpoint=args.checkpoint,
             batch_size=args.batch_size, workers=args.workers, img_size=args.img_size, crop_pct=args.crop_pct,
             amp=args.amp, use_ema=args.use_ema, device=args.device, results_file=args.results_file)
    return 0


def cmd_list(args) -> int:
    if args.what == "recipes":
        from ..engine.config import list_recipes

        names = list_recipes()
    else:
        from .. import models

        names = models.list_models(args.pattern or "*", include_timm=args.all)
    print("\n".join(n for n in names if not args.pattern or args.what == "models" or args.pattern in n))
    return 0


def cmd_to_lmdb(args) -> int:
    from ..data.lmdb import run

    return run(args)


def cmd_visualize(args) -> int:
    import importlib

    module = {"clusters": "clusters", "groups": "groups", "attention": "attention"}[args.kind]
    return importlib.import_module(f"visionzoo.viz.{module}").run(args) or 0


def cmd_benchmark(args) -> int:
    """`visionzoo benchmark`: models by name (visionzoo.bench), or ``--suite official`` (visionzoo.bench_official)."""
    from .. import bench, bench_official

    return (bench_official.run if args.suite else bench.run)(args)
