"""LMDB image datasets: a converter (``visionzoo data to-lmdb SRC DST``) and a reader.

Why not GPViT's ``create_lmdb_dataset.py``: it fails at argument parsing, it only finds ``<dir>/*/*.JPEG`` (so a
flat ImageNet val folder gives zero images), it stores no labels, and it re-encodes every JPEG (lossy). Here:

* SRC is either nested class folders ``SRC/<class>/**/<image>`` or any folder plus a label file whose lines are
  ``relative/path label`` where label is a 0-based class index or a class name (ImageNet/mmcls val style).
* Values are the original encoded file bytes (no re-encode), so decoding gives the exact same pixels.
* Labels, the class list and the length are stored as metadata, so the reader needs no annotation file.

Layout (format ``visionzoo-lmdb`` v1): record ``i`` under key ``b'%09d' % i``; its value is a little-endian
uint16 name length, the UTF-8 relative file name, then the encoded image bytes. ``__labels__`` holds the labels as
int32, ``__visionzoo_meta__`` a JSON dict (format, version, length, classes, ...), written last so that an
interrupted conversion is detected.

lmdb is an optional dependency (``pip install visionzoo[lmdb]``); it is imported only when used.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import warnings

import numpy as np

from ..errors import InputNotFoundError, MissingDependencyError, UserError
from ..files import publish_dir
from .image_io import (IMG_EXTENSIONS, CorruptImageWarning, DataError, NoReadableImagesError, RobustSampleMixin,
                       SkipTracker, _scan_class_folder, decode_image, find_classes, is_image_file)

__all__ = ["convert_to_lmdb", "LMDBDataset", "read_lmdb_meta", "parse_label_file", "add_arguments", "run"]

META_KEY = b"__visionzoo_meta__"
LABELS_KEY = b"__labels__"
FORMAT = "visionzoo-lmdb"
VERSION = 1
_BATCH = 1000  # puts per write transaction


def _import_lmdb():
    try:
        import lmdb
    except ImportError as e:
        raise MissingDependencyError("LMDB datasets need the 'lmdb' package: pip install 'visionzoo[lmdb]' "
                          "(or pip install lmdb)") from e
    return lmdb


def _record_key(i: int) -> bytes:
    return b"%09d" % i


def _pack(name: str, data: bytes) -> bytes:
    nb = name.encode("utf-8")
    return struct.pack("<H", len(nb)) + nb + data


def _unpack(buf) -> tuple[str, bytes]:
    (n,) = struct.unpack_from("<H", buf)
    return bytes(buf[2:2 + n]).decode("utf-8"), buf[2 + n:]


# --------------------------------------------------------------------------------------------------------------
# Label files and class lists
# --------------------------------------------------------------------------------------------------------------
_LABEL_FORMAT = ("expected one 'filename label' pair per line (separated by whitespace, or by one comma for file names "
                 "with spaces), label a "
                 "0-based class index or a class name, e.g. 'ILSVRC2012_val_00000001.JPEG 65' or "
                 "'ILSVRC2012_val_00000001.JPEG n01751748'")


def parse_label_file(path) -> list[tuple[str, str]]:
    """Read ``(filename, label_token)`` pairs; blank lines and ``#`` comments are ignored."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"label file not found: {path}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as e:
            raise DataError(f"label file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            f"{_LABEL_FORMAT}") from None
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 and len(line.split(",")) == 2:
                parts = line.split(",")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise UserError(f"cannot parse line {lineno} of label file {path}: {line[:200]!r}; {_LABEL_FORMAT}")
            pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise UserError(f"label file {path} has no entries; {_LABEL_FORMAT}")
    return pairs


def _load_classes(classes) -> list[str] | None:
    """``classes``: None, a list of names, a folder (its sorted sub-folders, e.g. the train split) or a text file
    with one class name per line (in index order)."""
    if classes is None or isinstance(classes, (list, tuple)):
        return None if classes is None else [str(c) for c in classes]
    path = os.fspath(classes)
    if os.path.isdir(path):
        names = find_classes(path)
        if not names:
            raise UserError(f"--classes folder {path} has no class sub-folders")
        return names
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            names = [ln.split()[0] for ln in f if ln.strip() and not ln.startswith("#")]
        if not names:
            raise UserError(f"--classes file {path} lists no class names")
        return names
    raise InputNotFoundError(f"--classes path not found: {path} (give a folder with one sub-folder per class, "
                             f"e.g. the train split, or a text file with one class name per line)")


def _samples_from_label_file(src: str, label_file, classes) -> tuple[list[tuple[str, int]], list[str]]:
    pairs = parse_label_file(label_file)
    tokens = [t for _, t in pairs]
    is_int = [re.fullmatch(r"\d+", t) is not None for t in tokens]
    if all(is_int):
        labels = [int(t) for t in tokens]
        if classes is None:
            classes = [str(i) for i in range(max(labels) + 1)]
        if max(labels) >= len(classes):
            raise UserError(f"label {max(labels)} in {label_file} is out of range for {len(classes)} classes; labels "
                            f"must be 0-based indices into the class list (pass --classes to give the list)")
    elif not any(is_int):
        if classes is None:
            classes = sorted(set(tokens))
        idx = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(tokens) - idx.keys())
        if unknown:
            raise UserError(f"{len(unknown)} class names in {label_file} are not in the class list, e.g. "
                            f"{unknown[:5]}")
        labels = [idx[t] for t in tokens]
    else:
        bad = next(t for t, i in zip(tokens, is_int) if not i)
        raise UserError(f"label file {label_file} mixes class indices and class names (e.g. {bad!r}); "
                        f"{_LABEL_FORMAT}")

    samples, missing = [], []
    for (name, _), label in zip(pairs, labels):
        path = os.path.join(src, name)
        if not os.path.isfile(path):  # mmcls-style files may carry a prefix such as 'val/'
            alt = os.path.join(src, os.path.basename(name))
            if os.path.isfile(alt):
                path = alt
            else:
                missing.append(name)
                continue
        samples.append((path, label))
    if missing:
        raise InputNotFoundError(f"{len(missing)} of {len(pairs)} files listed in {label_file} are not in {src}, "
                                 f"e.g. {missing[:3]}; check SRC and the label file")
    listed = {os.path.abspath(p) for p, _ in samples}
    unlisted = sum(1 for f in os.listdir(src)
                   if is_image_file(f) and os.path.abspath(os.path.join(src, f)) not in listed)
    if unlisted:
        warnings.warn(f"{unlisted} images in {src} are not listed in {label_file} and are left out")
    return samples, classes


