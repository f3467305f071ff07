"""GPViT: behaviour tests, a plain reference of the official attention formulation as an oracle, and a benchmark.

The fixture parity (official outputs) runs in tests/test_fixtures.py; here the fast path (SDPA, (B, H, W, C) layout,
views instead of copies) is checked against ``reference_forward`` below, a direct transcription of how the official
code computes each block: (B, N, C) tokens, stripes cut by permute+contiguous chains, explicit softmax(q k^T) v,
and (B, N, C) <-> (B, C, H, W) round trips around every depthwise conv.

Benchmark (fast vs reference, gpvit_l1 at 224, batch 8, CPU)::

    python tests/test_gpvit.py --bench [--threads 1] [--batch 8] [--reps 5]
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import timm
import visionzoo  # noqa: F401  (registers the models)
from visionzoo.models.gpvit import GPBlock, GPViT, LocalBlock, checkpoint_filter_fn

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gpvit"
if not FIXTURES.exists():
    FIXTURES = Path("/work/shared/fixtures/gpvit")


# ----------------------------------------------------------------------------------------------------------------
# reference: the official formulation, written out plainly (used as oracle and as the benchmark baseline)

def _ref_heads(x, h):  # 'b n (h c) -> b h n c' with a copy, as einops.rearrange does
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).permute(0, 2, 1, 3).contiguous()


def _ref_attn(q, k, v):
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return attn.softmax(dim=-1) @ v


def _ref_stripe_half(q, k, v, conv, nh, H, W, mode, s):
    """Official LePEAttention on one channel half; q/k/v (B, N, C') -> (B, N, C')."""
    B, N, C = q.shape
    hs, ws = (H, s) if mode == 0 else (s, W)

    def windows(t):  # im2cswin: token image -> windows -> heads
        t = t.transpose(-2, -1).contiguous().view(B, C, H, W)
        t = t.view(B, C, H // hs, hs, W // ws, ws).permute(0, 2, 4, 3, 5, 1).contiguous().reshape(-1, hs * ws, C)
        return t.reshape(-1, hs * ws, nh, C // nh).permute(0, 2, 1, 3).contiguous()

    q, k = windows(q), windows(k)
    t = v.transpose(-2, -1).contiguous().view(B, C, H, W)
    t = t.view(B, C, H // hs, hs, W // ws, ws).permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, C, hs, ws)
    lepe = conv(t).reshape(-1, nh, C // nh, hs * ws).permute(0, 1, 3, 2).contiguous()
    v = t.reshape(-1, nh, C // nh, hs * ws).permute(0, 1, 3, 2).contiguous()
    attn = ((q * (C // nh) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    x = (attn @ v + lepe).transpose(1, 2).reshape(-1, hs * ws, C)
    x = x.view(B, H // hs, W // ws, hs, ws, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)
    return x.view(B, -1, C)


def ref_local_block(blk: LocalBlock, x, H, W):
    B, N, C = x.shape
    a = blk.attn
    qkv = a.qkv(blk.norm1(x)).reshape(B, -1, 3, C).permute(2, 0, 1, 3).contiguous()
    halves = [
        _ref_stripe_half(*(qkv[i, :, :, j * C // 2:(j + 1) * C // 2] for i in range(3)), a.lepe[j], a.num_heads // 2,
                         H, W, j, a.stripe)
        for j in range(2)
    ]
    x = x + blk.drop_path1(a.proj(torch.cat(halves, dim=2)))
    x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
    x = blk.dwconv(x.permute(0, 2, 1).contiguous().reshape(B, C, H, W))
    return x.reshape(B, C, N).permute(0, 2, 1).contiguous()


def ref_gp_block(blk: GPBlock, x, H, W):
    B, N, C = x.shape
    g = blk.group
    q = g.norm_q(blk.group_token.expand(B, -1, -1))
    kin = g.norm_k(x)
    out = _ref_attn(_ref_heads(q, g.num_heads), _ref_heads(g.k_proj(kin), g.num_heads), _ref_heads(kin, g.num_heads))
    gt = out.permute(0, 2, 1, 3).reshape(B, -1, C)
    for layer in blk.mixer:
        gt = gt + layer.drop_path1(layer.token_mlp(layer.norm1(gt).transpose(1, 2)).transpose(1, 2))
        gt = gt + layer.drop_path2(layer.channel_mlp(layer.norm2(gt)))
    u = blk.ungroup
    qn, kn = u.norm_q(x), u.norm_k(gt)
    wk, wv = u.kv.weight.chunk(2, dim=0)
    bk, bv = u.kv.bias.chunk(2, dim=0)
    a = _ref_attn(_ref_heads(u.q(qn), u.num_heads), _ref_heads(F.linear(kn, wk, bk), u.num_heads),
                  _ref_heads(F.linear(kn, wv, bv), u.num_heads))
    a = u.proj(a.permute(0, 2, 1, 3).reshape(B, N, C))
    z = u.fuse(torch.cat([x, u.drop_path1(a)], dim=-1))
    z = z + u.drop_path2(u.mlp(u.norm2(z)))
    z = blk.dwconv(z.permute(0, 2, 1).contiguous().reshape(B, C, H, W))
    return z.view(B, C, -1).permute(0, 2, 1).contiguous()


def reference_forward_features(model: GPViT, img):
    x = model.patch_embed(img)
    B, C, H, W = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = model.pos_embed
    if (H, W) != model.pos_grid:
        gh, gw = model.pos_grid
        pos = pos.reshape(1, gh, gw, C).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    x = x + pos
    for blk in model.blocks:
        x = ref_gp_block(blk, x, H, W) if isinstance(blk, GPBlock) else ref_local_block(blk, x, H, W)
    return model.norm(x), (H, W)


def reference_forward(model: GPViT, img):
    x, _ = reference_forward_features(model, img)
    B, N, C = x.shape
    if model.global_pool == "attn":
        n = model.neck
        q = _ref_heads(n.norm(n.token.expand(B, -1, -1)), n.num_heads)
        x = _ref_attn(q, _ref_heads(n.k_proj(x), n.num_heads), _ref_heads(x, n.num_heads)).reshape(B, C)
    else:
        x = x.mean(1)
    return model.head(x)


def _randomize(model, seed=0):
    """Non-trivial values everywhere (LN/BN affine, BN stats, the zero neck query) so that mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1 and ("norm" in name or "dwconv.1" in name or "stem.1" in name or "convs." in name) \
                    and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 10
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
    return model


