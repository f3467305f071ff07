"""Official mmseg checkpoints and configs (visionzoo.dense.segmentation.official): whole-checkpoint conversion through
`segment eval --checkpoint`, the recipe of an official config, and the kwargs translation beyond the fixtures."""
import json

import pytest
import torch
from conftest import FIXTURES

from visionzoo.dense.segmentation import official
from visionzoo.errors import ConfigError

MANIFEST = FIXTURES / "dense" / "manifest.json"
needs_manifest = pytest.mark.skipif(not MANIFEST.exists(), reason=f"no dense manifest at {MANIFEST}")


def _official_checkpoint(tmp_path, variant: str, meta: bool = True):
    """An "official" mmcv checkpoint of a manifest variant: random tensors of the listed shapes under the official
    keys (BN counters as int64 scalars, running_var positive), saved with torch.save as mmseg's train.py does."""
    entry = json.loads(MANIFEST.read_text())[variant]
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in entry["state_dict"]:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.02
    ckpt = {"state_dict": state, "meta": {"exp_name": entry["official_config"].split("/")[-1], "iter": 160000,
                                          "CLASSES": [f"c{i}" for i in range(150)]} if meta else {}}
    path = tmp_path / f"{variant}.pth"
    torch.save(ckpt, path)
    return path, state


@needs_manifest
def test_official_gpvit_segformer_checkpoint_loads_strictly_and_runs(tmp_path, one_thread):
    from visionzoo.tasks.segment import load_segmentor

    path, state = _official_checkpoint(tmp_path, "gpvit_l1_segformer")
    model, cfg, info = load_segmentor(path)
    assert cfg.head == "segformer" and cfg.model == "gpvit_l1" and info["step"] == 160000
    assert info["official_recipe"] == "segmentation/gpvit_l1_segformer_ade20k_160k"
    ours = model.state_dict()
    # the decode head carries over by name, the backbone through GPViT's checkpoint_filter_fn
    assert torch.equal(ours["decode_head.fusion_conv.conv.weight"], state["decode_head.fusion_conv.conv.weight"])
    assert torch.equal(ours["backbone.body.norm.weight"], state["backbone.ln1.weight"])
    assert torch.equal(ours["backbone.body.out_norms.5.bias"], state["backbone.norm5.bias"])
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 80))
    assert logits.shape == (1, 150, 64, 80) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def coc_checkpoint_without_meta(tmp_path_factory):
    return _official_checkpoint(tmp_path_factory.mktemp("official"), "fpn_coc_small_2_ade20k_80k", meta=False)


@needs_manifest
def test_official_checkpoint_without_meta_needs_a_recipe(coc_checkpoint_without_meta):
    from visionzoo.models import CheckpointMismatchError
    from visionzoo.tasks.segment import load_segmentor

    path, state = coc_checkpoint_without_meta
    with pytest.raises(ConfigError, match="--recipe"):
        load_segmentor(path)
    # the wrong recipe is one clear mismatch, not a partial load
    with pytest.raises(CheckpointMismatchError, match="gpvit_l1_segformer"):
        load_segmentor(path, recipe="segmentation/gpvit_l1_segformer_ade20k_160k")


@needs_manifest
def test_official_coc_semantic_fpn_checkpoint_through_the_cli(coc_checkpoint_without_meta, tmp_path, capsys,
                                                              monkeypatch):
    from visionzoo.cli import main
    from visionzoo.dense.segmentation import commands

    path, state = coc_checkpoint_without_meta
    loaded = {}

    def evaluate(model, *args, **kwargs):  # no ADE20K here: record what the CLI would evaluate
        loaded["model"] = model
        return {"mode": "whole", "mIoU": 0.0, "aAcc": 0.0, "mAcc": 0.0, "images": 0}

    monkeypatch.setattr(commands, "evaluate", evaluate)
    monkeypatch.setattr(commands, "ade20k_pairs", lambda root, split: [])
    monkeypatch.setattr(commands, "class_names", lambda root, n: None)
    assert main(["segment", "eval", "--checkpoint", str(path), "--recipe",
                 "segmentation/semfpn_coc_small_feat2_ade20k_80k", "--data", str(tmp_path), "--device", "cpu"]) == 0
    assert "official mmseg checkpoint, converted into segmentation/semfpn_coc_small_feat2" in capsys.readouterr().out
    ours = loaded["model"].state_dict()
    assert torch.equal(ours["neck.lateral_convs.3.conv.bias"], state["neck.lateral_convs.3.conv.bias"])
    assert torch.equal(ours["backbone.body.norm6.weight"], state["backbone.norm6.weight"])
    assert torch.equal(ours["decode_head.scale_heads.3.4.bn.running_var"],
                       state["decode_head.scale_heads.3.4.bn.running_var"])


