"""The run folder, the same for every task: a lock while a run is alive, no reuse without ``--resume``, one
training state file (``train_state.pt``) written atomically and read with ``weights_only=True``, and the optional
weights-only snapshots (``snapshots/epoch_NNNN.safetensors``) that show a model over its training.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..files import UnsafeCheckpointError, atomic_save_safetensors, atomic_torch_save, safe_torch_load

_logger = logging.getLogger("visionzoo")

STATE_FILE = "train_state.pt"
LOCK_FILE = ".lock"
SNAPSHOT_DIR = "snapshots"
STATE_FORMAT = 2  # 1: the per-task files of visionzoo <= 0.1 (train_state.pt of `train`, last.pth, iter_N.pth, ...)


class RunFolderError(UserError):
    """A run folder that cannot be used as asked (in use, already holds a run, nothing to resume)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """``path`` holds one run. ``open`` creates it (refusing a folder that already holds anything) or, with
    ``resume``, continues it; either way it takes the lock, so a second live run in the same folder is refused."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._locked = False
        self.created = False  # made by this run: removed again if the run ends before writing anything

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @classmethod
    def open(cls, path: str | os.PathLike, resume: bool = False, lock: bool = True) -> "RunFolder":
        run = cls(path)
        if resume:
            if not run.state_path.is_file():
                what = "does not exist" if not run.path.exists() else f"has no {STATE_FILE}"
                raise RunFolderError(f"Cannot resume {run.path}: it {what}. Pass the folder of an earlier run "
                                     f"(it holds {STATE_FILE}), or start a new run without --resume.")
        run.created = not run.path.exists()
        run.path.mkdir(parents=True, exist_ok=True)
        if lock:
            run.acquire()
        if not resume:
            taken = sorted(p.name for p in run.path.iterdir() if p.name != LOCK_FILE)
            if taken:
                run.release()
                how = (f"Continue it with --resume {run.path}" if run.state_path.is_file() else
                       "It holds no training state to resume (the run stopped before its first checkpoint): delete it")
                raise RunFolderError(
                    f"{run.path} already holds a run ({', '.join(taken[:4])}{', ...' if len(taken) > 4 else ''}); "
                    f"nothing was changed. {how}, or choose another --output / --experiment.")
        return run

    def acquire(self) -> None:
        lock = self.path / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(lock.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                stale = other.get("host") == me["host"] and not _pid_alive(int(other.get("pid", -1)))
                if stale:  # its process died without releasing (killed): take the folder over
                    _logger.warning("removing the stale lock of dead process %s in %s", other.get("pid"), self.path)
                    lock.unlink(missing_ok=True)
                    continue
                raise RunFolderError(
                    f"{self.path} is in use by a live run (pid {other.get('pid', '?')} on {other.get('host', '?')}, "
                    f"started {other.get('started', '?')}); nothing was changed. Wait for it to end, or, if that "
                    f"process is gone, delete {lock}.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            return

    def release(self) -> None:
        if self._locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self._locked = False
            if self.created and not self.state_path.exists():
                # this run made the folder and failed before its first training state: nothing in it can be resumed
                # (a config, generated data), and leaving it would refuse the corrected re-run under the same name
                import shutil

                shutil.rmtree(self.path, ignore_errors=True)

    def save_state(self, state: dict) -> None:
        atomic_torch_save({"format": STATE_FORMAT, **state}, self.state_path)

    def load_state(self) -> dict:
        return load_train_state(self.path)

    def save_snapshot(self, state_dict: dict, epoch: int, step: int) -> Path:
        """The weights after ``epoch`` epochs as ``snapshots/epoch_NNNN.safetensors`` (atomic; metadata: epoch and
        step)."""
        folder = self.path / SNAPSHOT_DIR
        folder.mkdir(exist_ok=True)
        return atomic_save_safetensors(state_dict, folder / f"epoch_{epoch:04d}.safetensors",
                                       {"epoch": epoch, "step": step})

    def drop_snapshots_after(self, epoch: int) -> None:
        """On resume: snapshots of epochs after the saved state are redone by the resumed run, so none is left that
        the state does not lead to (a run killed between a snapshot and its training state)."""
        for e, path in list_snapshots(self.path):
            if e > epoch:
                path.unlink(missing_ok=True)


def list_snapshots(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, file) of the snapshots of a run folder, by epoch; empty when it has none."""
    folder = Path(run) / SNAPSHOT_DIR
    found = []
    for path in folder.glob("epoch_*.safetensors") if folder.is_dir() else ():
        digits = path.stem[len("epoch_"):]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def resume_folder(path: str | os.PathLike, old_files: str, old_hint: str, cfg=None, recipe_keys: tuple = ()) -> Path:
    """The run folder that ``--resume path`` continues: ``path``, or the folder of its train_state.pt. One clear
    error for what cannot be resumed: a weights file, a run of an older visionzoo (files matching the glob
    ``old_files``; ``old_hint`` says what to do), a run whose saved recipe differs from ``cfg`` in ``recipe_keys``
    (a changed model, schedule or lr is refused rather than ignored), a run that finished all its steps. Torch files
    are read weights-only, so nothing in them can run."""
    path = Path(path)
    if path.is_file():
        if path.name != "train_state.pt":
            obj = safe_torch_load(path, "training state")
            if isinstance(obj, dict) and "model" in obj and path.match(old_files):
                raise UserError(f"--resume {path} was written by an older visionzoo whose training state cannot be "
                                f"resumed by this one; {old_hint}")
            raise UserError(f"--resume {path}: pass a run folder (it holds train_state.pt), not a weights file.")
        path = path.parent
    old = sorted(path.glob(old_files)) if path.is_dir() and not (path / STATE_FILE).is_file() else []
    if old:
        safe_torch_load(old[-1], "training state")  # a refused pickle says so first
        raise UserError(f"--resume {path} was written by an older visionzoo whose training state cannot be resumed "
                        f"by this one; {old_hint}")
    if cfg is not None and (path / "config.yaml").is_file():
        from .config import parse_yaml

        saved = parse_yaml((path / "config.yaml").read_text(), f"{path / 'config.yaml'}") or {}
        changed = [k for k in recipe_keys if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            raise UserError(f"--resume {path}: the run was trained with other {', '.join(changed)} "
                            f"({ {k: saved[k] for k in changed} }); resume with the same recipe, or without --recipe "
                            f"(only max_steps, checkpoint_every_steps, workers and log_interval may change).")
        total = (saved.get("resolved") or {}).get("total_steps")
        summary = path / "summary.json"
        if total and summary.is_file() and json.loads(summary.read_text()).get("global_step", 0) >= total:
            raise UserError(f"--resume {path}: nothing to do, the run already finished all {total} steps.")
    return path


def load_train_state(path: str | os.PathLike) -> dict:
    """The training state of a run folder (or a ``train_state.pt`` path), read with ``weights_only=True``."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise RunFolderError(f"Cannot resume: no {STATE_FILE} in {path}. Pass the run folder of an earlier run.")
    state = safe_torch_load(file, "training state")
    if not isinstance(state, dict) or "progress" not in state:
        raise UnsafeCheckpointError(f"{file} is not a visionzoo training state (no 'progress' entry).")
    return state


class StopSignal:
    """While active, SIGINT / SIGTERM only set ``requested``: the loop saves a resumable state at the current step and
    then stops. A second signal interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _logger.warning("%s received: saving the state at the current step, then stopping (again to abort)",
                        signal.Signals(signum).name)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False
