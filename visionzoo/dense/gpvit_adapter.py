"""GPViT adapter: the ViT-Adapter around GPViT used by the official detection models (spec gpvit.md section 5.1).

GPViT is a plain ViT at stride 8. For Mask R-CNN / RetinaNet the official repo wraps it in a ViT-Adapter:
a small conv branch (Spatial Prior Module, SPM) makes a stride 8/16/32 token set ``c``; four interaction blocks
alternate with the 12 GPViT layers (groups [[0,2],[3,5],[6,8],[9,11]]): an *injector* lets the image tokens x read
``c`` through multi-scale deformable attention (x += gamma * attn, gamma starts at 0, so at init the GPViT runs
unchanged), the GPViT layers of the group run at the stride-8 grid, and an *extractor* lets ``c`` read x back
(deformable attention + a ConvFFN). The outputs are c1 (stride 4, ConvTranspose of c2 + the SPM's stride-4 map),
c2, c3, c4, each plus the resized GPViT tokens, each through its own BatchNorm: 4 maps of C channels at strides
4/8/16/32 (``GPViTAdapter``; 3 maps at 8/16/32 with ``single_stage=True``, the RetinaNet variant).

Multi-scale deformable attention is written in plain PyTorch with ``F.grid_sample``: the official code calls
mmcv-full's compiled CUDA op, which has no wheels for current torch. The op bilinearly samples each level at
``location * size - 0.5`` with zeros outside the map; ``grid_sample(bilinear, zeros, align_corners=False)`` on the
grid ``2 * location - 1`` computes exactly the same (it is also mmcv's own CPU fallback). It is vectorised over
batch, heads, queries and points; only the 1-3 levels (different map shapes) are a Python loop.

Module and parameter names follow the official ones (``level_embed``, ``spm.*``, ``interactions.*``, ``up``,
``ad_norm1..4``) so an official mmdet checkpoint loads through :func:`adapter_checkpoint_filter_fn`, which is the
GPViT key conversion of ``visionzoo.models.gpvit.checkpoint_filter_fn`` for the GPViT part (``vit.*`` here) and
identity for the adapter part.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ..errors import UserError

__all__ = ["MultiScaleDeformableAttention", "ms_deform_attn_sample", "GPViTAdapter", "adapter_checkpoint_filter_fn",
           "reference_points", "OFFICIAL_INTERACTION_INDEXES", "NO_WEIGHT_DECAY_KEYWORDS"]

OFFICIAL_INTERACTION_INDEXES = ((0, 2), (3, 5), (6, 8), (9, 11))
# mmdet paramwise custom_keys of every official GPViT detection config (decay_mult 0); substring matches on names.
NO_WEIGHT_DECAY_KEYWORDS = ("level_embed", "pos_embed", "norm", "bias", "group_token")
# top-level names of the adapter's own modules (official names; everything else belongs to the GPViT)
_ADAPTER_PREFIXES = ("level_embed", "spm.", "interactions.", "up.", "ad_norm")

Shapes = Sequence[Tuple[int, int]]


# ----------------------------------------------------------------------------------------------------------------
# multi-scale deformable attention

def reference_points(shapes: Shapes, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1] as (x, y), levels concatenated: (1, sum h*w, 1, 2)."""
    refs = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        refs.append(torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)], dim=-1).reshape(h * w, 2))
    return torch.cat(refs, dim=0)[None, :, None]


