"""Data-driven parity runner: our models against reference tensors produced by the official code.

Usage::

    python -m visionzoo.testing.parity ../shared/fixtures            # every case and manifest there
    python -m visionzoo.testing.parity ../shared/fixtures/coc/fold.json

A *case* is ``<name>.json`` + ``<name>.safetensors`` (format: shared/fixtures/README.md). A *manifest* is a
``manifest.json`` mapping official variant names to their parameter count and state-dict layout.

Each family plugs in through a hook module ``visionzoo.testing.families.<family>`` with two functions:

* ``run_case(case: dict, tensors: dict[str, Tensor]) -> dict[str, Tensor]``: build our module from
  ``case['official_kwargs']`` (and any other structured field), load the ``state.*`` tensors through the family's
  ``checkpoint_filter_fn``, run what the case describes and return our tensors keyed like the fixture's keys
  (``output``, ``output.0``, ``grad.<name>``, ...). Every returned key is compared with the fixture's tensor of the
  same key using the case's ``atol``/``rtol``.
* ``check_manifest_entry(name: str, entry: dict) -> list[str]``: the problems found (empty list = pass) when
  building our counterpart of an official full-size variant, without allocating weights (see ``meta_model``).

Nothing about a particular case is hard-coded here: a new case file in the same format needs no new code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = [
    "Result", "run_paths", "run_case_file", "run_manifest_file", "collect", "load_case", "official_state",
    "compare", "meta_model", "check_state_dict_layout", "FamilyNotImplemented", "main",
]


class FamilyNotImplemented(RuntimeError):
    pass


@dataclass
class Result:
    name: str
    ok: bool
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    message: str = ""
    not_implemented: bool = False

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        errs = f" max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g}" if self.max_abs == self.max_abs else ""
        msg = f" {self.message}" if self.message else ""
        return f"{status} {self.name}{errs}{msg}"


# ----------------------------------------------------------------------------------------------------------------
# helpers for family hooks

def load_case(json_path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a case's json and its tensors (``<same name>.safetensors``)."""
    from safetensors.torch import load_file

    json_path = Path(json_path)
    case = json.loads(json_path.read_text())
    tensor_path = json_path.with_suffix(".safetensors")
    tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
    return case, tensors


def official_state(tensors: dict[str, torch.Tensor], prefix: str = "state.") -> dict[str, torch.Tensor]:
    """The official state dict stored in a case under ``prefix`` (prefix stripped)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def case_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``input`` -> {'': t}; ``input.<name>`` -> {'<name>': t}."""
    out = {}
    for k, v in tensors.items():
        if k == "input":
            out[""] = v
        elif k.startswith("input."):
            out[k[len("input."):]] = v
    return out


def compare(ours: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float, float, str]:
    """allclose-style check ``|a - b| <= atol + rtol * |b|``; returns (ok, max_abs, max_rel, message)."""
    ours = torch.as_tensor(ours).detach().cpu()
    ref = torch.as_tensor(ref).detach().cpu()
    if tuple(ours.shape) != tuple(ref.shape):
        return False, float("inf"), float("inf"), f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    if ref.dtype == torch.bool or not ref.is_floating_point():
        diff = (ours.to(torch.float64) - ref.to(torch.float64)).abs()
        ok = bool((diff == 0).all())
        m = float(diff.max()) if diff.numel() else 0.0
        return ok, m, m, ""
    a, b = ours.to(torch.float64), ref.to(torch.float64)
    if a.numel() == 0:
        return True, 0.0, 0.0, ""
    nan_mismatch = bool((torch.isnan(a) != torch.isnan(b)).any())
    diff = (a - b).abs().nan_to_num(0.0)
    rel = diff / b.abs().clamp_min(1e-12)
    ok = (not nan_mismatch) and bool((diff <= atol + rtol * b.abs().nan_to_num(0.0)).all())
    return ok, float(diff.max()), float(rel.max()), ("NaN pattern differs" if nan_mismatch else "")


