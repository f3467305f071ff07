"""Official mmdet 2.x counterparts: our detector parts built from mmdet constructor arguments, official state dicts
(single modules and whole ``MaskRCNN`` / ``RetinaNet`` checkpoints) converted to ours, and the dense parity hooks.

* ``module_from_official(registry, type, kwargs)``: our module for an mmdet ``NECKS`` / ``HEADS`` / ``BACKBONES``
  config (FPN, RPNHead, RetinaHead, ConvFC box heads, FCNMaskHead, the GPViT adapter), and how to run it.
* ``checkpoint_filter_fn(state_dict, model)``: an official mmdet detector state dict -> ours. The backbone part goes
  through the backbone family's ``checkpoint_filter_fn`` (GPViT adapter, CoC, ...); the rest is renamed onto the
  torchvision modules (``heads.py``): ConvModule ``X.conv`` / ``X.bn`` -> ``X.0`` / ``X.1``, and ``fc_cls`` rows are
  rotated from mmdet's background-last to torchvision's background-first order.
* ``load_official_checkpoint(obj, source)``: an official mmdet ``.pth`` (``state_dict`` + ``meta``) as our detector,
  built from the recipe whose ``official_config`` is ``meta.exp_name`` (the config file the run was trained with).
* ``PARITY_MODULES`` / ``manifest_problems``: the ``dense`` family hooks (``visionzoo.testing.families.dense``).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ...errors import ConfigError, UserError
from . import heads as H

_logger = logging.getLogger("visionzoo")

BUILDER = "mmdet build_detector"  # the manifest's official_builder of the detectors this module covers
_NORMS = {"BN": "bn", "BN2d": "bn", "SyncBN": "bn", "GN": "gn"}
# constructor arguments that do not change an eval forward (losses, coders, targets, sampling, initialisation)
_NO_EFFECT = ("loss_cls", "loss_bbox", "loss_mask", "bbox_coder", "init_cfg", "train_cfg", "test_cfg",
              "reg_decoded_bbox", "anchor_generator", "conv_cfg", "upsample_cfg", "scale_factor", "predict_upsample")


# ----------------------------------------------------------------------------------------------------------------
# official constructor arguments -> our modules

def _norm(cfg: dict | None, any_groups: bool = False) -> str | None:
    if cfg is None:
        return None
    name = _NORMS.get(cfg.get("type"))
    if name is None or (name == "gn" and not any_groups and cfg.get("num_groups") != 32):
        raise NotImplementedError(f"norm_cfg {cfg} is not supported (BN, SyncBN or GN with 32 groups)")
    return name


def _plain_conv(kw: dict) -> None:
    conv_cfg = kw.get("conv_cfg")
    if conv_cfg is not None and conv_cfg.get("type") not in ("Conv", "Conv2d"):
        raise NotImplementedError(f"conv_cfg {conv_cfg} is not supported (plain Conv2d only)")


def _unused(kw: dict, known: set, what: str) -> None:
    unknown = sorted(set(kw) - known - set(_NO_EFFECT))
    if unknown:
        raise NotImplementedError(f"official {what} arguments not mapped: {unknown}")


def num_anchors(anchor_cfg: dict) -> int:
    """Anchors per location of an mmdet ``AnchorGenerator`` config (ratios x scales or octave scales)."""
    scales = anchor_cfg.get("scales")
    n_scales = len(scales) if scales is not None else int(anchor_cfg.get("scales_per_octave", 1))
    return len(anchor_cfg.get("ratios", (0.5, 1.0, 2.0))) * n_scales


def fpn_from_official(kw: dict) -> tuple[nn.Module, slice]:
    """mmdet ``FPN(**kw)`` -> (our FPN, which backbone maps it reads)."""
    _plain_conv(kw)
    in_channels = list(kw["in_channels"])
    start, end = int(kw.get("start_level", 0)), int(kw.get("end_level", -1))
    end = len(in_channels) if end in (-1, len(in_channels) - 1) else end + 1  # end_level is inclusive
    extra = kw.get("add_extra_convs", False)
    extra = {False: "maxpool", True: "on_input"}.get(extra, extra)
    if extra not in H.EXTRA_LEVELS:
        raise NotImplementedError(f"FPN add_extra_convs={kw['add_extra_convs']!r} is not supported")
    if kw.get("act_cfg") is not None:
        raise NotImplementedError("FPN act_cfg is not supported (mmdet's default None only)")
    if kw.get("no_norm_on_lateral") and kw.get("norm_cfg") is not None:
        raise NotImplementedError("FPN no_norm_on_lateral with a norm is not supported")
    up = kw.get("upsample_cfg") or {}
    if up.get("mode", "nearest") != "nearest" or "scale_factor" in up:
        raise NotImplementedError(f"FPN upsample_cfg {up} is not supported (nearest resize to the lower level's size)")
    _unused(kw, {"in_channels", "out_channels", "num_outs", "start_level", "end_level", "add_extra_convs",
                 "relu_before_extra_convs", "no_norm_on_lateral", "norm_cfg", "act_cfg"}, "FPN")
    used = in_channels[start:end]
    fpn = H.build_fpn(used, int(kw["out_channels"]), int(kw["num_outs"]), extra, _norm(kw.get("norm_cfg")),
                      bool(kw.get("relu_before_extra_convs", False)))
    return fpn, slice(start, end)


def rpn_head_from_official(kw: dict) -> nn.Module:
    if not (kw.get("loss_cls") or {}).get("use_sigmoid", True):
        raise NotImplementedError("an RPNHead with softmax objectness (2 logits per anchor) is not supported")
    _unused(kw, {"in_channels", "feat_channels", "num_classes"}, "RPNHead")
    return H.build_rpn_head(int(kw["in_channels"]), num_anchors(kw["anchor_generator"]),
                            int(kw.get("feat_channels", 256)))


def retina_head_from_official(kw: dict) -> nn.Module:
    _plain_conv(kw)
    if not (kw.get("loss_cls") or {}).get("use_sigmoid", True):
        raise NotImplementedError("a RetinaHead with softmax classification is not supported")
    _unused(kw, {"num_classes", "in_channels", "stacked_convs", "feat_channels", "norm_cfg"}, "RetinaHead")
    norm = kw.get("norm_cfg")
    return H.build_retina_head(int(kw["in_channels"]), num_anchors(kw["anchor_generator"]), int(kw["num_classes"]),
                               int(kw.get("feat_channels", 256)), int(kw.get("stacked_convs", 4)),
                               _norm(norm, any_groups=True), int((norm or {}).get("num_groups", 32)))


# mmdet's ConvFCBBoxHead subclasses: (shared convs, shared fcs) their constructors fix
_CONVFC = {"Shared2FCBBoxHead": (0, 2), "Shared4Conv1FCBBoxHead": (4, 1), "ConvFCBBoxHead": (0, 0)}


class RoIBoxHead(nn.Module):
    """The box part of torchvision's RoIHeads (``box_head`` + ``box_predictor``, its attribute names)."""

    def __init__(self, box_head: nn.Module, box_predictor: nn.Module):
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor

    def forward(self, x):
        return self.box_predictor(self.box_head(x))


