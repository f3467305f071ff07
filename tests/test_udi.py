"""UDI pretraining (`visionzoo pretrain --method udi`, visionzoo/tasks/udi.py on the one training loop) on the
embedded digits: outputs, exact resume (1 and 2 processes), NaN stop, refused reuse, unsafe pickles, old recipe keys
and old run folders. Parity with the official code is covered by the fixtures (tests/test_fixtures.py)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionzoo.cli import main
from visionzoo.testing.unsafe import RunsCodeWhenUnpickled

REPO = Path(__file__).resolve().parent.parent

# the smallest setting: udi_vit_test (32x32, patch 4), 2 local 16x16 crops, a tiny head, CPU fp32
TINY = ["--model", "udi_vit_test", "--dataset", "digits", "--global-size", "32", "--local-size", "16",
        "--local-crops-number", "2", "--out-dim", "64", "--workers", "0", "--no-progress", "--device", "cpu"]
for _s in ("head_hidden_dim=32", "head_bottleneck_dim=16", "amp=false", "knn_max_train=200", "knn_max_val=100",
           "warmup_epochs=1", "warmup_teacher_temp_epochs=1"):
    TINY += ["--set", _s]
# a large lr without warm-up so that any difference in a resumed trajectory is far above rounding;
# 90 train images // 16 = 5 steps per epoch
RESUME = ["--epochs", "2", "--batch-size", "16", "--lr", "0.005", "--set", "warmup_epochs=0",
          "--set", "max_train_images=90"]
TIMING = ("_time_s", "img_per_sec", "seconds")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _rows(run):
    return list(csv.DictReader(open(Path(run) / "metrics.csv")))


def _untimed(rows):
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def _files(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(folder).rglob("*")
            if p.is_file()}


def _assert_same_state(a, b, what=""):
    """The model (student, teacher, centers) and AdamW moments of two train_state.pt files agree to 1e-6."""
    sa, sb = (torch.load(Path(r) / "train_state.pt", weights_only=True) for r in (a, b))
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        torch.testing.assert_close(sb["model"][k], sa["model"][k], rtol=0, atol=1e-6,
                                   msg=lambda m, k=k: f"{what} {k}: {m}")
    for i, st in sa["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb["optimizer"]["state"][i][key], st[key], rtol=0, atol=1e-6)
    assert sa["progress"] == sb["progress"]
    return sa, sb


def test_pretrain_cli_writes_outputs_and_refuses_reuse(tmp_path, capsys):
    out = tmp_path / "run"
    # one full epoch (1437 train images // 128 = 11 steps) so the epoch row, final k-NN and curves are written
    args = ["pretrain", "--method", "udi", "--out", str(out), "--epochs", "1", "--batch-size", "128"] + TINY + \
        ["--set", "save_every_epochs=1"]
    assert main(args) == 0
    for name in ("metrics.csv", "config.yaml", "summary.json", "train_state.pt", "curves.png",
                 "last/model.safetensors", "last/config.json", "best/model.safetensors"):
        assert (out / name).is_file(), name
    rows = _rows(out)
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "0"), ("1", "11")]  # the k-NN of the initial teacher
    assert rows[0]["knn_top1"] and rows[1]["knn_top1"]
    loss = float(rows[1]["train_loss"])
    assert loss == loss and loss > 0  # finite
    assert {"train_g_cls", "train_g_clsp", "train_g_patch", "train_l_cls", "lr", "wd", "momentum"} <= set(rows[1])
    done, folder = capsys.readouterr().out.strip().splitlines()[-2:]  # the engine's two last lines
    summary = json.loads((out / "summary.json").read_text())
    assert (f"done: knn_top1 {summary['knn_top1']:.4g} (best {summary['best']:.4g}, at start "
                           f"{summary['knn_top1_init']:.4g}); 11 steps, 1 epoch in") in done, done
    assert f"run folder: {out}  (best/, last/" in folder, folder
    # last/ is the teacher backbone: it loads into the registered model from the run folder
    import visionzoo

    m = visionzoo.create_model("udi_vit_test", num_classes=0, checkpoint_path=str(out))
    teacher = {k[len("teacher.backbone."):]: v for k, v in
               torch.load(out / "train_state.pt", weights_only=True)["model"].items()
               if k.startswith("teacher.backbone.")}
    best = _load(out / "best" / "model.safetensors")
    assert best.keys() == teacher.keys()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, m.num_features)
    torch.testing.assert_close(_load(out / "last" / "model.safetensors"), teacher, rtol=0, atol=0)
    torch.testing.assert_close(_load(out / "snapshots" / "epoch_0001.safetensors"), teacher, rtol=0, atol=0)
    # the attention command of docs/models/udi.md reads the run folder
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "digit.png")
    assert main(["visualize", "attention", "--model", "udi_vit_test", "--checkpoint", str(out), "--image",
                 str(tmp_path / "digit.png"), "--img-size", "32", "--out", str(tmp_path / "att.png")]) == 0
    assert (tmp_path / "att.png").is_file()
    # a second run into the same folder is refused and changes nothing
    before = _files(out)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "Traceback" not in err
    assert _files(out) == before


def test_pretrain_exact_resume_mid_epoch(tmp_path):
    # stopping at 3 and resuming to 8 crosses an epoch end (k-NN row, checkpoint) and ends mid-epoch
    common = ["pretrain"] + RESUME + TINY
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(common + ["--out", str(full), "--max-steps", "8"]) == 0
    assert main(common + ["--out", str(part), "--max-steps", "3"]) == 0
    mid = torch.load(part / "train_state.pt", weights_only=True)
    assert mid["progress"]["global_step"] == 3 and mid["progress"]["step_in_epoch"] == 3
    # the old spellings: --output RUN (the run folder) + --resume alone, --stop-after-steps
    assert main(common + ["--output", str(part), "--stop-after-steps", "8", "--resume"]) == 0
    _, sb = _assert_same_state(full, part)
    assert sb["progress"]["global_step"] == 8
    # the resumed run really trained (the student moved after the restart)
    assert any(not torch.equal(mid["model"][k], sb["model"][k]) for k in sb["model"] if k.startswith("student."))
    torch.testing.assert_close(_load(part / "last" / "model.safetensors"), _load(full / "last" / "model.safetensors"),
                               rtol=0, atol=1e-6)
    ra, rb = _rows(full), _rows(part)
    assert [r["step"] for r in ra] == ["0", "5"]  # init and end-of-epoch-1 k-NN
    assert _untimed(ra) == _untimed(rb)


def test_nan_loss_stops_with_a_finite_last_checkpoint(tmp_path, monkeypatch):
    from visionzoo.cli.tools import pretrain as add_arguments
    from visionzoo.ssl.pretrain import build_config
    from visionzoo.tasks import udi as T

    real = T.UDITask.train_step

    def poisoned(self, net, batch, ctx):
        out = real(self, net, batch, ctx)
        if ctx.step >= 6:  # the second epoch (5 steps each): the end of the first one saved last/
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(T.UDITask, "train_step", poisoned)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_config(parser.parse_args(RESUME + TINY + ["--set", "log_interval=1"]))
    run = tmp_path / "nan"
    with pytest.raises(T.NonFiniteLossError, match="NaN"):
        T.pretrain(cfg, run, device="cpu")
    last = _load(run / "last" / "model.safetensors")
    assert last and all(torch.isfinite(v).all() for v in last.values())
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["progress"]["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_malicious_pickles_run_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": RunsCodeWhenUnpickled(marker)}, evil)
    fake_run = tmp_path / "fake_run"
    fake_run.mkdir()
    torch.save({"progress": {}, "x": RunsCodeWhenUnpickled(marker)}, fake_run / "train_state.pt")
    for cmd in (["pretrain", "--resume", str(fake_run)] + TINY,
                ["pretrain", "--resume", str(fake_run / "train_state.pt")] + TINY,
                ["visualize", "attention", "--model", "udi_vit_test", "--checkpoint", str(evil)],
                ["knn", "--model", "udi_vit_test", "--checkpoint", str(evil), "--data", "digits"]):
        capsys.readouterr()
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, (cmd, err)
        assert not marker.exists(), cmd


def test_old_udi_run_folder_loads_but_does_not_resume(tmp_path, capsys):
    """A run folder of the older UDI loop (udi_networks.safetensors, teacher_backbone.safetensors, a train_state.pt
    of tensors and numbers): its teacher loads with --checkpoint; --resume says why it cannot continue."""
    from safetensors.torch import save_file

    import visionzoo

    old = tmp_path / "old"
    old.mkdir()
    torch.manual_seed(0)
    backbone = visionzoo.create_model("udi_vit_test", num_classes=0)
    sd = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(sd, str(old / "teacher_backbone.safetensors"))
    save_file({f"teacher.backbone.{k}": v for k, v in sd.items()}, str(old / "udi_networks.safetensors"))
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "epoch": 1, "step_in_epoch": 0, "global_step": 5,
                "torch_rng": torch.get_rng_state()}, old / "train_state.pt")
    m = visionzoo.create_model("udi_vit_test", num_classes=0, checkpoint_path=str(old))
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert main(["pretrain", "--resume", str(old)] + TINY) == 2
    err = capsys.readouterr().err
    assert "older visionzoo" in err and "--checkpoint" in err


def test_pretrain_resume_without_state(tmp_path, capsys):
    rc = main(["pretrain", "--out", str(tmp_path / "empty"), "--resume", "--epochs", "1", "--batch-size", "16"]
              + TINY)
    assert rc == 2 and "Cannot resume" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


def test_pretrain_unknown_method(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--method", "dino", "--output", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'dino'" in err and "udi" in err


def test_pretrain_unknown_key(tmp_path, capsys):
    assert main(["pretrain", "--output", str(tmp_path), "--set", "eval_evry=2"]) == 2
    assert "eval_evry (did you mean eval_every" in capsys.readouterr().err
    assert main(["pretrain", "--output", str(tmp_path), "--set", "epochs"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_old_config_keys_are_aliases(capsys):
    from visionzoo.ssl.udi import UDIConfig

    cfg = UDIConfig.from_dict(dict(log_every=5, knn_every=3, stop_after_steps=7, save_every=4))
    assert (cfg.log_interval, cfg.eval_every, cfg.online_knn, cfg.max_steps, cfg.save_every_epochs) == \
        (5, 3, True, 7, 4)
    logged = "".join(capsys.readouterr())  # the visionzoo logger writes to stdout (stderr before its set-up)
    assert "'knn_every' is now spelled 'eval_every'" in logged and "'log_every' is now spelled" in logged
    off = UDIConfig.from_dict(dict(knn_every=0))
    assert off.online_knn is False and off.eval_every == 1
    # a new spelling given as an override wins over the recipe's old key
    cfg = UDIConfig.from_yaml("udi/pretrain_vit_test_cpu", knn_every=0)
    assert cfg.online_knn is False and cfg.task == "udi" and cfg.clip_mode == "per_tensor"


def test_pretrain_profile_reports_loader_and_step(capsys):
    assert main(["pretrain", "--profile", "2", "--batch-size", "16"] + TINY) == 0
    out = capsys.readouterr().out
    import re

    m = re.search(r"loader ([\d.]+) img/s .* train step ([\d.]+) img/s over 2 batches", out)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out


def _torchrun(args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "visionzoo"] + args
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_pretrain_two_process_ddp_on_cpu(tmp_path):
    """torchrun with 2 CPU processes (gloo): the global batch is split, rank 0 writes the run folder."""
    out = tmp_path / "ddp"
    _torchrun(["pretrain", "--out", str(out), "--epochs", "1", "--batch-size", "16", "--set", "max_train_images=128"]
              + TINY)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["progress"]["global_step"] == 128 // (16 * 2)  # each step consumes 16 images per process
    assert state["world_size"] == 2
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == ["0", "1"] and float(rows[1]["train_loss"]) > 0


@pytest.mark.slow
def test_pretrain_two_process_exact_resume_mid_epoch(tmp_path):
    """2 processes stopped mid-epoch with max_steps and resumed with 2 processes end with the weights (student,
    teacher, centers, AdamW moments) and metrics of the uninterrupted 2-process run."""
    # 128 images / (16 x 2) = 4 steps per epoch; stop at 3 (mid-epoch 1), resume to 6 (mid-epoch 2)
    common = ["pretrain", "--epochs", "2", "--batch-size", "16", "--lr", "0.005", "--set", "warmup_epochs=0",
              "--set", "max_train_images=128"] + TINY
    full, part = tmp_path / "full", tmp_path / "part"
    _torchrun(common + ["--out", str(full), "--max-steps", "6"])
    _torchrun(common + ["--out", str(part), "--max-steps", "3"])
    mid = torch.load(part / "train_state.pt", weights_only=True)
    assert mid["progress"]["step_in_epoch"] == 3 and mid["world_size"] == 2
    _torchrun(common + ["--resume", str(part), "--max-steps", "6"])
    _, sb = _assert_same_state(full, part, "2-process resume")
    assert sb["progress"]["global_step"] == 6
    assert any(not torch.equal(mid["model"][k], sb["model"][k]) for k in sb["model"] if k.startswith("student."))
    assert _untimed(_rows(full)) == _untimed(_rows(part))