def _small(**kw):
    args = dict(img_size=64, embed_dim=48, depth=4, num_heads=4, group_layers={1: 8, 3: 4}, num_group_heads=3,
                num_ungroup_heads=2, stem_convs=1, num_classes=7, global_pool="attn", neck_heads=6)
    args.update(kw)
    return _randomize(GPViT(**args)).eval()


# ----------------------------------------------------------------------------------------------------------------
# oracle tests

@pytest.mark.parametrize("size,pool", [((64, 64), "attn"), ((48, 80), "avg"), ((32, 112), "attn")])
def test_fast_path_matches_reference(size, pool):
    torch.manual_seed(0)
    model = _small(global_pool=pool)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours, ref = model(x), reference_forward(model, x)
        feats = model.forward_features(x)
        ref_feats, (H, W) = reference_forward_features(model, x)
    assert feats.shape == (2, 48, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(feats, ref_feats.transpose(1, 2).reshape(feats.shape), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_fast_path_gradients_match_reference():
    torch.manual_seed(0)
    model = _small().train()
    x = torch.randn(2, 3, 48, 64)
    model(x).square().sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_forward(model, x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_gp_block_has_no_shortcut_and_is_nonnegative():
    model = _small()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = model._embed(x)
        out = model.blocks[1](t)
    assert (out >= 0).all()  # ends in ReLU, no residual
    assert not torch.allclose(out, t.clamp_min(0))


# ----------------------------------------------------------------------------------------------------------------
# sizes, input checks, position embedding

def test_registered_models_and_param_counts():
    expected = {"gpvit_l1": 9_589_848, "gpvit_l2": 24_162_680, "gpvit_l3": 36_654_056, "gpvit_l4": 75_484_456}
    for name, n in expected.items():
        with torch.device("meta"):
            m = timm.create_model(name)
        assert sum(p.numel() for p in m.parameters()) == n, name
        assert m.global_pool == ("attn" if name in ("gpvit_l1", "gpvit_l2") else "avg")
    m = timm.create_model("gpvit_test")
    assert sum(p.numel() for p in m.parameters()) < 100_000
    assert m.pretrained_cfg["input_size"] == (3, 32, 32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


@pytest.mark.parametrize("size", [(40, 40), (64, 72), (30, 64), (8, 8)])
def test_bad_input_size_names_valid_sizes(size):
    m = timm.create_model("gpvit_test").eval()
    with pytest.raises(ValueError, match="multiples of 16") as e:
        m(torch.randn(1, 3, *size))
    assert f"got {size[0]}x{size[1]}" in str(e.value)


def test_non_square_and_resized_pos_embed():
    m = timm.create_model("gpvit_test").eval()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert m.forward_features(x).shape == (1, 24, 6, 10)
        # same grid as the stored embedding -> used as is; other grids -> bicubic resize of the (4, 4) grid
        t = m.patch_embed(x).permute(0, 2, 3, 1)
        pos = F.interpolate(m.pos_embed.reshape(1, 4, 4, 24).permute(0, 3, 1, 2), size=(6, 10), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1)
        torch.testing.assert_close(m._pos_embed(t), t + pos)
    assert m.pos_embed.shape == (1, 16, 24)  # the parameter itself is never resized


# ----------------------------------------------------------------------------------------------------------------
# checkpoint conversion

def _official_layout(name):
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    return manifest[name]["state_dict"]


needs_fixtures = pytest.mark.skipif(not (FIXTURES / "manifest.json").exists(), reason="shared fixtures not found")


@needs_fixtures
def test_filter_official_classifier_checkpoint():
    """A synthetic mmcls checkpoint of gpvit_l1 ({'state_dict': backbone./neck./head.}, DDP 'module.' prefixes)."""
    g = torch.Generator().manual_seed(0)
    official = {k: (torch.randn(s, generator=g) if k.split(".")[-1] != "num_batches_tracked"
                    else torch.tensor(5)) for k, s in _official_layout("GPViT-L1")}
    ckpt = {"meta": {}, "state_dict": {f"module.{k}": v for k, v in official.items()}}
    with torch.device("meta"):  # structure only; the strict load assigns the converted tensors
        model = timm.create_model("gpvit_l1")
    sd = checkpoint_filter_fn(ckpt, model)
    model.load_state_dict(sd, strict=True, assign=True)
    torch.testing.assert_close(model.norm.weight, official["backbone.ln1.weight"])
    torch.testing.assert_close(model.head.weight, official["head.fc.weight"])
    torch.testing.assert_close(model.neck.token, official["neck.group_token"])
    torch.testing.assert_close(model.blocks[4].ungroup.kv.weight[216:], official["backbone.layers.4.un_group_layer.attn.v_proj.weight"])
    torch.testing.assert_close(model.blocks[4].ungroup.fuse.weight, official["backbone.layers.4.un_group_layer.proj.weight"])
    torch.testing.assert_close(model.blocks[0].attn.lepe[1].weight, official["backbone.layers.0.attns.1.get_v.weight"])
    torch.testing.assert_close(model.blocks[3].attn.proj.weight, official["backbone.layers.3.proj.weight"])
    torch.testing.assert_close(model.patch_embed.proj.bias, official["backbone.patch_embed.projection.bias"])
    # our own state dict passes through unchanged
    own = model.state_dict()
    again = checkpoint_filter_fn(own, model)
    assert again.keys() == own.keys() and all(again[k] is own[k] for k in own)


@needs_fixtures
def test_filter_bare_backbone_and_seg_norms():
    """A bare backbone state dict (downstream layout, no prefixes) with the segmentation extra norms norm2/5/8."""
    layout = [(k[len("backbone."):], s) for k, s in _official_layout("GPViT-L1") if k.startswith("backbone.")]
    layout += [(f"norm{i}.{p}", [216]) for i in (2, 5, 8) for p in ("weight", "bias")]
    g = torch.Generator().manual_seed(1)
    official = {k: torch.randn(s, generator=g) if s else torch.tensor(0) for k, s in layout}
    with torch.device("meta"):
        model = timm.create_model("gpvit_l1", num_classes=0, global_pool="avg", out_norms=(2, 5, 8))
        feat = timm.create_model("gpvit_l1", features_only=True)
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True, assign=True)
    torch.testing.assert_close(model.out_norms["5"].bias, official["norm5.bias"])
    torch.testing.assert_close(model.norm.bias, official["ln1.bias"])
    # a classification checkpoint into a features_only model: the extra norms start as identity
    cls_only = {k: v for k, v in official.items() if not k.startswith("norm")}
    sd = checkpoint_filter_fn(cls_only, feat.model)
    feat.model.load_state_dict(sd, strict=True, assign=True)
    assert torch.equal(feat.model.out_norms["2"].weight, torch.ones(216))


def test_filter_resizes_pos_embed_and_drops_unused_head():
    src = timm.create_model("gpvit_test")
    sd = src.state_dict()
    dst = timm.create_model("gpvit_test", img_size=64, num_classes=0, global_pool="avg")
    out = checkpoint_filter_fn(sd, dst)
    dst.load_state_dict(out, strict=True)
    assert dst.pos_embed.shape == (1, 64, 24)


@needs_fixtures
def test_create_model_loads_official_checkpoint_file(tmp_path):
    """visionzoo.create_model(checkpoint_path=...) with an official mmcls .pth (the classifier_groupneck fixture's
    state dict: real official key names, wrapped as the mmcls runner saves it)."""
    from safetensors.torch import load_file

    t = load_file(str(FIXTURES / "classifier_groupneck.safetensors"))
    official = {k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}
    path = tmp_path / "official.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": official}, path)
    model = visionzoo.create_model(
        "gpvit_test", checkpoint_path=path, img_size=64, depth=2, num_heads=4, group_layers={0: 6},
        num_group_heads=6, num_ungroup_heads=6, mlp_ratio=4.0, mixer_depth=2, num_classes=10).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(t["input"]), t["output"], atol=5e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# features

def test_features_only_official_out_indices():
    m = _randomize(timm.create_model("gpvit_test", features_only=True, out_indices=(0, 2))).eval()
    assert m.feature_info.channels() == [24, 24] and m.feature_info.reduction() == [8, 8]
    assert list(m.model.out_norms.keys()) == ["0"]  # extra norm for a non-last index, the last gets the final norm
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        feats = m(x)
        t = m.model._embed(x)
        t0 = m.model.blocks[0](t)
        t2 = m.model.blocks[2](m.model.blocks[1](t0))
    assert [f.shape for f in feats] == [(2, 24, 6, 8)] * 2
    torch.testing.assert_close(feats[0], m.model.out_norms["0"](t0).permute(0, 3, 1, 2))
    torch.testing.assert_close(feats[1], m.model.norm(t2).permute(0, 3, 1, 2))


def test_forward_intermediates_and_grad_checkpointing():
    model = _small()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[1, 3])
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(inter[1], final)  # last layer: the final-normed map
        nhwc = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
    assert [f.shape for f in nhwc] == [(1, 4, 4, 48)] * 2
    model.train()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    g_cp = model.blocks[1].group.k_proj.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(False)
    model(x).sum().backward()
    torch.testing.assert_close(g_cp, model.blocks[1].group.k_proj.weight.grad)


