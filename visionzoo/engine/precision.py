"""Precision and the optimizer step for every task: autocast (bf16/fp16, CPU and GPU), the fp16 grad scaler,
gradient clipping (norm, value, agc, per-tensor) and the step itself."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable

import torch

from ..errors import UserError

_logger = logging.getLogger("visionzoo")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def amp_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise UserError(f"amp_dtype {name!r} is not one of bfloat16, float16") from None


def eval_dtype(amp: bool, dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an evaluation (None: fp32), as Precision decides for training: fp16 only on CUDA."""
    if not amp:
        return None
    d = amp_dtype(dtype)
    return None if d == torch.float16 and device.type != "cuda" else d


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16"):
    """``torch.autocast`` for ``device``; a null context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(dtype))


@torch.no_grad()
def clip_per_tensor_(params: Iterable[torch.Tensor], clip: float) -> None:
    """Each gradient scaled by min(1, clip / (||g|| + 1e-6)) on its own (DINO's clip_gradients), no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or clip <= 0:
        return
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])


CLIP_MODES: dict[str, Callable] = {"per_tensor": clip_per_tensor_}


def clip_gradients(params, value: float, mode: str = "norm") -> None:
    """``norm`` / ``value`` / ``agc`` through timm's dispatcher; ``per_tensor`` as DINO does."""
    params = list(params)
    if mode in CLIP_MODES:
        CLIP_MODES[mode](params, value)
        return
    from timm.utils import dispatch_clip_grad

    dispatch_clip_grad(params, value, mode=mode)


class Precision:
    """Autocast context, backward with the fp16 scaler where it is needed, and the optimizer step."""

    def __init__(self, device: torch.device, enabled: bool = False, dtype: str = "bfloat16"):
        self.device, self.enabled, self.dtype = device, bool(enabled), str(dtype)
        if self.enabled and amp_dtype(self.dtype) == torch.float16 and device.type != "cuda":
            # fp16 autocast is a GPU recipe (it needs the CUDA grad scaler); on a CPU it would only be slow
            _logger.warning("amp_dtype float16 needs CUDA: running fp32 on %s (amp_dtype=bfloat16 autocasts on CPUs)",
                            device)
            self.enabled = False
        fp16 = self.enabled and amp_dtype(self.dtype) == torch.float16
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(device.type) if fp16 and device.type == "cuda" else None

    def autocast(self):
        return autocast(self.device, self.enabled, self.dtype)

    def describe(self) -> str:
        return f"amp {self.dtype}" if self.enabled else "fp32"

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, clip_params=None, clip: float | None = None,
             clip_mode: str = "norm", before_step: Callable[[], None] | None = None) -> None:
        """Unscale, clip ``clip_params`` (when ``clip``), run ``before_step`` (e.g. drop frozen gradients), step."""
        if self.scaler is not None and (clip or before_step is not None):
            self.scaler.unscale_(optimizer)
        if clip:
            clip_gradients(clip_params, clip, clip_mode)
        if before_step is not None:
            before_step()
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
