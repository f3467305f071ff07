"""GA (Gramian attention heads): behaviour tests; the batched heads are checked against the per-head
reference path (``head_impl='reference'``), which is itself checked against the official fixtures."""
import math
from pathlib import Path

import pytest
import timm
import timm.data
import timm.loss
import torch
import torch.nn.functional as F

import visionzoo  # noqa: F401
from visionzoo.models.gramian import (
    GALoss, GramianNet, checkpoint_filter_fn, stage3_capture_blocks)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ga"
torch.set_num_threads(1)


def _randomize(model, seed=0):
    """Non-trivial weights and BN statistics (as the fixtures do) so every part of the head matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif 'gamma' in n:
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1. if n.endswith('weight') else 0.))
        for n, b in model.named_buffers():
            if n.endswith('running_mean'):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif n.endswith('running_var'):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    # stacked 2-D head params like gamma_1 (K, D) got the >=2-D rule; give them layer-scale-like values
    with torch.no_grad():
        for n, p in model.heads.named_parameters():
            if 'gamma' in n:
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))
            if n.startswith(('norm1', 'norm2', 'gram_layer.norm')) and n.endswith('weight'):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def _small(**kw):
    args = dict(backbone='convnext', backbone_args=dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)), num_classes=7,
                stage3_naggre=1, gram_dim=16, attn_dim=16, num_branches=3, img_size=32)
    args.update(kw)
    return GramianNet(**args)


CSWIN_SMALL = dict(backbone='cswin', img_size=64, backbone_args=dict(
    embed_dim=8, depth=(1, 1, 2, 1), split_size=(1, 2, 2, 2), num_heads=(2, 2, 2, 2), dims=(8, 16, 24, 32),
    deep_stem=True), fusion='cswin', fusion_args=dict(num_heads=4, split_size=2), gram_layer='cswin',
    gram_layer_args=dict(num_heads=6, split_size=2, mlp_groups=2), contraction_groups=8, mlp_groups=2,
    gram_dim=48, attn_dim=8)


def _heads_run(model, X, impl, weight):
    """Per-head outputs, gradients of every parameter (and of X) and buffers after one step with ``impl``."""
    model.heads.head_impl = impl
    model.zero_grad(set_to_none=True)
    X = X.clone().requires_grad_()
    out = model.forward_heads(X)
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.heads.named_parameters()}
    grads['X'] = X.grad
    return out.detach(), grads, {n: b.clone() for n, b in model.heads.named_buffers()}


@pytest.mark.parametrize("kind", ["convnext", "cswin", "no_gram_layer"])
@pytest.mark.parametrize("train", [False, True])
def test_batched_heads_match_per_head_reference(kind, train):
    """head_impl='batched' (stacked weights, folded class attention) == 'reference' (one head after the other,
    the official structure) on the same weights: outputs, every gradient and the BatchNorm updates."""
    if kind == "cswin":
        model, size = _small(**CSWIN_SMALL), 64
    else:
        model, size = _small(gram_layer=None if kind == "no_gram_layer" else 'convnext'), 32
    _randomize(model, 1)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    model.train(train)
    with torch.no_grad():
        X = model.forward_features(x)
    weight = torch.randn(3, 3, 7, generator=torch.Generator().manual_seed(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_b, grads_b, bufs_b = _heads_run(model, X, 'batched', weight)
    model.load_state_dict(state)
    out_r, grads_r, bufs_r = _heads_run(model, X, 'reference', weight)
    assert out_b.shape == (3, 3, 7)
    torch.testing.assert_close(out_b, out_r, atol=2e-5, rtol=1e-4)
    assert grads_b.keys() == grads_r.keys()
    for n in grads_b:
        scale = grads_r[n].abs().max().item() + 1e-12
        if train and n in ('contraction.bias', 'embed.bias'):
            # a bias right before a train-mode BatchNorm has a zero gradient: both sides are rounding noise
            wscale = grads_r[n.replace('bias', 'weight')].abs().max().item()
            assert max(scale, grads_b[n].abs().max().item()) < 1e-2 * wscale, n
            continue
        torch.testing.assert_close(grads_b[n], grads_r[n], atol=1e-4 * scale, rtol=1e-3, msg=f"grad of {n}")
    for n in bufs_b:
        torch.testing.assert_close(bufs_b[n], bufs_r[n], atol=1e-6, rtol=1e-5, msg=f"buffer {n}")
    if train:  # the train step really moved the statistics (the comparison above is not vacuous)
        assert not torch.equal(bufs_r['embed_bn.running_mean'], state['heads.embed_bn.running_mean'])
        assert bufs_r['embed_bn.num_batches_tracked'] == state['heads.embed_bn.num_batches_tracked'] + 1


def test_head_impl_option():
    model = timm.create_model('ga_test', num_classes=5, head_impl='reference').eval()
    assert model.heads.head_impl == 'reference'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.heads.head_impl = 'batched'
        torch.testing.assert_close(model(x), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="head_impl"):
        timm.create_model('ga_test', head_impl='looped')
    model.heads.head_impl = 'loop'
    with pytest.raises(ValueError, match="head_impl must be 'batched'"):
        model(x)


def test_train_returns_heads_eval_returns_sum():
    model = _randomize(_small(), 3)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        per_head = model.forward_heads(model.forward_features(x))
        out = model(x)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, per_head.sum(0))
    model.train()
    y = model(x)
    assert y.shape == (3, 2, 7)
    model.train_output = 'sum'
    assert model(x).shape == (2, 7)


def test_reset_classifier_and_pre_logits():
    model = timm.create_model('ga_test', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.get_classifier().weight.shape == (3, 10, 32)
    model.reset_classifier(4)
    assert model(x).shape == (2, 4) and model.num_classes == 4
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool='max')


def test_every_parameter_gets_a_gradient_with_ga_loss():
    model = timm.create_model('ga_test', num_classes=10).train()
    out = model(torch.randn(4, 3, 32, 32))
    GALoss()(out, torch.tensor([1, 2, 3, 4])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_other_input_sizes_and_clear_error():
    model = timm.create_model('ga_test', num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 48))


def test_fused_pooling_equals_official_adaptive_pool_at_224():
    f1, f2 = torch.randn(1, 4, 56, 56), torch.randn(1, 4, 28, 28)
    torch.testing.assert_close(F.avg_pool2d(f1, 4), F.adaptive_avg_pool2d(f1, 14))
    torch.testing.assert_close(F.avg_pool2d(f2, 2), F.adaptive_avg_pool2d(f2, 14))


def test_stage3_capture_rule():
    assert stage3_capture_blocks(9, 2) == [3, 6]
    assert stage3_capture_blocks(27, 4) == [5, 10, 15, 20]
    assert stage3_capture_blocks(21, 4) == [4, 8, 12, 16]
    assert stage3_capture_blocks(32, 4) == [6, 12, 18, 24]
    with pytest.raises(ValueError):
        stage3_capture_blocks(2, 4)


def _reference_loss(out, target, lam):
    bce = timm.loss.BinaryCrossEntropy(smoothing=0.1)
    task = sum(bce(z, target) for z in out)
    mean = out.detach().mean(0)
    dec = lam * sum(F.kl_div(F.log_softmax(z, 1), F.log_softmax(mean, 1), log_target=True, reduction='mean')
                    for z in out)
    return task, dec


@pytest.mark.filterwarnings("ignore:reduction")
def test_ga_loss_soft_and_index_targets():
    torch.manual_seed(0)
    out = torch.randn(5, 4, 10, requires_grad=True)
    soft = torch.softmax(torch.randn(4, 10), 1)
    task, dec = GALoss(lam=-0.8).parts(out, soft)
    rt, rd = _reference_loss(out, soft, -0.8)
    torch.testing.assert_close(task, rt)
    torch.testing.assert_close(dec, rd)
    assert dec.item() < 0  # lam < 0 rewards diverging heads
    # class indices == the smoothed one-hot dense target
    labels = torch.tensor([1, 0, 9, 3])
    dense = torch.full((4, 10), 0.01).scatter_(1, labels[:, None], 0.91)
    torch.testing.assert_close(GALoss()(out, labels), GALoss()(out, dense))
    # timm Mixup soft targets go through unchanged
    mix = timm.data.Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    _, t = mix(torch.randn(4, 3, 8, 8), labels)
    assert torch.isfinite(GALoss()(out, t))
    # one head (or summed logits): the decorrelation term vanishes
    assert GALoss().parts(out[0], soft)[1].item() == 0


def test_ga_loss_gradient_only_through_each_head():
    out = torch.randn(3, 2, 5, requires_grad=True)
    GALoss(lam=-0.8, smoothing=0.).parts(out, torch.tensor([0, 1]))[1].backward()
    # d/dz_k of lam*KL(pbar || p_k) averaged over B*C = lam * (p_k - pbar) / (B*C), pbar detached
    p = out.detach().softmax(-1)
    pbar = out.detach().mean(0).softmax(-1)
    torch.testing.assert_close(out.grad, -0.8 * (p - pbar) / 10)


def test_gram_fp64_option_close_to_fp32():
    model = _randomize(_small(), 5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        model.heads.gram_precision = 'fp64'
        b = model(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="gram_precision"):
        _small(gram_precision='fp16')


def test_checkpoint_filter_passes_our_own_dicts_and_unwraps():
    model = _small()
    sd = model.state_dict()
    assert checkpoint_filter_fn({'state_dict': {'module.' + k: v for k, v in sd.items()}}, model).keys() == sd.keys()


@pytest.mark.skipif(not (FIXTURES / "cswin_eval.safetensors").exists(), reason="shared fixtures not present")
@pytest.mark.parametrize("case", ["convnext_eval", "cswin_eval"])
@pytest.mark.parametrize("head_impl", ["batched", "reference"])
def test_official_checkpoint_loads_through_create_model(tmp_path, case, head_impl):
    from safetensors.torch import load_file, save_file
    from visionzoo.testing.families.ga import model_kwargs
    import json
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    t = load_file(str(FIXTURES / f"{case}.safetensors"))
    state = {'module.' + k[6:]: v for k, v in t.items() if k.startswith('state.')}  # DDP-style prefix
    torch.save({'state_dict': state}, tmp_path / "official.pth")
    model = GramianNet(**model_kwargs(meta['official_class'], meta['official_kwargs']), head_impl=head_impl)
    visionzoo.load_weights(model, tmp_path / "official.pth")
    with torch.no_grad():
        out = model.eval().forward_heads(model.forward_features(t['input']))
    torch.testing.assert_close(out, t['output'], atol=1e-4, rtol=1e-4)


def test_registered_names_and_aliases():
    names = set(visionzoo.list_models('ga_*'))
    for n in ['ga_convnext_tiny_688', 'ga_convnext_tiny_768', 'ga_convnext_small_688', 'ga_convnext_small_768',
              'ga_convnext_base_976', 'ga_convnext_base_1024', 'ga_cswin_tiny', 'ga_cswin_small', 'ga_resnet50',
              'ga_vit_small', 'ga_test', 'ga_convnext_tiny', 'ga_convnext_small', 'ga_convnext_base']:
        assert n in names, n
    with torch.device('meta'):
        a = timm.create_model('ga_convnext_tiny')
        b = timm.create_model('ga_convnext_tiny_688')
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters()) == 47821324


def test_features_only_and_export():
    f = timm.create_model('ga_test', features_only=True)
    feats = f(torch.randn(2, 3, 32, 32))
    assert [t.shape[1] for t in feats] == f.feature_info.channels() == [8, 16, 24, 32]
    model = timm.create_model('ga_test').eval()
    torch.export.export(model, (torch.randn(2, 3, 32, 32),))


def test_autocast_bf16_train_step():
    """The batched heads' custom backward (few-row products) works under autocast, as the AMP recipes train."""
    model = timm.create_model('ga_test', num_classes=10).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 32, 32))
    GALoss()(out, torch.tensor([1, 2, 3, 4])).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n
