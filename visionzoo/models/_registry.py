"""The model contract: thin wrappers over timm's registry, weight loading/saving and clear errors."""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from ..errors import InputNotFoundError, UserError

_logger = logging.getLogger(__name__)

# Our family modules (timm records a model's module as the last component of its builder's module).
FAMILY_MODULES: tuple[str, ...] = ()

# Names visionzoo builds that are not in timm's registry (timm's tools and tests treat every registered name as an
# image classifier): models that are not image models (the point-cloud ``coc_pointmlp``) and older names kept
# loadable as a base model plus fixed arguments (``coc_small_feat2`` = ``coc_small(fork_feat=True, ...)``).
_OWN_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: set[str] = set()  # the older names among them: loadable, not listed


class UnknownModelError(UserError):
    pass


class CheckpointMismatchError(UserError, RuntimeError):
    pass


@contextlib.contextmanager
def factory_context(device=None, dtype=None):
    """Create tensors on ``device`` and floating-point tensors in ``dtype`` (both optional) inside the block.

    What timm's own models do with their ``device=`` / ``dtype=`` constructor arguments (``dd`` passed to every
    layer): build directly on the meta device, on a GPU or in bf16, without a float32 CPU copy first.
    """
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
        if dtype is not None:
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if not dtype.is_floating_point:
                raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            stack.callback(torch.set_default_dtype, previous)
        yield


def accepts_factory_kwargs(cls):
    """Class decorator: ``cls(..., device=None, dtype=None)`` builds the module inside :func:`factory_context` (timm's
    factory arguments); other unknown arguments still raise ``TypeError``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, device=None, dtype=None, **kwargs):
        if device is None and dtype is None:
            return init(self, *args, **kwargs)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with factory_context(device, dtype):
            init(self, *args, **kwargs)
        if dtype is not None:  # also what was built with an explicit float32 dtype
            nn.Module.to(self, dtype=dtype)

    cls.__init__ = __init__
    return cls


def is_tracing() -> bool:
    """True while torch.fx symbolically traces (shape checks that need real sizes are skipped then; the traced
    graph keeps the shape logic that timm-style leaf modules / functions run at call time)."""
    fx = torch.fx._symbolic_trace
    return fx.is_fx_symbolic_tracing() if hasattr(fx, "is_fx_symbolic_tracing") else fx.is_fx_tracing()


def factory_kwargs_of(module: nn.Module) -> dict:
    """``dict(device=, dtype=)`` of a module's first floating-point parameter ({} if it has none): what a layer
    rebuilt later (``reset_classifier``) must be created with to match the rest of the model."""
    for p in module.parameters():
        if p.is_floating_point():
            return dict(device=p.device, dtype=p.dtype)
    return {}


def _close_matches(name: str, candidates: list[str], n: int = 5) -> list[str]:
    base = name.split(".")[0]
    close = difflib.get_close_matches(base, candidates, n=n, cutoff=0.5)
    if not close:
        close = [c for c in candidates if base.split("_")[0] in c][:n]
    return close


def register_own_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: a visionzoo model builder kept out of timm's image-model registry (``visionzoo.create_model`` and
    ``list_models`` know it; ``timm.create_model`` does not). The builder sets ``pretrained_cfg['architecture']``."""
    _OWN_MODELS[fn.__name__] = fn
    return fn


def register_alias(name: str, target: str, cfg: dict | None = None, **fixed: Any) -> None:
    """Keep an older model name loadable as ``target`` built with ``fixed`` arguments (the caller's arguments win).

    The model's ``pretrained_cfg`` names ``name`` as its architecture (updated by ``cfg``), so folders saved from it
    rebuild it through :func:`load_pretrained`.
    """
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        model = timm.create_model(target, pretrained=pretrained, **{**fixed, **kwargs})
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **(cfg or {}), "architecture": name}
        return model

    build.__name__ = name
    build.__module__ = timm.models.model_entrypoint(target).__module__  # the family of its target
    _OWN_MODELS[name] = build
    _ALIASES.add(name)


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder of a visionzoo or timm model name (its ``__module__`` names the family)."""
    base = name.split(".")[0]
    return _OWN_MODELS[base] if base in _OWN_MODELS else timm.models.model_entrypoint(base)


def is_model(name: str) -> bool:
    """Whether ``name`` (with or without a pretrained tag) is a model of visionzoo or timm."""
    base = name.split(".")[0]
    return base in _OWN_MODELS or timm.is_model(base)


def check_model_name(name: str) -> None:
    """Raise a clear error naming close matches when ``name`` is not a registered model."""
    if name.startswith(("local-dir:", "hf-hub:", "hf_hub:")):
        return
    if is_model(name):
        return
    close = _close_matches(name, timm.list_models() + sorted(_OWN_MODELS))
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"Unknown model '{name}'.{hint} `visionzoo list models` shows every name.")


def list_models(pattern: str = "*", include_timm: bool = False, pretrained: bool = False) -> list[str]:
    """Our models (or every timm model too with ``include_timm``), timm ``fnmatch`` patterns. Older names kept
    loadable (``register_alias``) are not listed."""
    import fnmatch

    own = [] if pretrained else [n for n in _OWN_MODELS if n not in _ALIASES and fnmatch.fnmatch(n, pattern)]
    if include_timm:
        return sorted(set(timm.list_models(pattern, pretrained=pretrained)) | set(own))
    names: list[str] = []
    for module in FAMILY_MODULES:
        names += timm.list_models(pattern, module=module, pretrained=pretrained)
    return sorted(set(names) | set(own))


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with clear errors, and weights from a local file or HF-layout folder.

    ``checkpoint_path`` may be a ``.safetensors`` / ``.pth`` file (ours or an official checkpoint; the family's
    ``checkpoint_filter_fn`` converts it) or a folder holding ``config.json`` + ``model.safetensors``.
    """
    check_model_name(model_name)
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.exists():
            raise InputNotFoundError(f"Checkpoint not found: {path}. Pass a .safetensors/.pth file or an HF-layout "
                                     f"folder.")
    if model_name.startswith(("hf-hub:", "hf_hub:")) or (pretrained and not kwargs.get("pretrained_cfg_overlay")):
        model = _create_from_hub(model_name, pretrained, **kwargs)  # the user asked for a download
    elif model_name.split(".")[0] in _OWN_MODELS:
        model = _OWN_MODELS[model_name.split(".")[0]](pretrained=pretrained, **kwargs)
    else:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path)
    return model