def test_no_weight_decay_and_classifier_api():
    m = timm.create_model("gpvit_test")
    assert m.no_weight_decay() == {"pos_embed", "blocks.1.group_token", "neck.token"}
    m.reset_classifier(0)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 24)
    m.reset_classifier(5, global_pool="avg")
    assert not any(k.startswith("neck.") for k in m.state_dict())
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ----------------------------------------------------------------------------------------------------------------
# group maps

def test_group_attention_api():
    from visionzoo.viz.groups import group_attention

    m = timm.create_model("gpvit_test").eval()
    x = torch.randn(2, 3, 64, 48)
    attn = group_attention(m, x, layer=1)
    assert attn.shape == (2, 2, 8, 8, 6)  # (B, heads, M, H/8, W/8)
    torch.testing.assert_close(attn.sum(dim=(-2, -1)), torch.ones(2, 2, 8))
    with pytest.raises(ValueError, match="GP blocks"):
        group_attention(m, x, layer=0)


def test_group_map_cli_writes_png(tmp_path):
    import argparse

    from visionzoo.viz import groups

    parser = argparse.ArgumentParser()
    groups.add_arguments(parser)
    out = tmp_path / "groups.png"
    args = parser.parse_args(["--model", "gpvit_test", "--image", "sample", "--layer", "1", "--out", str(out),
                              "--img-size", "64"])
    path = groups.write_group_map(args)
    assert Path(path) == out and out.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(out).size[0] > Image.open(out).size[1]  # a row of panels


