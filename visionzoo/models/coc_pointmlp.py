"""PointMLP-CoC (``coc_pointmlp``): the CoC paper's point-cloud classifier, PointMLP with a context-cluster block
before each residual block of every local-aggregation stage (official ``pointcloud/models/contextcluster.py``,
``pointMLP_CoC``). Input ``[B, 3, N]`` xyz clouds. Trained by ``visionzoo pointcloud`` (tasks/pointcloud.py).
The image models of the family are in ``context_cluster.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ._registry import accepts_factory_kwargs, factory_context, factory_kwargs_of, register_own_model
from .context_cluster import _unwrap

__all__ = ["PointContextCluster", "PointMLPCoC", "farthest_point_sample", "knn_point", "checkpoint_filter_fn"]


class PointContextCluster(nn.Module):
    """Point-cloud context cluster on ``[B*groups, C, k]``: one soft cluster per local group and head.

    center = mean of ``fc1(x)`` over the k neighbours (so no argmax), ``s_k = sigmoid(beta + alpha * cos)``,
    ``g = (sum s_k v_k + mean v) / (sum s_k + 1)``, ``o_k = s_k * g``; returns ``x + fc2(o)`` (the residual is inside,
    no norm, no layer scale). Names follow the official module.
    """

    def __init__(self, dim: int, heads: int = 4, head_dim: int = 24):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.fc1 = nn.Linear(dim, heads * head_dim)
        self.fc2 = nn.Linear(heads * head_dim, dim)
        self.fc_v = nn.Linear(dim, heads * head_dim)
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, K = x.shape
        E, D = self.heads, self.head_dim
        t = x.transpose(1, 2)  # [B, k, C]
        q = self.fc1(t).view(B, K, E, D).transpose(1, 2)  # [B, E, k, D]
        v = self.fc_v(t).view(B, K, E, D).transpose(1, 2)
        center, v_center = q.mean(2, keepdim=True), v.mean(2)  # [B, E, 1, D], [B, E, D]
        cos = (F.normalize(center, dim=-1) * F.normalize(q, dim=-1)).sum(-1)  # [B, E, k]
        s = torch.sigmoid(self.sim_beta + self.sim_alpha * cos)
        g = (torch.einsum("bek,bekd->bed", s, v) + v_center) / (s.sum(-1, keepdim=True) + 1.0)
        o = (s.unsqueeze(-1) * g.unsqueeze(2)).transpose(1, 2).reshape(B, K, E * D)
        return x + self.fc2(o).transpose(1, 2)


def farthest_point_sample(xyz: torch.Tensor, npoint: int, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Farthest-point sampling ``[B, N, 3] -> [B, npoint]`` indices, vectorised over batch and points.

    The npoint picks depend on each other, so they are a loop by definition; each pick is a few batched kernels.
    Starts at point 0 (like the CUDA ``pointnet2_ops`` kernel) unless ``start`` [B] is given; the official
    fallback starts at a random point.
    """
    B, N, _ = xyz.shape
    idx = torch.zeros(B, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((B, N), float("inf"), device=xyz.device, dtype=xyz.dtype)
    farthest = torch.zeros(B, dtype=torch.long, device=xyz.device) if start is None else start
    for i in range(npoint):
        idx[:, i] = farthest
        centroid = torch.gather(xyz, 1, farthest.view(B, 1, 1).expand(B, 1, xyz.shape[2]))
        dist = torch.minimum(dist, (xyz - centroid).square().sum(-1))
        farthest = dist.argmax(-1)
    return idx


def _index_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``points [B, N, C]`` at ``idx [B, ...]`` -> ``[B, ..., C]``."""
    B = points.shape[0]
    flat = idx.reshape(B, -1)
    out = torch.gather(points, 1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return out.view(*idx.shape, points.shape[-1])


def knn_point(k: int, xyz: torch.Tensor, new_xyz: torch.Tensor) -> torch.Tensor:
    """Indices ``[B, S, k]`` of the k nearest points of ``xyz [B, N, 3]`` to each query ``new_xyz [B, S, 3]``."""
    d = (new_xyz.square().sum(-1, keepdim=True) - 2 * new_xyz @ xyz.transpose(1, 2)
         + xyz.square().sum(-1).unsqueeze(1))
    return d.topk(k, dim=-1, largest=False, sorted=False).indices


class LocalGrouper(nn.Module):
    """FPS anchors + kNN groups, normalised around each anchor ("anchor" mode, use_xyz=False), with a learnable
    affine; each grouped feature is concatenated with its anchor's feature -> ``[B, S, k, 2C]``."""

    def __init__(self, channel: int, groups: int, kneighbors: int):
        super().__init__()
        self.groups, self.kneighbors = groups, kneighbors
        self.affine_alpha = nn.Parameter(torch.ones(1, 1, 1, channel))
        self.affine_beta = nn.Parameter(torch.zeros(1, 1, 1, channel))

    def forward(self, xyz: torch.Tensor, points: torch.Tensor):
        B, _, _ = xyz.shape
        fps = farthest_point_sample(xyz, self.groups)
        new_xyz, new_points = _index_points(xyz, fps), _index_points(points, fps)  # [B, S, 3], [B, S, C]
        grouped = _index_points(points, knn_point(self.kneighbors, xyz, new_xyz))  # [B, S, k, C]
        anchor = new_points.unsqueeze(2)
        std = (grouped - anchor).reshape(B, -1).std(dim=-1).view(B, 1, 1, 1)  # unbiased, as official
        grouped = self.affine_alpha * ((grouped - anchor) / (std + 1e-5)) + self.affine_beta
        return new_xyz, torch.cat([grouped, anchor.expand(-1, -1, self.kneighbors, -1)], dim=-1)


class ConvBNReLU1D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bias: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_channels, out_channels, 1, bias=bias), nn.BatchNorm1d(out_channels),
                                 nn.ReLU())

    def forward(self, x):
        return self.net(x)


