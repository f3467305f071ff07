"""Data layer: embedded digits, ImageFolder with corrupt-image skipping, data-dir errors, LMDB, transforms."""
import argparse
import copy
import os
import shutil
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo.data.datasets import (
    CorruptImageWarning, DigitsDataset, ImageFolderDataset, build_dataset, check_data_dir, write_digits_folder,
)
from visionzoo.data.lmdb import LMDBDataset, convert_to_lmdb, read_lmdb_meta
from visionzoo.data import lmdb as vz_lmdb

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """Small digits ImageFolder tree: 3 images per class in train and in val."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"), img_size=32, max_per_class=3)


def _copy_tree(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _corrupt(root):
    """Replace one file with garbage and truncate another (valid header, missing pixel data); return both paths."""
    ds = ImageFolderDataset(root)
    garbage, truncated = ds.samples[1][0], ds.samples[7][0]
    with open(garbage, "wb") as f:
        f.write(b"this is not an image")
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    return garbage, truncated


def _as_array(img):
    return np.asarray(img)


# ---------------------------------------------------------------------------------------------------------------
# Embedded digits
# ---------------------------------------------------------------------------------------------------------------
def test_digits_split_sizes_and_determinism():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert (len(train), len(val)) == (1437, 360)
    assert np.bincount(val.targets).tolist() == [36] * 10
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(1797))
    assert train.classes == [str(i) for i in range(10)] and len(set(train.targets)) == 10
    # Pinned: the split must be the same on every machine and numpy version.
    assert val.indices[:5].tolist() == [3, 7, 13, 19, 36] and int(val.indices.sum()) == 312284
    assert np.array_equal(DigitsDataset("val").indices, val.indices)
    img, label = val[0]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 3
    arr = _as_array(img)
    assert arr.max() > 200 and arr.min() < 30  # real ink on a dark background, not a blank image
    big, _ = DigitsDataset("val", img_size=64)[0]
    assert big.size == (64, 64)


def test_digits_source_matches_sklearn():
    from sklearn.datasets import load_digits

    from visionzoo.data.datasets import _load_sklearn_digits

    images, labels = _load_sklearn_digits()
    ref = load_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(labels, ref.target)


def test_digits_bad_split():
    with pytest.raises(ValueError, match="train, val"):
        DigitsDataset("test")


def test_write_digits_folder_matches_torchvision_imagefolder(digits_root):
    from torchvision.datasets import ImageFolder

    ds, ref = ImageFolderDataset(os.path.join(digits_root, "train")), ImageFolder(os.path.join(digits_root, "train"))
    assert ds.classes == ref.classes == [str(i) for i in range(10)]
    assert ds.samples == ref.samples and ds.targets == ref.targets and len(ds) == 30
    assert len(ImageFolderDataset(os.path.join(digits_root, "val"))) == 30
    # The PNG holds the same pixels as the embedded dataset, under its load_digits index.
    path, label = ds.samples[0]
    digits = DigitsDataset("train")
    pos = digits.indices.tolist().index(int(os.path.basename(path)[:4]))
    assert digits.targets[pos] == label
    assert np.array_equal(_as_array(ds[0][0]), _as_array(digits[pos][0]))


# ---------------------------------------------------------------------------------------------------------------
# Corrupt images
# ---------------------------------------------------------------------------------------------------------------
def test_corrupt_images_skipped_warned_and_counted(digits_root, tmp_path):
    root = _copy_tree(os.path.join(digits_root, "train"), tmp_path / "train")
    garbage, truncated = _corrupt(root)
    ds = ImageFolderDataset(root)
    with pytest.warns(CorruptImageWarning, match=os.path.basename(garbage)):
        img, label = ds[1]
    # The next readable sample is substituted.
    assert label == ds.targets[2] and np.array_equal(_as_array(img), _as_array(ds[2][0]))
    with pytest.warns(CorruptImageWarning, match=os.path.basename(truncated)):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == len(ds) and all(im.size == (32, 32) for im, _ in items)
    assert ds.num_skipped == 2 and sorted(ds.skipped_files) == sorted([garbage, truncated])
    with warnings.catch_warnings():  # warned once per file: a second epoch is silent
        warnings.simplefilter("error", CorruptImageWarning)
        [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2
    clone = copy.deepcopy(ds)  # the shared counter survives pickling outside worker start-up
    assert clone.num_skipped == 2


def test_corrupt_images_counted_across_workers(digits_root, tmp_path):
    from torchvision.transforms import ToTensor

    root = _copy_tree(os.path.join(digits_root, "train"), tmp_path / "train")
    garbage, truncated = _corrupt(root)
    ds = ImageFolderDataset(root, transform=ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    n = sum(x.shape[0] for x, _ in loader)
    assert n == len(ds)
    assert ds.num_skipped == 2 and sorted(ds.skipped_files) == sorted([garbage, truncated])


def test_all_corrupt_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    # Refused when the dataset is built (one user error naming the folder), not at the first batch.
    with pytest.raises(ValueError, match=f"no readable image in {tmp_path}"):
        ImageFolderDataset(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Missing / empty data
# ---------------------------------------------------------------------------------------------------------------
def test_missing_and_empty_data_dir_errors(tmp_path, digits_root):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        check_data_dir(missing, "train")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_dataset("folder", str(missing), "train", None)
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty.*<class_name>"):
        check_data_dir(tmp_path / "data", "train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data" / "val")):
        check_data_dir(tmp_path / "data", "val")
    (tmp_path / "data" / "train" / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        check_data_dir(tmp_path / "data", "train")
    flat = tmp_path / "flat" / "val"
    flat.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(ValueError, match=r"no class sub-folders.*<class_name>.*--label-file"):
        check_data_dir(tmp_path / "flat", "val")
    with pytest.raises(ValueError, match="data_dir"):
        build_dataset("folder", None, "train", None)
    assert check_data_dir(digits_root, "val") == os.path.join(digits_root, "val")


def test_build_dataset_names(digits_root):
    with pytest.raises(ValueError, match=r"did you mean 'folder'.*digits, folder, lmdb"):
        build_dataset("foldr", digits_root, "train", None)
    ds = build_dataset("digits", None, "val", None, img_size=32)
    assert isinstance(ds, DigitsDataset) and len(ds) == 360
    ds = build_dataset("auto", digits_root, "train", None)
    assert isinstance(ds, ImageFolderDataset) and ds.classes == [str(i) for i in range(10)]


# ---------------------------------------------------------------------------------------------------------------
# LMDB
# ---------------------------------------------------------------------------------------------------------------
def test_lmdb_round_trip_nested(digits_root, tmp_path):
    src = os.path.join(digits_root, "train")
    folder = ImageFolderDataset(src)
    n = convert_to_lmdb(src, tmp_path / "train.lmdb", progress=False)
    assert n == len(folder)
    ds = LMDBDataset(tmp_path / "train.lmdb")
    assert ds.classes == folder.classes and ds.targets == folder.targets and len(ds) == n
    for i in (0, 13, n - 1):
        name, data = ds._txn_get(i)
        assert data == open(folder.samples[i][0], "rb").read()  # original bytes, not re-encoded
        assert name == os.path.relpath(folder.samples[i][0], src).replace(os.sep, "/")
        assert np.array_equal(_as_array(ds[i][0]), _as_array(folder[i][0])) and ds[i][1] == folder[i][1]
    # build_dataset finds <root>/train.lmdb, explicitly and by auto-detection.
    assert isinstance(build_dataset("lmdb", tmp_path, "train", None), LMDBDataset)
    assert isinstance(build_dataset("auto", tmp_path, "train", None), LMDBDataset)
    with pytest.raises(FileNotFoundError, match="val.lmdb"):
        build_dataset("lmdb", tmp_path, "val", None)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_to_lmdb(src, tmp_path / "train.lmdb", progress=False)
    assert convert_to_lmdb(src, tmp_path / "train.lmdb", progress=False, overwrite=True) == n


def _flat_val(digits_root, dst):
    """Flat folder of the val images plus (file name, class name) pairs, like ImageNet val."""
    val = ImageFolderDataset(os.path.join(digits_root, "val"))
    os.makedirs(dst)
    pairs = []
    for k, (path, label) in enumerate(val.samples):
        name = f"VAL_{k:05d}.png"
        shutil.copy(path, os.path.join(dst, name))
        pairs.append((name, val.classes[label]))
    return val, pairs


def test_lmdb_flat_folder_with_label_file(digits_root, tmp_path):
    flat = tmp_path / "val"
    val, pairs = _flat_val(digits_root, flat)
    # index labels, mmcls style with a 'val/' prefix, class list taken from the train folder
    (tmp_path / "idx.txt").write_text("".join(f"val/{n} {int(c)}\n" for n, c in pairs))
    n = convert_to_lmdb(flat, tmp_path / "a.lmdb", label_file=tmp_path / "idx.txt", progress=False,
                        classes=os.path.join(digits_root, "train"))
    ds = LMDBDataset(tmp_path / "a.lmdb")
    assert n == len(val) and ds.targets == val.targets and ds.classes == val.classes
    assert np.array_equal(_as_array(ds[5][0]), _as_array(val[5][0]))
    # class-name labels, comma separated
    (tmp_path / "names.csv").write_text("".join(f"{n},{c}\n" for n, c in pairs))
    convert_to_lmdb(flat, tmp_path / "b.lmdb", label_file=tmp_path / "names.csv", progress=False)
    ds = LMDBDataset(tmp_path / "b.lmdb")
    assert ds.targets == val.targets and ds.classes == val.classes


def test_lmdb_converter_errors(digits_root, tmp_path):
    flat = tmp_path / "val"
    _, pairs = _flat_val(digits_root, flat)
    with pytest.raises(ValueError, match="flat folder.*--label-file"):
        convert_to_lmdb(flat, tmp_path / "x.lmdb", progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_text("VAL_00000.png 1 extra junk\n")
    with pytest.raises(ValueError, match="line 1.*'filename label'"):
        convert_to_lmdb(flat, tmp_path / "x.lmdb", label_file=bad, progress=False)
    bad.write_text(f"{pairs[0][0]} 1\n{pairs[1][0]} cat\n")
    with pytest.raises(ValueError, match="mixes class indices and class names"):
        convert_to_lmdb(flat, tmp_path / "x.lmdb", label_file=bad, progress=False)
    bad.write_text("missing.png 1\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        convert_to_lmdb(flat, tmp_path / "x.lmdb", label_file=bad, progress=False)
    bad.write_text(f"{pairs[0][0]} 10\n")
    with pytest.raises(ValueError, match="out of range for 10 classes"):
        convert_to_lmdb(flat, tmp_path / "x.lmdb", label_file=bad, progress=False,
                        classes=os.path.join(digits_root, "train"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert_to_lmdb(tmp_path / "nowhere", tmp_path / "x.lmdb", progress=False)


def test_lmdb_corrupt_records_and_workers(digits_root, tmp_path):
    from torchvision.transforms import ToTensor

    src = _copy_tree(os.path.join(digits_root, "train"), tmp_path / "train")
    garbage, _ = _corrupt(src)
    # verify=True leaves unparseable files out, with a warning
    with pytest.warns(CorruptImageWarning) as rec:
        n = convert_to_lmdb(src, tmp_path / "checked.lmdb", progress=False)
    assert any(os.path.basename(garbage) in str(w.message) for w in rec)
    assert n == 28 and read_lmdb_meta(tmp_path / "checked.lmdb")["num_skipped"] == 2  # PNG CRCs catch the truncation
    # verify=False stores them; the reader skips and counts them, across 2 DataLoader workers
    assert convert_to_lmdb(src, tmp_path / "raw.lmdb", progress=False, verify=False) == 30
    ds = LMDBDataset(tmp_path / "raw.lmdb", transform=ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert labels.numel() == 30 and ds.num_skipped == 2
    assert any(f.endswith(os.path.basename(garbage)) for f in ds.skipped_files)
    # readable records come back in order with their labels
    ok = [i for i in range(30) if i not in (1, 7)]
    assert labels[ok].tolist() == [ds.targets[i] for i in ok]


def test_lmdb_foreign_and_missing(tmp_path, monkeypatch):
    import lmdb

    env = lmdb.open(str(tmp_path / "gpvit"), map_size=1 << 20)
    with env.begin(write=True) as txn:  # layout of GPViT's create_lmdb_dataset.py
        txn.put(b"n01440764_10026.JPEG", b"...")
        txn.put(b"total", b"1")
    env.close()
    with pytest.raises(ValueError, match="create_lmdb_dataset.py.*to-lmdb"):
        LMDBDataset(tmp_path / "gpvit")
    with pytest.raises(FileNotFoundError, match="no data.mdb"):
        LMDBDataset(tmp_path)
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(ImportError, match=r"pip install 'visionzoo\[lmdb\]'"):
        convert_to_lmdb(tmp_path, tmp_path / "y.lmdb")


def test_lmdb_cli(digits_root, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    vz_lmdb.add_arguments(parser)
    args = parser.parse_args([os.path.join(digits_root, "val"), str(tmp_path / "val.lmdb"), "--quiet",
                              "--map-size", "1M"])  # too small on purpose: the map grows on demand
    assert vz_lmdb.run(args) == 0
    assert "wrote 30 images in 10 classes" in capsys.readouterr().out
    assert len(LMDBDataset(tmp_path / "val.lmdb")) == 30


# ---------------------------------------------------------------------------------------------------------------
# Transforms and mixup
# ---------------------------------------------------------------------------------------------------------------
def test_train_transform_shapes():
    from visionzoo.data.transforms import build_train_transform

    img = DigitsDataset("val")[0][0]
    tf = build_train_transform(32, aa="rand-m9-mstd0.5-inc1", reprob=0.25, scale=(0.35, 1.0), hflip=0.0)
    outs = [tf(img) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outs)
    assert not torch.equal(outs[0], outs[1])  # random
    assert build_train_transform(48)(img).shape == (3, 48, 48)


def test_eval_transform_follows_pretrained_cfg():
    from visionzoo.data.transforms import build_eval_transform, resolve_eval_config

    cfg = dict(input_size=(3, 48, 48), crop_pct=0.75, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    model = types.SimpleNamespace(pretrained_cfg=cfg)
    img = Image.new("RGB", (100, 80), (255, 0, 0))
    out = build_eval_transform(model)(img)
    assert out.shape == (3, 48, 48) and torch.allclose(out[0], torch.ones(48, 48))  # mean/std 0.5: red -> 1
    resolved = resolve_eval_config(types.SimpleNamespace(module=model))  # DDP-style wrapper
    assert resolved["crop_pct"] == 0.75 and resolved["interpolation"] == "bilinear"
    assert build_eval_transform(model, img_size=32, crop_pct=1.0)(img).shape == (3, 32, 32)
    assert build_eval_transform(img_size=24)(img).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="img_size"):
        build_eval_transform()


def test_build_mixup():
    from visionzoo.data.transforms import build_mixup

    assert build_mixup(dict(mixup=0.0, cutmix=0.0)) is None
    mix = build_mixup(types.SimpleNamespace(mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,
                                            smoothing=0.1, num_classes=10))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    xm, ym = mix(x, y)
    assert xm.shape == x.shape and ym.shape == (4, 10)
    assert torch.allclose(ym.sum(1), torch.ones(4)) and ym.max() < 1.0