def ms_deform_attn_sample(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """The core of multi-scale deformable attention (what mmcv's ``MultiScaleDeformableAttnFunction`` computes).

    value (B, sum h*w, heads, D) with the levels' maps flattened row-major and concatenated; locations
    (B, Lq, heads, L, P, 2) as (x, y) in [0, 1] (0 = the left/top border of the map); weights (B, Lq, heads, L, P).
    Returns sum over levels and points of weight * bilinear sample: (B, Lq, heads * D).
    """
    B, _, nh, D = value.shape
    Lq, L, P = locations.shape[1], locations.shape[3], locations.shape[4]
    # grid_sample's grid is in [-1, 1] with align_corners=False: pixel = ((g + 1) * size - 1) / 2 = loc * size - 0.5,
    # the same sampling position as the CUDA kernel, and both read zeros outside the map.
    grids = (2 * locations - 1).transpose(1, 2)  # (B, heads, Lq, L, P, 2)
    w = weights.transpose(1, 2).reshape(B * nh, 1, Lq, L, P)
    out = None
    for lvl, v in enumerate(value.split([h * wd for h, wd in shapes], dim=1)):
        h, wd = shapes[lvl]
        v = v.permute(0, 2, 3, 1).reshape(B * nh, D, h, wd)  # (B*heads, D, h, w): every head samples its own map
        s = F.grid_sample(v, grids[:, :, :, lvl].reshape(B * nh, Lq, P, 2), mode="bilinear", padding_mode="zeros",
                          align_corners=False)  # (B*heads, D, Lq, P)
        s = (s * w[:, :, :, lvl]).sum(-1)
        out = s if out is None else out + s
    return out.view(B, nh * D, Lq).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR; the ViT-Adapter ``MSDeformAttn`` used by GPViT).

    Each query predicts, per head, level and point, a sampling offset (in pixels of that level) around its reference
    point and an attention weight (softmax over levels x points); the output is the weighted sum of bilinear samples
    of the projected value maps, then an output projection.

    Args:
        dim: query/value width. num_heads: heads (dim * value_ratio must divide by it). num_levels: value maps.
        num_points: samples per head and level. value_ratio: value width = int(dim * value_ratio).
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 value_ratio: float = 1.0):
        super().__init__()
        vdim = int(dim * value_ratio)
        if vdim % num_heads:
            raise UserError(f"MultiScaleDeformableAttention: value width {vdim} must be divisible by num_heads "
                            f"{num_heads}; pick num_heads dividing {vdim}.")
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, vdim)
        self.output_proj = nn.Linear(vdim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # Deformable-DETR init: offsets start as a fixed pattern (head h looks along direction 2*pi*h/heads, scaled to
        # the unit square's border, point p at distance p+1 pixels), uniform attention, xavier projections.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().amax(-1, keepdim=True)
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        grid = grid[:, None, None, :] * scale[None, None, :, None]  # (heads, 1, points, 2)
        self.sampling_offsets.bias.copy_(grid.expand(-1, self.num_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, ref_points: torch.Tensor, value: torch.Tensor,
                shapes: Shapes) -> torch.Tensor:
        """query (B, Lq, C); ref_points (B or 1, Lq, L or 1, 2) as (x, y) in [0, 1]; value (B, sum h*w, C) holding
        the levels' maps row-major, concatenated; shapes: the levels' (h, w) as Python ints. Returns (B, Lq, C)."""
        if query.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(query.device.type):
            # fp32 like the official ``force_fp32``: in bf16 a location in [0, 1] is only good to ~1/256, i.e.
            # more than half a pixel on a 168-wide stride-8 map
            with torch.autocast(query.device.type, enabled=False):
                return self._forward(query.float(), ref_points.float(), value.float(), shapes)
        return self._forward(query, ref_points, value, shapes)

    def _forward(self, query, ref_points, value, shapes):
        B, Lq, _ = query.shape
        L, P, nh = self.num_levels, self.num_points, self.num_heads
        if len(shapes) != L:
            raise UserError(f"MultiScaleDeformableAttention has {L} level(s) but got {len(shapes)} shapes {shapes}")
        if ref_points.shape[-1] != 2:
            raise UserError("reference points must be (x, y) points, last dim 2 (reference boxes are not supported)")
        v = self.value_proj(value)
        v = v.view(B, v.shape[1], nh, v.shape[-1] // nh)
        off = self.sampling_offsets(query).view(B, Lq, nh, L, P, 2)
        w = self.attention_weights(query).view(B, Lq, nh, L * P).softmax(-1).view(B, Lq, nh, L, P)
        # offsets are in pixels of each level: divide by (w, h) of that level
        norm = off.new_tensor([[wd, h] for h, wd in shapes])  # (L, 2)
        loc = ref_points[:, :, None, :, None, :] + off / norm[:, None, :]
        return self.output_proj(ms_deform_attn_sample(v, shapes, loc, w))


# ----------------------------------------------------------------------------------------------------------------
# adapter modules (official names: Injector, Extractor, ConvFFN, InteractionBlock, SpatialPriorModule)

class _LevelDWConv(nn.Module):
    """Depthwise 3x3 conv applied separately to each level inside the concatenated token set (one shared weight).
    Wrapper so that the key is ``dwconv.dwconv.*`` as in the official ``DWConv``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:  # (B, sum h*w, C)
        B, _, C = x.shape
        outs = []
        for t, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes):
            # (B, h*w, C) seen as a channels-last image: no copy into the conv, none out of it
            outs.append(self.dwconv(t.reshape(B, h, w, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, h * w, C))
        return torch.cat(outs, dim=1)


class ConvFFN(nn.Module):
    """fc1 -> per-level depthwise conv -> GELU -> fc2 (dropout after both, 0 in the official configs)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _LevelDWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), shapes)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """Image tokens (query) read the SPM token set: x + gamma * MSDeformAttn(LN(x), LN(c)); gamma starts at
    ``init_values`` (0 officially), so the adapter does not change the GPViT at init."""

    def __init__(self, dim, num_heads=6, num_points=4, num_levels=3, value_ratio=1.0, init_values=0.0, norm_eps=1e-6):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.feat_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points, value_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, ref, c, shapes):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes)


