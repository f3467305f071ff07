"""Point-cloud classification with the CoC point-cloud model (``coc_pointmlp``): data, loss, metrics, CLI.

Follows the official CoC ``pointcloud/main.py`` recipe (spec coc.md section 6): ScanObjectNN PB_T50_RS h5 files,
first 1024 points, train augmentation = per-axis scale U(2/3, 3/2) + translation U(-0.2, 0.2) + point shuffle,
label-smoothed cross-entropy (eps 0.2, the PointMLP ``cal_loss`` form), SGD lr 0.01 / momentum 0.9 / wd 1e-4,
cosine annealing per epoch down to 1e-4, batch 32 with drop_last; metrics OA and mAcc (balanced accuracy), the best
test epoch is reported. An embedded procedural dataset (``shapes``) makes the whole path runnable on CPU.

Training runs on the shared engine (``visionzoo/tasks/pointcloud.py``, ``engine/loop.py``): the run folder, resume,
metrics.csv and best/ last/ are the engine's. Data is held in memory as numpy arrays (ScanObjectNN is ~12k clouds
of 1024x3 floats). torch is imported lazily so that ``visionzoo --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.config import RecipeError, RunConfig, check_config_keys, read_recipe

_logger = logging.getLogger("visionzoo")

SCANOBJECTNN_CLASSES = ("bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
                        "bed", "pillow", "sink", "sofa", "toilet")
SCANOBJECTNN_FILES = {"train": "training_objectdataset_augmentedrot_scale75.h5",
                      "test": "test_objectdataset_augmentedrot_scale75.h5"}
SHAPE_CLASSES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "helix", "plane")

# A small coc_pointmlp for CPU runs and tests (~0.2M params): 2 stages (128 points -> 32 -> 8 anchors), 8 neighbours,
# one block each; no head dropout (the official 0.5 slows learning on a few hundred clouds).
SMALL_MODEL_KWARGS = dict(points=128, embed_dim=16, dim_expansion=[2, 2], pre_blocks=[1, 1], pos_blocks=[1, 1],
                          k_neighbors=[8, 8], reducers=[4, 4], drop_rate=0.0)


# ----------------------------------------------------------------------------------------------------------------
# config

@dataclass
class PointCloudConfig(RunConfig):
    """Point-cloud recipe: the shared ``RunConfig`` fields (seed, epochs, batch_size, lr, output, experiment, ...)
    with the official recipe's defaults, plus the task's own. The number of points is ``model_kwargs['points']``
    (default 1024)."""

    task: str = "pointcloud"
    model: str = "coc_pointmlp"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "scanobjectnn"  # scanobjectnn | shapes
    data_dir: str | None = None  # scanobjectnn: folder holding main_split/ (or the two h5 files)
    num_classes: int | None = None  # None: from the dataset
    world_size: int = 1  # processes the recipe was written for (documentation)
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sched: str = "cosine"  # cosine annealing per epoch to min_lr (constant within an epoch) | none
    min_lr: float = 1e-4
    smoothing: float = 0.2
    # RunConfig fields whose default is the official recipe's
    epochs: int = 250
    batch_size: int = 32
    lr: float | None = 0.01
    workers: int = 0  # the clouds are in memory: worker processes only add start-up time

    @property
    def points(self) -> int:
        return int(self.model_kwargs.get("points", 1024))

    def check(self) -> None:
        super().check()
        if self.opt != "sgd":
            raise RecipeError(f"point-cloud training uses opt 'sgd' (the official optimizer), got {self.opt!r}.")
        if self.sched not in ("cosine", "none"):
            raise RecipeError(f"point-cloud sched must be 'cosine' or 'none', got {self.sched!r}.")
        if not 0 <= self.smoothing < 1:
            raise RecipeError(f"smoothing must be in [0, 1), got {self.smoothing}.")

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> "PointCloudConfig":
        check_config_keys(data, cls, "point-cloud", source)
        cfg = cls(**data)
        cfg.check()
        return cfg

    @classmethod
    def from_yaml(cls, recipe: str) -> "PointCloudConfig":
        return cls.from_dict(read_recipe(recipe), f"recipe {recipe}")


# ----------------------------------------------------------------------------------------------------------------
# datasets (numpy: points [N, P, 3] float32, labels [N] int64)

@dataclass
class PointCloudSplit:
    points: np.ndarray
    labels: np.ndarray
    classes: tuple

    def __len__(self) -> int:
        return len(self.labels)


def _import_h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading ScanObjectNN's h5 files needs h5py, which is not installed: pip install h5py") from e
    return h5py


def scanobjectnn_paths(root: str | os.PathLike) -> dict:
    """The PB_T50_RS (hardest) train/test h5 files under ``root`` (``root/main_split/`` or ``root`` itself)."""
    root = Path(root)
    for folder in (root / "main_split", root):
        paths = {k: folder / v for k, v in SCANOBJECTNN_FILES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    raise FileNotFoundError(
        f"ScanObjectNN PB_T50_RS files not found under {root}: expected {root}/main_split/"
        f"{SCANOBJECTNN_FILES['train']} and {root}/main_split/{SCANOBJECTNN_FILES['test']} "
        f"(or both directly in {root}). Download h5_files.zip from the ScanObjectNN authors and pass its "
        f"h5_files folder.")


def load_scanobjectnn(root: str | os.PathLike, split: str, points: int = 1024) -> PointCloudSplit:
    """ScanObjectNN PB_T50_RS ``split`` ('train' | 'test'): the first ``points`` points of each cloud, as official."""
    if split not in SCANOBJECTNN_FILES:
        raise ValueError(f"ScanObjectNN split must be 'train' or 'test', got {split!r}")
    path = scanobjectnn_paths(root)[split]
    h5py = _import_h5py()
    with h5py.File(path, "r") as f:
        if "data" not in f or "label" not in f:
            raise ValueError(f"{path} has keys {sorted(f.keys())}; expected 'data' [N, 2048, 3] and 'label' [N]")
        data = np.asarray(f["data"][:, :points], dtype=np.float32)
        labels = np.asarray(f["label"][:], dtype=np.int64).reshape(-1)
    if data.ndim != 3 or data.shape[2] != 3 or data.shape[1] < points:
        raise ValueError(f"{path}: 'data' has shape {data.shape}; need [N, >= {points}, 3]")
    return PointCloudSplit(data, labels, SCANOBJECTNN_CLASSES)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-9)


def _triangles(rng, n: int, tris: np.ndarray) -> np.ndarray:
    """Uniform samples on a triangle mesh ``tris [T, 3, 3]`` (area weighted), ``n`` points."""
    area = np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=-1)
    t = rng.choice(len(tris), size=n, p=area / area.sum())
    u, v = rng.random((2, n, 1))
    flip = (u + v) > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    a, b, c = tris[t, 0], tris[t, 1], tris[t, 2]
    return a + u * (b - a) + v * (c - a)


def _shape(rng, name: str, n: int) -> np.ndarray:
    """``n`` surface points of a unit-size canonical shape ``name``."""
    if name == "sphere":
        return _unit(rng.normal(size=(n, 3)))
    if name == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = rng.choice([-1.0, 1.0], n)
        return p
    if name in ("cylinder", "cone"):
        # lateral surface + bottom disk, area weighted (cone: apex at z=1, radius shrinking linearly)
        side = rng.random(n) < (2 / 3 if name == "cylinder" else 0.6)
        theta = rng.uniform(0, 2 * np.pi, n)
        if name == "cylinder":
            z, r = rng.uniform(-1, 1, n), np.ones(n)
        else:
            h = np.sqrt(rng.random(n))  # uniform area on the cone: density grows with the radius
            z, r = 1 - 2 * h, h
        rd = np.sqrt(rng.random(n))
        r = np.where(side, r, rd)
        z = np.where(side, z, -1.0)
        return np.stack([r * np.cos(theta), r * np.sin(theta), z], -1)
    if name == "torus":
        a, b = rng.uniform(0, 2 * np.pi, (2, n))
        return np.stack([(1 + 0.35 * np.cos(b)) * np.cos(a), (1 + 0.35 * np.cos(b)) * np.sin(a), 0.35 * np.sin(b)], -1)
    if name == "pyramid":
        base = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1]], dtype=np.float64)
        apex = np.array([0.0, 0.0, 1.0])
        tris = [base[[0, 1, 2]], base[[0, 2, 3]]] + [np.stack([base[i], base[(i + 1) % 4], apex]) for i in range(4)]
        return _triangles(rng, n, np.stack(tris))
    if name == "helix":
        t = rng.uniform(0, 1, n)
        tube = 0.08 * _unit(rng.normal(size=(n, 3)))
        return np.stack([np.cos(6 * np.pi * t), np.sin(6 * np.pi * t), 2 * t - 1], -1) + tube
    if name == "plane":
        return np.concatenate([rng.uniform(-1, 1, (n, 2)), np.zeros((n, 1))], -1)
    raise ValueError(f"unknown shape {name!r}; known: {SHAPE_CLASSES}")


def _random_rotations(rng, n: int) -> np.ndarray:
    """``n`` uniformly random rotation matrices (QR of a Gaussian, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    q[:, :, 0] *= np.sign(np.linalg.det(q))[:, None]
    return q


def make_shapes(split: str, points: int = 1024, per_class: int | None = None, seed: int = 0,
                noise: float = 0.02) -> PointCloudSplit:
    """Embedded procedural dataset: ``len(SHAPE_CLASSES)`` shape classes, each cloud randomly rotated, scaled
    (U(0.6, 1.0)), stretched per axis (U(0.85, 1.15)) and jittered (Gaussian ``noise``). Deterministic from
    ``seed``; the train and test splits are drawn from disjoint RNG streams (default 64 / 16 clouds per class)."""
    if split not in ("train", "test"):
        raise ValueError(f"shapes split must be 'train' or 'test', got {split!r}")
    per_class = per_class or (64 if split == "train" else 16)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    k = len(SHAPE_CLASSES)
    clouds = np.stack([_shape(rng, name, per_class * points).reshape(per_class, points, 3) for name in SHAPE_CLASSES])
    clouds = clouds.reshape(k * per_class, points, 3)
    n = len(clouds)
    stretch = rng.uniform(0.85, 1.15, (n, 1, 3)) * rng.uniform(0.6, 1.0, (n, 1, 1))
    clouds = np.einsum("npc,ndc->npd", clouds * stretch, _random_rotations(rng, n))
    clouds = clouds + noise * rng.normal(size=clouds.shape)
    labels = np.repeat(np.arange(k), per_class)
    order = rng.permutation(n)  # interleave the classes
    return PointCloudSplit(clouds[order].astype(np.float32), labels[order].astype(np.int64), SHAPE_CLASSES)


def parse_data(spec: str) -> tuple[str, str | None]:
    """``'shapes'`` | ``'scanobjectnn:ROOT'`` -> (dataset, data_dir)."""
    name, _, root = spec.partition(":")
    if name == "shapes" and not root:
        return "shapes", None
    if name == "scanobjectnn" and root:
        return "scanobjectnn", root
    raise ValueError(f"--data must be 'shapes' or 'scanobjectnn:ROOT' (ROOT holds main_split/), got {spec!r}")


def load_data(cfg: PointCloudConfig, shapes_per_class: tuple | None = None) -> tuple[PointCloudSplit, PointCloudSplit]:
    if cfg.dataset == "shapes":
        pc = shapes_per_class or (None, None)
        return (make_shapes("train", cfg.points, pc[0], seed=cfg.seed), make_shapes("test", cfg.points, pc[1],
                                                                                    seed=cfg.seed))
    if cfg.dataset == "scanobjectnn":
        if not cfg.data_dir:
            raise ValueError("dataset scanobjectnn needs a data folder: --data scanobjectnn:ROOT "
                             "(ROOT holds main_split/*_objectdataset_augmentedrot_scale75.h5), or --data shapes")
        return load_scanobjectnn(cfg.data_dir, "train", cfg.points), load_scanobjectnn(cfg.data_dir, "test", cfg.points)
    raise ValueError(f"unknown point-cloud dataset {cfg.dataset!r}: use 'scanobjectnn' or 'shapes'")


def augment(points: np.ndarray, rng=None) -> np.ndarray:
    """Official train augmentation of one cloud ``[P, 3]``: per-axis scale U(2/3, 3/2), translation U(-0.2, 0.2),
    then a random order of the points. ``rng``: numpy's global RNG by default (the loop seeds it per item)."""
    rng = np.random if rng is None else rng
    out = points * rng.uniform(2 / 3, 3 / 2, (1, 3)) + rng.uniform(-0.2, 0.2, (1, 3))
    return out[rng.permutation(len(points))].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# loss and metrics

def smooth_ce(logits, target, eps: float = 0.2):
    """PointMLP ``cal_loss``: target ``1 - eps``, every other class ``eps / (K - 1)``."""
    import torch.nn.functional as F

    k = logits.shape[1]
    one_hot = F.one_hot(target, k).to(logits.dtype)
    soft = one_hot * (1 - eps) + (1 - one_hot) * (eps / (k - 1))
    return -(soft * F.log_softmax(logits, dim=1)).sum(1).mean()


def classification_metrics(pred, target, num_classes: int) -> dict:
    """OA and mAcc (mean per-class recall over the classes present = sklearn's balanced accuracy)."""
    import torch

    total = torch.bincount(target, minlength=num_classes).float()
    hits = torch.bincount(target, weights=(pred == target).float(), minlength=num_classes)
    return metrics_from_counts(hits, total)


def metrics_from_counts(hits, total) -> dict:
    """OA and mAcc from per-class hit and item counts."""
    present = total > 0
    return {"oa": float(hits.sum() / total.sum()), "macc": float((hits[present] / total[present]).mean())}


def build_model(cfg: PointCloudConfig, num_classes: int):
    import timm

    from .. import models  # noqa: F401  registers coc_pointmlp

    return timm.create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)


