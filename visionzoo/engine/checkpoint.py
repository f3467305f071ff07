"""Checkpoints: weights as safetensors (HF layout), training state in a separate file, both written atomically."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "train_state.pt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_train_state(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"Cannot resume: no {STATE_FILE} in {run_dir}. Pass the run directory of an earlier `visionzoo train`.")
    # weights_only: the state holds tensors, numbers, strings and the numpy RNG tuple
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _numpy_rng_globals() -> list:
    out = []
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2

        out += [_reconstruct, np.ndarray, np.dtype]
    except ImportError:
        pass
    out += [type(np.dtype("uint32")), type(np.dtype("int64"))]
    return out
