"""Safe file I/O for the whole package: every atomic write and every torch unpickling goes through here.

Atomic: a file is written next to its target, fsynced, then renamed over it, so a killed process leaves either the
old file or the new one, never half of one. Safe: ``torch.load`` runs only with ``weights_only=True``, so no file a
user passes can execute code; a file that needs more gets one clear error instead of a pickle traceback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import InputNotFoundError, UserError


class UnsafeCheckpointError(UserError):
    """A torch file that the weights-only loader refuses (it would run code) or cannot read (truncated, garbage)."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` then fsync and rename onto ``path``. New files get the umask's permissions (some writers,
    safetensors among them, create files 0600: teammates could not read a shared run)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_dir(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp_folder)`` then rename the folder onto ``path``, so that a reader never sees half a folder. When
    another process published ``path`` first, its folder is kept and ours is dropped."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        publish_dir(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = False) -> Path:
    """Rename the finished folder ``tmp`` onto ``path``. With ``replace``, a folder already there is moved aside
    first and deleted only once the new one is in place (put back if the rename fails)."""
    import shutil

    path, old = Path(path), None
    if replace and path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(state_dict: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """A state dict as one safetensors file (CPU, contiguous; ``metadata`` values as strings), written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def safe_globals() -> list:
    """Non-tensor types that training states hold and the weights-only loader may rebuild (numpy RNG states)."""
    import numpy as np

    out: list = [np.ndarray, np.dtype, type(np.dtype("uint32")), type(np.dtype("int64")),
                 type(np.dtype("float64")), type(np.dtype("float32"))]
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    out.append(_reconstruct)
    return out


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``; a refused or unreadable file raises ``UnsafeCheckpointError`` with
    one line that names it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise UnsafeCheckpointError(
                f"Refused to load {path}: it holds Python objects that could run code when unpickled, and "
                f"visionzoo loads torch files with weights_only=True only. Re-save its tensors "
                f"(torch.save(model.state_dict(), ...)) or convert it to safetensors.") from None
        raise UnsafeCheckpointError(f"Could not read {path} as a torch {what} ({type(e).__name__}: {first}); "
                                    f"is the file truncated or not a torch file?") from None
