"""visionzoo.dense.detection: COCO data, Mask R-CNN / RetinaNet on library backbones, COCO AP, CLI, resume."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from visionzoo.cli import tools
from visionzoo.dense import detection as det
from visionzoo.dense.detection import CocoDetection, DetectionConfig, build_detector, collate
from visionzoo.testing.unsafe import RunsCodeWhenUnpickled


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


def _batches(n, batch_size, world_size, rank, seed, epoch, groups=None):
    """This rank's batches of one epoch as the loop draws them for detection (``DetectTask.sampling`` = pad, the
    aspect groups of ``DetectTask.sample_groups``)."""
    from visionzoo.engine.sampling import EpochBatches
    from visionzoo.tasks.detect import DetectTask

    sampler = EpochBatches(n, batch_size, seed, rank, world_size, mode=DetectTask.sampling,
                           groups=None if groups is None else list(groups))
    return sampler.epoch_batches(epoch)


def test_epoch_batches_shard_and_pad():
    b0 = _batches(5, 2, 2, 0, seed=0, epoch=3)
    b1 = _batches(5, 2, 2, 1, seed=0, epoch=3)
    seen = [i for b in b0 + b1 for i in b]
    assert len(b0) == len(b1) == 2 and sorted(set(seen)) == [0, 1, 2, 3, 4] and len(seen) == 8
    assert b0 != _batches(5, 2, 2, 0, seed=0, epoch=4)
    assert len(_batches(3, 4, 2, 1, seed=0, epoch=0)[0]) == 4  # a global batch larger than the data


def test_epoch_batches_group_by_aspect_like_mmdet():
    groups = np.array([0] * 7 + [1] * 3)  # 7 landscape, 3 portrait images
    ranks = [_batches(10, 2, 2, r, seed=0, epoch=1, groups=groups) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # groups padded to 8 + 4 images = 6 batches of 2, 3 per rank
    for b in ranks[0] + ranks[1]:
        assert len(b) == 2 and len({groups[i] for i in b}) == 1, b  # one aspect group per batch
    seen = [i for b in ranks[0] + ranks[1] for i in b]
    assert sorted(set(seen)) == list(range(10)) and len(seen) == 12
    assert ranks[0] == _batches(10, 2, 2, 0, seed=0, epoch=1, groups=groups)  # a pure function
    assert ranks[0] != _batches(10, 2, 2, 0, seed=0, epoch=2, groups=groups)
    # one group: exactly the plain shuffle (so square-image runs are unchanged)
    assert _batches(10, 2, 2, 1, seed=0, epoch=1, groups=np.zeros(10)) == _batches(10, 2, 2, 1, seed=0, epoch=1)


def test_train_items_come_from_the_seeded_global_rng(coco_root):
    """The loop seeds the global RNGs from (seed, epoch, index) before each item: the same seed gives the same item,
    another seed (another epoch) another flip."""
    from visionzoo.engine.sampling import SeededDataset

    ds = SeededDataset(CocoDetection(coco_root, "train2017", train=True, flip_prob=0.5), seed=0)
    first = [ds[i][0] for i in range(4)]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))
    ds.epoch = 1
    assert not all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))

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
    assert model.head.classification_head.num_classes == 3  # mmdet's K sigmoid logits; labels 1..3 outside
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
# config: old keys, CLI flags

def test_old_keys_are_aliases_with_a_note(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="visionzoo"):
        cfg = DetectionConfig.from_dict(dict(eval_interval=2, checkpoint_interval=0, log_every=5, max_keep_ckpts=3,
                                             max_iters=7))
    assert (cfg.eval_every, cfg.checkpoint_every_steps, cfg.log_interval, cfg.max_steps) == (2, None, 5, 7)
    assert "'eval_interval' is now spelled 'eval_every'" in caplog.text and "max_keep_ckpts" in caplog.text
    assert DetectionConfig.from_dict(dict(ckpt_interval=9)).checkpoint_every_steps == 9
    with pytest.raises(ValueError, match="both eval_interval"):
        DetectionConfig.from_dict(dict(eval_interval=2, eval_every=3))
    from visionzoo.engine.config import RunConfig

    cfg = DetectionConfig.from_yaml("detection/maskrcnn_shapes_cpu")
    assert isinstance(cfg, RunConfig) and cfg.task == "detect" and cfg.eval_every == 4


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    tools.detect(p)
    return p.parse_args(argv)


def test_cli_flags_out_output_experiment_and_set():
    cfg = det.config_from_args(_parse(["train", "--recipe", "detection/maskrcnn_shapes_cpu", "--out", "/x/runs/a",
                                       "-b", "3", "--max-iters", "5", "--set", "eval_interval=2", "clip_grad=35"]))
    assert (cfg.output, cfg.experiment, cfg.batch_size, cfg.max_steps, cfg.eval_every, cfg.clip_grad) == \
        ("/x/runs", "a", 3, 5, 2, 35)
    cfg = det.config_from_args(_parse(["train", "--recipe", "detection/maskrcnn_shapes_cpu", "--output", "/y",
                                       "--experiment", "b", "--max-steps", "4", "--lr", "0.01"]))
    assert (cfg.output, cfg.experiment, cfg.max_steps, cfg.lr) == ("/y", "b", 4, 0.01)


# ---------------------------------------------------------------------------------------------------------------
# training on the engine: run folder, exact resume, NaN stop, refused reuse, export, old files, unsafe files

def _recipe(tmp_path, **kw):
    cfg = _tiny(**kw)
    path = tmp_path / "tiny.yaml"
    import yaml

    data = {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(DetectionConfig(), k)}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run_cfg(tmp_path, name, **kw) -> DetectionConfig:
    """4 training scenes, batch 2: 2 steps per epoch, 2 epochs."""
    return _tiny(**{"epochs": 2, "output": str(tmp_path), "experiment": name, **kw})


def _rows(run):
    """metrics.csv without its timing columns."""
    import csv

    rows = list(csv.DictReader(open(run / "metrics.csv")))
    timing = ("_time_s", "img_per_sec", "seconds")
    return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows]


def test_stop_mid_epoch_then_resume_is_exact(one_thread, tmp_path):
    from visionzoo.cli import main
    from visionzoo.engine.state import load_train_state

    full = det.train(_run_cfg(tmp_path, "full"))
    assert full["global_step"] == 4 and full["epochs_done"] == 2 and full["classes"] == ["circle", "square",
                                                                                          "triangle"]
    part = det.train(_run_cfg(tmp_path, "part"), max_iters=3)  # stops after step 1 of epoch 2
    assert part["global_step"] == 3
    assert load_train_state(tmp_path / "part")["progress"]["step_in_epoch"] == 1
    # the CLI continues the run folder with its own saved settings (no recipe needed)
    assert main(["detect", "train", "--resume", str(tmp_path / "part"), "--device", "cpu"]) == 0
    a, b = load_train_state(tmp_path / "full"), load_train_state(tmp_path / "part")
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert float((a["model"][k].double() - b["model"][k].double()).abs().max()) <= 1e-6, k
    rows = _rows(tmp_path / "full")
    assert rows == _rows(tmp_path / "part") and len(rows) == 2 and "bbox_AP50" in rows[-1]
    assert "train_loss_mask" in rows[-1] and rows[-1]["step"] == "4"


def test_nan_loss_stops_and_keeps_a_finite_last(one_thread, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from visionzoo.engine.loop import NonFiniteLossError
    from visionzoo.engine.state import load_train_state
    from visionzoo.tasks import detect as dt

    step = dt.DetectTask.train_step

    def nan_at_the_last_step(self, net, batch, ctx):
        out = step(self, net, batch, ctx)
        if ctx.step >= 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(dt.DetectTask, "train_step", nan_at_the_last_step)
    with pytest.raises(NonFiniteLossError, match="NaN"):
        det.train(_run_cfg(tmp_path, "nan"))
    last = load_file(str(tmp_path / "nan" / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())
    assert load_train_state(tmp_path / "nan")["progress"]["global_step"] == 2


def test_a_second_run_into_a_run_folder_is_refused_untouched(one_thread, tmp_path, capsys):
    from visionzoo.cli import main
    from visionzoo.engine.state import RunFolderError

    det.train(_run_cfg(tmp_path, "run", epochs=1))
    run = tmp_path / "run"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds a run"):
        det.train(_run_cfg(tmp_path, "run", epochs=1))
    capsys.readouterr()
    assert main(["detect", "train", "--recipe", _recipe(tmp_path), "--out", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "Traceback" not in err
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_cli_train_eval_visualize(one_thread, tmp_path, capsys):
    import csv

    from visionzoo.cli import main

    run = tmp_path / "run"
    assert main(["detect", "train", "--recipe", _recipe(tmp_path), "--out", str(run), "--epochs", "2",
                 "--device", "cpu"]) == 0
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "train_state.pt", "metrics.csv", "summary.json",
                                               "last", "best"}
    assert not (run / "last.pth").exists() and not (run / "metrics.jsonl").exists()
    assert json.loads((run / "last" / "config.json").read_text())["task"] == "detect"
    last_row = list(csv.DictReader(open(run / "metrics.csv")))[-1]
    capsys.readouterr()
    for ckpt in (run / "last", run / "train_state.pt"):  # the final weights: the last row's AP
        out = tmp_path / "m.json"
        assert main(["detect", "eval", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu"]) == 0
        m = json.loads(out.read_text())
        assert m["bbox_AP50"] == pytest.approx(float(last_row["bbox_AP50"])) and "segm_AP" in m, ckpt
    summary = json.loads((run / "summary.json").read_text())
    assert main(["detect", "eval", "--checkpoint", str(run), "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["bbox_AP"] == pytest.approx(summary["best_bbox_AP"])  # run folder: best/

    image = next((run / "shapes_coco_4_2_64x64_s0" / "val2017").glob("*.jpg"))
    assert main(["detect", "visualize", "--checkpoint", str(run), "--image", str(image),
                 "--out", str(tmp_path / "pred.png"), "--score-thresh", "0.0", "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "pred.png").size == (256, 256)  # a 64 px image is drawn x4 (readable tags)
    assert "detections above" in capsys.readouterr().out
    model, cfg, classes = det.load_detector(run / "best")
    assert classes == ["circle", "square", "triangle"] and cfg.fpn_channels == 16 and not model.training
    import shutil

    moved = tmp_path / "moved"  # a moved run folder still evaluates on the shapes it keeps
    shutil.move(str(run), str(moved))
    assert det.evaluate_checkpoint(moved / "last")["bbox_AP50"] == pytest.approx(float(last_row["bbox_AP50"]))
    assert not run.exists()


def _old_run(folder, cfg):
    """A run folder as visionzoo <= 0.1's detection loop wrote it: last.pth (model, optimizer, scaler, epoch,
    iteration, history, classes, config with the old keys, and mid-epoch RNG states), a plain torch.save pickle of
    tensors, numbers, strings, dicts and numpy RNG arrays."""
    import random

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_detector(cfg, 3, pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    config = dataclasses.asdict(cfg)
    for k in ("task", "output", "experiment", "steps", "max_steps", "grad_accum_steps", "lr_base", "lr_base_size",
              "clip_mode", "channels_last", "torchcompile", "model_ema", "model_ema_decay", "model_ema_warmup",
              "eval_every_steps", "checkpoint_every_steps", "eval_every"):
        config.pop(k)
    config.update(eval_interval=1, checkpoint_interval=0)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "epoch": 0,
                "iteration": 2, "history": [{"epoch": 0, "iteration": 2, "loss": 3.0}],
                "classes": ["circle", "square", "triangle"], "config": config, "batch_in_epoch": 1,
                "world_size": 1, "partial_sums": {"loss_mask": 0.7}, "rng": rng, "rng_per_rank": [rng]},
               folder / "last.pth")
    return model


def test_old_last_pth_still_evaluates_and_refuses_resume(one_thread, tmp_path, capsys):
    from visionzoo.cli import main

    cfg = _tiny()
    old = tmp_path / "old"
    model = _old_run(old, cfg).eval()
    root = det.prepare_data(cfg, old)  # an old shapes run kept its data in the run folder
    expected = det.evaluate(model, CocoDetection(root, "val2017"), torch.device("cpu"))["bbox_AP50"]
    for path in (old, old / "last.pth"):
        assert det.evaluate_checkpoint(path)["bbox_AP50"] == pytest.approx(expected), path
        _, _, classes = det.load_detector(path)
        assert classes == ["circle", "square", "triangle"]
    for resume in (old, old / "last.pth"):
        capsys.readouterr()
        assert main(["detect", "train", "--resume", str(resume), "--device", "cpu"]) == 2
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
    recipe = _recipe(tmp_path)
    train = ["detect", "train", "--recipe", recipe, "--out", str(tmp_path / "o"), "--device", "cpu"]
    for cmd in (train + ["--resume", str(evil)], train + ["--resume", str(fake_run)],
                train + ["--resume", str(old_run)],
                ["detect", "eval", "--checkpoint", str(evil), "--device", "cpu"],
                ["detect", "eval", "--checkpoint", str(old_run), "--device", "cpu"],
                ["detect", "visualize", "--checkpoint", str(fake_run / "train_state.pt"), "--image", "x.png",
                 "--out", str(tmp_path / "p.png"), "--device", "cpu"]):
        capsys.readouterr()
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert not marker.exists(), cmd
        assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "weights_only" in err or "Refused" in err, (cmd, err)
    assert not (tmp_path / "o").exists()


def test_a_classify_run_folder_is_a_pretrained_backbone(tmp_path, one_thread):
    """``--pretrained RUN``: the backbone weights of any run folder (here a supervised udi_vit_test run)."""
    from safetensors.torch import load_file

    from visionzoo.engine.config import TrainConfig
    from visionzoo.tasks.classify import train as classify_train

    classify_train(TrainConfig(model="udi_vit_test", dataset="digits", img_size=32, epochs=1, max_steps=1,
                               batch_size=8, output=str(tmp_path), experiment="cls", workers=0))
    saved = load_file(str(tmp_path / "cls" / "last" / "model.safetensors"))
    args = _parse(["train", "--recipe", _recipe(tmp_path, model="udi_vit_test", neck="simple"),
                   "--pretrained", str(tmp_path / "cls")])
    model = build_detector(det.config_from_args(args), 3)
    body = {k.split("vit.", 1)[1]: v for k, v in model.backbone.body.state_dict().items() if "vit." in k}
    shared = [k for k in body if k in saved]
    assert len(shared) > 10 and all(torch.equal(body[k], saved[k]) for k in shared)


def test_cli_errors_are_clear(tmp_path, capsys):
    from visionzoo.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("detector: mask_rcnn\nmodle: coc_test\n")
    assert main(["detect", "train", "--recipe", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "modle (did you mean model?)" in capsys.readouterr().err
    assert main(["detect", "train", "--recipe", _recipe(tmp_path, dataset="coco"), "--out", str(tmp_path / "r"),
                 "--data", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "COCO data not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    assert main(["detect", "train", "--recipe", _recipe(tmp_path, lr=1.0), "--resume", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2
    assert "no train_state.pt" in capsys.readouterr().err
    assert main(["detect", "train", "--device", "cpu"]) == 2
    assert "needs --recipe" in capsys.readouterr().err


def test_resume_with_another_recipe_is_refused(one_thread, tmp_path, capsys):
    from visionzoo.cli import main

    det.train(_run_cfg(tmp_path, "run"), max_iters=1)
    other = _recipe(tmp_path, lr=1.0, epochs=2)
    assert main(["detect", "train", "--recipe", other, "--resume", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "other lr (" in capsys.readouterr().err


_DDP_RECIPE_ARGS = ["--device", "cpu", "--threads", "1"]


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank takes half of every global batch; rank 0 scores and writes; a
    2-process run stopped mid-epoch and resumed with 2 processes ends with the uninterrupted run's weights; resuming
    it with another process count is refused."""
    import csv
    import os
    import subprocess
    import sys

    from visionzoo.engine.state import load_train_state

    recipe = _recipe(tmp_path, batch_size=1)

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
               "-m", "visionzoo", "detect", "train", "--recipe", recipe, "--out", str(out), *_DDP_RECIPE_ARGS, *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                     "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        return load_train_state(out)

    state = torchrun(tmp_path / "ddp")
    assert state["progress"]["global_step"] == 2 and state["world_size"] == 2  # 4 images / (1 x 2 processes)
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))
    assert rows[-1]["num_images"] == "2"  # both val images scored once, from the two shards
    full = torchrun(tmp_path / "full", "--epochs", "2")
    part = torchrun(tmp_path / "part", "--epochs", "2", "--max-iters", "3")  # stops inside epoch 1
    assert part["progress"]["step_in_epoch"] == 1
    from visionzoo.cli import main

    assert main(["detect", "train", "--resume", str(tmp_path / "part"), "--device", "cpu"]) == 2  # one process
    resumed = torchrun(tmp_path / "part", "--epochs", "2", "--resume", str(tmp_path / "part"))
    assert resumed["progress"]["global_step"] == full["progress"]["global_step"] == 4
    for k in full["model"]:
        torch.testing.assert_close(resumed["model"][k], full["model"][k], rtol=0, atol=0, msg=k)
    assert _rows(tmp_path / "part") == _rows(tmp_path / "full")


