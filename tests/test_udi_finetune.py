"""UDI fine-tuning on the one loop: the semi-supervised variant (a labelled subset of the train split) and the CPU
fine-tune recipe. Fast: the subset plumbing and one step; slow: the learning checks against random init."""
import csv
import json

import pytest
import torch

import visionzoo
from visionzoo.cli import main
from visionzoo.engine.config import RecipeError, TrainConfig, load_config
from visionzoo.engine.task import Context
from visionzoo.tasks.classify import ClassifyTask


def _prepared(**kw) -> ClassifyTask:
    task = ClassifyTask(TrainConfig(model="udi_vit_test", dataset="digits", **kw))
    task.prepare(Context(cfg=task.cfg, device=torch.device("cpu"), rank=0, world_size=1, run_dir=None))
    return task


def test_label_subset_is_per_class_and_deterministic():
    from visionzoo.data.datasets import DigitsDataset

    labels = torch.tensor(DigitsDataset("train", img_size=8).targets)
    idx, how = _prepared(label_percent=10, seed=3).labelled
    counts = torch.bincount(labels[idx], minlength=10)
    expected = (torch.bincount(labels, minlength=10).double() * 0.1).round().long()
    assert counts.tolist() == expected.tolist() and "10% balanced (seed 3)" in how
    assert idx == _prepared(label_percent=10, seed=3).labelled[0]  # the same images for the same seed
    assert idx != _prepared(label_percent=10, seed=4).labelled[0]
    # the logistic-regression protocol (visionzoo semisup) draws the very same subset
    from visionzoo.evals.semisup import subset_indices

    assert idx == subset_indices(labels, 10, "balanced", 3).tolist()
    assert _prepared().labelled is None  # no label_percent: every image


def test_label_subset_file_and_bad_values(tmp_path):
    from visionzoo.data.datasets import DigitsDataset
    from visionzoo.evals.semisup import sample_names

    names = sample_names(DigitsDataset("train", img_size=8))
    (tmp_path / "sub.txt").write_text(f"{names[7]}\n{names[3]}\n")
    assert _prepared(label_subset_file=str(tmp_path / "sub.txt"), label_percent=50).labelled[0] == [3, 7]
    with pytest.raises(RecipeError, match="label_percent"):
        TrainConfig(label_percent=0).check()
    with pytest.raises(RecipeError, match="label_sampling"):
        TrainConfig(label_percent=1, label_sampling="stratified").check()


def test_official_semisup_recipes_resolve_the_scripts_lr():
    for pct, lr in ((1, 5e-6), (10, 1e-5)):
        for suffix in ("", "_1gpu"):
            cfg = load_config(f"udi/semisup_finetune_vit_small_{pct}pct{suffix}")
            assert cfg.label_percent == pct and cfg.epochs == 1000 and cfg.model_ema
            assert cfg.resolved_lr(cfg.world_size) == pytest.approx(lr)  # 5e-6 x global batch / 512


def test_finetune_head_layer_one_loads_the_official_projection_head(tmp_path):
    """--finetune_head_layer 1: the first layer of an official checkpoint's (teacher) head sits under a new classifier,
    the backbone loads as usual, the classifier's init scale touches only the classifier, and save_pretrained
    rebuilds it."""
    base = visionzoo.create_model("udi_vit_test")
    official = {f"backbone.{k}": v for k, v in base.state_dict().items() if k != "reg_token"}
    official["backbone.cls_token"] = torch.cat([base.cls_token, base.reg_token], 1)
    w, b = torch.randn(48, 32), torch.randn(48)
    official.update({"head.0.mlp.0.weight": w, "head.0.mlp.0.bias": b, "head.0.mlp.2.weight": torch.randn(48, 48)})
    torch.save({"teacher": official, "student": official}, tmp_path / "udi.pth")
    model = visionzoo.create_model("udi_vit_test", num_classes=10, head_hidden_dim=48,
                                   checkpoint_path=tmp_path / "udi.pth").eval()
    assert torch.equal(model.head_hidden[0].weight, w) and torch.equal(model.head_hidden[0].bias, b)
    assert torch.equal(model.pos_embed, base.pos_embed)
    assert model.get_classifier().in_features == 48 and model.get_classifier().out_features == 10
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = model.head(torch.nn.functional.gelu(pooled @ w.T + b))
        torch.testing.assert_close(model(x), expected)
    visionzoo.save_pretrained(model, tmp_path / "saved", model_args={"head_hidden_dim": 48})
    again = visionzoo.load_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    model.reset_classifier(5)
    assert model.get_classifier().in_features == 48 and model(x).shape == (2, 5)


def test_semisup_finetune_runs_on_the_subset(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    backbone = visionzoo.create_model("udi_vit_test", num_classes=0)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / "backbone.safetensors"))
    rc = main(["finetune", "--recipe", "udi/semisup_finetune_vit_test_cpu", "--checkpoint",
               str(tmp_path / "backbone.safetensors"), "--max-steps", "1", "--output", str(tmp_path / "runs"),
               "--exp", "semi", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "143 train (labelled subset: 10% balanced (seed 0))" in out, out
    resolved = json.load(open(tmp_path / "runs" / "semi" / "summary.json"))
    assert resolved["global_step"] == 1 and resolved["labelled_images"] == 143
    cfg = (tmp_path / "runs" / "semi" / "config.yaml").read_text()
    assert "label_percent: 10" in cfg and "steps_per_epoch: 4" in cfg  # 143 images, batch 32, drop tail


# ----------------------------------------------------------------------------------------------------------------
# learning checks (CPU minutes)

def _best(run) -> float:
    return max(float(r["val_top1"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_top1"))


@pytest.fixture(scope="module")
def udi_digits_run(tmp_path_factory):
    """A brief UDI pretraining of udi_vit_test on the digits (10 epochs of the CPU recipe)."""
    run = tmp_path_factory.mktemp("udi") / "pre"
    assert main(["pretrain", "--recipe", "udi/pretrain_vit_test_cpu", "--epochs", "10", "--eval-every", "10",
                 "--out", str(run), "--device", "cpu", "--workers", "1"]) == 0
    return run


@pytest.mark.slow
def test_udi_semisup_finetune_beats_random_init(udi_digits_run, tmp_path):
    runs = tmp_path / "runs"
    common = ["--recipe", "udi/semisup_finetune_vit_test_cpu", "--output", str(runs), "--device", "cpu"]
    assert main(["finetune", "--checkpoint", str(udi_digits_run), "--exp", "udi"] + common) == 0
    assert main(["train", "--exp", "random"] + common) == 0
    udi, random = _best(runs / "udi"), _best(runs / "random")
    assert udi > random + 5, (udi, random)  # measured 61.4 vs 44.2 (2026-12-03)


@pytest.mark.slow
def test_udi_cpu_finetune_recipe_learns(udi_digits_run, tmp_path):
    runs = tmp_path / "runs"
    assert main(["finetune", "--recipe", "udi/finetune_vit_test_cpu", "--checkpoint", str(udi_digits_run),
                 "--output", str(runs), "--exp", "ft", "--device", "cpu"]) == 0
    # chance is 10 %; 66 % measured (2026-12-03), the recipe before the fix (head x 0.001, layer decay 0.75,
    # lr 0.002, drop path 0.1) reached 24 % from the same pretraining
    assert _best(runs / "ft") > 50