def meta_model(builder: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model on the meta device: shapes and parameter counts without allocating weights."""
    with torch.device("meta"):
        return builder()


def check_state_dict_layout(
    model: torch.nn.Module,
    official_layout: Iterable[tuple[str, list[int]]],
    filter_fn: Callable[[dict, torch.nn.Module], dict] | None,
    expected_params: int | None = None,
    ignore_ours: Callable[[str], bool] | None = None,
) -> list[str]:
    """Problems (empty = pass) between ``model`` and an official ``[key, shape]`` list pushed through ``filter_fn``.

    The official layout is turned into meta tensors of the listed shapes, converted by ``filter_fn`` and compared
    one-to-one (keys and shapes) with ``model.state_dict()``; ``expected_params`` is compared with our count.
    """
    problems = []
    if expected_params is not None:
        ours = sum(p.numel() for p in model.parameters())
        if ours != expected_params:
            problems.append(f"params {ours} != official {expected_params}")
    official = {k: torch.empty(tuple(s), device="meta") for k, s in official_layout}
    converted = filter_fn(official, model) if filter_fn is not None else official
    mine = {k: v for k, v in model.state_dict().items() if not (ignore_ours and ignore_ours(k))}
    missing = sorted(set(mine) - set(converted))
    unexpected = sorted(set(converted) - set(mine))
    if missing:
        problems.append(f"{len(missing)} of our keys not produced by the converter, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} converted keys we do not have, e.g. {unexpected[:4]}")
    bad = [
        f"{k}: ours {tuple(mine[k].shape)} vs converted {tuple(converted[k].shape)}"
        for k in sorted(set(mine) & set(converted))
        if tuple(mine[k].shape) != tuple(converted[k].shape)
    ]
    if bad:
        problems.append(f"{len(bad)} shape mismatches, e.g. {bad[:3]}")
    return problems


def check_recipe_manifest(entry: dict, recipe_of: Callable[[str], str], build: Callable, convert: Callable
                          ) -> list[str]:
    """What differs between a dense manifest entry's official layout and our model of the shipped recipe that
    reproduces its ``official_config`` (``recipe_of``): ``build(recipe) -> (model, parts)`` on the meta device; the
    converted key list one-to-one with equal shapes (``convert``), total and per-part parameter counts."""
    from ..errors import ConfigError

    try:
        recipe = recipe_of(entry["official_config"])
    except ConfigError as e:
        return [str(e)]
    model, parts = build(recipe)
    problems = check_state_dict_layout(model, entry["state_dict"], convert, expected_params=entry.get("params"))
    return problems + check_part_params(parts, entry, f" (recipe {recipe})")


def check_part_params(parts: dict[str, torch.nn.Module | None], entry: dict, note: str = "") -> list[str]:
    """Problems between the parameter counts of our ``parts`` (name -> module; None counts 0) and a manifest
    entry's ``params_<name>`` (a part the entry does not count is not checked)."""
    problems = []
    for name, module in parts.items():
        expected = entry.get(f"params_{name}")
        ours = sum(p.numel() for p in module.parameters()) if module is not None else 0
        if expected is not None and ours != expected:
            problems.append(f"{name} params {ours} != official {expected}{note}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# the runner

def family_hook(family: str):
    try:
        return importlib.import_module(f"visionzoo.testing.families.{family}")
    except ModuleNotFoundError as e:
        if e.name == f"visionzoo.testing.families.{family}":
            raise FamilyNotImplemented(
                f"family '{family}' not implemented (no hook module visionzoo/testing/families/{family}.py)"
            ) from None
        raise


def _family_of(json_path: Path, data: dict) -> str:
    return data.get("family") or json_path.parent.name


def run_case_file(json_path: str | Path) -> Result:
    json_path = Path(json_path)
    case, tensors = load_case(json_path)
    family = _family_of(json_path, case)
    name = f"{family}/{case.get('case', json_path.stem)}"
    try:
        hook = family_hook(family)
        ours = hook.run_case(case, tensors)
    except FamilyNotImplemented as e:
        return Result(name, False, message=str(e), not_implemented=True)
    except Exception as e:  # a failing case must not stop the others
        tb = traceback.format_exc(limit=-3).strip().splitlines()[-1]
        return Result(name, False, message=f"error: {type(e).__name__}: {e} ({tb})")
    if not ours:
        return Result(name, False, message="the family hook returned nothing to compare")
    atol, rtol = float(case.get("atol", 1e-5)), float(case.get("rtol", 1e-4))
    worst_abs, worst_rel, failed = 0.0, 0.0, []
    for key, value in ours.items():
        if key not in tensors:
            failed.append(f"{key}: no reference tensor of that name")
            continue
        ok, mabs, mrel, msg = compare(value, tensors[key], atol, rtol)
        worst_abs, worst_rel = max(worst_abs, mabs), max(worst_rel, mrel)
        if not ok:
            failed.append(f"{key}: max_abs={mabs:.3g}{' ' + msg if msg else ''}")
    message = f"({len(ours)} tensors)" if not failed else "; ".join(failed[:4])
    return Result(name, not failed, worst_abs, worst_rel, message)


def run_manifest_file(path: str | Path) -> list[Result]:
    path = Path(path)
    manifest = json.loads(path.read_text())
    family = path.parent.name
    results = []
    try:
        hook = family_hook(family)
    except FamilyNotImplemented as e:
        return [Result(f"{family}/manifest:{n}", False, message=str(e), not_implemented=True) for n in manifest]
    for variant, entry in manifest.items():
        results.append(run_manifest_entry(hook, family, variant, entry))
    return results


def run_manifest_entry(hook, family: str, variant: str, entry: dict) -> Result:
    name = f"{family}/manifest:{variant}"
    try:
        problems = hook.check_manifest_entry(variant, entry)
    except Exception as e:
        return Result(name, False, message=f"error: {type(e).__name__}: {e}")
    return Result(name, not problems, message="; ".join(problems) if problems else f"params={entry.get('params')}")


def collect(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """Split paths (files or folders, searched recursively) into case jsons and manifest jsons."""
    cases, manifests = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"fixture path not found: {p}")
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            (manifests if f.name == "manifest.json" else cases).append(f)
    return cases, manifests


def run_paths(paths: Iterable[str | Path]) -> list[Result]:
    cases, manifests = collect(paths)
    results = [run_case_file(c) for c in cases]
    for m in manifests:
        results.extend(run_manifest_file(m))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionzoo.testing.parity", allow_abbrev=False,
        description="Compare our models with reference tensors from the official code (shared/fixtures format).",
    )
    parser.add_argument("paths", nargs="+", help="case .json files, manifest.json files or folders of them")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        results = run_paths(args.paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(r.line(), flush=True)
    n_fail = sum(not r.ok for r in results)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
