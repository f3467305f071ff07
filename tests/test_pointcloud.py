"""Point-cloud classification: datasets, FPS, model forward, training on the engine (learning check, exact resume
mid-epoch, NaN stop, refused reuse), export, evaluation of new and old checkpoints, malicious pickles, CLI."""
import argparse
import csv
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from visionzoo.dense import pointcloud as pc
from visionzoo.engine.loop import NonFiniteLossError
from visionzoo.engine.sampling import SeededDataset
from visionzoo.engine.state import RunFolderError, load_train_state
from visionzoo.models.coc_pointmlp import farthest_point_sample
from visionzoo.tasks import pointcloud as pctask
from visionzoo.testing.unsafe import RunsCodeWhenUnpickled

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
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.random.seed(1)  # per item, augment draws from numpy's global RNG (seeded by the loop)
    y = pc.augment(x)
    np.random.seed(1)
    scale, shift = np.random.uniform(2 / 3, 3 / 2, (1, 3)), np.random.uniform(-0.2, 0.2, (1, 3))
    expected = x * scale + shift
    assert y.dtype == np.float32 and y.shape == x.shape
    assert not np.allclose(y, expected)  # the points were reordered ...
    # ... but the set of points is the scaled, translated cloud
    np.testing.assert_allclose(np.sort(y, axis=0), np.sort(expected, axis=0), rtol=1e-5, atol=1e-6)
    assert (scale >= 2 / 3).all() and (scale <= 1.5).all()
    np.testing.assert_array_equal(pc.augment(x, np.random.default_rng(3)), pc.augment(x, np.random.default_rng(3)))


def test_train_items_are_a_function_of_seed_epoch_index():
    split = pc.make_shapes("train", points=32, per_class=2)
    items = SeededDataset(pctask.PointCloudItems(split, train=True), seed=4)
    items.epoch = 1
    (a, la), (b, lb) = items[3], items[3]
    assert a.shape == (3, 32) and a.dtype == torch.float32 and la == lb == int(split.labels[3])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    items.epoch = 2
    assert not torch.allclose(items[3][0], a)  # another epoch, another augmentation
    test = pctask.PointCloudItems(split, train=False)[3][0]
    torch.testing.assert_close(test, torch.from_numpy(split.points[3].T.copy()), rtol=0, atol=0)


def test_schedule_is_the_per_epoch_cosine_annealing():
    f = pctask.cosine_epoch_factor(0.02, 2e-4, epochs=4, steps_per_epoch=3)
    lrs = [0.02 * f(s) for s in range(12)]
    assert lrs[:3] == [pytest.approx(0.02)] * 3 and lrs[3:6] == [lrs[3]] * 3  # constant within an epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4, eta_min=2e-4)  # the official per-epoch schedule
    for epoch in range(4):
        assert lrs[3 * epoch] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        ref.step()


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
    s = pc.train(cfg, tmp_path / "run", data=data)
    chance = 1 / len(pc.SHAPE_CLASSES)
    assert s["best_oa"] >= 2.4 * chance and s["best_oa_macc"] >= 2.4 * chance, s
    assert s["best_test_oa"] == s["best_oa"] and s["chance"] == chance
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 12 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[0]["lr"]) == pytest.approx(0.02) and float(rows[-1]["lr"]) < 0.001  # cosine per epoch
    assert {"train_oa", "test_oa", "test_macc"} <= set(rows[0])
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file() and not list(tmp_path.rglob("*.tmp*"))


# tiny runs: 24 training clouds of 64 points, batch 8 -> 3 steps per epoch
def _tiny(tmp_path, name, **kw):
    kw = {"epochs": 2, "batch_size": 8, "output": str(tmp_path), "experiment": name, **kw}
    return pc.PointCloudConfig(dataset="shapes", model_kwargs=dict(pc.SMALL_MODEL_KWARGS, points=64), **kw)


def _tiny_data():
    return pc.make_shapes("train", 64, per_class=3), pc.make_shapes("test", 64, per_class=1)


def _rows(run):
    """metrics.csv without its timing columns."""
    rows = list(csv.DictReader(open(Path(run) / "metrics.csv")))
    timing = ("_time_s", "img_per_sec", "seconds")
    return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows]


