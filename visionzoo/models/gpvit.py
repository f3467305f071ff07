"""GPViT: Group Propagation Vision Transformer (Yang et al., ICLR 2023).

A plain (non-hierarchical) ViT that keeps stride-8 tokens in all 12 layers. A conv stem reduces the image by 8,
a learnable absolute position embedding is added, then 8 local blocks (CSWin-style cross-shaped stripe attention
of width 2 with LePE) and 4 Group Propagation (GP) blocks at layers 1/4/7/10 run at that one resolution. A GP block
gathers the image tokens into M learnable group tokens (light cross-attention), mixes the groups with an MLP-Mixer
layer and lets the image tokens read them back (full cross-attention), then a depthwise conv + BN + ReLU.
Classifiers pool with a one-query attention neck (L1/L2) or global average pooling (L3/L4).

Fidelity notes (spec gpvit.md section 9): GP blocks have no identity shortcut, LayerNorm eps is 1e-6 in local blocks
and final/out norms but 1e-5 inside GP blocks and the neck, local blocks end with a bias-free depthwise conv that
replaces x.

Speed: tokens stay in a (B, H, W, C) layout between blocks, so the depthwise convs run as channels-last convs on a
permuted view; stripes are cut with one permute (vertical) or no copy at all (horizontal); every attention goes
through ``F.scaled_dot_product_attention``; the ungrouping output projection is folded into the concat projection
(no concat, one GEMM less); BatchNorms are folded into their convs in eval mode. ``attn_impl='reference'`` runs the
official formulation instead (copies, explicit softmax(q k^T) v): the oracle of the tests and the benchmark baseline.

Official checkpoints (mmcls ``gpvit_l{1..4}_in1k_300e.pth``: ``state_dict`` with ``backbone.``/``neck.``/``head.``
prefixes, or a bare backbone state dict) load through :func:`checkpoint_filter_fn`.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, register_notrace_module, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ..errors import UserError
from ._attention import sdpa
from ._registry import accepts_factory_kwargs, factory_context, factory_kwargs_of, is_tracing, unwrap_state_dict

__all__ = ["GPViT", "checkpoint_filter_fn"]

# Layer indices and group-token counts of the GP blocks in all four official variants.
DEFAULT_GROUP_LAYERS = {1: 64, 4: 32, 7: 32, 10: 16}


def _sdpa_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C/heads) as a view (heads are contiguous channel slices, as in the official code)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


# ----------------------------------------------------------------------------------------------------------------
# attn_impl='reference': the official formulation, kept as an oracle for the fast path and as the benchmark
# baseline. Tokens are (B, N, C); every einops rearrange of the official code is a materialised copy here; attention
# is an explicit softmax(q k^T) v; the depthwise convs get (B, N, C) <-> (B, C, H, W) round trips.

ATTN_IMPLS = ("fast", "reference")


def _check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise UserError(f"attn_impl must be 'fast' (SDPA, the default) or 'reference' (the official formulation, for "
                        f"checks and benchmarks); got {attn_impl!r}")
    return attn_impl


def _ref_split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """'b n (h c) -> b h n c' as a copy, as einops.rearrange makes it."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).permute(0, 2, 1, 3).contiguous()


def _ref_merge_heads(x: torch.Tensor) -> torch.Tensor:
    """'b h n c -> b n (h c)' as a copy."""
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).contiguous().reshape(b, n, h * d)


def _ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return attn.softmax(dim=-1) @ v


def _ref_dwconv(conv: nn.Module, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Official depthwise-conv round trip: (B, N, C) -> copy to (B, C, H, W) -> conv -> copy back to (B, N, C)."""
    B, N, C = x.shape
    x = conv(x.permute(0, 2, 1).contiguous().reshape(B, C, H, W))
    return x.reshape(B, C, N).permute(0, 2, 1).contiguous()


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """conv -> BatchNorm; in eval mode the BN is folded into the conv weights (one pass over the map, not two)."""
    if bn.training or not bn.track_running_stats:
        return bn(conv(x))
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


@register_notrace_function  # torch.fx: compares the token grid with the table's; a leaf call in traced graphs
def resize_pos_embed(pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Position table ``pos`` (1, h, w, C) resized bicubically to the token grid of ``x`` (B, H, W, C) if it differs."""
    H, W = x.shape[1], x.shape[2]
    if (H, W) != tuple(pos.shape[1:3]):
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(H, W), mode="bicubic", align_corners=False)
        pos = pos.permute(0, 2, 3, 1)
    return pos