def test_recipe_of_an_official_config():
    assert official.recipe_for_official_config("gpvit_l3_upernet.py") == "segmentation/gpvit_l3_upernet_ade20k_160k"
    assert official.recipe_for_official_config(
        "segmentation/configs/sem_fpn/fpn_coc_medium_7_ade20k_80k.py") == \
        "segmentation/semfpn_coc_medium_feat7_ade20k_80k"
    with pytest.raises(ConfigError, match="--recipe"):
        official.recipe_for_official_config("pspnet_r50-d8_512x1024_40k_cityscapes.py")


def _kwargs(**kw):
    base = dict(dropout_ratio=0.1, num_classes=5, norm_cfg=dict(type="SyncBN", requires_grad=True),
                align_corners=False, loss_decode=dict(type="CrossEntropyLoss"))
    return {**base, **kw}


def test_fcn_head_defaults_follow_mmseg():
    # mmseg FCNHead defaults: num_convs 2, concat_input True (a conv_cat on [input, convs(input)])
    head, select = official.head_from_official("mmseg.HEADS", "FCNHead", _kwargs(in_channels=6, channels=4,
                                                                                 in_index=1))
    keys = head.state_dict().keys()
    assert {"convs.0.conv.weight", "convs.1.conv.weight", "conv_cat.conv.weight", "conv_cat.bn.running_var"} <= keys
    assert head.conv_cat.conv.in_channels == 10
    maps = [torch.randn(1, 3, 8, 8), torch.randn(1, 6, 8, 8)]
    assert head.eval()(select(maps)).shape == (1, 5, 8, 8)


def test_uper_head_other_pool_scales_levels_and_no_norm():
    head, select = official.head_from_official("mmseg.HEADS", "UPerHead", _kwargs(
        in_channels=[4, 6, 8], in_index=[1, 2, 3], pool_scales=[1, 3], channels=8, norm_cfg=None))
    keys = head.state_dict().keys()
    assert "psp_modules.1.1.conv.bias" in keys and "psp_modules.2.1.conv.weight" not in keys
    assert not any(".bn." in k for k in keys)
    maps = [torch.randn(1, 2, 16, 16), torch.randn(1, 4, 16, 16), torch.randn(1, 6, 8, 8), torch.randn(1, 8, 4, 4)]
    assert head.eval()(select(maps)).shape == (1, 5, 16, 16)


def test_fpn_neck_extra_outputs_and_unmapped_arguments():
    maps = [torch.randn(1, c, s, s) for c, s in ((4, 16), (6, 8), (8, 4))]
    neck, select = official.head_from_official("mmseg.NECKS", "FPN", dict(in_channels=[4, 6, 8], out_channels=5,
                                                                          num_outs=5))
    outs = neck(select(maps))  # no extra convs: stride-2 max pools of the last output
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2, 1] and len(neck.fpn_convs) == 3
    neck, _ = official.head_from_official("mmseg.NECKS", "FPN", dict(in_channels=[4, 6, 8], out_channels=5,
                                                                     num_outs=5, add_extra_convs="on_input"))
    assert neck.fpn_convs[3].conv.in_channels == 8 and neck.fpn_convs[4].conv.in_channels == 5
    assert [o.shape[-1] for o in neck(maps)] == [16, 8, 4, 2, 1]
    neck, _ = official.head_from_official("mmseg.NECKS", "FPN", dict(in_channels=[4, 6, 8], out_channels=5,
                                                                     num_outs=2, start_level=1))
    assert [o.shape[-1] for o in neck(maps)] == [8, 4] and len(neck.lateral_convs) == 2
    with pytest.raises(NotImplementedError, match="not mapped"):
        official.head_from_official("mmseg.NECKS", "FPN", dict(in_channels=[4], out_channels=5, num_outs=1,
                                                               some_new_option=True))
    with pytest.raises(NotImplementedError, match="mmseg.HEADS PSPHead"):
        official.head_from_official("mmseg.HEADS", "PSPHead", {})


def test_test_resize_is_aligned_resize_in_two_steps():
    import numpy as np

    from visionzoo.dense import segmentation as seg

    img = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    out = seg.test_resize(img, (2048, 512), 32)
    # mmseg AlignedResize: imrescale to 512x683 (uint8), then imresize to the multiples of 32
    assert out.shape == (512, 704, 3)
    np.testing.assert_array_equal(out, seg.resize_image(seg.resize_image(img, 512, 683), 512, 704))
    assert not np.array_equal(out, seg.resize_image(img, 512, 704))
    assert seg.test_resize(img, (2048, 512), 0).shape == (512, 683, 3)
