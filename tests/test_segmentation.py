"""Semantic segmentation (visionzoo.dense.segmentation): heads, metrics, data, inference, CLI train/eval/resume."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from visionzoo.dense import segmentation as seg
from visionzoo.dense.segmentation import SegmentationConfig


def _parser():
    p = argparse.ArgumentParser()
    seg.add_arguments(p)
    return p


def _cli(argv) -> int:
    return seg.run(_parser().parse_args(argv))


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
        assert cfg.iters > 0 and cfg.notes, name


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
    cfg = SegmentationConfig(lr=1.2e-4, iters=160000, sched="poly", poly_power=1.0, warmup_iters=1500,
                             warmup_ratio=1e-6)
    it = 1000
    regular = (1 - it / 160000) ** 1.0
    assert seg.lr_factor(cfg, it) == pytest.approx(regular * (1 - (1 - it / 1500) * (1 - 1e-6)))
    assert seg.lr_factor(cfg, 80000) == pytest.approx(0.5)


def test_optimizer_groups_no_decay_and_head_lr_mult():
    cfg = SegmentationConfig(head="segformer", num_classes=3, head_channels=8, weight_decay=0.01,
                             no_decay_keys=["norm", "1d"], lr_mults={"decode_head": 10.0})
    model = seg.build_segmentor(cfg, backbone=_PointwiseBackbone())
    opt = seg.build_optimizer(model, cfg)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr_scale"] == (10.0 if name.startswith("decode_head") else 1.0), name
        assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 0.01), name


def _tiny_recipe(tmp_path, **over):
    from visionzoo.engine.config import find_recipe

    data = yaml.safe_load(find_recipe("segmentation/semfpn_shapes_cpu").read_text())
    data.update(dict(iters=4, batch_size=2, eval_interval=4, ckpt_interval=2, log_interval=2, max_keep_ckpts=5,
                     shapes_size=[64, 64], shapes_train=6, shapes_val=2, img_scale=[128, 32], crop_size=[32, 32],
                     data_dir=str(tmp_path / "shapes")))
    data.update(over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_train_eval_resume_is_exact(tmp_path, one_thread, capsys):
    recipe = _tiny_recipe(tmp_path)
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    assert _cli(["train", "--recipe", recipe, "--out", str(run1), "--device", "cpu"]) == 0
    assert sorted(p.name for p in run1.glob("iter_*.pth")) == ["iter_2.pth", "iter_4.pth"]
    res = json.loads((run1 / "results.json").read_text())
    assert 0.0 <= res["final"]["mIoU"] <= 1.0 and res["iter"] == 4 and res["best"]["iter"] == 4
    # resume from the iteration-2 checkpoint into a new folder: iterations 2-3 repeat exactly
    assert _cli(["train", "--recipe", recipe, "--out", str(run2), "--resume", str(run1 / "iter_2.pth"),
                 "--device", "cpu"]) == 0
    a = torch.load(run1 / "iter_4.pth", weights_only=False)
    b = torch.load(run2 / "iter_4.pth", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r for r in a["history"] if "loss" in r][-1]["loss"] == [r for r in b["history"] if "loss" in r][-1]["loss"]
    # eval (whole and slide) on the folder the run trained on; results JSON written
    out = tmp_path / "eval.json"
    assert _cli(["eval", "--checkpoint", str(run1), "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(res["final"]["mIoU"])
    assert _cli(["eval", "--checkpoint", str(run1), "--mode", "slide", "--device", "cpu"]) == 0
    assert "slide: mIoU" in capsys.readouterr().out
    # multi-scale + flip test: the dataset gives one image per ratio of img_scale (128x32 bounds -> 32x32 at 1.0)
    assert _cli(["eval", "--checkpoint", str(run1), "--aug-test", "--out", str(out), "--device", "cpu"]) == 0
    assert "whole + aug-test: mIoU" in capsys.readouterr().out
    assert json.loads(out.read_text())["aug_test"] == {"ratios": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True}
    cfg = SegmentationConfig.from_yaml(recipe)
    imgs, label = seg.SegDataset(seg.ade20k_pairs(tmp_path / "shapes", "validation"), cfg, train=False,
                                 aug_test=True)[0]
    assert [tuple(x.shape[1:]) for x in imgs] == [(32, 32), (32, 32), (32, 32), (64, 64), (64, 64), (64, 64)]
    assert label.shape == (64, 64)
    # the untrained baseline of the learning check: same seed, same initial weights as the run's start
    assert _cli(["eval", "--recipe", recipe, "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["checkpoint"].startswith("untrained")
    # visualize
    img = next((tmp_path / "shapes" / "images" / "validation").glob("*.jpg"))
    png = tmp_path / "overlay.png"
    assert _cli(["visualize", "--checkpoint", str(run1), "--image", str(img), "--out", str(png),
                 "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(png).size == (64, 64)
    # resuming a finished run / another recipe is refused with a clear message
    assert _cli(["train", "--recipe", recipe, "--out", str(run1), "--resume", "--device", "cpu"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert _cli(["train", "--recipe", recipe, "--out", str(run2), "--resume", str(run1 / "iter_2.pth"),
                 "--lr", "0.1", "--device", "cpu"]) == 2
    assert "resume with the same recipe" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert _cli(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    recipe = _tiny_recipe(tmp_path, dataset="ade20k", data_dir=str(tmp_path / "no_ade"))
    assert _cli(["train", "--recipe", recipe, "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "ADE20K layout not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# learning check (slow): a short CPU run on the embedded shapes beats the untrained model by a clear margin

@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["semfpn_shapes_cpu", "upernet_shapes_cpu", "segformer_shapes_cpu"])
def test_learning_check_on_shapes(recipe, tmp_path, one_thread):
    """1000 iterations (about 2 min on a quiet core, 6 under load): trained segments shapes, untrained does not."""
    cfg = SegmentationConfig.from_yaml(f"segmentation/{recipe}")
    cfg = dataclasses.replace(cfg, data_dir=str(tmp_path / "shapes"))
    res = seg.train(cfg, tmp_path / "run", device="cpu", log=lambda *a: None)
    root = seg.dataset_root(cfg)
    torch.manual_seed(cfg.seed)
    untrained = seg.evaluate(seg.build_segmentor(cfg), seg.ade20k_pairs(root, "validation"), cfg,
                             torch.device("cpu"))
    trained = res["final"]
    assert trained["mIoU"] > untrained["mIoU"] + 0.05, (trained["mIoU"], untrained["mIoU"])
    shapes_iou = [v["IoU"] or 0.0 for k, v in trained["per_class"].items() if k != "background"]
    assert max(shapes_iou) > 0.15, trained["per_class"]
