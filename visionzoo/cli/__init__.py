"""The `visionzoo` command. The parser is built without importing torch, so that `--help` answers at once: the
built-in commands' flags come from the config dataclasses, and a tool's module (which imports torch) is imported only
when that tool is the command being run."""
from __future__ import annotations

import argparse
import sys

from ..engine.config import add_amp_flag, add_config_flags
from ..errors import UserError
from . import tools
from .commands import cmd_demo, cmd_list, cmd_to_lmdb, cmd_train, cmd_validate, cmd_visualize
from .official_flags import add_timm_aliases

# The tools: name -> (the module whose run(args) runs them, or "module:function"; its help line). Their flags are in
# cli/tools.py (the function named like the tool), torch-free; the module is imported only when its command runs.
TOOLS = {
    "benchmark": ("cli.commands:cmd_benchmark", "inference/train throughput, parameters and GMACs (timm's method)"),
    "pretrain": ("ssl.pretrain", "self-supervised pretraining (--method udi) with online k-NN"),
    "knn": ("evals.knn", "weighted k-NN accuracy of frozen features (any model)"),
    "linear": ("evals.linear", "linear probe on frozen features (any model)"),
    "finetune": ("tasks.finetune", "fine-tune a pretrained checkpoint (layer-wise lr decay, mixup, drop path)"),
    "transfer": ("evals.transfer", "frozen-feature transfer to other datasets: linear classifier, R^2, variability"),
    "pointcloud": ("dense.pointcloud", "point-cloud classification (CoC PointMLP) on ScanObjectNN h5 files or "
                                       "embedded procedural shapes"),
    "detect": ("dense.detection", "object detection / instance segmentation (Mask R-CNN, RetinaNet) on any "
                                  "backbone: train, eval (COCO AP), visualize"),
    "segment": ("dense.segmentation", "semantic segmentation (Semantic FPN, UperNet, SegFormer head) on any "
                                      "backbone: train, eval (mIoU)"),
    "semisup": ("evals.semisup", "semi-supervised evaluation: logistic regression on 1%%/10%% of the labels"),
    "videoseg": ("dense.video", "video object segmentation by label propagation (DAVIS-2017 layout, J&F)"),
    "export": ("export", "a model (classifier or features_only) to ONNX or a torch.export program, verified"),
}


def _tool_runner(target: str):
    def run(args) -> int:
        import importlib

        module, _, function = target.partition(":")
        return int(getattr(importlib.import_module(f"visionzoo.{module}"), function or "run")(args) or 0)

    return run


