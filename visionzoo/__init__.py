"""visionzoo: CoC, GPViT, GCR, GA and UDI on current PyTorch, timm-compatible.

``import visionzoo`` registers every model into timm's registry, so ``timm.create_model('coc_tiny')`` works.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

_LAZY = {
    "create_model", "list_models", "save_pretrained", "load_pretrained", "load_weights",
    "UnknownModelError", "CheckpointMismatchError",
}

# The `visionzoo` console script imports this package first; it defers torch/timm (3-7 s to import on a small
# machine) so that `visionzoo --help` answers at once. Any other import registers the models now.
if _os.path.basename(_sys.argv[0] if _sys.argv else "") != "visionzoo":
    from .models import (  # noqa: F401  (registers into timm)
        CheckpointMismatchError, UnknownModelError, create_model, list_models, load_pretrained, load_weights,
        save_pretrained,
    )


def __getattr__(name):
    if name in _LAZY:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'visionzoo' has no attribute {name!r}")
