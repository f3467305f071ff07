"""Context Cluster (CoC): "Image as Set of Points", Ma et al., ICLR 2023.

An image is a set of points (RGB + two coordinate channels). Each block clusters the points of every head (inside
local regions, the "fold") around centers pooled from the similarity features, aggregates the values of each cluster
and dispatches the result back to its points. Official code: github.com/ma-xu/Context-Cluster; this file is a
re-implementation from its spec (shared/specs/coc.md) checked against reference tensors from the official code.

Differences from the official code that do not change what a checkpoint computes:

* Activations stay channels-last ``[B, H, W, C]`` inside the stages (the MLP is already channels-last), so the 1x1
  convs become linear layers and the GroupNorm(1 group) becomes a layer norm over (H, W, C) plus a channel affine.
* The clustering is written as scatter + bmm with a constant pooling matrix (spec section 7), not as the
  official broadcast products that build a ``[B', M, N, D]`` tensor twice per block. Similarity, sigmoid and argmax
  run in fp32 even under autocast (a saturated low-precision sigmoid creates ties that change the assignment).
  ``cluster_impl='reference'`` selects the official formulation (same weights) as an oracle and timing baseline.
* Folds and proposals are given as ``(rows, cols)`` per stage. The official ``fold_w``/``proposal_w`` act on rows
  (H) and the official code only partitions when *both* fold numbers are > 1; :func:`official_kwargs_to_ours`
  translates official constructor arguments, quirks included.
* The legacy checkpoints (before 2023-06: ``fc1/fc2/fc_v`` names, conv-shaped MLP weights, ``fea_pos``; still the
  COCO/ADE20K ones) were trained with a count-based normaliser; ``legacy_norm=True`` restores it and
  :func:`checkpoint_filter_fn` switches it on when it converts such a checkpoint.

The point-cloud variant (PointMLP with CoC blocks, ``coc_pointmlp``) is in ``coc_pointmlp.py``.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_function, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ._registry import accepts_factory_kwargs, factory_kwargs_of, is_tracing, register_alias, unwrap_state_dict

__all__ = [
    "ContextCluster", "Cluster", "ClusterBlock", "PointReducer", "GroupNorm1", "checkpoint_filter_fn",
    "official_kwargs_to_ours", "pooling_matrix",
]

_logger = logging.getLogger(__name__)

Pair = Tuple[int, int]

CLUSTER_IMPLS = ("fast", "reference")


def _check_cluster_impl(impl: str) -> str:
    if impl not in CLUSTER_IMPLS:
        raise UserError(f"cluster_impl={impl!r} is not known: use one of {', '.join(map(repr, CLUSTER_IMPLS))} "
                        "('fast': scatter + bmm; 'reference': the official broadcast formulation, slow)")
    return impl


def _per_stage(value, n: int) -> list:
    """An int/float (same for every stage) or a sequence of n values."""
    if isinstance(value, (int, float)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise UserError(f"expected {n} per-stage values, got {value}")
    return value


def _pairs(value, n: int) -> List[Pair]:
    """Per-stage (rows, cols) pairs from an int (every stage, square), a list of ints (square) or of pairs."""
    value = _per_stage(value, n)
    return [(int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1])) for v in value]


def pooling_matrix(h: int, w: int, rows: int, cols: int, device=None, dtype=None) -> torch.Tensor:
    """``P[M, N]`` with ``P @ x == AdaptiveAvgPool2d((rows, cols))`` of ``x`` flattened row-major over ``h x w``.

    Windows are PyTorch's ``[floor(i*in/out), ceil((i+1)*in/out))`` and overlap when ``in % out != 0`` (7 -> 2
    gives [0,4) and [3,7)). Built from tensor ops (no caching) so it traces and exports.
    """
    def axis(size: int, out: int) -> torch.Tensor:
        i = torch.arange(out, device=device)
        start = (i * size) // out
        end = ((i + 1) * size + out - 1) // out
        pos = torch.arange(size, device=device)
        mask = ((pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])).to(dtype or torch.float32)
        return mask / mask.sum(1, keepdim=True)

    r, c = axis(h, rows), axis(w, cols)  # [rows, h], [cols, w]
    return (r[:, None, :, None] * c[None, :, None, :]).reshape(rows * cols, h * w)


@register_notrace_function  # torch.fx: shape logic, a leaf call in traced graphs
def append_coords(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C + 2, H, W]``: the coordinate channels ``i/(H-1) - 0.5`` (rows) and
    ``j/(W-1) - 0.5`` (cols)."""
    B, _, H, W = x.shape
    rows = torch.arange(H, device=x.device, dtype=torch.float32) / (H - 1.0) - 0.5
    cols = torch.arange(W, device=x.device, dtype=torch.float32) / (W - 1.0) - 0.5
    pos = torch.stack([rows[:, None].expand(H, W), cols[None, :].expand(H, W)]).to(x.dtype)
    return torch.cat([x, pos.unsqueeze(0).expand(B, -1, -1, -1)], dim=1)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group (statistics over C, H and W jointly) on channels-last ``[B, H, W, C]`` maps.

    Same parameters and math as ``nn.GroupNorm(1, C)`` on NCHW: a layer norm over (H, W, C) then a channel affine.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[1:], eps=self.eps)
        return torch.addcmul(self.bias, x, self.weight)


