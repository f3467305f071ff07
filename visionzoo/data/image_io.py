"""Image decoding and the skip bookkeeping of every image dataset (folder, LMDB): decode fully, skip a corrupt
image with one warning that names it, and count the skips across DataLoader workers.

This module imports neither torch nor timm, so the CLI can use it while staying fast to start.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.sharedctypes
import os
import warnings

import numpy as np
from PIL import Image

# Same list as torchvision's ImageFolder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class CorruptImageWarning(UserWarning):
    """A sample could not be decoded and was replaced by the next readable one."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def decode_image(data_or_path) -> Image.Image:
    """Decode fully (``convert`` forces the pixel read, so truncated files fail here and not in a transform)."""
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        import io

        data_or_path = io.BytesIO(data_or_path)
    with Image.open(data_or_path) as img:
        return img.convert("RGB")


# --------------------------------------------------------------------------------------------------------------
# Skip bookkeeping shared by the folder and LMDB datasets
# --------------------------------------------------------------------------------------------------------------
class SkipTracker:
    """One shared byte per sample, set when that sample failed to decode.

    Shared memory (not a Python list) so marks made inside DataLoader worker processes are seen by the main
    process; one byte per sample (not a counter) so a file that fails every epoch is counted and warned about once.
    """

    def __init__(self, n: int):
        self._flags = multiprocessing.sharedctypes.RawArray("b", max(n, 1))

    def _view(self) -> np.ndarray:
        return np.frombuffer(self._flags, dtype=np.int8)

    def is_marked(self, i: int) -> bool:
        return self._flags[i] != 0

    def mark(self, i: int) -> bool:
        """Mark sample ``i``; True if it was not marked before (so the caller warns once)."""
        new = self._flags[i] == 0
        self._flags[i] = 1
        return new

    @property
    def count(self) -> int:
        return int(self._view().sum())

    def indices(self) -> list[int]:
        return np.flatnonzero(self._view()).tolist()

    # Shared ctypes may only be pickled while a child process is being spawned (DataLoader workers with the
    # spawn/forkserver start method): then they stay shared. Any other pickle/deepcopy gets an independent copy.
    def __getstate__(self):
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"shared": self._flags}
        return {"copy": bytes(self._view().tobytes())}

    def __setstate__(self, state):
        if "shared" in state:
            self._flags = state["shared"]
        else:
            data = np.frombuffer(state["copy"], dtype=np.int8)
            self._flags = multiprocessing.sharedctypes.RawArray("b", len(data))
            self._view()[:] = data


class RobustSampleMixin:
    """``__getitem__`` that substitutes the next readable sample for a corrupt one.

    Subclasses implement ``_load(index) -> PIL.Image`` (raising on a bad image), ``_describe(index) -> str`` (the
    file or record name used in warnings) and set ``self.targets`` and ``self._skips = SkipTracker(len(self))``.
    """

    transform = None
    target_transform = None

    def __getitem__(self, index: int):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        for step in range(n):
            i = (index + step) % n
            if self._skips.is_marked(i):
                continue
            try:
                img = self._load(i)
            except Exception as e:  # any decode failure: PIL raises OSError, ValueError, SyntaxError, ...
                if self._skips.mark(i):
                    reason = "not a readable image format" if "<_io.BytesIO" in str(e) else str(e)
                    warnings.warn(
                        f"skipping unreadable image {self._describe(i)} ({type(e).__name__}: {reason}); "
                        f"using the next readable sample instead", CorruptImageWarning, stacklevel=2)
                continue
            target = self.targets[i]
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target
        raise RuntimeError(f"no readable image in {self._source_name()}: all {n} samples failed to decode")

    @property
    def num_skipped(self) -> int:
        """Number of distinct samples that failed to decode so far (all worker processes included)."""
        return self._skips.count

    @property
    def skipped_files(self) -> list[str]:
        return [self._describe(i) for i in self._skips.indices()]

    def _source_name(self) -> str:
        return str(getattr(self, "root", type(self).__name__))


def find_classes(root: str) -> list[str]:
    """Class folders of ``root``, sorted (ImageFolder order)."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _scan_class_folder(folder: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return files
