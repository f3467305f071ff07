"""Official mmseg (0.19-0.23) counterparts: our heads built from mmseg constructor arguments, official state dicts
(single heads and whole ``EncoderDecoder`` checkpoints) converted to ours, and the dense parity hooks.

* ``head_from_official(registry, type, kwargs)``: our module for an mmseg ``HEADS`` / ``NECKS`` config, plus the
  function that picks its inputs from the backbone maps (mmseg's ``in_index`` / ``input_transform``).
* ``convert_official_state(state_dict, model)``: an official mmseg segmentor state dict -> ours. The backbone part
  goes through the backbone family's ``checkpoint_filter_fn`` (GPViT, CoC, ...); our heads and neck use mmseg's
  module names (ConvModule ``conv`` / ``bn``, ``conv_seg``, ``scale_heads.{level}.{j}``, ``psp_modules.{i}.1``),
  so their keys carry over by name.
* ``load_official_checkpoint(path, recipe=None)``: an official mmseg ``.pth`` (``state_dict`` + ``meta``) as our
  Segmentor, built from the recipe of ``meta.exp_name`` (the config file name) unless ``recipe`` is given.
* ``PARITY_MODULES`` / ``manifest_problems``: the ``dense`` family hooks (``visionzoo.testing.families.dense``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import nn

from ...errors import ConfigError, UserError
from . import heads as H

_logger = logging.getLogger("visionzoo")

BUILDER = "mmseg build_segmentor"  # the manifest's official_builder of the segmentors this module covers
_NORMS = ("BN", "BN2d", "SyncBN")
_RELU = {"type": "ReLU"}
# constructor arguments that do not change an eval forward (losses, sampling, initialisation)
_NO_EFFECT = ("loss_decode", "ignore_index", "sampler", "init_cfg")


# ----------------------------------------------------------------------------------------------------------------
# official constructor arguments -> our modules

def _norm_act(kw: dict, default_act) -> dict:
    """mmcv ConvModule ``conv_cfg`` / ``norm_cfg`` / ``act_cfg`` -> our ``norm`` / ``act`` flags."""
    conv_cfg = kw.pop("conv_cfg", None)
    if conv_cfg is not None and conv_cfg.get("type") not in ("Conv", "Conv2d"):
        raise NotImplementedError(f"conv_cfg {conv_cfg} is not supported (plain Conv2d only)")
    norm_cfg = kw.pop("norm_cfg", None)
    if norm_cfg is not None and (norm_cfg.get("type") not in _NORMS or norm_cfg.get("eps", 1e-5) != 1e-5
                                 or set(norm_cfg) - {"type", "requires_grad", "momentum", "eps"}):
        raise NotImplementedError(f"norm_cfg {norm_cfg} is not supported ({', '.join(_NORMS)} with eps 1e-5, or "
                                  f"None)")
    act_cfg = kw.pop("act_cfg", default_act)
    if act_cfg is not None and act_cfg.get("type") != "ReLU":
        raise NotImplementedError(f"act_cfg {act_cfg} is not supported (ReLU or None)")
    return {"norm": norm_cfg is not None, "act": act_cfg is not None}


def _input_selector(in_index, input_transform) -> Callable[[list], object]:
    """mmseg ``BaseDecodeHead._transform_inputs``: one map (``in_index`` an int) or a list (multiple_select)."""
    if input_transform is None:
        return lambda maps: maps[in_index]
    if input_transform == "multiple_select":
        index = list(in_index)
        return lambda maps: [maps[i] for i in index]
    raise NotImplementedError(f"input_transform {input_transform!r} is not supported (None or multiple_select)")


def _decode_args(kw: dict, input_transform=None) -> tuple[dict, bool, object, Callable]:
    """The ``BaseDecodeHead`` arguments: (our common kwargs, align_corners, in_channels, input selector); ``kw``
    keeps the type's own arguments."""
    for k in _NO_EFFECT:
        kw.pop(k, None)
    input_transform = kw.pop("input_transform", input_transform)
    select = _input_selector(kw.pop("in_index", -1), input_transform)
    num_classes = kw.pop("num_classes")
    if kw.get("out_channels", num_classes) != num_classes:
        raise NotImplementedError("out_channels != num_classes (a sigmoid binary head) is not supported")
    kw.pop("out_channels", None)
    common = dict(channels=kw.pop("channels"), num_classes=num_classes, dropout=kw.pop("dropout_ratio", 0.1),
                  **_norm_act(kw, _RELU))
    align = kw.pop("align_corners", False)
    return common, align, kw.pop("in_channels"), select


def _done(kw: dict, what: str) -> None:
    if kw:
        raise NotImplementedError(f"official {what} arguments not mapped: {sorted(kw)}")


def _uper_head(kw: dict):
    common, align, in_channels, select = _decode_args(kw, "multiple_select")
    pool_scales = tuple(kw.pop("pool_scales", (1, 2, 3, 6)))
    _done(kw, "UPerHead")
    return H.UPerHead(in_channels, pool_scales=pool_scales, align_corners=align, **common), select


