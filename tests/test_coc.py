"""Context Cluster (CoC): oracle check of the fast clustering, input sizes, legacy checkpoints, cluster maps, recipes.

The parity with the official code is covered by the fixtures (tests/test_fixtures.py); here the fast scatter + bmm +
gather path is checked against a plain re-statement of the official broadcast formulation (spec coc.md sections 1.4
and 7), also on configurations the fixtures do not have (double precision, gradients, legacy normaliser).
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.models.context_cluster import Cluster, ClusterBlock, ContextCluster, checkpoint_filter_fn

RECIPES = Path(visionzoo.__file__).resolve().parent / "recipes" / "coc"


# ----------------------------------------------------------------------------------------------------------------
# oracle: the official broadcast formulation, written plainly on NCHW maps


def reference_cluster(m: Cluster, x: torch.Tensor, legacy_norm: bool = False) -> torch.Tensor:
    """Official ``Cluster.forward`` on ``x [B, C, H, W]`` (NCHW): 1x1 convs, heads and regions into the batch,
    AdaptiveAvgPool centers, sigmoid(beta + alpha cos), one-hot argmax mask, and the ``[B', M, N, D]`` broadcast
    products for aggregate and dispatch."""
    E, D = m.heads, m.head_dim
    fr, fc = m.fold
    pr, pc = m.proposal
    value = F.conv2d(x, m.v.weight, m.v.bias)
    p = F.conv2d(x, m.f.weight, m.f.bias)
    B, _, H, W = p.shape
    # heads: channel e*D + d -> batch b*E + e
    value = value.reshape(B * E, D, H, W)
    p = p.reshape(B * E, D, H, W)
    # ``fold`` is ours, (rows, cols), already translated from the official fold_w/fold_h (which partition only
    # when both exceed 1, see test_official_fold_rule); any fold > 1 partitions here
    if fr * fc > 1:  # region (i, j) -> batch ((b*E + e)*fr + i)*fc + j
        h, w = H // fr, W // fc
        value = value.reshape(B * E, D, fr, h, fc, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, D, h, w)
        p = p.reshape(B * E, D, fr, h, fc, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, D, h, w)
    else:
        h, w = H, W
    Bp = p.shape[0]
    centers = F.adaptive_avg_pool2d(p, (pr, pc)).reshape(Bp, D, -1).transpose(1, 2)  # [B', M, D]
    value_centers = F.adaptive_avg_pool2d(value, (pr, pc)).reshape(Bp, D, -1).transpose(1, 2)
    points = p.reshape(Bp, D, -1).transpose(1, 2)  # [B', N, D]
    cos = F.normalize(centers, dim=-1) @ F.normalize(points, dim=-1).transpose(1, 2)  # [B', M, N]
    sim = torch.sigmoid(m.sim_beta + m.sim_alpha * cos)
    _, idx = sim.max(dim=1, keepdim=True)
    mask = torch.zeros_like(sim).scatter_(1, idx, 1.0)
    sim = sim * mask
    v = value.reshape(Bp, D, -1).transpose(1, 2)  # [B', N, D]
    num = (v.unsqueeze(1) * sim.unsqueeze(-1)).sum(2) + value_centers  # [B', M, N, D] summed over N
    den = (mask if legacy_norm else sim).sum(-1, keepdim=True) + 1.0
    out = ((num / den).unsqueeze(2) * sim.unsqueeze(-1)).sum(1)  # [B', M, N, D] summed over M -> [B', N, D]
    out = out.transpose(1, 2).reshape(Bp, D, h, w)
    if fr * fc > 1:
        out = out.reshape(B * E, fr, fc, D, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B * E, D, H, W)
    out = out.reshape(B, E * D, H, W)
    return F.conv2d(out, m.proj.weight, m.proj.bias)


def reference_block(blk: ClusterBlock, x: torch.Tensor) -> torch.Tensor:
    """Official ClusterBlock on NCHW (GroupNorm with one group, layer scale, conv-free Linear MLP), no drop path."""
    ls1, ls2 = blk.layer_scale_1[None, :, None, None], blk.layer_scale_2[None, :, None, None]
    n1 = F.group_norm(x, 1, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    x = x + ls1 * reference_cluster(blk.token_mixer, n1, blk.token_mixer.legacy_norm)
    n2 = F.group_norm(x, 1, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps).permute(0, 2, 3, 1)
    mlp = blk.mlp.fc2(F.gelu(blk.mlp.fc1(n2))).permute(0, 3, 1, 2)
    return x + ls2 * mlp


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Make every parameter matter (layer scales ~1, alpha/beta away from init, nonzero biases), like the fixtures."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
            elif name.endswith("sim_alpha"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2.5 + 0.5)
            elif name.endswith("sim_beta"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 - 1)
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _coc_test(**kwargs) -> ContextCluster:
    torch.manual_seed(0)
    return visionzoo.create_model("coc_test", **kwargs)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_block_matches_broadcast_oracle(mode):
    """coc_test stage-0 block (2x2 region partition, 2x2 centers) with random weights, outputs and all gradients."""
    model = _coc_test().double()
    blk = model.network[0][0]
    _perturb(blk, 1)
    blk.train(mode == "train")
    x = torch.randn(3, 16, 8, 8, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = blk(x1.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    ref = reference_block(blk, x2)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * w).sum(), [x1] + list(blk.parameters()))
    g_ref = torch.autograd.grad((ref * w).sum(), [x2] + list(blk.parameters()))
    names = ["input"] + [n for n, _ in blk.named_parameters()]
    for name, a, b in zip(names, g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    assert g_ours[names.index("token_mixer.sim_alpha")].abs() > 0  # the kept similarity carries the gradient


@pytest.mark.parametrize("fold,proposal,size,legacy", [
    ((2, 3), (3, 2), (8, 9), False),  # non-square folds and overlapping pooling windows (4->3, 3->2)
    ((1, 1), (4, 3), (7, 10), False),  # plain: global clustering per head
    ((2, 1), (2, 2), (6, 6), False),  # our API: rows-only partition (no official variant has one)
    ((2, 2), (2, 2), (8, 8), True),  # legacy count normaliser
])
def test_fast_cluster_matches_oracle_configs(fold, proposal, size, legacy):
    torch.manual_seed(0)
    m = Cluster(12, heads=3, head_dim=5, proposal=proposal, fold=fold, legacy_norm=legacy).double()
    _perturb(m, 3)
    x = torch.randn(2, 12, *size, dtype=torch.double)
    ours = m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, reference_cluster(m, x, legacy), rtol=1e-9, atol=1e-10)


def test_official_fold_rule():
    from visionzoo.models.context_cluster import official_kwargs_to_ours

    ours = official_kwargs_to_ours(dict(layers=[1, 1, 1, 1], embed_dims=[8, 8, 8, 8], fold_w=[4, 2, 1, 2],
                                        fold_h=[2, 1, 2, 2], proposal_w=[2, 3, 1, 1], proposal_h=[3, 2, 1, 1],
                                        norm_layer="GroupNorm"))
    assert ours["folds"] == [(4, 2), (1, 1), (1, 1), (2, 2)]  # fold_w acts on rows; partition only if both > 1
    assert ours["proposals"] == [(2, 3), (3, 2), (1, 1), (1, 1)]


def test_fast_model_matches_oracle_model():
    """Whole coc_test forward with every Cluster replaced by the oracle (fp32, eval and train without drop path)."""
    model = _coc_test(num_classes=7).eval()
    _perturb(model, 4)
    x = torch.randn(2, 3, 32, 32)
    ours = model(x)
    originals = {}
    for m in model.modules():
        if isinstance(m, Cluster):
            originals[m] = m.forward
            m.forward = (lambda mod: lambda t: reference_cluster(mod, t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))(m)
    try:
        ref = model(x)
    finally:
        for m, f in originals.items():
            m.forward = f
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_similarity_stays_fp32_under_autocast():
    """Spec section 7, idea 6: a saturated low-precision sigmoid creates ties that change the assignment."""
    mixer = _coc_test().eval().network[0][0].token_mixer
    orig, seen = mixer._assign, []

    def spy(q, c):
        s, idx = orig(q, c)
        seen.append(s.dtype)
        return s, idx

    mixer._assign = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mixer(torch.randn(1, 8, 8, 16))
    finally:
        del mixer._assign
    assert seen and seen[-1] == torch.float32 and out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# input sizes


def test_unsupported_size_names_valid_sizes():
    model = _coc_test().eval()
    with pytest.raises(ValueError, match=r"coc_test: input size 36x32 is not supported.*multiples of 8"):
        model(torch.randn(1, 3, 36, 32))
    with torch.device("meta"):
        tiny = visionzoo.create_model("coc_tiny")
        tiny2 = visionzoo.create_model("coc_tiny2")
        plain = visionzoo.create_model("coc_tiny_plain")
    with pytest.raises(ValueError, match=r"multiples of 32.*224x224"):
        tiny._check_size(224, 230)
    with pytest.raises(ValueError, match=r"multiples of 56"):
        tiny2._check_size(224, 256)
    assert tiny.valid_input_size(256, 320) and tiny2.valid_input_size(224, 280)
    assert plain.valid_input_size(225, 199)


def test_non_square_and_plain_any_size():
    model = _coc_test(num_classes=5).eval()
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 5)
    feats = model.forward_intermediates(torch.randn(1, 3, 40, 24), intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == [(10, 6), (5, 3), (3, 2), (2, 1)]
    plain = _coc_test(num_classes=5, folds=1).eval()
    assert plain(torch.randn(1, 3, 37, 29)).shape == (1, 5)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _to_legacy(sd: dict) -> dict:
    """Our state dict -> the pre-2023-06 official layout (fc1/fc2/fc_v, conv-shaped MLP weights, fea_pos)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("token_mixer.f.", "token_mixer.fc1.").replace("token_mixer.proj.", "token_mixer.fc2.")
        k = k.replace("token_mixer.v.", "token_mixer.fc_v.")
        if ".mlp.fc" in k and k.endswith("weight"):
            v = v[:, :, None, None]
        out[k] = v
    out["fea_pos"] = torch.zeros(1, 2, 32, 32)
    return out


def test_legacy_checkpoint_round_trip_switches_normaliser():
    src = _coc_test(num_classes=6).eval()
    _perturb(src, 5)
    sd = src.state_dict()
    legacy = {"state_dict": {f"module.{k}": v for k, v in _to_legacy(sd).items()}}
    assert any("fc_v" in k for k in legacy["state_dict"])
    dst = _coc_test(num_classes=6).eval()
    converted = checkpoint_filter_fn(legacy, dst)
    dst.load_state_dict(converted, strict=True)
    for k, v in sd.items():
        assert torch.equal(converted[k], v), k
    assert all(m.legacy_norm for m in dst.modules() if isinstance(m, Cluster))
    x = torch.randn(2, 3, 32, 32)
    src.set_legacy_norm(True)
    torch.testing.assert_close(dst(x), src(x))
    src.set_legacy_norm(False)
    assert not torch.allclose(dst(x), src(x), atol=1e-6)  # the normaliser really changes the function
    # our own state dict passes unchanged and does not switch the normaliser
    fresh = _coc_test(num_classes=6)
    again = checkpoint_filter_fn({"state_dict_ema": sd}, fresh)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    assert not any(m.legacy_norm for m in fresh.modules() if isinstance(m, Cluster))


# ----------------------------------------------------------------------------------------------------------------
# cluster maps


def test_cluster_assignment_api_and_png(tmp_path):
    from PIL import Image

    from visionzoo.viz import clusters

    model = _coc_test().eval()
    crop, x = clusters.prepare_image(clusters.load_image("sample"), model, short_side=64)
    assert x.shape[2] % 8 == 0 and x.shape[3] % 8 == 0 and x.shape[3] > x.shape[2]  # landscape, not squashed
    assert abs(crop.size[0] / crop.size[1] - x.shape[3] / x.shape[2]) < 0.02
    a = clusters.cluster_assignment(model, x, stage=0, block=0, head=1)
    h, w = x.shape[2] // 4, x.shape[3] // 4
    assert a.shape == (1, h, w) and a.dtype == torch.long
    fr, fc = model.folds[0]
    M = model.proposals[0][0] * model.proposals[0][1]
    assert 0 <= int(a.min()) and int(a.max()) < fr * fc * M
    # cluster ids are region-local: the top-left region only holds ids of region 0
    assert int(a[0, : h // fr, : w // fc].max()) < M
    # batch > 1 gives the per-image maps of batch 1
    a2 = clusters.cluster_assignment(model, torch.cat([torch.randn_like(x), x]), 0, 0, 1)
    assert torch.equal(a2[1:], a)
    out = clusters.render_cluster_map(crop, a[0], tmp_path / "map.png")
    img = Image.open(out)
    assert img.mode == "RGB" and img.size == crop.size
    with pytest.raises(ValueError, match="out of range"):
        clusters.cluster_assignment(model, x, stage=0, block=0, head=5)


def test_visualize_clusters_cli(tmp_path, capsys):
    from PIL import Image

    from visionzoo.cli import main

    out = tmp_path / "cli.png"
    rc = main(["visualize", "clusters", "--model", "coc_test", "--image", "sample", "--out", str(out),
               "--stage", "0", "--block", "0", "--head", "0", "--img-size", "64"])
    assert rc == 0 and out.exists()
    w, h = Image.open(out).size
    assert w > h  # the landscape sample image keeps its aspect
    assert "clusters" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# recipes


IMAGENET = ["coc_tiny", "coc_tiny_plain", "coc_small", "coc_medium"]


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_recipes(name):
    from visionzoo.engine.config import load_config

    multi = load_config(str(RECIPES / f"{name}.yaml"))
    one = load_config(str(RECIPES / f"{name}_1gpu.yaml"))
    assert multi.model == one.model == name
    assert multi.global_batch(multi.world_size) == one.global_batch(one.world_size) == 1024
    assert one.world_size == 1 and one.grad_accum_steps == 8
    # lr = global batch / 1024 x 1e-3 (README rule), the same for both forms
    assert multi.resolved_lr(multi.world_size) == one.resolved_lr(one.world_size) == pytest.approx(1e-3)
    assert (multi.opt, multi.weight_decay, multi.epochs, multi.warmup_epochs) == ("adamw", 0.05, 300, 5)
    raw = yaml.safe_load((RECIPES / f"{name}_1gpu.yaml").read_text())
    assert {k: v for k, v in raw.items() if k not in ("world_size", "grad_accum_steps", "notes")} == {
        k: v for k, v in yaml.safe_load((RECIPES / f"{name}.yaml").read_text()).items()
        if k not in ("world_size", "grad_accum_steps", "notes")}


def test_cpu_recipe_trains(tmp_path):
    from visionzoo.engine.config import load_config
    from visionzoo.engine.train import train

    cfg = load_config(str(RECIPES / "coc_test_cpu.yaml"),
                      {"max_steps": 3, "output": str(tmp_path), "experiment": "coc", "epochs": 1})
    assert (cfg.dataset, cfg.img_size, cfg.amp, cfg.workers) == ("digits", 32, False, 0)
    summary = train(cfg, device="cpu")
    assert summary["global_step"] == 3
    assert (Path(summary["run_dir"]) / "last" / "model.safetensors").exists()
