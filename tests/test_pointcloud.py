"""Point-cloud classification: datasets, FPS, model forward, training (learning check, exact resume), CLI."""
import argparse
import csv
import dataclasses
import sys

import numpy as np
import pytest
import torch

from visionzoo.dense import pointcloud as pc
from visionzoo.models.context_cluster import farthest_point_sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------ datasets

def test_shapes_dataset_shapes_labels_and_determinism():
    a = pc.make_shapes("train", points=64, per_class=5, seed=3)
    b = pc.make_shapes("train", points=64, per_class=5, seed=3)
    k = len(pc.SHAPE_CLASSES)
    assert a.points.shape == (5 * k, 64, 3) and a.points.dtype == np.float32
    assert a.labels.dtype == np.int64 and np.bincount(a.labels).tolist() == [5] * k
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.allclose(a.points, pc.make_shapes("train", points=64, per_class=5, seed=4).points)
    test = pc.make_shapes("test", points=64, per_class=5, seed=3)
    assert not np.allclose(test.points, a.points)  # disjoint streams for the fixed split
    assert np.isfinite(a.points).all() and np.abs(a.points).max() < 2.5
    default = pc.make_shapes("train", points=8, seed=0), pc.make_shapes("test", points=8, seed=0)
    assert (len(default[0]), len(default[1])) == (64 * k, 16 * k)


def test_augment_is_the_official_scale_translate_shuffle():
    x = np.random.default_rng(0).normal(size=(4, 50, 3)).astype(np.float32)
    y = pc.augment(x, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    scale, shift = rng.uniform(2 / 3, 3 / 2, (4, 1, 3)), rng.uniform(-0.2, 0.2, (4, 1, 3))
    expected = x * scale + shift
    assert not np.allclose(y, expected)  # the points were reordered ...
    for i in range(4):  # ... but the set of points is the scaled, translated cloud
        np.testing.assert_allclose(np.sort(y[i], axis=0), np.sort(expected[i], axis=0), rtol=1e-5, atol=1e-6)
    assert (scale >= 2 / 3).all() and (scale <= 1.5).all()


def test_epoch_batches_drop_last_and_seeded():
    b1, _ = pc.epoch_batches(70, 32, seed=0, epoch=5)
    b2, _ = pc.epoch_batches(70, 32, seed=0, epoch=5)
    b3, _ = pc.epoch_batches(70, 32, seed=0, epoch=6)
    assert [len(b) for b in b1] == [32, 32]
    assert all((x == y).all() for x, y in zip(b1, b2)) and not all((x == y).all() for x, y in zip(b1, b3))
    assert len(set(np.concatenate(b1).tolist())) == 64


def _write_scanobjectnn(root, n_train=6, n_test=4):
    h5py = pytest.importorskip("h5py")
    split = root / "main_split"
    split.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for name, n in (("training", n_train), ("test", n_test)):
        pts = rng.normal(size=(n, 2048, 3)).astype(np.float32)
        lab = np.arange(n, dtype=np.uint8) % 15
        with h5py.File(split / f"{name}_objectdataset_augmentedrot_scale75.h5", "w") as f:
            f["data"], f["label"] = pts, lab
        data[name] = (pts, lab)
    return data


def test_scanobjectnn_reader_takes_the_first_points(tmp_path):
    data = _write_scanobjectnn(tmp_path)
    train = pc.load_scanobjectnn(tmp_path, "train", points=1024)
    test = pc.load_scanobjectnn(tmp_path / "main_split", "test", points=1024)  # the folder itself works too
    assert train.points.shape == (6, 1024, 3) and test.points.shape == (4, 1024, 3)
    np.testing.assert_array_equal(train.points, data["training"][0][:, :1024])
    np.testing.assert_array_equal(test.labels, data["test"][1].astype(np.int64))
    assert train.labels.dtype == np.int64 and len(train.classes) == 15
    cfg = pc.PointCloudConfig(dataset="scanobjectnn", data_dir=str(tmp_path), model_kwargs={"points": 512})
    tr, te = pc.load_data(cfg)
    assert tr.points.shape[1] == te.points.shape[1] == 512


def test_scanobjectnn_missing_files_and_missing_h5py_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="training_objectdataset_augmentedrot_scale75.h5.*"
                                                "test_objectdataset_augmentedrot_scale75.h5"):
        pc.load_scanobjectnn(tmp_path, "train")
    for f in pc.SCANOBJECTNN_FILES.values():
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install h5py"):
        pc.load_scanobjectnn(tmp_path, "test")
    with pytest.raises(ValueError, match="scanobjectnn:ROOT"):
        pc.parse_data("scanobjectnn")
    assert pc.parse_data("scanobjectnn:/x") == ("scanobjectnn", "/x") and pc.parse_data("shapes") == ("shapes", None)