class RoIMaskHead(nn.Module):
    """The mask part of torchvision's RoIHeads (``mask_head`` + ``mask_predictor``)."""

    def __init__(self, mask_head: nn.Module, mask_predictor: nn.Module):
        super().__init__()
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def forward(self, x):
        return self.mask_predictor(self.mask_head(x))


def box_head_from_official(official_type: str, kw: dict) -> RoIBoxHead:
    _plain_conv(kw)
    convs, fcs = _CONVFC[official_type]
    convs, fcs = int(kw.get("num_shared_convs", convs)), int(kw.get("num_shared_fcs", fcs))
    for k in ("num_cls_convs", "num_cls_fcs", "num_reg_convs", "num_reg_fcs"):
        if kw.get(k, 0):
            raise NotImplementedError(f"{official_type} {k}={kw[k]}: separate cls/reg branches are not supported")
    for k in ("with_avg_pool", "reg_class_agnostic"):
        if kw.get(k, False):
            raise NotImplementedError(f"{official_type} {k}=True is not supported")
    if not kw.get("with_cls", True) or not kw.get("with_reg", True):
        raise NotImplementedError(f"{official_type} without a cls or reg branch is not supported")
    if (kw.get("loss_cls") or {}).get("use_sigmoid", False):
        raise NotImplementedError(f"{official_type} with sigmoid classification is not supported")
    _unused(kw, {"num_shared_convs", "num_shared_fcs", "num_cls_convs", "num_cls_fcs", "num_reg_convs",
                 "num_reg_fcs", "conv_out_channels", "fc_out_channels", "in_channels", "roi_feat_size",
                 "num_classes", "norm_cfg", "with_avg_pool", "reg_class_agnostic", "with_cls", "with_reg"},
            official_type)
    fc = int(kw.get("fc_out_channels", 1024))
    head = H.build_box_head(int(kw.get("in_channels", 256)), int(kw.get("roi_feat_size", 7)), convs,
                            int(kw.get("conv_out_channels", 256)), fcs, fc, _norm(kw.get("norm_cfg")))
    return RoIBoxHead(head, H.MMDetBoxPredictor(fc, int(kw.get("num_classes", 80))))


