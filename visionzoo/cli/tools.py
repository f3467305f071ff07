"""The tools' command lines (``visionzoo pretrain | knn | linear | finetune | transfer | semisup | videoseg |
pointcloud | detect | segment | benchmark``): argument definitions only, torch-free, so that ``visionzoo TOOL
--help`` answers at once. Each tool's module (TOOLS in cli/__init__.py) runs the parsed arguments. Choices that the
library also checks are repeated here; tests/test_cli.py checks that both agree."""
from __future__ import annotations

import argparse

from ..engine.config import COMPILE_MODES, TrainConfig, add_amp_flag, add_config_flags
from .official_flags import add_timm_aliases

# the library's choices (visionzoo.evals.features.TOKENS, evals.linear.AUGMENTS, ...; tests/test_cli.py compares)
TOKENS = ("auto", "cls", "cls+", "both", "pooled")
AUGMENTS = ("simple", "strong", "none")
SAMPLINGS = ("balanced", "random")
ANGLE_STATS = ("min", "mean", "max")
DEFAULT_C_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3]
STYLES = ("shapes", "texture", "lighting")
PRECISIONS = ("float32", "amp", "amp_bfloat16", "float16", "bfloat16")
BENCH_MODES = ("both", "infer", "train")
SUITES = ("official",)  # visionzoo.bench_official
SUITE_VARIANTS = ("fp32", "bf16", "fp32+compile", "bf16+compile")  # bench_official.VARIANTS
METHODS = ("udi",)


