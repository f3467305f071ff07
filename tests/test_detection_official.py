"""Official mmdet detectors: whole-checkpoint conversion through `detect eval --checkpoint`'s loader, the recipe of an
official config, the manifest check, and the mmdet behaviours our torchvision detectors now follow (anchors, resize
rounding, K-class RetinaNet, background-free box/mask predictors). Module-level parity: tests/test_fixtures.py."""
import json
import math

import pytest
import torch
from conftest import FIXTURES

from visionzoo.dense.detection import official
from visionzoo.dense.detection.heads import MMDetBoxPredictor, MMDetMaskPredictor, anchor_generator, build_retina_head
from visionzoo.dense.detection.model import mmdet_resize_size
from visionzoo.errors import ConfigError

MANIFEST = FIXTURES / "dense" / "manifest.json"
needs_manifest = pytest.mark.skipif(not MANIFEST.exists(), reason=f"no dense manifest at {MANIFEST}")


def _manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def _synthetic_official(entry: dict, exp_name: str, path) -> dict:
    """An mmcv checkpoint of the official detector: random tensors of the listed shapes, ``state_dict`` + ``meta``."""
    g = torch.Generator().manual_seed(0)

    def value(i, k, shape):  # random where small, a per-key constant where large (fast; still one value per key)
        if k.endswith("num_batches_tracked"):
            return torch.tensor(7)
        n = math.prod(shape)
        return torch.randn(shape, generator=g) if n < 300_000 else torch.full(shape, float(i))

    sd = {k: value(i, k, s) for i, (k, s) in enumerate(entry["state_dict"])}
    classes = tuple(f"class{i}" for i in range(official.official_num_classes(sd)))
    torch.save({"state_dict": sd, "meta": {"exp_name": exp_name, "CLASSES": classes, "mmdet_version": "2.25.0"}},
               path)
    return sd


@needs_manifest
@pytest.mark.parametrize("variant,checks", [
    pytest.param("gpvit_l1_retinanet_1x", {"head.classification_head.cls_logits.weight": "bbox_head.retina_cls.weight",
                               "backbone.body.adapter.level_embed": "backbone.level_embed",
                               "backbone.fpn.extra_blocks.convs.1.1.running_var": "neck.fpn_convs.4.bn.running_var"},
                 marks=pytest.mark.slow),
    ("mask_rcnn_coc_small_2_fpn_1x_coco", {
        "roi_heads.box_predictor.bbox_pred.weight": "roi_head.bbox_head.fc_reg.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.weight": "roi_head.mask_head.conv_logits.weight",
        "rpn.head.conv.0.0.weight": "rpn_head.rpn_conv.weight"}),
])
def test_official_checkpoint_loads_through_the_eval_loader(tmp_path, capsys, variant, checks):
    from visionzoo.tasks.detect import load_detector

    entry = _manifest()[variant]
    path = tmp_path / "official.pth"
    sd = _synthetic_official(entry, f"{variant}.py", path)
    model, cfg, classes, _ = load_detector(path)  # strict: every key converted, every one of ours filled
    assert "official mmdet checkpoint" in capsys.readouterr().out
    assert cfg.official_config.endswith(f"{variant}.py") and classes[0] == "class0" and len(classes) == 80
    own = model.state_dict()
    for ours, theirs in checks.items():
        assert torch.equal(own[ours], sd[theirs]), ours
    if "roi_head.bbox_head.fc_cls.weight" in sd:  # mmdet's background row is last, ours first
        fc = sd["roi_head.bbox_head.fc_cls.weight"]
        assert torch.equal(own["roi_heads.box_predictor.cls_score.weight"][0], fc[-1])
        assert torch.equal(own["roi_heads.box_predictor.cls_score.weight"][1:], fc[:-1])


def test_official_checkpoint_without_its_config_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="exp_name"):
        official.load_official_checkpoint({"state_dict": {"rpn_head.rpn_conv.weight": torch.zeros(1)}, "meta": {}},
                                          "x.pth")
    assert official.is_official_checkpoint({"state_dict": {"bbox_head.retina_cls.weight": torch.zeros(1)}})
    assert not official.is_official_checkpoint({"model": {}, "config": {}})


def test_official_config_finds_its_recipe_by_rule():
    for size in ("small", "medium"):
        for fold in (2, 5, 7):  # CoC's fold f has f x f centres per region: our recipe p{f^2}
            found = official.recipe_for_official_config(f"mask_rcnn_coc_{size}_{fold}_fpn_1x_coco.py")
            assert found == f"detection/maskrcnn_coc_{size}_p{fold * fold}_1x"
    assert official.recipe_for_official_config("a/b/gpvit_l3_retinanet_1x") == "detection/retinanet_gpvit_l3_1x"
    with pytest.raises(ConfigError, match="no detection recipes"):
        official.recipe_for_official_config("faster_rcnn_r50_fpn_1x_coco.py")


