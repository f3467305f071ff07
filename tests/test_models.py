"""Sweep over every registered visionzoo model, timm style.

``*_test`` variants run forward, backward (every parameter gets a gradient), reset_classifier, features_only and
torch.export on CPU; full-size variants are built on the meta device and parameter-counted only, so the sweep
stays fast.
"""
import pytest
import timm
import torch

import visionzoo
from visionzoo.models import list_models

ALL = list_models()
# Models whose input is not an image batch (point clouds) are visionzoo-only names, kept out of timm's registry, and
# tested in their family's tests.
NON_IMAGE = {m for m in ALL if not timm.is_model(m)}
TEST_MODELS = [m for m in ALL if m.endswith("_test") and m not in NON_IMAGE]
FULL_MODELS = [m for m in ALL if not m.endswith("_test") and m not in NON_IMAGE]
BATCH = 2


def _input(model, batch=BATCH):
    size = model.pretrained_cfg["input_size"]
    return torch.randn(batch, *size)


def _sum_outputs(out):
    if isinstance(out, (tuple, list)):
        return sum(_sum_outputs(o) for o in out)
    return out.float().sum()


def _eval_logits(out):
    return torch.stack(list(out)).sum(0) if isinstance(out, (tuple, list)) else out


def test_registry_is_populated():
    assert TEST_MODELS or not ALL  # every family ships a *_test variant
    for name in ALL:  # every image model is a timm model; the others say why not (their cfg's input is no image)
        if timm.is_model(name):
            assert len(timm.get_pretrained_cfg(name).input_size) == 3
        else:
            assert len(visionzoo.create_model(name).pretrained_cfg["input_size"]) != 3, name


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward(name):
    torch.manual_seed(0)
    model = visionzoo.create_model(name, num_classes=7).eval()
    x = _input(model)
    with torch.no_grad():
        out = _eval_logits(model(x))
    assert out.shape == (BATCH, 7)
    assert torch.isfinite(out).all()
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape[-1] == model.num_features or pre.shape[-1] == getattr(model, "head_hidden_size", -1)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_backward(name):
    torch.manual_seed(0)
    model = visionzoo.create_model(name, num_classes=7).train()
    out = model(_input(model))
    _sum_outputs(out).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_reset_classifier(name):
    model = visionzoo.create_model(name, num_classes=7).eval()
    x = _input(model)
    model.reset_classifier(5)
    with torch.no_grad():
        assert _eval_logits(model(x)).shape == (BATCH, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        out = _eval_logits(model(x))
    assert out.shape == (BATCH, model.num_features)
    assert model.num_classes == 0


@pytest.mark.parametrize("name", TEST_MODELS)
def test_features_only(name):
    model = visionzoo.create_model(name)
    if not getattr(model, "feature_info", None):
        pytest.skip(f"{name} declares no feature_info")
    x = _input(model)
    feat_model = visionzoo.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = feat_model(x)
    info = feat_model.feature_info
    assert len(feats) == len(info.channels())
    for f, c, r in zip(feats, info.channels(), info.reduction()):
        assert f.shape[1] == c
        assert f.shape[-1] == x.shape[-1] // r and f.shape[-2] == x.shape[-2] // r


@pytest.mark.parametrize("name", TEST_MODELS)
def test_torch_export(name):
    model = visionzoo.create_model(name).eval()
    x = _input(model)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        ref = _eval_logits(model(x))
        got = _eval_logits(exported.module()(x))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FULL_MODELS)
def test_full_size_builds_on_meta(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 100_000
    assert model.num_classes == model.pretrained_cfg.get("num_classes", model.num_classes)
    assert model.pretrained_cfg.get("mean") and model.pretrained_cfg.get("input_size")
