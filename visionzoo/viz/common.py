"""What every visualisation shares: the model (from ``--model`` and/or the checkpoint's own config), the input image,
and drawing maps over images at a size a person can read (a 32 px digit is drawn large, pixel for pixel).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..data.image_io import decode_image
from ..errors import InputNotFoundError, UserError

MIN_DISPLAY_SIDE = 256  # smaller inputs are drawn this large (whole-pixel zoom), so that maps and text are readable

__all__ = ["MIN_DISPLAY_SIDE", "display_zoom", "load_image", "load_model", "upsample_map", "zoom"]


def load_image(spec: Union[str, Path]):
    """A PIL RGB image from a path, or ``'sample'``: scikit-learn's first sample image (china.jpg, 427x640)."""
    from PIL import Image, UnidentifiedImageError

    if str(spec) == "sample":
        from sklearn.datasets import load_sample_images  # ships with scikit-learn, no download

        return Image.fromarray(load_sample_images().images[0]).convert("RGB")
    path = Path(spec)
    if not path.exists():
        raise InputNotFoundError(f"image not found: {path}. Pass an image file, or 'sample' for scikit-learn's "
                                 f"sample image.")
    try:
        return decode_image(path)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}). Pass a JPEG/PNG file.") from None


def load_model(name: Optional[str], checkpoint=None, use_ema: bool = False) -> torch.nn.Module:
    """The model to draw, in eval mode. A checkpoint that is a ``save_pretrained`` folder or a run folder brings its
    own architecture and preprocessing (input size, mean, std: what the weights were trained with), so ``name`` may
    be omitted; with ``use_ema`` a run folder's ``ema/`` is read. Any other checkpoint (a weights file, an official
    checkpoint) is loaded into ``name``."""
    import visionzoo
    from visionzoo.models import load_pretrained, load_weights, saved_model_dir

    folder = None
    if checkpoint is not None:
        ema = Path(checkpoint) / "ema"
        folder = saved_model_dir(ema if use_ema and ema.is_dir() else checkpoint)
    if folder is not None:
        model = load_pretrained(folder)
        arch = (model.pretrained_cfg or {}).get("architecture", "")
        if name and name.split(".")[0] != str(arch).split(".")[0]:
            raise UserError(f"--checkpoint {checkpoint} holds a {arch}, not --model {name}: drop --model (the "
                            f"checkpoint names its architecture) or pass a checkpoint of {name}.")
        return model.eval()
    if not name:
        what = f"--checkpoint {checkpoint} is a weights file without a config" if checkpoint else "no --checkpoint"
        raise UserError(f"--model is needed: {what} naming the architecture. Pass --model NAME, or a run folder / "
                        f"save_pretrained folder as --checkpoint.")
    model = visionzoo.create_model(name)
    if checkpoint is not None:
        load_weights(model, checkpoint, use_ema=use_ema)
    return model.eval()


def display_zoom(height: int, width: int, min_side: int = MIN_DISPLAY_SIDE) -> int:
    """The whole-number zoom that makes the short side at least ``min_side`` (1 for images already that large)."""
    return max(1, -(-min_side // max(1, min(height, width))))


def zoom(rgb: np.ndarray, factor: int) -> np.ndarray:
    """``rgb`` (H, W, 3) drawn ``factor`` times larger, each pixel a block (the model's pixels stay visible)."""
    return rgb if factor == 1 else np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def upsample_map(values, height: int, width: int) -> np.ndarray:
    """A (h, w) map (cluster ids, group ids, attention) spread over (height, width) pixels by nearest cell, so each
    cell covers its own pixels whether or not the sizes divide."""
    values = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    h, w = values.shape[-2:]
    rows = np.minimum(np.arange(height) * h // height, h - 1)
    cols = np.minimum(np.arange(width) * w // width, w - 1)
    return values[..., rows[:, None], cols[None, :]]