@needs_manifest
def test_manifest_check_catches_a_wrong_layout():
    entry = _manifest()["mask_rcnn_coc_small_2_fpn_1x_coco"]
    assert official.manifest_problems("x", {**entry, "official_builder": "mmseg build_segmentor"}) is None
    bad = [[k, [s[0] + 1, *s[1:]] if k == "neck.fpn_convs.0.conv.weight" else s] for k, s in entry["state_dict"]]
    problems = official.manifest_problems("x", {**entry, "state_dict": bad, "params": entry["params"] + 1})
    assert any("shape mismatches" in p for p in problems) and any("params" in p for p in problems)


# ---------------------------------------------------------------------------------------------------------------
# mmdet behaviours

def test_anchors_are_mmdets_unrounded_at_the_configured_stride():
    """mmdet AnchorGenerator (center_offset 0): w = stride * scale / sqrt(ratio), h = stride * scale * sqrt(ratio),
    centred at stride * (x, y), ratio-major; P6 of an 800 x 1344 input is 13 x 21 at stride 64 (torchvision would
    use 800 // 13 = 61)."""
    from torchvision.models.detection.image_list import ImageList

    gen = anchor_generator([4, 64], (8.0,))
    maps = [torch.zeros(1, 1, 200, 336), torch.zeros(1, 1, 13, 21)]
    anchors = gen(ImageList(torch.zeros(1, 3, 800, 1344), [(800, 1344)]), maps)[0]
    assert anchors.shape == (3 * (200 * 336 + 13 * 21), 4)
    p6 = anchors[3 * 200 * 336:].view(13, 21, 3, 4)
    for r, ratio in enumerate((0.5, 1.0, 2.0)):
        w, h = 64 * 8 / math.sqrt(ratio), 64 * 8 * math.sqrt(ratio)
        expected = torch.tensor([64 * 20 - w / 2, 64 * 12 - h / 2, 64 * 20 + w / 2, 64 * 12 + h / 2])
        assert torch.allclose(p6[12, 20, r], expected, atol=1e-3)
    assert anchors[0, 2].item() == pytest.approx(4 * 8 * math.sqrt(2) / 2, abs=1e-4)  # 22.627, not rounded to 23


def test_test_resize_rounds_like_mmcv():
    assert mmdet_resize_size(480, 640, 800, 1333) == (800, 1067)  # torchvision: 1066
    assert mmdet_resize_size(427, 640, 800, 1333) == (800, 1199)
    assert mmdet_resize_size(300, 1000, 800, 1333) == (400, 1333)  # long side bound
    from visionzoo.dense.detection.model import MMDetTransform

    t = MMDetTransform((800,), 1333, [0.0] * 3, [1.0] * 3, size_divisible=32).eval()
    images, _ = t([torch.rand(3, 480, 640)])
    assert images.image_sizes == [(800, 1067)] and tuple(images.tensors.shape[-2:]) == (800, 1088)


def test_retinanet_has_k_logits_and_reports_labels_from_one():
    from torchvision.models.detection.image_list import ImageList

    from visionzoo.dense.detection.heads import MMDetRetinaNet

    head = build_retina_head(8, 9, 3)
    assert head.classification_head.cls_logits.out_channels == 27
    with torch.no_grad():
        head.classification_head.cls_logits.bias.view(9, 3)[:, 0] = 10.0  # the first logit of every anchor wins
    model = MMDetRetinaNet(torch.nn.Conv2d(3, 8, 1).requires_grad_(False), 3, head=head,
                           anchor_generator=anchor_generator([8], (4.0, 5.0, 6.0)), min_size=32, max_size=32)
    model.backbone.out_channels = 8
    feats = [torch.zeros(1, 8, 4, 4)]
    out = head(feats)
    split = {k: [v] for k, v in out.items()}
    anchors = model.anchor_generator(ImageList(torch.zeros(1, 3, 32, 32), [(32, 32)]), feats)
    dets = model.postprocess_detections(split, [[anchors[0]]], [(32, 32)])[0]
    assert len(dets["labels"]) and (dets["labels"] == 1).all()  # logit column 0 is class 1


def test_box_and_mask_predictors_have_no_background_box_or_mask():
    box = MMDetBoxPredictor(16, 5)
    assert box.bbox_pred.out_features == 20 and box.cls_score.out_features == 6
    scores, deltas = box(torch.randn(3, 16))
    assert deltas.shape == (3, 24) and deltas[:, :4].abs().sum() == 0
    mask = MMDetMaskPredictor(8, 8, 5)
    out = mask(torch.randn(2, 8, 14, 14))
    assert out.shape == (2, 6, 28, 28) and out[:, 0].abs().sum() == 0 and out[:, 1:].abs().sum() > 0


