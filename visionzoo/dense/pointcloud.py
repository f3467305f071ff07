"""Point-cloud classification with the CoC point-cloud model (``coc_pointmlp``): data, training, evaluation, CLI.

Follows the official CoC ``pointcloud/main.py`` recipe (spec coc.md section 6): ScanObjectNN PB_T50_RS h5 files,
first 1024 points, train augmentation = per-axis scale U(2/3, 3/2) + translation U(-0.2, 0.2) + point shuffle,
label-smoothed cross-entropy (eps 0.2, the PointMLP ``cal_loss`` form), SGD lr 0.01 / momentum 0.9 / wd 1e-4,
cosine annealing per epoch down to 1e-4, batch 32 with drop_last; metrics OA and mAcc (balanced accuracy), the best
test epoch is reported. An embedded procedural dataset (``shapes``) makes the whole path runnable on CPU.

Data is held in memory as numpy arrays and batched by hand (ScanObjectNN is ~12k clouds of 1024x3 floats), so an
epoch's order and augmentation come from one RNG seeded by (seed, epoch): a resumed run repeats the exact batches.
torch is imported lazily so that ``visionzoo --help`` stays fast.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
class PointCloudConfig:
    """Point-cloud recipe. Every key is also a ``TrainConfig`` key with the same meaning (so the shared recipe
    tooling can read these files); the number of points is ``model_kwargs['points']`` (default 1024)."""

    model: str = "coc_pointmlp"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "scanobjectnn"  # scanobjectnn | shapes
    data_dir: str | None = None  # scanobjectnn: folder holding main_split/ (or the two h5 files)
    num_classes: int | None = None  # None: from the dataset
    epochs: int = 250
    batch_size: int = 32
    world_size: int = 1
    opt: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sched: str = "cosine"  # per-epoch CosineAnnealingLR to min_lr
    min_lr: float = 1e-4
    smoothing: float = 0.2
    seed: int = 0
    notes: str = ""

    @property
    def points(self) -> int:
        return int(self.model_kwargs.get("points", 1024))

    def global_batch(self, world_size: int | None = None) -> int:  # same helper as TrainConfig
        return self.batch_size * (world_size or 1)

    @classmethod
    def from_yaml(cls, recipe: str) -> "PointCloudConfig":
        from ..engine.config import check_config_keys, read_recipe

        data = read_recipe(recipe)
        check_config_keys(data, cls, "point-cloud", f"recipe {recipe}")
        return cls(**data)


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


def augment(points: np.ndarray, rng) -> np.ndarray:
    """Official train augmentation on a batch ``[B, P, 3]``: per-cloud, per-axis scale U(2/3, 3/2), translation
    U(-0.2, 0.2), then a random order of the points."""
    B, P, _ = points.shape
    out = points * rng.uniform(2 / 3, 3 / 2, (B, 1, 3)) + rng.uniform(-0.2, 0.2, (B, 1, 3))
    perm = np.argsort(rng.random((B, P)), axis=1)
    return np.take_along_axis(out, perm[..., None], axis=1).astype(np.float32)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int):
    """Shuffled index batches for one epoch (drop_last), and the RNG for its augmentation: both from (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch, 7])
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)], rng


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

    correct = (pred == target).float()
    total = torch.bincount(target, minlength=num_classes).float()
    hits = torch.bincount(target, weights=correct, minlength=num_classes)
    present = total > 0
    return {"oa": float(correct.mean()), "macc": float((hits[present] / total[present]).mean())}


# ----------------------------------------------------------------------------------------------------------------
# training

def build_model(cfg: PointCloudConfig, num_classes: int):
    import timm

    from .. import models  # noqa: F401  registers coc_pointmlp

    return timm.create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(model, split: PointCloudSplit, device, batch_size: int = 64) -> dict:
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            x = torch.from_numpy(split.points[i:i + batch_size]).to(device).transpose(1, 2)
            preds.append(model(x).argmax(1))
    pred = torch.cat(preds).cpu()
    return classification_metrics(pred, torch.from_numpy(split.labels), len(split.classes))


METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_oa", "test_oa", "test_macc", "seconds")