# ------------------------------------------------------------------------------------------------ FPS

def _naive_fps(xyz: np.ndarray, npoint: int, start: int = 0) -> list:
    dist = np.full(len(xyz), np.inf)
    far, out = start, []
    for _ in range(npoint):
        out.append(far)
        dist = np.minimum(dist, ((xyz - xyz[far]) ** 2).sum(-1))
        far = int(np.argmax(dist))
    return out


def test_farthest_point_sample_matches_naive_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    xyz = torch.randn(3, 200, 3, generator=g, dtype=torch.float64)
    idx = farthest_point_sample(xyz, 40)
    assert idx.shape == (3, 40) and idx.dtype == torch.long
    assert (idx[:, 0] == 0).all()  # default first point: index 0 (as the CUDA pointnet2_ops kernel)
    for b in range(3):
        assert len(set(idx[b].tolist())) == 40
        assert idx[b].tolist() == _naive_fps(xyz[b].numpy(), 40)
    torch.testing.assert_close(farthest_point_sample(xyz, 40), idx, rtol=0, atol=0)
    # a seeded random start (the official fallback starts at a random point) is reproducible
    start = torch.randint(0, 200, (3,), generator=torch.Generator().manual_seed(7))
    idx2 = farthest_point_sample(xyz, 40, start=start)
    assert idx2[:, 0].tolist() == start.tolist()
    assert [idx2[b].tolist() for b in range(3)] == [_naive_fps(xyz[b].numpy(), 40, int(start[b])) for b in range(3)]
    # each pick is the point farthest from the ones before: min distance of picks is non-increasing
    d = torch.cdist(xyz[0, idx[0]], xyz[0, idx[0]])
    mins = torch.stack([d[i, :i].min() for i in range(1, 40)])
    assert (mins[1:] <= mins[:-1] + 1e-12).all()


# ------------------------------------------------------------------------------------------------ model / training

def _small_cfg(**kw):
    return pc.PointCloudConfig(dataset="shapes", model_kwargs=dict(pc.SMALL_MODEL_KWARGS), **kw)


def test_small_model_forward_on_shapes():
    torch.manual_seed(0)
    cfg = _small_cfg()
    data = pc.make_shapes("test", points=cfg.points, per_class=1)
    model = pc.build_model(cfg, len(pc.SHAPE_CLASSES)).eval()
    x = torch.from_numpy(data.points).transpose(1, 2)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (len(pc.SHAPE_CLASSES), len(pc.SHAPE_CLASSES)) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="at least 128 points"):
        model(x[:, :, :64])


def test_smooth_ce_is_pointmlp_cal_loss():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    # PointMLP's form = torch's label_smoothing with eps * K / (K - 1)
    ref = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2 * 4 / 3)
    torch.testing.assert_close(pc.smooth_ce(logits, y, 0.2), ref)
    m = pc.classification_metrics(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 0, 0, 1, 2]), 4)
    assert m["oa"] == pytest.approx(0.8) and m["macc"] == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_short_cpu_training_beats_chance(tmp_path):
    cfg = _small_cfg(epochs=12, batch_size=16, lr=0.02, min_lr=2e-4)
    data = pc.make_shapes("train", cfg.points, per_class=16), pc.make_shapes("test", cfg.points, per_class=8)
    s = pc.train(cfg, tmp_path, data=data, log=lambda *_: None)
    chance = 1 / len(pc.SHAPE_CLASSES)
    assert s["best_oa"] >= 2.4 * chance and s["best_oa_macc"] >= 2.4 * chance, s
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 12 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[0]["lr"]) == pytest.approx(0.02) and float(rows[-1]["lr"]) < 0.001  # cosine per epoch
    assert (tmp_path / "best.pth").is_file() and not list(tmp_path.glob("*.tmp"))


