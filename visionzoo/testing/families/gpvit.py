"""Parity hook for GPViT (see visionzoo.testing.parity).

Official constructors covered: ``mmcls...backbones.gpvit.GPViT`` (backbone: returns a tuple of stride-8 maps for
``out_indices``) and ``mmcls.models.classifiers.image.ImageClassifier`` (GPViT backbone + GroupNeck or
GlobalAveragePooling neck + LinearClsHead; compared on raw logits).
"""
from __future__ import annotations

import copy

import torch

from visionzoo.models.gpvit import GPViT, checkpoint_filter_fn
from visionzoo.testing.parity import case_inputs, check_state_dict_layout, meta_model, official_state

# official arch_zoo (the constructor also accepts these names as `arch`)
OFFICIAL_ARCHS = {
    name: dict(embed_dims=c, patch_size=8, window_size=2, num_layers=12, num_heads=12, num_group_heads=6,
               num_group_forward_heads=6, num_ungroup_heads=6, ffn_ratio=4.0,
               patch_embed=dict(type="ConvPatchEmbed", num_convs=nc), mlpmixer_depth=1,
               group_layers={1: 64, 4: 32, 7: 32, 10: 16}, drop_path_rate=dpr)
    for name, c, nc, dpr in (("L1", 216, 0, 0.2), ("L2", 348, 1, 0.2), ("L3", 432, 1, 0.3), ("L4", 624, 2, 0.3))
}

# official GPViT kwargs that do not change the computation in eval mode (or that we do not model)
_IGNORED = {"init_cfg", "test_cfg", "convert_syncbn", "freeze_patch_embed", "group_with_cp", "qkv_bias"}


def backbone_kwargs(official: dict) -> tuple[dict, list[int]]:
    """Official ``GPViT(**kwargs)`` -> (our GPViT kwargs without head, absolute out_indices)."""
    kw = copy.deepcopy(official)
    kw.pop("type", None)
    arch = kw.pop("arch", "")
    arch = dict(OFFICIAL_ARCHS[arch.upper()]) if isinstance(arch, str) else dict(arch)
    for k in ("patch_cfg", "layer_cfgs"):
        if kw.pop(k, None):
            raise NotImplementedError(f"official GPViT argument '{k}' is not supported by visionzoo's GPViT")
    embed = kw.pop("embed_dims", None) or arch["embed_dims"]
    if arch.get("patch_size", 8) != 8 or arch.get("patch_embed", {}).get("type", "ConvPatchEmbed") != "ConvPatchEmbed":
        raise NotImplementedError("only the ConvPatchEmbed stem with patch_size 8 is supported")
    depth = arch["num_layers"]
    dpr = kw.pop("drop_path_rate", 0.0)
    if dpr < 0:
        dpr = arch["drop_path_rate"]
    out_indices = kw.pop("out_indices", -1)
    out_indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
    out_indices = [i + depth if i < 0 else i for i in out_indices]
    norm_cfg = kw.pop("norm_cfg", None) or {"type": "LN", "eps": 1e-6}
    if norm_cfg.get("type", "LN") != "LN":
        raise NotImplementedError(f"norm_cfg type {norm_cfg['type']} is not supported")
    if kw.pop("interpolate_mode", "bicubic") != "bicubic":
        raise NotImplementedError("only bicubic position-embedding resizing is supported")
    ours = dict(
        img_size=kw.pop("img_size", 224),
        in_chans=kw.pop("in_channels", 3),
        embed_dim=embed,
        depth=depth,
        num_heads=arch["num_heads"],
        stripe_width=arch.get("window_size", 2),
        group_layers={int(k): int(v) for k, v in arch["group_layers"].items()},
        num_group_heads=arch["num_group_heads"],
        num_ungroup_heads=arch["num_ungroup_heads"],
        mixer_depth=arch.get("mlpmixer_depth", 1),
        mlp_ratio=arch.get("ffn_ratio", 4.0),
        stem_convs=arch.get("patch_embed", {}).get("num_convs", 0),
        norm_eps=norm_cfg.get("eps", 1e-5),
        final_norm=kw.pop("final_norm", True),
        out_norms=tuple(i for i in out_indices if i != depth - 1),
        pos_drop_rate=kw.pop("drop_rate", 0.0),
        drop_path_rate=dpr,
    )
    unknown = sorted(set(kw) - _IGNORED)
    if unknown:
        raise NotImplementedError(f"official GPViT arguments not mapped: {unknown}")
    return ours, out_indices


def classifier_kwargs(official: dict) -> dict:
    """Official ImageClassifier config (backbone / neck / head) -> our GPViT kwargs."""
    ours, _ = backbone_kwargs(official["backbone"])
    ours["out_norms"] = ()
    neck = official.get("neck") or {}
    ntype = neck.get("type")
    if ntype == "GroupNeck":
        ours["global_pool"] = "attn"
        ours["neck_heads"] = neck.get("num_heads", 6)
    elif ntype == "GlobalAveragePooling":
        ours["global_pool"] = "avg"
    else:
        raise NotImplementedError(f"neck {ntype!r} is not supported")
    head = official.get("head") or {}
    if head.get("type", "LinearClsHead") != "LinearClsHead":
        raise NotImplementedError(f"head {head.get('type')!r} is not supported")
    ours["num_classes"] = head.get("num_classes", 1000)
    return ours


def _is_classifier(case: dict) -> bool:
    return "backbone" in case["official_kwargs"] or case.get("official_class", "").endswith("ImageClassifier")


def build(case: dict) -> tuple[GPViT, list[int] | None]:
    if _is_classifier(case):
        return GPViT(**classifier_kwargs(case["official_kwargs"])), None
    kw, out_indices = backbone_kwargs(case["official_kwargs"])
    return GPViT(num_classes=0, global_pool="", **kw), out_indices


def run_case(case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model, out_indices = build(case)
    sd = checkpoint_filter_fn(official_state(tensors), model)
    model.load_state_dict(sd, strict=True)
    model.train(case.get("mode", "eval") == "train")
    x = case_inputs(tensors)[""]
    with torch.no_grad():
        if out_indices is None:
            return {"output": model(x)}
        feats = model.forward_intermediates(x, indices=out_indices, intermediates_only=True)
    if "output" in tensors and len(feats) == 1:
        return {"output": feats[0]}
    out = {}
    for pos, (idx, f) in enumerate(zip(out_indices, feats)):
        key = f"output.{idx}" if f"output.{idx}" in tensors else f"output.{pos}"
        out[key] = f
    return out


def check_manifest_entry(name: str, entry: dict) -> list[str]:
    import timm

    import visionzoo  # noqa: F401  (registers the models)

    ours = "gpvit_" + name.split("-")[-1].lower()  # GPViT-L1 -> gpvit_l1
    model = meta_model(lambda: timm.create_model(ours))
    problems = check_state_dict_layout(model, entry["state_dict"], checkpoint_filter_fn, expected_params=entry["params"])
    # the parts, too: backbone / neck / head
    count = lambda prefixes: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
    parts = {"params_neck": count(("neck.",)), "params_head": count(("head.",))}
    parts["params_backbone"] = sum(p.numel() for p in model.parameters()) - parts["params_neck"] - parts["params_head"]
    for k, v in parts.items():
        if k in entry and entry[k] != v:
            problems.append(f"{k} {v} != official {entry[k]}")
    return problems