class Extractor(nn.Module):
    """The SPM token set (query) reads the image tokens: c += MSDeformAttn(LN(c), LN(x)) (one level), then
    c += DropPath(ConvFFN(LN(c)))."""

    def __init__(self, dim, num_heads=6, num_points=4, value_ratio=1.0, cffn_ratio=0.25, drop=0.0, drop_path=0.0,
                 norm_eps=1e-6):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.feat_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiScaleDeformableAttention(dim, num_heads, 1, num_points, value_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop)
        self.ffn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c, ref, x, x_shape, c_shapes):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [x_shape])
        return c + self.drop_path(self.ffn(self.ffn_norm(c), c_shapes))


class InteractionBlock(nn.Module):
    """Injector -> a group of GPViT layers at the stride-8 grid -> extractor (+ 2 extra extractors in the last)."""

    def __init__(self, dim, num_heads=6, num_points=4, value_ratio=1.0, init_values=0.0, cffn_ratio=0.25, drop=0.0,
                 drop_path=0.0, extra_extractor=False, norm_eps=1e-6):
        super().__init__()
        self.injector = Injector(dim, num_heads, num_points, 3, value_ratio, init_values, norm_eps)
        ext = dict(num_heads=num_heads, num_points=num_points, value_ratio=value_ratio, cffn_ratio=cffn_ratio,
                   drop=drop, drop_path=drop_path, norm_eps=norm_eps)
        self.extractor = Extractor(dim, **ext)
        self.extra_extractors = nn.Sequential(*[Extractor(dim, **ext) for _ in range(2)]) if extra_extractor else None

    def forward(self, x, c, blocks, run_block, ref_x, ref_c, shapes):
        """x (B, H, W, C) image tokens, c (B, sum h*w, C) SPM tokens at ``shapes`` (strides 8/16/32)."""
        B, H, W, C = x.shape
        x = self.injector(x.reshape(B, H * W, C), ref_x, c, shapes).view(B, H, W, C)
        for blk in blocks:
            x = run_block(blk, x)
        t = x.reshape(B, H * W, C)
        c = self.extractor(c, ref_c, t, (H, W), shapes)
        if self.extra_extractors is not None:
            for ext in self.extra_extractors:
                c = ext(c, ref_c, t, (H, W), shapes)
        return x, c