class PointReducer(nn.Module):
    """The paper's point reducer (each anchor aggregates its k nearest points linearly) == a strided conv.

    Takes and returns channels-last maps; the conv runs on a channels_last-memory NCHW view (no copies).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.Identity()  # the official layer has no norm in any variant

    def forward(self, x: torch.Tensor, nchw_input: bool = False) -> torch.Tensor:
        if not nchw_input:
            x = x.permute(0, 3, 1, 2)
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return self.norm(x.permute(0, 2, 3, 1).contiguous())


@register_notrace_module  # torch.fx: shape-dependent partition / scatter; a leaf module in traced graphs
class Cluster(nn.Module):
    """The context-cluster token mixer on channels-last maps ``[B, H, W, C]``.

    Per head and region: centers = adaptive average pool of the similarity features ``f(x)`` (as a constant
    pooling matrix), ``sim = sigmoid(beta + alpha * cos(center, point))``, each point joins its most similar center
    (hard argmax), ``g_m = (sum_n s_n v_n + v_center_m) / (sum_n s_n + 1)`` over the points of cluster m, and each
    point receives ``s_n * g_{m(n)}``. State-dict names (``f``, ``v``, ``proj``: 1x1 convs) follow the official code.

    ``impl='reference'`` runs :meth:`forward_reference`, a plain re-statement of the official broadcast
    formulation, instead of the fast path: same parameters and state dict, for oracle tests and for timing the
    fast path against it (``visionzoo benchmark --model-kwargs cluster_impl=reference``).
    """

    def __init__(
            self,
            dim: int,
            out_dim: Optional[int] = None,
            heads: int = 4,
            head_dim: int = 24,
            proposal: Pair = (2, 2),
            fold: Pair = (1, 1),
            legacy_norm: bool = False,
            impl: str = "fast",
    ):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.proposal = tuple(proposal)  # (rows, cols) of centers per region
        self.fold = tuple(fold)  # (rows, cols) of regions
        self.legacy_norm = legacy_norm
        self.impl = _check_cluster_impl(impl)
        self.f = nn.Conv2d(dim, heads * head_dim, kernel_size=1)  # similarity space
        self.proj = nn.Conv2d(heads * head_dim, out_dim or dim, kernel_size=1)
        self.v = nn.Conv2d(dim, heads * head_dim, kernel_size=1)  # values
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, proposal={self.proposal}, fold={self.fold}" + (
            ", legacy_norm=True" if self.legacy_norm else "") + (f", impl={self.impl!r}" if self.impl != "fast" else "")

    def _split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """f and v in one GEMM, then heads and regions into the batch with one permute: ``[2, B*E*fr*fc, h*w, D]``."""
        B, H, W, _ = x.shape
        E, D = self.heads, self.head_dim
        fr, fc = self.fold
        h, w = H // fr, W // fc
        weight = torch.cat([self.f.weight, self.v.weight]).flatten(1)
        bias = torch.cat([self.f.bias, self.v.bias])
        qv = F.linear(x, weight, bias)  # [B, H, W, 2*E*D], channels head-major like the official rearrange
        qv = qv.view(B, fr, h, fc, w, 2, E, D).permute(5, 0, 6, 1, 3, 2, 4, 7)
        qv = qv.reshape(2, B * E * fr * fc, h * w, D)
        pool = pooling_matrix(h, w, *self.proposal, device=x.device, dtype=qv.dtype)
        centers = torch.matmul(pool, qv)  # [2, B', M, D]: similarity centers and value centers in one GEMM
        return qv, centers

    def _assign(self, q: torch.Tensor, centers: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Similarity of each point to its best center ``s [B', N]`` and that center's index ``idx [B', N]``."""
        if q.device.type != "meta" and torch.is_autocast_enabled(q.device.type):
            with torch.autocast(device_type=q.device.type, enabled=False):
                return self._assign(q.float(), centers.float())
        cos = torch.bmm(F.normalize(centers, dim=-1), F.normalize(q, dim=-1).transpose(1, 2))  # [B', M, N]
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)
        s, idx = sim.max(dim=1)  # hard assignment over centers (argmax on the post-sigmoid value, as official)
        return s, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "reference":
            return self.forward_reference(x)
        B, H, W, _ = x.shape
        E, D = self.heads, self.head_dim
        fr, fc = self.fold
        qv, centers = self._split(x)
        q, v = qv[0], qv[1]
        s, idx = self._assign(q, centers[0])
        s = s.to(v.dtype)
        M = centers.shape[2]
        # aggregate: W[m, n] = s_n if point n belongs to center m, so W @ v sums the similarity-weighted values
        weights = torch.zeros(q.shape[0], M, q.shape[1], device=v.device, dtype=v.dtype)
        weights = weights.scatter(1, idx.unsqueeze(1), s.unsqueeze(1))
        agg = torch.baddbmm(centers[1], weights, v)  # [B', M, D]: sum_n s_n v_n + value center
        if self.legacy_norm:  # pre-2023-06 code normalised by the point count (official issue #7)
            count = torch.zeros_like(weights[:, :, 0]).scatter_add(1, idx, torch.ones_like(s))
            agg = agg / (count + 1.0).unsqueeze(-1)
        else:
            agg = agg / (weights.sum(-1, keepdim=True) + 1.0)
        # dispatch: each point gets its cluster's feature scaled again by its own similarity, s_n * agg[idx_n];
        # W^T @ agg is exactly that (one nonzero per row) and is ~2.5x faster on CPU than gather + mul
        out = torch.bmm(weights.transpose(1, 2), agg)  # [B', N, D]
        out = out.view(B, E, fr, fc, H // fr, W // fc, D).permute(0, 2, 4, 3, 5, 1, 6).reshape(B, H, W, E * D)
        return F.linear(out, self.proj.weight.flatten(1), self.proj.bias)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official broadcast formulation (spec sections 1.4 and 7), written plainly; slow, for checks and timing.

        NCHW 1x1 convs, heads and regions moved into the batch, AdaptiveAvgPool centers, ``sigmoid(beta + alpha
        cos)``, a one-hot argmax mask, and aggregate / dispatch as broadcast products that build a
        ``[B', M, N, D]`` tensor and sum it. Takes and returns channels-last maps like :meth:`forward`; no fp32
        guard under autocast (the official code has none).
        """
        E, D = self.heads, self.head_dim
        fr, fc = self.fold
        x = x.permute(0, 3, 1, 2)  # the official module works on NCHW
        value, p = self.v(x), self.f(x)  # [B, E*D, H, W]
        B, _, H, W = p.shape
        h, w = H // fr, W // fc

        def to_regions(t):  # channel e*D + d -> batch b*E + e; region (i, j) -> batch ((b*E + e)*fr + i)*fc + j
            t = t.reshape(B * E, D, fr, h, fc, w).permute(0, 2, 4, 1, 3, 5)
            return t.reshape(B * E * fr * fc, D, h, w)

        value, p = to_regions(value), to_regions(p)
        centers = F.adaptive_avg_pool2d(p, self.proposal).flatten(2).transpose(1, 2)  # [B', M, D]
        value_centers = F.adaptive_avg_pool2d(value, self.proposal).flatten(2).transpose(1, 2)
        points = p.flatten(2).transpose(1, 2)  # [B', N, D]
        cos = F.normalize(centers, dim=-1) @ F.normalize(points, dim=-1).transpose(1, 2)  # [B', M, N]
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)
        _, idx = sim.max(dim=1, keepdim=True)
        mask = torch.zeros_like(sim).scatter_(1, idx, 1.0)  # one-hot over centers
        sim = sim * mask
        v = value.flatten(2).transpose(1, 2)  # [B', N, D]
        # aggregate: [B', 1, N, D] * [B', M, N, 1] summed over N, plus the value center
        num = (v.unsqueeze(1) * sim.unsqueeze(-1)).sum(2) + value_centers  # [B', M, D]
        den = (mask if self.legacy_norm else sim).sum(-1, keepdim=True) + 1.0  # legacy: point count (issue #7)
        # dispatch: [B', M, 1, D] * [B', M, N, 1] summed over M
        out = ((num / den).unsqueeze(2) * sim.unsqueeze(-1)).sum(1)  # [B', N, D]
        out = out.transpose(1, 2).reshape(B * E, fr, fc, D, h, w).permute(0, 3, 1, 4, 2, 5)
        out = self.proj(out.reshape(B, E * D, H, W))
        return out.permute(0, 2, 3, 1)

    @torch.no_grad()
    def cluster_assignment(self, x: torch.Tensor) -> torch.Tensor:
        """Hard assignment of every point: ``LongTensor [B, heads, H, W]`` of cluster ids ``region * M + center``
        (regions numbered row-major over the fold grid, centers row-major over the proposal grid)."""
        B, H, W, _ = x.shape
        E = self.heads
        fr, fc = self.fold
        h, w = H // fr, W // fc
        qv, centers = self._split(x)
        _, idx = self._assign(qv[0], centers[0])
        M = centers.shape[2]
        region = torch.arange(fr * fc, device=x.device).view(1, 1, fr, fc, 1, 1) * M
        idx = idx.view(B, E, fr, fc, h, w) + region
        return idx.permute(0, 1, 2, 4, 3, 5).reshape(B, E, H, W)


class ClusterBlock(nn.Module):
    """Pre-norm MetaFormer block: ``x + ls1 * Cluster(GN(x))``, then ``x + ls2 * Mlp(GN(x))`` (channels-last)."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.0,
            heads: int = 4,
            head_dim: int = 24,
            proposal: Pair = (2, 2),
            fold: Pair = (1, 1),
            act_layer=nn.GELU,
            drop: float = 0.0,
            drop_path: float = 0.0,
            use_layer_scale: bool = True,
            layer_scale_init_value: float = 1e-5,
            legacy_norm: bool = False,
            cluster_impl: str = "fast",
    ):
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = Cluster(dim, dim, heads, head_dim, proposal, fold, legacy_norm, impl=cluster_impl)
        self.norm2 = GroupNorm1(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.token_mixer(self.norm1(x))
        x = x + self.drop_path(y * self.layer_scale_1 if self.use_layer_scale else y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y * self.layer_scale_2 if self.use_layer_scale else y)


@accepts_factory_kwargs
class ContextCluster(nn.Module):
    """Context Cluster classifier / dense backbone (timm API).

    ``network`` interleaves the 4 stages (``nn.Sequential`` of :class:`ClusterBlock`) with the point reducers, as in
    the official state dict (``network.0`` stage 0, ``network.1`` reducer, ``network.2`` stage 1, ...).
    ``fork_feat=True`` is the official detection/segmentation backbone: every stage output gets its own GroupNorm
    (``norm0/norm2/norm4/norm6``) and there is no final norm; ``features_only`` / ``forward_intermediates`` return
    those normalised maps. Input: a normalised RGB image ``[B, in_chans, H, W]``; the coordinate channels are added
    here. H and W must let every partitioned stage map split evenly into its folds (see ``valid_input_size``).
    ``cluster_impl``: ``'fast'`` (default) or ``'reference'`` (the official broadcast formulation, to check and time
    the fast path against); the state dict is the same for both.
    """

    def __init__(
            self,
            layers: Sequence[int] = (3, 4, 5, 2),
            embed_dims: Sequence[int] = (32, 64, 196, 320),
            mlp_ratios: Union[float, Sequence[float]] = (8, 8, 4, 4),
            heads: Union[int, Sequence[int]] = (4, 4, 8, 8),
            head_dims: Union[int, Sequence[int]] = 24,
            proposals=2,
            folds=((8, 8), (4, 4), (2, 2), (1, 1)),
            downsamples: Union[bool, Sequence[bool]] = True,
            in_patch_size: int = 4,
            in_stride: int = 4,
            in_pad: int = 0,
            down_patch_size: int = 3,
            down_stride: int = 2,
            down_pad: int = 1,
            num_classes: int = 1000,
            global_pool: str = "avg",
            in_chans: int = 3,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            use_layer_scale: bool = True,
            layer_scale_init_value: float = 1e-5,
            fork_feat: bool = False,
            legacy_norm: bool = False,
            cluster_impl: str = "fast",
            act_layer=nn.GELU,
    ):
        super().__init__()
        _check_cluster_impl(cluster_impl)
        n = len(layers)
        embed_dims = list(embed_dims)
        mlp_ratios = _per_stage(mlp_ratios, n)
        heads = _per_stage(heads, n)
        head_dims = _per_stage(head_dims, n)
        self.proposals = _pairs(proposals, n)
        self.folds = _pairs(folds, n)
        downsamples = _per_stage(downsamples, n)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.fork_feat = fork_feat
        self.in_chans = in_chans
        self.grad_checkpointing = False

        self.patch_embed = PointReducer(in_chans + 2, embed_dims[0], in_patch_size, in_stride, in_pad)
        self._stem = (in_patch_size, in_stride, in_pad)
        self._down = (down_patch_size, down_stride, down_pad)
        total = sum(layers)
        network, self.stage_indices, self.feature_info = [], [], []
        self._downsampled = []  # whether a point reducer follows stage i
        reduction, g = in_stride, 0
        for i in range(n):
            blocks = []
            for _ in range(layers[i]):
                dpr = drop_path_rate * g / (total - 1) if total > 1 else 0.0  # official divides by zero for 1
                blocks.append(ClusterBlock(
                    embed_dims[i], mlp_ratios[i], heads[i], head_dims[i], self.proposals[i], self.folds[i],
                    act_layer, drop_rate, dpr, use_layer_scale, layer_scale_init_value, legacy_norm,
                    cluster_impl=cluster_impl))
                g += 1
            self.stage_indices.append(len(network))
            network.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(
                num_chs=embed_dims[i], reduction=reduction,
                module=f"norm{len(network) - 1}" if fork_feat else f"network.{len(network) - 1}"))
            down = i < n - 1 and (downsamples[i] or embed_dims[i] != embed_dims[i + 1])
            self._downsampled.append(down)
            if down:
                network.append(PointReducer(embed_dims[i], embed_dims[i + 1], *self._down))
                reduction *= down_stride
        self.network = nn.ModuleList(network)
        self.num_features = self.head_hidden_size = embed_dims[-1]

        if fork_feat:
            for idx, dim in zip(self.stage_indices, embed_dims):
                self.add_module(f"norm{idx}", GroupNorm1(dim))
            self.norm = nn.Identity()  # the last stage's own norm plays that role
        else:
            self.norm = GroupNorm1(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official: trunc_normal(.02) for every Linear (MLPs, head); convs keep the PyTorch default init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------------------------
    # timm API

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^patch_embed", blocks=r"^network\.(\d+)" if coarse else [
            (r"^network\.(\d+)\.(\d+)", None), (r"^network\.(\d+)\.proj", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise UserError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes, **factory_kwargs_of(self)) if num_classes > 0 \
            else nn.Identity()
        self.head.train(self.training)

    def set_legacy_norm(self, enable: bool = True) -> None:
        """Count-based aggregation normaliser of the pre-2023-06 code (what the legacy checkpoints expect)."""
        for m in self.modules():
            if isinstance(m, Cluster):
                m.legacy_norm = enable

    # ------------------------------------------------------------------------------------------------------------
    # input sizes

    def _size_problem(self, size: int, axis: int) -> Optional[str]:
        """Why ``size`` (H if axis == 0 else W) does not fit, or None."""
        k, s, p = self._stem
        cur = (size + 2 * p - k) // s + 1
        if cur < 1:
            return f"{size} is smaller than the stem patch {k}"
        for i, fold in enumerate(self.folds):
            if fold[0] * fold[1] > 1 and cur % fold[axis] != 0:
                return f"stage {i} map is {cur}, not divisible by its fold {fold[axis]}"
            if self._downsampled[i]:
                k, s, p = self._down
                cur = (cur + 2 * p - k) // s + 1
        return None

    def size_multiple(self) -> Tuple[int, int]:
        """(rows, cols) multiple that always works: lcm over partitioned stages of stride x fold."""
        mult = [self._stem[1], self._stem[1]]
        stride = self._stem[1]
        for i, fold in enumerate(self.folds):
            if fold[0] * fold[1] > 1:
                for a in (0, 1):
                    mult[a] = math.lcm(mult[a], stride * fold[a])
            if self._downsampled[i]:
                stride *= self._down[1]
        if not any(f[0] * f[1] > 1 for f in self.folds):
            mult = [1, 1]
        return mult[0], mult[1]

    def valid_input_size(self, height: int, width: int) -> bool:
        return self._size_problem(height, 0) is None and self._size_problem(width, 1) is None

    def _check_size(self, height: int, width: int) -> None:
        problems = [(n, v, self._size_problem(v, a)) for n, v, a in (("height", height, 0), ("width", width, 1))]
        problems = [p for p in problems if p[2]]
        if not problems:
            return
        mult = self.size_multiple()
        name = (getattr(self, "pretrained_cfg", None) or {}).get("architecture", type(self).__name__)
        hints = []
        for n, v, why in problems:
            m = mult[0 if n == "height" else 1]
            below, above = (v // m) * m, (v // m + 1) * m
            hints.append(f"{n} {v} ({why}; nearest valid: {f'{below} or ' if below else ''}{above})")
        rule = (f"multiples of {mult[0]}" if mult[0] == mult[1] else f"heights multiple of {mult[0]} and widths "
                f"multiple of {mult[1]}")
        raise UserError(
            f"{name}: input size {height}x{width} is not supported: " + "; ".join(hints)
            + f". Its region partition (folds {[tuple(f) for f in self.folds]}) needs {rule}, e.g. "
            f"{mult[0] * max(1, round(224 / mult[0]))}x{mult[1] * max(1, round(224 / mult[1]))}. "
            "Resize or pad the image, or use a plain variant (coc_tiny_plain takes any size).")

    # ------------------------------------------------------------------------------------------------------------
    # forward

    def forward_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Append the coordinate channels ``i/(H-1) - 0.5`` (rows), ``j/(W-1) - 0.5`` (cols), then the stem.

        Returns channels-last ``[B, H/4, W/4, C0]``.
        """
        if not is_tracing():
            C, H, W = x.shape[1:]
            if C != self.in_chans:
                raise UserError(f"expected {self.in_chans} input channels (the 2 coordinate channels are added by "
                                f"the model), got {C}")
            self._check_size(H, W)
        return self.patch_embed(append_coords(x), nchw_input=True)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_embeddings(x)
        for m in self.network:
            x = self._run(m, x)
        x = getattr(self, f"norm{self.stage_indices[-1]}")(x) if self.fork_feat else self.norm(x)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Stage maps (NCHW). With ``fork_feat`` they pass through their own stage norms (the official dense
        outputs); otherwise ``norm=True`` applies the final norm to the last stage's map."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise UserError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stage_indices), indices)
        net_take = {self.stage_indices[i]: i for i in take_indices}
        last = self.stage_indices[max_index] if stop_early else len(self.network) - 1
        intermediates = []
        x = self.forward_embeddings(x)
        for idx, m in enumerate(self.network):
            if idx > last:
                break
            x = self._run(m, x)
            if idx in net_take:
                y = x
                if self.fork_feat:
                    y = getattr(self, f"norm{idx}")(y)
                elif norm and idx == self.stage_indices[-1]:
                    y = self.norm(y)
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        x = getattr(self, f"norm{self.stage_indices[-1]}")(x) if self.fork_feat else self.norm(x)
        return x.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stage_indices), indices)
        last = self.stage_indices[max_index]
        self.network = self.network[:last + 1]
        if self.fork_feat:
            for idx in self.stage_indices[max_index + 1:]:
                delattr(self, f"norm{idx}")
        self.stage_indices = self.stage_indices[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        self._downsampled = self._downsampled[:max_index] + [False]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

_LEGACY_MIXER = {"token_mixer.fc1.": "token_mixer.f.", "token_mixer.fc2.": "token_mixer.proj.",
                 "token_mixer.fc_v.": "token_mixer.v."}


def _unwrap(state_dict: dict) -> dict:
    """Training-script wrappers: timm train.py (``state_dict`` / ``state_dict_ema``), mmcv (``state_dict``, keys
    under ``backbone.``), plain ``model``; and DDP's ``module.`` prefix."""
    state_dict = unwrap_state_dict(state_dict, ("state_dict", "model", "state_dict_ema", "model_ema"))
    if any(k.startswith("backbone.") for k in state_dict):  # mmdet/mmseg detector or segmentor checkpoint
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return state_dict


def is_legacy_state_dict(state_dict: dict) -> bool:
    """Pre-2023-06 layout: ``fc1/fc2/fc_v`` mixer names, conv-shaped MLP weights or a ``fea_pos`` entry."""
    return any(
        k.endswith("fea_pos") or ".token_mixer.fc" in k or (".mlp.fc" in k and k.endswith("weight") and v.ndim == 4)
        for k, v in state_dict.items())


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official CoC checkpoint (any era) -> our state dict. Our own state dicts pass through unchanged.

    Legacy checkpoints are renamed (``fc1 -> f``, ``fc2 -> proj``, ``fc_v -> v``), their conv-shaped MLP weights
    squeezed and ``fea_pos`` dropped; since they were trained with the count normaliser, ``model`` is switched to
    ``legacy_norm`` (with a warning) so it computes what the checkpoint was trained to compute.
    A classification checkpoint loaded into a ``fork_feat`` backbone keeps the backbone's fresh stage norms (the
    official ``init_weights`` loads with ``strict=False`` the same way).
    """
    state_dict = _unwrap(state_dict)
    legacy = is_legacy_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.endswith("fea_pos"):
            continue
        for old, new in _LEGACY_MIXER.items():
            k = k.replace(old, new)
        if ".mlp.fc" in k and k.endswith("weight") and v.ndim == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[k] = v
    if isinstance(model, ContextCluster):
        own = model.state_dict()
        if model.fork_feat:
            for k in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
                if k not in own:
                    out.pop(k, None)
            for k, v in own.items():
                if k.startswith("norm") and k not in out and k[4:5].isdigit():
                    out[k] = v  # stage norms are not in classification checkpoints
        else:
            for k in list(out):
                if k.split(".")[0][:4] == "norm" and k[4:5].isdigit():
                    out.pop(k)  # dense-backbone stage norms: no use in a classifier
        if model.num_classes == 0:
            out.pop("head.weight", None)
            out.pop("head.bias", None)
        if legacy and not any(m.legacy_norm for m in model.modules() if isinstance(m, Cluster)):
            _logger.warning("legacy CoC checkpoint (fc1/fc2/fc_v, conv MLP or fea_pos): switching the model to the "
                            "count-based normaliser it was trained with (legacy_norm=True)")
            model.set_legacy_norm(True)
    return out


def official_kwargs_to_ours(kwargs: dict) -> dict:
    """Official ``ContextCluster(**kwargs)`` arguments -> our constructor arguments.

    Fills the official defaults, turns ``fold_w/fold_h`` and ``proposal_w/proposal_h`` into (rows, cols) pairs
    (``*_w`` acts on H) and applies the official rule that a region partition happens only if BOTH fold numbers
    exceed 1. ``norm_layer`` must be the official one-group GroupNorm (every official builder uses it).
    """
    kw = dict(
        mlp_ratios=None, downsamples=None, num_classes=1000, in_patch_size=4, in_stride=4, in_pad=0,
        down_patch_size=2, down_stride=2, down_pad=0, drop_rate=0.0, drop_path_rate=0.0, use_layer_scale=True,
        layer_scale_init_value=1e-5, fork_feat=False, proposal_w=[2, 2, 2, 2], proposal_h=[2, 2, 2, 2],
        fold_w=[8, 4, 2, 1], fold_h=[8, 4, 2, 1], heads=[2, 4, 6, 8], head_dim=[16, 16, 32, 32],
        norm_layer="nn.BatchNorm2d")
    kw.update(kwargs)
    norm = str(kw.pop("norm_layer"))
    if not norm.endswith("GroupNorm"):
        raise UserError(f"only the official one-group GroupNorm is supported as norm_layer, got {norm}")
    act = kw.pop("act_layer", None)
    if act is not None and not str(act).endswith("GELU"):
        raise UserError(f"only GELU is supported as act_layer, got {act}")
    for k in ("init_cfg", "pretrained"):
        if kw.pop(k, None) is not None:
            raise UserError(f"official argument {k} (mmcv weight loading) is not supported: use checkpoint_path")
    layers = list(kw.pop("layers"))
    n = len(layers)
    fw, fh = _per_stage(kw.pop("fold_w"), n), _per_stage(kw.pop("fold_h"), n)
    pw, ph = _per_stage(kw.pop("proposal_w"), n), _per_stage(kw.pop("proposal_h"), n)
    downsamples = kw.pop("downsamples")
    ours = dict(
        layers=layers,
        embed_dims=list(kw.pop("embed_dims")),
        mlp_ratios=kw.pop("mlp_ratios") or 4.0,  # the official default None would crash; 4 is the MetaFormer one
        heads=kw.pop("heads"),
        head_dims=kw.pop("head_dim"),
        proposals=[(r, c) for r, c in zip(pw, ph)],
        folds=[(r, c) if (r > 1 and c > 1) else (1, 1) for r, c in zip(fw, fh)],
        downsamples=[False] * n if downsamples is None else downsamples,
    )
    for k in ("num_classes", "in_patch_size", "in_stride", "in_pad", "down_patch_size", "down_stride", "down_pad",
              "drop_rate", "drop_path_rate", "use_layer_scale", "layer_scale_init_value", "fork_feat"):
        ours[k] = kw.pop(k)
    kw.pop("return_center", None)  # ignored by the official blocks too
    if ours["fork_feat"]:
        ours["num_classes"] = 0  # the official dense backbone has no norm/head
    if kw:
        raise UserError(f"unknown official ContextCluster arguments: {sorted(kw)}")
    return ours


# ----------------------------------------------------------------------------------------------------------------
# configs and builders

def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "mit", **kwargs}


# every official builder uses the 'model_small' cfg (crop 0.9), medium included
# min_input_size (timm's field): the smallest input the region partition takes; valid sizes are its multiples
# (32 for folds 8,4,2,1; 56 for coc_tiny2's 7,7,1,1), see ContextCluster.size_multiple()
_M32, _M56 = dict(min_input_size=(3, 32, 32)), dict(min_input_size=(3, 56, 56))
default_cfgs = generate_default_cfgs({
    "coc_tiny": _cfg(**_M32),
    "coc_tiny2": _cfg(**_M56),
    "coc_tiny_plain": _cfg(),
    "coc_small": _cfg(**_M32),
    "coc_medium": _cfg(**_M32),
    "coc_base_dim64": _cfg(**_M32),
    "coc_base_dim96": _cfg(**_M32),
    "coc_test": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0),
})


def _create(variant: str, pretrained: bool, args: dict, kwargs: dict) -> ContextCluster:
    return build_model_with_cfg(
        ContextCluster, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **{**args, **kwargs})


_TINY = dict(layers=(3, 4, 5, 2), embed_dims=(32, 64, 196, 320), mlp_ratios=(8, 8, 4, 4), heads=(4, 4, 8, 8),
             head_dims=24)
_SMALL = dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), heads=(4, 4, 8, 8),
              head_dims=32)
_MEDIUM = dict(layers=(4, 4, 12, 4), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4),
               heads=(6, 6, 12, 12), head_dims=32)
_FOLDS = (8, 4, 2, 1)


@register_model
def coc_tiny(pretrained=False, **kwargs) -> ContextCluster:
    """CoC-Tiny: 4 centers per 7x7 region at 224 (needs H, W multiples of 32)."""
    return _create("coc_tiny", pretrained, dict(_TINY, proposals=2, folds=_FOLDS), kwargs)


@register_model
def coc_tiny2(pretrained=False, **kwargs) -> ContextCluster:
    """CoC-Tiny* of the old README: folds 7,7,1,1 and proposals 4,2,7,4 (needs multiples of 56)."""
    return _create("coc_tiny2", pretrained, dict(_TINY, proposals=(4, 2, 7, 4), folds=(7, 7, 1, 1)), kwargs)


@register_model
def coc_tiny_plain(pretrained=False, **kwargs) -> ContextCluster:
    """CoC-Tiny without region partition (global clustering per head; any input size)."""
    return _create("coc_tiny_plain", pretrained, dict(_TINY, proposals=(4, 4, 2, 2), folds=1), kwargs)


@register_model
def coc_small(pretrained=False, **kwargs) -> ContextCluster:
    return _create("coc_small", pretrained, dict(_SMALL, proposals=2, folds=_FOLDS), kwargs)


@register_model
def coc_medium(pretrained=False, **kwargs) -> ContextCluster:
    return _create("coc_medium", pretrained, dict(_MEDIUM, proposals=2, folds=_FOLDS), kwargs)


@register_model
def coc_base_dim64(pretrained=False, **kwargs) -> ContextCluster:
    args = dict(layers=(6, 6, 24, 6), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4),
                heads=(8, 8, 16, 16), head_dims=32, proposals=2, folds=_FOLDS)
    return _create("coc_base_dim64", pretrained, args, kwargs)


@register_model
def coc_base_dim96(pretrained=False, **kwargs) -> ContextCluster:
    args = dict(layers=(4, 4, 12, 4), embed_dims=(96, 192, 384, 768), mlp_ratios=(8, 8, 4, 4),
                heads=(8, 8, 16, 16), head_dims=32, proposals=2, folds=_FOLDS)
    return _create("coc_base_dim96", pretrained, args, kwargs)


# The official mmdet/mmseg backbones context_cluster_{small,medium}_feat{2,5,7} are coc_small / coc_medium with
# fork_feat=True and p x p centers: a features_only form of the base models, not separate timm names (their stage
# norms only feed the dense maps, so timm's classifier forward would leave them without a gradient). The names stay
# loadable through visionzoo.create_model / build_backbone, and in recipes and saved folders.
for _size in ("small", "medium"):
    for _p in (2, 5, 7):
        register_alias(f"coc_{_size}_feat{_p}", f"coc_{_size}", cfg=dict(num_classes=0), proposals=_p, fork_feat=True,
                       num_classes=0)


@register_model
def coc_test(pretrained=False, **kwargs) -> ContextCluster:
    """Tiny CPU test variant (~60k params at 1000 classes): 32x32 input, a 2x2 region partition in stage 0."""
    args = dict(layers=(1, 1, 1, 1), embed_dims=(16, 24, 32, 40), mlp_ratios=2, heads=2, head_dims=8,
                proposals=(2, 2, 2, 1), folds=((2, 2), 1, 1, 1))
    return _create("coc_test", pretrained, args, kwargs)

