"""CoC's legacy dense checkpoints (coc.md section 8): the official Mask R-CNN (mmdet) and Semantic FPN (mmseg) files
keep the pre-2023-06 layout (Cluster ``fc1/fc2/fc_v``, 1x1-conv MLP weights, ``fea_pos``) under ``backbone.``, next
to neck / head keys, inside ``{'meta', 'state_dict', 'optimizer'}``. No official file can be downloaded here, so a
synthetic one is built from a ``fork_feat`` model by renaming its keys backwards, and must load through the CoC
converter with strict key coverage, switch the model to the count normaliser it was trained with, and reproduce the
source model's feature maps exactly."""
import pytest
import torch

import visionzoo
from visionzoo.models import context_cluster as cc

_MIXER_BACK = {"token_mixer.f.": "token_mixer.fc1.", "token_mixer.proj.": "token_mixer.fc2.",
               "token_mixer.v.": "token_mixer.fc_v."}


def _perturbed(name, **kwargs):
    """A fork_feat CoC with every parameter away from its init, so that each one changes the output."""
    torch.manual_seed(0)
    model = visionzoo.create_model(name, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "layer_scale" in k:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "sim_alpha" in k:
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 + 0.5)
            elif "sim_beta" in k:
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            elif p.ndim == 1 and k.endswith("weight"):  # GroupNorm weights, stage norms included
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.75)
            elif k.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def legacy_dense_checkpoint(model, kind: str = "mmdet") -> dict:
    """An mmdet / mmseg-style checkpoint of ``model`` in the legacy layout (see the module docstring)."""
    sd = {}
    for k, v in model.state_dict().items():
        for new, old in _MIXER_BACK.items():
            k = k.replace(new, old)
        if ".mlp.fc" in k and k.endswith("weight"):
            v = v[:, :, None, None]  # the old MLP was a pair of 1x1 convs
        sd["backbone." + k] = v.clone()
        if k.endswith("token_mixer.fc1.weight"):  # the old Cluster kept a fixed position grid
            sd["backbone." + k.replace("fc1.weight", "fea_pos")] = torch.zeros(1, 2, 7, 7)
    g = torch.Generator().manual_seed(2)
    if kind == "mmdet":  # FPN neck + Mask R-CNN heads (a few representative keys)
        for i, c in enumerate(model.feature_info):
            sd[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(256, c["num_chs"], 1, 1, generator=g)
            sd[f"neck.lateral_convs.{i}.conv.bias"] = torch.zeros(256)
            sd[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(256, 256, 3, 3, generator=g)
        sd["rpn_head.rpn_conv.weight"] = torch.randn(256, 256, 3, 3, generator=g)
        sd["roi_head.bbox_head.fc_cls.weight"] = torch.randn(81, 1024, generator=g)
        sd["roi_head.mask_head.conv_logits.weight"] = torch.randn(80, 256, 1, 1, generator=g)
        classes = ("person", "bicycle")
    else:  # Semantic FPN (mmseg)
        for i, c in enumerate(model.feature_info):
            sd[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(256, c["num_chs"], 1, 1, generator=g)
        sd["decode_head.scale_heads.0.0.conv.weight"] = torch.randn(128, 256, 3, 3, generator=g)
        sd["decode_head.conv_seg.weight"] = torch.randn(150, 128, 1, 1, generator=g)
        classes = ("wall", "building")
    meta = {"mmcv_version": "1.3.0", "CLASSES": classes, "epoch": 12, "iter": 87960, "config": "model = dict(...)",
            "hook_msgs": {"last_ckpt": "work_dirs/x/epoch_12.pth"}}
    return {"meta": meta, "state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}}


@pytest.fixture(scope="module")
def source():
    torch.set_num_threads(1)
    # trained with the pre-2023-06 count normaliser, like every legacy checkpoint
    return _perturbed("coc_small_feat2", legacy_norm=True)


def test_legacy_mmdet_checkpoint_loads_and_matches(source, tmp_path, caplog):
    ckpt = legacy_dense_checkpoint(source, "mmdet")
    assert cc.is_legacy_state_dict(ckpt["state_dict"])
    path = tmp_path / "coc_small_4_mask_rcnn.pth"
    torch.save(ckpt, path)

    # listen on the module's logger itself: the engine's setup_logging stops "visionzoo" from propagating to root
    cc._logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger=cc._logger.name):
            model = visionzoo.create_model("coc_small_feat2", checkpoint_path=path).eval()  # strict load
    finally:
        cc._logger.removeHandler(caplog.handler)
    assert "legacy_norm" in caplog.text
    mixers = [m for m in model.modules() if isinstance(m, cc.Cluster)]
    assert mixers and all(m.legacy_norm for m in mixers)
    # key coverage: the converter yields exactly the model's keys and shapes (no neck/head, no fea_pos)
    converted = cc.checkpoint_filter_fn(visionzoo.models.read_state_dict(path), model)
    own = model.state_dict()
    assert set(converted) == set(own) and all(converted[k].shape == own[k].shape for k in own)

    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = source.forward_intermediates(x, intermediates_only=True)
        out = model.forward_intermediates(x, intermediates_only=True)
        assert [tuple(o.shape[1:]) for o in out] == [(64, 32, 32), (128, 16, 16), (320, 8, 8), (512, 4, 4)]
        for r, o in zip(ref, out):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
        # the normaliser switch matters: the current normaliser gives other maps
        model.set_legacy_norm(False)
        other = model.forward_intermediates(x, intermediates_only=True)
    assert (other[-1] - ref[-1]).abs().max() > 1e-3


def test_legacy_mmseg_checkpoint_into_plain_builder(source, tmp_path):
    """A Semantic FPN (mmseg) file loads into ``coc_small(fork_feat=True)``, the fork_feat switch of the plain
    classification builder, with the same maps."""
    path = tmp_path / "coc_small_4_fpn.pth"
    torch.save(legacy_dense_checkpoint(source, "mmseg"), path)
    model = visionzoo.create_model("coc_small", fork_feat=True, num_classes=0, checkpoint_path=path).eval()
    assert all(m.legacy_norm for m in model.modules() if isinstance(m, cc.Cluster))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for r, o in zip(source.forward_intermediates(x, intermediates_only=True),
                        model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_legacy_checkpoint_through_dense_backbone(source, tmp_path):
    """``visionzoo.dense.backbones.build_backbone`` (what ``detect`` / ``segment`` use) takes such a file."""
    backbones = pytest.importorskip("visionzoo.dense.backbones")
    path = tmp_path / "coc_small_4_mask_rcnn.pth"
    torch.save(legacy_dense_checkpoint(source), path)
    bb = backbones.build_backbone("coc_small_feat2", checkpoint=str(path)).eval()
    assert bb.strides == [4, 8, 16, 32] and bb.out_channels == [64, 128, 320, 512]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for r, o in zip(source.forward_intermediates(x, intermediates_only=True), bb(x)):
            torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_legacy_checkpoint_through_dense_backbone_classifier_name(tmp_path):
    """The same through a classification model name (``coc_test`` here, ``coc_small`` in real use)."""
    backbones = pytest.importorskip("visionzoo.dense.backbones")
    src = _perturbed("coc_test", fork_feat=True, num_classes=0, legacy_norm=True)
    path = tmp_path / "coc_test_dense.pth"
    torch.save(legacy_dense_checkpoint(src), path)
    bb = backbones.build_backbone("coc_test", checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = src.forward_intermediates(x, intermediates_only=True)
        maps = bb(x)
    assert len(maps) == len(ref)
    for r, o in zip(ref, maps):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