def _segformer_head(kw: dict):
    common, align, in_channels, select = _decode_args(kw, "multiple_select")
    if kw.pop("interpolate_mode", "bilinear") != "bilinear":
        raise NotImplementedError("SegformerHead interpolate_mode other than bilinear is not supported")
    _done(kw, "SegformerHead")
    return H.SegformerHead(in_channels, align_corners=align, **common), select


def _fpn_head(kw: dict):
    common, align, in_channels, select = _decode_args(kw, "multiple_select")
    strides = list(kw.pop("feature_strides"))
    _done(kw, "FPNHead")
    return H.FPNHead(in_channels, strides, align_corners=align, **common), select


def _fcn_head(kw: dict):
    common, align, in_channels, select = _decode_args(kw)
    if align:  # FCNHead never resizes inside; the segmentor's final resize uses align_corners=False
        raise NotImplementedError("FCNHead with align_corners=True is not supported")
    extra = dict(num_convs=kw.pop("num_convs", 2), concat_input=kw.pop("concat_input", True),
                 kernel_size=kw.pop("kernel_size", 3), dilation=kw.pop("dilation", 1))
    _done(kw, "FCNHead")
    return H.FCNHead(in_channels, **common, **extra), select


def _fpn_neck(kw: dict):
    """mmseg 0.23 ``necks/fpn.py:FPN`` (end_level exclusive; ``add_extra_convs=True`` means on_output unless
    ``extra_convs_on_inputs``)."""
    kw.pop("init_cfg", None)
    in_channels = list(kw.pop("in_channels"))
    extra = kw.pop("add_extra_convs", False)
    on_inputs = kw.pop("extra_convs_on_inputs", False)
    if extra is True:
        extra = "on_input" if on_inputs else "on_output"
    end_level = kw.pop("end_level", -1)
    flags = _norm_act(kw, None)
    neck = H.FPNNeck(
        in_channels, kw.pop("out_channels"), num_outs=kw.pop("num_outs"), start_level=kw.pop("start_level", 0),
        end_level=None if end_level == -1 else end_level, extra_convs=extra or None,
        relu_before_extra_convs=kw.pop("relu_before_extra_convs", False),
        lateral_norm=False if kw.pop("no_norm_on_lateral", False) else flags["norm"],
        upsample=dict(kw.pop("upsample_cfg", {"mode": "nearest"})), **flags)
    _done(kw, "FPN")
    return neck, list


OFFICIAL_MODULES: dict[tuple[str, str], Callable[[dict], tuple[nn.Module, Callable]]] = {
    ("mmseg.HEADS", "UPerHead"): _uper_head,
    ("mmseg.HEADS", "SegformerHead"): _segformer_head,
    ("mmseg.HEADS", "FPNHead"): _fpn_head,
    ("mmseg.HEADS", "FCNHead"): _fcn_head,
    ("mmseg.NECKS", "FPN"): _fpn_neck,
}


def head_from_official(registry: str, official_type: str, kwargs: dict) -> tuple[nn.Module, Callable]:
    """(our module, input selector) for an official mmseg head / neck config (``type`` removed)."""
    try:
        build = OFFICIAL_MODULES[(registry, official_type)]
    except KeyError:
        raise NotImplementedError(f"no visionzoo counterpart for {registry} {official_type}; known: "
                                  f"{sorted(OFFICIAL_MODULES)}") from None
    return build(dict(kwargs))


# ----------------------------------------------------------------------------------------------------------------
# official state dicts -> ours

_PARTS = ("backbone", "neck", "decode_head", "auxiliary_head")


def _backbone_body(backbone: nn.Module) -> tuple[str, nn.Module, Callable | None]:
    """(prefix inside ``backbone``, module, checkpoint_filter_fn) of the registered model inside a DenseBackbone:
    the first submodule whose defining module has a ``checkpoint_filter_fn`` (the family converter)."""
    from ...models._registry import family_filter_fn

    for name, module in backbone.named_modules():
        fn = family_filter_fn(module) if module is not backbone else None
        if fn is not None:
            return (name + "." if name else ""), module, fn
    return "", backbone, None


def convert_head_state(state_dict: dict, module: nn.Module) -> dict:
    """An official mmseg head / neck state dict -> ours. Our heads use mmseg's names, so keys carry over; only
    BN counters the module does not track are dropped (SyncBN and BN store the same keys)."""
    own = module.state_dict()
    return {k: v for k, v in state_dict.items() if k in own or not k.endswith("num_batches_tracked")}