def _at_least(low: int):
    """An argparse type: a whole number >= ``low`` (a bad value ends in argparse's one-line usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)


# ----------------------------------------------------------------------------------------------------------------
# pretrain

def pretrain(parser: argparse.ArgumentParser) -> None:
    from ..ssl.udi.config import UDIConfig

    parser.description = ("Self-supervised pretraining. Values come from --recipe, then the flags below, then "
                          "--set key=value (any UDIConfig field, e.g. --set eval_every=5 --set amp=false).")
    parser.add_argument("--method", default="udi", choices=METHODS, help="pretraining method (default: udi)")
    parser.add_argument("--recipe", default=None, help="UDI recipe YAML (keys = UDIConfig fields)")
    run_folder_argument(parser)
    parser.add_argument("--output", default=None,
                        help="with --experiment: the parent folder of the run folder; alone: the run folder itself "
                             "(as before). Default: runs/<model>-<time>")
    parser.add_argument("--experiment", "--exp", default=None, help="the run folder's name inside --output")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                        help="continue a run folder exactly (alone: the one named by --out/--output)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (kept for older scripts: the bar only shows on a terminal)")
    _profile_argument(parser)
    parser.add_argument("--data", dest="cfg_data_dir", default=None, metavar="ROOT", help="the same as --data-dir")
    parser.add_argument("--stop-after-steps", dest="cfg_max_steps", type=int, default=None, metavar="N",
                        help="the older name of --max-steps")
    add_config_flags(parser, UDIConfig, skip=("output", "experiment"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any UDIConfig field (repeatable); values are parsed as YAML")

# ----------------------------------------------------------------------------------------------------------------
# frozen-feature evaluations and fine-tuning

def frozen_feature_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, metavar="NAME",
                        help="timm/visionzoo model name (not needed when --checkpoint is a saved model or train run)")
    parser.add_argument("--checkpoint", default=None, metavar="W",
                        help="weights: a .safetensors/.pth file (ours or official, e.g. a UDI checkpoint: the "
                             "teacher is used), a folder written by save_pretrained, a `visionzoo train` run folder "
                             "(its best/ model), or a `visionzoo pretrain` run folder (its "
                             "teacher_backbone.safetensors); default: random init")
    parser.add_argument("--data", required=True, metavar="ROOT",
                        help="'digits' (embedded), or a root holding train/ and val/ (ImageFolder or LMDB)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--token", choices=TOKENS, default="auto",
                        help="feature: [CLS], [CLS+], both, or the pooled pre-logits feature (default: auto)")
    parser.add_argument("--img-size", type=POSITIVE, default=None, help="eval input size (default: the model's)")
    parser.add_argument("--batch-size", "-b", type=POSITIVE, default=128)
    parser.add_argument("--workers", type=NON_NEGATIVE, default=2, help="data loader processes (default: 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    add_amp_flag(parser, default="fp32")
    parser.add_argument("--out", default=None, metavar="DIR", help="write results (CSV + JSON) into DIR")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random-init model (and of the probe)")


def knn(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Weighted k-NN classification on frozen features (DINO protocol), for any model.")
    frozen_feature_arguments(parser)
    parser.add_argument("--nb-knn", "-k", type=POSITIVE, nargs="+", default=[10, 20, 100, 200], metavar="K",
                        help="numbers of neighbours (default: 10 20 100 200)")
    parser.add_argument("--temperature", "-T", type=float, default=0.07, help="vote temperature (default: 0.07)")


def linear(parser: argparse.ArgumentParser) -> None:
    parser.description = "Linear probe on frozen features (DINO / MAE protocol), for any model."
    frozen_feature_arguments(parser)
    parser.add_argument("--n-last-blocks", type=POSITIVE, default=None, metavar="N",
                        help="concatenate the class token of the last N blocks (default: 4 for class-token ViTs, "
                             "else 1)")
    parser.add_argument("--avgpool-patchtokens", action="store_true",
                        help="also append the mean of the last block's patch tokens (ViTs)")
    parser.add_argument("--batchnorm", action="store_true",
                        help="BatchNorm without affine before the linear layer (MAE's probe): standardises "
                             "features, which badly scaled ones (e.g. of a random-init CNN) need")
    parser.add_argument("--epochs", type=POSITIVE, default=100)
    parser.add_argument("--lr", type=float, default=0.001, help="base lr for batch 256 (default: 0.001; UDI's "
                                                                 "README uses 0.02)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--augment", choices=AUGMENTS, default="simple",
                        help="training images: simple (DINO), strong (UDI) or none (cached features)")
    parser.add_argument("--hflip", type=float, default=0.5, help="flip probability with --augment (0 for digits)")
    parser.add_argument("--eval-every", type=int, default=1, metavar="N", help="validate every N epochs")
    parser.add_argument("--output", default="runs", help="parent folder of the run folder (default: runs)")
    parser.add_argument("--experiment", "--exp", default=None, help="the run folder's name (default: <model>-<time>)")
    parser.add_argument("--resume", default=None, metavar="RUN", help="continue a probe run folder exactly")


def semisup(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Semi-supervised evaluation: logistic regression on frozen features with 1% or 10% of the "
                          "labels.")
    frozen_feature_arguments(parser)
    parser.add_argument("--percent", type=float, default=1.0,
                        help="percentage of the train split that keeps its labels (default: 1; UDI uses 1 and 10)")
    parser.add_argument("--sampling", choices=SAMPLINGS, default="balanced",
                        help="subset: per-class balanced (SimCLRv2 style, default) or uniformly random")
    parser.add_argument("--subset-file", default=None, metavar="TXT",
                        help="file names of the labelled subset, one per line (SimCLRv2 1percent.txt/10percent.txt); "
                             "overrides --percent")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 0.1, 1.0], metavar="L",
                        help="L2 strengths, each divided by the number of training samples (default: 0.01 0.1 1)")
    parser.add_argument("--n-last-blocks", type=POSITIVE, default=1, metavar="N",
                        help="concatenate the class token of the last N blocks (default: 1, as UDI)")
    parser.add_argument("--max-iter", type=POSITIVE, default=500, help="L-BFGS iterations per lambda (default: 500)")
    parser.add_argument("--tol", type=float, default=1e-6,
                        help="stop when the gradient's largest entry is below this (default: 1e-6)")
    parser.add_argument("--fit-dtype", choices=("float64", "float32"), default="float64",
                        help="precision of the fit (default: float64; float32 stalls early on badly conditioned "
                             "features; use it on GPUs with slow float64)")


def transfer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True, metavar="NAME",
                        help="one or more timm/visionzoo model names (features of each are evaluated)")
    parser.add_argument("--checkpoint", nargs="*", default=None, metavar="W",
                        help="weights for each --model, in the same order (.safetensors/.pth or HF folder); "
                             "default: random init")
    parser.add_argument("--datasets", nargs="+", required=True, metavar="ROOT",
                        help="ImageFolder roots holding train/ and val/ (or LMDBs), or 'digits' (embedded)")
    parser.add_argument("--out", required=True, metavar="DIR", help="writes DIR/transfer.csv and one PNG per dataset")
    parser.add_argument("--batch-size", "-b", type=POSITIVE, default=64)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    add_amp_flag(parser, default="fp32")
    parser.add_argument("--workers", type=NON_NEGATIVE, default=0, help="data loader processes (default: 0)")
    parser.add_argument("--img-size", type=POSITIVE, default=None,
                        help="eval input size (default: the model's pretrained cfg)")
    parser.add_argument("--classifier", choices=("svm", "logreg"), default="svm",
                        help="linear classifier on frozen features (default: svm = LinearSVC)")
    parser.add_argument("--c-grid", type=float, nargs="+", default=DEFAULT_C_GRID, metavar="C",
                        help="values of C tried on the held-out 20%% of train (default: 1e-4 ... 1e3)")
    parser.add_argument("--features", choices=("raw", "l2"), default="raw",
                        help="L2-normalise the features before the classifier (default: raw)")
    parser.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                        help="subtract the mean feature before the R^2 / variability metrics (default: on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra constructor kwargs for every --model (e.g. dim=4 for a GCR weights file)")
    parser.add_argument("--angles", action=argparse.BooleanOptionalAction, default=True,
                        help="heat map of the angles between the classes of each model's trained classifier "
                             "(default: on; skipped for models without one)")
    parser.add_argument("--angle-stat", choices=ANGLE_STATS, default="min",
                        help="which principal angle of a pair of k-dim class subspaces the heat map shows "
                             "(default: min, the smallest)")


def finetune(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Fine-tune pretrained weights. Values come from the fine-tuning defaults (or --recipe), "
                          "then the flags, then --set key=value.")
    parser.add_argument("data", nargs="?", default=None, help="dataset root with train/ and val/ (folders or LMDB)")
    parser.add_argument("--checkpoint", required=True, metavar="W",
                        help="pretrained weights: file, save_pretrained folder, `visionzoo train` or "
                             "`visionzoo pretrain` run folder")
    parser.add_argument("--recipe", "-r", default=None,
                        help="fine-tuning recipe (e.g. udi/finetune_vit_small); default: the built-in defaults")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run exactly from its directory")
    run_folder_argument(parser)
    parser.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="more overrides, e.g. layer_decay=0.65")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_config_flags(parser, TrainConfig)
    add_timm_aliases(parser, TrainConfig)

# ----------------------------------------------------------------------------------------------------------------
# video label propagation

def videoseg(parser: argparse.ArgumentParser) -> None:
    parser.description = "Video object segmentation by label propagation of frozen ViT features (DINO protocol)."
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("eval", help="propagate the first-frame masks with a ViT's features, write PNGs, score J&F")
    p.add_argument("--model", "-m", default=None, help="ViT name (may be omitted for a save_pretrained folder)")
    p.add_argument("--checkpoint", default=None,
                   help="weights (file, save_pretrained folder, `visionzoo train` or `visionzoo pretrain` run "
                        "folder); default: random")
    _video_data_arguments(p)
    p.add_argument("--short-side", type=int, default=None,
                   help="resize frames to this short side (0: keep the native size; default: 480 as DINO, or 0 "
                        "with --data shapes)")
    p.add_argument("--size-multiple", type=int, default=64, help="floor the long side to a multiple (default: 64)")
    p.add_argument("--n-last-frames", type=POSITIVE, default=7, help="previous frames in the context (default: 7)")
    p.add_argument("--size-mask-neighborhood", type=int, default=12,
                   help="neighbourhood radius in patches (default: 12; 0: none)")
    p.add_argument("--topk", type=POSITIVE, default=5, help="neighbours kept per patch (default: 5)")
    p.add_argument("--temperature", type=float, default=0.1, help="affinity temperature (default: 0.1)")
    p.add_argument("--batch-size", "-b", type=POSITIVE, default=8, help="frames per feature batch (default: 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_amp_flag(p, default="fp32")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init model")
    p.add_argument("--out", required=True, help="folder for <seq>/<frame>.png predictions and videoseg.{json,csv}")
    p = sub.add_parser("score", help="J&F of existing palette PNGs (RESULTS/<seq>/<frame>.png) against DAVIS")
    _video_data_arguments(p)
    p.add_argument("--results", required=True, help="folder with <seq>/<frame>.png predictions")
    p.add_argument("--out", default=None, help="write videoseg.{json,csv} here (default: --results)")
    p = sub.add_parser("make-data", help="write the embedded procedural videos in DAVIS-2017 layout")
    p.add_argument("root")
    p.add_argument("--sequences-count", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val")
    p.add_argument("--style", default="shapes", choices=STYLES,
                   help="shapes: objects with their own colours (default); texture: same colours as the background, "
                        "only the texture (orientation / frequency) differs; lighting: shapes with a random "
                        "brightness, contrast, saturation and hue per frame")
    p.add_argument("--image-folder", default=None, metavar="DIR",
                   help="also copy every frame to DIR/train/frames/ (every 12th to DIR/val/frames/ instead): an "
                        "image folder for `visionzoo pretrain --dataset folder`")


def _video_data_arguments(p) -> None:
    p.add_argument("--data", required=True,
                   help="DAVIS-2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017), or 'shapes' for the "
                        "embedded procedural videos (written under OUT/data)")
    p.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default: val)")
    p.add_argument("--sequences", nargs="*", default=None, help="only these sequences")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the 'shapes' videos")
    p.add_argument("--data-style", default="shapes", choices=STYLES, help="style of the 'shapes' videos")

# ----------------------------------------------------------------------------------------------------------------
# dense tasks and point clouds

def detect(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Mask R-CNN and RetinaNet (torchvision) with an FPN on any visionzoo/timm backbone. "
                          "Recipes: visionzoo/recipes/detection/ (e.g. detection/maskrcnn_shapes_cpu runs on CPU on "
                          "embedded shapes). Values come from --recipe, then flags, then --set.")
    from ..dense.detection.config import DetectionConfig

    sub = parser.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a detector from a recipe")
    t.add_argument("--recipe", default=None, help="detection recipe name or YAML file (not needed with --resume)")
    run_folder_argument(t)
    t.add_argument("--data", default=None, metavar="ROOT",
                   help="COCO root (annotations/ + train2017/ val2017/); the same as --data-dir")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue the run in folder RUN exactly")
    t.add_argument("--max-iters", dest="max_iters", type=int, default=None, metavar="N",
                   help="the older name of --max-steps")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override any recipe key (YAML value), e.g. --set amp=true clip_grad=35")
    _profile_argument(t)
    add_config_flags(t, DetectionConfig)
    e = sub.add_parser("eval", help="COCO box/mask AP of a trained detector")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run folder (best/, else last/), exported folder, or an older last.pth")
    src.add_argument("--recipe", help="evaluate this recipe's UNTRAINED detector (the learning-check baseline)")
    e.add_argument("--data", default=None, help="COCO root; default: the one the run trained on")
    e.add_argument("--out", default=None, help="write the metrics to this JSON file")
    e.add_argument("--max-images", type=int, default=None)
    v = sub.add_parser("visualize", help="draw a trained detector's predictions on an image")
    v.add_argument("--checkpoint", required=True, help="run folder (best/, else last/), exported folder, or last.pth")
    v.add_argument("--image", required=True)
    v.add_argument("--out", required=True, help="output PNG")
    v.add_argument("--score-thresh", type=float, default=0.5)
    for p in (t, e, v):
        _device_arguments(p)
    for p in (e, v):  # train takes --amp from DetectionConfig
        add_amp_flag(p, default="fp32")


def segment(parser: argparse.ArgumentParser) -> None:
    from ..dense.segmentation.config import SegmentationConfig

    parser.description = ("Train / evaluate / visualise semantic segmentation. Recipes: visionzoo list recipes "
                          "'segmentation/*'; segmentation/semfpn_shapes_cpu runs on CPU in a few minutes.")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("train", help="train from a recipe (iteration based, exact --resume)",
                       description="Values come from --recipe, then flags, then --set key=value. The run folder is "
                                   "--output/--experiment (or --out RUN); --resume RUN continues it exactly.")
    p.add_argument("--recipe", "-r", default=None, help="recipe name (segmentation/...) or YAML path; with --resume "
                                                        "the run's own config is used")
    run_folder_argument(p)
    p.add_argument("--resume", nargs="?", const="__out__", default=None, metavar="RUN",
                   help="continue the run in folder RUN exactly (no value: the --out folder)")
    p.add_argument("--data", dest="data_flag", default=None, metavar="ROOT", help="the same as --data-dir")
    p.add_argument("--iters", type=int, default=None, help="the older name of --steps")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other recipe keys (YAML values)")
    _profile_argument(p)
    _device_arguments(p)
    add_config_flags(p, SegmentationConfig)
    p = sub.add_parser("eval", help="mIoU / aAcc / mAcc of a trained run on the validation split")
    p.add_argument("--checkpoint", help="a run folder (best/, else last/), an exported folder, a train_state.pt, "
                                        "an older run's iter_N.pth or an official mmseg .pth")
    p.add_argument("--recipe", help="alone: evaluate the recipe's UNTRAINED model (seeded as `train` seeds it; with "
                                    "its `pretrained` backbone if set), the learning-check baseline; with an official "
                                    "mmseg --checkpoint: the recipe to build (default: the one of its config)")
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="default: the recipe's test_mode")
    p.add_argument("--aug-test", action="store_true",
                   help="multi-scale + flip test as mmseg's test.py --aug-test (ratios 0.5-1.75 of img_scale; "
                        "recipe keys aug_test_ratios, aug_test_flip)")
    p.add_argument("--data", "--data-dir", dest="data_dir", default=None,
                   help="ADE20K root; default: the folder the run trained on")
    p.add_argument("--out", "--results", dest="results", default=None, help="write the metrics JSON here")
    p.add_argument("-j", "--workers", type=NON_NEGATIVE, default=2, help="data-loading processes")
    _device_arguments(p)
    add_amp_flag(p, default="fp32")
    p = sub.add_parser("visualize", help="colour overlay of the predicted classes on one image")
    p.add_argument("--checkpoint", required=True, help="a run folder, an exported folder or an older iter_N.pth")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--mode", choices=["whole", "slide"], default=None)
    _device_arguments(p)
    add_amp_flag(p, default="fp32")


def pointcloud(parser: argparse.ArgumentParser) -> None:
    from ..dense.pointcloud.config import PointCloudConfig

    parser.description = ("Train and evaluate the CoC point-cloud classifier (coc_pointmlp). Defaults follow the "
                          "official ScanObjectNN recipe; --recipe pointcloud/coc_pointmlp_shapes_cpu is a small "
                          "CPU run on embedded shapes. Values come from --recipe, then flags, then --set.")
    parser.add_argument("--recipe", default=None,
                        help="point-cloud recipe name or YAML (e.g. pointcloud/coc_pointmlp_scanobjectnn)")
    parser.add_argument("--data", default=None,
                        help="'shapes' (embedded procedural clouds) or 'scanobjectnn:ROOT' (ROOT holds "
                             "main_split/*_objectdataset_augmentedrot_scale75.h5)")
    parser.add_argument("--small", action="store_true",
                        help="use the small CPU configuration of the model (SMALL_MODEL_KWARGS)")
    parser.add_argument("--points", type=int, default=None, help="points per cloud (default 1024)")
    run_folder_argument(parser)
    parser.add_argument("--resume", default=None, metavar="RUN", help="continue the run in folder RUN exactly")
    parser.add_argument("--checkpoint", default=None, metavar="WEIGHTS",
                        help="evaluate these weights on the test split instead of training: a run folder (best/, "
                             "else last/), a save_pretrained folder, a weights file, or an older run's "
                             "last.pth / best.pth")
    parser.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                        help="more config overrides, e.g. min_lr=0 eval_every=5")
    _profile_argument(parser)
    _device_arguments(parser)
    add_config_flags(parser, PointCloudConfig, skip=("dataset", "data_dir"))


def run_folder_argument(p) -> None:
    """``--out RUN`` of every training command: the run folder itself (``split_run_path`` makes it the
    output/experiment fields). Without it ``--out`` would reach ``--output`` (a parent folder) by abbreviation."""
    p.add_argument("--out", default=None, metavar="RUN", help="the run folder itself (= --output PARENT --experiment "
                                                              "NAME)")


def _profile_argument(p) -> None:
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help="do not train: time N loader batches and N train steps and print both img/s "
                        "(does the data pipeline keep up?)")


def _device_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

# ----------------------------------------------------------------------------------------------------------------
# benchmark

def benchmark(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `visionzoo benchmark` (named like timm's benchmark.py)."""
    parser.add_argument("--model", "-m", nargs="+", default=[], metavar="NAME",
                        help="model names or fnmatch wildcards (our registered models; timm's when ours match none)")
    parser.add_argument("--model-list", default=None, metavar="FILE",
                        help="text file with one model name or wildcard per line ('#' starts a comment)")
    parser.add_argument("--baseline", nargs="+", default=[], metavar="NAME",
                        help="plain timm models (or wildcards) benchmarked in the same run, for comparison")
    parser.add_argument("--batch-size", "-b", type=POSITIVE, default=None, metavar="N",
                        help="batch size (default: 256 on GPU like timm, 8 on CPU); reduced on out-of-memory")
    parser.add_argument("--img-size", type=POSITIVE, default=None, metavar="S",
                        help="input resolution (default: the model's test input size)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32", help="numeric precision")
    add_amp_flag(parser, alone="fp16", many=True)  # the autocast precisions, spelled as in every command
    parser.add_argument("--rounds", type=POSITIVE, default=1, metavar="N",
                        help="repeat every run N times, alternating the order of the --amp precisions each round "
                             "(A B, B A, ...), and print each precision's speed relative to the first as the "
                             "median (min-max) of the per-round ratios: the way to compare on a noisy machine")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--torchcompile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        metavar="MODE", help=f"torch.compile the model (inductor), mode: {', '.join(COMPILE_MODES)}")
    parser.add_argument("--bench", choices=BENCH_MODES, default="both", help="what to time")
    parser.add_argument("--num-warm-iter", type=NON_NEGATIVE, default=10, metavar="N", help="untimed warm-up steps")
    parser.add_argument("--num-bench-iter", type=POSITIVE, default=40, metavar="N", help="timed steps")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--num-classes", type=NON_NEGATIVE, default=None, metavar="N",
                        help="classifier size (0: none; default: the model's)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra model constructor arguments, e.g. drop_path_rate=0.1")
    parser.add_argument("--baseline-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="constructor arguments of the --baseline models, e.g. reg_tokens=1")
    parser.add_argument("--threads", type=POSITIVE, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-retry", action="store_true", help="do not retry smaller batches on out-of-memory")
    parser.add_argument("--suite", choices=SUITES, default=None,
                        help="official: each family's published configurations (fp32/bf16, eager/compiled) with "
                             "img/s, peak memory, GMACs, TFLOP/s and MFU next to the published img/s; --model then "
                             "filters its rows by name (wildcards)")
    parser.add_argument("--variants", nargs="+", choices=SUITE_VARIANTS, default=list(SUITE_VARIANTS),
                        help="with --suite: which precisions / compile modes (default: all four)")
    parser.add_argument("--smoke", action="store_true",
                        help="with --suite: every model swapped for its family's tiny test model, 32 px, batch 2, "
                             "1 step (checks that the suite runs; the numbers mean nothing)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute activations in the backward (the model's set_grad_checkpointing)")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: run every model in this process (default: a fresh process per model, so that "
                             "the peak-memory columns are each model's own)")
    parser.add_argument("--results-file", default=None, metavar="CSV",
                        help="append one row per model to this CSV (header written once)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# export

EXPORT_FORMATS = ("onnx", "exported-program")  # visionzoo.export.FORMATS


def export(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Export a model with torch's own exporters (torch.export; ONNX by the dynamo exporter), "
                          "then run the file on a fresh input and print its largest difference from the eager model.")
    parser.add_argument("model", help="model name, save_pretrained folder or run folder")
    parser.add_argument("--checkpoint", default=None, metavar="W",
                        help="weights for a model name (ours or official; a run folder: its best/ or last/). "
                             "Default: the model's random initialisation")
    parser.add_argument("--format", default="onnx", choices=EXPORT_FORMATS,
                        help="onnx (.onnx, opens in onnxruntime) or exported-program (.pt2, torch.export.load)")
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="file to write (default: ./MODEL.onnx or ./MODEL.pt2)")
    parser.add_argument("--img-size", type=POSITIVE, default=None, metavar="S",
                        help="input resolution (default: the model's input size)")
    parser.add_argument("--batch-size", "-b", type=POSITIVE, default=2, metavar="N",
                        help="batch size of the example input (default: 2)")
    parser.add_argument("--dynamic-batch", action="store_true", help="keep the batch size symbolic in the file")
    parser.add_argument("--features-only", action="store_true", help="export the multi-scale feature maps (timm's "
                                                                       "features_only=True) instead of the logits")
    parser.add_argument("--num-classes", type=NON_NEGATIVE, default=None, metavar="N",
                        help="classifier size (default: the checkpoint's, else the model's)")
    parser.add_argument("--use-ema", action="store_true", help="for a run folder: export the EMA weights")
    parser.add_argument("--opset", type=POSITIVE, default=None, metavar="N", help="ONNX opset (default: torch's)")
    parser.add_argument("--no-verify", action="store_true", help="do not run the exported file against eager")