def mask_head_from_official(kw: dict) -> RoIMaskHead:
    _plain_conv(kw)
    up = kw.get("upsample_cfg") or {"type": "deconv", "scale_factor": 2}
    if up.get("type") != "deconv" or up.get("scale_factor", 2) != 2:
        raise NotImplementedError(f"FCNMaskHead upsample_cfg {up} is not supported (deconv x2)")
    if kw.get("conv_kernel_size", 3) != 3 or kw.get("class_agnostic", False):
        raise NotImplementedError("FCNMaskHead: only 3x3 convs and class-specific masks are supported")
    _unused(kw, {"num_convs", "roi_feat_size", "in_channels", "conv_kernel_size", "conv_out_channels",
                 "num_classes", "class_agnostic", "norm_cfg"}, "FCNMaskHead")
    ch = int(kw.get("conv_out_channels", 256))
    convs = H.build_mask_head(int(kw.get("in_channels", 256)), int(kw.get("num_convs", 4)), ch,
                              _norm(kw.get("norm_cfg")))
    return RoIMaskHead(convs, H.MMDetMaskPredictor(ch, ch, int(kw.get("num_classes", 80))))


# official GPViTAdapter arguments (the rest are GPViT's)
_ADAPTER_ARGS = ("conv_inplane", "n_points", "deform_num_heads", "init_values", "interaction_indexes", "cffn_ratio",
                 "deform_ratio", "add_vit_feature", "use_extra_extractor")
_ADAPTER_IGNORED = ("with_cffn", "with_cp", "pretrained", "init_cfg", "convert_syncbn")


def adapter_from_official(official_type: str, kw: dict) -> nn.Module:
    """mmdet ``GPViTAdapter`` / ``GPViTAdapterSingleStage`` -> our GPViTAdapter around a GPViT of the same arch."""
    from ...testing.families.gpvit import backbone_kwargs
    from ..gpvit_adapter import GPViTAdapter

    kw = dict(kw)
    if not kw.pop("with_cffn", True):
        raise NotImplementedError("GPViTAdapter with_cffn=False is not supported")
    adapter = {k: kw.pop(k) for k in _ADAPTER_ARGS if k in kw}
    for k in _ADAPTER_IGNORED:
        kw.pop(k, None)
    vit, _ = backbone_kwargs(kw)
    if vit.pop("final_norm"):
        raise NotImplementedError("GPViTAdapter with final_norm=True is not supported (the official configs: False)")
    vit.pop("out_norms")  # the adapter uses the last layer's tokens, no per-layer norms
    return GPViTAdapter("gpvit_test", single_stage=official_type.endswith("SingleStage"),
                        drop_path_rate=vit.pop("drop_path_rate"), **adapter, **vit)


def module_from_official(registry: str, official_type: str, kwargs: dict) -> tuple[nn.Module, Callable]:
    """(our module, run(module, inputs) -> {output key suffix: tensor}) for an official mmdet config."""
    kw = dict(kwargs)
    key = (registry, official_type)
    if key == ("mmdet.NECKS", "FPN"):
        fpn, used = fpn_from_official(kw)
        return fpn, lambda m, xs: _numbered(m(_named(xs[used])).values())
    if key == ("mmdet.HEADS", "RPNHead"):
        head = rpn_head_from_official(kw)
        return head, lambda m, xs: _levels(*m(list(xs)))
    if key == ("mmdet.HEADS", "RetinaHead"):
        head = retina_head_from_official(kw)

        def run_retina(m, xs):
            c, r = m.classification_head, m.regression_head
            return _levels([c.cls_logits(c.conv(x)) for x in xs], [r.bbox_reg(r.conv(x)) for x in xs])
        return head, run_retina
    if registry == "mmdet.HEADS" and official_type in _CONVFC:
        return box_head_from_official(official_type, kw), lambda m, xs: _mmdet_box_outputs(*m(xs[0]))
    if key == ("mmdet.HEADS", "FCNMaskHead"):
        return mask_head_from_official(kw), lambda m, xs: {"": m(xs[0])[:, 1:]}  # drop the zero background mask
    if registry == "mmdet.BACKBONES" and official_type in ("GPViTAdapter", "GPViTAdapterSingleStage"):
        return adapter_from_official(official_type, kw), lambda m, xs: _numbered(m(xs[0]))
    raise NotImplementedError(f"no visionzoo counterpart for {registry} {official_type}")


