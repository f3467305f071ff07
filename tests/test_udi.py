"""UDI pretraining through the CLI (`visionzoo pretrain --method udi`) on the embedded digits: outputs, exact resume,
bad input. Parity with the official code is covered by the fixtures (tests/test_fixtures.py)."""
import csv

import pytest
import torch

from visionzoo.cli import main

# the smallest setting: udi_vit_test (32x32, patch 4), 2 local 16x16 crops, a tiny head, CPU fp32
TINY = ["--model", "udi_vit_test", "--dataset", "digits", "--global-size", "32", "--local-size", "16",
        "--local-crops-number", "2", "--out-dim", "64", "--workers", "0", "--no-progress", "--device", "cpu"]
for _s in ("head_hidden_dim=32", "head_bottleneck_dim=16", "amp=false", "knn_max_train=200", "knn_max_val=100",
           "warmup_epochs=1", "warmup_teacher_temp_epochs=1"):
    TINY += ["--set", _s]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_pretrain_cli_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    # one full epoch (1527 train images // 128 = 11 steps) so the epoch row, final k-NN and curves are written
    assert main(["pretrain", "--method", "udi", "--output", str(out), "--epochs", "1", "--batch-size", "128"]
                + TINY) == 0
    for name in ("metrics.csv", "config.json", "teacher_backbone.safetensors", "udi_networks.safetensors",
                 "train_state.pt"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["-1", "0"]
    assert rows[0]["knn_top1"] and rows[1]["knn_top1"]
    loss = float(rows[1]["loss"])
    assert loss == loss and loss > 0  # finite
    assert "k-NN top-1: init" in capsys.readouterr().out
    # the teacher backbone loads into the registered model
    import visionzoo

    m = visionzoo.create_model("udi_vit_test", num_classes=0, checkpoint_path=str(out / "teacher_backbone.safetensors"))
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, m.num_features)


def test_pretrain_exact_resume(tmp_path):
    # a large lr without warmup so that any difference in the resumed trajectory is far above rounding
    # 90 train images // 16 = 5 steps per epoch: stopping at 3 and resuming to 8 crosses an epoch end (k-NN, checkpoint)
    common = (["pretrain", "--epochs", "2", "--batch-size", "16", "--lr", "0.005"] + TINY
              + ["--set", "warmup_epochs=0", "--set", "max_train_images=90"])
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(common + ["--output", str(full), "--stop-after-steps", "8"]) == 0
    assert main(common + ["--output", str(part), "--stop-after-steps", "3"]) == 0
    a_mid = _load(part / "udi_networks.safetensors")
    assert main(common + ["--output", str(part), "--stop-after-steps", "8", "--resume"]) == 0
    a, b = _load(full / "udi_networks.safetensors"), _load(part / "udi_networks.safetensors")
    assert a.keys() == b.keys()
    # the resumed run really trained (the student moved after the restart)
    assert any(not torch.equal(a_mid[k], b[k]) for k in b if k.startswith("student."))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ka = [r["knn_top1"] for r in csv.DictReader(open(full / "metrics.csv"))]
    kb = [r["knn_top1"] for r in csv.DictReader(open(part / "metrics.csv"))]
    assert ka == kb  # init and end-of-epoch-0 k-NN
    sa = torch.load(full / "train_state.pt", weights_only=True)
    sb = torch.load(part / "train_state.pt", weights_only=True)
    for key in ("epoch", "step_in_epoch", "global_step"):
        assert sa[key] == sb[key], key
    for i, st in sa["optimizer"]["state"].items():
        torch.testing.assert_close(sb["optimizer"]["state"][i]["exp_avg"], st["exp_avg"], rtol=0, atol=1e-6)


def test_pretrain_resume_without_state(tmp_path, capsys):
    rc = main(["pretrain", "--output", str(tmp_path / "empty"), "--resume", "--epochs", "1", "--batch-size", "16"]
              + TINY)
    assert rc == 2 and "nothing to resume" in capsys.readouterr().err


def test_pretrain_unknown_method(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--method", "dino", "--output", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'dino'" in err and "udi" in err


def test_pretrain_unknown_key(tmp_path, capsys):
    assert main(["pretrain", "--output", str(tmp_path), "--set", "knn_evry=2"]) == 2
    assert "knn_evry (did you mean knn_every" in capsys.readouterr().err
    assert main(["pretrain", "--output", str(tmp_path), "--set", "epochs"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_pretrain_profile_reports_loader_and_step(capsys):
    assert main(["pretrain", "--profile", "2", "--batch-size", "16"] + TINY) == 0
    out = capsys.readouterr().out
    import re

    m = re.search(r"loader ([\d.]+) img/s .* train step ([\d.]+) img/s over 2 batches", out)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out


def test_pretrain_two_process_ddp_on_cpu(tmp_path):
    """torchrun with 2 CPU processes (gloo): the global batch is split, rank 0 writes the run folder."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "visionzoo", "pretrain", "--output", str(out), "--epochs", "1", "--batch-size", "16",
           "--set", "max_train_images=128"] + TINY
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["global_step"] == 128 // (16 * 2)  # each step consumes 16 images per process
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["-1", "0"] and float(rows[1]["loss"]) > 0