def test_masks_are_pasted_the_mmdet_way():
    """Pixel centre x + 0.5 samples the 28 x 28 mask at column ((x + 0.5 - x0) / (x1 - x0)) * 28 - 0.5 (bilinear,
    zeros outside): on a mask whose value is its column index that is exactly the pasted value inside the box."""
    from visionzoo.dense.detection.model import paste_masks

    masks = torch.arange(28.0).expand(2, 1, 28, 28).contiguous()
    boxes = torch.tensor([[10.3, 20.0, 50.7, 60.2], [0.0, 0.0, 5.0, 5.0]])
    out = paste_masks(masks, boxes, (80, 100), max_elements=8000)  # several chunks
    assert out.shape == (2, 1, 80, 100)
    for x in (15, 30, 45):
        expected = (x + 0.5 - 10.3) / (50.7 - 10.3) * 28 - 0.5
        assert out[0, 0, 40, x].item() == pytest.approx(expected, abs=1e-4)
    assert out[0, 0, 40, 5].item() == 0 and out[0, 0, 70, 30].item() == 0  # outside the box
    assert out[1, 0, 50:, 50:].abs().sum() == 0


def _official_shapes(pattern: dict) -> dict:
    return {k: torch.tensor(1) if not s else torch.randn(s) for k, s in pattern.items()}


def test_other_official_arguments_build_and_load_with_no_new_code():
    """Widths, depths, norms and extra-level modes the fixtures do not use: the official key layout loads strictly."""
    cases = []
    retina = {}
    for b in ("cls", "reg"):
        for i, cin in enumerate((12, 16)):
            retina.update({f"{b}_convs.{i}.conv.weight": [16, cin, 3, 3], f"{b}_convs.{i}.gn.weight": [16],
                           f"{b}_convs.{i}.gn.bias": [16]})
    retina.update({"retina_cls.weight": [6, 16, 3, 3], "retina_cls.bias": [6], "retina_reg.weight": [8, 16, 3, 3],
                   "retina_reg.bias": [8]})
    anchors = dict(octave_base_scale=4, scales_per_octave=2, ratios=[1.0], strides=[8])
    cases.append(("mmdet.HEADS", "RetinaHead", dict(num_classes=3, in_channels=12, feat_channels=16, stacked_convs=2,
                                                     anchor_generator=anchors, norm_cfg=dict(type="GN", num_groups=8)),
                  retina, [torch.randn(1, 12, 4, 4)], {"cls_score.0": (1, 6, 4, 4), "bbox_pred.0": (1, 8, 4, 4)}))
    fpn = {}
    for i, cin in enumerate((16, 32)):
        fpn.update({f"lateral_convs.{i}.conv.weight": [10, cin, 1, 1], f"lateral_convs.{i}.conv.bias": [10]})
    for i in range(4):
        fpn.update({f"fpn_convs.{i}.conv.weight": [10, 32 if i == 2 else 10, 3, 3], f"fpn_convs.{i}.conv.bias": [10]})
    cases.append(("mmdet.NECKS", "FPN", dict(in_channels=[8, 16, 32], out_channels=10, start_level=1,
                                              add_extra_convs="on_input", relu_before_extra_convs=True, num_outs=4),
                  fpn, [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)],
                  {"0": (1, 10, 8, 8), "1": (1, 10, 4, 4), "2": (1, 10, 2, 2), "3": (1, 10, 1, 1)}))
    box = {f"shared_convs.{i}.{k}": s for i in range(2) for k, s in (
        ("conv.weight", [12, 12, 3, 3]), ("bn.weight", [12]), ("bn.bias", [12]), ("bn.running_mean", [12]),
        ("bn.running_var", [12]), ("bn.num_batches_tracked", []))}
    box.update({"shared_fcs.0.weight": [24, 300], "shared_fcs.0.bias": [24], "shared_fcs.1.weight": [24, 24],
                "shared_fcs.1.bias": [24], "fc_cls.weight": [4, 24], "fc_cls.bias": [4], "fc_reg.weight": [12, 24],
                "fc_reg.bias": [12]})
    cases.append(("mmdet.HEADS", "ConvFCBBoxHead", dict(num_shared_convs=2, num_shared_fcs=2, in_channels=12,
                                                         conv_out_channels=12, fc_out_channels=24, roi_feat_size=5,
                                                         num_classes=3, norm_cfg=dict(type="BN")),
                  box, [torch.randn(3, 12, 5, 5)], {"cls_score": (3, 4), "bbox_pred": (3, 12)}))
    for registry, official_type, kwargs, shapes, inputs, expected in cases:
        module, run = official.module_from_official(registry, official_type, kwargs)
        sd = official.convert_module_state(_official_shapes(shapes), registry, official_type, module)
        module.load_state_dict(sd, strict=True)
        with torch.no_grad():
            out = run(module.eval(), inputs)
        assert {k: tuple(v.shape) for k, v in out.items()} == expected, official_type
    with pytest.raises(NotImplementedError, match="on_lateral"):
        official.module_from_official("mmdet.NECKS", "FPN", dict(in_channels=[8], out_channels=8, num_outs=2,
                                                                 add_extra_convs="on_lateral"))