def test_group_attention_rows_and_assignment_on_full_size_layout():
    """Grouping attention: a softmax over image positions for every (group, head); heads/groups per GP block."""
    from visionzoo.viz.groups import group_assignment, group_attention

    m = _small().eval()
    x = torch.randn(1, 3, 48, 64)
    for layer, groups in ((1, 8), (3, 4)):
        attn = group_attention(m, x, layer=layer)
        assert attn.shape == (1, 3, groups, 6, 8)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(dim=(-2, -1)), torch.ones(1, 3, groups))
        assign = group_assignment(attn[0])
        assert assign.shape == (6, 8) and int(assign.min()) >= 0 and int(assign.max()) < groups
    # the default layer is the first GP block
    torch.testing.assert_close(group_attention(m, x), group_attention(m, x, layer=1))


def test_group_map_via_visionzoo_cli(tmp_path):
    """`visionzoo visualize groups ...` through the real CLI parser (fewer flags than the module's own parser)."""
    from PIL import Image

    from visionzoo.cli import main

    out = tmp_path / "g.png"
    rc = main(["visualize", "groups", "--model", "gpvit_test", "--image", "sample", "--out", str(out),
               "--img-size", "64", "--layer", "1", "--groups", "0", "3"])
    assert rc == 0 and out.exists()
    import numpy as np

    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] > img.shape[0] and len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # a picture, not blank