def convert_official_state(state_dict: dict, model: nn.Module) -> dict:
    """An official mmseg ``EncoderDecoder`` state dict (optionally inside ``state_dict``, DDP ``module.``
    prefixes) -> the state dict of our ``Segmentor``. Keys of other parts pass through (a strict load names them)."""
    from ...models._registry import unwrap_state_dict

    state_dict = unwrap_state_dict(state_dict, ("state_dict",))
    parts: dict[str, dict] = {p: {} for p in _PARTS}
    out = {}
    for k, v in state_dict.items():
        head, _, rest = k.partition(".")
        if head in parts:
            parts[head][rest] = v
        else:
            out[k] = v
    if parts["backbone"]:
        prefix, body, fn = _backbone_body(model.backbone)
        converted = fn(parts["backbone"], body) if fn is not None else parts["backbone"]
        out.update({f"backbone.{prefix}{k}": v for k, v in converted.items()})
    for name in _PARTS[1:]:
        module = getattr(model, name, None)
        sd = convert_head_state(parts[name], module) if module is not None else parts[name]
        out.update({f"{name}.{k}": v for k, v in sd.items()})
    return out


def is_official_checkpoint(obj) -> bool:
    """An mmcv checkpoint of an mmseg segmentor: ``state_dict`` with ``decode_head.`` keys (and usually ``meta``)."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, dict) and any(k.startswith(("decode_head.", "module.decode_head.")) for k in sd)


# ----------------------------------------------------------------------------------------------------------------
# the recipe of an official config, whole checkpoints

def recipe_for_official_config(config: str) -> str:
    """The shipped segmentation recipe whose ``official_config`` is the official config file ``config``."""
    from ...engine.config import recipe_for_official_config as find

    return find(config, "segmentation")


def load_official_checkpoint(checkpoint, recipe: str | None = None, source: str | None = None):
    """(Segmentor in eval mode with the official weights loaded strictly, its SegmentationConfig, the recipe name)
    of an official mmseg checkpoint (a path or the loaded dict); ``recipe`` defaults to the one reproducing
    ``meta['exp_name']`` (the config file name mmseg's train.py stores)."""
    from ...engine.task import load_model_state
    from ...files import safe_torch_load
    from .config import SegmentationConfig

    source = source or str(checkpoint)
    obj = checkpoint if isinstance(checkpoint, dict) else safe_torch_load(checkpoint)
    if not is_official_checkpoint(obj):
        raise UserError(f"{source} is not an official mmseg checkpoint (a dict whose state_dict holds "
                        f"decode_head.* keys)")
    if recipe is None:
        exp = (obj.get("meta") or {}).get("exp_name")
        if not exp:
            raise ConfigError(f"{source}: an official mmseg checkpoint without meta.exp_name (its config file): "
                              f"pass --recipe, the recipe of its official config.")
        recipe = recipe_for_official_config(exp)
    cfg = dataclasses.replace(SegmentationConfig.from_yaml(recipe), pretrained=None)
    model = H.build_segmentor(cfg)
    load_model_state(model, convert_official_state(obj["state_dict"], model), source, hint=f"recipe {recipe}")
    _logger.info("%s: official mmseg checkpoint, converted into recipe %s", source, recipe)
    return model.eval(), cfg, recipe


# ----------------------------------------------------------------------------------------------------------------
# parity hooks (visionzoo.testing.families.dense)

def _case_maps(case: dict, tensors: dict) -> list[torch.Tensor]:
    keys = case.get("input_keys")
    if keys:
        return [tensors[k] for k in keys]
    from ...testing.parity import case_inputs

    inputs = case_inputs(tensors)
    if "" in inputs:
        return [inputs[""]]
    return [inputs[k] for k in sorted(inputs, key=lambda s: (len(s), s))]


def run_parity_case(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """Build our module from the case's official kwargs, load ``state.*`` strictly, run it on the input maps."""
    from ...testing.parity import official_state

    torch.manual_seed(case.get("seed", 0))
    module, select = head_from_official(case["official_registry"], case["official_type"], case["official_kwargs"])
    module.load_state_dict(convert_head_state(official_state(tensors), module), strict=True)
    module.train(case.get("mode", "eval") == "train")
    with torch.no_grad():
        out = module(select(_case_maps(case, tensors)))
    if isinstance(out, (list, tuple)):
        return {f"output.{i}": o for i, o in enumerate(out)}
    return {"output": out}


PARITY_MODULES = {key: run_parity_case for key in OFFICIAL_MODULES}


def manifest_problems(name: str, entry: dict) -> list[str] | None:
    """None unless the variant is an mmseg segmentor; else what differs between our model built from the recipe
    reproducing its official config (on the meta device) and the official layout: parameter counts (total and per
    part) and the converted key list, one-to-one with equal shapes."""
    if entry.get("official_builder") != BUILDER:
        return None
    from ...testing.parity import check_recipe_manifest, meta_model
    from .config import SegmentationConfig

    def build(recipe):
        cfg = dataclasses.replace(SegmentationConfig.from_yaml(recipe), pretrained=None)
        model = meta_model(lambda: H.build_segmentor(cfg))
        return model, {part: getattr(model, part, None) for part in _PARTS}

    return check_recipe_manifest(entry, recipe_for_official_config, build, convert_official_state)
