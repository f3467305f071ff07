"""Parity hook for the Context Cluster family (see visionzoo.testing.parity).

Cases name the official class they were produced with; each official class maps to ours through a generic
argument translation, so a new case file with other constructor arguments needs no new code.
"""
from __future__ import annotations

import torch

from visionzoo.models import coc_pointmlp as pm
from visionzoo.models import context_cluster as cc
from visionzoo.testing.parity import case_inputs, check_state_dict_layout, meta_model, official_state

# official builder / class name in the manifest -> our registered model
MANIFEST_ALIASES = {f"context_cluster_{s}_feat{p}": f"coc_{s}_feat{p}" for s in ("small", "medium") for p in (2, 5, 7)}


def _image_model(kwargs: dict) -> torch.nn.Module:
    return cc.ContextCluster(**cc.official_kwargs_to_ours(kwargs))


def _cluster(kwargs: dict) -> torch.nn.Module:
    """Official ``Cluster(dim, out_dim, proposal_w, proposal_h, fold_w, fold_h, heads, head_dim)`` on NCHW."""
    kw = dict(proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=4, head_dim=24)
    kw.update(kwargs)
    kw.pop("return_center", None)
    fold = (kw["fold_w"], kw["fold_h"]) if kw["fold_w"] > 1 and kw["fold_h"] > 1 else (1, 1)
    return _NCHW(cc.Cluster(kw["dim"], kw["out_dim"], kw["heads"], kw["head_dim"],
                            (kw["proposal_w"], kw["proposal_h"]), fold))


def _cluster_block(kwargs: dict) -> torch.nn.Module:
    kw = dict(mlp_ratio=4.0, drop=0.0, drop_path=0.0, use_layer_scale=True, layer_scale_init_value=1e-5,
              proposal_w=2, proposal_h=2, fold_w=2, fold_h=2, heads=4, head_dim=24)
    kw.update(kwargs)
    for k in ("norm_layer", "act_layer", "return_center"):
        kw.pop(k, None)
    fold = (kw["fold_w"], kw["fold_h"]) if kw["fold_w"] > 1 and kw["fold_h"] > 1 else (1, 1)
    return _NCHW(cc.ClusterBlock(kw["dim"], kw["mlp_ratio"], kw["heads"], kw["head_dim"],
                                 (kw["proposal_w"], kw["proposal_h"]), fold, drop=kw["drop"],
                                 drop_path=kw["drop_path"], use_layer_scale=kw["use_layer_scale"],
                                 layer_scale_init_value=kw["layer_scale_init_value"]))


class _NCHW(torch.nn.Module):
    """Our channels-last modules behind the official NCHW interface (state-dict keys unchanged)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def load_state_dict(self, sd, strict=True):
        return self.inner.load_state_dict(sd, strict=strict)

    def forward(self, x):
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _point_block(kwargs: dict) -> torch.nn.Module:
    kw = dict(heads=4, head_dim=24)
    kw.update(kwargs)
    return pm.PointContextCluster(kw["dim"], kw["heads"], kw["head_dim"])


def _point_model(kwargs: dict) -> torch.nn.Module:
    kw = dict(kwargs)
    kw["num_classes"] = kw.pop("class_num", kw.pop("num_classes", 40))
    return pm.PointMLPCoC(**kw)


# official class (dotted path suffix) -> builder of our module from the official kwargs
BUILDERS = {
    "pointcloud.models.contextcluster.ContextCluster": _point_block,
    "pointcloud.models.contextcluster.Model": _point_model,
    "pointcloud.models.contextcluster.pointMLP_CoC": _point_model,
    "models.context_cluster.ContextCluster": _image_model,
    "models.context_cluster.Cluster": _cluster,
    "models.context_cluster.ClusterBlock": _cluster_block,
}


def build(case: dict) -> torch.nn.Module:
    cls = case["official_class"]
    for name, fn in BUILDERS.items():
        if cls == name or cls.endswith("." + name):
            return fn(dict(case.get("official_kwargs", {})))
    raise NotImplementedError(f"no CoC counterpart for official class {cls}; known: {sorted(BUILDERS)}")


def run_case(case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(case.get("seed", 0))
    model = build(case)
    inner = model.inner if isinstance(model, _NCHW) else model
    sd = cc.checkpoint_filter_fn(official_state(tensors), inner) if isinstance(inner, cc.ContextCluster) else \
        official_state(tensors)
    model.load_state_dict(sd, strict=True)
    model.train(case.get("mode", "eval") == "train")
    inputs = case_inputs(tensors)
    args = [inputs[""]] if "" in inputs else list(inputs.values())
    with torch.no_grad():
        if isinstance(model, cc.ContextCluster) and model.fork_feat:  # the official dense outputs
            out = model.forward_intermediates(*args, intermediates_only=True)
        else:
            out = model(*args)
    if isinstance(out, (list, tuple)):
        return {f"output.{i}": o for i, o in enumerate(out)}
    return {"output": out}


def our_model_name(official_name: str) -> str:
    return MANIFEST_ALIASES.get(official_name, official_name)


def check_manifest_entry(name: str, entry: dict) -> list[str]:
    from visionzoo.models import create_model, is_model

    ours = our_model_name(name)
    if not is_model(ours):  # coc_small_feat2 & co are visionzoo names (fork_feat forms of coc_small / coc_medium)
        return [f"no registered model {ours} for official {name}"]
    model = meta_model(lambda: create_model(ours))
    return check_state_dict_layout(model, entry["state_dict"], cc.checkpoint_filter_fn,
                                   expected_params=entry.get("params"))