def test_stop_mid_epoch_then_resume_is_exact(tmp_path):
    data = _tiny_data()
    full = pc.train(_tiny(tmp_path, "full"), data=data)
    assert full["global_step"] == 6 and full["epochs_done"] == 2
    part = pc.train(_tiny(tmp_path, "part", max_steps=4), data=data)  # stops after step 1 of epoch 2
    assert part["global_step"] == 4
    assert load_train_state(tmp_path / "part")["progress"]["step_in_epoch"] == 1
    # a resume takes the run's saved settings (another seed here is ignored) and only run-control fields anew
    resumed = pc.train(_tiny(tmp_path, "ignored", seed=9), resume=tmp_path / "part", data=data)
    assert resumed["global_step"] == 6 and not (tmp_path / "ignored").exists()
    a, b = load_train_state(tmp_path / "full")["model"], load_train_state(tmp_path / "part")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert float((a[k].double() - b[k].double()).abs().max()) <= 1e-6, k
    wa = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "last" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _rows(tmp_path / "full") == _rows(tmp_path / "part") and len(_rows(tmp_path / "full")) == 2
    assert full["train_size"] == 24 and resumed["best_oa"] == full["best_oa"]


def test_nan_loss_stops_and_keeps_a_finite_last(tmp_path, monkeypatch):
    step = pctask.PointCloudTask.train_step

    def nan_in_epoch_2(self, net, batch, ctx):
        out = step(self, net, batch, ctx)
        if ctx.step >= 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(pctask.PointCloudTask, "train_step", nan_in_epoch_2)
    with pytest.raises(NonFiniteLossError, match="NaN"):
        pc.train(_tiny(tmp_path, "nan"), data=_tiny_data())
    last = load_file(str(tmp_path / "nan" / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())
    assert load_train_state(tmp_path / "nan")["progress"]["global_step"] == 3


def test_a_second_run_into_a_run_folder_is_refused_untouched(tmp_path):
    data = _tiny_data()
    pc.train(_tiny(tmp_path, "run", epochs=1), data=data)
    run = tmp_path / "run"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds a run"):
        pc.train(_tiny(tmp_path, "run", epochs=1), data=data)
    with pytest.raises(RunFolderError, match="already holds a run"):
        pc.train(_tiny(tmp_path, "other"), out=run, data=data)  # --out RUN: the run folder itself
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_export_is_a_save_pretrained_folder_and_checkpoints_evaluate(tmp_path):
    import timm

    import visionzoo

    data = _tiny_data()
    cfg = _tiny(tmp_path, "run", epochs=1)
    s = pc.train(cfg, data=data)
    run = tmp_path / "run"
    # a save_pretrained folder; coc_pointmlp is not in timm's image-model registry, so visionzoo rebuilds it
    assert not timm.is_model("coc_pointmlp")
    model = visionzoo.load_pretrained(run / "best").eval()
    assert model.points == 64 and model.num_classes == len(pc.SHAPE_CLASSES)
    state = load_train_state(run)["model"]
    ref = visionzoo.create_model("coc_pointmlp", num_classes=8, **cfg.model_kwargs)
    ref.load_state_dict(state)
    x = torch.from_numpy(data[1].points).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), rtol=0, atol=0)
    # --checkpoint: the run folder, its best/ folder, its train_state.pt all give the run's test OA
    for path in (run, run / "best", run / "train_state.pt"):
        m = pctask.evaluate_checkpoint(path, pc.PointCloudConfig(dataset="shapes"), device="cpu")
        assert m["num_classes"] == 8 and m["test_size"] == 128  # the full shapes test split
    m = pctask.evaluate_checkpoint(run, cfg, device="cpu")
    full_test = pc.make_shapes("test", 64)
    assert m["test_oa"] == pytest.approx(pctask.evaluate_split(ref, full_test, "cpu")["oa"])
    assert s["best_oa"] == pytest.approx(pctask.evaluate_split(ref, data[1], "cpu")["oa"])


