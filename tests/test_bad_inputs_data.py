"""Bad data inputs (issue 15, data part): each one is decoded correctly, or refused with one line that names it.

Decoding: 16-bit and other non-RGB PNG/TIFF modes survive as 8-bit RGB (checked on real pixel values).
Refusals through the CLI: exit code 2, no traceback, the message names the input and the fix.
"""
import io
import os
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from visionzoo.cli import main
from visionzoo.data.datasets import (
    CorruptImageWarning, ImageFolderDataset, NoReadableImagesError, build_dataset, write_digits_folder,
)
from visionzoo.data.image_io import decode_image

RAMP16 = np.linspace(0, 65535, 256).round().astype(np.uint16)  # 0, 257, 514, ... 65535: exactly 0..255 x 257


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB / gray+alpha): color_type 0 gray, 2 RGB, 4 LA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


def _assert_one_clear_error(code, text, *names):
    assert code == 2, text
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    for name in names:
        assert str(name) in lines[0], (name, text)


# ---------------------------------------------------------------------------------------------------------------
# Decoding: every mode to 8-bit RGB, scaled, never clipped
# ---------------------------------------------------------------------------------------------------------------
def test_16bit_gray_png_ramp_survives_decoding(tmp_path):
    path = tmp_path / "ramp16.png"
    Image.fromarray(np.tile(RAMP16, (4, 1))).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file, as PIL opens it
    img = decode_image(str(path))
    a = np.asarray(img)
    assert img.mode == "RGB" and a.dtype == np.uint8 and a.shape == (4, 256, 3)
    assert np.array_equal(a[0, :, 0], np.arange(256))  # 0..65535 -> 0..255, not saturated at 255
    assert (a == a[..., :1]).all()  # gray: the three channels agree
    assert (a == 255).mean() < 0.01


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes_in_tiff(mode):
    arr = np.tile(RAMP16, (2, 1))
    if mode == "I":
        img = Image.fromarray(arr.astype(np.int32))
    else:
        img = Image.frombytes(mode, (256, 2), arr.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    data = _encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    assert np.array_equal(np.asarray(decode_image(data))[1, :, 1], np.arange(256))


def test_float_images_scaled_and_nan_skipped_with_a_warning(tmp_path):
    unit = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (2, 1))
    assert np.array_equal(np.asarray(decode_image(_encode(Image.fromarray(unit), "TIFF")))[0, :, 0], np.arange(256))
    eight_bit = unit * 255
    assert np.array_equal(np.asarray(decode_image(_encode(Image.fromarray(eight_bit), "TIFF")))[0, :, 2],
                          np.arange(256))
    wide = (unit - 0.5) * 1e6  # no fixed range: the image's own min..max
    assert np.array_equal(np.asarray(decode_image(_encode(Image.fromarray(wide), "TIFF")))[0, :, 0], np.arange(256))
    # A NaN image cannot be shown: the folder reader skips it with a warning naming the file.
    nan = unit.copy()
    nan[0, 0] = np.nan
    (tmp_path / "c").mkdir()
    Image.fromarray(nan).save(tmp_path / "c" / "a_nan.tif")
    Image.fromarray(np.tile(RAMP16, (2, 1))).save(tmp_path / "c" / "b_ok.png")
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(CorruptImageWarning, match=r"a_nan\.tif.*NaN"):
        img, _ = ds[0]
    assert np.array_equal(np.asarray(img)[0, :, 0], np.arange(256)) and ds.num_skipped == 1


def test_16bit_rgb_and_gray_alpha_pngs():
    ramp = np.tile(RAMP16, (2, 1))
    rgb = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 32896)], -1)  # 32896 = 128 x 257
    a = np.asarray(decode_image(_png16(rgb, 2)))
    assert np.array_equal(a[0, :, 0], np.arange(256)) and np.array_equal(a[0, :, 1], np.arange(256)[::-1])
    assert (a[..., 2] == 128).all()
    la = np.stack([ramp, np.full_like(ramp, 65535)], -1)
    a = np.asarray(decode_image(_png16(la, 4)))
    assert a.shape == (2, 256, 3) and np.array_equal(a[0, :, 0], np.arange(256))


