"""Parity hook for GA (Gramian attention heads): official GA_ConvNeXt / GA_CSWinTransformer kwargs -> ours.

Fixture keys handled (any case in this format): ``output`` / ``output.logits`` (per-head logits stacked,
(K, B, C)), ``output.loss`` / ``output.loss_task`` / ``output.loss_dec`` (the GA loss and its parts, needs
``input.target`` and the case's ``GA_lam``), ``output.grad.<official key>`` and ``output.buffers.<official key>``
(gradients / buffers of OUR batched parameters, read back under the official per-head names through the
inverse of ``checkpoint_filter_fn``).
"""
from __future__ import annotations

import re

import torch

from visionzoo.models.gramian import GALoss, GramianNet, checkpoint_filter_fn
from visionzoo.testing.parity import case_inputs, check_state_dict_layout, meta_model, official_state


def model_kwargs(official_class: str, kw: dict) -> dict:
    """Constructor arguments of our GramianNet for an official GA_ConvNeXt / GA_CSWinTransformer."""
    common = dict(num_classes=kw.get('num_classes', 1000), in_chans=kw.get('in_chans', 3),
                  drop_rate=kw.get('drop_rate', 0.), drop_path_rate=kw.get('drop_path_rate', 0.),
                  num_branches=kw.get('branches', 5), gram_dim=kw.get('gram_dim', 192))
    if official_class.endswith('GA_ConvNeXt'):
        if kw.get('conv_mlp', False):
            raise ValueError("official conv_mlp=True is broken (feeds NCHW to a Linear MLP); not supported.")
        if kw.get('output_stride', 32) != 32:
            raise ValueError("official GA_ConvNeXt asserts output_stride == 32.")
        depths = list(kw.get('depths', (3, 3, 9, 3, 1)))
        dims = list(kw.get('dims', (96, 192, 384, 768, 768)))
        ls = kw.get('ls_init_value', 1e-6)
        return dict(common, backbone='convnext',
                    backbone_args=dict(depths=depths, dims=dims[:4], ls_init_value=ls, patch_size=kw.get('patch_size', 4)),
                    dim=dims[4], attn_dim=kw.get('dim_embed', 128), stage3_naggre=kw.get('stage3_naggre', 2),
                    embed_groups=kw.get('gram_embedding_gropus', 8), mlp_groups=4, contraction_groups=1,
                    fusion='bottleneck', gram_layer='convnext' if kw.get('gram_layer', True) else None,
                    gram_layer_args=dict(ls_init_value=ls))
    if official_class.endswith('GA_CSWinTransformer'):
        split = list(kw.get('split_size', (3, 5, 7)))
        heads = kw.get('num_heads', 12)
        if isinstance(heads, int) or len(split) < 5:
            raise ValueError("official GA_CSWinTransformer needs 5-entry num_heads and split_size (its defaults crash).")
        dims = list(kw.get('dims', (64, 128, 256, 512)))
        qkv_bias = kw.get('qkv_bias', True)
        stage5 = kw.get('stage5', 'CSWin')
        args = dict(common, backbone='cswin', img_size=kw.get('img_size', 224),
                    backbone_args=dict(embed_dim=kw.get('embed_dim', 64), depth=list(kw['depth']),
                                       split_size=split[:4], num_heads=list(heads[:4]), mlp_ratio=kw.get('mlp_ratio', 4.),
                                       mlp_ratio_stage4=kw.get('mlp_ratio_stage4', 4.), qkv_bias=qkv_bias, dims=dims,
                                       deep_stem=kw.get('deep_stem', True)),
                    stage3_naggre=kw.get('stage3_naggre', 4), dim=dims[3], attn_dim=dims[3] // 4,
                    contraction_groups=8, embed_groups=8, mlp_groups=kw.get('ga_mlp_groups', 2),
                    gram_layer='cswin' if kw.get('ga_layer', True) else None,
                    gram_layer_args=dict(num_heads=6, split_size=split[4], mlp_ratio=4.,
                                         mlp_groups=kw.get('ga_layer_mlp_groups', 1), qkv_bias=qkv_bias))
        if stage5 == 'CSWin':
            args.update(fusion='cswin', fusion_args=dict(
                num_heads=heads[4], split_size=split[4], mlp_ratio=kw.get('mlp_ratio_stage5', 4.),
                mlp_groups=kw.get('stage5_mlp_groups', 1), qkv_bias=qkv_bias))
        elif stage5 == 'bottleneck':
            args.update(fusion='bottleneck')
        else:
            raise ValueError(f"unknown official stage5={stage5!r}")
        return args
    raise ValueError(f"no GA mapping for official class {official_class!r}")