# ----------------------------------------------------------------------------------------------------------------
# recipes and training

RECIPES = ["gpvit_l1", "gpvit_l2", "gpvit_l3", "gpvit_l4"]


@pytest.mark.parametrize("name", RECIPES)
def test_imagenet_recipes(name):
    from visionzoo.engine.config import load_config

    multi, single = load_config(f"gpvit/{name}"), load_config(f"gpvit/{name}_1gpu")
    assert multi.model == single.model == name
    # spec section 4: 16 GPUs x 128 = 2048, AdamW 2e-3, 300 epochs, 15 warmup epochs, clip 1.0, no EMA
    assert multi.global_batch(multi.world_size) == single.global_batch(single.world_size) == 2048
    assert single.world_size == 1 and single.grad_accum_steps == 16
    assert multi.resolved_lr(multi.world_size) == single.resolved_lr(1) == 2e-3
    assert (multi.opt, multi.weight_decay, multi.epochs, multi.warmup_epochs) == ("adamw", 0.05, 300, 15)
    assert multi.clip_grad == 1.0 and not multi.model_ema and multi.smoothing == 0.1
    assert multi.drop_path == (0.2 if name in ("gpvit_l1", "gpvit_l2") else 0.3)
    import dataclasses

    diff = {f.name for f in dataclasses.fields(multi) if getattr(multi, f.name) != getattr(single, f.name)}
    assert diff == {"world_size", "grad_accum_steps", "notes"}


