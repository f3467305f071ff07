"""CSWin Transformer: cross-shaped window self-attention with locally-enhanced positional encoding (LePE).

Re-implemented because timm does not have it (spec ga.md section 2.4). Tokens are (B, L=H*W, C), row-major.
Each block splits its channels in two halves: one attends within vertical stripes (all rows x ``split``
columns), the other within horizontal stripes (``split`` rows x all columns); a block whose stage resolution
equals its split size (and every block of stage 4) uses one full-attention branch instead. LePE is a depthwise
3x3 conv applied to V *per window* (zero padding at window borders) and added to the attention output.

Key names follow the official CSWin code (``stage1_conv_embed``, ``stage{1..4}.j``, ``merge{1..3}``, ``norm``,
``head``), so official CSWin checkpoints load unchanged. The GA models (gramian.py) reuse this trunk.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ..errors import UserError
from ._attention import sdpa
from ._registry import accepts_factory_kwargs, factory_kwargs_of, is_tracing, unwrap_state_dict

__all__ = ["CSWinTransformer", "CSWinBlock", "GroupConvMlp", "channel_shuffle", "checkpoint_filter_fn"]


def linspace(end: float, n: int) -> List[float]:
    """torch.linspace(0, end, n) as Python floats (works under the meta device)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def channel_shuffle(x: torch.Tensor, groups: int, dim: int = 1) -> torch.Tensor:
    """The official GA shuffle: view channels as (C/G, G), transpose, flatten (the inverse of ShuffleNet's)."""
    dim = dim % x.dim()
    c = x.shape[dim]
    shape = x.shape
    x = x.reshape(*shape[:dim], c // groups, groups, *shape[dim + 1:]).transpose(dim, dim + 1)
    return x.reshape(shape)


class GroupConvMlp(nn.Module):
    """Grouped 1x1-conv MLP with a channel shuffle between the two layers (GA's "GMLP").

    Takes tokens (B, L, C) or vectors (B, C); the weights are conv-shaped (out, in/G, 1, 1) as in the official
    state dicts. Computed with grouped matmuls on the token layout (no NCHW round trip).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 groups: int = 1, act_layer=nn.GELU):
        super().__init__()
        out_features = out_features or in_features
        self.groups = groups
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, groups=groups)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1, groups=groups)

    @staticmethod
    def _grouped_linear(x: torch.Tensor, conv: nn.Conv2d, groups: int) -> torch.Tensor:
        w = conv.weight.flatten(1)  # (out, in/G)
        if groups == 1:
            return F.linear(x, w, conv.bias)
        lead = x.shape[:-1]
        xg = x.reshape(-1, groups, x.shape[-1] // groups).transpose(0, 1)  # (G, M, in/G)
        wg = w.reshape(groups, w.shape[0] // groups, w.shape[1]).transpose(1, 2)  # (G, in/G, out/G)
        y = torch.bmm(xg, wg).transpose(0, 1).reshape(*lead, w.shape[0])
        return y + conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._grouped_linear(x, self.fc1, self.groups))
        x = channel_shuffle(x, self.groups, dim=-1)
        return self._grouped_linear(x, self.fc2, self.groups)


class LePEAttention(nn.Module):
    """One attention branch: holds only LePE's depthwise conv; the attention itself runs in CSWinBlock."""

    def __init__(self, dim: int, num_heads: int, idx: int, split_size: int):
        super().__init__()
        self.dim, self.num_heads, self.idx, self.split_size = dim, num_heads, idx, split_size
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def window(self, H: int, W: int) -> Tuple[int, int]:
        if self.idx == -1:
            return H, W
        if self.idx == 0:  # vertical stripes
            return H, self.split_size
        return self.split_size, W  # horizontal stripes

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """q, k, v: (B, H, W, C') -> (B, H, W, C')."""
        B, C = q.shape[0], q.shape[-1]
        hs, ws = self.window(H, W)
        nh, e = self.num_heads, C // self.num_heads

        def to_windows(t):  # (B, H, W, C) -> (B*nW, hs*ws, C); windows in (row, col) order, tokens row-major
            t = t.reshape(B, H // hs, hs, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
            return t.reshape(-1, hs * ws, C)

        qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
        n_win = qw.shape[0]
        # LePE: depthwise conv on V inside each window (zero padding at the window border)
        lepe = self.get_v(vw.transpose(1, 2).reshape(n_win, C, hs, ws)).flatten(2).transpose(1, 2)
        qh, kh, vh = (t.reshape(n_win, hs * ws, nh, e).transpose(1, 2) for t in (qw, kw, vw))
        out = sdpa(qh, kh, vh).transpose(1, 2).reshape(n_win, hs * ws, C) + lepe
        out = out.reshape(B, H // hs, W // ws, hs, ws, C).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(B, H, W, C)


@register_notrace_module  # torch.fx: shape-dependent stripe windows; a leaf module in traced graphs
class CSWinBlock(nn.Module):
    """LN -> qkv -> (two cross-shaped branches | one full branch) -> proj -> residual; LN -> MLP -> residual."""

    def __init__(self, dim: int, num_heads: int, reso: int, split_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_path: float = 0., last_stage: bool = False, mlp_groups: int = 1,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim, self.reso, self.split_size = dim, reso, split_size
        self.norm1 = norm_layer(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.branch_num = 1 if (last_stage or reso == split_size) else 2
        if self.branch_num == 1:
            self.attns = nn.ModuleList([LePEAttention(dim, num_heads, -1, split_size)])
        else:
            self.attns = nn.ModuleList(
                [LePEAttention(dim // 2, num_heads // 2, i, split_size) for i in range(2)])
        hidden = int(dim * mlp_ratio)
        if mlp_groups > 1:
            self.mlp = GroupConvMlp(dim, hidden, dim, groups=mlp_groups)
        else:
            self.mlp = Mlp(dim, hidden, dim, act_layer=nn.GELU)
        self.norm2 = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, H, W, 3, C)
        q, k, v = qkv.unbind(3)
        if self.branch_num == 1:
            att = self.attns[0](q, k, v, H, W)
        else:
            h = C // 2
            att = torch.cat([
                self.attns[0](q[..., :h], k[..., :h], v[..., :h], H, W),
                self.attns[1](q[..., h:], k[..., h:], v[..., h:], H, W)], dim=-1)
        x = x + self.drop_path(self.proj(att.reshape(B, L, C)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class MergeBlock(nn.Module):
    """Conv3x3/2 + LayerNorm between stages (tokens in, tokens out)."""

    def __init__(self, dim: int, dim_out: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, int, int]:
        B, C = x.shape[0], x.shape[2]  # indexing, not unpacking: torch.fx traces it
        x = self.conv(x.transpose(1, 2).reshape(B, C, H, W))
        H, W = x.shape[-2], x.shape[-1]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class _ToTokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class _TokenLN(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the deep stem's 'to tokens -> LN -> back' in one module)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _deep_stem(in_chans: int, width: int, out_dim: int) -> nn.Sequential:
    # Indices 0, 2, 5, 7, 10, 12 carry weights, as in the GA code's deep stem (the gaps were Rearrange/GELU).
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, 2, 1, bias=False), nn.Identity(), _TokenLN(width), nn.GELU(), nn.Identity(),
        nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.Identity(), _TokenLN(width), nn.GELU(), nn.Identity(),
        nn.Conv2d(width, out_dim, 3, 2, 1, bias=False), _ToTokens(), nn.LayerNorm(out_dim))


@accepts_factory_kwargs
class CSWinTransformer(nn.Module):
    """CSWin Transformer (Dong et al., CVPR 2022) with the timm classifier API.

    Args beyond the usual: ``embed_dim`` is the stage-1 width (or the deep stem's width when ``deep_stem``),
    ``dims`` overrides the per-stage widths (default embed_dim * 1, 2, 4, 8), ``split_size`` the stripe width
    per stage, ``deep_stem`` the three-conv stem of the GA code, ``final_norm=False`` drops the last LayerNorm
    (GA uses the trunk without it).
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depth: Sequence[int] = (1, 2, 21, 1), split_size: Sequence[int] = (1, 2, 7, 7),
                 num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratio: float = 4., mlp_ratio_stage4: Optional[float] = None,
                 qkv_bias: bool = True, drop_rate: float = 0., drop_path_rate: float = 0.,
                 dims: Optional[Sequence[int]] = None, deep_stem: bool = False, final_norm: bool = True,
                 global_pool: str = 'avg', mlp_groups: int = 1):
        super().__init__()
        if isinstance(img_size, (tuple, list)):  # timm passes (H, W) for fixed_input_size cfgs
            if len(set(img_size)) != 1:
                raise UserError(f"CSWin takes square inputs; got img_size={tuple(img_size)}")
            img_size = int(img_size[0])
        dims = list(dims) if dims is not None else [embed_dim * 2 ** i for i in range(4)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.dims = dims
        self.split_size = list(split_size)
        self.global_pool = global_pool
        self.grad_checkpointing = False
        if deep_stem:
            self.stage1_conv_embed = _deep_stem(in_chans, embed_dim, dims[0])
        else:
            self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, dims[0], 7, 4, 2), _ToTokens(),
                                                   nn.LayerNorm(dims[0]))
        dpr = linspace(drop_path_rate, sum(depth))
        mlp_ratio_stage4 = mlp_ratio if mlp_ratio_stage4 is None else mlp_ratio_stage4
        self.feature_info = []
        start = 0
        for i in range(4):
            reso = img_size // (4 * 2 ** i)
            blocks = nn.ModuleList([CSWinBlock(
                dims[i], num_heads[i], reso, split_size[i], mlp_ratio_stage4 if i == 3 else mlp_ratio,
                qkv_bias=qkv_bias, drop_path=dpr[start + j], last_stage=(i == 3), mlp_groups=mlp_groups)
                for j in range(depth[i])])
            start += depth[i]
            setattr(self, f"stage{i + 1}", blocks)
            if i < 3:
                setattr(self, f"merge{i + 1}", MergeBlock(dims[i], dims[i + 1]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stage{i + 1}"))
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.LayerNorm(dims[-1]) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # As the official code: trunc_normal(.02) Linear, LN (1, 0); convs keep PyTorch's default init.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm API ----------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg'):
                raise UserError(f"CSWin global_pool must be 'avg' or '' (got {global_pool!r}).")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes, **factory_kwargs_of(self)) if num_classes > 0 \
            else nn.Identity()
        self.head.train(self.training)

    def stages(self):
        return [getattr(self, f"stage{i + 1}") for i in range(4)]

    def size_step(self) -> int:
        """Input sides must be multiples of this: stride 32, and each cross-shaped stage's stripe width."""
        step = 32
        for i, blocks in enumerate(self.stages()):
            if len(blocks) and blocks[0].branch_num == 2:
                s = 4 * 2 ** i * self.split_size[i]
                step = step * s // math.gcd(step, s)
        return step

    def check_input_size(self, H: int, W: int) -> None:
        if is_tracing():  # torch.fx: H and W are symbolic
            return
        step = self.size_step()
        if H % step or W % step:
            raise UserError(
                f"Input size {H}x{W} does not fit this CSWin (split sizes {self.split_size[:4]}): height and "
                f"width must be multiples of {step} (e.g. {step} or {2 * step}); resize or crop the input.")

    def _run_stage(self, i: int, x: torch.Tensor, H: int, W: int, capture: Sequence[int] = ()):
        caught = []
        for j, blk in enumerate(getattr(self, f"stage{i + 1}")):
            if self.grad_checkpointing and not torch.jit.is_scripting() and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, H, W, use_reentrant=False)
            else:
                x = blk(x, H, W)
            if j + 1 in capture:
                caught.append(x)
        return x, caught

    def _tokens_to_map(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], H, W)

    def forward_stages(self, x: torch.Tensor, capture: Sequence[int] = (), capture_stage: int = 2,
                       stop: int = 3):
        """Token maps after each stage (NCHW) and those after the 1-based blocks ``capture`` of ``capture_stage``."""
        H, W = x.shape[-2], x.shape[-1]
        self.check_input_size(H, W)
        x = self.stage1_conv_embed(x)
        H, W = H // 4, W // 4
        outs, caught = [], []
        for i in range(stop + 1):
            if i > 0:
                x, H, W = getattr(self, f"merge{i}")(x, H, W)
            x, c = self._run_stage(i, x, H, W, capture if i == capture_stage else ())
            caught += [self._tokens_to_map(t, H, W) for t in c]
            outs.append((x, H, W))
        return outs, caught

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        if output_fmt not in ('NCHW', 'NLC'):
            raise UserError(f"output_fmt must be 'NCHW' or 'NLC' (got {output_fmt!r}).")
        take, max_index = feature_take_indices(4, indices)
        outs, _ = self.forward_stages(x, stop=max_index if (stop_early or intermediates_only) else 3)
        inter = []
        for i in take:
            t, H, W = outs[i]
            if norm and i == 3:
                t = self.norm(t)
            inter.append(self._tokens_to_map(t, H, W) if output_fmt == 'NCHW' else t)
        if intermediates_only:
            return inter
        return self.norm(outs[-1][0]), inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take, max_index = feature_take_indices(4, indices)
        for i in range(max_index + 1, 4):
            setattr(self, f"stage{i + 1}", nn.ModuleList())
            if i > 0 and hasattr(self, f"merge{i}"):
                setattr(self, f"merge{i}", nn.Identity())
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        outs, _ = self.forward_stages(x)
        return self.norm(outs[-1][0])  # (B, L, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official CSWin checkpoints use our key names already; unwrap training wrappers and drop extras."""
    out = dict(unwrap_state_dict(state_dict, ("state_dict_ema", "state_dict", "model")))
    return out


def _cfg(**kwargs):
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.9,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stage1_conv_embed.0', 'classifier': 'head', 'license': 'mit', **kwargs}


default_cfgs = generate_default_cfgs({
    # split size 7 in stage 3 (a 14x14 map at 224) makes every input size other than multiples of 224 invalid
    'cswin_tiny.untrained': _cfg(fixed_input_size=True),
    'cswin_small.untrained': _cfg(fixed_input_size=True),
    'cswin_base.untrained': _cfg(fixed_input_size=True),
    'cswin_test.untrained': _cfg(input_size=(3, 64, 64), crop_pct=1.0),
})


def _create_cswin(variant: str, pretrained: bool = False, **kwargs) -> CSWinTransformer:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        CSWinTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **kwargs)


@register_model
def cswin_tiny(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    """CSWin-T/224 (23M): depths 1-2-21-1, heads 2-4-8-16, split 1-2-7-7."""
    args = dict(embed_dim=64, depth=(1, 2, 21, 1), split_size=(1, 2, 7, 7), num_heads=(2, 4, 8, 16), mlp_ratio=4.)
    return _create_cswin('cswin_tiny', pretrained, **dict(args, **kwargs))


@register_model
def cswin_small(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    """CSWin-S/224 (35M): depths 2-4-32-2."""
    args = dict(embed_dim=64, depth=(2, 4, 32, 2), split_size=(1, 2, 7, 7), num_heads=(2, 4, 8, 16), mlp_ratio=4.)
    return _create_cswin('cswin_small', pretrained, **dict(args, **kwargs))


@register_model
def cswin_base(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    """CSWin-B/224 (78M): width 96, depths 2-4-32-2, heads 4-8-16-32."""
    args = dict(embed_dim=96, depth=(2, 4, 32, 2), split_size=(1, 2, 7, 7), num_heads=(4, 8, 16, 32), mlp_ratio=4.)
    return _create_cswin('cswin_base', pretrained, **dict(args, **kwargs))


@register_model
def cswin_test(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    """Tiny CSWin for tests: 64x64 input, both branch kinds (cross-shaped in stages 1-3, full in stage 4)."""
    args = dict(img_size=64, embed_dim=8, depth=(1, 1, 2, 1), split_size=(1, 2, 2, 2), num_heads=(2, 2, 2, 2),
                mlp_ratio=2.)
    return _create_cswin('cswin_test', pretrained, **dict(args, **kwargs))
