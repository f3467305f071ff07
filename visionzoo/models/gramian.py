"""GA: Gramian attention heads (Ryu et al., ICCV 2023) on ConvNeXt, CSWin and other backbones.

Pipeline (spec ga.md section 1): backbone stages F1..F4 (+ some stage-3 block outputs) are resampled to the
stride-16 grid and concatenated; a "stage 5" block fuses them into X (B, D, h, w); K independent heads each
  contract X to g channels (+ one ConvNeXt/CSWin block), build the Gram matrix of those g channels, vectorise its
  upper triangle, embed it (grouped 1x1 conv + BN) into a class token, and read X with one class-attention block
  (CaiT-style; the Gram token is the only query), then a Linear classifier.
Train mode returns the per-head logits stacked as a tensor (K, B, C); eval mode returns their sum (B, C), as the
official validate() does. ``GALoss`` is the official objective (per-head BCE + lam * decorrelation term).

Speed: the K heads are computed together (spec section 6): one grouped conv for the K contractions, batched
matmuls for the gram layers (LayerNorm affine and layer scale folded into the MLP weights), one bmm for the K Gram
matrices, batched matmuls for the embeddings, and a class attention whose key/value projections of the shared
tokens are folded into the (single) query and the output (see ``GramianHeads.class_tokens``). Parameters are
therefore stored stacked over heads; ``checkpoint_filter_fn`` stacks the official per-head tensors.
``head_impl='reference'`` runs the same parameters one head after the other, as the official code (the tests'
oracle and the speed baseline).
"""
from __future__ import annotations

import contextlib
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, LayerNorm2d, create_attn, drop_path, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.convnext import ConvNeXtStage
from torch import nn

from ..errors import UserError
from ._attention import Attention, sdpa
from ._registry import accepts_factory_kwargs, factory_context, factory_kwargs_of, is_tracing, unwrap_state_dict
from .cswin import CSWinBlock, CSWinTransformer, channel_shuffle, linspace

__all__ = ["GramianNet", "GramianHeads", "GALoss", "checkpoint_filter_fn", "stage3_capture_blocks"]


def _check_global_pool(global_pool: str) -> str:
    """'token' (default) / 'avg': the class-attention heads pool; '': no pooling (forward returns the map)."""
    if global_pool not in ('', 'avg', 'token'):
        raise UserError(f"GA models pool with class attention; global_pool={global_pool!r} is not supported "
                        "(use 'token', or '' for the unpooled map).")
    return global_pool


def _no_autocast(x: torch.Tensor):
    """Autocast off for the block (fp32/fp64 math); nothing to switch off on the meta device."""
    if x.device.type == 'meta':
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def stage3_capture_blocks(depth: int, n: int) -> List[int]:
    """1-based block indices of stage 3 whose outputs are fused: j % (depth // (n + 1)) == 0, at most n."""
    if n == 0:
        return []
    step = depth // (n + 1)
    if step < 1:
        raise UserError(f"stage3_naggre={n} needs a stage-3 depth of at least {n + 1} (got {depth}).")
    return [j for j in range(1, depth + 1) if j % step == 0][:n]


# ------------------------------------------------------------------------------------------------------------
# trunks: stage maps (NCHW) at strides 4/8/16/32 plus the captured stage-3 block outputs

class ConvNeXtTrunk(nn.Module):
    """ConvNeXt stem + 4 stages (timm blocks, official key names ``stem.*`` / ``stages.i.*``)."""

    def __init__(self, in_chans: int = 3, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 ls_init_value: float = 1e-6, drop_path_rates: Optional[List[List[float]]] = None, patch_size: int = 4):
        super().__init__()
        norm2d = partial(LayerNorm2d, eps=1e-6)
        norm_cl = partial(LayerNorm, eps=1e-6)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], patch_size, patch_size), norm2d(dims[0]))
        dpr = drop_path_rates or [[0.] * d for d in depths]
        self.stages = nn.Sequential(*[ConvNeXtStage(
            dims[max(i - 1, 0)], dims[i], stride=2 if i > 0 else 1, depth=depths[i], drop_path_rates=dpr[i],
            ls_init_value=ls_init_value, norm_layer=norm2d, norm_layer_cl=norm_cl) for i in range(4)])
        self.dims = list(dims)
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"trunk.stages.{i}") for i in range(4)]
        self.grad_checkpointing = False

    def size_step(self) -> int:
        return 32

    def forward_stages(self, x: torch.Tensor, capture: Sequence[int] = (), capture_stage: int = 2, stop: int = 3):
        x = self.stem(x)
        outs, caught = [], []
        for i in range(stop + 1):
            stage = self.stages[i]
            x = stage.downsample(x)
            for j, blk in enumerate(stage.blocks):
                if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
                if i == capture_stage and j + 1 in capture:
                    caught.append(x)
            outs.append(x)
        return outs, caught


class CSWinTrunk(CSWinTransformer):
    """The CSWin trunk without final norm and classifier; stage maps returned as NCHW."""

    def __init__(self, **kwargs):
        super().__init__(num_classes=0, final_norm=False, **kwargs)
        del self.norm, self.head, self.head_drop
        for info in self.feature_info:
            info["module"] = "trunk." + info["module"]

    def forward_stages(self, x, capture=(), capture_stage=2, stop=3):
        outs, caught = super().forward_stages(x, capture, capture_stage, stop)
        return [self._tokens_to_map(t, H, W) for t, H, W in outs], caught


class ResNetTrunk(nn.Module):
    """A timm ResNet without its classifier (any ``timm.models.resnet.ResNet`` kwargs: layers, channels,
    block_args, stem_type, ...); layer3 block outputs can be captured like ConvNeXt's stage 3."""

    def __init__(self, in_chans: int = 3, drop_path_rate: float = 0., **kwargs):
        super().__init__()
        from timm.models.resnet import Bottleneck, ResNet
        kwargs.setdefault('block', Bottleneck)
        self.model = ResNet(in_chans=in_chans, num_classes=0, global_pool='', drop_path_rate=drop_path_rate, **kwargs)
        self.dims = [f['num_chs'] for f in self.model.feature_info[1:]]
        self.feature_info = [dict(f, module='trunk.model.' + f['module']) for f in self.model.feature_info[1:]]
        self.grad_checkpointing = False

    def size_step(self) -> int:
        return 32

    def forward_stages(self, x, capture=(), capture_stage=2, stop=3):
        m = self.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        outs, caught = [], []
        for i in range(stop + 1):
            for j, blk in enumerate(getattr(m, f"layer{i + 1}")):
                x = blk(x)
                if i == capture_stage and j + 1 in capture:
                    caught.append(x)
            outs.append(x)
        return outs, caught