def _samples_from_class_folders(src: str, classes) -> tuple[list[tuple[str, int]], list[str]]:
    folders = find_classes(src)
    if not folders:
        n_img = sum(1 for f in os.listdir(src) if is_image_file(f))
        if n_img:
            raise UserError(f"{src} is a flat folder of {n_img} images: pass a label file (--label-file F, "
                            f"{_LABEL_FORMAT}), or arrange it as {src}/<class_name>/<image>")
        raise InputNotFoundError(f"no images in {src}: expected {src}/<class_name>/<image> or a flat folder with "
                                 f"a label file")
    if classes is None:
        classes = folders
    idx = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in folders if c not in idx]
    if unknown:
        raise UserError(f"class folders of {src} not in the given class list: {unknown[:5]}")
    samples = [(p, idx[c]) for c in folders for p in _scan_class_folder(os.path.join(src, c))]
    if not samples:
        raise InputNotFoundError(f"no images under {src} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return samples, classes


# --------------------------------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------------------------------
def _is_readable_image(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # header + structure check, much cheaper than a full decode
        return True
    except Exception:
        return False


def convert_to_lmdb(src, dst, label_file=None, map_size=None, progress=True, classes=None, verify=True,
                    overwrite=False) -> int:
    """Convert an image folder to a visionzoo LMDB at ``dst`` (a directory); return the number of records.

    ``src``: nested class folders ``src/<class>/**/<img>``, or (with ``label_file``) any folder with the files the
    label file names. ``classes``: class list, a folder whose sub-folders are the classes (pass the train split
    when converting val so the indices agree) or a text file; default: the sorted class folders / names, or
    ``0..max_label`` for index labels. ``verify`` skips files PIL cannot parse (warned and left out).
    ``map_size`` (bytes) defaults to an estimate from the file sizes and doubles on demand.
    """
    lmdb = _import_lmdb()
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise InputNotFoundError(f"source folder not found: {src}")
    replace = _check_destination(dst, overwrite)
    classes = _load_classes(classes)
    if label_file is not None:
        samples, classes = _samples_from_label_file(src, label_file, classes)
    else:
        samples, classes = _samples_from_class_folders(src, classes)

    if map_size is None:
        # Values above ~2 KB take whole 4 KB overflow pages, hence the per-record allowance; doubled if too small.
        total = sum(os.path.getsize(p) for p, _ in samples)
        map_size = int(total * 1.1) + 4608 * len(samples) + (16 << 20)
    # Written into a hidden sibling folder and renamed onto dst only when complete: an existing LMDB stays
    # readable (and intact, should the conversion fail or be interrupted) until the new one replaces it.
    tmp = _sibling(dst, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        n = _write_records(lmdb, tmp, src, dst, samples, classes, label_file, map_size, progress, verify)
        _publish(tmp, dst, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return n


class LMDBExistsError(FileExistsError, UserError):
    """The destination of ``to-lmdb`` already holds something (a ValueError too: the CLI shows it as one line)."""


def _sibling(dst: str, tag: str) -> str:
    parent, name = os.path.split(os.path.abspath(dst.rstrip(os.sep) or dst))
    return os.path.join(parent, f".{name}.{tag}{os.getpid()}")


def _check_destination(dst: str, overwrite: bool) -> bool:
    """Refuse a destination that is not ours to replace; True when an existing LMDB will be replaced."""
    if os.path.isfile(dst):
        raise LMDBExistsError(f"LMDB destination {dst} is a file; give a directory path, e.g. {dst}.lmdb")
    if not os.path.isdir(dst):
        return False
    if os.path.isfile(os.path.join(dst, "data.mdb")):
        if not overwrite:
            raise LMDBExistsError(f"an LMDB already exists at {dst}; pass --overwrite (overwrite=True) to replace "
                                  f"it, or give another DST")
        others = sorted(set(os.listdir(dst)) - {"data.mdb", "lock.mdb"})
        if others:  # replacing the folder would delete them
            raise LMDBExistsError(f"{dst} holds an LMDB and other files ({', '.join(others[:3])}); --overwrite "
                                  f"replaces only a folder holding nothing but data.mdb/lock.mdb: move them first")
        return True
    if os.listdir(dst):
        raise LMDBExistsError(f"LMDB destination {dst} is a folder that is not empty and holds no LMDB; give a new "
                              f"or empty directory path (nothing is overwritten there, not even with --overwrite)")
    return True  # an empty folder: replaced like an LMDB


def _publish(tmp: str, dst: str, replace: bool) -> None:
    """Rename the finished ``tmp`` onto ``dst``; an old LMDB there is moved aside first, then deleted."""
    if replace:
        _release_env(dst)  # our own reader of the old LMDB, if any
    publish_dir(tmp, dst, replace=replace)


def _write_records(lmdb, folder, src, dst, samples, classes, label_file, map_size, progress, verify) -> int:
    env = lmdb.open(folder, map_size=int(map_size), subdir=True, meminit=False, map_async=True)

    def put_all(items):
        while True:
            try:
                with env.begin(write=True) as txn:
                    for k, v in items:
                        txn.put(k, v)
                return
            except lmdb.MapFullError:  # the aborted transaction is retried with twice the map
                env.set_mapsize(env.info()["map_size"] * 2)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), unit="img", desc=f"to-lmdb {os.path.basename(dst.rstrip(os.sep)) or dst}")
    labels, skipped, batch = [], [], []
    try:
        for path, label in samples:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                ok = not verify or _is_readable_image(data)
            except OSError:
                ok = False
            rel = os.path.relpath(path, src).replace(os.sep, "/")
            if ok:
                batch.append((_record_key(len(labels)), _pack(rel, data)))
                labels.append(label)
            else:
                skipped.append(rel)
                warnings.warn(f"skipping unreadable image {path}", CorruptImageWarning)
            if len(batch) >= _BATCH:
                put_all(batch)
                batch = []
            if bar is not None:
                bar.update(1)
        meta = dict(format=FORMAT, version=VERSION, length=len(labels), classes=list(classes),
                    num_skipped=len(skipped), skipped=skipped[:100], source=os.path.abspath(src),
                    label_file=None if label_file is None else os.path.abspath(os.fspath(label_file)))
        batch.append((LABELS_KEY, np.asarray(labels, dtype="<i4").tobytes()))
        batch.append((META_KEY, json.dumps(meta).encode("utf-8")))  # last: marks the conversion complete
        put_all(batch)
        env.sync(True)
    finally:
        if bar is not None:
            bar.close()
        env.close()
    if not labels:
        raise NoReadableImagesError(f"no readable images in {src}: all {len(skipped)} files failed to parse "
                                    f"(e.g. {skipped[0]}); nothing was written to {dst}")
    return len(labels)


# --------------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------------
def _open_env(path: str):
    lmdb = _import_lmdb()
    # lock=False: read-only use, no writer; readahead=False: random access over a large file.
    return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, subdir=True, max_readers=512)


# LMDB forbids opening one environment twice in a process (py-lmdb raises), so all readers of a path in a process
# share one handle. A handle inherited through fork (DataLoader workers) must not be used: the child closes its
# copy (the parent's stays open) and opens its own.
_ENVS: dict = {}


def _shared_env(path: str):
    key, pid = os.path.realpath(path), os.getpid()
    hit = _ENVS.get(key)
    if hit is not None:
        if hit[0] == pid:
            return hit[1]
        try:
            hit[1].close()
        except Exception:
            pass
    env = _open_env(path)
    _ENVS[key] = (pid, env)
    return env


def _release_env(path: str) -> None:
    hit = _ENVS.pop(os.path.realpath(path), None)
    if hit is not None and hit[0] == os.getpid():
        hit[1].close()


def read_lmdb_meta(path, with_labels: bool = False) -> dict:
    """Metadata of a visionzoo LMDB (``labels`` added as a list of int when ``with_labels``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputNotFoundError(f"LMDB dataset not found: {path}")
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise InputNotFoundError(f"{path} is not an LMDB directory (no data.mdb); create one with "
                                 f"`visionzoo data to-lmdb SRC {path}`")
    try:
        env = _shared_env(path)
    except _import_lmdb().Error as e:  # a damaged or foreign data.mdb
        raise DataError(f"cannot open the LMDB at {path} ({type(e).__name__}: {e}); rebuild it with "
                        f"`visionzoo data to-lmdb SRC {path} --overwrite`") from None
    with env.begin() as txn:
        raw = txn.get(META_KEY)
        if raw is None:
            if txn.get(b"total") is not None:
                raise UserError(
                    f"{path} looks like an LMDB from GPViT's create_lmdb_dataset.py (file-name keys, no labels); "
                    f"rebuild it from the image folder with `visionzoo data to-lmdb SRC {path} --overwrite`")
            raise UserError(f"{path} is not a complete visionzoo LMDB (no metadata record: an interrupted "
                            f"conversion?); rebuild it with `visionzoo data to-lmdb SRC {path} --overwrite`")
        meta = json.loads(bytes(raw).decode("utf-8"))
        if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
            raise UserError(f"{path}: unsupported LMDB format {meta.get('format')!r} v{meta.get('version')}; "
                            f"this visionzoo reads {FORMAT} v{VERSION}")
        if with_labels:
            meta["labels"] = np.frombuffer(txn.get(LABELS_KEY), dtype="<i4").tolist()
    return meta


class LMDBDataset(RobustSampleMixin):
    """Reads a visionzoo LMDB. Each process (DataLoader workers included) opens its own read-only handle on first
    use, never one inherited through fork; corrupt records are skipped like in ``ImageFolderDataset``."""

    def __init__(self, path, transform=None, target_transform=None):
        self.root = os.fspath(path)
        meta = read_lmdb_meta(self.root, with_labels=True)
        self.classes = meta["classes"]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = meta["labels"]
        self.meta = {k: v for k, v in meta.items() if k != "labels"}
        self.transform = transform
        self.target_transform = target_transform
        self._skips = SkipTracker(len(self.targets))
        self._check_readable()

    def __len__(self) -> int:
        return len(self.targets)

    def _txn_get(self, i: int):
        with _shared_env(self.root).begin() as txn:
            buf = txn.get(_record_key(i))
        if buf is None:
            raise KeyError(f"record {i} missing")
        return _unpack(buf)

    def _load(self, i):
        return decode_image(self._txn_get(i)[1])

    def _describe(self, i):
        try:
            name = self._txn_get(i)[0]
        except Exception:
            name = f"record {i}"
        return f"{self.root}::{name}"

    def close(self):
        """Close this process's handle on the LMDB (shared by every reader of the same path)."""
        _release_env(self.root)

    def __repr__(self):
        return f"LMDBDataset(path={self.root!r}, samples={len(self)}, classes={len(self.classes)})"


# --------------------------------------------------------------------------------------------------------------
# CLI: visionzoo data to-lmdb SRC DST
# --------------------------------------------------------------------------------------------------------------
def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read size {text!r}: use bytes or a suffix K/M/G/T, e.g. 200G")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def add_arguments(parser) -> None:
    parser.add_argument("src", help="image folder: SRC/<class>/<image> (nested class folders), or a flat folder "
                                    "with --label-file")
    parser.add_argument("dst", help="output LMDB directory, e.g. data/val.lmdb")
    parser.add_argument("--label-file", default=None,
                        help="lines 'filename label' (label: 0-based class index or class name), e.g. an ImageNet "
                             "val list; file names are relative to SRC")
    parser.add_argument("--classes", default=None,
                        help="class list: a folder whose sub-folders are the classes (give the train split when "
                             "converting val) or a text file with one name per line")
    parser.add_argument("--map-size", default=None, help="LMDB map size, e.g. 200G (default: estimated, grown "
                                                         "on demand)")
    parser.add_argument("--no-verify", action="store_true", help="store files without checking they parse")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing LMDB at DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    n = convert_to_lmdb(args.src, args.dst, label_file=args.label_file,
                        map_size=None if args.map_size is None else _parse_size(args.map_size),
                        progress=not args.quiet, classes=args.classes, verify=not args.no_verify,
                        overwrite=args.overwrite)
    meta = read_lmdb_meta(args.dst)
    print(f"wrote {n} images in {len(meta['classes'])} classes to {args.dst}"
          + (f" ({meta['num_skipped']} unreadable files skipped)" if meta["num_skipped"] else ""))
    return 0