def _conv_bn_relu(cin, cout, stride):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv branch: stem (3 conv3x3 + BN + ReLU, max-pool) at stride 4, then stride-2 convs to 8/16/32, and 1x1
    convs ``fc1..fc4`` to C channels (``fc1`` only when the stride-4 map is used). BatchNorm here (the official code
    builds SyncBN; the trainer converts BN to SyncBN under DDP, as the official ``convert_syncbn=True`` does)."""

    def __init__(self, inplanes: int = 64, embed_dim: int = 384, out_c1: bool = True):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.out_c1 = out_c1
        if out_c1:
            self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor):
        """-> c1 map (B, C, H/4, W/4) or None, and c2, c3, c4 as token lists (B, h*w, C)."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c1 = self.fc1(c1) if self.out_c1 else None
        return c1, [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]


# ----------------------------------------------------------------------------------------------------------------
# the backbone

def _default_interaction_indexes(depth: int) -> List[Tuple[int, int]]:
    if depth == 12:
        return [tuple(g) for g in OFFICIAL_INTERACTION_INDEXES]
    n = min(4, depth)  # other depths (tiny test models): up to 4 contiguous, near-equal groups
    bounds = [round(i * depth / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]


class GPViTAdapter(nn.Module):
    """GPViT + ViT-Adapter, the official detection backbone (``GPViTAdapter`` / ``GPViTAdapterSingleStage``).

    Args:
        model_name: a registered GPViT (gpvit_l1..l4, gpvit_test); built with final_norm off and no neck/head.
        single_stage: the RetinaNet variant: no stride-4 output (no ``spm.fc1``, ``up``, ``ad_norm1``).
        checkpoint: weights to load: a GPViT classification checkpoint (official mmcls or ours; initialises the
            GPViT part, the adapter keeps its init), or an adapter checkpoint (official mmdet detector/backbone or
            ours). A file, a save_pretrained folder or a pretrain run folder.
        drop_path_rate: GPViT stochastic depth (linspace over the 12 layers) and the extractors' constant drop path
            (official detection configs: 0.1; 0.2 for L3 3x and L4). None means 0.1.
        conv_inplane: SPM width (official 64; default 64, or 16 for GPViTs narrower than 64 channels, i.e. the tiny
            test model). deform_num_heads, n_points, deform_ratio, cffn_ratio, init_values, add_vit_feature,
            use_extra_extractor, interaction_indexes: the official adapter options with the official defaults.
        **kwargs: passed to the GPViT builder (e.g. img_size: the pretraining size that fixes the pos_embed grid).

    forward(x (B, 3, H, W), H and W multiples of ``size_divisor`` = 32) -> list of (B, C, H/s, W/s) maps for s in
    ``strides``.
    """

    size_divisor = 32
    no_weight_decay_keywords = NO_WEIGHT_DECAY_KEYWORDS

    def __init__(self, model_name: str = "gpvit_l1", single_stage: bool = False, checkpoint: Optional[str] = None,
                 drop_path_rate: Optional[float] = 0.1, conv_inplane: Optional[int] = None, deform_num_heads: int = 6,
                 n_points: int = 4, deform_ratio: float = 1.0, cffn_ratio: float = 0.25, init_values: float = 0.0,
                 add_vit_feature: bool = True, use_extra_extractor: bool = True,
                 interaction_indexes: Optional[Sequence[Sequence[int]]] = None, **kwargs):
        super().__init__()
        from ..models import create_model
        from ..models.gpvit import GPViT

        for k in ("num_classes", "global_pool", "final_norm"):
            if k in kwargs:
                raise UserError(f"GPViTAdapter sets {k} of the GPViT itself (no classifier, no final norm); "
                                f"remove {k}={kwargs[k]!r}.")
        from timm.models import is_model, model_entrypoint

        drop_path_rate = 0.1 if drop_path_rate is None else float(drop_path_rate)

        if not is_model(model_name) or model_entrypoint(model_name).__module__ != GPViT.__module__:
            raise UserError(f"GPViTAdapter wraps a GPViT (gpvit_l1, gpvit_l2, gpvit_l3, gpvit_l4 or gpvit_test); "
                            f"got {model_name!r}. Use neck='simple' or 'native' for other backbones.")
        vit = create_model(model_name, num_classes=0, global_pool="", final_norm=False, drop_path_rate=drop_path_rate,
                           **kwargs)
        self.vit = vit
        self.model_name = model_name
        self.single_stage = single_stage
        self.add_vit_feature = add_vit_feature
        C = self.embed_dim = vit.embed_dim
        depth = len(vit.blocks)
        idx = _default_interaction_indexes(depth) if interaction_indexes is None else \
            [tuple(int(i) for i in g) for g in interaction_indexes]
        if [i for lo, hi in idx for i in range(lo, hi + 1)] != list(range(depth)):
            raise UserError(f"interaction_indexes {idx} must cover the {depth} GPViT layers in order, e.g. "
                            f"{_default_interaction_indexes(depth)}.")
        self.interaction_indexes = idx
        if conv_inplane is None:
            conv_inplane = 64 if C >= 64 else 16

        self.level_embed = nn.Parameter(torch.zeros(3, C))
        self.spm = SpatialPriorModule(conv_inplane, C, out_c1=not single_stage)
        self.interactions = nn.Sequential(*[
            InteractionBlock(C, deform_num_heads, n_points, deform_ratio, init_values, cffn_ratio,
                             drop_path=drop_path_rate, extra_extractor=use_extra_extractor and i == len(idx) - 1)
            for i in range(len(idx))])
        if not single_stage:
            self.up = nn.ConvTranspose2d(C, C, 2, 2)
            self.ad_norm1 = nn.BatchNorm2d(C)
        self.ad_norm2 = nn.BatchNorm2d(C)
        self.ad_norm3 = nn.BatchNorm2d(C)
        self.ad_norm4 = nn.BatchNorm2d(C)
        self.strides = [8, 16, 32] if single_stage else [4, 8, 16, 32]
        self.out_channels = [C] * len(self.strides)
        self.init_weights()
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    @torch.no_grad()
    def init_weights(self):
        """Official init of the adapter part (the GPViT keeps its own): Linear trunc-normal(0.02)/0, LN and BN 1/0,
        convs and the ConvTranspose N(0, sqrt(2 / fan_out)) with bias 0, then the deformable-attention init and a
        standard-normal level_embed."""
        def init(m):
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        for name, m in self.named_children():
            if name != "vit" and name != "level_embed":
                m.apply(init)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def load_checkpoint(self, path: str) -> "GPViTAdapter":
        """Load a GPViT classification checkpoint or an adapter checkpoint (see the class docstring)."""
        from ..models import resolve_checkpoint
        from ..models._registry import load_weights

        return load_weights(self, resolve_checkpoint(path), filter_fn=adapter_checkpoint_filter_fn)

    # ------------------------------------------------------------------------------------------------------------
    def check_input_size(self, H: int, W: int) -> None:
        """Sides must be multiples of 32: the SPM's stride-32 map, the level sizes (H/8, H/16, H/32) that the
        deformable attention and the per-level ConvFFN assume, and the x0.5 / x0.25 resizes of the GPViT tokens only
        line up then (the official pipeline pads to 32 for this reason; GPViT alone needs 16)."""
        d = self.size_divisor
        if H % d or W % d or H < d or W < d:
            def up(v):
                return max(d, -(-v // d) * d)
            raise UserError(f"GPViTAdapter takes inputs whose height and width are multiples of {d} (at least "
                            f"{d}x{d}), e.g. 512x512 or 800x1344; got {H}x{W}. Pad to {up(H)}x{up(W)} (the "
                            f"detection/segmentation input side pads to size_divisor={d}).")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        B, _, Hi, Wi = x.shape
        self.check_input_size(Hi, Wi)
        H, W = Hi // 8, Wi // 8
        shapes = [(H, W), (H // 2, W // 2), (H // 4, W // 4)]
        sizes = [h * w for h, w in shapes]

        c1, cs = self.spm(x)
        c = torch.cat([t + self.level_embed[i] for i, t in enumerate(cs)], dim=1)
        vit = self.vit
        t = vit.embed_tokens(x)  # (B, H, W, C), pos_embed resized bicubically
        ref_x = reference_points(shapes[:1], x.device, t.dtype)  # queries of the injector: the stride-8 grid
        ref_c = reference_points(shapes, x.device, t.dtype)  # queries of the extractors: the three levels
        for (lo, hi), inter in zip(self.interaction_indexes, self.interactions):
            t, c = inter(t, c, vit.blocks[lo:hi + 1], vit.run_block, ref_x, ref_c, shapes)

        C = t.shape[-1]
        c2, c3, c4 = [m.transpose(1, 2).reshape(B, C, h, w) for m, (h, w) in zip(c.split(sizes, dim=1), shapes)]
        outs = [c2, c3, c4]
        if not self.single_stage:
            outs.insert(0, self.up(c2) + c1)
        if self.add_vit_feature:
            x2 = t.permute(0, 3, 1, 2)
            feats = [F.interpolate(x2, size=(h, w), mode="bilinear", align_corners=False) for h, w in shapes[1:]]
            feats.insert(0, x2)
            if not self.single_stage:
                feats.insert(0, F.interpolate(x2, size=(2 * H, 2 * W), mode="bilinear", align_corners=False))
            outs = [o + f for o, f in zip(outs, feats)]
        norms = [self.ad_norm2, self.ad_norm3, self.ad_norm4]
        if not self.single_stage:
            norms.insert(0, self.ad_norm1)
        return [n(o) for n, o in zip(norms, outs)]

    # ------------------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        """Full names of the parameters the official configs train without weight decay (keyword match)."""
        return {n for n, _ in self.named_parameters() if any(k in n for k in self.no_weight_decay_keywords)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.vit.set_grad_checkpointing(enable)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def _unwrap(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    from ..models._registry import unwrap_state_dict

    return unwrap_state_dict(state_dict, ("state_dict", "state_dict_ema", "model"))


def _gpvit_part(state_dict: Dict[str, torch.Tensor], model: GPViTAdapter) -> Dict[str, torch.Tensor]:
    """GPViT keys (official or ours) -> ``vit.*`` keys; the final norm / extra out norms (off here) are dropped."""
    from ..models.gpvit import checkpoint_filter_fn

    sd = checkpoint_filter_fn(state_dict, model.vit)
    own = model.vit.state_dict()
    return {f"vit.{k}": v for k, v in sd.items() if k in own or not re.match(r"^(norm|out_norms)\.", k)}


def adapter_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: GPViTAdapter) -> Dict[str, torch.Tensor]:
    """Checkpoint -> our GPViTAdapter state dict. Accepts (after ``state_dict`` / ``module.`` unwrapping):

    * an official mmdet checkpoint (``backbone.*`` plus FPN/heads, which are dropped) or a bare official adapter
      backbone: adapter keys (``level_embed``, ``spm.*``, ``interactions.*``, ``up.*``, ``ad_norm*``) keep their
      names; the GPViT keys go through ``visionzoo.models.gpvit.checkpoint_filter_fn`` and get the ``vit.`` prefix;
    * our own adapter state dict: unchanged;
    * a GPViT classification checkpoint (official mmcls or ours): converted to ``vit.*`` (neck, head and the final
      norm dropped); the adapter part is taken from ``model`` (it keeps its initialisation).
    """
    sd = _unwrap(state_dict)
    if any(k.startswith("vit.") for k in sd):  # ours
        return dict(sd)
    if any(k.startswith("backbone.") for k in sd) and any(k[9:].startswith(_ADAPTER_PREFIXES) for k in sd):
        sd = {k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}  # a detector: keep the backbone
    adapter = {k: v for k, v in sd.items() if k.startswith(_ADAPTER_PREFIXES)}
    out = _gpvit_part({k: v for k, v in sd.items() if k not in adapter}, model)
    if not adapter:  # a classification checkpoint: the adapter keeps the model's own (initial) weights
        adapter = {k: v for k, v in model.state_dict().items() if not k.startswith("vit.")}
    out.update(adapter)
    return out


checkpoint_filter_fn = adapter_checkpoint_filter_fn  # the name visionzoo's load_weights looks up