def test_other_modes_convert_to_rgb():
    gray = np.tile(np.arange(256, dtype=np.uint8), (2, 1))
    la = Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA")
    assert np.array_equal(np.asarray(decode_image(_encode(la, "PNG")))[0, :, 1], np.arange(256))
    pal = Image.fromarray(gray).convert("P")
    pal.info["transparency"] = 0
    assert np.array_equal(np.asarray(decode_image(_encode(pal, "PNG")))[0, :, 0], np.arange(256))
    bits = Image.fromarray((gray > 127).astype(np.uint8) * 255).convert("1")
    assert set(np.unique(np.asarray(decode_image(_encode(bits, "PNG"))))) == {0, 255}
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # full magenta + yellow: red
    assert np.asarray(decode_image(_encode(cmyk, "TIFF")))[0, 0].tolist() == [255, 0, 0]


def test_16bit_png_through_folder_and_lmdb_readers(tmp_path):
    pytest.importorskip("lmdb")
    from visionzoo.data.lmdb import LMDBDataset, convert_to_lmdb

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.fromarray(np.tile(RAMP16, (4, 1))).save(tmp_path / "train" / c / "x.png")
    folder = build_dataset("folder", tmp_path, "train", None)
    convert_to_lmdb(tmp_path / "train", tmp_path / "lm" / "train.lmdb", progress=False)
    lm = LMDBDataset(tmp_path / "lm" / "train.lmdb")
    for ds in (folder, lm):
        assert np.array_equal(np.asarray(ds[1][0])[2, :, 0], np.arange(256)), ds
    lm.close()


# ---------------------------------------------------------------------------------------------------------------
# A data folder in which every image is unreadable
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def junk_root(tmp_path):
    root = tmp_path / "junk"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                (root / split / c / f"{i}.png").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    return root


def test_all_unreadable_folder_fails_when_built(junk_root):
    with pytest.raises(NoReadableImagesError, match=r"no readable image in .*junk.train: all 4 files.*0\.png"):
        ImageFolderDataset(junk_root / "train")
    assert issubclass(NoReadableImagesError, ValueError)


def test_all_unreadable_folder_one_line_in_every_command(junk_root, tmp_path, capsys):
    train_dir = junk_root / "train"
    for argv in (
        ["train", junk_root, "--dataset", "folder", "--model", "coc_test", "--epochs", "1", "-j", "0",
         "--output", tmp_path / "runs"],
        ["validate", "coc_test", "--dataset", "folder", "--data-dir", junk_root, "--workers", "0"],
        ["knn", "--model", "coc_test", "--data", junk_root],
        ["linear", "--model", "coc_test", "--data", junk_root, "--output", tmp_path / "lin"],
    ):
        code, text = _run(capsys, *argv)
        where = junk_root / "val" if argv[0] == "validate" else train_dir
        _assert_one_clear_error(code, text, where, "no readable image")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("train_state.pt"))


def test_a_few_unreadable_images_are_still_skipped_not_refused(tmp_path):
    root = write_digits_folder(tmp_path / "d", img_size=8, max_per_class=1)
    first = ImageFolderDataset(os.path.join(root, "train")).samples[0][0]
    open(first, "wb").write(b"junk")
    ds = ImageFolderDataset(os.path.join(root, "train"))  # the probe finds a readable one: no error
    with pytest.warns(CorruptImageWarning, match=os.path.basename(first)):
        _, label = ds[0]
    assert label == ds.targets[1] and ds.num_skipped == 1


def test_val_split_missing_a_class_is_refused(tmp_path, capsys):
    root = write_digits_folder(tmp_path / "d", img_size=8, max_per_class=1)
    shutil.rmtree(os.path.join(root, "val", "3"))  # every val label above 3 would shift by one
    code, text = _run(capsys, "knn", "--model", "coc_test", "--data", root)
    _assert_one_clear_error(code, text, os.path.join(root, "val"), "lacks ['3']")