# ----------------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the flag, and where the full usage is (not a screen of usage)."""

    argv: list[str] | None = None  # set on the top-level parser: what it parses, to name the command in errors

    def __init__(self, *args, **kwargs):
        # no prefix matching: `train --out X` once meant `--output X`; a flag is its own spelling or an error
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if self.argv is not None and message.startswith(prefix):  # an official script's or timm's flag?
            from .official_flags import explain, known_options

            command, known = known_options(self, self.argv)
            message = explain(message[len(prefix):].split(" "), command, known) or message
            if command:
                self.exit(2, f"{self.prog} {command}: error: {message} (see {self.prog} {command} --help)\n")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command is listed, and only the tool ``argv`` runs is imported."""
    from ..engine.config import TrainConfig

    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)

    parser = _Parser(
        prog="visionzoo", description="CoC, GPViT, GCR, GA and UDI on current PyTorch: train, evaluate, benchmark.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train a small model on the embedded digits (CPU, a few minutes)")
    p.add_argument("--output", default="runs", help="parent folder of the run directory")
    tools.run_folder_argument(p)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--model", default=None, help="another model than the demo recipe's")
    p.add_argument("--device", default=None)
    add_amp_flag(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="supervised training from a recipe and/or flags",
                       description="Train a model. Values come from --recipe, then flags, then --set key=value.")
    p.add_argument("data", nargs="?", default=None, help="dataset root with train/ and val/ (folders or LMDB)")
    p.add_argument("--data", dest="data_flag", default=None, metavar="ROOT", help="the same as the positional DATA")
    p.add_argument("--recipe", "-r", default=None, help="shipped recipe name (visionzoo list recipes) or a YAML path")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run exactly from its directory")
    tools.run_folder_argument(p)
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="more overrides, e.g. model_kwargs.foo=1")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: auto, cuda if available)")
    tools._profile_argument(p)
    add_config_flags(p, TrainConfig)
    add_timm_aliases(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="top-1/top-5/loss of a model, weights file or run directory")
    p.add_argument("model", help="model name, HF-layout folder or run directory")
    p.add_argument("--checkpoint", default=None, help="weights file (ours or official) for a model name")
    p.add_argument("--dataset", default="digits", help="digits | folder | lmdb | auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    add_amp_flag(p, default="fp32")
    p.add_argument("--use-ema", action="store_true", help="for a run directory: evaluate the EMA weights")
    p.add_argument("--device", default=None)
    p.add_argument("--results-file", default=None)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("list", help="list models or recipes")
    p.add_argument("what", choices=["models", "recipes"])
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'coc*'")
    p.add_argument("--all", action="store_true", help="with models: every timm model too")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", metavar="TOOL", required=True)
    q = dsub.add_parser("to-lmdb", help="convert an image folder (nested classes, or flat + label file) to LMDB")
    if wanted == "data":  # lmdb.py is torch-free but imports numpy and PIL: only when this command runs
        from ..data.lmdb import add_arguments

        add_arguments(q)
    q.set_defaults(func=cmd_to_lmdb)

    p = sub.add_parser("visualize", help="cluster maps (CoC), group maps (GPViT), attention maps (ViT)")
    vsub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None,
                        help="model name (not needed when --checkpoint is a run folder or save_pretrained folder)")
    common.add_argument("--checkpoint", default=None)
    common.add_argument("--image", default="sample", help="image file, or 'sample' for a scikit-learn sample image")
    common.add_argument("--out", default=None, help="output PNG")
    common.add_argument("--img-size", type=int, default=None)
    add_amp_flag(common, default="fp32")
    q = vsub.add_parser("clusters", parents=[common], help="CoC: hard cluster assignment of one block and head")
    q.add_argument("--stage", type=int, default=0)
    q.add_argument("--block", type=int, default=0)
    q.add_argument("--head", type=int, default=0)
    q.add_argument("--animate", action="store_true",
                   help="a GIF (.mp4 with imageio-ffmpeg) over the snapshots of the run folder --checkpoint RUN")
    q.set_defaults(func=cmd_visualize)
    q = vsub.add_parser("groups", parents=[common], help="GPViT: group assignment and group attention of a GP block")
    q.add_argument("--layer", type=int, default=None)
    q.add_argument("--groups", type=int, nargs="*", default=None, help="group indices whose attention to draw")
    q.set_defaults(func=cmd_visualize)
    q = vsub.add_parser("attention", parents=[common], help="ViT: last-layer [CLS] self-attention map per head")
    q.add_argument("--token", default="cls", help="cls | cls+ (UDI's second class token)")
    q.add_argument("--threshold", type=float, default=None, help="also draw DINO's mass-threshold masks (e.g. 0.6)")
    q.set_defaults(func=cmd_visualize)

    for name, (module, help_text) in TOOLS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:
            getattr(tools, name)(p)
        p.set_defaults(func=_tool_runner(module))
    parser.argv = list(argv)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        from .. import models  # noqa: F401  registers our models into timm (deferred so that --help stays fast)
        from ..engine.distributed import keep_freed_heap

        keep_freed_heap()

        with _quiet_unless_rank_zero():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # a training loop saved its state first and says how to resume
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-caused errors end in one clear line, not a traceback
        if _is_user_error(e) and "VISIONZOO_DEBUG" not in __import__("os").environ:
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def process_rank() -> int:
    """This process's rank under torchrun (RANK) or srun without torchrun (SLURM_PROCID of a multi-task step), read
    without torch; 0 for a plain run."""
    import os

    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def _quiet_unless_rank_zero():
    """Only rank 0 speaks: the other processes of a multi-process run print nothing on stdout (results, the run
    header, the log, "run directory: ..."); errors and Python warnings still reach stderr."""
    import contextlib
    import os

    stack = contextlib.ExitStack()
    if process_rank() != 0:
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return stack


def _is_user_error(e: Exception) -> bool:
    """The library's bad-input errors (``visionzoo.errors.UserError``), or the OS refusing a path the user named.
    Anything else is a bug and keeps its traceback."""
    return isinstance(e, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))


if __name__ == "__main__":
    sys.exit(main())