LOCAL_WEIGHTS_HINT = ("load local files instead: visionzoo.create_model(NAME, checkpoint_path='weights.pth' or an "
                      "official checkpoint), timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay="
                      "dict(file='weights.safetensors')), or timm.create_model('local-dir:FOLDER', pretrained=True) "
                      "for a save_pretrained folder")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers within ``timeout`` seconds (False at once under HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    import threading

    ok = []

    def probe():  # in a thread: name resolution ignores socket timeouts
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(ok)


def _create_from_hub(model_name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``pretrained=True`` / ``hf-hub:``: the one case where visionzoo downloads (the user asked). Our own models
    have nothing to download; offline, the HF cache is used and a miss fails at once, naming the local ways."""
    base = model_name.split(".")[0]
    if pretrained and not model_name.startswith(("hf-hub:", "hf_hub:")) and (base in list_models() or
                                                                            base in _OWN_MODELS):
        raise UserError(f"{model_name} has no weights to download (visionzoo models are built from the official "
                        f"checkpoints you have): {LOCAL_WEIGHTS_HINT.replace('NAME', repr(model_name))}.")
    if hub_reachable():
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    from huggingface_hub import constants

    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True  # the HF cache only: no 30-50 s of retries
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except Exception as e:  # huggingface_hub's LocalEntryNotFoundError, timm's RuntimeError, ...
        raise UserError(f"{model_name}: its weights are not in the local Hugging Face cache and huggingface.co is "
                        f"not reachable ({type(e).__name__}); {LOCAL_WEIGHTS_HINT.replace('NAME', repr(model_name))}."
                        ) from None
    finally:
        constants.HF_HUB_OFFLINE = previous


# ----------------------------------------------------------------------------------------------------------------
# reading and converting state dicts

def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read weights from a safetensors file, a torch checkpoint (``weights_only``) or an HF-layout folder.

    Wrappers used by training scripts are unwrapped: ``state_dict`` / ``state_dict_ema`` / ``model`` / ``module``
    entries and a leading ``module.`` on every key.
    """
    path = Path(resolve_checkpoint(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointMismatchError(f"Could not read {path} as safetensors ({e}): is the file truncated or "
                                          f"not a safetensors file?") from None
    else:
        from ..files import UnsafeCheckpointError, safe_torch_load

        try:
            sd = safe_torch_load(path, "checkpoint")
        except UnsafeCheckpointError as e:
            raise CheckpointMismatchError(str(e)) from None
    if not isinstance(sd, dict):
        raise CheckpointMismatchError(f"{path} does not hold a state dict (found {type(sd).__name__}).")
    if use_ema:
        return unwrap_state_dict(sd, ("state_dict_ema", "model_ema", "state_dict", "model", "module"))
    return unwrap_state_dict(sd)


def saved_model_dir(path: str | os.PathLike) -> Path | None:
    """The save_pretrained folder (a config.json naming an architecture + model.safetensors) that ``path`` is or
    holds: ``path`` itself, else ``best/`` then ``last/`` of a run folder of any task; None if there is none."""
    path = Path(path)
    for folder in (path, path / "best", path / "last"):
        config = folder / "config.json"
        if config.is_file() and (folder / "model.safetensors").is_file():
            try:
                if "architecture" in json.loads(config.read_text()):
                    return folder
            except ValueError:
                continue
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """THE checkpoint resolver of every command: the weights file of a weights file, a save_pretrained folder, or a
    run folder of any task (its ``best/``, else ``last/``; older UDI runs: teacher_backbone.safetensors)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        folder = saved_model_dir(path)
        if folder is not None:
            return folder / "model.safetensors"
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin",
                     "teacher_backbone.safetensors"):
            if (path / name).is_file():
                return path / name
        raise InputNotFoundError(
            f"{path} is a folder without weights: pass a weights file, a save_pretrained folder (config.json + "
            f"model.safetensors) or a run folder (its best/ or last/ holds them).")
    raise InputNotFoundError(f"checkpoint not found: {path}. Pass a .safetensors/.pth file, a save_pretrained "
                             f"folder or a run folder.")


def unwrap_state_dict(state_dict: dict, keys: tuple = ("state_dict", "model", "module", "state_dict_ema")) -> dict:
    """The weights inside a training checkpoint: the first of ``keys`` that holds a dict (timm's ``state_dict`` /
    ``state_dict_ema``, mmcv's ``state_dict``, DeiT/dino's ``model``), without DDP's ``module.`` prefix."""
    for key in keys:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def family_filter_fn(model: nn.Module) -> Callable | None:
    """The ``checkpoint_filter_fn`` of the module that defines ``type(model)`` (timm convention), if any."""
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _classifier_keys(model: nn.Module) -> list[str]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or []
    if isinstance(names, str):
        names = [names]
    return [f"{n}.{s}" for n in names for s in ("weight", "bias")]


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    use_ema: bool = False,
    strict: bool = True,
    filter_fn: Callable | None = None,
) -> nn.Module:
    """Load weights into ``model``; official checkpoints are converted by the family's ``checkpoint_filter_fn``.

    A classifier whose size differs from the model's (other ``num_classes``) is dropped with a warning, as timm
    does. Anything else that does not fit raises a ``CheckpointMismatchError`` that counts and names the keys.
    """
    sd = read_state_dict(path, use_ema=use_ema)
    filter_fn = filter_fn or family_filter_fn(model)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    own = model.state_dict()
    resized = [k for k in _classifier_keys(model) if k in sd and k in own and sd[k].shape != own[k].shape]
    if resized:  # one note for the whole head, with the class counts
        k = resized[0]
        _logger.warning("%s: its classifier is for %d classes, the model's for %d: keeping the model's newly "
                        "initialised classifier (%s)", path, sd[k].shape[0], own[k].shape[0], ", ".join(resized))
        for k in resized:
            sd.pop(k)
        strict = False
    shape_bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    new_head = [k for k in missing if k in _classifier_keys(model)]
    if new_head and len(new_head) == len(missing) and not resized:  # backbone-only weights (e.g. SSL)
        _logger.warning("%s has no classifier (%s): keeping the model's newly initialised one",
                        path, ", ".join(new_head))
    if new_head and len(new_head) == len(missing):
        for k in new_head:
            sd[k] = own[k]
        missing = []
    unexpected = [k for k in sd if k not in own]
    if shape_bad or (strict and (missing or unexpected)):
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shape_bad:
            parts.append("shape mismatches: " + ", ".join(
                f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shape_bad[:3]))
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not fit model '{arch}': " + "; ".join(parts)
            + ". Is it a checkpoint of another architecture or size? Pick the matching model name.")
    model.load_state_dict(sd, strict=strict)
    return model


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    model_args: dict | None = None,
    data_config: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (HF / timm ``local-dir:`` layout), atomically per file.

    ``data_config`` (input_size, crop_pct, mean, std, interpolation) records the preprocessing the weights were
    trained with, so ``validate`` and ``timm.data.resolve_data_config`` use it later.
    """
    from timm.models._hub import save_config_for_hf

    from ..files import atomic_save_safetensors, atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(unwrap_model(model).state_dict(), directory / "model.safetensors", metadata)
    atomic_write(directory / "config.json", lambda tmp: save_config_for_hf(
        unwrap_model(model), tmp, model_args=model_args, data_config=data_config))
    return directory


def load_pretrained(directory: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained`: architecture, args and preprocessing from its config.json
    (the same as ``timm.create_model('local-dir:<directory>', pretrained=True)``)."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise InputNotFoundError(f"{directory} has no config.json: not a folder written by save_pretrained.")
    if not (directory / "model.safetensors").exists():
        for name in ("pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (directory / name).exists():  # timm would unpickle it itself: read it safely first (one clear error)
                from ..files import safe_torch_load

                safe_torch_load(directory / name)
    from timm.models._hub import load_model_config_from_path

    saved_cfg, architecture, model_args = load_model_config_from_path(directory)
    if architecture.split(".")[0] in _OWN_MODELS:  # not in timm's registry: what timm's local-dir: loader does
        kwargs = {**(model_args or {}), **kwargs}
        if saved_cfg.get("num_classes") is not None:
            kwargs.setdefault("num_classes", saved_cfg["num_classes"])
        model = create_model(architecture, checkpoint_path=resolve_checkpoint(directory), **kwargs)
        data = {k: saved_cfg[k] for k in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
                if k in saved_cfg}
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **data}
        return model
    return timm.create_model(f"local-dir:{directory}", pretrained=True, **kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
