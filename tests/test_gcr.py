"""GCR: Grassmann head, wrapper, official checkpoint mapping and the composite Riemannian optimizer."""
import copy
import io
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.models.grassmann import GrassmannClassifier, GrassmannHead, checkpoint_filter_fn, to_grassmann
from visionzoo.optim.grassmann import (GrassmannOptimizer, clip_parameters, create_grassmann_optimizer,
                                       grassmann_param_groups)
from conftest import FIXTURES

GCR = FIXTURES / "gcr"
needs_fixtures = pytest.mark.skipif(not GCR.exists(), reason=f"no fixtures at {GCR}")


def _ortho_err(head: GrassmannHead) -> float:
    s = head.subspaces().detach()
    eye = torch.eye(head.dim).expand(head.num_classes, -1, -1)
    return float((s.transpose(1, 2) @ s - eye).abs().max())


class _Net(nn.Module):
    def __init__(self, n_in=6, n=8, classes=3, k=3):
        super().__init__()
        self.fc0 = nn.Linear(n_in, n)
        self.norm = nn.LayerNorm(n)
        self.head = GrassmannHead(n, classes, k)

    def forward(self, x):
        return self.head(self.norm(self.fc0(x)))


# ---------------------------------------------------------------------------------------------------------------
# head

@needs_fixtures
@pytest.mark.parametrize("case", ["head_forward_d4", "head_forward_d1"])
def test_head_init_reproduces_official_qr(case):
    """Same seed as the official run -> the same weights: N(0,1) then per-class QR without sign fix (nn.Linear's
    own init draw in the official constructor is replayed first)."""
    from safetensors.torch import load_file

    meta = json.loads((GCR / f"{case}.json").read_text())
    ref = load_file(str(GCR / f"{case}.safetensors"))["state.fc.weight"]
    kw = meta["official_kwargs"]
    k = kw["dims"][0]
    torch.manual_seed(meta["seed"])
    nn.init.kaiming_uniform_(torch.empty(kw["num_classes"] * k, kw["in_channels"]), a=math.sqrt(5))
    head = GrassmannHead(kw["in_channels"], kw["num_classes"], k, kw["gamma"])
    torch.testing.assert_close(head.weight.detach(), ref, atol=1e-6, rtol=0)
    assert _ortho_err(head) < 1e-5


def test_head_logits_math():
    torch.manual_seed(0)
    head = GrassmannHead(16, 5, 3, gamma=10.0)
    x = torch.randn(4, 16)
    x[1] = 0
    out = head(x)
    ref = 10.0 * torch.stack([(F.normalize(x, dim=-1) @ s).norm(dim=-1) for s in head.subspaces()], -1)
    torch.testing.assert_close(out, ref)
    assert out.shape == (4, 5) and (out >= 0).all() and (out <= 10.0 + 1e-5).all()
    assert (out[1] == 0).all()  # a zero feature gives zero logits
    torch.testing.assert_close(head(3.7 * x), out)  # scale invariant
    # basis invariant: rotate every subspace's basis
    q = torch.linalg.qr(torch.randn(5, 3, 3)).Q
    with torch.no_grad():
        head.weight.copy_((head.subspaces() @ q).transpose(1, 2).reshape(15, 16))
    torch.testing.assert_close(head(x), out, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    head(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_head_k1_is_absolute_cosine():
    torch.manual_seed(0)
    head = GrassmannHead(8, 2, 1, gamma=25.0)
    w = head.weight.detach()[0]
    torch.testing.assert_close(head(torch.stack([w, -w]))[:, 0], torch.full((2,), 25.0))


def test_head_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="subspace dim"):
        GrassmannHead(4, 3, 5)
    with pytest.raises(ValueError, match="width 8"):
        GrassmannHead(8, 3, 2)(torch.randn(2, 7))


# ---------------------------------------------------------------------------------------------------------------
# wrapper / registered models

def test_to_grassmann_keeps_backbone_and_timm_api():
    torch.manual_seed(0)
    base = timm.create_model("resnet18d", num_classes=7, layers=(1, 1, 1, 1), channels=(8, 8, 8, 16),
                             stem_width=8).eval()
    model = to_grassmann(base, dim=3).eval()
    assert model.num_classes == 7 and isinstance(model.get_classifier(), GrassmannHead)
    assert model.pretrained_cfg["classifier"] == "head"
    assert model.pretrained_cfg["first_conv"] == "backbone.conv1.0"
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats, base.forward_head(base.forward_features(x), pre_logits=True))
    assert feats.shape[-1] == model.head_hidden_size == 16
    assert model(x).shape == (2, 7)
    model.reset_classifier(4, dim=2)
    assert model(x).shape == (2, 4) and model.head.dim == 2
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_vgg_gcr_dropout_like_official():
    with torch.device("meta"):
        m = timm.create_model("vgg13_bn_gcr8")
    assert m.backbone.pre_logits.drop.p == 0.5  # between fc1 and fc2, as gcr.vgg.VGG_
    assert m.backbone.head.drop.p == 0.0 and m.head_drop.p == 0.0  # none after fc2
    assert m.head.weight.shape == (8000, 4096)


