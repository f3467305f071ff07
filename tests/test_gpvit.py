"""GPViT: behaviour tests, and the fast path checked against the official formulation.

The fixture parity (official outputs) runs in tests/test_fixtures.py; here the fast path (SDPA, (B, H, W, C) layout,
views instead of copies) is checked against the same model built with ``attn_impl='reference'``: a direct
transcription of how the official code computes each block ((B, N, C) tokens, stripes cut by permute+contiguous
chains, explicit softmax(q k^T) v, (B, N, C) <-> (B, C, H, W) round trips around every depthwise conv). That
reference lives in visionzoo/models/gpvit.py (one copy of the oracle) and is also the benchmark baseline::

    visionzoo benchmark -m gpvit_l1 --model-kwargs attn_impl=reference --threads 1 --device cpu --img-size 224 -b 8
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import timm
import visionzoo  # noqa: F401  (registers the models)
from visionzoo.models.gpvit import GPViT, checkpoint_filter_fn

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gpvit"
if not FIXTURES.exists():
    FIXTURES = Path("/work/shared/fixtures/gpvit")


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
# fast path vs the official formulation (attn_impl='reference')

def _with_reference(model):
    """The same weights with attn_impl='reference'."""
    return copy.deepcopy(model).set_attn_impl("reference")


@pytest.mark.parametrize("size,pool", [((64, 64), "attn"), ((48, 80), "avg"), ((32, 112), "attn"), ((96, 32), "")])
def test_fast_path_matches_reference(size, pool):
    torch.manual_seed(0)
    model = _small(global_pool=pool, num_classes=7 if pool else 0)
    ref = _with_reference(model)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats, ref_feats = model.forward_features(x), ref.forward_features(x)
        ours, theirs = model.forward_head(feats), ref.forward_head(ref_feats)
        inter = model.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
        ref_inter = ref.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
    assert feats.shape == (2, 48, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(feats, ref_feats, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    for a, b in zip(inter, ref_inter):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("size,pool", [((48, 64), "attn"), ((64, 32), "avg")])
def test_fast_path_gradients_match_reference(size, pool):
    torch.manual_seed(0)
    model = _small(global_pool=pool).train()
    ref = _with_reference(model).train()
    x = torch.randn(2, 3, *size)
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, ref_grads[n].grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_reference_is_the_plain_formulation(monkeypatch):
    """The reference never calls SDPA (so it is a real second formulation) and the fast path always does."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model = _small()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _with_reference(model)(x)
        assert calls == []
        model(x)
    assert len(calls) == 2 * 2 + 2 * 2 + 1  # 2 local blocks x 2 stripe halves, 2 GP blocks x 2, the neck


def test_attn_impl_option():
    m = timm.create_model("gpvit_test", attn_impl="reference")
    assert m.attn_impl == m.blocks[0].attn_impl == m.blocks[1].attn_impl == m.neck.attn_impl == "reference"
    m.reset_classifier(3, global_pool="avg")
    m.reset_classifier(3, global_pool="attn")  # a new neck follows the model's setting
    assert m.neck.attn_impl == "reference"
    assert [k for k in timm.create_model("gpvit_test").state_dict()] == \
        [k for k in timm.create_model("gpvit_test", attn_impl="reference").state_dict()]
    with pytest.raises(ValueError, match="attn_impl must be 'fast'.*'reference'.*got 'sdpa'"):
        timm.create_model("gpvit_test", attn_impl="sdpa")
    with pytest.raises(ValueError, match="attn_impl"):
        m.set_attn_impl("math")
    assert m.attn_impl == "reference"  # unchanged after the bad value


def test_gp_block_has_no_shortcut_and_is_nonnegative():
    model = _small()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = model.embed_tokens(x)
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
        # the reference formulation reproduces the official numbers too
        torch.testing.assert_close(_with_reference(model)(t["input"]), t["output"], atol=5e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# features

def test_features_only_official_out_indices():
    m = _randomize(timm.create_model("gpvit_test", features_only=True, out_indices=(0, 2))).eval()
    assert m.feature_info.channels() == [24, 24] and m.feature_info.reduction() == [8, 8]
    assert list(m.model.out_norms.keys()) == ["0"]  # extra norm for a non-last index, the last gets the final norm
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        feats = m(x)
        t = m.model.embed_tokens(x)
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
    from visionzoo.tasks.classify import build_optimizer

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
    from visionzoo.tasks.classify import train

    cfg = load_config("gpvit/gpvit_test_cpu", {"max_steps": 3, "output": str(tmp_path), "experiment": "cpu"})
    assert (cfg.model, cfg.dataset, cfg.img_size, cfg.amp, cfg.workers) == ("gpvit_test", "digits", 32, "fp32", 0)
    out = train(cfg, device="cpu")
    assert out["global_step"] == 3
    assert (Path(out["run_dir"]) / "last" / "model.safetensors").exists()


def test_training_and_validation_read_lmdb(tmp_path):
    """One epoch of gpvit_test on LMDBs converted from a tiny digits folder: train and val both read LMDB."""
    from visionzoo.data.datasets import write_digits_folder
    from visionzoo.data.lmdb import convert_to_lmdb
    from visionzoo.engine.config import load_config
    from visionzoo.tasks.classify import train

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
