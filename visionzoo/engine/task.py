"""What a kind of training supplies to the loop (engine/loop.py), in the spirit of timm's ``TrainingTask`` and
dinov2's meta-architecture: the loop owns everything shared, a task only what differs.

Required: ``build_model``, ``train_dataset``, ``train_step`` and ``evaluate``. Every other hook has a default.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputNotFoundError


@dataclasses.dataclass
class Context:
    """What the loop tells a task: where it runs, and where the run is."""

    cfg: Any
    device: torch.device
    rank: int = 0
    world_size: int = 1
    run_dir: Path | None = None
    epoch: int = 0
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batch within the step (gradient accumulation)
    steps_per_epoch: int = 0
    total_steps: int = 0
    values: dict = dataclasses.field(default_factory=dict)  # this step's schedule values (lr, momentum, ...)
    autocast: Any = None  # a callable returning the autocast context, for evaluation

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def to_device(batch, device: torch.device):
    """Tensors of a (nested) batch moved to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Task:
    """One kind of training. ``cfg`` is its config (a ``RunConfig`` subclass)."""

    name = "task"
    best_metric: str | None = None  # the evaluation metric whose maximum is kept in ``best/``
    sampling = "drop"  # EpochBatches mode: drop the tail, or pad by wrap-around so every item is seen
    eval_at_start = False  # also evaluate before the first step (a baseline row at step 0)

    def __init__(self, cfg):
        self.cfg = cfg

    # -- required -------------------------------------------------------------------------------------------------
    def build_model(self, ctx: Context) -> nn.Module:
        """The model, on the CPU; the loop seeds before the call and moves it to the device."""
        raise NotImplementedError

    def train_dataset(self, ctx: Context):
        """Map-style dataset; an item may draw from the global RNGs (seeded per item by the loop)."""
        raise NotImplementedError

    def train_step(self, net: nn.Module, batch, ctx: Context) -> dict:
        """Forward and loss of one micro-batch under autocast; ``net`` is the (DDP-wrapped) trainable module.
        Returns ``{"loss": tensor, other scalar tensors to average}``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ctx: Context) -> dict:
        """Metrics of ``model`` (float values go to metrics.csv); under DDP every rank takes part."""
        return {}

    # -- optional -------------------------------------------------------------------------------------------------
    def prepare(self, ctx: Context) -> None:
        """Before anything is built: check inputs, prepare data (fail here, before any model is built)."""

    def collate(self):
        return None  # torch's default collate

    def sample_groups(self):
        """One group id per training item (batches never mix groups), or None."""
        return None

    def trainable(self, model: nn.Module) -> nn.Module:
        """The part of the model that trains (DDP, EMA and clipping cover it; a teacher stays outside)."""
        return model

    def compile(self, net: nn.Module, mode: str) -> nn.Module:
        """``--torchcompile MODE``: compile what ``train_step`` runs and return the ``net`` it gets. Default: the
        (DDP-wrapped) trainable module as one compiled callable. A task whose step does more than call ``net`` (UDI's
        teacher and loss) or whose model cannot be one graph (torchvision detectors' post-processing) compiles its
        own parts, in place (``nn.Module.compile``: the state-dict keys stay the same)."""
        return torch.compile(net, mode=None if mode == "default" else mode)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        from .optim import create_optimizer

        return create_optimizer(self.cfg, self.trainable(model), lr)

    def build_schedule(self, optimizer, ctx: Context, lr: float):
        from .schedule import NoSchedule

        return NoSchedule()

    def clip_parameters(self, model: nn.Module, optimizer) -> list:
        return [p for g in optimizer.param_groups if not g.get("no_clip", False) for p in g["params"]]

    def before_optimizer_step(self, model: nn.Module, ctx: Context) -> None:
        """After backward and clipping, before the step (e.g. DINO drops the last layer's gradient early on)."""

    def after_update(self, model: nn.Module, ctx: Context) -> None:
        """After each optimizer step (e.g. the teacher's EMA update)."""

    def state_dict(self) -> dict:
        """Task-owned state outside the model and optimizer."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def export_model(self, model: nn.Module) -> nn.Module:
        """What ``last/``, ``best/`` and ``ema/`` hold (UDI: the teacher backbone)."""
        return model

    def export(self, model: nn.Module, folder: Path, metadata: dict) -> None:
        from ..models import save_pretrained

        save_pretrained(self.export_model(model), folder, metadata=metadata)

    def summary(self) -> dict:
        """Extra entries of the run's summary.json."""
        return {}

    def header(self) -> str:
        """A line for the run header (data sizes, classes)."""
        return ""


def save_task_model(model: nn.Module, folder: Path, task: str, config: dict, metadata: dict | None = None) -> Path:
    """A model that is not a timm model (a detector, a segmentor) as ``model.safetensors`` + ``config.json``
    (``{"task": ..., "config": {...}}``, the recipe that rebuilds it): the ``last/`` / ``best/`` layout of every task."""
    import json

    from ..files import atomic_save_safetensors, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), folder / "model.safetensors", metadata)
    atomic_write_text(folder / "config.json", json.dumps({"task": task, "config": config}, indent=1, default=str))
    return folder


def read_task_model(path: str | Path, task: str) -> tuple[dict, dict, dict]:
    """(config dict, state dict, safetensors metadata) of a folder written by ``save_task_model`` for ``task``: the
    folder itself, or ``best/`` then ``last/`` of a run folder."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    for folder in (path, path / "best", path / "last"):
        cfg_file = folder / "config.json"
        if cfg_file.is_file() and (folder / "model.safetensors").is_file():
            meta = json.loads(cfg_file.read_text())
            if meta.get("task") == task:
                weights = str(folder / "model.safetensors")
                with safe_open(weights, framework="pt") as f:
                    metadata = f.metadata() or {}
                return meta["config"], load_file(weights), metadata
    raise InputNotFoundError(f"{path} holds no {task} model (config.json with task '{task}' + model.safetensors, "
                             f"in the folder or its best/ or last/): pass the run folder of a `visionzoo {task}` run.")


def load_model_state(model: nn.Module, state: dict, source: str, hint: str = "") -> nn.Module:
    """``model.load_state_dict(state)``, a mismatch as one CheckpointMismatchError naming ``source``."""
    from ..models import CheckpointMismatchError

    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointMismatchError(f"{source} does not fit {hint or 'its own config'} ({first})") from None
    return model
