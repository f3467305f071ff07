"""Image classification datasets: the embedded scikit-learn digits, ImageFolder trees, and LMDB (see lmdb.py).

Every dataset here exposes ``classes`` (list of str), ``targets`` (list of int) and returns ``(image, label)``.
Folder and LMDB datasets never crash on a corrupt image: they warn once naming the file, return the next readable
sample instead, and count the skipped files in shared memory so the count is right across DataLoader workers.

This module imports neither torch nor timm, so the CLI can use it while staying fast to start.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..errors import InputNotFoundError, UserError
from .image_io import (IMG_EXTENSIONS,  # noqa: F401  (re-exported: the dataset API of earlier versions)
                       CorruptImageWarning, DataError, NoReadableImagesError, RobustSampleMixin, SkipTracker,
                       _scan_class_folder, decode_image, find_classes, is_image_file)
from .lmdb import LMDBDataset, read_lmdb_meta

__all__ = [
    "IMG_EXTENSIONS", "CorruptImageWarning", "DigitsDataset", "ImageFolderDataset", "DATASETS",
    "build_dataset", "check_data_dir", "check_same_classes", "DataError", "NoReadableImagesError", "find_classes",
    "write_digits_folder", "resolve_split_path",
]

DATASETS = ("digits", "folder", "lmdb", "auto")
SPLITS = ("train", "val")


# --------------------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------------------
def _layout_hint(root: str) -> str:
    return f"expected layout: {root}/<class_name>/<image>.jpg (one sub-folder per class, like torchvision ImageFolder)"


class ImageFolderDataset(RobustSampleMixin):
    """torchvision ImageFolder-compatible dataset (same class order, same sample order) that skips corrupt images.

    ``root/<class>/**/<image>``: images may sit in nested folders below their class folder.
    """

    def __init__(self, root, transform=None, target_transform=None):
        self.root = os.fspath(root)
        _check_folder_root(self.root)
        self.transform = transform
        self.target_transform = target_transform
        self.classes = find_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, i) for i, c in enumerate(self.classes)
                        for p in _scan_class_folder(os.path.join(self.root, c))]
        if not self.samples:
            raise InputNotFoundError(f"no images found under {self.root} (extensions: {', '.join(IMG_EXTENSIONS)}); "
                                     f"{_layout_hint(self.root)}")
        self.targets = [t for _, t in self.samples]
        self.imgs = self.samples  # torchvision alias
        self._skips = SkipTracker(len(self.samples))
        self._check_readable()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i):
        return decode_image(self.samples[i][0])

    def _describe(self, i):
        return self.samples[i][0]

    def __repr__(self):
        return f"ImageFolderDataset(root={self.root!r}, samples={len(self)}, classes={len(self.classes)})"


def _check_folder_root(root: str) -> None:
    """Cheap checks (no full scan) so that a wrong path fails in milliseconds, before a model is built."""
    if not os.path.exists(root):
        raise InputNotFoundError(f"dataset folder not found: {root}; {_layout_hint(root)}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"dataset path is not a folder: {root}; {_layout_hint(root)}")
    classes = find_classes(root)
    if not classes:
        n_img = sum(1 for f in os.listdir(root) if is_image_file(f))
        if n_img:
            raise UserError(
                f"{root} holds {n_img} images but no class sub-folders; {_layout_hint(root)}. For a flat val folder "
                f"with a label file, convert it with `visionzoo data to-lmdb {root} DST --label-file LABELS`.")
        raise InputNotFoundError(f"dataset folder is empty: {root}; {_layout_hint(root)}")
    # Stop at the first image found: a full scan of ImageNet takes a while and happens in the dataset itself.
    for c in classes:
        for _dirpath, _dirnames, filenames in os.walk(os.path.join(root, c), followlinks=True):
            if any(is_image_file(f) for f in filenames):
                return
    raise InputNotFoundError(
        f"dataset folder has {len(classes)} class folders but no images: {root} "
        f"(extensions: {', '.join(IMG_EXTENSIONS)}); {_layout_hint(root)}")


def _is_lmdb_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


def resolve_split_path(path, split: str, dataset: str = "auto") -> tuple[str, str]:
    """Return ``(kind, split_path)`` with kind 'lmdb' or 'folder', without checking the contents."""
    if path is None:
        raise UserError(f"dataset {dataset!r} needs a data_dir (a root holding train/ and val/); "
                        f"use dataset 'digits' for the embedded data set")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise InputNotFoundError(f"data_dir not found: {path} (it should hold {split}/ or {split}.lmdb)")
    candidates = [os.path.join(path, f"{split}.lmdb"), os.path.join(path, split)]
    if dataset in ("lmdb", "auto"):
        for c in candidates:
            if _is_lmdb_dir(c):
                return "lmdb", c
        if dataset == "lmdb":
            raise InputNotFoundError(
                f"no LMDB for split {split!r}: neither {candidates[0]} nor {candidates[1]} holds a data.mdb; "
                f"create one with `visionzoo data to-lmdb SRC {candidates[0]}`")
    return "folder", candidates[1]


def check_data_dir(path, split: str, dataset: str = "auto") -> str:
    """Fail fast, with the path in the message, on a missing, empty or wrongly laid out split; return its path.

    Call it before building the model. ``path`` is the data root holding ``<split>/`` or ``<split>.lmdb``.
    """
    kind, split_path = resolve_split_path(path, split, dataset)
    if kind == "lmdb":

        meta = read_lmdb_meta(split_path)
        if meta["length"] == 0:
            raise UserError(f"LMDB dataset {split_path} holds no images")
        return split_path
    if not os.path.exists(split_path):
        raise InputNotFoundError(
            f"split folder not found: {split_path} (data_dir {os.fspath(path)} should hold {split}/ with one "
            f"sub-folder per class, or {split}.lmdb)")
    _check_folder_root(split_path)
    return split_path


# --------------------------------------------------------------------------------------------------------------
# Embedded digits (scikit-learn)
# --------------------------------------------------------------------------------------------------------------
DIGITS_VAL_PER_CLASS = 36  # 10 classes x 36 = 360 val images, 1437 train
DIGITS_SPLIT_SEED = 0
_DIGITS_CACHE: dict = {}


def _load_sklearn_digits():
    """(images float [1797, 8, 8] in 0..16, labels int64), the data of ``sklearn.datasets.load_digits``.

    Read straight from the CSV bundled with scikit-learn (what load_digits reads) because importing
    sklearn.datasets takes seconds; load_digits itself is the fallback if the file ever moves.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def _digits_arrays(img_size: int):
    """(images uint8 [N, S, S], labels int64 [N], val mask bool [N]), computed once per size and cached."""
    if img_size not in _DIGITS_CACHE:
        digits, labels = _load_sklearn_digits()
        small = np.clip(np.round(digits * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 ink -> 0..255
        if img_size == small.shape[-1]:
            big = small
        else:
            big = np.stack([np.asarray(Image.fromarray(a).resize((img_size, img_size), Image.BICUBIC)) for a in small])
        # Stratified split with numpy's legacy RandomState, whose stream numpy guarantees stable across versions
        # and platforms, so every machine gets the same split (sklearn's splitters make no such promise).
        rng = np.random.RandomState(DIGITS_SPLIT_SEED)
        val = np.zeros(len(labels), dtype=bool)
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            val[rng.permutation(idx)[:DIGITS_VAL_PER_CLASS]] = True
        _DIGITS_CACHE[img_size] = (big, labels, val)
    return _DIGITS_CACHE[img_size]


class DigitsDataset:
    """The 1797 real handwritten 8x8 digits bundled with scikit-learn, upscaled (bicubic) to RGB img_size^2.

    Fixed stratified split: 1437 train / 360 val (36 per class), identical on every machine.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", img_size: int = 32, transform=None, target_transform=None):
        if split not in SPLITS:
            raise UserError(f"unknown digits split {split!r}; valid splits: {', '.join(SPLITS)}")
        if int(img_size) < 8:
            raise UserError(f"digits img_size must be >= 8 (the native size), got {img_size}")
        self.split = split
        self.img_size = int(img_size)
        self.transform = transform
        self.target_transform = target_transform
        images, labels, val = _digits_arrays(self.img_size)
        sel = val if split == "val" else ~val
        self.indices = np.flatnonzero(sel)  # positions in sklearn's load_digits order
        self._images = images[sel]
        self.targets = labels[sel].tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self._images[index]).convert("RGB")
        target = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    # Kept for API symmetry with the folder/LMDB datasets (the engine can always report skips).
    @property
    def num_skipped(self) -> int:
        return 0

    @property
    def skipped_files(self) -> list:
        return []

    def __repr__(self):
        return f"DigitsDataset(split={self.split!r}, img_size={self.img_size}, samples={len(self)})"


def write_digits_folder(root, img_size: int = 32, max_per_class: int | None = None) -> str:
    """Write the digits as an ImageFolder tree ``root/{train,val}/<class>/<index>.png``; return ``root``.

    The file name is the sample's index in sklearn's ``load_digits`` order. ``max_per_class`` keeps the first
    few images of each class per split (small trees for tests).
    """
    root = os.fspath(root)
    for split in SPLITS:
        ds = DigitsDataset(split, img_size)
        per_class: dict[int, int] = {}
        for pos, (src_index, target) in enumerate(zip(ds.indices, ds.targets)):
            if max_per_class is not None and per_class.get(target, 0) >= max_per_class:
                continue
            per_class[target] = per_class.get(target, 0) + 1
            folder = os.path.join(root, split, ds.classes[target])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(ds._images[pos]).convert("RGB").save(os.path.join(folder, f"{src_index:04d}.png"))
    return root


# --------------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------------
def check_same_classes(splits: dict) -> None:
    """Refuse splits whose class lists differ: labels are indices into each split's own sorted class list, so a
    val folder missing one class would shift every later label by one, silently. ``splits``: {name: dataset}."""
    items = [(name, ds) for name, ds in splits.items() if ds is not None]
    if len(items) < 2:
        return
    (ref_name, ref), *rest = items
    for name, ds in rest:
        if list(ds.classes) != list(ref.classes):
            a, b = set(ref.classes), set(ds.classes)
            diff = [f"{name} lacks {sorted(a - b)[:3]}" if a - b else "",
                    f"{name} adds {sorted(b - a)[:3]}" if b - a else ""]
            what = "; ".join(d for d in diff if d) or "same names in another order"
            raise DataError(
                f"the classes of split {name!r} ({_where(ds)}) differ from those of {ref_name!r} ({_where(ref)}): "
                f"{what}. Labels are indices into the sorted class list, so every split needs the same class "
                f"folders (an empty folder is fine); for an LMDB, convert with --classes TRAIN_FOLDER.")


def _where(ds) -> str:
    return str(getattr(ds, "root", type(ds).__name__))


def build_dataset(dataset: str, data_dir, split: str, transform, img_size: int = 32):
    """Build a split of ``dataset``: 'digits' (embedded), 'folder' (data_dir/split), 'lmdb'
    (data_dir/<split>.lmdb or an LMDB at data_dir/<split>) or 'auto' (LMDB when one is there, else folder)."""
    if dataset not in DATASETS:
        import difflib

        close = difflib.get_close_matches(str(dataset), DATASETS, n=2)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise UserError(f"unknown dataset {dataset!r}{hint}; valid datasets: {', '.join(DATASETS)}")
    if dataset == "digits":
        return DigitsDataset(split, img_size=img_size, transform=transform)
    split_path = check_data_dir(data_dir, split, dataset)
    if _is_lmdb_dir(split_path):

        return LMDBDataset(split_path, transform=transform)
    return ImageFolderDataset(split_path, transform=transform)