class ConvBNReLURes1D(nn.Module):
    def __init__(self, channel: int, bias: bool = False):
        super().__init__()
        self.net1 = nn.Sequential(nn.Conv1d(channel, channel, 1, bias=bias), nn.BatchNorm1d(channel), nn.ReLU())
        self.net2 = nn.Sequential(nn.Conv1d(channel, channel, 1, bias=bias), nn.BatchNorm1d(channel))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.net2(self.net1(x)) + x)


class PreExtraction(nn.Module):
    """``[B, S, k, 2C] -> [B, C_out, S]``: transfer conv, (CoC block, residual conv block) x blocks, max over k."""

    def __init__(self, channels: int, out_channels: int, blocks: int = 2):
        super().__init__()
        self.transfer = ConvBNReLU1D(2 * channels, out_channels)
        ops = []
        for _ in range(blocks):
            ops.append(PointContextCluster(out_channels, heads=1, head_dim=max(out_channels // 4, 32)))
            ops.append(ConvBNReLURes1D(out_channels))
        self.operation = nn.Sequential(*ops)

    def forward(self, x):
        b, n, s, d = x.shape
        x = self.operation(self.transfer(x.permute(0, 1, 3, 2).reshape(b * n, d, s)))
        return x.amax(-1).view(b, n, -1).permute(0, 2, 1)


class PosExtraction(nn.Module):
    def __init__(self, channels: int, blocks: int = 2):
        super().__init__()
        self.operation = nn.Sequential(*[ConvBNReLURes1D(channels) for _ in range(blocks)])

    def forward(self, x):
        return self.operation(x)


@accepts_factory_kwargs
class PointMLPCoC(nn.Module):
    """PointMLP (anchor normalisation, no xyz, no bias) with a context-cluster block before each residual block of
    every PreExtraction (official ``pointMLP_CoC``). Input ``[B, 3, N]`` point clouds (N = ``points``)."""

    def __init__(self, num_classes: int = 15, points: int = 1024, embed_dim: int = 64,
                 dim_expansion: Sequence[int] = (2, 2, 2, 2), pre_blocks: Sequence[int] = (2, 2, 2, 2),
                 pos_blocks: Sequence[int] = (2, 2, 2, 2), k_neighbors: Sequence[int] = (24, 24, 24, 24),
                 reducers: Sequence[int] = (2, 2, 2, 2), drop_rate: float = 0.5, in_chans: int = 3, **kwargs):
        super().__init__()
        if in_chans != 3:
            raise UserError(f"coc_pointmlp takes xyz point clouds [B, 3, N]; in_chans={in_chans} is not supported")
        self.num_classes, self.points = num_classes, points
        self.embedding = ConvBNReLU1D(3, embed_dim)
        self.local_grouper_list, self.pre_blocks_list, self.pos_blocks_list = nn.ModuleList(), nn.ModuleList(), \
            nn.ModuleList()
        last, anchors = embed_dim, points
        for i in range(len(pre_blocks)):
            out = last * dim_expansion[i]
            anchors //= reducers[i]
            self.local_grouper_list.append(LocalGrouper(last, anchors, k_neighbors[i]))
            self.pre_blocks_list.append(PreExtraction(last, out, pre_blocks[i]))
            self.pos_blocks_list.append(PosExtraction(out, pos_blocks[i]))
            last = out
        self.num_features = last
        self.drop_rate = drop_rate
        self.classifier = self._make_classifier(num_classes)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Sequential(
            nn.Linear(self.num_features, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(self.drop_rate),
            nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(self.drop_rate),
            nn.Linear(256, num_classes))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        with factory_context(**factory_kwargs_of(self)):
            self.classifier = self._make_classifier(num_classes)
        self.classifier.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != 3:
            raise UserError(f"coc_pointmlp expects point clouds [B, 3, N], got {tuple(x.shape)}")
        if x.shape[2] < self.points:
            raise UserError(f"coc_pointmlp needs at least {self.points} points per cloud, got {x.shape[2]}")
        xyz = x.permute(0, 2, 1)
        x = self.embedding(x)
        for grouper, pre, pos in zip(self.local_grouper_list, self.pre_blocks_list, self.pos_blocks_list):
            xyz, x = grouper(xyz, x.permute(0, 2, 1))
            x = pos(pre(x))
        return x  # [B, C, S]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.amax(-1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official and our checkpoints share the layout: only training-script wrappers (``state_dict``, ``model``,
    DDP's ``module.``) are removed."""
    return _unwrap(state_dict)


# Kept out of timm's registry (visionzoo.create_model and list_models know it): timm's tools and model tests take
# every registered name for an image model ([B, C, H, W]) and this one takes [B, 3, N] point clouds.
_CFG = dict(architecture="coc_pointmlp", url="", num_classes=15, input_size=(3, 1024),  # [B, 3, 1024] points
            first_conv="embedding.net.0", classifier="classifier.8", license="apache-2.0")


@register_own_model
def coc_pointmlp(pretrained=False, **kwargs) -> PointMLPCoC:
    """PointMLP-CoC for ScanObjectNN (15 classes, 1024 points ``[B, 3, 1024]``); not an image model."""
    if pretrained:
        raise UserError("coc_pointmlp has no weights to download: pass checkpoint_path= (a run folder, a "
                        "save_pretrained folder or an official checkpoint) to visionzoo.create_model")
    model = PointMLPCoC(**kwargs)
    model.pretrained_cfg = model.default_cfg = dict(_CFG, num_classes=model.num_classes)
    return model