def test_registered_names_and_eval_cfgs():
    names = visionzoo.list_models("*gcr*")
    for n in ["resnet50_gcr8", "resnet50d_gcr1", "resnet50d_gcr4", "resnet50d_gcr8", "resnet50d_gcr16",
              "resnet50d_gcr32", "resnet101d_gcr8", "resnet152d_gcr8", "vgg13_bn_gcr8",
              "swin_tiny_patch4_window7_224_gcr8", "deit3_small_patch16_224_gcr8", "gcr_test"]:
        assert n in names
    assert abs(timm.get_pretrained_cfg("resnet50d_gcr8.rsb_a1_fixres_in1k").crop_pct - 224 / 232) < 1e-9
    assert timm.get_pretrained_cfg("deit3_small_patch16_224_gcr8").crop_pct == 1.0
    m = timm.create_model("gcr_test")
    assert sum(p.numel() for p in m.parameters()) < 100_000


def test_our_state_dict_roundtrip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = visionzoo.create_model("gcr_test", num_classes=5).eval()
    assert checkpoint_filter_fn(m.state_dict(), m).keys() == m.state_dict().keys()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    m2 = visionzoo.create_model("gcr_test", num_classes=5, checkpoint_path=tmp_path / "w.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m2(x), m(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# official checkpoint mapping

@needs_fixtures
@pytest.mark.parametrize("variant", ["resnet50d_8xb32_coslr_in1k_gcr8", "resnet50_8xb32_in1k_gcr8",
                                     "vgg13bn_8xb32_in1k_gcr8", "swin-tiny_8xb128_in1k_gcr8",
                                     "deit3-small-p16_8xb256_in1k-224px_gcr8", "swin-tiny_8xb128_in1k"])
def test_manifest_key_mapping(variant):
    from visionzoo.testing.families import gcr

    entry = json.loads((GCR / "manifest.json").read_text())[variant]
    assert gcr.check_manifest_entry(variant, entry) == []
    bad = dict(entry, state_dict=entry["state_dict"][:-2])  # the mapping check must notice missing keys
    assert gcr.check_manifest_entry(variant, bad)


def test_swin_patch_merging_permutation():
    """mmpretrain PatchMerging (nn.Unfold 2x2 -> norm -> reduction) == timm PatchMerging with converted weights."""
    from timm.models.swin_transformer import PatchMerging

    from visionzoo.models.grassmann import _convert_swin

    torch.manual_seed(0)
    c, h, w = 6, 4, 6
    norm, red = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(2, h, w, c)
    unfolded = nn.Unfold(2, stride=2)(x.permute(0, 3, 1, 2)).transpose(1, 2)  # (B, L, 4C), c*4 + 2i + j
    ref = red(norm(unfolded)).reshape(2, h // 2, w // 2, 2 * c)
    official = {"stages.0.downsample.norm.weight": norm.weight, "stages.0.downsample.norm.bias": norm.bias,
                "stages.0.downsample.reduction.weight": red.weight}
    conv = _convert_swin(official, None)
    ours = PatchMerging(c)
    ours.load_state_dict({k.split("downsample.")[1]: v for k, v in conv.items()})
    torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)


def test_vgg_classifier_reshape():
    """Official Linear(512*7*7 -> 4096) on the flattened map == timm's 7x7 conv with the reshaped weight."""
    from visionzoo.models.grassmann import _convert_vgg

    torch.manual_seed(0)
    with torch.device("meta"):
        model = timm.create_model("vgg13_bn", num_classes=0)
    lin = nn.Linear(512 * 49, 16)
    conv = _convert_vgg({"classifier.0.weight": lin.weight, "classifier.0.bias": lin.bias}, model)
    w = conv["pre_logits.fc1.weight"]
    assert w.shape == (16, 512, 7, 7)
    x = torch.randn(2, 512, 7, 7)
    torch.testing.assert_close(F.conv2d(x, w, conv["pre_logits.fc1.bias"]).flatten(1), lin(x.flatten(1)))


# ---------------------------------------------------------------------------------------------------------------
# optimizer

def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _batch(seed=0, n=32, n_in=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_in, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("opt,lr,factor", [("sgd", 0.1, 1.0), ("adamw", 1e-3, 100.0), ("lamb", 5e-3, 60.0)])
def test_subspaces_stay_orthonormal_1000_steps(opt, lr, factor):
    """With the official re-orthonormalisation period (5 for SGD, 1 for AdamW/LAMB) the float32 drift of the
    geodesic steps never builds up, checked after every step (also the ones furthest from a QR)."""
    torch.manual_seed(0)
    model = _Net(k=3)  # k = 3 > 2: the official optimizer cannot run this on CPU
    o = create_grassmann_optimizer(model, opt, lr=lr, weight_decay=0.01, lr_factor=factor)
    worst = 0.0
    for step in range(1000):
        x, y = _batch(step)
        o.zero_grad()
        _loss(model, x, y).backward()
        o.step()
        worst = max(worst, _ortho_err(model.head))
    assert worst < 1e-4, worst
    assert o.state_dict()["grassmann"]["counter"] == 1000


@pytest.mark.parametrize("opt", ["sgd", "adamw", "lamb"])
def test_resume_is_exact(opt):
    def make():
        torch.manual_seed(0)
        m = _Net()
        return m, create_grassmann_optimizer(m, opt, lr=0.05, weight_decay=0.01, lr_factor=2.0, reorth_step=5)

    def run(m, o, steps):
        for s in steps:
            x, y = _batch(s)
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()

    m, o = make()
    run(m, o, range(3))
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": o.state_dict()}, buf)
    run(m, o, range(3, 8))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    m2, o2 = make()
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    run(m2, o2, range(3, 8))
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert "momentum_buffer" in o2.state[m2.head.weight]

    if opt == "sgd":  # without the saved QR counter the trajectory would differ (the test can fail)
        m3, o3 = make()
        m3.load_state_dict(saved["model"])
        o3.load_state_dict({k: v for k, v in saved["opt"].items() if k != "grassmann"})
        run(m3, o3, range(3, 8))
        assert not torch.equal(m3.head.weight, m.head.weight)


def test_geodesic_step_and_lr_sync():
    """k=1, one class, no momentum: the basis vector rotates by exactly lr0 * lr_factor * |tangent grad|, where
    lr0 is whatever the scheduler put in the first Euclidean group."""
    torch.manual_seed(0)
    model = _Net(n=8, classes=1, k=1)
    groups = grassmann_param_groups(model)
    o = GrassmannOptimizer(groups, base="sgd", lr=0.1, lr_factor=3.0, momentum=0.0, reorth_step=1000)
    for g in o.param_groups:
        g["lr"] = 1e-4  # as an LR scheduler would (small: the rotation angle stays below pi/2)
    x, _ = _batch(0)
    model(x).sum().backward()
    p0 = model.head.weight.detach().clone()[0]
    g = model.head.weight.grad[0]
    g_tan = g - p0 * (p0 @ g)
    o.step()
    p1 = model.head.weight.detach()[0]
    angle = torch.arccos((p0 @ p1).abs().clamp(max=1))  # the first step's QR may flip the sign
    assert abs(float(angle) - 1e-4 * 3.0 * float(g_tan.norm())) < 1e-5
    assert o.param_groups[-1]["lr"] == 1e-4


def test_geometry_marked_by_groups_survives_deepcopy_and_assign():
    model = _Net()
    clone = copy.deepcopy(model)
    assigned = _Net()
    assigned.load_state_dict(model.state_dict(), assign=True)
    for m in (clone, assigned):
        groups = grassmann_param_groups(m)
        geo = [g for g in groups if g.get("grassmann")]
        assert len(geo) == 1 and geo[0]["params"][0] is m.head.weight and geo[0]["subspace_dim"] == 3


def test_factory_groups_match_official_paramwise():
    model = _Net()
    o = create_grassmann_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, lr_factor=100.0)
    by_param = {id(p): g for g in o.param_groups for p in g["params"]}
    assert by_param[id(model.fc0.weight)]["weight_decay"] == 0.05
    assert by_param[id(model.fc0.bias)]["weight_decay"] == 0.0 and by_param[id(model.norm.weight)]["weight_decay"] == 0
    geo = by_param[id(model.head.weight)]
    assert geo["grassmann"] and geo["weight_decay"] == 0.0 and geo["momentum"] == 0.9 and geo["lr_factor"] == 100.0
    assert o.reorth_step == 1 and o.param_groups[0]["lr"] == 1e-3
    o = create_grassmann_optimizer(model, "gcr_sgd", lr=0.1, weight_decay=1e-4, filter_bias_and_bn=False)
    assert o.reorth_step == 5
    assert all(g["weight_decay"] == 1e-4 for g in o.param_groups if not g.get("grassmann"))
    with pytest.raises(ValueError, match="no GrassmannHead"):
        create_grassmann_optimizer(nn.Linear(3, 3), "sgd")
    with pytest.raises(ValueError, match="Valid: sgd, adamw, lamb"):
        create_grassmann_optimizer(model, "adagrad")


def test_geometry_excluded_from_clipping_and_lamb_norm():
    """A huge subspace gradient neither enters the clip nor LAMB's global norm: the Euclidean update equals that of
    a plain LAMB / clipped AdamW on the Euclidean parameters alone."""
    from timm.optim import Lamb

    for opt, clip in (("lamb", None), ("adamw", 0.5)):
        torch.manual_seed(0)
        model = _Net()
        ref = copy.deepcopy(model)
        o = create_grassmann_optimizer(model, opt, lr=1e-2, weight_decay=0.01, clip_grad=clip,
                                       filter_bias_and_bn=False)  # the plain reference decays every param
        euclid = [p for n, p in ref.named_parameters() if not n.startswith("head")]
        plain = Lamb(euclid, lr=1e-2, weight_decay=0.01) if opt == "lamb" else torch.optim.AdamW(
            euclid, lr=1e-2, weight_decay=0.01)
        x, y = _batch(0)
        for m in (model, ref):
            (_loss(m, x, y) * 50).backward()
        model.head.weight.grad.mul_(1e4)
        if clip:
            torch.nn.utils.clip_grad_norm_(euclid, clip)
        head_grad = model.head.weight.grad.clone()
        o.step()
        plain.step()
        assert torch.equal(model.head.weight.grad, head_grad)
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            if not n.startswith("head"):
                torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
        assert all(p is not model.head.weight for p in clip_parameters(o))


def test_head_only_training_and_add_param_group():
    """A frozen backbone (only geometry groups) works, and groups added later are routed to the right part."""
    torch.manual_seed(0)
    model = _Net()
    for p in list(model.fc0.parameters()) + list(model.norm.parameters()):
        p.requires_grad_(False)
    o = create_grassmann_optimizer(model, "sgd", lr=0.1, weight_decay=0.0)
    assert o.base is None
    x, y = _batch(0)
    before = model.head.weight.detach().clone()
    _loss(model, x, y).backward()
    o.step()
    assert not torch.equal(before, model.head.weight)
    assert _ortho_err(model.head) < 1e-5

    model2 = _Net()
    o2 = create_grassmann_optimizer(model2, "adamw", lr=1e-3, weight_decay=0.05)
    extra = nn.Parameter(torch.randn(3))
    o2.add_param_group({"params": [extra], "weight_decay": 0.0})
    assert any(extra is p for g in o2.base.param_groups for p in g["params"])
    assert len(o2.param_groups) == len(o2.base.param_groups) + 1
