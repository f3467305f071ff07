"""Context Cluster (CoC): oracle check of the fast clustering, input sizes, legacy checkpoints, cluster maps, recipes.

The parity with the official code is covered by the fixtures (tests/test_fixtures.py); here the fast scatter + bmm
path is checked against the model's ``cluster_impl='reference'`` (a plain re-statement of the official
broadcast formulation, spec coc.md sections 1.4 and 7) on the same weights, also on configurations the fixtures do
not have (double precision, gradients, train mode, legacy normaliser).
"""
from pathlib import Path

import pytest
import torch
import yaml

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.models.context_cluster import Cluster, ContextCluster, checkpoint_filter_fn, official_kwargs_to_ours

RECIPES = Path(visionzoo.__file__).resolve().parent / "recipes" / "coc"


# ----------------------------------------------------------------------------------------------------------------
# oracle: the fast path against the official broadcast formulation (cluster_impl='reference', same weights)


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


def _same_weights_pair(make):
    """``make(impl)`` for both impls, the reference loading the fast one's state dict (strict: same layout)."""
    fast, ref = make("fast"), make("reference")
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def _assert_outputs_and_grads_match(fast, ref, x, rtol, atol):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_ref = fast(x1), ref(x2)
    torch.testing.assert_close(out_fast, out_ref, rtol=rtol, atol=atol)
    w = torch.randn_like(out_ref)
    names = ["input"] + [n for n, _ in fast.named_parameters()]
    g_fast = torch.autograd.grad((out_fast * w).sum(), [x1] + list(fast.parameters()))
    g_ref = torch.autograd.grad((out_ref * w).sum(), [x2] + list(ref.parameters()))
    for name, a, b in zip(names, g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
    return dict(zip(names, g_fast))


@pytest.mark.parametrize("fold,proposal,size,legacy", [
    ((2, 3), (3, 2), (8, 9), False),  # non-square folds and overlapping pooling windows (4->3, 3->2)
    ((1, 1), (4, 3), (7, 10), False),  # plain: global clustering per head, non-square map
    ((2, 1), (2, 2), (6, 6), False),  # our API: rows-only partition (no official variant has one)
    ((2, 2), (2, 2), (8, 8), True),  # legacy count normaliser
])
def test_fast_cluster_matches_reference(fold, proposal, size, legacy):
    """One Cluster in float64: outputs, input and parameter gradients."""
    torch.manual_seed(0)
    fast, ref = _same_weights_pair(lambda impl: Cluster(
        12, heads=3, head_dim=5, proposal=proposal, fold=fold, legacy_norm=legacy, impl=impl).double())
    _perturb(fast, 3)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, *size, 12, dtype=torch.double)  # channels-last, like inside the model
    grads = _assert_outputs_and_grads_match(fast, ref, x, rtol=1e-9, atol=1e-10)
    assert grads["sim_alpha"].abs() > 0  # the kept similarity carries the gradient to alpha


@pytest.mark.parametrize("mode,kwargs", [
    ("train", {}),  # coc_test: 2x2 region partition in stage 0
    ("train", dict(folds=1, proposals=((3, 2), (2, 2), 1, 1))),  # plain, non-square proposals
    ("eval", dict(legacy_norm=True)),
])
def test_fast_model_matches_reference_model(mode, kwargs):
    """Whole coc_test (non-square input) in float64, the model option threaded down to every Cluster."""
    fast, ref = _same_weights_pair(lambda impl: _coc_test(num_classes=7, cluster_impl=impl, **kwargs).double())
    assert {m.impl for m in ref.modules() if isinstance(m, Cluster)} == {"reference"}
    assert {m.impl for m in fast.modules() if isinstance(m, Cluster)} == {"fast"}
    _perturb(fast, 4)
    ref.load_state_dict(fast.state_dict())
    fast.train(mode == "train")
    ref.train(mode == "train")
    x = torch.randn(2, 3, 32, 48, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    _assert_outputs_and_grads_match(fast, ref, x, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["fold", "plain", "fork_feat"])
def test_reference_impl_reproduces_official_fixtures(case, fixtures_dir, monkeypatch):
    """The oracle itself against the official code's tensors (the fast path: tests/test_fixtures.py)."""
    from visionzoo.testing.families import coc as hook
    from visionzoo.testing.parity import compare, load_case

    path = fixtures_dir / "coc" / f"{case}.json"
    if not path.exists():
        pytest.skip(f"fixture {path} not available")
    spec, tensors = load_case(path)
    model = ContextCluster(**official_kwargs_to_ours(spec["official_kwargs"]), cluster_impl="reference")
    assert all(m.impl == "reference" for m in model.modules() if isinstance(m, Cluster))
    monkeypatch.setattr(hook, "build", lambda _case: model)  # the hook's own runner, on the reference model
    ours = hook.run_case(spec, tensors)
    ref = {k: v for k, v in tensors.items() if k.startswith("output")}
    assert ours.keys() == ref.keys()
    for k in ref:
        ok, max_abs, _, msg = compare(ours[k], ref[k], spec["atol"], spec["rtol"])
        assert ok, f"{case} {k}: max abs {max_abs:.3g} {msg}"


def test_unknown_cluster_impl_raises():
    with pytest.raises(ValueError, match=r"cluster_impl='slow'.*'fast', 'reference'"):
        _coc_test(cluster_impl="slow")
    with pytest.raises(ValueError, match=r"'fast', 'reference'"):
        Cluster(8, heads=2, head_dim=4, impl="broadcast")


def test_official_fold_rule():
    ours = official_kwargs_to_ours(dict(layers=[1, 1, 1, 1], embed_dims=[8, 8, 8, 8], fold_w=[4, 2, 1, 2],
                                        fold_h=[2, 1, 2, 2], proposal_w=[2, 3, 1, 1], proposal_h=[3, 2, 1, 1],
                                        norm_layer="GroupNorm"))
    assert ours["folds"] == [(4, 2), (1, 1), (1, 1), (2, 2)]  # fold_w acts on rows; partition only if both > 1
    assert ours["proposals"] == [(2, 3), (3, 2), (1, 1), (1, 1)]


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
    from visionzoo.tasks.classify import train

    cfg = load_config(str(RECIPES / "coc_test_cpu.yaml"),
                      {"max_steps": 3, "output": str(tmp_path), "experiment": "coc", "epochs": 1})
    assert (cfg.dataset, cfg.img_size, cfg.amp, cfg.workers) == ("digits", 32, "fp32", 0)
    summary = train(cfg, device="cpu")
    assert summary["global_step"] == 3
    assert (Path(summary["run_dir"]) / "last" / "model.safetensors").exists()
