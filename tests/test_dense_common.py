"""The embedded dense dataset (COCO and ADE20K layouts) and the shared mmcv-style lr / parameter-group rules."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo.dense import common, shapes
from visionzoo.engine.schedule import FactorSchedule, mmcv_factor


def test_scene_is_deterministic_and_consistent():
    img_a, inst_a = shapes.render_scene(3, (96, 80))
    img_b, inst_b = shapes.render_scene(3, (96, 80))
    assert img_a.shape == (96, 80, 3) and img_a.dtype == np.uint8
    np.testing.assert_array_equal(img_a, img_b)
    assert len(inst_a) == len(inst_b) >= 1
    covered = np.zeros((96, 80), dtype=int)
    for inst in inst_a:
        covered += inst["mask"]
        ys, xs = np.nonzero(inst["mask"])
        x, y, w, h = inst["bbox"]
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert 1 <= inst["category_id"] <= len(shapes.SHAPE_CLASSES)
    assert covered.max() == 1  # shapes never overlap
    assert not np.array_equal(img_a, shapes.render_scene(4, (96, 80))[0])


def test_coco_layout(tmp_path):
    pycocotools = pytest.importorskip("pycocotools.coco")
    root = shapes.write_coco(tmp_path / "coco", n_train=4, n_val=2, size=(64, 64), seed=1)
    coco = pycocotools.COCO(str(root / "annotations" / "instances_val2017.json"))
    assert len(coco.getImgIds()) == 2 and len(coco.getCatIds()) == 3
    ious = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        img_info = coco.loadImgs(ann["image_id"])[0]
        assert (root / "val2017" / img_info["file_name"]).is_file()
        mask = coco.annToMask(ann).astype(bool)
        _, instances = shapes.render_scene(shapes._scene_seed(1, "val", ann["image_id"] - 1), (64, 64))
        best = max(instances, key=lambda i: (i["mask"] & mask).sum())
        iou = (best["mask"] & mask).sum() / (best["mask"] | mask).sum()
        ious.append(iou)
        assert iou > 0.7 and best["category_id"] == ann["category_id"]
    assert np.mean(ious) > 0.85  # pycocotools' polygon rasterisation ~ the drawn mask (edges differ by a pixel)


def test_ade20k_layout(tmp_path):
    root = shapes.write_ade20k(tmp_path / "ade", n_train=3, n_val=2, size=(64, 48), seed=2)
    info = json.loads((root / "classes.json").read_text())
    assert info["classes"][0] == "background" and info["reduce_zero_label"]
    images = sorted((root / "images" / "training").glob("*.jpg"))
    assert [p.stem for p in images] == [f"ADE_train_{i:08d}" for i in (1, 2, 3)]
    label = np.asarray(Image.open(root / "annotations" / "training" / f"{images[0].stem}.png"))
    assert label.shape == (64, 48) and label.min() >= 1 and label.max() <= len(info["classes"])
    assert (label > 1).any()


def test_mmcv_factor_matches_mmcv_rules():
    # step 1x: steps at 8 and 11 of 12 epochs, 500-iteration linear warm-up from 0.001
    f = lambda it: mmcv_factor(it, 1200, "step", warmup_iters=500, warmup_ratio=0.001, steps=(800, 1100))
    assert f(0) == pytest.approx(0.001)
    assert f(250) == pytest.approx(1 - 0.5 * 0.999)
    assert f(500) == 1.0 and f(799) == 1.0
    assert f(800) == pytest.approx(0.1) and f(1100) == pytest.approx(0.01)
    # poly power 1 down to 0 with warm-up multiplying the poly value
    p = lambda it: mmcv_factor(it, 1000, "poly", warmup_iters=100, warmup_ratio=1e-6, power=1.0)
    assert p(1000) == 0.0 and p(500) == pytest.approx(0.5)
    assert p(50) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert mmcv_factor(500, 1000, "poly", power=0.9, min_ratio=0.1) == pytest.approx(0.5 ** 0.9 * 0.9 + 0.1)
    with pytest.raises(ValueError, match="poly"):
        mmcv_factor(0, 10, "cosinus")


def test_param_groups_and_set_lr():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    model.register_parameter("pos_embed", torch.nn.Parameter(torch.zeros(1, 4, 4)))
    groups = common.param_groups(model, 0.05, no_decay_keys=("pos_embed", "1d"), lr_mults={"2.": 10.0})
    by_name = {}
    for g in groups:
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            by_name[name] = (g["weight_decay"], g["lr_scale"])
    assert by_name["0.weight"] == (0.05, 1.0) and by_name["0.bias"] == (0.0, 1.0)
    assert by_name["1.weight"] == (0.0, 1.0) and by_name["pos_embed"] == (0.0, 1.0)
    assert by_name["2.weight"] == (0.05, 10.0) and by_name["2.bias"] == (0.0, 10.0)
    opt = torch.optim.AdamW(groups, lr=1.0)
    FactorSchedule(2e-4, lambda step: 0.5).apply(opt, 0)  # the engine applies each group's lr_scale
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-4, 1e-3])
