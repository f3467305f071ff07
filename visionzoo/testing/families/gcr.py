"""Parity hook for GCR (visionzoo.models.grassmann, visionzoo.optim.grassmann).

Cases (shared/fixtures/gcr):
* ``official_class`` = ``...GrassmannClsHead``: our GrassmannHead from the official kwargs, forward on ``input``.
* ``official_class`` = an official optimizer (``RSGD``, ``RAdamWOptimizer``, ``RLambOptimizer``): the json's
  ``harness`` (a Linear ``fc0`` then the head of ``head_kwargs``), trained for as many steps as the fixture stores
  with our composite optimizer built from the recorded param groups (``param_groups``, ``rsgd_param_groups``,
  ``REORTH_STEP``, ``LR_FACTOR``, ``optim_wrapper_cfg.clip_grad``); every loss, state, momentum buffer and the
  final output are returned under the fixture's keys.
* manifest entries: GCR variants -> our registered model (from the timm equivalent and k); vector baselines ->
  the plain timm model; both checked through ``checkpoint_filter_fn``.
"""
from __future__ import annotations

import re

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ...models.grassmann import GrassmannHead, checkpoint_filter_fn
from ...optim.grassmann import GrassmannOptimizer, grassmann_param_groups
from ..parity import case_inputs, check_state_dict_layout, meta_model, official_state

# official optimizer class (last dotted component or mmengine 'type') -> our Euclidean part
_OPTIMIZERS = {"RSGD": "sgd", "RAdamWOptimizer": "adamw", "RLambOptimizer": "lamb"}
# keys of recorded param-group dumps that are not hyper-parameters of the optimizer
_NOT_HPARAMS = {"param", "params", "initial_lr"}


def head_kwargs(official: dict) -> dict:
    """Official GrassmannClsHead kwargs -> GrassmannHead kwargs (dims must be all equal, as official asserts)."""
    dims = official["dims"]
    if isinstance(dims, str):  # manifest spells it "[8] * 1000"
        m = re.match(r"\[(\d+)\]\s*\*\s*(\d+)", dims)
        dims = [int(m.group(1))] * int(m.group(2))
    if len(set(dims)) != 1 or len(dims) != official["num_classes"]:
        raise ValueError(f"GrassmannClsHead dims must be num_classes equal entries, got {dims[:4]}...")
    return dict(in_features=official["in_channels"], num_classes=official["num_classes"], dim=dims[0],
                gamma=float(official.get("gamma", 25.0)))


class _Harness(nn.Module):
    """The optimizer fixtures' network: logits = head(fc0(x))."""

    def __init__(self, fc0: dict, head: dict):
        super().__init__()
        self.fc0 = nn.Linear(**fc0)
        self.head = GrassmannHead(**head_kwargs(head))

    def forward(self, x):
        return self.head(self.fc0(x))


def _load(model: nn.Module, tensors: dict) -> dict[str, str]:
    """Load the case's official state through checkpoint_filter_fn; returns our key -> official key."""
    state = official_state(tensors)
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    names = {}
    for k, v in state.items():
        (ours,) = checkpoint_filter_fn({k: v}, model).keys()
        names[ours] = k
    return names


def _run_head(case: dict, tensors: dict) -> dict:
    head = GrassmannHead(**head_kwargs(case["official_kwargs"]))
    _load(head, tensors)
    head.train(case.get("mode") == "train")
    with torch.no_grad():
        return {"output": head(case_inputs(tensors)[""])}


def _hparams(dump: dict) -> dict:
    out = {k: v for k, v in dump.items() if k not in _NOT_HPARAMS}
    if "betas" in out:
        out["betas"] = tuple(out["betas"])
    return out


