"""Precision and the optimizer step for every task and tool: which autocast dtype a precision name means on a device
(bf16/fp16/fp32/auto, CPU and GPU), the one autocast context of the loop, the evaluations and the tools, the fp16
grad scaler, gradient clipping (norm, value, agc, per-tensor) and the step itself.

Precision names are spelled one way (``config.AMP_CHOICES``: auto, bf16, fp16, fp32); ``config.amp_name`` reads the
older spellings. Parts that need fp32 under autocast (GCR's Riemannian step, GA's Gram matrices, UDI's loss) switch
it off themselves with :func:`fp32_island`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterable

import torch

from .config import AMP_CHOICES, amp_name

_logger = logging.getLogger("visionzoo")

__all__ = ["AMP_CHOICES", "amp_name", "native_bf16", "amp_dtype", "autocast_context", "describe", "fp32_island",
           "Precision", "clip_gradients"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@functools.lru_cache(maxsize=None)
def _native_bf16_cpu() -> bool:
    # oneDNN's own test: avx512_bf16 / AMX on x86, bf16 extensions on Arm (what the bf16 GEMMs and convs dispatch on)
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (CPU: oneDNN's check; CUDA: compute capability >= 8.0)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _native_bf16_cpu()
    return False


def amp_dtype(amp, device: torch.device | str, warn: bool = True) -> torch.dtype | None:
    """The autocast dtype of the precision ``amp`` on ``device`` (None: fp32). ``auto`` is bf16 where it is native,
    else fp32; fp16 needs CUDA (its grad scaler, and CPUs have no fast fp16): elsewhere it runs fp32, with a warning.
    """
    device = torch.device(device)
    name = amp_name(amp)
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if name == "fp16" and device.type != "cuda":
        if warn:
            _logger.warning("amp fp16 needs CUDA: running fp32 on %s (--amp bf16 autocasts on CPUs)", device)
        return None
    return _DTYPES[name]


def autocast_context(device: torch.device | str, amp=None, dtype: torch.dtype | None = ...):
    """``torch.autocast`` of the precision ``amp`` on ``device`` (a null context for fp32); ``dtype`` (already
    resolved by :func:`amp_dtype`) skips the resolution."""
    device = torch.device(device)
    if dtype is ...:
        dtype = amp_dtype(amp, device, warn=False)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def describe(amp, device: torch.device | str) -> str:
    """The precision of a run header: ``bf16 autocast``, ``fp32``, with why when the name is not what runs."""
    device = torch.device(device)
    name, dtype = amp_name(amp), amp_dtype(amp, device, warn=False)
    what = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}.get(dtype, "fp32")
    if name == "auto":
        return f"{what} (amp auto: {'native' if dtype is not None else 'no native'} bf16 on {device.type})"
    if name == "fp16" and dtype is None:
        return f"{what} (amp fp16 needs CUDA)"
    return what


def fp32_island(x: torch.Tensor | torch.device | str):
    """Autocast switched off (the block computes in the dtype of its inputs: cast them with ``.float()``), for the
    numerically sensitive parts of a method; nothing to switch off on the meta device."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


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
    """The precision of a training run: autocast context, backward with the fp16 scaler where it is needed, and the
    optimizer step. ``amp`` is a precision name (auto, bf16, fp16, fp32; older spellings read by ``amp_name``)."""

    def __init__(self, device: torch.device, amp="fp32"):
        self.device, self.amp = torch.device(device), amp_name(amp)
        self.dtype = amp_dtype(self.amp, self.device)
        self.enabled = self.dtype is not None
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def autocast(self):
        return autocast_context(self.device, dtype=self.dtype)

    def describe(self) -> str:
        return describe(self.amp, self.device)

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