def _named(xs):
    from collections import OrderedDict

    return OrderedDict((str(i), x) for i, x in enumerate(xs))


def _numbered(outs) -> dict:
    return {str(i): o for i, o in enumerate(outs)}


def _levels(cls_scores, bbox_preds) -> dict:
    out = {f"cls_score.{i}": c for i, c in enumerate(cls_scores)}
    out.update({f"bbox_pred.{i}": b for i, b in enumerate(bbox_preds)})
    return out


def _mmdet_box_outputs(scores, deltas) -> dict:
    """Our (background-first scores, deltas with a zero background box) in mmdet's layout."""
    return {"cls_score": torch.cat([scores[:, 1:], scores[:, :1]], dim=1), "bbox_pred": deltas[:, 4:]}


# ----------------------------------------------------------------------------------------------------------------
# official keys -> ours (one converter: the parts below serve single modules and whole detectors)

def _conv_module(rest: str) -> str:
    """mmcv ConvModule inside: ``conv.*`` -> ``0.*``, its norm (``bn`` / ``gn``) -> ``1.*``."""
    return re.sub(r"^conv\.", "0.", re.sub(r"^(bn|gn)\.", "1.", rest))


def fpn_key(key: str, fpn: nn.Module) -> str:
    m = re.match(r"^(lateral_convs|fpn_convs)\.(\d+)\.(.*)$", key)
    if not m:
        return key
    kind, i, rest = m.group(1), int(m.group(2)), _conv_module(m.group(3))
    if kind == "lateral_convs":
        return f"inner_blocks.{i}.{rest}"
    n = len(fpn.layer_blocks)
    return f"layer_blocks.{i}.{rest}" if i < n else f"extra_blocks.convs.{i - n}.{rest}"


def rpn_key(key: str) -> str:
    return re.sub(r"^rpn_conv\.", "conv.0.0.", re.sub(r"^rpn_cls\.", "cls_logits.", re.sub(r"^rpn_reg\.",
                                                                                            "bbox_pred.", key)))


def retina_key(key: str) -> str:
    m = re.match(r"^(cls|reg)_convs\.(\d+)\.(.*)$", key)
    if m:
        branch = "classification_head" if m.group(1) == "cls" else "regression_head"
        return f"{branch}.conv.{m.group(2)}.{_conv_module(m.group(3))}"
    return re.sub(r"^retina_cls\.", "classification_head.cls_logits.",
                  re.sub(r"^retina_reg\.", "regression_head.bbox_reg.", key))


def box_key(key: str, box_head: nn.Module) -> str:
    """``roi_head.bbox_head.*`` (local) -> torchvision RoIHeads' ``box_head.*`` / ``box_predictor.*``."""
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    m = re.match(r"^shared_convs\.(\d+)\.(.*)$", key)
    if m:
        return f"box_head.{m.group(1)}.{_conv_module(m.group(2))}"
    m = re.match(r"^shared_fcs\.(\d+)\.(.*)$", key)
    if m:
        j = int(m.group(1))
        if isinstance(box_head, TwoMLPHead):
            return f"box_head.fc{6 + j}.{m.group(2)}"
        n_convs = sum(1 for c in box_head.children() if not isinstance(c, (nn.Flatten, nn.Linear, nn.ReLU)))
        return f"box_head.{n_convs + 1 + 2 * j}.{m.group(2)}"  # FastRCNNConvFCHead: convs, Flatten, (Linear, ReLU)s
    return re.sub(r"^fc_cls\.", "box_predictor.cls_score.", re.sub(r"^fc_reg\.", "box_predictor.bbox_pred.", key))


def box_value(key: str, value: torch.Tensor) -> torch.Tensor:
    """mmdet puts the background score LAST, torchvision FIRST: rotate the rows of ``fc_cls``."""
    if key.startswith("fc_cls."):
        return torch.cat([value[-1:], value[:-1]], dim=0)
    return value