# ---------------------------------------------------------------------------------------------------------------
# visionzoo data to-lmdb onto an existing LMDB
# ---------------------------------------------------------------------------------------------------------------
def test_to_lmdb_overwrite(tmp_path, capsys):
    pytest.importorskip("lmdb")
    from visionzoo.data.lmdb import LMDBDataset

    root = write_digits_folder(tmp_path / "d", img_size=8, max_per_class=2)
    dst = tmp_path / "out" / "train.lmdb"
    code, text = _run(capsys, "data", "to-lmdb", os.path.join(root, "val"), dst, "--quiet")
    assert code == 0 and "wrote 20 images in 10 classes" in text
    # Again without --overwrite: one line that names DST and the flag the parser really has.
    code, text = _run(capsys, "data", "to-lmdb", os.path.join(root, "train"), dst, "--quiet")
    _assert_one_clear_error(code, text, dst, "--overwrite")
    # A failed replacement (no readable image) leaves the old LMDB as it was, and no temp folder behind.
    junk = tmp_path / "junk" / "a"
    junk.mkdir(parents=True)
    (junk / "x.png").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, text = _run(capsys, "data", "to-lmdb", junk.parent, dst, "--quiet", "--overwrite")
    _assert_one_clear_error(code, text, junk.parent, "no readable images")
    assert len(LMDBDataset(dst)) == 20
    # --overwrite replaces it (the new records are the train split's, in the sorted class order).
    code, text = _run(capsys, "data", "to-lmdb", os.path.join(root, "train"), dst, "--quiet", "--overwrite")
    assert code == 0, text
    ds = LMDBDataset(dst)
    assert len(ds) == 20 and ds.meta["source"] == os.path.abspath(os.path.join(root, "train"))
    assert sorted(os.listdir(dst.parent)) == ["train.lmdb"]
    ds.close()
    # A folder that is not an LMDB is never replaced, not even with --overwrite.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, text = _run(capsys, "data", "to-lmdb", os.path.join(root, "val"), other, "--quiet", "--overwrite")
    _assert_one_clear_error(code, text, other, "not empty")
    assert (other / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# --num-classes 0 / negative / fewer than the data's
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-3"])
def test_num_classes_zero_or_negative_is_refused(value, tmp_path, capsys):
    code, text = _run(capsys, "train", "--model", "coc_test", "--epochs", "1", "-j", "0", "--num-classes", value,
                      "--output", tmp_path / "runs")
    _assert_one_clear_error(code, text, "--num-classes", value, "leave it out")


def test_num_classes_below_the_datas_is_refused(tmp_path, capsys):
    code, text = _run(capsys, "train", "--model", "coc_test", "--epochs", "1", "-j", "0", "--num-classes", "4",
                      "--output", tmp_path / "runs")
    _assert_one_clear_error(code, text, "--num-classes 4", "10 classes")


def test_num_classes_unset_means_from_the_data():
    from visionzoo.engine.config import TrainConfig

    TrainConfig(num_classes=None).check()
    TrainConfig(num_classes=12).check()


# ---------------------------------------------------------------------------------------------------------------
# More of the same kind: a damaged LMDB, a label file that is not text
# ---------------------------------------------------------------------------------------------------------------
def test_garbage_lmdb_and_binary_label_file(tmp_path, capsys):
    pytest.importorskip("lmdb")
    bad = tmp_path / "data" / "val.lmdb"
    bad.mkdir(parents=True)
    (bad / "data.mdb").write_bytes(b"\x00garbage" * 100)
    code, text = _run(capsys, "validate", "coc_test", "--dataset", "lmdb", "--data-dir", tmp_path / "data")
    _assert_one_clear_error(code, text, bad, "--overwrite")
    root = write_digits_folder(tmp_path / "d", img_size=8, max_per_class=1)
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xff\xfe\x00binary")
    code, text = _run(capsys, "data", "to-lmdb", os.path.join(root, "val", "0"), tmp_path / "x.lmdb",
                      "--label-file", labels, "--quiet")
    _assert_one_clear_error(code, text, labels, "UTF-8")