# ---------------------------------------------------------------------------------------------------------------
# learning check (slow; numbers recorded in docs/dense/detection.md)

@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["detection/maskrcnn_shapes_cpu", "detection/retinanet_shapes_cpu"])
def test_short_cpu_run_beats_untrained(one_thread, tmp_path, recipe):
    """Both together: 6 min 39 s on the 2-core CPU (load about 1-2). Recorded runs: docs/dense/detection.md."""
    cfg = DetectionConfig.from_yaml(recipe)
    # shapes with data_dir set are generated there (same scenes as in a run folder); evaluate only at the end
    cfg = dataclasses.replace(cfg, data_dir=str(tmp_path / "shapes"), eval_every=100)
    before = det.evaluate_checkpoint(None, cfg=cfg)
    after = det.train(cfg, tmp_path / "run", device="cpu")
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


def test_head_predictions_are_fp32_under_bf16():
    # mmdet's force_fp32: the heads' convs run in bf16, but their predictions reach the losses, the box decoding, the
    # scores, top-k and NMS as fp32. torchvision's BoxCoder casts the reference boxes to the regression's dtype, so
    # with bf16 predictions the proposals and detections were bf16 (a corner near 1000 px moves in 4-8 px steps)
    from torchvision.models.detection._utils import BoxCoder

    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors = torch.tensor([[1000.25, 1200.5, 1100.75, 1300.125]])
    codes = torch.tensor([[0.1, -0.2, 0.05, 0.3]]).bfloat16()
    assert (coder.decode_single(codes, anchors).float() - coder.decode_single(codes.float(), anchors)).abs().max() > 1
    for detector in ("mask_rcnn", "retinanet"):
        model = build_detector(_tiny(detector=detector), 3, pretrained=False)
        seen = []
        for name, module in model.named_modules():
            if name in ("rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor", "head"):
                module.register_forward_hook(lambda m, a, out: seen.append(out))
        target = dict(boxes=torch.tensor([[8.0, 10.0, 40.0, 44.0]]), labels=torch.tensor([1]),
                      masks=torch.zeros(1, 64, 64, dtype=torch.uint8))
        target["masks"][0, 10:44, 8:40] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model([torch.rand(3, 64, 64)], [target])
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), detector
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model([torch.rand(3, 64, 64)])[0]
        assert out["boxes"].dtype == out["scores"].dtype == torch.float32, detector
        leaves = [t for o in seen for t in torch.utils._pytree.tree_leaves(o) if isinstance(t, torch.Tensor)]
        assert leaves and all(t.dtype == torch.float32 for t in leaves), detector
