"""Scaled dot-product attention for every model of the package, with the one precision rule they share.

On a CPU, ``F.scaled_dot_product_attention`` in bf16 is slower than in fp32: on the native-bf16 AMD EPYC of
docs/benchmarks.md (avx512_bf16, torch 2.14.1) its flash kernel is no faster forward and 1.3-5x slower in the backward
for the head dims of these models (16-64). So on CPUs the attention itself runs in fp32 (inputs cast up, output cast
back to the precision it came in), while the projections around it keep bf16's 2-3x. GPUs are left to autocast.

timm's ViT blocks (the UDI backbone, GA's ViT trunk) take :class:`Attention` as their ``attn_layer``: timm's own layer,
same parameters and state-dict keys, with its fused product routed through :func:`sdpa`; a timm backbone built by name
(GCR's) gets it by :func:`follow_cpu_rule`. timm's Swin window attention is left as it is: its fused path is
experimental (off by default), and the explicit product it runs instead is bf16's fast path on CPUs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention as _TimmAttention
from timm.layers import register_notrace_function
from torch import nn

_REDUCED = (torch.bfloat16, torch.float16)


@register_notrace_function  # torch.fx: one leaf (the device and autocast checks are not traceable)
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)``; on CPU in fp32 when autocast or the inputs are bf16/fp16."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    if dtype not in _REDUCED:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p)
    return out.to(dtype)


class Attention(_TimmAttention):
    """``timm.layers.Attention`` whose fused path goes through :func:`sdpa`; masks, causal attention and the
    unfused path (``TIMM_FUSED_ATTN=0``) stay timm's."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or not self.fused_attn:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = sdpa(self.q_norm(q), self.k_norm(k), v, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if self.gate is not None:  # gated attention: the gate reads the block input
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))


def follow_cpu_rule(model: nn.Module) -> nn.Module:
    """Put the ``timm.layers.Attention`` layers of ``model`` (e.g. a timm backbone built by name) under the rule
    above, in place: each becomes :class:`Attention` (the same parameters, buffers and keys; no change on GPUs or in
    fp32)."""
    for module in model.modules():
        if type(module) is _TimmAttention:
            module.__class__ = Attention
    return model