class ConvStem(nn.Module):
    """Official ``ConvPatchEmbed``: conv7x7/2 + BN + ReLU, ``num_convs`` x (conv3x3 + BN + ReLU), conv4x4/4 (bias).

    Returns a (B, C, H/8, W/8) map. The official "corner" padding never pads for inputs that are multiples of 16
    (the only sizes the stripe attention accepts), so it is not needed here.
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 216, num_convs: int = 0, stem_chs: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_chs),
            nn.ReLU(inplace=True),
        )
        convs: List[nn.Module] = []
        for _ in range(num_convs):
            convs += [nn.Conv2d(stem_chs, stem_chs, 3, padding=1, bias=False), nn.BatchNorm2d(stem_chs),
                      nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)  # keys convs.{3k}, convs.{3k+1} as in the official module
        self.proj = nn.Conv2d(stem_chs, embed_dim, 4, stride=4)
        self.fold_bn = True  # False for attn_impl='reference' (the official conv -> BN -> ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fold_bn:
            return self.proj(self.convs(self.stem(x)))
        x = self.stem[2](_conv_bn(self.stem[0], self.stem[1], x))
        for i in range(0, len(self.convs), 3):
            x = self.convs[i + 2](_conv_bn(self.convs[i], self.convs[i + 1], x))
        return self.proj(x)


class StripeAttention(nn.Module):
    """Cross-shaped stripe attention with LePE (official ``LePEAttention`` x 2 halves + qkv/proj).

    Channel half 0 attends inside vertical stripes of H rows x ``stripe`` columns, half 1 inside horizontal stripes
    of ``stripe`` rows x W columns; each half has ``num_heads // 2`` heads. LePE is a depthwise 3x3 conv on V seen as
    each stripe's own little image (zero padding at the stripe border), added to the attention output.
    """

    def __init__(self, dim: int, num_heads: int, stripe: int = 2, qkv_bias: bool = True):
        super().__init__()
        assert dim % 2 == 0 and num_heads % 2 == 0 and (dim // 2) % (num_heads // 2) == 0, \
            f"dim {dim} must split into 2 halves of {num_heads // 2} heads"
        self.num_heads = num_heads
        self.stripe = stripe
        half = dim // 2
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.ModuleList([nn.Conv2d(half, half, 3, padding=1, groups=half) for _ in range(2)])
        self.proj = nn.Linear(dim, dim)

    def _attend(self, q, k, v, lepe: nn.Conv2d, n: int, hs: int, ws: int) -> torch.Tensor:
        """q/k/v: (n, hs*ws, half) token-major stripes -> (n, hs*ws, half)."""
        half = q.shape[-1]
        nh = self.num_heads // 2
        # LePE: V as a batch of (half, hs, ws) channels-last images.
        pe = lepe(v.reshape(n, hs, ws, half).permute(0, 3, 1, 2))
        pe = pe.permute(0, 2, 3, 1).reshape(n, hs * ws, half)
        o = sdpa(_sdpa_heads(q, nh), _sdpa_heads(k, nh), _sdpa_heads(v, nh))
        return pe + o.transpose(1, 2).reshape(n, hs * ws, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        s, half = self.stripe, C // 2
        # unbind, not indexing: its backward is one stack, where each index's backward zero-fills a full-size
        # gradient and the pieces are summed (1.10x faster stripe attention forward + backward on CPU)
        qkv0, qkv1 = self.qkv(x).view(B, H, W, 3, 2, half).unbind(4)
        # half 0, vertical stripes (H x s): one copy brings the s-wide column blocks together
        t = qkv0.view(B, H, W // s, s, 3, half).permute(4, 0, 2, 1, 3, 5)
        q, k, v = t.reshape(3, B * (W // s), H * s, half).unbind(0)
        o0 = self._attend(q, k, v, self.lepe[0], B * (W // s), H, s)
        o0 = o0.reshape(B, W // s, H, s, half).permute(0, 2, 1, 3, 4)  # (B, H, W/s, s, half) view
        # half 1, horizontal stripes (s x W): already contiguous row blocks, views only
        q, k, v = qkv1.reshape(B * (H // s), s * W, 3, half).unbind(2)
        o1 = self._attend(q, k, v, self.lepe[1], B * (H // s), s, W)
        o1 = o1.reshape(B, H, W // s, s, half)  # reshape: a view on real devices (meta strides differ)
        out = torch.cat([o0, o1], dim=-1).reshape(B, H, W, C)  # a view wherever cat gives contiguous memory
        return self.proj(out)

    def _reference_half(self, q, k, v, j: int, H: int, W: int) -> torch.Tensor:
        """Official ``LePEAttention`` (im2cswin / get_lepe / windows2img) on channel half j; q/k/v (B, N, C')."""
        B, N, C = q.shape
        nh, s = self.num_heads // 2, self.stripe
        hs, ws = (H, s) if j == 0 else (s, W)

        def to_img(t):  # tokens -> (B, C', H, W) copy
            return t.transpose(-2, -1).contiguous().view(B, C, H, W)

        def im2cswin(t):  # -> (windows, heads, hs*ws, C'/heads)
            t = to_img(t).view(B, C, H // hs, hs, W // ws, ws).permute(0, 2, 4, 3, 5, 1).contiguous()
            return t.reshape(-1, hs * ws, nh, C // nh).permute(0, 2, 1, 3).contiguous()

        q, k = im2cswin(q), im2cswin(k)
        t = to_img(v).view(B, C, H // hs, hs, W // ws, ws).permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, C, hs, ws)
        lepe = self.lepe[j](t).reshape(-1, nh, C // nh, hs * ws).permute(0, 1, 3, 2).contiguous()
        v = t.reshape(-1, nh, C // nh, hs * ws).permute(0, 1, 3, 2).contiguous()
        x = (_ref_attention(q, k, v) + lepe).transpose(1, 2).reshape(-1, hs * ws, C)
        x = x.view(B, H // hs, W // ws, hs, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, C)
        return x.view(B, N, C)

    def forward_reference(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # (B, N, C)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, C).permute(2, 0, 1, 3).contiguous()
        h = C // 2
        halves = [self._reference_half(qkv[0, ..., j * h:(j + 1) * h], qkv[1, ..., j * h:(j + 1) * h],
                                       qkv[2, ..., j * h:(j + 1) * h], j, H, W) for j in range(2)]
        return self.proj(torch.cat(halves, dim=2))


@register_notrace_module  # torch.fx: shape logic inside; a leaf module in traced graphs
class LocalBlock(nn.Module):
    """Official ``LePEAttnSimpleDWBlock``: pre-norm stripe attention, FFN, then a bias-free depthwise 3x3 conv whose
    output replaces x (no residual, norm or activation)."""

    def __init__(self, dim, num_heads, stripe=2, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, proj_drop=0.0,
                 norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = StripeAttention(dim, num_heads, stripe, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.attn_impl = "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        if self.attn_impl == "reference":
            B, H, W, C = x.shape
            return self.forward_reference(x.reshape(B, H * W, C), H, W).view(B, H, W, C)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        # the permute is a channels-last view: no copy in or out of the conv
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward_reference(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # official, (B, N, C)
        x = x + self.drop_path1(self.attn.forward_reference(self.norm1(x), H, W))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return _ref_dwconv(self.dwconv, x, H, W)


class GroupingAttention(nn.Module):
    """Official ``LightGroupAttnBlock``: q = LN(group tokens) (no projection), k = Linear(LN(x)), v = LN(x);
    no output projection and no residual (the result replaces the group tokens)."""

    def __init__(self, dim, num_heads, qkv_bias=True, norm_eps=1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_k = nn.LayerNorm(dim, eps=norm_eps)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q = _sdpa_heads(self.norm_q(tokens), self.num_heads).expand(B, -1, -1, -1)
        kin = self.norm_k(x)
        k = _sdpa_heads(self.k_proj(kin), self.num_heads)
        return _merge_heads(sdpa(q, k, _sdpa_heads(kin, self.num_heads)))

    @torch.no_grad()
    def attention_weights(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Softmax weights (B, heads, M, N): how much each group token takes from each image position."""
        B = x.shape[0]
        q = _sdpa_heads(self.norm_q(tokens), self.num_heads).expand(B, -1, -1, -1)
        k = _sdpa_heads(self.k_proj(self.norm_k(x)), self.num_heads)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)


class MixerLayer(nn.Module):
    """Official ``MLPMixerLayer``: token MLP (M -> int(0.5 C) -> M; the width follows C, not M) and channel MLP."""

    def __init__(self, num_tokens, dim, token_ratio=0.5, channel_ratio=4.0, drop_path=0.0, norm_eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.token_mlp = Mlp(num_tokens, int(token_ratio * dim), act_layer=nn.GELU)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.channel_mlp = Mlp(dim, int(channel_ratio * dim), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        g = g + self.drop_path1(self.token_mlp(self.norm1(g).transpose(1, 2)).transpose(1, 2))
        return g + self.drop_path2(self.channel_mlp(self.norm2(g)))


class UngroupingAttention(nn.Module):
    """Official ``FullAttnCatBlock``: image tokens read the groups (q/k/v/out projections; k and v both from
    LN(groups)), then Linear(2C -> C) of concat[x, attn] (no x + attn), then a pre-norm FFN residual."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, proj_drop=0.0, norm_eps=1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_k = nn.LayerNorm(dim, eps=norm_eps)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)  # official k_proj and v_proj, fused
        self.proj = nn.Linear(dim, dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fuse = nn.Linear(dim * 2, dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # x (B, N, C), g (B, M, C)
        B, M, C = g.shape
        q = _sdpa_heads(self.q(self.norm_q(x)), self.num_heads)
        kv = self.kv(self.norm_k(g)).view(B, M, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        o = _merge_heads(sdpa(q, kv[0], kv[1]))
        # official: fuse(cat[x, drop_path(proj(o))]). The half of fuse that reads the attention is folded into proj
        # (exact, as drop_path scales per sample): one (N x C x C) GEMM less and no concat.
        w_x, w_a = self.fuse.weight.split(C, dim=1)
        a = F.linear(o, w_a @ self.proj.weight, w_a @ self.proj.bias)
        z = F.linear(x, w_x, self.fuse.bias) + self.drop_path1(a)
        return z + self.drop_path2(self.mlp(self.norm2(z)))


@register_notrace_module  # torch.fx: shape logic inside; a leaf module in traced graphs
class GPBlock(nn.Module):
    """Group Propagation block: grouping -> MLP-Mixer -> ungrouping -> depthwise conv + BN + ReLU (no shortcut,
    so the output is >= 0)."""

    def __init__(self, dim, num_group_tokens, num_group_heads=6, num_ungroup_heads=6, mixer_depth=1, mlp_ratio=4.0,
                 qkv_bias=True, drop_path=0.0, proj_drop=0.0, norm_eps=1e-5):
        super().__init__()
        self.group_token = nn.Parameter(torch.zeros(1, num_group_tokens, dim))
        self.group = GroupingAttention(dim, num_group_heads, qkv_bias, norm_eps)  # official drop path: always 0
        self.mixer = nn.Sequential(*[
            MixerLayer(num_group_tokens, dim, drop_path=drop_path, norm_eps=norm_eps) for _ in range(mixer_depth)])
        self.ungroup = UngroupingAttention(dim, num_ungroup_heads, mlp_ratio, qkv_bias, drop_path, proj_drop, norm_eps)
        self.dwconv = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.attn_impl = "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        B, H, W, C = x.shape
        if self.attn_impl == "reference":
            return self.forward_reference(x.reshape(B, H * W, C), H, W).view(B, H, W, C)
        t = x.reshape(B, H * W, C)
        g = self.mixer(self.group(self.group_token, t))
        z = self.ungroup(t, g).view(B, H, W, C)
        z = _conv_bn(self.dwconv[0], self.dwconv[1], z.permute(0, 3, 1, 2))  # channels-last view, BN folded in eval
        return self.dwconv[2](z).permute(0, 2, 3, 1)

    def forward_reference(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # official, (B, N, C)
        B, N, C = x.shape
        gr, u = self.group, self.ungroup
        kin = gr.norm_k(x)
        g = _ref_attention(_ref_split_heads(gr.norm_q(self.group_token).expand(B, -1, -1), gr.num_heads),
                           _ref_split_heads(gr.k_proj(kin), gr.num_heads), _ref_split_heads(kin, gr.num_heads))
        g = self.mixer(_ref_merge_heads(g))
        qn, kn = u.norm_q(x), u.norm_k(g)
        (wk, wv), (bk, bv) = u.kv.weight.chunk(2), u.kv.bias.chunk(2)  # separate k_proj / v_proj as official
        a = _ref_attention(_ref_split_heads(u.q(qn), u.num_heads), _ref_split_heads(F.linear(kn, wk, bk), u.num_heads),
                           _ref_split_heads(F.linear(kn, wv, bv), u.num_heads))
        z = u.fuse(torch.cat([x, u.drop_path1(u.proj(_ref_merge_heads(a)))], dim=-1))
        z = z + u.drop_path2(u.mlp(u.norm2(z)))
        return _ref_dwconv(self.dwconv, z, H, W)

    def group_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Grouping attention weights (B, heads, M, H, W) for the block input x (B, H, W, C)."""
        B, H, W, C = x.shape
        a = self.group.attention_weights(self.group_token, x.reshape(B, H * W, C))
        return a.view(*a.shape[:3], H, W)


@register_notrace_module  # torch.fx: shape logic inside; a leaf module in traced graphs
class AttentionPoolNeck(nn.Module):
    """Official ``GroupNeck``: one learnable, zero-initialised query (LN eps 1e-5, no projection) attends over the
    final-normed tokens; k = Linear(x) without bias, v = x, no output projection."""

    def __init__(self, dim, num_heads=6, norm_eps=1e-5, init_std=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        if init_std > 0:  # the official query starts at 0 (then k_proj gets no gradient in the first step)
            trunc_normal_(self.token, std=init_std)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.attn_impl = "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, C)
        B, N, C = x.shape
        if self.attn_impl == "reference":
            q = _ref_split_heads(self.norm(self.token).expand(B, -1, -1), self.num_heads)
            return _ref_merge_heads(_ref_attention(q, _ref_split_heads(self.k_proj(x), self.num_heads),
                                                   _ref_split_heads(x, self.num_heads))).reshape(B, C)
        q = _sdpa_heads(self.norm(self.token), self.num_heads).expand(B, -1, -1, -1)
        o = sdpa(q, _sdpa_heads(self.k_proj(x), self.num_heads), _sdpa_heads(x, self.num_heads))
        return o.reshape(B, C)


@accepts_factory_kwargs
class GPViT(nn.Module):
    """GPViT classifier / backbone.

    Args:
        img_size: training input size; fixes the position-embedding grid (img_size / 8). Other inputs whose sides
            are multiples of 16 work: the embedding is resized bicubically on every forward, as the official code does.
        embed_dim, depth, num_heads: width, number of layers, local-block heads (half of them per stripe direction).
        group_layers: {layer index: number of group tokens} of the GP blocks (JSON string keys accepted).
        stem_convs: extra 3x3 convs in the stem (0/1/1/2 for L1..L4).
        global_pool: 'attn' (GroupNeck, L1/L2), 'avg' (L3/L4) or '' (no pooling).
        neck_init_std: trunc-normal std of the attention-pool query (official: 0, a zero query).
        out_norms: layer indices whose returned feature map gets its own LayerNorm (the official ``out_indices``
            other than the last layer, e.g. (2, 5, 8) for segmentation).
        drop_rate: dropout before the classifier (timm convention; the official models use 0).
        attn_impl: 'fast' (default: SDPA, (B, H, W, C) layout, views instead of copies) or 'reference' (the official
            formulation: (B, N, C) tokens, einops-style copies, explicit softmax(q k^T) v; an oracle and benchmark
            baseline). Same parameters and state dict; switch later with :meth:`set_attn_impl`.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "attn",
            embed_dim: int = 216,
            depth: int = 12,
            num_heads: int = 12,
            stripe_width: int = 2,
            group_layers: Optional[Dict[int, int]] = None,
            num_group_heads: int = 6,
            num_ungroup_heads: int = 6,
            mixer_depth: int = 1,
            mlp_ratio: float = 4.0,
            stem_convs: int = 0,
            qkv_bias: bool = True,
            neck_heads: int = 6,
            neck_init_std: float = 0.0,
            norm_eps: float = 1e-6,
            gp_norm_eps: float = 1e-5,
            final_norm: bool = True,
            out_norms: Sequence[int] = (),
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            attn_impl: str = "fast",
    ):
        super().__init__()
        _check_attn_impl(attn_impl)
        assert global_pool in ("attn", "avg", ""), f"global_pool must be 'attn', 'avg' or '', got {global_pool!r}"
        group_layers = DEFAULT_GROUP_LAYERS if group_layers is None else group_layers
        self.group_layers = {int(k): int(v) for k, v in group_layers.items()}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.neck_heads = neck_heads
        self.neck_init_std = neck_init_std
        self.gp_norm_eps = gp_norm_eps
        self.stripe_width = stripe_width
        self.grad_checkpointing = False
        img_size = to_2tuple(img_size)
        self.pos_grid = (img_size[0] // 8, img_size[1] // 8)

        self.patch_embed = ConvStem(in_chans, embed_dim, stem_convs)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # = linspace(0, rate, depth), device-free
        blocks: List[nn.Module] = []
        for i in range(depth):
            if i in self.group_layers:
                blocks.append(GPBlock(embed_dim, self.group_layers[i], num_group_heads, num_ungroup_heads, mixer_depth,
                                      mlp_ratio, qkv_bias, dpr[i], proj_drop_rate, gp_norm_eps))
            else:
                blocks.append(LocalBlock(embed_dim, num_heads, stripe_width, mlp_ratio, qkv_bias, dpr[i],
                                         proj_drop_rate, norm_eps))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm else nn.Identity()
        out_norms = feature_take_indices(depth, list(out_norms))[0] if len(out_norms) else []
        self.out_norms = nn.ModuleDict(
            {str(i): nn.LayerNorm(embed_dim, eps=norm_eps) for i in out_norms if i != depth - 1})
        self._last_index = depth - 1
        self.feature_info = [dict(num_chs=embed_dim, reduction=8, module=f"blocks.{i}") for i in range(depth)]

        self.neck = (AttentionPoolNeck(embed_dim, neck_heads, gp_norm_eps, neck_init_std) if global_pool == "attn"
                     else nn.Identity())
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        self.set_attn_impl(attn_impl)

    def set_attn_impl(self, attn_impl: str) -> "GPViT":
        """Switch every block and the neck between 'fast' and 'reference' (see the class docstring)."""
        self.attn_impl = _check_attn_impl(attn_impl)
        self.patch_embed.fold_bn = attn_impl == "fast"
        for m in self.modules():
            if isinstance(m, (LocalBlock, GPBlock, AttentionPoolNeck)):
                m.attn_impl = attn_impl
        return self

    # ------------------------------------------------------------------------------------------------------------
    def init_weights(self):
        # official init: every Linear trunc-normal(0.02)/bias 0, LN 1/0, pos_embed and group tokens trunc-normal(0.02),
        # the neck query stays 0, the classifier N(0, 0.01); convs and BNs keep PyTorch defaults.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        for blk in self.blocks:
            if isinstance(blk, GPBlock):
                trunc_normal_(blk.group_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        # official recipe: pos_embed and all group tokens (GP blocks and the neck query) get no weight decay
        names = {"pos_embed"} | {n for n, _ in self.named_parameters() if n.endswith("group_token")}
        if isinstance(self.neck, AttentionPoolNeck):
            names.add("neck.token")
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm|^out_norms", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        dd = factory_kwargs_of(self)
        if global_pool is not None and global_pool != self.global_pool:
            assert global_pool in ("attn", "avg", ""), f"global_pool must be 'attn', 'avg' or '', got {global_pool!r}"
            self.global_pool = global_pool
            with factory_context(**dd):
                self.neck = (AttentionPoolNeck(self.embed_dim, self.neck_heads, self.gp_norm_eps, self.neck_init_std)
                             if global_pool == "attn" else nn.Identity())
            self.set_attn_impl(self.attn_impl)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.train(self.training)  # new modules follow the model's mode

    # ------------------------------------------------------------------------------------------------------------
    def check_input_size(self, H: int, W: int) -> None:
        if is_tracing():  # torch.fx: H and W are symbolic
            return
        if H % 16 or W % 16 or H == 0 or W == 0:
            def near(v):
                lo = max(16, v // 16 * 16)
                return f"{lo}" if lo == v else f"{lo} or {lo + 16}"
            raise UserError(
                f"GPViT takes inputs whose height and width are multiples of 16 (stride-8 tokens cut into stripes of "
                f"{self.stripe_width}), e.g. 224x224, 256x256 or 512x640; got {H}x{W}. Resize or pad to height "
                f"{near(H)} and width {near(W)}.")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add the position embedding to x (B, H, W, C), resized bicubically when the token grid differs."""
        pos = self.pos_embed.view(1, self.pos_grid[0], self.pos_grid[1], -1)
        return self.pos_drop((x + resize_pos_embed(pos, x)).contiguous())

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/8, W/8, C) tokens after the stem and the (resized) position embedding; public for
        wrappers that run the blocks themselves (the dense GPViT adapter)."""
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self._pos_embed(self.patch_embed(x).permute(0, 2, 3, 1))

    def run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> final-normed (B, C, H/8, W/8) map (a permuted view of the internal (B, H, W, C) tokens)."""
        x = self.embed_tokens(x)
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.norm(x).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "attn":
            x = self.neck(x.permute(0, 2, 3, 1).flatten(1, 2))
        elif self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------------------------------------
    def _feature(self, i: int, x: torch.Tensor, norm: bool) -> torch.Tensor:
        if str(i) in self.out_norms:
            return self.out_norms[str(i)](x)
        if i == self._last_index or norm:  # the last layer's map is returned after the final norm (official)
            return self.norm(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Stride-8 maps after the chosen layers. A layer with an entry in ``out_norms`` gets its own LayerNorm, the
        last layer gets the final norm (official ``out_indices`` semantics); others are raw unless ``norm``."""
        assert output_fmt in ("NCHW", "NHWC"), "output_fmt must be NCHW or NHWC"
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.embed_tokens(x)
        blocks = self.blocks[:max_index + 1] if stop_early or intermediates_only else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self.run_block(blk, x)
            if i in take_indices:
                f = self._feature(i, x, norm)
                intermediates.append(f.permute(0, 3, 1, 2) if output_fmt == "NCHW" else f)
        if intermediates_only:
            return intermediates
        return self.norm(x).permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm and self._last_index not in take_indices:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    @torch.no_grad()
    def group_attention(self, x: torch.Tensor, layers: Optional[Sequence[int]] = None) -> Dict[int, torch.Tensor]:
        """Grouping attention of GP blocks for an image batch: {layer: (B, heads, M, H/8, W/8)} softmax weights over
        the image positions, for every GP block in ``layers`` (default: all)."""
        gp = [i for i, b in enumerate(self.blocks) if isinstance(b, GPBlock)]
        layers = gp if layers is None else list(layers)
        bad = [i for i in layers if i not in gp]
        if bad:
            raise UserError(f"layer(s) {bad} are not GP blocks; this model's GP blocks are at layers "
                            f"{', '.join(map(str, gp))}.")
        out = {}
        x = self.embed_tokens(x)
        for i, blk in enumerate(self.blocks[:max(layers) + 1]):
            if i in layers:
                out[i] = blk.group_attention(x)
            x = blk(x)
        return out


# ----------------------------------------------------------------------------------------------------------------
# official checkpoints -> ours

_LOCAL_MAP = [
    (r"qkv\.", "attn.qkv."), (r"proj\.", "attn.proj."), (r"attns\.(\d)\.get_v\.", r"attn.lepe.\1."),
    (r"ffn\.layers\.0\.0\.", "mlp.fc1."), (r"ffn\.layers\.1\.", "mlp.fc2."), (r"dw\.", "dwconv."),
]
_GP_MAP = [
    (r"group_layer\.norm_query\.", "group.norm_q."), (r"group_layer\.norm_key\.", "group.norm_k."),
    (r"group_layer\.attn\.k_proj\.", "group.k_proj."),
    (r"mixer\.layers\.(\d+)\.patch_mixer\.0\.", r"mixer.\1.token_mlp.fc1."),
    (r"mixer\.layers\.(\d+)\.patch_mixer\.3\.", r"mixer.\1.token_mlp.fc2."),
    (r"mixer\.layers\.(\d+)\.channel_mixer\.0\.", r"mixer.\1.channel_mlp.fc1."),
    (r"mixer\.layers\.(\d+)\.channel_mixer\.3\.", r"mixer.\1.channel_mlp.fc2."),
    (r"mixer\.layers\.(\d+)\.norm", r"mixer.\1.norm"),
    (r"un_group_layer\.norm_query\.", "ungroup.norm_q."), (r"un_group_layer\.norm_key\.", "ungroup.norm_k."),
    (r"un_group_layer\.attn\.q_proj\.", "ungroup.q."), (r"un_group_layer\.attn\.proj\.", "ungroup.proj."),
    (r"un_group_layer\.proj\.", "ungroup.fuse."), (r"un_group_layer\.norm2\.", "ungroup.norm2."),
    (r"un_group_layer\.ffn\.layers\.0\.0\.", "ungroup.mlp.fc1."), (r"un_group_layer\.ffn\.layers\.1\.", "ungroup.mlp.fc2."),
]
_TOP_MAP = [
    (r"^backbone\.", ""), (r"^patch_embed\.projection\.", "patch_embed.proj."), (r"^ln1\.", "norm."),
    (r"^norm(\d+)\.", r"out_norms.\1."), (r"^neck\.group_token$", "neck.token"), (r"^neck\.norm_query\.", "neck.norm."),
    (r"^neck\.attn\.k_proj\.", "neck.k_proj."), (r"^head\.fc\.", "head."),
]


def _convert_layer_key(rest: str, is_gp: bool) -> str:
    for pat, rep in (_GP_MAP if is_gp else _LOCAL_MAP):
        new, n = re.subn("^" + pat, rep, rest)
        if n:
            return new
    return rest


def _is_official(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("backbone.", "layers.", "ln1.", "patch_embed.projection.")) for k in state_dict)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: GPViT) -> Dict[str, torch.Tensor]:
    """Official mmcls GPViT checkpoint (classifier with ``backbone.``/``neck.``/``head.`` prefixes, or a bare
    backbone state dict, possibly wrapped in ``state_dict``/``state_dict_ema`` with ``module.`` prefixes) -> ours.
    Our own state dicts pass through unchanged (apart from the adjustments below).

    Adjustments for the target model: a position embedding of another grid is resized bicubically; neck/head
    weights are dropped when the model has no neck/classifier; ``out_norms`` the checkpoint lacks (a classification
    checkpoint loaded into a dense-prediction backbone) start as identity LayerNorms, as the official ones do.
    """
    state_dict = unwrap_state_dict(state_dict, ("state_dict", "state_dict_ema", "model"))

    if _is_official(state_dict):
        gp_layers = {int(m.group(1)) for k in state_dict
                     if (m := re.match(r"^(?:backbone\.)?layers\.(\d+)\.group_token$", k))}
        out: Dict[str, torch.Tensor] = {}
        kv: Dict[str, Dict[str, torch.Tensor]] = {}
        for k, v in state_dict.items():
            for pat, rep in _TOP_MAP:
                k = re.sub(pat, rep, k)
            m = re.match(r"^layers\.(\d+)\.(.*)$", k)
            if m:
                i, rest = int(m.group(1)), m.group(2)
                km = re.match(r"^un_group_layer\.attn\.([kv])_proj\.(weight|bias)$", rest)
                if i in gp_layers and km:  # k_proj and v_proj become one fused kv Linear
                    kv.setdefault(f"blocks.{i}.ungroup.kv.{km.group(2)}", {})[km.group(1)] = v
                    continue
                k = f"blocks.{i}.{_convert_layer_key(rest, i in gp_layers)}"
            out[k] = v
        for k, parts in kv.items():
            out[k] = torch.cat([parts["k"], parts["v"]], dim=0)
        state_dict = out
    else:
        state_dict = dict(state_dict)

    own = model.state_dict()
    pos = state_dict.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape and pos.device.type != "meta":
        C = pos.shape[-1]
        old = int(math.isqrt(pos.shape[1]))
        assert old * old == pos.shape[1], "cannot infer the grid of a non-square checkpoint position embedding"
        new = getattr(model, "pos_grid", None)
        p = F.interpolate(pos.reshape(1, old, old, C).permute(0, 3, 1, 2).float(), size=new, mode="bicubic",
                          align_corners=False)
        state_dict["pos_embed"] = p.permute(0, 2, 3, 1).reshape(1, -1, C).to(pos.dtype)
    if not any(k.startswith("neck.") for k in own):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("neck.")}
    if not any(k.startswith("head.") for k in own):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    for k, v in own.items():  # identity init for extra out norms the checkpoint does not have
        if k.startswith("out_norms.") and k not in state_dict:
            ref = next(iter(state_dict.values()))
            state_dict[k] = (torch.ones if k.endswith("weight") else torch.zeros)(v.shape, device=ref.device)
    return state_dict


# ----------------------------------------------------------------------------------------------------------------
# builders

def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (28, 28),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),  # = mmcls (123.675, ...)/255
        "first_conv": "patch_embed.stem.0", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2212.06795", "paper_name": "GPViT: A High Resolution Non-Hierarchical Vision Transformer "
        "with Group Propagation", "origin_url": "https://github.com/ChenhongyiYang/GPViT", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "gpvit_l1.in1k": _cfg(),
    "gpvit_l2.in1k": _cfg(),
    "gpvit_l3.in1k": _cfg(),
    "gpvit_l4.in1k": _cfg(),
    "gpvit_test.untrained": _cfg(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
})


def _create_gpvit(variant: str, pretrained: bool = False, **kwargs) -> GPViT:
    depth = kwargs.get("depth", 12)
    default_out = tuple(i for i in (2, 5, 8, 11) if i < depth) if depth == 12 else tuple(range(depth))
    if kwargs.get("features_only"):
        # the official out_indices also give the model its extra per-layer norms
        out = kwargs.setdefault("out_indices", default_out)
        idx = feature_take_indices(depth, out)[0]
        kwargs.setdefault("out_norms", tuple(i for i in idx if i != depth - 1))
    return build_model_with_cfg(
        GPViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=default_out),
        **kwargs,
    )


def _arch(embed_dim, stem_convs, global_pool, **kwargs):
    return dict(embed_dim=embed_dim, stem_convs=stem_convs, global_pool=global_pool, depth=12, num_heads=12,
                group_layers=DEFAULT_GROUP_LAYERS, **kwargs)


@register_model
def gpvit_l1(pretrained: bool = False, **kwargs) -> GPViT:
    """GPViT-L1: C=216, 9.59M params with GroupNeck + head (9.33M backbone)."""
    return _create_gpvit("gpvit_l1", pretrained, **dict(_arch(216, 0, "attn"), **kwargs))


@register_model
def gpvit_l2(pretrained: bool = False, **kwargs) -> GPViT:
    """GPViT-L2: C=348, 24.16M params with GroupNeck + head (23.69M backbone)."""
    return _create_gpvit("gpvit_l2", pretrained, **dict(_arch(348, 1, "attn"), **kwargs))


@register_model
def gpvit_l3(pretrained: bool = False, **kwargs) -> GPViT:
    """GPViT-L3: C=432, 36.65M params with average pooling + head (36.22M backbone)."""
    return _create_gpvit("gpvit_l3", pretrained, **dict(_arch(432, 1, "avg"), **kwargs))


@register_model
def gpvit_l4(pretrained: bool = False, **kwargs) -> GPViT:
    """GPViT-L4: C=624, 75.48M params with average pooling + head (74.86M backbone)."""
    return _create_gpvit("gpvit_l4", pretrained, **dict(_arch(624, 2, "avg"), **kwargs))


@register_model
def gpvit_test(pretrained: bool = False, **kwargs) -> GPViT:
    """Tiny GPViT for tests and CPU smoke runs: C=24, local / GP (8 tokens) / local, GroupNeck, 32x32 input."""
    args = dict(img_size=32, embed_dim=24, depth=3, num_heads=4, group_layers={1: 8}, num_group_heads=2,
                num_ungroup_heads=3, mlp_ratio=2.0, stem_convs=0, global_pool="attn", neck_heads=6,
                neck_init_std=0.02)  # non-zero neck query so that every parameter gets a gradient at step 0
    return _create_gpvit("gpvit_test", pretrained, **dict(args, **kwargs))
