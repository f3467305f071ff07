"""GPViT adapter (visionzoo/dense/gpvit_adapter.py): deformable attention against a naive loop reference, gradients,
shapes and parameter counts against the spec (gpvit.md section 5.1), init behaviour, checkpoint key mapping."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.dense.gpvit_adapter import (GPViTAdapter, Injector, MultiScaleDeformableAttention,
                                           adapter_checkpoint_filter_fn, ms_deform_attn_sample, reference_points)

FIXTURES = Path("/work/shared/fixtures/gpvit")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# multi-scale deformable attention

@torch.no_grad()
def _naive_msda(m: MultiScaleDeformableAttention, query, ref, value, shapes):
    """Deformable attention with explicit loops and hand-written bilinear interpolation (float64), the semantics of
    the mmcv CUDA kernel: sample at (x * w - 0.5, y * h - 0.5) in pixels, corners outside the map read 0."""
    q, v = query.double(), value.double()
    lin = lambda layer, t: t @ layer.weight.double().T + layer.bias.double()  # noqa: E731
    B, Lq, _ = q.shape
    nh, L, P = m.num_heads, m.num_levels, m.num_points
    val = lin(m.value_proj, v)
    D = val.shape[-1] // nh
    off = lin(m.sampling_offsets, q).view(B, Lq, nh, L, P, 2)
    w = torch.softmax(lin(m.attention_weights, q).view(B, Lq, nh, L * P), -1).view(B, Lq, nh, L, P)
    starts = [0]
    for h, wd in shapes:
        starts.append(starts[-1] + h * wd)
    out = torch.zeros(B, Lq, nh * D, dtype=torch.float64)
    for b in range(B):
        for i in range(Lq):
            for hd in range(nh):
                acc = torch.zeros(D, dtype=torch.float64)
                for lvl, (H, W) in enumerate(shapes):
                    fmap = val[b, starts[lvl]:starts[lvl + 1], hd * D:(hd + 1) * D].view(H, W, D)
                    r = ref[min(b, ref.shape[0] - 1), i, min(lvl, ref.shape[2] - 1)].double()
                    for p in range(P):
                        x = float(r[0] + off[b, i, hd, lvl, p, 0] / W) * W - 0.5
                        y = float(r[1] + off[b, i, hd, lvl, p, 1] / H) * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        s = torch.zeros(D, dtype=torch.float64)
                        for yy, xx, cw in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx),
                                           (y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)):
                            if 0 <= yy < H and 0 <= xx < W:
                                s += cw * fmap[yy, xx]
                        acc += w[b, i, hd, lvl, p] * s
                out[b, i, hd * D:(hd + 1) * D] = acc
    return lin(m.output_proj, out)


def _random_msda(levels=2, heads=2, points=3, dim=8, seed=0):
    torch.manual_seed(seed)
    m = MultiScaleDeformableAttention(dim, heads, levels, points)
    with torch.no_grad():  # large, random offsets: many samples between pixels and some outside the maps
        m.sampling_offsets.weight.normal_(0, 1.0)
        m.sampling_offsets.bias.normal_(0, 2.0)
        m.attention_weights.weight.normal_(0, 0.5)
        m.attention_weights.bias.normal_(0, 0.5)
        m.value_proj.bias.normal_(0, 0.1)
        m.output_proj.bias.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("per_level_ref", [False, True])
def test_msda_matches_naive_reference(per_level_ref):
    shapes = [(3, 4), (2, 3)]
    m = _random_msda(levels=2)
    B, Lq = 2, 5
    query = torch.randn(B, Lq, 8)
    value = torch.randn(B, sum(h * w for h, w in shapes), 8)
    ref = torch.rand(B, Lq, 2 if per_level_ref else 1, 2)
    ours = m(query, ref, value, shapes)
    naive = _naive_msda(m, query, ref, value, shapes)
    assert ours.shape == (B, Lq, 8)
    torch.testing.assert_close(ours.double(), naive, atol=1e-5, rtol=1e-5)


def test_msda_runs_in_fp32_under_autocast():  # as the official force_fp32: bf16 locations would be off by pixels
    shapes = [(3, 4), (2, 3)]
    m = _random_msda(levels=2)
    q, v, ref = torch.randn(2, 5, 8), torch.randn(2, 18, 8), torch.rand(2, 5, 1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = m(q, ref, v, shapes)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, m(q, ref, v, shapes), atol=0, rtol=0)
    torch.testing.assert_close(m(q.bfloat16(), ref, v.bfloat16(), shapes), m(q.bfloat16().float(), ref,
                                                                              v.bfloat16().float(), shapes))


def test_msda_gradcheck():
    torch.manual_seed(0)
    shapes = [(3, 2), (2, 2)]
    B, Lq, nh, D, L, P = 1, 3, 2, 2, 2, 2
    value = torch.randn(B, 10, nh, D, dtype=torch.float64, requires_grad=True)
    # keep samples away from integer pixel positions, where bilinear interpolation has a kink
    loc = (torch.rand(B, Lq, nh, L, P, 2, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    w = torch.rand(B, Lq, nh, L, P, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn_sample(v, shapes, l, a), (value, loc, w),
                                    eps=1e-6, atol=1e-5)
    m = _random_msda(levels=2, heads=2, points=2, dim=4).double()
    q = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    val = torch.randn(1, 10, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(1, 3, 1, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: m(a, ref, b, shapes), (q, val), eps=1e-6, atol=1e-5)


def test_msda_init():
    m = MultiScaleDeformableAttention(16, num_heads=8, num_levels=2, num_points=3)
    bias = m.sampling_offsets.bias.view(8, 2, 3, 2)
    # head 0 looks right, head 2 down, head 4 left, head 1 diagonally (normalised to the square's border)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[1, 1, 0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(bias[2, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[4, 0, 1], torch.tensor([-2.0, 0.0]), atol=1e-6, rtol=0)
    assert (m.sampling_offsets.weight == 0).all() and (m.attention_weights.weight == 0).all()
    assert (m.attention_weights.bias == 0).all() and (m.value_proj.bias == 0).all()


def test_reference_points():
    ref = reference_points([(2, 3), (1, 2)])
    assert ref.shape == (1, 8, 1, 2)
    torch.testing.assert_close(ref[0, :6, 0], torch.tensor(
        [[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]]))
    torch.testing.assert_close(ref[0, 6:, 0], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))


# ----------------------------------------------------------------------------------------------------------------
# the adapter backbone

def _tiny(**kw):
    torch.manual_seed(0)
    return GPViTAdapter("gpvit_test", drop_path_rate=0.0, **kw)


def test_l1_shapes_match_spec():
    m = GPViTAdapter("gpvit_l1").eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 256, 320))
    assert [tuple(o.shape[1:]) for o in out] == [(216, 64, 80), (216, 32, 40), (216, 16, 20), (216, 8, 10)]
    assert m.strides == [4, 8, 16, 32] and m.out_channels == [216] * 4 and m.size_divisor == 32


# spec gpvit.md 5.1 (official constructors, measured), in millions to the printed precision
SPEC_PARAMS = {"gpvit_l1": (12.08, 11.88), "gpvit_l2": (28.73, 28.23), "gpvit_l3": (43.21, 42.43),
               "gpvit_l4": (87.73, 86.13)}


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_param_counts_match_spec(name):
    for single, expected in zip((False, True), SPEC_PARAMS[name]):
        with torch.device("meta"):
            m = GPViTAdapter(name, single_stage=single)
        n = sum(p.numel() for p in m.parameters())
        assert round(n / 1e6, 2) == expected, (name, single, n)
        if name == "gpvit_l1" and not single:  # adapter part alone: 2.75M (spec)
            assert round((n - sum(p.numel() for p in m.vit.parameters())) / 1e6, 2) == 2.75


def _grads(m, x):
    m.zero_grad()
    out = m(x)
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    return out, {n: p.grad for n, p in m.named_parameters()}


def test_tiny_forward_backward():
    x = torch.randn(2, 3, 64, 96)
    m = _tiny().train()
    # official init: every parameter gets a gradient; exact zeros only where the init makes them structural: gamma=0
    # cuts the injectors' attention off, and zero offset/attention-weight matrices make the output independent of
    # the (normed) query
    out, grads = _grads(m, x)
    assert [tuple(o.shape) for o in out] == [(2, 24, 16, 24), (2, 24, 8, 12), (2, 24, 4, 6), (2, 24, 2, 3)]
    assert all(g is not None for g in grads.values())
    zero = {n for n, g in grads.items() if not g.abs().sum() > 0}
    assert zero and all(re.search(r"injector\.(query_norm|feat_norm|attn)\.|query_norm\.", n) for n in zero), zero
    # away from the init every parameter has a non-zero gradient
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, MultiScaleDeformableAttention):
                mod.sampling_offsets.weight.normal_(0, 0.1)
                mod.attention_weights.weight.normal_(0, 0.1)
            elif isinstance(mod, Injector):
                mod.gamma.normal_(0, 0.1)
    _, grads = _grads(m, x)
    assert not [n for n, g in grads.items() if not g.abs().sum() > 0]

    s = _tiny(single_stage=True).train()
    out, grads = _grads(s, x)
    assert s.strides == [8, 16, 32] and [tuple(o.shape) for o in out] == [(2, 24, 8, 12), (2, 24, 4, 6), (2, 24, 2, 3)]
    assert all(g is not None for g in grads.values())
    assert not any(n.startswith(("up.", "ad_norm1.", "spm.fc1.")) for n in grads)


def test_gamma_zero_leaves_gpvit_unchanged():
    m = _tiny().eval()
    assert all((inter.injector.gamma == 0).all() for inter in m.interactions)
    seen = []
    h = m.vit.blocks[-1].register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        m(x)
        m.vit.forward_features(x)  # the plain GPViT (final norm off)
    h.remove()
    torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)
    inj = Injector(24, num_heads=6)
    t, c = torch.randn(1, 16, 24), torch.randn(1, 16 + 4 + 1, 24)
    shapes = [(4, 4), (2, 2), (1, 1)]
    assert torch.equal(inj(t, reference_points(shapes[:1]), c, shapes), t)


def test_input_size_errors():
    m = _tiny().eval()
    for size in ((16, 16), (48, 64), (64, 80)):
        with pytest.raises(ValueError, match=r"multiples of 32.*Pad to"):
            m(torch.randn(1, 3, *size))
    with torch.no_grad():
        assert len(m(torch.randn(1, 3, 32, 32))) == 4  # the smallest valid input
    with pytest.raises(ValueError, match="wraps a GPViT"):
        GPViTAdapter("coc_test")


def test_no_weight_decay():
    m = _tiny()
    names = m.no_weight_decay()
    assert {"level_embed", "vit.pos_embed", "ad_norm1.weight", "spm.fc2.bias",
            "interactions.0.injector.query_norm.weight"} <= names
    assert any(n.endswith("group_token") for n in names)
    assert "spm.fc2.weight" not in names and "interactions.0.injector.gamma" not in names
    assert set(m.no_weight_decay_keywords) == {"level_embed", "pos_embed", "norm", "bias", "group_token"}


@pytest.mark.slow
def test_tiny_export():  # ~10 s: torch.export of the tiny adapter (grid_sample, reference points from Python ints)
    m = _tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        for a, b in zip(m(x), ep.module()(x)):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def _official_layout(name):
    return json.loads((FIXTURES / "manifest.json").read_text())[name]["state_dict"]


@pytest.mark.skipif(not (FIXTURES / "manifest.json").exists(), reason="gpvit fixtures not available")
def test_official_mmdet_keys_map():
    from visionzoo.testing.parity import check_state_dict_layout

    with torch.device("meta"):
        model = GPViTAdapter("gpvit_l1")
    cls_layout = [(k, s) for k, s in _official_layout("GPViT-L1") if k.startswith("backbone.")]
    # an mmdet detector: the GPViT keys (its classification ln1 is absent with final_norm=False; kept here to check
    # that it is dropped), the adapter keys under their official names, and FPN / head keys that must be dropped
    adapter = [(f"backbone.{k}", list(v.shape)) for k, v in model.state_dict().items() if not k.startswith("vit.")]
    det = cls_layout + adapter + [("neck.lateral_convs.0.conv.weight", [256, 216, 1, 1]),
                                  ("rpn_head.rpn_conv.weight", [256, 256, 3, 3])]
    assert check_state_dict_layout(model, det, adapter_checkpoint_filter_fn) == []
    # a GPViT classification checkpoint (backbone/neck/head): the GPViT part maps, the adapter keeps its init
    assert check_state_dict_layout(model, _official_layout("GPViT-L1"), adapter_checkpoint_filter_fn) == []


def test_checkpoint_roundtrip(tmp_path):
    from safetensors.torch import save_file

    import visionzoo as vz

    cls = vz.create_model("gpvit_test")
    path = tmp_path / "cls.safetensors"
    save_file({k: v.contiguous() for k, v in cls.state_dict().items()}, str(path))
    m = _tiny(checkpoint=str(path))
    for k, v in m.vit.state_dict().items():
        assert torch.equal(v, cls.state_dict()[k]), k
    # our own adapter state dict passes unchanged and loads strictly
    sd = m.state_dict()
    assert adapter_checkpoint_filter_fn(sd, m).keys() == sd.keys()
    path2 = tmp_path / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path2))
    m2 = _tiny(checkpoint=str(path2))
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in sd.items())
