"""Scaled dot-product attention for every model of the package, with the one precision rule they share.

On a CPU, ``F.scaled_dot_product_attention`` in bf16 is slower than in fp32: on the native-bf16 AMD EPYC of
docs/benchmarks.md (avx512_bf16, torch 2.14.1) its flash kernel is no faster forward and 1.3-5x slower in the backward
for the head dims of these models (16-64). So on CPUs the attention itself runs in fp32 (inputs cast up, output cast
back to the precision it came in), while the projections around it keep bf16's 2-3x. GPUs are left to autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

_REDUCED = (torch.bfloat16, torch.float16)


@register_notrace_function  # torch.fx: one leaf (the device and autocast checks are not traceable)
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)``; on CPU in fp32 when autocast or the inputs are bf16/fp16."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    if dtype not in _REDUCED:
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return out.to(dtype)
