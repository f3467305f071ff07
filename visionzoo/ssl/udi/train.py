"""Running UDI: ``pretrain`` (the task on the one training loop, visionzoo/tasks/udi.py) and ``profile_pretrain``."""
from __future__ import annotations

import os

from .config import UDIConfig


def profile_pretrain(cfg: UDIConfig, steps: int = 10, device: str | None = None) -> dict:
    """Loader img/s against train-step img/s (``visionzoo pretrain --profile N``): ``engine.profile.profile`` of the
    UDI task."""
    from ...engine.profile import profile
    from ...tasks.udi import UDITask

    return profile(UDITask(cfg), steps, device)


def pretrain(cfg: UDIConfig, out_dir: str | os.PathLike | None = None, resume: bool | str | os.PathLike = False,
             device: str | None = None, progress: bool = True) -> dict:
    """UDI pretraining on the one training loop (``visionzoo.tasks.udi``): see ``visionzoo.tasks.udi.pretrain``."""
    from ...tasks.udi import pretrain as _pretrain

    return _pretrain(cfg, out_dir, resume=resume, device=device, progress=progress)