def test_resume_is_exact(tmp_path):
    kw = dict(pc.SMALL_MODEL_KWARGS, points=64)
    cfg = pc.PointCloudConfig(dataset="shapes", model_kwargs=kw, epochs=2, batch_size=8)
    data = pc.make_shapes("train", 64, per_class=3), pc.make_shapes("test", 64, per_class=1)
    quiet = dict(data=data, log=lambda *_: None)
    full = pc.train(cfg, tmp_path / "full", **quiet)

    class Crash(Exception):
        pass

    def crash_after_first_epoch(msg):  # logged after the epoch's checkpoint is written: a kill at that point
        if msg.startswith("epoch 0"):
            raise Crash

    with pytest.raises(Crash):
        pc.train(cfg, tmp_path / "part", data=data, log=crash_after_first_epoch)
    resumed = pc.train(cfg, tmp_path / "part", resume=str(tmp_path / "part"), **quiet)
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pth", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert full["last"]["train_loss"] == resumed["last"]["train_loss"]
    assert len(list(csv.DictReader(open(tmp_path / "part" / "metrics.csv")))) == 2
    with pytest.raises(ValueError, match="seed"):
        pc.train(dataclasses.replace(cfg, epochs=3, seed=1), tmp_path / "part", resume=str(tmp_path / "part"), **quiet)


# ------------------------------------------------------------------------------------------------ recipes / CLI

def _parse(argv):
    p = argparse.ArgumentParser()
    pc.add_arguments(p)
    return p.parse_args(argv)


def test_recipes_load_and_cli_overrides():
    from visionzoo.engine.config import list_recipes, load_config

    names = [n for n in list_recipes() if n.startswith("pointcloud/")]
    assert set(names) == {"pointcloud/coc_pointmlp_scanobjectnn", "pointcloud/coc_pointmlp_shapes_cpu"}
    off = pc.PointCloudConfig.from_yaml("pointcloud/coc_pointmlp_scanobjectnn")
    assert (off.lr, off.momentum, off.weight_decay, off.min_lr, off.epochs, off.batch_size, off.smoothing,
            off.points) == (0.01, 0.9, 1e-4, 1e-4, 250, 32, 0.2, 1024)
    assert off == dataclasses.replace(pc.PointCloudConfig(), num_classes=15, notes=off.notes,
                                   model_kwargs={"points": 1024})  # defaults = official
    for n in names:  # `visionzoo train` refuses them with a pointer to the right command
        with pytest.raises(ValueError, match="visionzoo pointcloud"):
            load_config(n)
    cfg = pc.config_from_args(_parse(["--recipe", "pointcloud/coc_pointmlp_scanobjectnn", "--data", "shapes",
                                      "--epochs", "3", "--points", "256", "--seed", "5", "--small"]))
    assert (cfg.dataset, cfg.epochs, cfg.points, cfg.seed, cfg.model_kwargs["embed_dim"]) == ("shapes", 3, 256, 5, 16)


def test_cli_reports_missing_data_clearly(tmp_path, capsys):
    rc = pc.run(_parse(["--data", f"scanobjectnn:{tmp_path}", "--out", str(tmp_path / "o"), "--device", "cpu"]))
    assert rc == 2 and "main_split" in capsys.readouterr().err
    assert pc.run(_parse(["--out", str(tmp_path / "o"), "--device", "cpu"])) == 2
    assert "--data scanobjectnn:ROOT" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_shapes_run(tmp_path):
    rc = pc.run(_parse(["--recipe", "pointcloud/coc_pointmlp_shapes_cpu", "--epochs", "1", "--points", "64",
                        "--out", str(tmp_path), "--device", "cpu", "--threads", "1"]))
    assert rc == 0 and (tmp_path / "summary.json").is_file()
