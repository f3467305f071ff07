"""Model families. Importing this package registers every model into timm's registry."""
from ._registry import (
    CheckpointMismatchError,
    UnknownModelError,
    check_model_name,
    create_model,
    is_model,
    list_models,
    load_pretrained,
    load_weights,
    model_entrypoint,
    read_state_dict,
    resolve_checkpoint,
    saved_model_dir,
    save_pretrained,
    unwrap_model,
)
from . import _registry

# Family modules: each import registers its models (@register_model) into timm's registry.
_FAMILIES = ("context_cluster", "coc_pointmlp", "gpvit", "cswin", "gramian", "grassmann", "vit_udi")
for _name in _FAMILIES:
    __import__(f"{__name__}.{_name}")
_registry.FAMILY_MODULES = _FAMILIES
