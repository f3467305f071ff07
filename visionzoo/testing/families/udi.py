"""Parity hook for UDI (see visionzoo.testing.parity): backbone, head, SRS maps, loss and a full training forward.

Cases are dispatched on ``official_class``; every constructor argument comes from the case file.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from visionzoo.testing.parity import case_inputs, check_state_dict_layout, meta_model, official_state

__all__ = ["run_case", "check_manifest_entry", "vit_kwargs", "parse_temp_schedule"]

_VIT_SIZES = {"tiny": "udi_vit_tiny_patch16", "small": "udi_vit_small_patch16", "base": "udi_vit_base_patch16"}


def vit_kwargs(kw: dict) -> dict:
    """Official ``vision_transformer.VisionTransformer`` kwargs -> ``UDIVisionTransformer`` kwargs."""
    out = {}
    if "img_size" in kw:
        s = kw["img_size"]
        out["img_size"] = int(s[0] if isinstance(s, (list, tuple)) else s)
    for k in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
              "drop_path_rate"):
        if k in kw:
            out[k] = kw[k]
    out["num_classes"] = int(kw.get("num_classes", 0))
    out["reg_tokens"] = int(kw.get("num_class_token", 1)) - 1
    if "drop_rate" in kw:
        out["drop_rate"] = kw["drop_rate"]
    if "attn_drop_rate" in kw:
        out["attn_drop_rate"] = kw["attn_drop_rate"]
    return out


def head_kwargs(kw: dict) -> dict:
    keys = ("in_dim", "out_dim", "use_bn", "norm_last_layer", "nlayers", "hidden_dim", "bottleneck_dim")
    return {k: kw[k] for k in keys if k in kw}


def parse_temp_schedule(text, epochs_hint: int = 300) -> np.ndarray:
    """The teacher-temperature schedule string of a case (``np.concatenate((np.linspace(a, b, n),
    np.ones(m) * c))``) or a plain list, without eval."""
    if isinstance(text, (list, tuple)):
        return np.asarray(text, dtype=np.float64)
    num = r"([-+0-9.eE]+)"
    parts = []
    for m in re.finditer(rf"np\.linspace\(\s*{num}\s*,\s*{num}\s*,\s*(\d+)\s*\)|np\.ones\(\s*(\d+)\s*\)\s*\*\s*{num}",
                         text):
        if m.group(1) is not None:
            parts.append(np.linspace(float(m.group(1)), float(m.group(2)), int(m.group(3))))
        else:
            parts.append(np.ones(int(m.group(4))) * float(m.group(5)))
    if not parts:
        raise ValueError(f"cannot parse teacher_temp_schedule {text!r}")
    return np.concatenate(parts)


def _loss_from_kwargs(kw: dict):
    from visionzoo.ssl.udi import UDILoss

    if not kw.get("include_patch", True) or int(kw.get("num_clt", 2)) != 2:
        raise NotImplementedError("only the UDI objective (include_patch=True, num_clt=2) is implemented")
    loss = UDILoss(int(kw["dim"]), int(kw["num_local_crops"]), alpha=float(kw.get("alpha", 0.5)),
                   student_temp=float(kw.get("student_temp", 0.1)),
                   center_momentum=float(kw.get("center_momentum", 0.9)))
    loss.temps = parse_temp_schedule(kw["teacher_temp_schedule"])
    loss.final_temp = float(loss.temps[-1])
    return loss


def _load_center(loss, state: dict) -> None:
    key = "centering.center" if "centering.center" in state else "center"
    loss.center.copy_(state[key])


# ----------------------------------------------------------------------------------------------------------------

def _case_backbone(case, tensors):
    from visionzoo.models.vit_udi import UDIVisionTransformer, checkpoint_filter_fn, dino_resample_pos_embed

    model = UDIVisionTransformer(**vit_kwargs(case["official_kwargs"]))
    model.load_state_dict(checkpoint_filter_fn(official_state(tensors), model))
    model.train(case.get("mode") == "train")
    inp = case_inputs(tensors)
    out = {}
    with torch.no_grad():
        for name, x in inp.items():
            tokens = model.forward_features(x)
            out[f"output.tokens_{name}"] = tokens
            if tuple(x.shape[-2:]) == tuple(model.patch_embed.img_size):
                out[f"output.forward_{name}"] = tokens[:, :2]
                h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
                outs = []
                for blk in model.blocks:
                    h = blk(h)
                    outs.append(model.norm(h))
                out[f"output.last2_{name}"] = torch.stack(outs[-2:])
                out[f"output.last_selfattn_{name}"] = model.get_last_selfattention(x)
            else:
                p = model.patch_embed.patch_size
                grid = (x.shape[-2] // p[0], x.shape[-1] // p[1])
                out[f"output.pos_embed_{name}"] = dino_resample_pos_embed(
                    model.pos_embed, grid, model.num_prefix_tokens, tuple(model.patch_embed.grid_size))
    return {k: v for k, v in out.items() if k in tensors}


def _case_head(case, tensors):
    from visionzoo.ssl.udi import DINOHead, network_checkpoint_filter

    head = DINOHead(**head_kwargs(case["official_kwargs"]))
    head.load_state_dict(network_checkpoint_filter(official_state(tensors)))
    head.train(case.get("mode") == "train")
    out = {}
    with torch.no_grad():
        for name, x in case_inputs(tensors).items():
            out[f"output.{name}"] = head(x)
        out["output.last_layer_effective_weight"] = head.last_layer.weight
    return {k: v for k, v in out.items() if k in tensors}


def _case_maps(case, tensors):
    from visionzoo.ssl.udi import create_maps

    kw = case["official_kwargs"]
    inp = case_inputs(tensors)
    coords, mg, ml = inp["coords"], inp["sample_global"].bool(), inp["sample_local"].bool()
    G, L = kw["global_size"] // kw["patch_size"], kw["local_size"] // kw["patch_size"]
    nl = int(kw["local_crops_number"])
    v1, v2, locs = coords[0], coords[1], coords[2:2 + nl]
    s12, t12 = create_maps(v1, v2, mg, G, G)
    s21, t21 = create_maps(v2, v1, mg, G, G)
    to2 = [create_maps(c, v2, ml, L, G) for c in locs]
    to1 = [create_maps(c, v1, ml, L, G) for c in locs]
    src = [s12, s21] + [s for s, _ in to2] + [s for s, _ in to1]
    tgt = [t12, t21]
    for (_, a), (_, b) in zip(to2, to1):
        tgt += [a, b]
    out = {f"output.src_maps.{i}": m for i, m in enumerate(src)}
    out.update({f"output.tgt_maps.{i}": m for i, m in enumerate(tgt)})
    return out


def _case_loss(case, tensors):
    loss_fn = _loss_from_kwargs(case["official_kwargs"])
    _load_center(loss_fn, official_state(tensors))
    i = case_inputs(tensors)
    s = {"g_cls": i["s_g_cls"], "g_clsp": i["s_g_clsp"], "g_patch": i["s_g_patch"], "g_mask": i["s_g_patch_mask"],
         "l_cls": i["s_l_cls"], "l_clsp": i["s_l_clsp"]}
    t = {"g_cls": i["t_g_cls"], "g_patch": i["t_g_patch"], "g_mask": i["t_g_patch_mask"],
         "l_patch": i["t_l_patch"], "l_mask": i["t_l_patch_mask"]}
    epoch = int(i["epoch"]) if "epoch" in i else int(case.get("epoch", 0))
    total, parts = loss_fn(s, t, epoch)
    out = {f"output.{k}": v for k, v in parts.items() if k != "teacher_temp"}
    out["output.total"] = total.detach()
    out["output.teacher_temp"] = parts["teacher_temp"].float()
    out.update({f"output.target_{k}": v for k, v in loss_fn.last_targets.items()})
    out["output.center_after"] = loss_fn.center.clone()
    return {k: v for k, v in out.items() if k in tensors}


def _official_name(ours: str) -> str:
    if ours.startswith("backbone."):
        return "backbone.backbone." + ours[len("backbone."):]
    if ours.startswith("srs.norm1."):
        return "backbone.norm1." + ours[len("srs.norm1."):]
    if ours.startswith("srs."):
        return "backbone.attn." + ours[len("srs."):]
    if ours.startswith("head."):
        return "head.0." + ours[len("head."):]
    return ours


def _build_network(kw: dict):
    from visionzoo.models.vit_udi import UDIVisionTransformer
    from visionzoo.ssl.udi import DINOHead, UDINetwork

    bb = UDIVisionTransformer(**vit_kwargs(kw["backbone"]))
    heads = (kw.get("udi_wrapper", {}).get("attn_kwargs") or {}).get("num_heads")
    return UDINetwork(bb, DINOHead(**head_kwargs(kw["head"])), heads)


def _case_forward(case, tensors):
    from visionzoo.ssl.udi import network_checkpoint_filter, split_maps

    kw = case["official_kwargs"]
    student, teacher = _build_network(kw), _build_network(kw)
    student.load_state_dict(network_checkpoint_filter(official_state(tensors, "state.student."), student))
    teacher.load_state_dict(network_checkpoint_filter(official_state(tensors, "state.teacher."), teacher))
    for p in teacher.parameters():
        p.requires_grad = False
    train = str(case.get("mode", "train")).startswith("train")
    student.train(train)
    teacher.train(train)
    loss_fn = _loss_from_kwargs(kw["loss"])
    _load_center(loss_fn, official_state(tensors, "state.loss."))
    inp = case_inputs(tensors)

    def listed(prefix):
        n = len([k for k in inp if k.startswith(prefix + ".")])
        return [inp[f"{prefix}.{i}"] for i in range(n)]

    crops, src_maps, tgt_maps = listed("crops"), listed("src_maps"), listed("tgt_maps")
    nl = len(crops) - 2
    src_g, tgt_g, tgt_l = split_maps(src_maps, tgt_maps, nl)
    with torch.no_grad():
        t_out = teacher.forward_teacher(torch.cat([crops[1], crops[0]]), tgt_g, tgt_l)
    s_out = student(torch.cat([crops[0], crops[1]]), torch.cat(crops[2:]) if nl else None, src_g)
    total, parts = loss_fn(s_out, t_out, int(case.get("epoch", 0)))
    total.backward()
    out = {f"output.student.{k}": v.detach() for k, v in s_out.items()}
    out.update({f"output.teacher.{k}": v for k, v in t_out.items()})
    out.update({f"output.{k}": v for k, v in parts.items() if k != "teacher_temp"})
    out["output.total"] = total.detach()
    out["output.center_after"] = loss_fn.center.clone()
    grads = {}
    for name, p in student.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads[name] = g
    if "backbone.reg_token" in grads:  # timm's split tokens -> the official [1, 2, C] cls_token
        grads["backbone.cls_token"] = torch.cat([grads["backbone.cls_token"], grads.pop("backbone.reg_token")], 1)
    for name, g in grads.items():
        out["grad." + _official_name(name)] = g
    for name in case.get("grads_missing", []) or []:
        out["grad." + name] = torch.zeros(0)
    return {k: v for k, v in out.items() if k in tensors}


def run_case(case: dict, tensors: dict) -> dict:
    torch.manual_seed(int(case.get("seed", 0)))
    cls = case.get("official_class", "")
    if cls.endswith("VisionTransformer"):
        return _case_backbone(case, tensors)
    if cls.endswith("DINOHead"):
        return _case_head(case, tensors)
    if cls.endswith("DataAugmentation"):
        return _case_maps(case, tensors)
    if cls.endswith("UDILoss") and "MultiCropWrapper" not in cls:
        return _case_loss(case, tensors)
    if "MultiCropWrapper" in cls:
        return _case_forward(case, tensors)
    raise NotImplementedError(f"UDI hook: no runner for official_class {cls!r}")


# ----------------------------------------------------------------------------------------------------------------

def _size_of(builder: str) -> str:
    m = re.search(r"vit_(tiny|small|base)", builder or "")
    if not m:
        raise NotImplementedError(f"UDI manifest: unknown official builder {builder!r}")
    return _VIT_SIZES[m.group(1)]


def check_manifest_entry(name: str, entry: dict) -> list[str]:
    import timm

    from visionzoo.models.vit_udi import checkpoint_filter_fn
    from visionzoo.ssl.udi import DINOHead, UDINetwork, network_checkpoint_filter

    layout = entry["state_dict"]
    kw = entry.get("official_kwargs", {})
    if "MultiCropWrapper" in entry.get("official_class", ""):
        shapes = dict((k, s) for k, s in layout)
        hidden, in_dim = shapes["head.0.mlp.0.weight"]
        bottleneck = shapes["head.0.last_layer.weight_v"][1]
        out_dim = shapes["head.0.last_layer.weight_v"][0]
        nlayers = len([k for k in shapes if re.fullmatch(r"head\.0\.mlp\.\d+\.weight", k)])
        heads = re.search(r"MaskedAttention\(\s*\d+\s*,\s*(\d+)", entry.get("official_builder", ""))
        builder = _size_of(entry.get("official_builder", ""))

        def build():
            bb = timm.create_model(builder, num_classes=0)
            head = DINOHead(in_dim, out_dim, norm_last_layer=False, nlayers=nlayers, hidden_dim=hidden,
                            bottleneck_dim=bottleneck)
            return UDINetwork(bb, head, int(heads.group(1)) if heads else None)

        model = meta_model(build)
        return check_state_dict_layout(model, layout, network_checkpoint_filter, expected_params=entry["params"])
    builder = _size_of(entry.get("official_builder", name))
    reg = int(kw.get("num_class_token", 1)) - 1
    extra = {k: kw[k] for k in ("patch_size",) if k in kw}
    model = meta_model(lambda: timm.create_model(builder, num_classes=0, reg_tokens=reg, **extra))
    return check_state_dict_layout(model, layout, checkpoint_filter_fn, expected_params=entry["params"])