def train(cfg: PointCloudConfig, out: str | os.PathLike, resume: str | None = None, device: str = "cpu",
          data: tuple | None = None, log=print) -> dict:
    """Train and evaluate every epoch; writes ``last.pth`` (full state), ``best.pth`` (model at the best test OA),
    ``metrics.csv`` and ``summary.json`` to ``out``. Returns the summary. ``data`` = (train, test) splits overrides
    the config's dataset (tests)."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = data or load_data(cfg)
    num_classes = cfg.num_classes or len(train_set.classes)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{len(train_set)} training clouds < batch size {cfg.batch_size} (drop_last gives no batch)")
    if cfg.opt != "sgd" or cfg.sched not in ("cosine", "none"):
        raise ValueError(f"point-cloud training supports opt 'sgd' and sched 'cosine' | 'none', got {cfg.opt!r}, "
                         f"{cfg.sched!r}")
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs, eta_min=cfg.min_lr) \
        if cfg.sched == "cosine" else torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    start, history = 0, []
    if resume:
        path = Path(resume)
        path = path / "last.pth" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {path} (give a run folder or its last.pth)")
        state = torch.load(path, map_location=dev, weights_only=False)
        old = state.get("config", {})
        changed = [k for k in ("model", "model_kwargs", "dataset", "batch_size", "seed")
                   if k in old and old[k] != getattr(cfg, k)]
        if changed:
            raise ValueError(f"--resume: {path} was trained with other {changed} "
                             f"({ {k: old[k] for k in changed} }); resume with the same settings")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["epoch"] + 1, state["history"]
        log(f"resumed from {path} at epoch {start}")
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout: same stream whether resumed or not
        model.train()
        batches, rng = epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch)
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=dev)
        hits = torch.zeros((), device=dev)
        for idx in batches:
            x = torch.from_numpy(augment(train_set.points[idx], rng)).to(dev).transpose(1, 2)
            y = torch.from_numpy(train_set.labels[idx]).to(dev)
            logits = model(x)
            loss = smooth_ce(logits, y, cfg.smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            hits += (logits.detach().argmax(1) == y).sum()
        sched.step()
        m = evaluate(model, test_set, dev)
        seen = len(batches) * cfg.batch_size
        row = {"epoch": epoch, "lr": lr, "train_loss": float(loss_sum) / len(batches),
               "train_oa": float(hits) / seen, "test_oa": m["oa"], "test_macc": m["macc"],
               "seconds": round(time.time() - t0, 3)}
        history.append(row)
        best = max(history, key=lambda r: (r["test_oa"], -r["epoch"]))
        if best is row:
            _atomic_save({"model": model.state_dict(), "epoch": epoch, "config": dataclasses.asdict(cfg)},
                         out / "best.pth")
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "epoch": epoch, "history": history, "config": dataclasses.asdict(cfg)}, out / "last.pth")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(history)
        _atomic_write_text(buf.getvalue(), out / "metrics.csv")
        log(f"epoch {epoch}: lr {lr:.5f} loss {row['train_loss']:.4f} train OA {row['train_oa']:.4f} "
            f"test OA {m['oa']:.4f} mAcc {m['macc']:.4f} ({row['seconds']:.1f}s)")
    if not history:
        raise ValueError(f"nothing to do: the run already has {cfg.epochs} epochs")
    best = max(history, key=lambda r: (r["test_oa"], -r["epoch"]))
    summary = {"best_epoch": best["epoch"], "best_oa": best["test_oa"], "best_oa_macc": best["test_macc"],
               "best_macc": max(r["test_macc"] for r in history), "last": history[-1],
               "chance": 1.0 / num_classes, "num_classes": num_classes, "train_size": len(train_set),
               "test_size": len(test_set), "config": dataclasses.asdict(cfg)}
    _atomic_write_text(json.dumps(summary, indent=2), out / "summary.json")
    log(f"best test OA {best['test_oa']:.4f} (mAcc {best['test_macc']:.4f}) at epoch {best['epoch']}; "
        f"chance {1.0 / num_classes:.4f}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# CLI (registered as `visionzoo pointcloud`)

HELP = "point-cloud classification (CoC PointMLP) on ScanObjectNN h5 files or embedded procedural shapes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train and evaluate the CoC point-cloud classifier (coc_pointmlp). Defaults follow the "
                          "official ScanObjectNN recipe; --recipe pointcloud/coc_pointmlp_shapes_cpu is a small "
                          "CPU run on embedded shapes.")
    parser.add_argument("--recipe", default=None,
                        help="point-cloud recipe name or YAML (e.g. pointcloud/coc_pointmlp_scanobjectnn)")
    parser.add_argument("--data", default=None,
                        help="'shapes' (embedded procedural clouds) or 'scanobjectnn:ROOT' (ROOT holds "
                             "main_split/*_objectdataset_augmentedrot_scale75.h5)")
    parser.add_argument("--model", default=None, help="registered point-cloud model (default coc_pointmlp)")
    parser.add_argument("--small", action="store_true",
                        help="use the small CPU configuration of the model (SMALL_MODEL_KWARGS)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--points", type=int, default=None, help="points per cloud (default 1024)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out", default="runs/pointcloud", help="output folder (checkpoints, metrics.csv)")
    parser.add_argument("--resume", default=None, help="run folder or last.pth to continue exactly")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from_args(args) -> PointCloudConfig:
    cfg = PointCloudConfig.from_yaml(args.recipe) if args.recipe else PointCloudConfig()
    kw = dict(cfg.model_kwargs)
    if getattr(args, "small", False):
        kw = {**SMALL_MODEL_KWARGS, **{k: v for k, v in kw.items() if k != "points"}}
    if args.points is not None:
        kw["points"] = args.points
    updates = {"model_kwargs": kw}
    if args.data is not None:
        updates["dataset"], updates["data_dir"] = parse_data(args.data)
    for key in ("model", "epochs", "batch_size", "lr", "seed"):
        if getattr(args, key) is not None:
            updates[key] = getattr(args, key)
    return dataclasses.replace(cfg, **updates)


def run(args) -> int:
    import sys

    import torch

    try:
        cfg = config_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"point cloud: {cfg.model} {cfg.model_kwargs} on {cfg.dataset} ({cfg.points} points), "
              f"{cfg.epochs} epochs, batch {cfg.batch_size}, device {device}")
        train(cfg, args.out, resume=args.resume, device=device)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
