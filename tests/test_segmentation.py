"""Semantic segmentation (visionzoo.dense.segmentation): heads, metrics, data, inference, CLI train/eval/resume."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from visionzoo.dense import segmentation as seg
from visionzoo.dense.segmentation import SegmentationConfig
from visionzoo.testing.unsafe import RunsCodeWhenUnpickled


class _PointwiseBackbone(nn.Module):
    """A 1x1-conv 'backbone' giving maps at strides (4, 8, 16, 32) by average pooling: cheap, and pointwise."""

    def __init__(self, strides=(4, 8, 16, 32), ch=6):
        super().__init__()
        self.proj = nn.Conv2d(3, ch, 1)
        self.strides, self.out_channels, self.size_divisor = list(strides), [ch] * len(strides), max(strides)

    def forward(self, x):
        y = self.proj(x)
        return [nn.functional.avg_pool2d(y, s) for s in self.strides]


# ----------------------------------------------------------------------------------------------------------------
# heads

@pytest.mark.parametrize("head", ["fpn", "upernet", "segformer"])
@pytest.mark.parametrize("strides", [(4, 8, 16, 32), (8, 8, 8, 8)])
def test_head_shapes_on_pyramids_and_same_stride_maps(head, strides, one_thread):
    cfg = SegmentationConfig(head=head, num_classes=5, head_channels=16, fpn_channels=8, aux_head=True,
                             aux_channels=8, pool_scales=[1, 2, 3, 6])
    chans = [6, 10, 12, 14]
    neck, dec, aux = seg.build_head(cfg, chans, strides)
    B, H, W = 2, 64, 96
    feats = [torch.randn(B, c, H // s, W // s) for c, s in zip(chans, strides)]
    if neck is not None:
        feats = neck(feats)
        assert [f.shape[1] for f in feats] == [8] * 4
    out = dec(feats)
    assert out.shape == (B, 5, H // strides[0], W // strides[0])
    assert aux(feats[3]).shape == (B, 5, H // strides[3], W // strides[3])


def test_fpn_head_structure_follows_mmseg():
    _, dec, _ = seg.build_head(SegmentationConfig(head="fpn", num_classes=3), [256] * 4, [4, 8, 16, 32])
    convs = [sum(isinstance(m, nn.Conv2d) for m in h.modules()) for h in dec.scale_heads]
    ups = [sum(isinstance(m, nn.Upsample) for m in h.modules()) for h in dec.scale_heads]
    assert convs == [1, 1, 2, 3] and ups == [0, 1, 2, 3]
    assert isinstance(dec.dropout, nn.Dropout2d) and dec.dropout.p == 0.1 and dec.conv_seg.in_channels == 128


def test_segmentor_output_size_loss_and_aux(one_thread):
    cfg = SegmentationConfig(head="upernet", num_classes=4, head_channels=8, aux_head=True, aux_channels=8)
    torch.manual_seed(0)
    model = seg.build_segmentor(cfg, backbone=_PointwiseBackbone())
    x = torch.randn(2, 3, 50, 70)  # not a multiple of 32: padded inside, cropped back
    y = torch.randint(0, 4, (2, 50, 70))
    y[:, :5] = 255
    losses = model(x, y)
    assert set(losses) == {"loss", "loss_decode", "loss_aux"}
    assert torch.allclose(losses["loss"], losses["loss_decode"] + losses["loss_aux"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(x).shape == (2, 4, 50, 70)


def test_cross_entropy_averaging_modes():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0] = 255
    per_px = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")
    assert torch.allclose(seg.seg_ce(logits, target), per_px.sum() / 16)  # mmseg default: all pixels
    assert torch.allclose(seg.seg_ce(logits, target, avg_non_ignore=True), per_px.sum() / 12)


# ----------------------------------------------------------------------------------------------------------------
# metrics

def test_miou_hand_computed():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = seg.confusion_matrix(pred, gt, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = seg.segmentation_metrics(cm, ["a", "b", "c", "d"])
    # IoU: a 1/(2+2-1)=1/3, b 2/(3+3-2)=1/2, c 1/(2+2-1)=1/3, d undefined (absent everywhere)
    assert m["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m["aAcc"] == pytest.approx(4 / 7)
    assert m["mAcc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m["per_class"]["d"]["IoU"] is None and m["per_class"]["b"]["IoU"] == pytest.approx(0.5)


def test_confusion_matrix_matches_sklearn():
    from sklearn.metrics import confusion_matrix as sk_cm

    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 6, (3, 40, 50), generator=g)
    gt[gt == 5] = 255
    pred = torch.randint(0, 5, (3, 40, 50), generator=g)
    cm = seg.confusion_matrix(pred, gt, 5)
    keep = gt != 255
    ref = sk_cm(gt[keep].numpy(), pred[keep].numpy(), labels=list(range(5)))
    assert (cm.numpy() == ref).all()


# ----------------------------------------------------------------------------------------------------------------
# data pipeline

def test_reduce_zero_label():
    lab = np.array([[0, 1, 2], [150, 255, 0]], np.uint8)
    assert seg.reduce_labels(lab).tolist() == [[255, 0, 1], [149, 255, 255]]


def test_resize_sizes_follow_mmcv_and_aligned_resize():
    assert seg.rescale_size(512, 683, (2048, 512)) == (512, 683)  # a typical ADE20K image already fits
    assert seg.rescale_size(256, 256, (2048, 512)) == (512, 512)
    assert seg.rescale_size(600, 2400, (2048, 512)) == (512, 2048)  # the long edge bound wins
    assert seg.test_size(512, 683, (2048, 512), 32) == (512, 704)  # AlignedResize: sides up to multiples of 32


def test_random_crop_cat_max_ratio_rule():
    label = np.zeros((100, 100), np.uint8)
    label[:, 50:] = 1  # a 20x20 crop qualifies (2 classes, none >= 75 %) only when x1 is in 36..44

    def qualifies(box, lab):
        y1, y2, x1, x2 = box
        v = lab[y1:y2, x1:x2].ravel()
        cnt = np.bincount(v[v != 255], minlength=2)
        return (cnt > 0).sum() > 1 and cnt.max() / cnt.sum() < 0.75

    rule = [qualifies(seg.random_crop_box(label, (20, 20), np.random.default_rng(s), 0.75), label) for s in range(60)]
    plain = [qualifies(seg.random_crop_box(label, (20, 20), np.random.default_rng(s), 1.0), label) for s in range(60)]
    # 9/81 of uniform crops qualify; with up to 11 draws about 1 - (72/81)^11 = 73 %
    assert np.mean(plain) < 0.25 and np.mean(rule) > 0.5
    # the draw the rule keeps is the first qualifying one: replay the same RNG by hand
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    box = seg.random_crop_box(label, (20, 20), rng, 0.75)
    for _ in range(11):
        y, x = int(ref.integers(0, 81)), int(ref.integers(0, 81))
        if qualifies((y, y + 20, x, x + 20), label):
            break
    assert box == (y, y + 20, x, x + 20)
    # ignored pixels do not count: one class + ignore is not "two classes"
    label2 = np.full((100, 100), 255, np.uint8)
    label2[:, :50] = 0
    assert not qualifies(seg.random_crop_box(label2, (20, 20), np.random.default_rng(0), 0.75), label2)
    assert seg.random_crop_box(label, (200, 200), np.random.default_rng(0), 0.75) == (0, 100, 0, 100)


def test_train_transform_shapes_padding_and_determinism():
    cfg = SegmentationConfig(img_scale=[64, 32], ratio_range=[0.5, 0.5], crop_size=[32, 32], num_classes=4)
    rng_img = np.random.default_rng(0)
    img = rng_img.integers(0, 256, (40, 60, 3)).astype(np.uint8)
    label = rng_img.integers(0, 4, (40, 60)).astype(np.uint8)
    x, y = seg.train_transform(img, label, cfg, np.random.default_rng(1))
    x2, y2 = seg.train_transform(img, label, cfg, np.random.default_rng(1))
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and x.dtype == np.float32
    assert (x == x2).all() and (y == y2).all()
    # ratio 0.5 of (64, 32) bounds the 40x60 image to 16x24 (keep ratio): the rest is padding
    assert (y[16:] == 255).all() and (y[:, 24:] == 255).all() and (y[:16, :24] != 255).all()
    assert (x[:, 16:] == 0).all()


def test_photometric_distortion_is_uint8_and_changes_colours():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    outs = [seg.photometric_distortion(img, np.random.default_rng(s)) for s in range(6)]
    assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
    assert any(not np.array_equal(o, img) for o in outs)


def test_missing_folder_and_bad_recipe_key_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADE20K layout not found"):
        seg.ade20k_pairs(tmp_path / "nope", "training")
    with pytest.raises(ValueError, match="data_dir"):
        seg.dataset_root(SegmentationConfig(dataset="ade20k"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: coc_test\nhead_chanels: 8\n")
    with pytest.raises(ValueError, match="head_chanels.*did you mean head_channels"):
        SegmentationConfig.from_yaml(str(bad))
    with pytest.raises(ValueError, match="head must be one of"):
        SegmentationConfig(head="psp").check()
    with pytest.raises(ValueError, match="aug_test_ratios"):
        SegmentationConfig(aug_test_ratios=[]).check()


def test_every_segmentation_recipe_loads():
    from visionzoo.engine.config import list_recipes

    names = [n for n in list_recipes() if n.startswith("segmentation/")]
    assert len(names) == 18  # 6 CoC + 8 GPViT + 1 UDI official, 3 CPU recipes
    for name in names:
        cfg = SegmentationConfig.from_yaml(name)
        assert cfg.steps > 0 and cfg.notes and cfg.task == "segment", name


# ----------------------------------------------------------------------------------------------------------------
# inference

def test_slide_windows_cover_the_image_exactly():
    for h, w in [(512, 683), (300, 200), (512, 512), (700, 1100)]:
        wins = seg.slide_windows(h, w, (512, 512), (341, 341))
        count = np.zeros((h, w), int)
        for y1, y2, x1, x2 in wins:
            assert (y2 - y1, x2 - x1) == (min(512, h), min(512, w)) and y1 >= 0 and x1 >= 0
            count[y1:y2, x1:x2] += 1
        assert count.min() >= 1
        ny = max(h - 512 + 340, 0) // 341 + 1
        nx = max(w - 512 + 340, 0) // 341 + 1
        assert len(wins) == ny * nx


def test_slide_equals_whole_for_a_pointwise_model(one_thread):
    class Pointwise(nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x)

    model = Pointwise().eval()
    x = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        whole = seg.predict_logits(model, x, "whole")
        slide = seg.predict_logits(model, x, "slide", crop=(32, 32), stride=(21, 21))
    assert torch.allclose(whole, slide, atol=1e-6)


def test_aug_test_averages_softmax_over_scales_and_flips(one_thread):
    """mmseg aug_test: each (scale, flip) prediction is resized to the label size, softmaxed, flipped back, and the
    probabilities are averaged; a mirror-equivariant (pointwise) model gives the same result with and without flip,
    a model that looks sideways does not."""
    class Sideways(nn.Module):  # logits at column j come from the pixel at column j + shift
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.conv, self.shift = nn.Conv2d(3, 3, 1), 1

        def forward(self, x):
            return self.conv(torch.roll(x, -self.shift, dims=-1))

    torch.manual_seed(0)
    model = Sideways().eval()
    out = (20, 30)
    imgs = [torch.randn(1, 3, 20, 30), torch.randn(1, 3, 10, 15)]
    with torch.no_grad():
        got = seg.aug_test_probs(model, imgs, out, flip=True)
        parts = []
        for x in imgs:
            parts.append(seg._resize(model(x), out).softmax(1))
            parts.append(seg._resize(model(x.flip(-1)), out).softmax(1).flip(-1))
        torch.testing.assert_close(got, torch.stack(parts).mean(0))
        assert not torch.allclose(got, seg.aug_test_probs(model, imgs, out, flip=False), atol=1e-3)
        model.shift = 0  # pointwise: flipping changes nothing
        torch.testing.assert_close(seg.aug_test_probs(model, imgs, out, flip=True),
                                   seg.aug_test_probs(model, imgs, out, flip=False))
    assert torch.allclose(got.sum(1), torch.ones(1, *out))


# ----------------------------------------------------------------------------------------------------------------
# training: schedule, CLI end to end, exact resume

def test_poly_schedule_with_warmup_matches_mmcv():
    cfg = SegmentationConfig(lr=1.2e-4, steps=160000, sched="poly", poly_power=1.0, warmup_iters=1500,
                             warmup_ratio=1e-6)
    it = 1000
    regular = (1 - it / 160000) ** 1.0
    assert seg.lr_factor(cfg, it) == pytest.approx(regular * (1 - (1 - it / 1500) * (1 - 1e-6)))
    assert seg.lr_factor(cfg, 80000) == pytest.approx(0.5)


def test_old_recipe_keys_are_aliases_with_a_note(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="visionzoo"):
        cfg = SegmentationConfig.from_dict({"iters": 7, "eval_interval": 3, "ckpt_interval": 2, "max_keep_ckpts": 5})
    assert (cfg.steps, cfg.eval_every_steps, cfg.checkpoint_every_steps, cfg.iters) == (7, 3, 2, 7)
    assert "'iters' is now spelled 'steps'" in caplog.text and "'max_keep_ckpts' is ignored" in caplog.text
    with pytest.raises(ValueError, match="both iters .* and steps"):
        SegmentationConfig.from_dict({"iters": 7, "steps": 8})
    with pytest.raises(ValueError, match="classify.*takes segmentation recipes"):
        SegmentationConfig.from_dict({"task": "classify"})


def test_optimizer_groups_no_decay_and_head_lr_mult():
    cfg = SegmentationConfig(head="segformer", num_classes=3, head_channels=8, weight_decay=0.01,
                             no_decay_keys=["norm", "1d"], lr_mults={"decode_head": 10.0})
    model = seg.build_segmentor(cfg, backbone=_PointwiseBackbone())
    opt = seg.build_optimizer(model, cfg, lr=0.5)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr_scale"] == (10.0 if name.startswith("decode_head") else 1.0), name
        assert g["lr"] == 0.5 * g["lr_scale"], name
        assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 0.01), name


def _tiny_recipe(tmp_path, **over):
    """The CPU recipe shrunk to 4 iterations of batch 2 on 6 generated scenes (the old key names on purpose)."""
    from visionzoo.engine.config import find_recipe

    data = yaml.safe_load(find_recipe("segmentation/semfpn_shapes_cpu").read_text())
    data.pop("steps"), data.pop("eval_every_steps"), data.pop("checkpoint_every_steps")
    data.update(dict(iters=4, batch_size=2, eval_interval=2, ckpt_interval=2, log_interval=1, max_keep_ckpts=5,
                     shapes_size=[64, 64], shapes_train=6, shapes_val=2, img_scale=[128, 32], crop_size=[32, 32],
                     data_dir=str(tmp_path / "shapes")))
    data.update(over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _rows(run):
    from visionzoo.engine.logging import read_metrics

    timing = ("_time_s", "img_per_sec", "seconds")
    return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in read_metrics(run / "metrics.csv")]


def _same_weights(a, b):
    from visionzoo.engine.state import load_train_state

    wa, wb = load_train_state(a)["model"], load_train_state(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert float((wa[k].double() - wb[k].double()).abs().max()) <= 1e-6, k


def test_cli_train_stop_resume_eval_visualize(tmp_path, one_thread, capsys):
    from visionzoo.cli import main

    recipe = _tiny_recipe(tmp_path)
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    base = ["segment", "train", "--recipe", recipe, "--device", "cpu"]
    assert main(base + ["--out", str(run1)]) == 0
    assert {p.name for p in run1.iterdir()} >= {"train_state.pt", "metrics.csv", "config.yaml", "best", "last"}
    summary = json.loads((run1 / "summary.json").read_text())
    assert 0.0 <= summary["mIoU"] <= 1.0 and summary["global_step"] == 4
    # stopped after iteration 3 (mid-way between two evaluations), then resumed: the same weights and metrics.csv
    assert main(base + ["--out", str(run2), "--max-steps", "3"]) == 0
    assert main(["segment", "train", "--resume", str(run2), "--device", "cpu"]) == 0
    _same_weights(run1, run2)
    assert _rows(run1) == _rows(run2) and [r["step"] for r in _rows(run1)] == ["2", "4"]
    # eval (whole and slide) of the run folder, on the data it trained on; results JSON written
    out = tmp_path / "eval.json"
    for ckpt in (run1, run1 / "best", run1 / "last", run1 / "train_state.pt"):
        assert main(["segment", "eval", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu"]) == 0
        assert json.loads(out.read_text())["mIoU"] == pytest.approx(summary["best"]), ckpt
    assert main(["segment", "eval", "--checkpoint", str(run1), "--mode", "slide", "--device", "cpu"]) == 0
    assert "slide: mIoU" in capsys.readouterr().out
    # multi-scale + flip test: the dataset gives one image per ratio of img_scale (128x32 bounds -> 32x32 at 1.0)
    assert main(["segment", "eval", "--checkpoint", str(run1), "--aug-test", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "whole + aug-test: mIoU" in capsys.readouterr().out
    assert json.loads(out.read_text())["aug_test"] == {"ratios": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True}
    cfg = SegmentationConfig.from_yaml(recipe)
    imgs, label = seg.SegDataset(seg.ade20k_pairs(tmp_path / "shapes", "validation"), cfg, train=False,
                                 aug_test=True)[0]
    assert [tuple(x.shape[1:]) for x in imgs] == [(32, 32), (32, 32), (32, 32), (64, 64), (64, 64), (64, 64)]
    assert label.shape == (64, 64)
    # the untrained baseline of the learning check: the weights the run started from
    from visionzoo.tasks import segment as segtask

    assert main(["segment", "eval", "--recipe", recipe, "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["checkpoint"].startswith("untrained")
    a, b = segtask.untrained_segmentor(cfg).state_dict(), segtask.untrained_segmentor(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # visualize
    img = next((tmp_path / "shapes" / "images" / "validation").glob("*.jpg"))
    png = tmp_path / "overlay.png"
    assert main(["segment", "visualize", "--checkpoint", str(run1), "--image", str(img), "--out", str(png),
                 "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(png).size == (64, 64)
    # resuming a finished run, or with another recipe, is refused with a clear message
    capsys.readouterr()
    assert main(["segment", "train", "--resume", str(run1), "--device", "cpu"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["segment", "train", "--resume", str(run1), "--lr", "0.1", "--device", "cpu"]) == 2
    assert "resume with the same recipe" in capsys.readouterr().err
    # a second run into the finished folder is refused without touching it
    before = {p: p.read_bytes() for p in run1.rglob("*") if p.is_file()}
    assert main(base + ["--out", str(run1)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run1.rglob("*") if p.is_file()} == before


def test_sigint_then_resume_loses_no_step(tmp_path, one_thread):
    import os
    import signal

    from visionzoo.engine.loop import RunInterrupted, fit
    from visionzoo.engine.state import load_train_state
    from visionzoo.tasks import segment as segtask

    cfg = SegmentationConfig.from_yaml(_tiny_recipe(tmp_path))
    seg.train(cfg, out=tmp_path / "ref", device="cpu")

    class Interrupted(segtask.SegmentTask):
        def after_update(self, model, ctx):
            if ctx.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted, match="--resume"):
        fit(Interrupted(dataclasses.replace(cfg, output=str(tmp_path), experiment="sig")), device="cpu")
    assert load_train_state(tmp_path / "sig")["progress"]["global_step"] == 3
    seg.train(cfg, resume=tmp_path / "sig", device="cpu")
    _same_weights(tmp_path / "ref", tmp_path / "sig")
    assert _rows(tmp_path / "ref") == _rows(tmp_path / "sig")


def test_nan_loss_stops_and_keeps_a_finite_checkpoint(tmp_path, one_thread, monkeypatch):
    from safetensors.torch import load_file

    from visionzoo.engine.loop import NonFiniteLossError
    from visionzoo.engine.state import load_train_state
    from visionzoo.tasks import segment as segtask

    step = segtask.SegmentTask.train_step

    def nan_from_step_3(self, net, batch, ctx):
        out = step(self, net, batch, ctx)
        if ctx.step >= 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(segtask.SegmentTask, "train_step", nan_from_step_3)
    cfg = SegmentationConfig.from_yaml(_tiny_recipe(tmp_path))
    with pytest.raises(NonFiniteLossError, match="NaN"):
        seg.train(cfg, out=tmp_path / "nan", device="cpu")
    state = load_train_state(tmp_path / "nan")
    assert state["progress"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    last = load_file(str(tmp_path / "nan" / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())


def _old_run(folder, cfg, recipe):
    """A run folder as visionzoo <= 0.1 wrote it: iter_N.pth (model, optimizer, scaler, iter, history, config,
    data_root), plain torch.save pickles of tensors, numbers, strings and dicts."""
    from visionzoo.tasks import segment as segtask

    folder.mkdir()
    model = segtask.untrained_segmentor(cfg)
    config = yaml.safe_load(open(recipe))  # the old field names (iters, eval_interval, ...)
    torch.save({"model": model.state_dict(), "optimizer": {}, "scaler": {}, "iter": 2, "history": [],
                "config": config, "data_root": cfg.data_dir}, folder / "iter_2.pth")
    return model


def test_old_iter_pth_still_evaluates_and_refuses_resume(tmp_path, one_thread, capsys):
    from visionzoo.cli import main

    recipe = _tiny_recipe(tmp_path)
    cfg = SegmentationConfig.from_yaml(recipe)
    seg.dataset_root(cfg)  # generate the scenes
    model = _old_run(tmp_path / "old", cfg, recipe).eval()
    expected = seg.evaluate(model, seg.ade20k_pairs(cfg.data_dir, "validation"), cfg, torch.device("cpu"))["mIoU"]
    for path in (tmp_path / "old", tmp_path / "old" / "iter_2.pth"):
        assert main(["segment", "eval", "--checkpoint", str(path), "--device", "cpu"]) == 0
        assert f"mIoU {expected:.4f}" in capsys.readouterr().out
        assert main(["segment", "train", "--recipe", recipe, "--resume", str(path), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "older visionzoo" in err and "segment eval --checkpoint" in err and "Traceback" not in err


def test_a_malicious_pickle_runs_nothing(tmp_path, capsys):
    from visionzoo.cli import main

    recipe = _tiny_recipe(tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "iter_4.pth"
    torch.save({"model": RunsCodeWhenUnpickled(marker), "config": {}}, evil)
    fake_run = tmp_path / "fake_run"
    fake_run.mkdir()
    torch.save({"progress": {}, "x": RunsCodeWhenUnpickled(marker)}, fake_run / "train_state.pt")
    (fake_run / "config.yaml").write_text(open(recipe).read())
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    commands = [["train", "--recipe", recipe, "--resume", str(evil)], ["train", "--resume", str(fake_run)],
                ["eval", "--checkpoint", str(evil)], ["eval", "--checkpoint", str(fake_run)],
                ["visualize", "--checkpoint", str(evil), "--image", str(img), "--out", str(tmp_path / "o.png")],
                ["train", "--recipe", recipe, "--out", str(tmp_path / "o"), "--set", f"pretrained={evil}"]]
    for cmd in commands:
        capsys.readouterr()
        assert main(["segment", *cmd, "--device", "cpu"]) == 2, cmd
        err = capsys.readouterr().err
        assert not marker.exists(), cmd
        assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "weights_only" in err or "Refused" in err, (cmd, err)
    assert not (tmp_path / "o").exists()


def test_a_classify_run_folder_is_a_pretrained_backbone(tmp_path, one_thread):
    """``--set pretrained=RUN``: the backbone weights of any run folder (here a supervised udi_vit_test run)."""
    from visionzoo.engine.config import TrainConfig
    from visionzoo.tasks.classify import train as classify_train

    cls_cfg = TrainConfig(model="udi_vit_test", dataset="digits", img_size=32, epochs=1, max_steps=1, batch_size=8,
                          output=str(tmp_path), experiment="cls", workers=0)
    classify_train(cls_cfg)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "cls" / "last" / "model.safetensors"))
    cfg = SegmentationConfig.from_yaml(_tiny_recipe(tmp_path, pretrained=str(tmp_path / "cls")))
    model = seg.build_segmentor(cfg)
    body = {k.split("vit.", 1)[1]: v for k, v in model.backbone.state_dict().items() if "vit." in k}
    shared = [k for k in body if k in saved]
    assert len(shared) > 10 and all(torch.equal(body[k], saved[k]) for k in shared)


def test_cli_errors_are_clear(tmp_path, capsys):
    from visionzoo.cli import main

    assert main(["segment", "eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    recipe = _tiny_recipe(tmp_path, dataset="ade20k", data_dir=str(tmp_path / "no_ade"))
    assert main(["segment", "train", "--recipe", recipe, "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "ADE20K layout not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["segment", "train", "--device", "cpu"]) == 2
    assert "needs --recipe" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# learning check (slow): a short CPU run on the embedded shapes beats the untrained model by a clear margin

@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["semfpn_shapes_cpu", "upernet_shapes_cpu", "segformer_shapes_cpu"])
def test_learning_check_on_shapes(recipe, tmp_path, one_thread):
    """1000-1500 iterations (1-6 min on one core): trained segments shapes, untrained does not."""
    cfg = SegmentationConfig.from_yaml(f"segmentation/{recipe}")
    cfg = dataclasses.replace(cfg, data_dir=str(tmp_path / "shapes"))
    from visionzoo.tasks import segment as segtask

    seg.train(cfg, tmp_path / "run", device="cpu")
    root = seg.dataset_root(cfg)
    untrained = seg.evaluate(segtask.untrained_segmentor(cfg), seg.ade20k_pairs(root, "validation"), cfg,
                             torch.device("cpu"))
    model = segtask.load_segmentor(tmp_path / "run" / "last")[0]
    trained = seg.evaluate(model, seg.ade20k_pairs(root, "validation"), cfg, torch.device("cpu"))
    assert trained["mIoU"] > untrained["mIoU"] + 0.05, (trained["mIoU"], untrained["mIoU"])
    shapes_iou = [v["IoU"] or 0.0 for k, v in trained["per_class"].items() if k != "background"]
    assert max(shapes_iou) > 0.15, trained["per_class"]
