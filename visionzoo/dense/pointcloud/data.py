"""ScanObjectNN h5 files, the embedded procedural shapes and the official augmentation (numpy)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InputNotFoundError, MissingDependencyError, UserError
from .config import SCANOBJECTNN_CLASSES, SCANOBJECTNN_FILES, SHAPE_CLASSES, PointCloudConfig

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
        raise MissingDependencyError("reading ScanObjectNN's h5 files needs h5py, which is not installed: "
                                     "pip install h5py") from e
    return h5py


def scanobjectnn_paths(root: str | os.PathLike) -> dict:
    """The PB_T50_RS (hardest) train/test h5 files under ``root`` (``root/main_split/`` or ``root`` itself)."""
    root = Path(root)
    for folder in (root / "main_split", root):
        paths = {k: folder / v for k, v in SCANOBJECTNN_FILES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    raise InputNotFoundError(
        f"ScanObjectNN PB_T50_RS files not found under {root}: expected {root}/main_split/"
        f"{SCANOBJECTNN_FILES['train']} and {root}/main_split/{SCANOBJECTNN_FILES['test']} "
        f"(or both directly in {root}). Download h5_files.zip from the ScanObjectNN authors and pass its "
        f"h5_files folder.")


def load_scanobjectnn(root: str | os.PathLike, split: str, points: int = 1024) -> PointCloudSplit:
    """ScanObjectNN PB_T50_RS ``split`` ('train' | 'test'): the first ``points`` points of each cloud, as official."""
    if split not in SCANOBJECTNN_FILES:
        raise UserError(f"ScanObjectNN split must be 'train' or 'test', got {split!r}")
    path = scanobjectnn_paths(root)[split]
    h5py = _import_h5py()
    with h5py.File(path, "r") as f:
        if "data" not in f or "label" not in f:
            raise UserError(f"{path} has keys {sorted(f.keys())}; expected 'data' [N, 2048, 3] and 'label' [N]")
        data = np.asarray(f["data"][:, :points], dtype=np.float32)
        labels = np.asarray(f["label"][:], dtype=np.int64).reshape(-1)
    if data.ndim != 3 or data.shape[2] != 3 or data.shape[1] < points:
        raise UserError(f"{path}: 'data' has shape {data.shape}; need [N, >= {points}, 3]")
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
    raise UserError(f"unknown shape {name!r}; known: {SHAPE_CLASSES}")


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
        raise UserError(f"shapes split must be 'train' or 'test', got {split!r}")
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
    raise UserError(f"--data must be 'shapes' or 'scanobjectnn:ROOT' (ROOT holds main_split/), got {spec!r}")


def load_data(cfg: PointCloudConfig, shapes_per_class: tuple | None = None) -> tuple[PointCloudSplit, PointCloudSplit]:
    if cfg.dataset == "shapes":
        pc = shapes_per_class or (None, None)
        return (make_shapes("train", cfg.points, pc[0], seed=cfg.seed), make_shapes("test", cfg.points, pc[1],
                                                                                    seed=cfg.seed))
    if cfg.dataset == "scanobjectnn":
        if not cfg.data_dir:
            raise UserError("dataset scanobjectnn needs a data folder: --data scanobjectnn:ROOT "
                            "(ROOT holds main_split/*_objectdataset_augmentedrot_scale75.h5), or --data shapes")
        return load_scanobjectnn(cfg.data_dir, "train", cfg.points), load_scanobjectnn(cfg.data_dir, "test", cfg.points)
    raise UserError(f"unknown point-cloud dataset {cfg.dataset!r}: use 'scanobjectnn' or 'shapes'")


def augment(points: np.ndarray, rng=None) -> np.ndarray:
    """Official train augmentation of one cloud ``[P, 3]``: per-axis scale U(2/3, 3/2), translation U(-0.2, 0.2),
    then a random order of the points. ``rng``: numpy's global RNG by default (the loop seeds it per item)."""
    rng = np.random if rng is None else rng
    out = points * rng.uniform(2 / 3, 3 / 2, (1, 3)) + rng.uniform(-0.2, 0.2, (1, 3))
    return out[rng.permutation(len(points))].astype(np.float32)
