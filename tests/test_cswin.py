"""CSWin backbone: behaviour tests and a plain loop-over-windows oracle for the cross-shaped attention."""
import pytest
import timm
import torch
import torch.nn.functional as F

import visionzoo  # noqa: F401
from visionzoo.models.cswin import CSWinBlock, channel_shuffle

torch.set_num_threads(1)


def reference_branch(q, k, v, get_v, heads, hs, ws):
    """One LePE branch, window by window: softmax(q k^T / sqrt(e)) v + dwconv3x3(v) with zero padding per window."""
    B, H, W, C = q.shape
    e = C // heads
    out = torch.zeros_like(q)
    for b in range(B):
        for r in range(0, H, hs):
            for c in range(0, W, ws):
                sl = (b, slice(r, r + hs), slice(c, c + ws))
                qw, kw, vw = (t[sl].reshape(hs * ws, heads, e).transpose(0, 1) for t in (q, k, v))
                a = (qw @ kw.transpose(1, 2) / e ** 0.5).softmax(-1) @ vw  # (heads, n, e)
                lepe = get_v(v[sl].permute(2, 0, 1)[None])[0].permute(1, 2, 0)  # (hs, ws, C)
                out[sl] = a.transpose(0, 1).reshape(hs, ws, C) + lepe
    return out


@pytest.mark.parametrize("reso,split,last", [(8, 2, False), (8, 8, False), (4, 2, True)])
def test_block_matches_window_loop_oracle(reso, split, last):
    torch.manual_seed(0)
    blk = CSWinBlock(16, 4, reso, split, mlp_ratio=2., last_stage=last).eval()
    for p in blk.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, reso * reso, 16)
    with torch.no_grad():
        ours = blk(x, reso, reso)
        qkv = blk.qkv(blk.norm1(x)).reshape(2, reso, reso, 3, 16)
        q, k, v = qkv.unbind(3)
        if blk.branch_num == 1:
            att = reference_branch(q, k, v, blk.attns[0].get_v, 4, reso, reso)
        else:
            att = torch.cat([reference_branch(q[..., :8], k[..., :8], v[..., :8], blk.attns[0].get_v, 2, reso, split),
                             reference_branch(q[..., 8:], k[..., 8:], v[..., 8:], blk.attns[1].get_v, 2, split, reso)],
                            -1)
        ref = x + blk.proj(att.reshape(2, -1, 16))
        ref = ref + blk.mlp(blk.norm2(ref))
    assert blk.branch_num == (1 if (last or reso == split) else 2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_channel_shuffle_is_official_order():
    x = torch.arange(8.).view(1, 8)
    # view (C/G, G) -> transpose: output j*(C/G)+i <- input i*G+j
    assert channel_shuffle(x, 2, dim=1).tolist() == [[0., 2., 4., 6., 1., 3., 5., 7.]]


def test_cswin_test_forward_backward_and_api():
    model = timm.create_model('cswin_test')
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model.eval()(x).shape == (2, 3)


def test_features_only():
    f = timm.create_model('cswin_test', features_only=True)
    feats = f(torch.randn(1, 3, 64, 64))
    assert [t.shape[1] for t in feats] == f.feature_info.channels()
    assert [64 // t.shape[-1] for t in feats] == f.feature_info.reduction() == [4, 8, 16, 32]
    f = timm.create_model('cswin_test', features_only=True, out_indices=(1, 2))
    assert [t.shape[1] for t in f(torch.randn(1, 3, 64, 64))] == [16, 32]


def test_input_size_error_names_valid_sizes():
    model = timm.create_model('cswin_test').eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 48))
    with torch.device('meta'):
        tiny = timm.create_model('cswin_tiny')
    assert tiny.size_step() == 224


def test_full_size_param_counts():
    # CSWin paper: T 23M, S 35M, B 78M
    for name, m in [('cswin_tiny', 22.3), ('cswin_small', 34.6), ('cswin_base', 77.4)]:
        with torch.device('meta'):
            model = timm.create_model(name)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == m


def test_export():
    model = timm.create_model('cswin_test').eval()
    torch.export.export(model, (torch.randn(1, 3, 64, 64),))