def train(cfg: PointCloudConfig, out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          device: str | None = None, data: tuple | None = None) -> dict:
    """Train ``cfg`` on the engine (``tasks/pointcloud.py``); ``out`` is the run folder itself (the older spelling of
    ``output``/``experiment``), ``resume`` an earlier run folder to continue exactly, ``data`` = (train, test) splits
    that replace the config's dataset (tests). Returns the run's summary."""
    from ..tasks.pointcloud import train as train_task

    return train_task(cfg, out=out, resume=resume, device=device, data=data)


# ----------------------------------------------------------------------------------------------------------------
# CLI (registered as `visionzoo pointcloud`)

HELP = "point-cloud classification (CoC PointMLP) on ScanObjectNN h5 files or embedded procedural shapes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train and evaluate the CoC point-cloud classifier (coc_pointmlp). Defaults follow the "
                          "official ScanObjectNN recipe; --recipe pointcloud/coc_pointmlp_shapes_cpu is a small "
                          "CPU run on embedded shapes. Values come from --recipe, then flags, then --set.")
    parser.add_argument("--recipe", default=None,
                        help="point-cloud recipe name or YAML (e.g. pointcloud/coc_pointmlp_scanobjectnn)")
    parser.add_argument("--data", default=None,
                        help="'shapes' (embedded procedural clouds) or 'scanobjectnn:ROOT' (ROOT holds "
                             "main_split/*_objectdataset_augmentedrot_scale75.h5)")
    parser.add_argument("--model", default=None, help="registered point-cloud model (default coc_pointmlp)")
    parser.add_argument("--small", action="store_true",
                        help="use the small CPU configuration of the model (SMALL_MODEL_KWARGS)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps "
                        "(the schedule stays that of the full run; --resume continues)")
    parser.add_argument("-b", "--batch-size", type=int, default=None)
    parser.add_argument("-j", "--workers", type=int, default=None, help="data-loader processes (default 0)")
    parser.add_argument("--points", type=int, default=None, help="points per cloud (default 1024)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (amp_dtype)")
    parser.add_argument("--output", default=None, help="parent folder of the run folder (default runs)")
    parser.add_argument("--experiment", "--exp", default=None,
                        help="the run folder's name (default <model>-<date>-<time>)")
    parser.add_argument("--out", default=None, help="the run folder itself (= --output PARENT --experiment NAME)")
    parser.add_argument("--resume", default=None, metavar="RUN", help="continue the run in folder RUN exactly")
    parser.add_argument("--checkpoint", default=None, metavar="WEIGHTS",
                        help="evaluate these weights on the test split instead of training: a run folder (best/, "
                             "else last/), a save_pretrained folder, a weights file, or an older run's "
                             "last.pth / best.pth")
    parser.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                        help="more config overrides, e.g. min_lr=0 eval_every=5")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from_args(args) -> PointCloudConfig:
    """recipe < flags < --set, then the values checked."""
    from ..engine.config import apply_overrides, split_run_path

    data = read_recipe(args.recipe) if args.recipe else {}
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
    for key in ("model", "epochs", "max_steps", "batch_size", "workers", "lr", "seed", "output", "experiment"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if getattr(args, "amp", False):
        data["amp"] = True
    data = apply_overrides(data, getattr(args, "set", None) or [], PointCloudConfig)
    source = f"recipe {args.recipe}" if args.recipe else "flags"
    return PointCloudConfig.from_dict(data, source)


def run(args) -> int:
    import sys

    import torch

    from ..models import CheckpointMismatchError

    try:
        cfg = config_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        if getattr(args, "checkpoint", None):
            from ..tasks.pointcloud import evaluate_checkpoint

            m = evaluate_checkpoint(args.checkpoint, cfg, device=args.device)
            print(f"{args.checkpoint}: test OA {m['test_oa']:.4f}, mAcc {m['test_macc']:.4f} "
                  f"({m['test_size']} clouds, {m['num_classes']} classes)")
            return 0
        if args.resume:
            print(f"point cloud: resuming {args.resume} with its own settings, device {args.device}")
        else:
            print(f"point cloud: {cfg.model} {cfg.model_kwargs} on {cfg.dataset} ({cfg.points} points), "
                  f"{cfg.epochs} epochs, batch {cfg.batch_size}, device {args.device}")
        summary = train(cfg, resume=args.resume, device=args.device)
        print(f"run directory: {summary['run_dir']}")
    except (ValueError, FileNotFoundError, ImportError, CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