@register_notrace_module  # torch.fx: timm ViT with dynamic_img_size; a leaf module in traced graphs
class ViTTrunk(nn.Module):
    """A timm VisionTransformer without its classifier: the final (normed) patch tokens as one stride-16 map."""

    def __init__(self, model_name: str = 'vit_small_patch16_224', in_chans: int = 3, img_size: int = 224,
                 drop_path_rate: float = 0., **kwargs):
        super().__init__()
        import timm
        kwargs.setdefault('attn_layer', Attention)  # timm's, with the CPU bf16 rule of models/_attention.py
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans,
                                       img_size=img_size, drop_path_rate=drop_path_rate, dynamic_img_size=True, **kwargs)
        self.patch = self.model.patch_embed.patch_size[0]
        self.dims = [self.model.num_features]
        # features_only / forward_intermediates: every block's stride-16 map, as timm's ViT (default: the last 3)
        self.feature_info = [dict(num_chs=self.model.embed_dim, reduction=self.patch, module=f'trunk.model.blocks.{i}')
                             for i in range(len(self.model.blocks))]
        self.grad_checkpointing = False

    def size_step(self) -> int:
        return self.patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The GA input: the final normed tokens as one stride-16 map (B, C, H/16, W/16)."""
        return self.model.forward_intermediates(x, indices=1, norm=True, output_fmt='NCHW',
                                                intermediates_only=True)[0]

    def forward_stages(self, x, capture=(), capture_stage=2, stop=0):
        """[forward(x)], [] (``stop`` does not apply)."""
        return [self(x)], []

    def forward_intermediates(self, x, take: List[int], norm: bool, stop_early: bool, intermediates_only: bool):
        """Block maps ``take`` (timm ViT's forward_intermediates) and, unless ``intermediates_only``, the final
        normed map of :meth:`forward_stages` from the same pass."""
        out = self.model.forward_intermediates(x, indices=take, norm=norm, output_fmt='NCHW',
                                               stop_early=stop_early, intermediates_only=intermediates_only)
        if intermediates_only:
            return out
        tokens, inter = out
        B, _, H, W = x.shape
        npt = self.model.num_prefix_tokens
        final = tokens[:, npt:].transpose(1, 2).reshape(B, tokens.shape[-1], H // self.patch, W // self.patch)
        return final, inter


# ------------------------------------------------------------------------------------------------------------
# stage 5: fuse the concatenated multi-scale map

class SEBottleneckFusion(nn.Module):
    """ResNet SE-bottleneck at stride 1 (GA-ConvNeXt stage 5); official names conv1/bn1/.../downsample."""

    def __init__(self, in_chs: int, out_chs: int, drop_path: float = 0.):
        super().__init__()
        width = out_chs // 4
        self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1), nn.BatchNorm2d(out_chs))
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.se = create_attn('se', width, rd_ratio=1. / 4)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.se(y)))
        return F.relu(self.drop_path(y) + self.downsample(x))


class CSWinFusion(nn.Module):
    """Conv1x1 + LayerNorm, then one CSWin block (GA-CSWin stage 5)."""

    def __init__(self, in_chs: int, out_chs: int, num_heads: int, reso: int, split_size: int, mlp_ratio: float = 4.,
                 mlp_groups: int = 1, qkv_bias: bool = True, drop_path: float = 0.):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1)
        self.norm = nn.LayerNorm(out_chs)
        self.block = CSWinBlock(out_chs, num_heads, reso, split_size, mlp_ratio, qkv_bias=qkv_bias,
                                drop_path=drop_path, last_stage=(split_size >= reso), mlp_groups=mlp_groups)

    def forward(self, x):
        x = self.conv(x)
        B, C, H, W = x.shape
        t = self.block(self.norm(x.flatten(2).transpose(1, 2)), H, W)
        return t.transpose(1, 2).reshape(B, C, H, W)


# ------------------------------------------------------------------------------------------------------------
# the K heads, stacked

class _FewRowsMatmul(torch.autograd.Function):
    """W (n, out, in) @ x(n, M, in)^T -> (n, out, M), for few rows M and large weights (the Gram embedding is
    8M entries, the classifiers 3.4M). Plain autograd of this product is slow on CPU both ways round: as
    x @ W^T the weight gradient comes out transposed and AccumulateGrad copies it into the weight's layout;
    as W @ x^T the input gradient is W^T @ g, a GEMM orientation that runs ~5x slower than (g^T @ W).
    This backward computes both gradients as g @ x and g^T @ W: each in its operand's own layout."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, x)
        return torch.bmm(w, x.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, x = ctx.saved_tensors
        # under autocast the forward ran in the low precision (g's dtype); the engine casts the grads back
        gw = torch.bmm(g, x.to(g.dtype)) if ctx.needs_input_grad[0] else None
        gx = torch.bmm(g.transpose(1, 2), w.to(g.dtype)) if ctx.needs_input_grad[1] else None
        return gw, gx


class StackedLinear(nn.Module):
    """K independent (optionally grouped) linear maps applied to (K, M, in) -> (K, M, out) with one bmm.

    weight (K, out, in/groups) is the official per-head (grouped 1x1 conv / Linear) weight stacked over heads:
    output channels [i*out/G, (i+1)*out/G) read input channels [i*in/G, (i+1)*in/G).
    """

    def __init__(self, n: int, in_features: int, out_features: int, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise UserError(f"grouped linear {in_features}->{out_features}: both must be divisible by {groups} groups.")
        self.n, self.in_features, self.out_features, self.groups = n, in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features // groups))
        self.bias = nn.Parameter(torch.zeros(n, out_features)) if bias else None
        trunc_normal_(self.weight, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, M, G = x.shape[0], x.shape[1], self.groups
        # few rows (class tokens): see _FewRowsMatmul. An export takes the general path: M is the batch size there,
        # and a branch on it would fix the exported batch (both paths compute the same product)
        if not torch.compiler.is_exporting() and M < self.in_features // G:
            xg = x if G == 1 else x.reshape(n, M, G, -1).transpose(1, 2).reshape(n * G, M, -1)
            y = _FewRowsMatmul.apply(self.weight.reshape(n * G, self.out_features // G, -1), xg)
            if self.bias is not None:
                y = y + self.bias.reshape(n * G, -1, 1)
            return y.reshape(n, self.out_features, M).transpose(1, 2)
        if G == 1:
            w = self.weight.transpose(1, 2)
            return torch.baddbmm(self.bias.unsqueeze(1), x, w) if self.bias is not None else torch.bmm(x, w)
        xg = x.reshape(n, M, G, -1).permute(0, 2, 1, 3).reshape(n * G, M, -1)
        wg = self.weight.reshape(n * G, self.out_features // G, -1).transpose(1, 2)
        y = torch.bmm(xg, wg).reshape(n, G, M, -1).permute(0, 2, 1, 3).reshape(n, M, self.out_features)
        return y + self.bias.unsqueeze(1) if self.bias is not None else y

    def extra_repr(self):
        return f"n={self.n}, in={self.in_features}, out={self.out_features}, groups={self.groups}"


class StackedLayerNorm(nn.Module):
    """K LayerNorms over the last dim with per-head affine; x is (K, ..., C)."""

    def __init__(self, n: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n, dim))
        self.bias = nn.Parameter(torch.zeros(n, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


def _drop_path_heads(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """DropPath with an independent draw per (head, sample); x is (K, B, ...)."""
    if p == 0. or not training:
        return x
    keep = 1 - p
    mask = x.new_empty(x.shape[:2] + (1,) * (x.dim() - 2)).bernoulli_(keep)
    return x * mask / keep


class StackedConvNeXtBlock(nn.Module):
    """K ConvNeXt blocks at width g, one per head; x is (B, K*g, H, W), head-major channels."""

    def __init__(self, n: int, dim: int, ls_init_value: float = 1e-6, drop_path: float = 0.):
        super().__init__()
        self.n, self.dim, self.drop_path = n, dim, drop_path
        self.conv_dw = nn.Conv2d(n * dim, n * dim, 7, padding=3, groups=n * dim)
        self.norm = StackedLayerNorm(n, dim, eps=1e-6)
        self.fc1 = StackedLinear(n, dim, 4 * dim)
        self.fc2 = StackedLinear(n, 4 * dim, dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(n, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        K, g = self.n, self.dim
        y = self.conv_dw(x).reshape(B, K, g, H * W).permute(1, 0, 3, 2).reshape(K, B * H * W, g)
        y = F.layer_norm(y, (g,), eps=self.norm.eps)
        # head k's LN affine is folded into its fc1 and its layer scale into its fc2 (exact; saves three
        # elementwise passes over the activations, forward and backward)
        w1 = self.fc1.weight * self.norm.weight.unsqueeze(1)  # (K, 4g, g)
        b1 = self.fc1.bias + torch.bmm(self.fc1.weight, self.norm.bias.unsqueeze(2)).squeeze(2)
        y = F.gelu(torch.baddbmm(b1.unsqueeze(1), y, w1.transpose(1, 2)))
        w2 = self.fc2.weight * self.gamma.unsqueeze(2)  # (K, g, 4g)
        y = torch.baddbmm((self.fc2.bias * self.gamma).unsqueeze(1), y, w2.transpose(1, 2))
        y = _drop_path_heads(y.reshape(K, B, H * W, g), self.drop_path, self.training)
        return (x.reshape(B, K, g, H * W) + y.permute(1, 0, 3, 2)).reshape(B, K * g, H, W)

    def forward_one(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Head k's block alone on (B, g, H, W), written like timm's ConvNeXtBlock (the per-head reference)."""
        g = self.dim
        sl = slice(k * g, (k + 1) * g)
        y = F.conv2d(x, self.conv_dw.weight[sl], self.conv_dw.bias[sl], padding=3, groups=g).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (g,), self.norm.weight[k], self.norm.bias[k], self.norm.eps)
        y = F.linear(F.gelu(F.linear(y, self.fc1.weight[k], self.fc1.bias[k])), self.fc2.weight[k], self.fc2.bias[k])
        return x + drop_path((y * self.gamma[k]).permute(0, 3, 1, 2), self.drop_path, self.training)


class PerHeadCSWinBlocks(nn.Module):
    """K CSWin blocks at width g (GA-CSWin's gram layer). Run one after the other: the window attention
    with per-window LePE convs has no cheap stacked form."""

    def __init__(self, n: int, dim: int, **block_kwargs):
        super().__init__()
        self.n, self.dim = n, dim
        self.blocks = nn.ModuleList([CSWinBlock(dim, **block_kwargs) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        xs = x.reshape(B, self.n, self.dim, H * W).transpose(2, 3)
        out = [blk(xs[:, k], H, W) for k, blk in enumerate(self.blocks)]
        return torch.stack(out, 1).transpose(2, 3).reshape(B, self.n * self.dim, H, W)

    def forward_one(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Head k's block alone on (B, g, H, W)."""
        B, g, H, W = x.shape
        return self.blocks[k](x.flatten(2).transpose(1, 2), H, W).transpose(1, 2).reshape(B, g, H, W)


@register_notrace_module  # torch.fx: shape logic and autocast control; a leaf module in traced graphs
class GramianHeads(nn.Module):
    """K Gramian-attention heads on a fused map X (B, D, h, w), computed together.

    Returns (K, B, num_classes) logits, or (K, B, D) class tokens with ``pre_logits`` / ``num_classes=0``.
    """

    def __init__(self, dim: int, num_classes: int, num_branches: int = 5, gram_dim: int = 192,
                 attn_dim: Optional[int] = None, attn_heads: int = 8, contraction_groups: int = 1,
                 embed_groups: int = 8, mlp_groups: int = 4, gram_layer: Optional[str] = 'convnext',
                 gram_layer_args: Optional[dict] = None, ca_init_value: float = 1e-4, drop_path: float = 0.,
                 gram_precision: str = 'fp32', head_impl: str = 'batched'):
        super().__init__()
        K, D, g = num_branches, dim, gram_dim
        E = attn_dim or D // 4
        L = g * (g + 1) // 2
        for what, val, div in (("gram_dim", g, contraction_groups), ("dim", D, embed_groups),
                               ("gram_dim*(gram_dim+1)/2", L, embed_groups), ("attn_dim", E, attn_heads),
                               ("dim", D, mlp_groups)):
            if val % div:
                raise UserError(f"GA head: {what}={val} must be divisible by {div}.")
        if gram_precision not in ('fp32', 'fp64', 'official'):
            raise UserError(f"gram_precision must be 'fp32', 'fp64' or 'official' (got {gram_precision!r}).")
        self.num_branches, self.dim, self.gram_dim, self.attn_dim, self.attn_heads = K, D, g, E, attn_heads
        self.contraction_groups, self.num_classes = contraction_groups, num_classes
        self.gram_precision = gram_precision
        self.head_impl = _check_head_impl(head_impl)
        # K contractions as ONE grouped conv; output channels are group-major (group, head, g/G) so that each
        # group reads its input slice; reordered to head-major right after.
        self.contraction = nn.Conv2d(D, K * g, 1, groups=contraction_groups)
        self.contraction_bn = nn.BatchNorm2d(K * g)
        if gram_layer == 'convnext':
            self.gram_layer = StackedConvNeXtBlock(K, g, drop_path=drop_path, **(gram_layer_args or {}))
        elif gram_layer == 'cswin':
            self.gram_layer = PerHeadCSWinBlocks(K, g, drop_path=drop_path, **(gram_layer_args or {}))
        elif not gram_layer:
            self.gram_layer = nn.Identity()
        else:
            raise UserError(f"gram_layer must be 'convnext', 'cswin' or None (got {gram_layer!r}).")
        self.register_buffer("triu_index", self._triu_flat_index(g), persistent=False)
        self.embed = StackedLinear(K, L, D, groups=embed_groups)
        self.embed_bn = nn.BatchNorm1d(K * D)
        self.norm1 = StackedLayerNorm(K, D)
        self.attn_q = StackedLinear(K, D, E, bias=False)
        self.attn_k = StackedLinear(K, D, E, bias=False)
        self.attn_v = StackedLinear(K, D, E, bias=False)
        self.attn_proj = StackedLinear(K, E, D)
        self.gamma_1 = nn.Parameter(ca_init_value * torch.ones(K, D))
        self.norm2 = StackedLayerNorm(K, D)
        self.mlp_fc1 = StackedLinear(K, D, 4 * D, groups=mlp_groups)
        self.mlp_fc2 = StackedLinear(K, 4 * D, D, groups=mlp_groups)
        self.mlp_groups = mlp_groups
        self.gamma_2 = nn.Parameter(ca_init_value * torch.ones(K, D))
        self.fc = StackedLinear(K, D, num_classes) if num_classes > 0 else None

    @staticmethod
    def _triu_flat_index(g: int) -> torch.Tensor:
        i, j = torch.triu_indices(g, g)  # row-major i <= j, the official order
        return i * g + j

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        with factory_context(**factory_kwargs_of(self)):
            self.fc = StackedLinear(self.num_branches, self.dim, num_classes) if num_classes > 0 else None

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        K, g, G = self.num_branches, self.gram_dim, self.contraction_groups
        y = self.contraction(x).reshape(B, G, K, g // G, H, W).transpose(1, 2).reshape(B, K * g, H, W)
        return self.gram_layer(self.contraction_bn(y))

    def _gram_dtype(self, batch_size: int) -> torch.dtype:
        if self.gram_precision == 'fp64' or (self.gram_precision == 'official' and self.training and batch_size < 128):
            return torch.float64
        return torch.float32

    def gram_vector(self, y: torch.Tensor) -> torch.Tensor:
        """(B, K*g, H, W) -> (K, B, g(g+1)/2): upper triangle (row-major, with diagonal), L2-normalised."""
        B, _, H, W = y.shape
        K, g = self.num_branches, self.gram_dim
        out_dtype = y.dtype  # the embedding's input dtype (autocast casts it for the GEMM either way)
        with _no_autocast(y):
            # The official /H and /(H*W) scales are left out: they cancel in the normalisation (they only
            # keep fp16 finite, and this runs in fp32/fp64).
            y = y.to(self._gram_dtype(B)).reshape(B * K, g, H * W)
            gram = torch.bmm(y, y.transpose(1, 2))
            v = gram.reshape(B, K, g * g).index_select(2, self.triu_index)
            v = F.normalize(v, dim=2).to(out_dtype)
        return v.transpose(0, 1)

    def class_tokens(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """One class-attention block per head. x (B, D, H, W) shared tokens; cls (K, B, D) -> (K, B, D).

        The class token is the only query, so the key and value projections of the N shared tokens (the bulk
        of the official head's cost: 2*K*E*D per token) are folded away, exactly: with n_i the normalised
        tokens (no affine) and head k's LayerNorm affine (w, b),
          score_i = q . W_k (w*n_i + b) = (w * W_k^T q) . n_i + const   (const is the same for every key and
                                                                         cancels in the softmax)
          sum_i a_i W_v (w*n_i + b) = W_v (w * sum_i a_i n_i + b)       (the weights a_i sum to 1)
        so each of the K*h attention heads needs one D-vector query and returns a weighted mean of the
        shared normalised tokens: two small batched matmuls over the N tokens instead of two K*E*D GEMMs.
        (Written out rather than with SDPA: SDPA would need the keys materialised per head, which is the
        cost being avoided.)
        """
        K, E, h = self.num_branches, self.attn_dim, self.attn_heads
        B, D = x.shape[:2]
        e = E // h
        w, b = self.norm1.weight, self.norm1.bias  # (K, D)
        tokens = F.layer_norm(x.flatten(2).transpose(1, 2), (D,), eps=self.norm1.eps)  # (B, N, D), shared
        nc = F.layer_norm(cls, (D,), eps=self.norm1.eps)  # (K, B, D)
        q = self.attn_q(nc * w.unsqueeze(1) + b.unsqueeze(1)).reshape(K, B, h, e)
        wk = self.attn_k.weight.reshape(K, h, e, D)
        wv = self.attn_v.weight.reshape(K, h, e, D)
        qt = torch.einsum('kbhe,khed->kbhd', q * e ** -0.5, wk) * w[:, None, None]  # folded queries
        qt = qt.permute(1, 0, 2, 3).reshape(B, K * h, D)
        s_cls = (qt.reshape(B, K, h, D) * nc.transpose(0, 1).unsqueeze(2)).sum(-1).reshape(B, K * h, 1)
        a = torch.cat([s_cls, torch.bmm(qt, tokens.transpose(1, 2))], 2).softmax(-1)  # (B, K*h, 1+N)
        u = torch.baddbmm(a[:, :, :1] * nc.transpose(0, 1).repeat_interleave(h, 1), a[:, :, 1:], tokens)
        u = u.reshape(B, K, h, D).transpose(0, 1) * w[:, None, None]  # (K, B, h, D)
        o = torch.einsum('kbhd,khed->kbhe', u, wv) + torch.einsum('khed,kd->khe', wv, b).unsqueeze(1)
        cls = cls + self.gamma_1.unsqueeze(1) * self.attn_proj(o.reshape(K, B, E))
        y = F.gelu(self.mlp_fc1(self.norm2(cls)))
        y = self.mlp_fc2(channel_shuffle(y, self.mlp_groups, dim=-1))
        return cls + self.gamma_2.unsqueeze(1) * y

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head_impl != 'batched':
            if _check_head_impl(self.head_impl) == 'reference':
                return self.forward_reference(x, pre_logits)
        B = x.shape[0]
        v = self.gram_vector(self.contract(x))  # (K, B, L)
        cls = self.embed(v)  # (K, B, D)
        cls = self.embed_bn(cls.transpose(0, 1).reshape(B, -1)).reshape(B, self.num_branches, -1).transpose(0, 1)
        cls = self.class_tokens(x, cls)
        if pre_logits or self.fc is None:
            return cls
        return self.fc(cls)

    # -- the plain per-head reference ('reference'): the official structure, one head after the other --------

    def forward_reference(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The K heads one after the other, each written like the official per-head modules (conv-shaped
        grouped weights, the official Gram scales, K/V projections of all 1+N tokens), reading head k's slice
        of the stacked parameters: same parameters, state dict and BatchNorm updates as the batched path.
        The oracle of the batched path's tests and the 'per-head' speed baseline (``head_impl='reference'``)."""
        K, g, D, E, h = self.num_branches, self.gram_dim, self.dim, self.attn_dim, self.attn_heads
        Gc, Ge, Gm = self.contraction_groups, self.embed.groups, self.mlp_groups
        B, _, H, W = x.shape
        bns = (self.contraction_bn, self.embed_bn)
        momenta = [_bn_momentum(bn) for bn in bns]  # counts the step once, as the batched path's one BN call
        tokens = x.flatten(2).transpose(1, 2)
        wc = self.contraction.weight.reshape(Gc, K, g // Gc, D // Gc)
        bc = self.contraction.bias.reshape(Gc, K, g // Gc)
        outs = []
        for k in range(K):
            # gram contraction: grouped 1x1 conv + BN
            y = F.conv2d(x, wc[:, k].reshape(g, D // Gc, 1, 1), bc[:, k].reshape(g), groups=Gc)
            y = _bn_slice(self.contraction_bn, y, slice(k * g, (k + 1) * g), momenta[0])
            if not isinstance(self.gram_layer, nn.Identity):
                y = self.gram_layer.forward_one(y, k)
            # Gram matrix, upper triangle, L2 normalisation
            with _no_autocast(x):
                yy = (y.to(self._gram_dtype(B)) / H).reshape(B, g, H * W)
                gram = torch.bmm(yy, yy.transpose(1, 2)) / (H * W)
                v = F.normalize(gram.reshape(B, g * g)[:, self.triu_index]).float()
            # embedding: grouped 1x1 conv on the (B, L, 1, 1) vector + BN
            c = F.conv2d(v[:, :, None, None], self.embed.weight[k][..., None, None], self.embed.bias[k], groups=Ge)
            c = _bn_slice(self.embed_bn, c.flatten(1), slice(k * D, (k + 1) * D), momenta[1])
            # class attention on [c; tokens]
            u = F.layer_norm(torch.cat([c.unsqueeze(1), tokens], 1), (D,), self.norm1.weight[k], self.norm1.bias[k],
                             self.norm1.eps)
            q = F.linear(u[:, :1], self.attn_q.weight[k]).reshape(B, 1, h, E // h).transpose(1, 2)
            kk = F.linear(u, self.attn_k.weight[k]).reshape(B, -1, h, E // h).transpose(1, 2)
            vv = F.linear(u, self.attn_v.weight[k]).reshape(B, -1, h, E // h).transpose(1, 2)
            a = sdpa(q, kk, vv).transpose(1, 2).reshape(B, E)
            c = c + self.gamma_1[k] * F.linear(a, self.attn_proj.weight[k], self.attn_proj.bias[k])
            # grouped-conv MLP with the official channel shuffle
            m = F.layer_norm(c, (D,), self.norm2.weight[k], self.norm2.bias[k], self.norm2.eps)[:, :, None, None]
            m = F.gelu(F.conv2d(m, self.mlp_fc1.weight[k][..., None, None], self.mlp_fc1.bias[k], groups=Gm))
            m = F.conv2d(channel_shuffle(m, Gm), self.mlp_fc2.weight[k][..., None, None], self.mlp_fc2.bias[k],
                         groups=Gm)
            c = c + self.gamma_2[k] * m.flatten(1)
            if not (pre_logits or self.fc is None):
                c = F.linear(c, self.fc.weight[k], self.fc.bias[k])
            outs.append(c)
        return torch.stack(outs)


HEAD_IMPLS = ('batched', 'reference')


def _check_head_impl(head_impl: str) -> str:
    if head_impl not in HEAD_IMPLS:
        raise UserError(f"head_impl must be 'batched' (the K heads computed together, the default) or 'reference' "
                        f"(one head after the other, as the official code; for tests and speed baselines); "
                        f"got {head_impl!r}.")
    return head_impl


def _bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """nn.BatchNorm's step bookkeeping (num_batches_tracked, momentum) for one forward."""
    if not (bn.training and bn.track_running_stats):
        return 0.
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1. / float(bn.num_batches_tracked)


def _bn_slice(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, sl: slice, momentum: float) -> torch.Tensor:
    """BatchNorm over channels ``sl`` of ``bn`` (running statistics updated in place through the views)."""
    use_batch = bn.training or bn.running_mean is None
    rm = bn.running_mean[sl] if bn.running_mean is not None and (not bn.training or bn.track_running_stats) else None
    rv = bn.running_var[sl] if rm is not None else None
    w = bn.weight[sl] if bn.weight is not None else None
    b = bn.bias[sl] if bn.bias is not None else None
    return F.batch_norm(x, rm, rv, w, b, use_batch, momentum, bn.eps)


# ------------------------------------------------------------------------------------------------------------
# the GA classifier

@accepts_factory_kwargs
class GramianNet(nn.Module):
    """Backbone + multi-scale fusion + stage-5 block + K Gramian attention heads.

    Output: train mode -> per-head logits stacked, shape (K, B, num_classes) (``train_output='heads'``, the
    default; ``'sum'`` returns the summed (B, C) logits in train mode too, e.g. for plain CE fine-tuning);
    eval mode -> the sum over heads (B, C). ``forward_heads(x)`` always gives (K, B, C).
    ``head_impl``: 'batched' (default) or 'reference' (per-head loop, same parameters; see ``GramianHeads``).
    """

    def __init__(self, backbone: str = 'convnext', backbone_args: Optional[dict] = None, num_classes: int = 1000,
                 in_chans: int = 3, img_size: int = 224, stage3_naggre: int = 2, fusion: Optional[str] = 'bottleneck',
                 fusion_args: Optional[dict] = None, dim: Optional[int] = None, num_branches: int = 5,
                 gram_dim: int = 192, attn_dim: Optional[int] = None, attn_heads: int = 8, contraction_groups: int = 1,
                 embed_groups: int = 8, mlp_groups: int = 4, gram_layer: Optional[str] = 'convnext',
                 gram_layer_args: Optional[dict] = None, drop_rate: float = 0., drop_path_rate: float = 0.,
                 gram_precision: str = 'fp32', train_output: str = 'heads', head_impl: str = 'batched',
                 global_pool: str = 'token'):
        super().__init__()
        if isinstance(img_size, (tuple, list)):  # timm passes (H, W) for fixed_input_size cfgs
            if len(set(img_size)) != 1:
                raise UserError(f"GA models take square inputs; got img_size={tuple(img_size)}")
            img_size = int(img_size[0])
        self.in_chans = in_chans
        self.global_pool = _check_global_pool(global_pool)
        if train_output not in ('heads', 'sum'):
            raise UserError(f"train_output must be 'heads' or 'sum' (got {train_output!r}).")
        args = dict(backbone_args or {})
        self.num_classes, self.train_output, self.drop_rate = num_classes, train_output, drop_rate
        self.num_branches = num_branches
        if backbone == 'convnext':
            depths = list(args.pop('depths', (3, 3, 9, 3, 1)))
            dims = list(args.pop('dims', (96, 192, 384, 768)))[:4]
            dpr = [[drop_path_rate * v for v in seg] for seg in _split(linspace(1., sum(depths)), depths)]
            self.trunk = ConvNeXtTrunk(in_chans, depths[:4], dims, drop_path_rates=dpr[:4], **args)
        elif backbone == 'cswin':
            depths = list(args.get('depth', (1, 2, 21, 1)))
            self.trunk = CSWinTrunk(img_size=img_size, in_chans=in_chans, drop_path_rate=drop_path_rate, **args)
            dims = self.trunk.dims
        elif backbone == 'resnet':
            depths = list(args.get('layers', (3, 4, 6, 3)))
            self.trunk = ResNetTrunk(in_chans=in_chans, drop_path_rate=drop_path_rate, **args)
            dims = self.trunk.dims
        elif backbone == 'vit':
            self.trunk = ViTTrunk(in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate, **args)
            dims, depths, stage3_naggre = self.trunk.dims, [], 0
        else:
            raise UserError(f"backbone must be 'convnext', 'cswin', 'resnet' or 'vit' (got {backbone!r}).")
        self.capture = stage3_capture_blocks(depths[2], stage3_naggre) if stage3_naggre else []
        if len(dims) == 4:
            in5 = dims[0] + dims[1] + dims[2] * (len(self.capture) + 1) + dims[3]
        else:
            in5 = sum(dims)
        D = dim or (dims[-1] if fusion else in5)
        reso = img_size // 16
        if fusion == 'bottleneck':
            self.stage5 = SEBottleneckFusion(in5, D, drop_path=drop_path_rate)
        elif fusion == 'cswin':
            self.stage5 = CSWinFusion(in5, D, reso=reso, drop_path=drop_path_rate, **(fusion_args or {}))
        elif not fusion:
            if D != in5:
                raise UserError(f"without a fusion block the heads' dim must equal the features' {in5} (got {D}).")
            self.stage5 = nn.Identity()
        else:
            raise UserError(f"fusion must be 'bottleneck', 'cswin' or None (got {fusion!r}).")
        if gram_layer == 'cswin':
            gram_layer_args = dict(dict(num_heads=6, split_size=7, mlp_ratio=4., mlp_groups=1), **(gram_layer_args or {}))
            gram_layer_args.update(reso=reso, last_stage=gram_layer_args['split_size'] >= reso)
        self.heads = GramianHeads(
            D, num_classes, num_branches, gram_dim, attn_dim, attn_heads, contraction_groups, embed_groups,
            mlp_groups, gram_layer, gram_layer_args, drop_path=drop_path_rate, gram_precision=gram_precision,
            head_impl=head_impl)
        self.num_features = self.head_hidden_size = D
        self.feature_info = list(self.trunk.feature_info)
        self._init_weights(backbone)

    def _init_weights(self, backbone: str):
        # As the official files: ConvNeXt version trunc_normal(.02) for every conv/linear with zero bias; the
        # CSWin version only for Linear layers (done by the CSWin modules), convs keep PyTorch's init.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and (backbone == 'convnext' or isinstance(m, nn.Linear)):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- timm API ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.trunk.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.heads.fc if self.heads.fc is not None else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New per-head classifiers (the official method references a missing ``self.head``)."""
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.heads.reset_classifier(num_classes)
        self.heads.train(self.training)

    def check_input_size(self, H: int, W: int) -> None:
        if is_tracing():  # torch.fx: H and W are symbolic
            return
        step = self.trunk.size_step()
        if H % step or W % step:
            raise UserError(
                f"GA model got a {H}x{W} input: height and width must be multiples of {step} (e.g. 224, 448 for "
                f"CSWin; 224, 256, 288 for ConvNeXt) so that the strides 4/8/16/32 maps line up on the stride-16 "
                f"grid (the official code only takes 224). Resize or crop the input.")

    def fuse(self, maps: List[torch.Tensor], caught: List[torch.Tensor]) -> torch.Tensor:
        """cat[pool4(F1), pool2(F2), stage-3 intermediates, F3, up2(F4)] on the stride-16 grid.

        At 224 the pools equal the official AdaptiveAvgPool2d(14) exactly (4x4 and 2x2 averages)."""
        if len(maps) == 1:  # single stride-16 map (ViT)
            return maps[0]
        f1, f2, f3, f4 = maps
        return torch.cat([F.avg_pool2d(f1, 4), F.avg_pool2d(f2, 2), *caught, f3,
                          F.interpolate(f4, scale_factor=2., mode='bilinear', align_corners=False)], 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused stage-5 map X (B, D, H/16, W/16) that every head reads."""
        self.check_input_size(x.shape[-2], x.shape[-1])
        if isinstance(self.trunk, ViTTrunk):  # a module call: a leaf in torch.fx graphs
            return self.stage5(self.trunk(x))
        maps, caught = self.trunk.forward_stages(x, self.capture)
        return self.stage5(self.fuse(maps, caught))

    def forward_heads(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Per-head outputs (K, B, C) (or class tokens (K, B, D)) from the fused map."""
        return self.heads(x, pre_logits)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.global_pool:  # global_pool='' (timm: no pooling): the unpooled map, no heads
            return x
        out = self.heads(x, pre_logits)
        if self.training and self.train_output == 'heads':
            return out
        return out.sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Backbone stage maps (strides 4/8/16/32) for features_only / dense heads."""
        if output_fmt != 'NCHW':
            raise UserError("GA models give NCHW intermediates only.")
        n_maps = len(self.feature_info)
        take, max_index = feature_take_indices(n_maps, indices)
        self.check_input_size(x.shape[-2], x.shape[-1])
        if isinstance(self.trunk, ViTTrunk):  # block maps; the heads read the final normed map
            out = self.trunk.forward_intermediates(x, take, norm, stop_early, intermediates_only)
            return out if intermediates_only else (self.stage5(out[0]), out[1])
        stop = max_index if (intermediates_only or stop_early) else n_maps - 1
        maps, caught = self.trunk.forward_stages(x, self.capture if stop == n_maps - 1 else (), stop=stop)
        inter = [maps[i] for i in take]
        if intermediates_only:
            return inter
        return self.stage5(self.fuse(maps, caught)), inter


def _split(values: List[float], sizes: Sequence[int]) -> List[List[float]]:
    out, start = [], 0
    for s in sizes:
        out.append(values[start:start + s])
        start += s
    return out


# ------------------------------------------------------------------------------------------------------------
# the loss

class GALoss(nn.Module):
    """GA training objective (official train.py): sum_k BCE(z_k, t) + lam * sum_k KL(softmax(mean_j z_j).detach() || softmax(z_k)).

    ``output``: per-head logits (K, B, C) (what a GA model returns in train mode) or (B, C) (one head, the KL
    term is then 0). ``target``: class indices (B,) -- smoothed to off = s/C, on = 1 - s + s/C -- or dense/soft
    targets (B, C) such as timm Mixup/CutMix output (used as they are). BCE is averaged over B*C per head and
    summed over heads; the KL is averaged over B*C ('mean', as official, not 'batchmean'). lam < 0 (the
    recipes use -0.8) rewards heads for diverging from the ensemble. Computed in fp32.
    """

    def __init__(self, lam: float = -0.8, smoothing: float = 0.1, target_threshold: Optional[float] = None,
                 reduction: str = 'mean'):
        super().__init__()
        if reduction != 'mean':
            raise UserError("GALoss supports reduction='mean' only (as the official code).")
        self.lam, self.smoothing, self.target_threshold = lam, smoothing, target_threshold

    def dense_target(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        if target.dim() == 1 or target.dtype in (torch.int64, torch.int32):
            off = self.smoothing / num_classes
            t = torch.full((target.shape[0], num_classes), off, device=target.device, dtype=torch.float32)
            return t.scatter_(1, target.long().view(-1, 1), 1. - self.smoothing + off)
        return target.float()

    def parts(self, output: torch.Tensor, target: torch.Tensor):
        """(task, decorrelation) terms; the loss is their sum."""
        if output.dim() == 2:
            output = output.unsqueeze(0)
        if output.dim() != 3:
            raise UserError(f"GALoss expects per-head logits (K, B, C) or logits (B, C); got shape "
                            f"{tuple(output.shape)}.")
        z = output.float()
        K, B, C = z.shape
        t = self.dense_target(target, C)
        if self.target_threshold is not None:
            t = t.gt(self.target_threshold).to(t.dtype)
        task = F.binary_cross_entropy_with_logits(z, t.unsqueeze(0).expand_as(z), reduction='sum') / (B * C)
        if K == 1 or self.lam == 0:
            return task, task.new_zeros(())
        log_p = F.log_softmax(z, dim=-1)
        log_pbar = F.log_softmax(z.detach().mean(0), dim=-1)
        kl = (log_pbar.exp() * (log_pbar - log_p)).sum() / (B * C)
        return task, self.lam * kl

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        task, dec = self.parts(output, target)
        return task + dec


# ------------------------------------------------------------------------------------------------------------
# official -> ours

_HEAD_KEY = re.compile(r"^(gram_contraction|gram_layer|gram_embedding|ga|fc)\.(\d+)\.(.+)$")


def _unwrap(state_dict: dict) -> dict:
    return unwrap_state_dict(state_dict, ("state_dict_ema", "state_dict", "model"))  # GA ships EMA weights


def _head_target(kind: str, rest: str, cswin_gram_layer: bool):
    """(our key, combine) for one per-head official key; combine in {'cat', 'stack', 'drop', 'list'}."""
    if kind == 'gram_contraction':
        if rest.startswith('0.'):
            return 'heads.contraction.' + rest[2:], 'contraction'
        if rest.endswith('num_batches_tracked'):
            return 'heads.contraction_bn.num_batches_tracked', 'first'
        return 'heads.contraction_bn.' + rest[2:], 'cat'
    if kind == 'gram_embedding':
        if rest.startswith('0.'):
            return 'heads.embed.' + rest[2:], 'stack_flat'
        if rest.endswith('num_batches_tracked'):
            return 'heads.embed_bn.num_batches_tracked', 'first'
        return 'heads.embed_bn.' + rest[2:], 'cat'
    if kind == 'gram_layer':
        if cswin_gram_layer:  # Sequential(rearrange, CSWinBlock, rearrange): keep per head
            return 'heads.gram_layer.blocks.{k}.' + rest[2:], 'per_head'
        rest = rest.replace('blocks.0.', '')
        if rest.startswith('conv_dw.'):
            return 'heads.gram_layer.' + rest, 'cat'
        rest = rest.replace('mlp.fc1', 'fc1').replace('mlp.fc2', 'fc2')
        return 'heads.gram_layer.' + rest, 'stack'
    if kind == 'ga':
        rest = (rest.replace('attn.q.', 'attn_q.').replace('attn.k.', 'attn_k.').replace('attn.v.', 'attn_v.')
                .replace('attn.proj.', 'attn_proj.').replace('mlp.fc1.', 'mlp_fc1.').replace('mlp.fc2.', 'mlp_fc2.'))
        return 'heads.' + rest, 'stack_flat'
    return 'heads.fc.' + rest, 'stack'  # fc


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official GA_ConvNeXt / GA_CSWinTransformer state dict -> ours (our own converted dicts pass unchanged).

    Trunk keys move under ``trunk.``, stage 5 under ``stage5.``, and the per-head tensors of the K heads are
    stacked/concatenated into the batched head parameters (``heads.*``). Only reshapes/stacks: no arithmetic.
    """
    state_dict = _unwrap(state_dict)
    if any(k.startswith(('heads.', 'trunk.')) for k in state_dict):
        return dict(state_dict)
    heads = getattr(model, 'heads', None)
    cswin_gl = heads is not None and isinstance(heads.gram_layer, PerHeadCSWinBlocks)
    out: Dict[str, torch.Tensor] = {}
    grouped: Dict[str, Dict[int, torch.Tensor]] = {}
    how: Dict[str, str] = {}
    for k, v in state_dict.items():
        m = _HEAD_KEY.match(k)
        if m:
            kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            key, mode = _head_target(kind, rest, cswin_gl)
            if mode == 'per_head':
                out[key.format(k=idx)] = v
                continue
            grouped.setdefault(key, {})[idx] = v
            how[key] = mode
            continue
        if k.startswith('stages.4.'):
            out['stage5.' + k[len('stages.4.'):]] = v
        elif k.startswith('stage5.1.'):
            out['stage5.' + k[len('stage5.1.'):]] = v
        elif k.startswith('stage5.2.'):
            out['stage5.block.' + k[len('stage5.2.'):]] = v
        elif k.startswith('stage5.'):
            out[k] = v
        elif k.startswith(('head.', 'norm.')):
            continue  # a plain classifier's head: not part of a GA model
        else:
            out['trunk.' + k] = v
    for key, parts in grouped.items():
        vals = [parts[i] for i in sorted(parts)]
        mode = how[key]
        if mode == 'first':
            out[key] = vals[0]
        elif mode == 'cat':
            out[key] = torch.cat(vals, 0)
        elif mode == 'stack':
            out[key] = torch.stack(vals, 0)
        elif mode == 'stack_flat':  # conv-shaped (out, in, 1, 1) -> (out, in)
            out[key] = torch.stack([t.reshape(t.shape[0], -1) if t.dim() > 1 else t for t in vals], 0)
        elif mode == 'contraction':  # per head (g, D/G, 1, 1) -> one conv, output channels (group, head, g/G)
            G = heads.contraction_groups if heads is not None else 1
            s = torch.stack(vals, 0)  # (K, g, ...)
            K, g = s.shape[:2]
            s = s.reshape(K, G, g // G, *s.shape[2:]).transpose(0, 1)
            out[key] = s.reshape(K * g, *s.shape[3:])
    return out


# ------------------------------------------------------------------------------------------------------------
# configs and builders

def _cfg(**kwargs):
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14), 'crop_pct': 0.875,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'trunk.stem.0', 'classifier': 'heads.fc', 'license': 'apache-2.0', **kwargs}


_CSWIN_CFG = dict(crop_pct=0.9, first_conv='trunk.stage1_conv_embed.0', fixed_input_size=True)  # as cswin_*

default_cfgs = generate_default_cfgs({
    'ga_convnext_tiny_688.untrained': _cfg(),
    'ga_convnext_tiny_768.untrained': _cfg(),
    'ga_convnext_small_688.untrained': _cfg(),
    'ga_convnext_small_768.untrained': _cfg(),
    'ga_convnext_base_976.untrained': _cfg(),
    'ga_convnext_base_1024.untrained': _cfg(),
    'ga_cswin_tiny.untrained': _cfg(**_CSWIN_CFG),
    'ga_cswin_small.untrained': _cfg(**_CSWIN_CFG),
    'ga_resnet50.untrained': _cfg(crop_pct=0.95, first_conv='trunk.model.conv1'),
    'ga_vit_small.untrained': _cfg(crop_pct=0.9, first_conv='trunk.model.patch_embed.proj'),
    'ga_test.untrained': _cfg(input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0),
})


def _create(variant: str, pretrained: bool = False, out_indices=(0, 1, 2, 3), **kwargs) -> GramianNet:
    return build_model_with_cfg(
        GramianNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **kwargs)


def _convnext_args(depths, dims, dim_embed, naggre, **kwargs):
    return dict(backbone='convnext', backbone_args=dict(depths=depths, dims=dims[:4]), dim=dims[4],
                attn_dim=dim_embed, stage3_naggre=naggre, gram_dim=192, embed_groups=8, mlp_groups=4,
                fusion='bottleneck', gram_layer='convnext', **kwargs)


def _cswin_args(depth, **kwargs):
    """Reconstructed GA-CSWin config (spec ga.md 2.3): CSWin-T/S trunk, deep stem, stage 5 / gram layer split 7."""
    args = dict(backbone='cswin', backbone_args=dict(
        embed_dim=64, depth=depth, split_size=(1, 2, 7, 7), num_heads=(2, 4, 8, 16), mlp_ratio=4.,
        dims=(64, 128, 256, 512), deep_stem=True),
        stage3_naggre=4, fusion='cswin', fusion_args=dict(num_heads=16, split_size=7, mlp_ratio=4., mlp_groups=1),
        gram_dim=192, contraction_groups=8, embed_groups=8, mlp_groups=2, attn_dim=512 // 4,
        gram_layer='cswin', gram_layer_args=dict(num_heads=6, split_size=7, mlp_ratio=4., mlp_groups=1))
    args.update(kwargs)
    return args


@register_model
def ga_convnext_tiny_688(pretrained=False, **kwargs) -> GramianNet:
    return _create('ga_convnext_tiny_688', pretrained, **_convnext_args((3, 3, 9, 3, 1), (96, 192, 384, 688, 688), 168, 2, **kwargs))


@register_model
def ga_convnext_tiny_768(pretrained=False, **kwargs) -> GramianNet:
    return _create('ga_convnext_tiny_768', pretrained, **_convnext_args((3, 3, 9, 3, 1), (96, 192, 384, 768, 768), 192, 2, **kwargs))


@register_model
def ga_convnext_small_688(pretrained=False, **kwargs) -> GramianNet:
    return _create('ga_convnext_small_688', pretrained, **_convnext_args((3, 3, 27, 3, 1), (96, 192, 384, 688, 688), 168, 4, **kwargs))


@register_model
def ga_convnext_small_768(pretrained=False, **kwargs) -> GramianNet:
    return _create('ga_convnext_small_768', pretrained, **_convnext_args((3, 3, 27, 3, 1), (96, 192, 384, 768, 768), 192, 4, **kwargs))


@register_model
def ga_convnext_base_976(pretrained=False, **kwargs) -> GramianNet:
    return _create('ga_convnext_base_976', pretrained, **_convnext_args((3, 3, 27, 3, 1), (128, 256, 512, 976, 976), 240, 4, **kwargs))


@register_model
def ga_convnext_base_1024(pretrained=False, **kwargs) -> GramianNet:
    return _create('ga_convnext_base_1024', pretrained, **_convnext_args((3, 3, 27, 3, 1), (128, 256, 512, 1024, 1024), 256, 4, **kwargs))


@register_model
def ga_cswin_tiny(pretrained=False, **kwargs) -> GramianNet:
    """Reconstruction of the README's ga_CSWin_64_12211_tiny_224 (no official builder exists)."""
    return _create('ga_cswin_tiny', pretrained, **_cswin_args((1, 2, 21, 1), **kwargs))


@register_model
def ga_cswin_small(pretrained=False, **kwargs) -> GramianNet:
    """Reconstruction of the README's ga_CSWin_64_24322_small_224 (no official builder exists)."""
    return _create('ga_cswin_small', pretrained, **_cswin_args((2, 4, 32, 2), **kwargs))


@register_model
def ga_resnet50(pretrained=False, **kwargs) -> GramianNet:
    """RECONSTRUCTION of the paper's GA-ResNet50 (no code was released; spec ga.md section 3): SE-ResNet-50 trunk
    with layer4 slimmed to 192 planes (out 768), layer3 outputs after blocks 2 and 4 fused, SE-bottleneck stage 5
    to D=768, 5 heads (g=192, E=192, GMLP groups 4)."""
    args = dict(backbone='resnet', backbone_args=dict(layers=(3, 4, 6, 3), channels=(64, 128, 256, 192),
                                                      block_args=dict(attn_layer='se')),
                dim=768, attn_dim=192, stage3_naggre=2, gram_dim=192, embed_groups=8, mlp_groups=4,
                fusion='bottleneck', gram_layer='convnext')
    return _create('ga_resnet50', pretrained, **dict(args, **kwargs))


@register_model
def ga_vit_small(pretrained=False, **kwargs) -> GramianNet:
    """RECONSTRUCTION of the paper's GA-ViT-S (no code was released; spec ga.md section 3): ViT-S/16 trunk
    (timm vit_small_patch16_224, classifier dropped), its final normed patch tokens as a 14x14 map, no fusion
    block, 5 heads with D=384, g=96, E=96, GMLP groups 4 and no gram layer."""
    args = dict(backbone='vit', backbone_args=dict(model_name='vit_small_patch16_224'), fusion=None,
                attn_dim=96, gram_dim=96, embed_groups=8, mlp_groups=4, gram_layer=None)
    return _create('ga_vit_small', pretrained, **dict(args, out_indices=3, **kwargs))  # last 3 blocks, as timm ViT


@register_model
def ga_test(pretrained=False, **kwargs) -> GramianNet:
    """Tiny GA-ConvNeXt for tests and the CPU recipe: 32x32 input, 3 heads."""
    args = dict(backbone='convnext', backbone_args=dict(depths=(1, 1, 2, 1, 1), dims=(8, 16, 24, 32)), dim=32,
                attn_dim=16, stage3_naggre=1, gram_dim=16, embed_groups=8, mlp_groups=4, num_branches=3,
                fusion='bottleneck', gram_layer='convnext', img_size=32)
    return _create('ga_test', pretrained, **dict(args, **kwargs))


# README names that the official code never registered -> the closest builders (params within 0.9M of the
# README for ConvNeXt; the CSWin ones are reconstructions). Registered as real entry points (no warning).
def _alias(name: str, target):
    def fn(pretrained=False, **kwargs):
        return target(pretrained=pretrained, **kwargs)
    fn.__name__ = name
    fn.__qualname__ = name
    fn.__doc__ = f"Alias of {target.__name__} (README model name)."
    fn.__module__ = __name__
    return register_model(fn)


MODEL_ALIASES = {
    'ga_convnext_tiny': ga_convnext_tiny_688,
    'ga_convnext_small': ga_convnext_small_688,
    'ga_convnext_base': ga_convnext_base_976,
    'ga_CSWin_64_12211_tiny_224': ga_cswin_tiny,
    'ga_CSWin_64_24322_small_224': ga_cswin_small,
}
# an alias carries its target's cfg (timm reads a model's cfgs from default_cfgs when it is registered)
default_cfgs.update(generate_default_cfgs({
    f'{_name}.untrained': dict(default_cfgs[_target.__name__].cfgs['untrained'].to_dict(), architecture=_name)
    for _name, _target in MODEL_ALIASES.items()}))
for _name, _target in MODEL_ALIASES.items():
    globals()[_name] = _alias(_name, _target)
