"""Parity hook for the official mmseg / mmdet dense modules (see visionzoo.testing.parity).

No per-case code here: the task packages own their official counterparts. Each of
``visionzoo.dense.segmentation.official`` and ``visionzoo.dense.detection.official`` exports

* ``PARITY_MODULES``: ``{(official_registry, official_type): run(case, tensors) -> {output_key: tensor}}``;
* ``manifest_problems(name, entry)``: ``None`` when the manifest variant is not its own, else its problems.

A package that does not exist (yet) simply contributes nothing.
"""
from __future__ import annotations

import importlib

import torch

OFFICIAL_MODULES = ("visionzoo.dense.segmentation.official", "visionzoo.dense.detection.official")


def _official_modules() -> list:
    found = []
    for name in OFFICIAL_MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:  # a real import error inside the module must surface
                raise
    return found


def run_case(case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = (case.get("official_registry"), case.get("official_type"))
    for module in _official_modules():
        handler = module.PARITY_MODULES.get(key)
        if handler is not None:
            return handler(case, tensors)
    raise NotImplementedError(f"no visionzoo counterpart for official {key[0]} type {key[1]} "
                              f"(looked in {', '.join(OFFICIAL_MODULES)})")


def check_manifest_entry(name: str, entry: dict) -> list[str]:
    for module in _official_modules():
        problems = module.manifest_problems(name, entry)
        if problems is not None:
            return problems
    raise NotImplementedError(f"no visionzoo counterpart for official {entry.get('official_builder')} "
                              f"{entry.get('official_class')} (variant {name})")