def _old_run(folder, cfg):
    """A run folder as visionzoo <= 0.1's point-cloud loop wrote it: last.pth (model, optimizer, scheduler, epoch,
    history, config) and best.pth, plain torch.save pickles of tensors, numbers, strings and dicts."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = pc.build_model(cfg, 8)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs, eta_min=cfg.min_lr)
    opt.step()
    sched.step()
    history = [{"epoch": 0, "lr": 0.01, "train_loss": 2.0, "train_oa": 0.2, "test_oa": 0.25, "test_macc": 0.25,
                "seconds": 1.0}]
    config = dataclasses.asdict(cfg)
    for k in ("task", "output", "experiment"):  # fields the old config did not have
        config.pop(k)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": 0, "history": history, "config": config}, folder / "last.pth")
    torch.save({"model": model.state_dict(), "epoch": 0, "config": config}, folder / "best.pth")
    return model


def test_old_last_pth_still_evaluates_and_refuses_resume(tmp_path, capsys):
    from visionzoo.cli import main

    cfg = _tiny(tmp_path, "x")
    model = _old_run(tmp_path / "old", cfg).eval()
    expected = pctask.evaluate_split(model, pc.make_shapes("test", 64), "cpu")["oa"]
    plain = pc.PointCloudConfig(dataset="shapes")  # the model settings come from the old file's config
    for path in (tmp_path / "old", tmp_path / "old" / "last.pth", tmp_path / "old" / "best.pth"):
        assert pctask.evaluate_checkpoint(path, plain, device="cpu")["test_oa"] == pytest.approx(expected)
    assert main(["pointcloud", "--data", "shapes", "--checkpoint", str(tmp_path / "old"), "--device", "cpu"]) == 0
    assert f"test OA {expected:.4f}" in capsys.readouterr().out
    for resume in (tmp_path / "old", tmp_path / "old" / "last.pth"):
        assert main(["pointcloud", "--data", "shapes", "--resume", str(resume), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "older visionzoo" in err and "--checkpoint" in err and "Traceback" not in err


def test_a_malicious_pickle_runs_nothing(tmp_path, capsys):
    from visionzoo.cli import main

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": RunsCodeWhenUnpickled(marker)}, evil)
    fake_run = tmp_path / "fake_run"
    fake_run.mkdir()
    torch.save({"progress": {}, "x": RunsCodeWhenUnpickled(marker)}, fake_run / "train_state.pt")
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    torch.save({"model": RunsCodeWhenUnpickled(marker), "history": []}, old_run / "last.pth")
    base = ["pointcloud", "--data", "shapes", "--small", "--device", "cpu", "--out", str(tmp_path / "o")]
    for flags in (["--resume", str(evil)], ["--resume", str(fake_run)], ["--checkpoint", str(evil)],
                  ["--checkpoint", str(old_run)]):
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert not marker.exists(), flags
        assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "weights_only" in err or "Refused" in err, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ recipes / CLI

def _parse(argv):
    p = argparse.ArgumentParser()
    from visionzoo.cli import tools

    tools.pointcloud(p)
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
    assert off.task == "pointcloud" and isinstance(off, __import__("visionzoo.engine.config").engine.config.RunConfig)
    cfg = pc.config_from_args(_parse(["--out", "/x/runs/a", "-b", "4", "--set", "min_lr=0", "model_kwargs.points=96"]))
    assert (cfg.output, cfg.experiment, cfg.batch_size, cfg.min_lr, cfg.points) == ("/x/runs", "a", 4, 0, 96)
    cfg = pc.config_from_args(_parse(["--output", "/y", "--experiment", "b", "--max-steps", "3"]))
    assert (cfg.output, cfg.experiment, cfg.max_steps) == ("/y", "b", 3)
    with pytest.raises(ValueError, match="opt 'sgd'"):
        pc.config_from_args(_parse(["--set", "opt=adamw"]))


def test_cli_reports_missing_data_clearly(tmp_path, capsys):
    from visionzoo.cli import main

    rc = main(["pointcloud", "--data", f"scanobjectnn:{tmp_path}", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 2 and "main_split" in capsys.readouterr().err
    assert main(["pointcloud", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "--data scanobjectnn:ROOT" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_shapes_run(tmp_path):
    rc = pc.run(_parse(["--recipe", "pointcloud/coc_pointmlp_shapes_cpu", "--epochs", "1", "--points", "64",
                        "--out", str(tmp_path / "run"), "--device", "cpu", "--threads", "1"]))
    assert rc == 0 and (tmp_path / "run" / "summary.json").is_file()


_DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from visionzoo.dense import pointcloud as pc
cfg = pc.PointCloudConfig(dataset="shapes", model_kwargs=dict(pc.SMALL_MODEL_KWARGS, points=64), epochs=2,
                          batch_size=4, output=sys.argv[1], experiment="ddp")
pc.train(cfg, data=(pc.make_shapes("train", 64, per_class=3), pc.make_shapes("test", 64, per_class=2)), device="cpu")
"""


@pytest.mark.slow
def test_two_process_ddp_run_and_sharded_evaluation(tmp_path):
    import subprocess

    import timm

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "ddp"
    state = load_train_state(run)
    assert state["world_size"] == 2 and state["progress"]["global_step"] == 6  # 24 clouds / (2 x 4) per step
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    model = timm.create_model(f"local-dir:{run / 'last'}", pretrained=True)
    # the test OA summed over the two ranks' shards is that of one process over the whole split
    whole = pctask.evaluate_split(model, pc.make_shapes("test", 64, per_class=2), "cpu")
    assert float(rows[-1]["test_oa"]) == pytest.approx(whole["oa"], abs=1e-6)
    assert float(rows[-1]["test_macc"]) == pytest.approx(whole["macc"], abs=1e-6)
