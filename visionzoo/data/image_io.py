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
from PIL import Image, UnidentifiedImageError

from ..errors import InputNotFoundError, UserError

# Same list as torchvision's ImageFolder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class CorruptImageWarning(UserWarning):
    """A sample could not be decoded and was replaced by the next readable one."""


class DataError(UserError):
    """A data folder, file or LMDB that cannot be used as given (the CLI prints it as one line, no traceback)."""


class NoReadableImagesError(DataError):
    """Not one image of a dataset decodes: training on it would only loop over skips."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def decode_image(data_or_path) -> Image.Image:
    """Decode fully into 8-bit RGB (the pixel read happens here, so truncated files fail here and not in a transform).

    The one decoder of every reader (folder, LMDB, and through them the eval tools): see :func:`to_rgb`.
    """
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        import io

        data_or_path = io.BytesIO(data_or_path)
    with Image.open(data_or_path) as img:
        return to_rgb(img)


def read_image(path) -> Image.Image:
    """One image a user named (``--image``): :func:`decode_image`, with a missing or unreadable file as one error."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"image not found: {path}")
    try:
        return decode_image(path)
    except (OSError, ValueError) as e:
        raise UserError(f"Could not read {path} as an image ({type(e).__name__}: {e}).") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, with high-bit-depth and float modes scaled rather than clipped.

    PIL's ``convert("RGB")`` clips 16-bit ("I;16*"), 32-bit integer ("I") and float ("F") pixels at 255, so a
    16-bit PNG comes out almost all white and a float image in 0..1 all black. Here:

    * 16-bit modes (``I;16``, ``I;16B``, ...) and ``I`` read from a PNG (older Pillow opens 16-bit PNGs as ``I``):
      divided by 257, so 0..65535 maps onto 0..255;
    * ``I`` and ``F`` from other files (their range is not fixed by the format): kept when inside 0..255, taken
      as 16-bit when inside 0..65535 (``I``) or as 0..1 when inside 0..1 (``F``), else stretched from the image's
      own min..max; NaN or infinite values raise ``ValueError`` (the readers then skip the file with a warning);
    * palette images with transparency go through RGBA (PIL warns otherwise); every other mode ("1", "L", "LA",
      "P", "CMYK", "YCbCr", ...) uses PIL's conversion, dropping alpha as torchvision's ImageFolder does.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(img), "L").convert("RGB")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """The single channel of an ``I;16*``, ``I`` or ``F`` image as uint8 0..255 (rules in :func:`to_rgb`)."""
    a = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        lo, hi, top = 0.0, 65535.0, 65535.0  # the format's range, not the image's: a dark image stays dark
    else:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise UserError(f"{img.mode} image holds NaN or infinite values; it cannot be shown as 8-bit RGB")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 255 and not (img.mode == "F" and hi <= 1):
            top = 255.0
        elif lo >= 0 and hi <= 1 and img.mode == "F":
            top = 1.0
        elif lo >= 0 and hi <= 65535 and img.mode == "I":
            top = 65535.0
        else:  # no fixed range: stretch the image's own range
            if hi == lo:
                return np.zeros(a.shape, np.uint8)
            return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        lo = 0.0
    return np.round(np.clip(a.astype(np.float64), lo, top) * (255.0 / top)).astype(np.uint8)


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
                    warnings.warn(
                        f"skipping unreadable image {self._describe(i)} ({_decode_reason(e)}); "
                        f"using the next readable sample instead", CorruptImageWarning, stacklevel=2)
                continue
            target = self.targets[i]
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target
        raise self._no_readable_error([])  # every sample marked bad (files changed after the dataset was built?)

    def _check_readable(self) -> None:
        """Decode samples until one works; raise ``NoReadableImagesError`` naming the source when none does.

        Called when a dataset is built, so that a folder of unreadable files fails at once with one message (not
        with a traceback from a DataLoader worker). A few samples spread over the dataset first, then the rest in
        order: a healthy dataset costs one decode. Failures here are neither warned nor marked; ``__getitem__``
        does that when it meets them, as before.
        """
        n = len(self)
        if n == 0:  # an empty dataset is refused where it is built, with its own message
            return
        spread = np.unique(np.linspace(0, n - 1, num=min(n, 16)).round().astype(int)).tolist()
        probed = set(spread)
        rest = (i for i in range(n) if i not in probed)
        failures = []
        for i in (*spread, *rest):
            try:
                self._load(i)
                return
            except Exception as e:
                if not failures:
                    failures.append((i, e))
        raise self._no_readable_error(failures)

    def _no_readable_error(self, failures) -> NoReadableImagesError:
        n = len(self)
        examples = "; ".join(f"{self._describe(i)}: {_decode_reason(e)}" for i, e in failures)
        return NoReadableImagesError(
            f"no readable image in {self._source_name()}: all {n} files failed to decode"
            + (f" (e.g. {examples})" if examples else "")
            + ". Check that the files are images, complete (not truncated) and not placeholders such as Git LFS "
              "pointers, then copy them again.")

    @property
    def num_skipped(self) -> int:
        """Number of distinct samples that failed to decode so far (all worker processes included)."""
        return self._skips.count

    @property
    def skipped_files(self) -> list[str]:
        return [self._describe(i) for i in self._skips.indices()]

    def _source_name(self) -> str:
        return str(getattr(self, "root", type(self).__name__))


def _decode_reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):  # its message repeats the path (or a BytesIO repr)
        return "not a readable image format"
    return f"{type(e).__name__}: {e}"


def find_classes(root: str) -> list[str]:
    """Class folders of ``root``, sorted (ImageFolder order)."""
    try:
        with os.scandir(root) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except PermissionError as e:
        raise _unreadable_folder(e) from None


def _unreadable_folder(e: OSError) -> DataError:
    return DataError(f"cannot read folder {e.filename}: {e.strerror}; give the user running visionzoo read access "
                     f"to it (chmod -R a+rX)")


def _raise(e: OSError):
    raise _unreadable_folder(e) if isinstance(e, PermissionError) else e


def _scan_class_folder(folder: str) -> list[str]:
    files = []
    # onerror: os.walk would silently skip a folder it cannot list, and that class would lose its images
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_raise):
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return files