def _build_optimizer(case: dict, model: nn.Module) -> GrassmannOptimizer:
    kind = case["official_class"].rsplit(".", 1)[-1]
    wrapper = case.get("optim_wrapper_cfg") or {}
    kind = (wrapper.get("optimizer") or {}).get("type", kind)
    if kind not in _OPTIMIZERS:
        raise ValueError(f"unknown official optimizer {kind}; known: {sorted(_OPTIMIZERS)}")
    kw = case["official_kwargs"]
    params = dict(model.named_parameters())
    geo = grassmann_param_groups(model)
    geo = [g for g in geo if g.get("grassmann")]
    geo_ids = {id(p) for g in geo for p in g["params"]}
    if case.get("param_groups"):  # recorded Euclidean groups (mmengine paramwise: one param per group)
        euclid = [{"params": [params[d["param"]]], **_hparams(d)} for d in case["param_groups"]]
    else:  # no paramwise config: every Euclidean parameter in one group with the constructor's values
        euclid = [{"params": [p for p in params.values() if id(p) not in geo_ids]}]
    rsgd = {d["param"]: d for d in case.get("rsgd_param_groups") or []}
    names = {id(p): n for n, p in params.items()}
    for g in geo:
        d = rsgd.get(names[id(g["params"][0])], {})
        g["momentum"] = float(d.get("momentum", kw.get("momentum", 0.0)))
        g["dampening"] = float(d.get("dampening", kw.get("dampening", 0.0)))
    base = _OPTIMIZERS[kind]
    base_kwargs = {k: v for k, v in kw.items() if k not in ("momentum", "lr_factor", "reorth_step", "lr")}
    if base != "sgd":  # the recorded groups carry every Euclidean hyper-parameter but LAMB's global clip
        first = (case.get("param_groups") or [{}])[0]
        base_kwargs = {"max_grad_norm": first["max_grad_norm"]} if "max_grad_norm" in first else {}
    clip = (wrapper.get("clip_grad") or {}).get("max_norm")
    return GrassmannOptimizer(
        euclid + geo, base=base, lr=kw["lr"], lr_factor=float(case.get("LR_FACTOR", kw.get("lr_factor", 1.0))),
        momentum=float(kw.get("momentum", 0.0)), reorth_step=int(case.get("REORTH_STEP", kw.get("reorth_step", 1))),
        clip_grad=clip, **base_kwargs)


def _run_trajectory(case: dict, tensors: dict) -> dict:
    harness = case["harness"]
    model = _Harness(harness["fc0"], case["head_kwargs"])
    names = _load(model, tensors)
    model.train()
    opt = _build_optimizer(case, model)
    x, target = case_inputs(tensors)[""], tensors["target"].long()
    steps = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"state_after_step\.(\d+)\.", k))})
    out = {}
    for step in range(1, max(steps) + 1):
        loss = F.cross_entropy(model(x), target)
        out[f"loss.{step}"] = loss.detach().reshape(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            out[f"state_after_step.{step}.{names[n]}"] = p.detach().clone()
            buf = opt.state[p].get("momentum_buffer")
            if buf is not None:
                out[f"momentum_buffer_after_step.{step}.{names[n]}"] = buf.clone()
    with torch.no_grad():
        out["output"] = model(x)
    return out


def run_case(case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cls = case["official_class"].rsplit(".", 1)[-1]
    if cls == "GrassmannClsHead":
        return _run_head(case, tensors)
    if "harness" in case:
        return _run_trajectory(case, tensors)
    raise ValueError(f"gcr hook: no runner for official_class {case['official_class']}")


# ----------------------------------------------------------------------------------------------------------------
# manifest

def manifest_model(entry: dict) -> nn.Module:
    """Our counterpart (on the meta device) of an official full-size variant."""
    backbone = entry["timm_equivalent"]
    if entry.get("kind") == "gcr":
        k = head_kwargs(entry["head_kwargs"])
        name = f"{backbone}_gcr{k['dim']}"
        return meta_model(lambda: timm.create_model(name, num_classes=k["num_classes"]))
    n = entry.get("head_kwargs", {}).get("num_classes", 1000)
    return meta_model(lambda: timm.create_model(backbone, num_classes=n))


def check_manifest_entry(name: str, entry: dict) -> list[str]:
    model = manifest_model(entry)
    return check_state_dict_layout(model, entry["state_dict"], checkpoint_filter_fn, expected_params=entry["params"])
