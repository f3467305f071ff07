"""The run folder's snapshots (``save_every_epochs``) and the end of a run stopped by ``max_steps``, on a toy task of
the one loop (milliseconds a run), and the cluster animation drawn from a run's snapshots."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from visionzoo.engine.config import RunConfig
from visionzoo.engine.loop import fit
from visionzoo.engine.state import RunFolder, list_snapshots
from visionzoo.engine.task import Task, save_task_model


@dataclasses.dataclass
class ToyConfig(RunConfig):
    model: str = "toy"
    epochs: int = 5
    batch_size: int = 4
    workers: int = 0
    lr: float | None = 0.1


class ToyTask(Task):
    """A linear classifier on 16 fixed points: 4 steps an epoch."""

    name = "toy"
    best_metric = "score"

    def build_model(self, ctx):
        return nn.Linear(3, 2)

    def train_dataset(self, ctx):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, generator=g)
        return [(x[i], int(x[i, 0] > 0)) for i in range(16)]

    def build_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr)

    def train_step(self, net, batch, ctx):
        x, y = batch
        return {"loss": F.cross_entropy(net(x), y)}

    def evaluate(self, model, ctx):
        w = model.weight.detach()
        return {"score": float(w[1, 0] - w[0, 0])}  # grows as the model learns the rule

    def export(self, model, folder, metadata):
        save_task_model(model, folder, "toy", {}, metadata)


def _run(tmp_path, name, resume=None, **kw):
    return fit(ToyTask(ToyConfig(output=str(tmp_path), experiment=name, **kw)), resume=resume, device="cpu")


def _snapshots(run):
    return {epoch: load_file(str(path)) for epoch, path in list_snapshots(run)}


def test_snapshots_every_n_epochs_with_init_and_last(tmp_path):
    summary = _run(tmp_path, "full", save_every_epochs=2, save_init_snapshot=True)
    run = tmp_path / "full"
    snaps = _snapshots(run)
    assert sorted(snaps) == [0, 2, 4, 5]  # the init, every 2nd epoch, and the last
    torch.testing.assert_close(snaps[5], load_file(str(run / "last" / "model.safetensors")), rtol=0, atol=0)
    assert not torch.equal(snaps[0]["weight"], snaps[5]["weight"])
    from safetensors import safe_open

    with safe_open(str(run / "snapshots" / "epoch_0004.safetensors"), "pt") as f:
        assert (f.metadata()["epoch"], f.metadata()["step"]) == ("4", "16")
    assert summary["epochs_done"] == 5
    # without the flag, no init snapshot; without save_every_epochs, no snapshots/ at all
    _run(tmp_path, "noinit", save_every_epochs=2)
    assert [e for e, _ in list_snapshots(tmp_path / "noinit")] == [2, 4, 5]
    _run(tmp_path, "none")
    assert not (tmp_path / "none" / "snapshots").exists()


def test_resume_keeps_snapshots_those_of_the_uninterrupted_run(tmp_path):
    ref = _snapshots(_run(tmp_path, "ref", save_every_epochs=1, save_init_snapshot=True)["run_dir"])
    part = _run(tmp_path, "part", save_every_epochs=1, save_init_snapshot=True, max_steps=10)  # inside epoch 3
    run = RunFolder(part["run_dir"])
    assert [e for e, _ in list_snapshots(run.path)] == [0, 1, 2]
    # a snapshot the saved state does not lead to (a run killed after it, before its state): redone on resume
    run.save_snapshot({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, epoch=3, step=12)
    _run(tmp_path, "part", resume=part["run_dir"])
    got = _snapshots(part["run_dir"])
    assert sorted(got) == sorted(ref) == [0, 1, 2, 3, 4, 5]
    for epoch in ref:
        torch.testing.assert_close(got[epoch], ref[epoch], rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_steps", [10, 12])  # inside epoch 3, and at its end (eval_every 5: no row there)
def test_a_run_stopped_by_max_steps_ends_evaluated_and_saved(tmp_path, max_steps):
    summary = _run(tmp_path, "stop", max_steps=max_steps, eval_every=5)
    run = tmp_path / "stop"
    assert summary["global_step"] == max_steps
    assert summary["best"] is not None and summary["best_score"] == summary["score"]  # not -1 / None
    assert json.loads((run / "summary.json").read_text())["score"] == summary["score"]
    best = load_file(str(run / "best" / "model.safetensors"))
    torch.testing.assert_close(best, load_file(str(run / "last" / "model.safetensors")), rtol=0, atol=0)


def test_bad_save_every_epochs_is_refused():
    from visionzoo.engine.config import RecipeError

    with pytest.raises(RecipeError, match="save_every_epochs"):
        ToyConfig(save_every_epochs=-1).check()


@pytest.mark.slow
def test_coc_digits_run_to_cluster_animation(tmp_path):
    """The README's figure end to end: coc_test trained 2 epochs on digits with snapshots, then the GIF."""
    import numpy as np
    from PIL import Image

    from visionzoo.cli import main

    assert main(["train", "--model", "coc_test", "--epochs", "2", "--output", str(tmp_path), "--exp", "coc",
                 "--save-every-epochs", "1", "--save-init-snapshot", "--workers", "0", "--device", "cpu"]) == 0
    run = tmp_path / "coc"
    assert [e for e, _ in list_snapshots(run)] == [0, 1, 2]
    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(digit)
    gif = tmp_path / "clusters.gif"
    assert main(["visualize", "clusters", "--checkpoint", str(run), "--animate", "--image", str(digit),
                 "--out", str(gif)]) == 0
    im = Image.open(gif)
    assert im.n_frames == 3 and im.size[0] == 256
