"""conftest for running timm's own ``tests/test_models.py`` against visionzoo's models.

``.ci/timm_tests.py`` copies this file next to the ``test_models.py`` it takes from the sdist of the installed timm
version (as ``conftest.py``). It

* imports visionzoo before ``test_models.py`` is collected, so our models are in timm's registry when timm's
  parametrised tests list the models;
* lets our model families count as "models with ``forward_intermediates()``" (timm lists its own modules by name in
  ``FEAT_INTER_FILTERS``, so ours would otherwise never reach the ``forward_intermediates`` tests);
* keeps only the tests parametrised by one of visionzoo's registered names, and of the kinds in
  ``VISIONZOO_TIMM_KINDS`` (comma separated test names without ``test_model_``; all kinds when unset);
* counts a GCR classifier as an "early pool" model (timm's ``EARLY_POOL_MODELS``, listed by class) when its
  backbone is one: ``vgg13_bn_gcr8`` wraps timm's VGG, whose pre-logits conv pools the 7x7 map to 1x1 even with
  global pooling off, exactly as the VGG that timm exempts from the "no pooling keeps the map" check;
* registers ``timeout`` as a known marker (timm uses pytest-timeout, which we do not require).

Nothing of timm's test code is copied: the tests run exactly as timm ships them.
"""
import os

import timm

import visionzoo  # noqa: F401  (registers our models into timm's registry)
from visionzoo.models import list_models as _vz_list_models
from visionzoo.models._registry import FAMILY_MODULES

# our names in timm's registry (the point-cloud coc_pointmlp is visionzoo's own, not a timm image model)
VISIONZOO_MODELS = {n for n in _vz_list_models() if timm.is_model(n)}
# Our families that implement forward_intermediates() (as timm's FEAT_INTER_FILTERS lists timm's own modules).
FEAT_INTER_MODULES = tuple(os.environ.get(
    "VISIONZOO_TIMM_FEAT_INTER", ",".join(FAMILY_MODULES)).split(","))

_orig_list_models = timm.list_models


# Our ViTs whose features are token sequences [B, N, C]: timm lists its own ones by name pattern in NON_STD_FILTERS
# ('vit_*', 'deit*', ...) for its config tests; ours are named udi_vit_*.
NON_STD_MODELS = ["udi_vit_*", "cswin_*"]  # CSWin's forward_features: (B, L, C) tokens


def _list_models(filter="", module="", *args, exclude_filters="", include_tags=None, **kwargs):
    if isinstance(module, (list, tuple)) and "vision_transformer" in module:  # timm's FEAT_INTER_FILTERS
        module = list(module) + [m for m in FEAT_INTER_MODULES if m]
    if include_tags:  # only the config tests pass include_tags: std / non-std split by name pattern
        if isinstance(filter, (list, tuple)) and "vit_*" in filter:
            filter = list(filter) + NON_STD_MODELS
        if isinstance(exclude_filters, (list, tuple)) and "vit_*" in exclude_filters:
            exclude_filters = list(exclude_filters) + NON_STD_MODELS
    return _orig_list_models(filter, module, *args, exclude_filters=exclude_filters, include_tags=include_tags,
                             **kwargs)


timm.list_models = _list_models


class _EarlyPoolBackboneMeta(type):
    early_pool: tuple = ()  # timm's EARLY_POOL_MODELS, set once test_models.py is collected

    def __instancecheck__(cls, obj):
        from visionzoo.models.grassmann import GrassmannClassifier

        return isinstance(obj, GrassmannClassifier) and isinstance(obj.backbone, cls.early_pool)


class GcrOnEarlyPoolBackbone(metaclass=_EarlyPoolBackboneMeta):
    """isinstance() target: a GCR classifier whose backbone is one of timm's early-pool models."""


def _count_gcr_early_pool(module) -> None:
    early = getattr(module, "EARLY_POOL_MODELS", None)
    if isinstance(early, tuple) and GcrOnEarlyPoolBackbone not in early:
        _EarlyPoolBackboneMeta.early_pool = early
        module.EARLY_POOL_MODELS = early + (GcrOnEarlyPoolBackbone,)


def pytest_configure(config):
    for mark in ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward",
                 "fxbackward", "timeout"):  # timm's markers (its pyproject) and pytest-timeout's
        config.addinivalue_line("markers", f"{mark}: timm test marker")


def pytest_collection_modifyitems(config, items):
    kinds = [k.strip() for k in os.environ.get("VISIONZOO_TIMM_KINDS", "").split(",") if k.strip()]
    patterns = [p.strip() for p in os.environ.get("VISIONZOO_TIMM_MODELS", "").split(",") if p.strip()]
    import fnmatch

    keep, drop = [], []
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        _count_gcr_early_pool(module)
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        name = name.split(".")[0] if isinstance(name, str) else name  # cfg tests list names with pretrained tags
        kind = item.originalname.removeprefix("test_model_").removeprefix("test_")
        ok = name in VISIONZOO_MODELS
        ok = ok and (not kinds or kind in kinds)
        ok = ok and (not patterns or any(fnmatch.fnmatch(name, p) for p in patterns))
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