def mask_key(key: str) -> str:
    m = re.match(r"^convs\.(\d+)\.(.*)$", key)
    if m:
        return f"mask_head.{m.group(1)}.{_conv_module(m.group(2))}"
    return re.sub(r"^upsample\.", "mask_predictor.conv5_mask.",
                  re.sub(r"^conv_logits\.", "mask_predictor.mask_fcn_logits.", key))


def convert_module_state(state_dict: dict, registry: str, official_type: str, module: nn.Module) -> dict:
    """A single official module's state dict -> our ``module``'s (the parts of :func:`checkpoint_filter_fn`)."""
    if registry == "mmdet.BACKBONES":
        from ...models._registry import family_filter_fn

        return family_filter_fn(module)(state_dict, module)
    if official_type == "FPN":
        return {fpn_key(k, module): v for k, v in state_dict.items()}
    if official_type == "RPNHead":
        return {rpn_key(k): v for k, v in state_dict.items()}
    if official_type == "RetinaHead":
        return {retina_key(k): v for k, v in state_dict.items()}
    if official_type in _CONVFC:
        return {box_key(k, module.box_head): box_value(k, v) for k, v in state_dict.items()}
    if official_type == "FCNMaskHead":
        return {mask_key(k): v for k, v in state_dict.items()}
    raise NotImplementedError(f"no key conversion for {registry} {official_type}")


def _backbone_part(state_dict: dict, body: nn.Module) -> dict:
    """The official ``backbone.*`` keys through the family converter of the model inside our DenseBackbone."""
    from ...models._registry import family_filter_fn

    for name, child in body.named_children():
        fn = family_filter_fn(child)
        if fn is not None:
            return {f"{name}.{k}": v for k, v in fn(state_dict, child).items()}
    raise UserError(f"{type(body).__name__}: no official checkpoint converter for its backbone")