def test_recipe_optimizer_decay_split_matches_official():
    """Spec section 4: no decay on norms, biases, pos_embed and group tokens; depthwise convs keep their decay."""
    from visionzoo.engine.config import load_config
    from visionzoo.engine.train import build_optimizer

    cfg = load_config("gpvit/gpvit_l1")
    model = timm.create_model("gpvit_test")
    opt = build_optimizer(cfg, model, lr=cfg.lr)
    names = {p: n for n, p in model.named_parameters()}
    no_decay = {names[p] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[p] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert no_decay | decay == set(names.values()) and not no_decay & decay
    for n in names.values():
        if n in ("pos_embed", "neck.token") or n.endswith("group_token") or model.get_parameter(n).dim() == 1:
            assert n in no_decay, n  # biases, LN/BN affine, position embedding, group tokens
        if n.endswith(".weight") and model.get_parameter(n).dim() > 1:
            assert n in decay, n  # linear, conv and depthwise-conv weights (get_v / dw / dwconv.0) keep decay
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8


def test_cpu_recipe_trains(tmp_path):
    from visionzoo.engine.config import load_config
    from visionzoo.engine.train import train

    cfg = load_config("gpvit/gpvit_test_cpu", {"max_steps": 3, "output": str(tmp_path), "experiment": "cpu"})
    assert (cfg.model, cfg.dataset, cfg.img_size, cfg.amp, cfg.workers) == ("gpvit_test", "digits", 32, False, 0)
    out = train(cfg, device="cpu")
    assert out["global_step"] == 3
    assert (Path(out["run_dir"]) / "last" / "model.safetensors").exists()


def test_training_and_validation_read_lmdb(tmp_path):
    """One epoch of gpvit_test on LMDBs converted from a tiny digits folder: train and val both read LMDB."""
    from visionzoo.data.datasets import write_digits_folder
    from visionzoo.data.lmdb import convert_to_lmdb
    from visionzoo.engine.config import load_config
    from visionzoo.engine.train import train

    folder = write_digits_folder(tmp_path / "digits", max_per_class=2)
    db = tmp_path / "db"
    for split in ("train", "val"):
        assert convert_to_lmdb(Path(folder) / split, db / f"{split}.lmdb", progress=False,
                               classes=Path(folder) / "train") == 20
    cfg = load_config("gpvit/gpvit_test_cpu", {"dataset": "lmdb", "data_dir": str(db), "epochs": 1, "batch_size": 10,
                                               "warmup_epochs": 0, "output": str(tmp_path), "experiment": "lmdb"})
    out = train(cfg, device="cpu")
    assert out["global_step"] == 2 and out["epochs_done"] == 1
    assert 0.0 <= out["val_top1"] <= 100.0  # validation ran on the val LMDB


# ----------------------------------------------------------------------------------------------------------------
# benchmark: fast path vs the official formulation

def _bench(threads=1, batch=8, reps=5, model_name="gpvit_l1", size=224):
    import time

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    fns = {"fast": model, "reference": lambda t: reference_forward(model, t)}

    def infer(f):
        model.eval()
        with torch.no_grad():
            f(x)

    def train(f):
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(f(x), y).backward()

    results = {}
    for kind, step in (("forward (eval, no_grad)", infer), ("train step (fwd+bwd)", train)):
        for f in fns.values():
            step(f)  # warm-up
        times = {k: [] for k in fns}
        for _ in range(reps):  # interleaved, so that load from other processes hits both alike
            for k, f in fns.items():
                t0 = time.perf_counter()
                step(f)
                times[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        results[kind] = med
        print(f"{kind:24s} fast {med['fast']:.3f}s  reference {med['reference']:.3f}s  "
              f"speed-up {med['reference'] / med['fast']:.2f}x  (median of {reps}, min fast {min(times['fast']):.3f}s "
              f"ref {min(times['reference']):.3f}s)", flush=True)
    return results


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--bench", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--model", default="gpvit_l1")
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()
    if a.bench:
        print(f"torch {torch.__version__}, threads {a.threads}, {a.model} @ {a.size}, batch {a.batch}")
        _bench(a.threads, a.batch, a.reps, a.model, a.size)
    else:
        sys.exit(pytest.main([__file__, "-q"]))