def official_view(ours: dict, official_shapes: dict, model) -> dict:
    """Read OUR tensors back under official keys: push element ids through checkpoint_filter_fn and invert."""
    ids, off = {}, 0
    for k, shape in official_shapes.items():
        n = 1
        for s in shape:
            n *= s
        ids[k] = torch.arange(off, off + n, dtype=torch.float64).reshape(shape)
        off += n
    converted = checkpoint_filter_fn(ids, model)
    key_of = torch.full((off,), -1, dtype=torch.long)
    pos_of = torch.full((off,), -1, dtype=torch.long)
    names = list(converted)
    for i, ck in enumerate(names):
        flat = converted[ck].reshape(-1).long()
        key_of[flat] = i
        pos_of[flat] = torch.arange(flat.numel())

    def get(k: str) -> torch.Tensor:
        flat = ids[k].reshape(-1).long()
        kidx = key_of[flat]
        if (kidx < 0).any() or (kidx != kidx[0]).any():
            raise KeyError(f"official key {k} does not map onto one of our tensors")
        src = ours[names[int(kidx[0])]]
        return src.reshape(-1)[pos_of[flat]].reshape(ids[k].shape)

    return get


def _smoothing(case: dict) -> float:
    m = re.search(r"smoothing=([0-9.]+)", str(case.get('loss_fn', '')))
    return float(m.group(1)) if m else 0.1


def build(case: dict, tensors: dict) -> GramianNet:
    model = GramianNet(**model_kwargs(case['official_class'], case['official_kwargs']))
    model.load_state_dict(checkpoint_filter_fn(official_state(tensors), model), strict=True)
    return model


def run_case(case: dict, tensors: dict) -> dict:
    torch.manual_seed(case.get('seed', 0))
    model = build(case, tensors)
    model.train(case.get('mode', 'eval') == 'train')
    inputs = case_inputs(tensors)
    x = inputs[''] if '' in inputs else inputs['image']
    want = [k for k in tensors if k == 'output' or k.startswith('output.')]
    out = {}
    logits = model.forward_heads(model.forward_features(x))  # (K, B, C) in either mode
    for k in ('output', 'output.logits'):
        if k in want:
            out[k] = logits
    needs_loss = any(k.startswith(('output.loss', 'output.grad.')) for k in want)
    if needs_loss:
        loss_fn = GALoss(lam=float(case.get('GA_lam', 0.)), smoothing=_smoothing(case))
        task, dec = loss_fn.parts(logits, inputs['target'])
        loss = task + dec
        out.update({'output.loss': loss, 'output.loss_task': task, 'output.loss_dec': dec})
        if any(k.startswith('output.grad.') for k in want):
            loss.backward()
    shapes = {k: tuple(v.shape) for k, v in official_state(tensors).items()}
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    bufs = model.state_dict()
    g_view = official_view(grads, shapes, model)
    b_view = official_view(bufs, shapes, model)
    for k in want:
        if k.startswith('output.grad.'):
            out[k] = g_view(k[len('output.grad.'):])
        elif k.startswith('output.buffers.'):
            out[k] = b_view(k[len('output.buffers.'):])
    unknown = [k for k in want if k not in out]
    if unknown:
        raise KeyError(f"GA hook does not know how to produce fixture keys {unknown}")
    return {k: v.detach() for k, v in out.items() if k in want}


def check_manifest_entry(name: str, entry: dict) -> list:
    import timm
    import visionzoo  # noqa: F401  (registers the builders)

    kwargs = model_kwargs(entry['official_class'], entry['official_kwargs'])
    model = meta_model(lambda: GramianNet(**kwargs))
    problems = check_state_dict_layout(model, entry['state_dict'], checkpoint_filter_fn, expected_params=entry['params'])
    # the registered builder (official name, or our alias of a README name) must build the same model
    if timm.is_model(name):
        built = meta_model(lambda: timm.create_model(name))
        n = sum(p.numel() for p in built.parameters())
        if n != entry['params']:
            problems.append(f"registered builder {name}: params {n} != official {entry['params']}")
    else:
        problems.append(f"no registered model named {name}")
    return problems