def _split(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """An official mmdet MaskRCNN / RetinaNet state dict (``backbone.``, ``neck.``, ``rpn_head.``,
    ``roi_head.bbox_head.``, ``roi_head.mask_head.``, ``bbox_head.`` keys; ``state_dict`` / ``module.`` wrapping
    removed) -> the state dict of our torchvision detector ``model``. Keys of other parts are kept unchanged, so a
    strict load names them."""
    from ...models._registry import unwrap_state_dict

    sd = unwrap_state_dict(state_dict, ("state_dict",))
    out = {f"backbone.body.{k}": v for k, v in _backbone_part(_split(sd, "backbone."), model.backbone.body).items()}
    out.update({f"backbone.fpn.{fpn_key(k, model.backbone.fpn)}": v for k, v in _split(sd, "neck.").items()})
    out.update({f"rpn.head.{rpn_key(k)}": v for k, v in _split(sd, "rpn_head.").items()})
    if hasattr(model, "roi_heads"):
        box_head = model.roi_heads.box_head
        out.update({f"roi_heads.{box_key(k, box_head)}": box_value(k, v)
                    for k, v in _split(sd, "roi_head.bbox_head.").items()})
        out.update({f"roi_heads.{mask_key(k)}": v for k, v in _split(sd, "roi_head.mask_head.").items()})
    out.update({f"head.{retina_key(k)}": v for k, v in _split(sd, "bbox_head.").items()})
    parts = ("backbone.", "neck.", "rpn_head.", "roi_head.bbox_head.", "roi_head.mask_head.", "bbox_head.")
    out.update({k: v for k, v in sd.items() if not k.startswith(parts)})
    return out


def official_num_classes(layout: dict) -> int:
    """Foreground classes of an official detector from its ``{key: tensor or shape}`` (box, mask or Retina logits)."""
    def rows(key):
        v = layout.get(key)
        return None if v is None else int(v.shape[0] if torch.is_tensor(v) else v[0])

    if rows("roi_head.bbox_head.fc_cls.weight") is not None:
        return rows("roi_head.bbox_head.fc_cls.weight") - 1
    if rows("roi_head.mask_head.conv_logits.weight") is not None:
        return rows("roi_head.mask_head.conv_logits.weight")
    cls, reg = rows("bbox_head.retina_cls.weight"), rows("bbox_head.retina_reg.weight")
    if cls is not None and reg is not None:
        return cls // (reg // 4)
    raise UserError("cannot tell the number of classes of this official detector (no fc_cls, conv_logits or "
                    "retina_cls)")


# ----------------------------------------------------------------------------------------------------------------
# the recipe of an official config, whole checkpoints

def recipe_for_official_config(config: str) -> str:
    """The shipped detection recipe whose ``official_config`` is the official config file ``config``."""
    from ...engine.config import recipe_for_official_config as find

    return find(config, "detection")


def _build(recipe: str, num_classes: int, meta: bool = False):
    from .config import DetectionConfig
    from .model import build_detector

    cfg = dataclasses.replace(DetectionConfig.from_yaml(recipe), pretrained=None)
    if meta:
        with torch.device("meta"):
            return build_detector(cfg, num_classes, pretrained=False), cfg
    return build_detector(cfg, num_classes, pretrained=False), cfg


def is_official_checkpoint(obj) -> bool:
    """An mmcv checkpoint of an mmdet detector: ``state_dict`` with ``rpn_head.`` / ``roi_head.`` / ``bbox_head.``
    keys (and usually ``meta``)."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, dict) and any(
        k.startswith(p) for k in sd for p in ("rpn_head.", "roi_head.", "bbox_head.", "module.rpn_head.",
                                              "module.bbox_head."))


def load_official_checkpoint(obj: dict, source: str):
    """(our detector with the official weights loaded strictly, its DetectionConfig, class names) of an official
    mmdet checkpoint; the recipe is the one reproducing ``meta['exp_name']`` (the config file name)."""
    from ...engine.task import load_model_state
    from ...models._registry import unwrap_state_dict

    meta = obj.get("meta") or {}
    exp = meta.get("exp_name")
    if not exp:
        raise ConfigError(f"{source}: an official mmdet checkpoint without meta.exp_name (the config it was trained "
                          f"with), so its recipe is unknown: add meta['exp_name'] = '<official config>.py'.")
    recipe = recipe_for_official_config(exp)
    sd = unwrap_state_dict(obj["state_dict"], ())
    model, cfg = _build(recipe, official_num_classes(sd))
    load_model_state(model, checkpoint_filter_fn(sd, model), source, hint=f"recipe {recipe}")
    classes = list(meta["CLASSES"]) if meta.get("CLASSES") else None
    print(f"{source}: official mmdet checkpoint ({Path(str(exp)).stem}), converted into recipe {recipe}")
    return model, cfg, classes


# ----------------------------------------------------------------------------------------------------------------
# parity hooks (visionzoo.testing.families.dense)

def run_parity_case(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """Build our module from the case's official kwargs, load ``state.*`` strictly, run it as the case's call says."""
    from ...testing.parity import official_state

    torch.manual_seed(case.get("seed", 0))
    registry, official_type = case["official_registry"], case["official_type"]
    module, run = module_from_official(registry, official_type, case["official_kwargs"])
    module.load_state_dict(convert_module_state(official_state(tensors), registry, official_type, module), strict=True)
    module.train(case.get("mode", "eval") == "train")
    keys = case.get("input_keys") or sorted(k for k in tensors if k == "input" or k.startswith("input."))
    with torch.no_grad():
        out = run(module, [tensors[k] for k in keys])
    return {f"output.{k}" if k else "output": v for k, v in out.items()}


PARITY_MODULES = {key: run_parity_case for key in (
    ("mmdet.NECKS", "FPN"), ("mmdet.HEADS", "RPNHead"), ("mmdet.HEADS", "RetinaHead"),
    *(("mmdet.HEADS", t) for t in _CONVFC), ("mmdet.HEADS", "FCNMaskHead"),
    ("mmdet.BACKBONES", "GPViTAdapter"), ("mmdet.BACKBONES", "GPViTAdapterSingleStage"))}

# the manifest's top-level children -> where they are in our torchvision detector
_PARTS = {"backbone": "backbone.body", "neck": "backbone.fpn", "rpn_head": "rpn.head", "roi_head": "roi_heads",
          "bbox_head": "head"}


def manifest_problems(name: str, entry: dict) -> list[str] | None:
    """None unless the variant is an mmdet detector; else what differs between our model built from the recipe
    reproducing its official config (on the meta device) and the official layout: parameter counts (total and per
    part) and the converted key list, one-to-one with equal shapes."""
    if entry.get("official_builder") != BUILDER:
        return None
    from ...testing.parity import check_recipe_manifest

    def build(recipe):
        model, _ = _build(recipe, official_num_classes(dict(entry["state_dict"])), meta=True)
        return model, {part: model.get_submodule(ours) for part, ours in _PARTS.items() if f"params_{part}" in entry}

    return check_recipe_manifest(entry, recipe_for_official_config, build, checkpoint_filter_fn)
