"""visionzoo.dense.detection: COCO data, Mask R-CNN / RetinaNet on library backbones, COCO AP, CLI, resume."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from visionzoo.dense import detection as det
from visionzoo.dense.detection import CocoDetection, DetectionConfig, build_detector, collate


def _tiny(**kw) -> DetectionConfig:
    """A detector small enough for a CPU unit test (fractions of a second per step)."""
    base = dict(detector="mask_rcnn", model="coc_test", dataset="shapes", img_scale=[64, 64], fpn_channels=16,
                representation_size=32, anchor_scale=4, rpn_batch_size_per_image=32, box_batch_size_per_image=32,
                batch_size=2, epochs=1, warmup_iters=2, workers=0, log_interval=1000, detections_per_img=20,
                shapes_kwargs=dict(n_train=4, n_val=2, size=[64, 64], seed=0))
    base.update(kw)
    return DetectionConfig.from_dict(base)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    from visionzoo.dense.shapes import write_coco

    return write_coco(tmp_path_factory.mktemp("coco"), n_train=4, n_val=3, size=(64, 80), seed=1)


# ---------------------------------------------------------------------------------------------------------------
# config and recipes

def test_bad_recipe_key_names_the_key_and_a_fix(tmp_path):
    with pytest.raises(ValueError, match=r"lr_step \(did you mean lr_steps\?\)"):
        DetectionConfig.from_dict(dict(lr_step=[8, 11]))
    with pytest.raises(ValueError, match="detector must be one of"):
        DetectionConfig.from_dict(dict(detector="yolo"))
    with pytest.raises(ValueError, match="retina_head_norm must be null or 'gn'"):
        DetectionConfig.from_dict(dict(retina_head_norm="bn"))
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: coc_test\nbatchsize: 2\n")
    with pytest.raises(ValueError, match="batchsize"):
        DetectionConfig.from_yaml(str(recipe))


def test_missing_coco_folder_is_a_clear_error(tmp_path):
    cfg = DetectionConfig.from_dict(dict(dataset="coco", data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json"):
        det.prepare_data(cfg)
    with pytest.raises(ValueError, match="data_dir"):
        det.prepare_data(DetectionConfig())


def test_every_detection_recipe_loads():
    from visionzoo.engine.config import RECIPES_DIR
    from visionzoo.models import check_model_name

    paths = sorted((RECIPES_DIR / "detection").glob("*.yaml"))
    names = {p.stem for p in paths}
    assert len(paths) == 6 + 16 + 1 + 2
    for size in ("small", "medium"):
        for n in (4, 25, 49):
            assert f"maskrcnn_coc_{size}_p{n}_1x" in names
    for L in (1, 2, 3, 4):
        assert {f"maskrcnn_gpvit_l{L}_1x", f"maskrcnn_gpvit_l{L}_3x_ms", f"retinanet_gpvit_l{L}_1x",
                f"retinanet_gpvit_l{L}_3x"} <= names
    for p in paths:
        cfg = DetectionConfig.from_yaml(str(p))
        check_model_name(cfg.model)
        assert cfg.notes and cfg.epochs > 0, p.name
        if "3x" in p.stem:
            assert cfg.epochs == 36 and cfg.lr_steps == [27, 33] and "GUESS" in cfg.notes


# ---------------------------------------------------------------------------------------------------------------
# data

def test_coco_dataset_round_trip(coco_root):
    from visionzoo.dense.shapes import _scene_seed, render_scene

    ds = CocoDetection(coco_root, "val2017", train=False)
    assert ds.classes == ["circle", "square", "triangle"] and len(ds) == 3
    for i in range(len(ds)):
        image, target = ds[i]
        _, instances = render_scene(_scene_seed(1, "val", i), (64, 80))
        assert image.shape == (3, 64, 80) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (inst["bbox"] for inst in instances)])
        np.testing.assert_allclose(target["boxes"].numpy(), boxes, atol=0.01)
        assert target["labels"].tolist() == [inst["category_id"] for inst in instances]
        for m, inst in zip(target["masks"].numpy().astype(bool), instances):  # polygon -> bitmask
            # COCO rasterises polygons by pixel centre, PIL's drawing also takes the boundary ring
            inside = (m & inst["mask"]).sum() / m.sum()
            assert inside > 0.9 and m.sum() > 0.7 * inst["mask"].sum(), (inside, m.sum(), inst["mask"].sum())


def test_train_split_skips_crowd_and_decodes_rle(coco_root, tmp_path):
    import shutil

    import pycocotools.mask as mask_util

    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    ann_file = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    crowd = np.zeros((64, 80), np.uint8, order="F")
    crowd[5:20, 10:30] = 1
    rle = mask_util.encode(crowd)
    rle["counts"] = rle["counts"].decode()
    data["annotations"].append(dict(id=999, image_id=1, category_id=2, bbox=[10, 5, 20, 15], area=300.0,
                                    iscrowd=1, segmentation=rle))
    data["annotations"].append(dict(id=1000, image_id=1, category_id=3, bbox=[40, 30, 20, 15], area=300.0,
                                    iscrowd=0, segmentation=dict(rle, counts=rle["counts"])))
    data["images"].append(dict(id=77, file_name=data["images"][0]["file_name"], height=64, width=80))
    ann_file.write_text(json.dumps(data))
    ds = CocoDetection(root, "train2017", train=True)
    assert 77 not in ds.ids  # no box: dropped from training
    _, target = ds[(ds.ids.index(1), 0)]
    n_plain = sum(1 for a in data["annotations"] if a["image_id"] == 1 and not a["iscrowd"])
    assert len(target["boxes"]) == n_plain  # the crowd region is skipped
    assert target["masks"][-1].sum() == 300  # the RLE instance decodes to its 15x20 block


def test_flip_moves_boxes_with_masks(coco_root):
    ds = CocoDetection(coco_root, "train2017", train=True, flip_prob=1.0, multiscale="detr", seed=3)
    for epoch in range(3):
        image, target = ds[(0, epoch)]
        again, _ = ds[(0, epoch)]
        assert torch.equal(image, again)  # the augmentation is a function of (seed, epoch, index)
        for box, m in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            if len(xs):
                assert abs(xs.min().item() - box[0].item()) <= 1.5 and abs(xs.max().item() + 1 - box[2].item()) <= 1.5


def test_epoch_batches_shard_and_pad():
    b0 = det.epoch_batches(5, 2, 2, 0, seed=0, epoch=3)
    b1 = det.epoch_batches(5, 2, 2, 1, seed=0, epoch=3)
    seen = [i for b in b0 + b1 for i, _ in b]
    assert len(b0) == len(b1) == 2 and sorted(set(seen)) == [0, 1, 2, 3, 4] and len(seen) == 8
    assert all(e == 3 for b in b0 for _, e in b)
    assert b0 != det.epoch_batches(5, 2, 2, 0, seed=0, epoch=4)
    assert len(det.epoch_batches(3, 4, 2, 1, seed=0, epoch=0)[0]) == 4  # a global batch larger than the data



def test_epoch_batches_group_by_aspect_like_mmdet():
    groups = np.array([0] * 7 + [1] * 3)  # 7 landscape, 3 portrait images
    ranks = [det.epoch_batches(10, 2, 2, r, seed=0, epoch=1, groups=groups) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # groups padded to 8 + 4 images = 6 batches of 2, 3 per rank
    for b in ranks[0] + ranks[1]:
        assert len(b) == 2 and len({groups[i] for i, _ in b}) == 1, b  # one aspect group per batch
    seen = [i for b in ranks[0] + ranks[1] for i, _ in b]
    assert sorted(set(seen)) == list(range(10)) and len(seen) == 12
    assert ranks[0] == det.epoch_batches(10, 2, 2, 0, seed=0, epoch=1, groups=groups)  # a pure function
    assert ranks[0] != det.epoch_batches(10, 2, 2, 0, seed=0, epoch=2, groups=groups)
    # one group: exactly the plain shuffle (so square-image runs are unchanged)
    assert det.epoch_batches(10, 2, 2, 1, seed=0, epoch=1, groups=np.zeros(10)) == \
        det.epoch_batches(10, 2, 2, 1, seed=0, epoch=1)

# ---------------------------------------------------------------------------------------------------------------
# evaluation plumbing

def test_ground_truth_as_predictions_scores_ap_one(coco_root):
    ds = CocoDetection(coco_root, "val2017", train=False)
    outputs, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["boxes"])
        outputs.append(dict(boxes=t["boxes"], labels=t["labels"], scores=torch.linspace(1.0, 0.9, n),
                            masks=t["masks"][:, None].float()))
        ids.append(t["image_id"])
    bbox, segm = det.to_coco_results(outputs, ids, ds.label_to_cat)
    m = det.coco_evaluate(ds.coco, {"bbox": bbox, "segm": segm})
    for k in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert m[k] == pytest.approx(1.0), (k, m[k])
    # a real check: shifting every box by half its width costs AP
    shifted = [dict(o, boxes=o["boxes"] + torch.stack([(o["boxes"][:, 2] - o["boxes"][:, 0]) / 2,
                                                        torch.zeros(len(o["boxes"]))] * 2, 1)) for o in outputs]
    bbox2, _ = det.to_coco_results(shifted, ids, ds.label_to_cat)
    assert det.coco_evaluate(ds.coco, {"bbox": bbox2})["bbox_AP"] < 0.2
    assert det.coco_evaluate(ds.coco, {"bbox": []})["bbox_AP"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# models

def _step(cfg, coco_root):
    torch.manual_seed(0)
    masks = cfg.detector == "mask_rcnn"
    ds = CocoDetection(coco_root, "train2017", train=True, masks=masks)
    model = build_detector(cfg, len(ds.classes), pretrained=False).train()
    images, targets = collate([ds[(i, 0)] for i in range(2)])
    losses = model(list(images), list(targets))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    return losses


def test_mask_rcnn_train_step_all_losses_and_gradients(one_thread, coco_root):
    losses = _step(_tiny(), coco_root)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def test_mask_rcnn_4conv1fc_head_on_vit_simple_pyramid(one_thread, coco_root):
    _step(_tiny(model="udi_vit_test", neck="simple", box_head="4conv1fc"), coco_root)


def test_retinanet_train_step_drops_the_stride4_level(one_thread, coco_root):
    cfg = _tiny(detector="retinanet", anchor_scale=2, retina_head_norm="gn")
    losses = _step(cfg, coco_root)
    assert set(losses) == {"classification", "bbox_regression"}
    model = build_detector(cfg, 3, pretrained=False)
    assert model.backbone.body.strides == [8, 16, 32]  # P3-P5 + P6/P7 on the FPN output
    assert model.head.classification_head.num_classes == 4  # labels 1..3 index the logits directly
    assert model.anchor_generator.sizes[0] == pytest.approx((16.0, 16 * 2 ** (1 / 3), 16 * 2 ** (2 / 3)))


@pytest.mark.parametrize("detector,neck", [("mask_rcnn", "adapter"), ("retinanet", "adapter_single")])
def test_gpvit_adapter_detectors_train(one_thread, coco_root, detector, neck):
    cfg = _tiny(detector=detector, model="gpvit_test", neck=neck, box_head="4conv1fc")
    _step(cfg, coco_root)


def test_detector_transform_uses_backbone_stats_and_divisor():
    model = build_detector(_tiny(model="cswin_test"), 3, pretrained=False)
    assert model.transform.size_divisible == model.backbone.body.size_divisor
    assert tuple(model.transform.image_mean) == tuple(model.backbone.body.mean)
    ms = build_detector(_tiny(multiscale="detr", img_scale=[1333, 800]), 3, pretrained=False)
    assert ms.transform.min_size == tuple(range(480, 801, 32))


def test_mmdet_roi_pool_levels_and_half_pixel_alignment():
    """RoIs go to level floor(log2(sqrt(wh) / 56)) (mmdet's finest_scale rule) and are sampled with aligned=True:
    on a map whose value is the column index, a box's pooled mean is its centre / stride - 0.5 (aligned=False would
    give centre / stride)."""
    import math

    strides = [4, 8, 16, 32]
    feats = {str(i): torch.arange(256 // s, dtype=torch.float32).expand(2, 3, 256 // s, 256 // s) * (i + 1)
             for i, s in enumerate(strides)}  # level i scaled by i + 1 so the level is visible in the output
    sides = [20.0, 100.0, 150.0, 300.0, 480.0, 900.0]  # levels 0, 0, 1, 2, 3, 3 (clamped)
    boxes = [torch.tensor([[8.0, 8.0, 8.0 + a, 8.0 + a] for a in sides]), torch.tensor([[40.0, 20.0, 112.0, 92.0]])]
    pool = det.mmdet_roi_pool(list(feats), strides, 7)
    out = pool(feats, boxes, [(256, 256)] * 2)
    assert out.shape == (7, 3, 7, 7)
    for k, box in enumerate(torch.cat(boxes)):
        x1, y1, x2, y2 = box.tolist()
        level = min(max(math.floor(math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 56 + 1e-6)), 0), 3)
        # sample points inside the map are linear in the column index: the mean is the centre column
        width = 256 // strides[level]
        if (x2 / strides[level]) <= width - 1:
            expected = ((x1 + x2) / 2 / strides[level] - 0.5) * (level + 1)
            assert out[k].mean().item() == pytest.approx(expected, abs=1e-4), (k, level)
        assert out[k].max().item() <= (width - 1) * (level + 1) + 1e-4
    assert [min(max(math.floor(math.log2(a / 56 + 1e-6)), 0), 3) for a in sides] == [0, 0, 1, 2, 3, 3]
    model = build_detector(_tiny(), 3, pretrained=False)
    assert type(model.roi_heads.box_roi_pool).__name__ == "MMDetRoIAlign"
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14) and model.roi_heads.mask_roi_pool.strides == strides
    legacy = build_detector(_tiny(roi_align="torchvision"), 3, pretrained=False)
    assert type(legacy.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIAlign"
    with pytest.raises(ValueError, match="roi_align"):
        _tiny(roi_align="bilinear")


def _meta_params(recipe: str) -> tuple[float, float]:
    """(whole detector, backbone) parameters in millions for 80 COCO classes, built on the meta device."""
    cfg = DetectionConfig.from_yaml(recipe)
    with torch.device("meta"):
        model = build_detector(cfg, 80, pretrained=False)
    body = sum(p.numel() for p in model.backbone.body.parameters())
    return sum(p.numel() for p in model.parameters()) / 1e6, body / 1e6


def test_mask_rcnn_heads_have_the_mmdet_size(one_thread):
    # FPN (in 64/128/320/512) + RPN + Shared2FC box head + FCN mask head for 80 classes: mmdet's Mask R-CNN R50-FPN
    # has 44.17M = 23.28M (R50) + 20.89M, whose R50-sized FPN laterals are 0.72M larger than these -> 20.17M
    total, body = _meta_params("detection/maskrcnn_coc_small_p4_1x")
    assert total - body == pytest.approx(20.17, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,millions", [
    ("maskrcnn_gpvit_l1_1x", 33), ("retinanet_gpvit_l1_1x", 21), ("maskrcnn_gpvit_l2_1x", 50),
    ("retinanet_gpvit_l2_1x", 37), ("maskrcnn_gpvit_l3_1x", 64), ("retinanet_gpvit_l3_1x", 52),
    ("maskrcnn_gpvit_l4_1x", 109), ("retinanet_gpvit_l4_1x", 96)])
def test_gpvit_detectors_match_the_readme_sizes(one_thread, recipe, millions):
    total, _ = _meta_params(f"detection/{recipe}")
    assert millions <= total < millions + 1, total  # the README truncates (e.g. 33.52M is listed as 33M)


def test_single_scale_native_pyramid_is_refused():
    with pytest.raises(ValueError, match="increasing strides"):
        build_detector(_tiny(model="gpvit_test", neck="native"), 3, pretrained=False)


# ---------------------------------------------------------------------------------------------------------------
# CLI: train -> eval -> visualize, and exact resume

def _recipe(tmp_path, **kw):
    cfg = _tiny(**kw)
    path = tmp_path / "tiny.yaml"
    import yaml

    data = {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(DetectionConfig(), k)}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_train_eval_visualize_and_exact_resume(one_thread, tmp_path, capsys):
    from visionzoo.cli import main

    recipe = _recipe(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["detect", "train", "--recipe", recipe, "--out", str(full), "--epochs", "2"]) == 0
    assert main(["detect", "train", "--recipe", recipe, "--out", str(part), "--epochs", "1"]) == 0
    assert main(["detect", "train", "--recipe", recipe, "--out", str(part), "--epochs", "2", "--max-iters", "3",
                 "--resume", str(part)]) == 0  # stops inside epoch 1: a mid-epoch checkpoint
    assert torch.load(part / "last.pth", weights_only=False)["batch_in_epoch"] == 1
    assert main(["detect", "train", "--recipe", recipe, "--out", str(part), "--epochs", "2",
                 "--resume", str(part)]) == 0
    a = torch.load(full / "last.pth", weights_only=False)
    b = torch.load(part / "last.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert [r["epoch"] for r in b["history"]] == [0, 1] and "bbox_AP50" in b["history"][-1]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["classes"] == ["circle", "square", "triangle"]

    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(full), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["bbox_AP50"] == pytest.approx(a["history"][-1]["bbox_AP50"]) and "segm_AP" in m

    image = next((full / "shapes_coco_4_2_64x64_s0" / "val2017").glob("*.jpg"))
    assert main(["detect", "visualize", "--checkpoint", str(full), "--image", str(image),
                 "--out", str(tmp_path / "pred.png"), "--score-thresh", "0.0"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "pred.png").size == (64, 64)
    assert "detections above" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    from visionzoo.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("detector: mask_rcnn\nmodle: coc_test\n")
    assert main(["detect", "train", "--recipe", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "modle (did you mean model?)" in capsys.readouterr().err
    assert main(["detect", "train", "--recipe", _recipe(tmp_path, dataset="coco"), "--out", str(tmp_path / "r"),
                 "--data", str(tmp_path / "missing")]) == 2
    assert "COCO data not found" in capsys.readouterr().err
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    resume_other = _recipe(tmp_path, lr=1.0)
    (tmp_path / "x").mkdir()
    assert main(["detect", "train", "--recipe", resume_other, "--out", str(tmp_path / "x"),
                 "--resume", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank takes half of every global batch; rank 0 scores and writes; a
    mid-epoch checkpoint keeps every rank's RNG, so a resumed 2-process run ends with the uninterrupted run's
    weights; resuming it with another process count is refused."""
    import subprocess
    import sys

    recipe = _recipe(tmp_path, batch_size=1)

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
               "-m", "visionzoo", "detect", "train", "--recipe", recipe, "--out", str(out), "--device", "cpu",
               "--threads", "1", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return torch.load(out / "last.pth", weights_only=False)

    state = torchrun(tmp_path / "ddp")
    assert state["iteration"] == 2  # 4 images / (1 per process x 2 processes)
    assert state["history"][-1]["num_images"] == 2  # both val images scored once, from the two shards
    full = torchrun(tmp_path / "full", "--epochs", "2")
    part = torchrun(tmp_path / "part", "--epochs", "2", "--max-iters", "3")  # stops inside epoch 1
    assert part["batch_in_epoch"] == 1 and len(part["rng_per_rank"]) == 2
    from visionzoo.cli import main

    assert main(["detect", "train", "--recipe", recipe, "--out", str(tmp_path / "part"), "--epochs", "2",
                 "--resume", str(tmp_path / "part"), "--device", "cpu"]) == 2  # one process: refused
    resumed = torchrun(tmp_path / "part", "--epochs", "2", "--resume", str(tmp_path / "part"))
    assert resumed["iteration"] == full["iteration"] == 4
    for k in full["model"]:
        torch.testing.assert_close(resumed["model"][k], full["model"][k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# learning check (slow; numbers recorded in docs/dense/detection.md)

@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["detection/maskrcnn_shapes_cpu", "detection/retinanet_shapes_cpu"])
def test_short_cpu_run_beats_untrained(one_thread, tmp_path, recipe):
    """Both together: 6 min 39 s on the 2-core CPU (load about 1-2). Recorded runs: docs/dense/detection.md."""
    cfg = DetectionConfig.from_yaml(recipe)
    # shapes with data_dir set are generated there (same scenes as in a run folder); evaluate only at the end
    cfg = dataclasses.replace(cfg, data_dir=str(tmp_path / "shapes"), eval_interval=100)
    before = det.evaluate_checkpoint(None, cfg=cfg)
    after = det.train(cfg, tmp_path / "run")["last"]
    assert after["bbox_AP50"] > before["bbox_AP50"] + 0.2, (before, after)


def test_draw_predictions_marks_only_confident_detections():
    from visionzoo.dense.detection import draw_predictions

    img = np.zeros((64, 64, 3), np.uint8)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 10:20, 10:20] = 1
    masks[1, 0, 40:50, 40:50] = 1
    out = dict(boxes=torch.tensor([[5.0, 5.0, 30.0, 30.0], [38.0, 38.0, 52.0, 52.0]]), labels=torch.tensor([1, 2]),
               scores=torch.tensor([0.9, 0.2]), masks=masks)
    drawn = np.asarray(draw_predictions(img, out, ["circle", "square", "triangle"], score_thresh=0.5))
    assert drawn[15, 15].any() and drawn[5, 5].any()  # the mask is blended in, the box outline is drawn
    assert not drawn[45, 45].any() and not drawn[38, 38].any()  # the low-score detection is not
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long), scores=torch.zeros(0),
                 masks=torch.zeros(0, 1, 64, 64))
    assert not np.asarray(draw_predictions(img, empty, None)).any()
