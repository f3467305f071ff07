"""UDI self-supervised pretraining: nested multi-crop, stratified random sampling (SRS), one shared DINO head,
three-level self-distillation ([CLS], [CLS+], patches) with three centers, EMA teacher.

Spec: shared/specs/udi.md (section numbers below refer to it). Row orders are the official ones: the student sees the
global crops as [v1; v2], the teacher as [v2; v1], so row r of both is a cross-view pair of the same image.

Works with any timm ViT with at least two prefix tokens (token 0 = [CLS], token 1 = [CLS+]), e.g.
``timm.create_model('vit_small_patch16_224', reg_tokens=1, dynamic_img_size=True, num_classes=0)`` or our
``udi_vit_*`` models. Differences from the official code, all exact up to float rounding:

* the teacher backbone runs ONCE on [v2; v1] (the official code runs it twice on the same input, spec section 10),
  and the SRS module runs once on the global and local->global query points together;
* the student SRS module is not evaluated on the local crops (the official code computes and discards it);
* the teacher's [CLS+] token is not projected (never used);
* attention uses SDPA; the EMA update and the per-tensor gradient clipping use fused ``torch._foreach_*`` ops.

Public API (what ``visionzoo pretrain --method udi`` wires):

* ``UDIConfig`` (+ ``UDIConfig.from_yaml(path, **overrides)``), the recipe;
* ``UDIAugmentation(cfg)`` -> per image ``(crops, src_maps, tgt_maps)``; ``create_maps`` / ``sampling_mask``;
* ``DINOHead``, ``SRSModule``, ``UDINetwork``, ``UDILoss``; ``UDI(student_backbone, teacher_backbone, cfg)`` with
  ``forward(crops, maps, epoch) -> (loss, parts)`` and ``update_teacher(momentum)``;
* ``cosine_schedule``, ``build_schedules``, ``param_groups``, ``clip_gradients_per_tensor``, ``train_step``;
* ``knn_accuracy`` (weighted k-NN, T = 0.07), ``extract_features``;
* ``pretrain(cfg, out_dir, resume=False)``: the whole loop (CPU or GPU, DDP when WORLD_SIZE is set);
* ``profile_pretrain(cfg, steps)``: loader img/s against step img/s (``visionzoo pretrain --profile N``).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..files import atomic_torch_save

_logger = logging.getLogger(__name__)

__all__ = [
    "UDIConfig", "UDIAugmentation", "sampling_mask", "create_maps", "DINOHead", "SRSModule", "UDINetwork",
    "UDILoss", "UDI", "cosine_schedule", "build_schedules", "param_groups", "clip_gradients_per_tensor",
    "train_step", "knn_accuracy", "extract_features", "pretrain", "profile_pretrain", "network_checkpoint_filter",
]


# ================================================================================================================
# config

@dataclass
class UDIConfig:
    """UDI pretraining recipe. Defaults are the official argparse defaults / hard-coded values (spec section 6)."""

    # backbone
    model: str = "udi_vit_small_patch16"
    model_kwargs: dict = field(default_factory=dict)
    drop_path: float = 0.1  # student only (teacher 0)
    # data
    dataset: str = "folder"  # folder | lmdb | auto (data_dir/train, data_dir/val) | digits (embedded)
    data_dir: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    global_size: int = 224
    local_size: int = 96
    global_crops_scale: tuple = (0.25, 1.0)
    local_crops_scale: tuple = (0.05, 0.25)
    local_crops_number: int = 10
    window_global: int = 3  # SRS window (global_sampling_window_size)
    window_local: int = 2
    horizontal_flip: float = 0.5
    # head and objective
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    norm_last_layer: bool = True
    srs_heads: Optional[int] = None  # None: the backbone's number of heads
    alpha: float = 0.5
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    # optimisation
    epochs: int = 300
    batch_size: int = 128  # per process
    world_size: int = 8  # processes the recipe was written for (documentation)
    lr: Optional[float] = None  # absolute peak lr; None: lr_base * global_batch / lr_base_size
    lr_base: float = 0.0005
    lr_base_size: int = 256
    min_lr: float = 1e-5
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.1
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0  # per tensor; 0 disables
    freeze_last_layer: int = 1
    amp: bool = True
    amp_dtype: str = "float16"  # float16 (GradScaler) | bfloat16
    # loop
    workers: int = 10  # official value; capped at the machine's CPU count
    seed: int = 0
    save_every: int = 20  # epochs; the latest state is written every epoch
    knn_every: int = 1  # epochs; 0 disables the online k-NN
    knn_k: int = 20
    knn_t: float = 0.07
    knn_max_train: int = 20000  # labelled train images used as the k-NN memory bank
    knn_max_val: int = 10000
    max_train_images: Optional[int] = None  # pretrain on a fixed random subset of this size (smoke runs, tests)
    stop_after_steps: Optional[int] = None  # stop (after a checkpoint) once this many steps are done in total
    log_every: int = 10
    notes: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "UDIConfig":
        from ..engine.config import check_config_keys

        check_config_keys(d, cls, "UDI")
        d = dict(d)
        for k in ("global_crops_scale", "local_crops_scale"):
            if k in d and d[k] is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "UDIConfig":
        from ..engine.config import read_recipe

        data = read_recipe(str(path))  # a YAML path or a shipped name such as udi/pretrain_vit_small_300ep
        data.update(overrides)
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("global_crops_scale", "local_crops_scale"):
            d[k] = list(d[k])
        return d

    def global_batch(self, world_size: int = 1) -> int:
        return self.batch_size * world_size

    def peak_lr(self, world_size: int = 1) -> float:
        return self.lr if self.lr is not None else self.lr_base * self.global_batch(world_size) / self.lr_base_size


# ================================================================================================================
# data: nested crops, SRS masks, correspondence maps (section 2)

def _rrc_box(H: int, W: int, scale: Sequence[float], rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (i, j, h, w), ratio (3/4, 4/3), 10 attempts then a centered fallback."""
    area = H * W
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= W and 0 < h <= H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    in_ratio = W / H
    if in_ratio < 3 / 4:
        w, h = W, int(round(W / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = H, int(round(H * 4 / 3))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def _ref_box(H: int, W: int, scale, ref: Sequence[float], rng: random.Random) -> tuple[int, int, int, int]:
    """A box pulled towards ``ref`` (normalised, possibly flipped coord) until they overlap (official
    ``get_params_ref``, including its use of the row ``i`` in the column bounding box: reproduced on purpose)."""
    i, j, h, w = _rrc_box(H, W, scale, rng)
    ri, rI = round(min(ref[0], ref[2]) * (H - 1)), round(max(ref[0], ref[2]) * (H - 1))
    rj, rJ = round(min(ref[1], ref[3]) * (W - 1)), round(max(ref[1], ref[3]) * (W - 1))
    rh, rw = rI - ri, rJ - rj
    I, J = i + h - 1, j + w - 1
    bb_h = max(I, rI) - min(i, ri)
    bb_w = max(J, rJ) - min(i, rj)  # sic (official)

    def shift(bb, ext, rext):
        s = bb - ext - rext if bb > ext + rext else 0
        m = min(rext, ext)
        if bb >= ext + rext - 0.5 * m:
            s += 0.5 * m
        return s

    di = (ri + rI) / 2 - (i + I) / 2
    dj = (rj + rJ) / 2 - (j + J) / 2
    i += round(di / (abs(di) + 1e-5) * shift(bb_h, h, rh))
    j += round(dj / (abs(dj) + 1e-5) * shift(bb_w, w, rw))
    i = min(max(i, 0), H - h) if i + h > H or i < 0 else i
    j = min(max(j, 0), W - w) if j + w > W or j < 0 else j
    return i, j, h, w


def sampling_mask(F_side: int, window: int, rng: random.Random, gen: torch.Generator | None = None) -> torch.Tensor:
    """Stratified random sampling over an F x F token grid: one token per ``window`` x ``window`` cell; the
    (g*window)^2 sub-grid sits in a random corner when F is not a multiple (section 2.3). Bool [F*F]."""
    g = F_side // window
    if g < 1:
        raise ValueError(f"SRS window {window} is larger than the token grid side {F_side}: lower the window size.")
    off = torch.randint(0, window, (2, g, g), generator=gen)
    base = torch.arange(g) * window
    rows, cols = base[:, None] + off[0], base[None, :] + off[1]
    spare = F_side - g * window
    if spare:
        u = rng.random()
        rows = rows + (spare if u >= 0.5 else 0)
        cols = cols + (spare if 0.25 <= u < 0.5 or u >= 0.75 else 0)
    mask = torch.zeros(F_side * F_side, dtype=torch.bool)
    mask[(rows * F_side + cols).flatten()] = True
    return mask


def create_maps(src, tgt, mask, src_side: int, tgt_side: int):
    """Correspondence maps of the sampled tokens of a source crop in a target (global) crop (section 2.4).

    ``src``/``tgt``: normalised (i0, j0, i1, j1) coords (flipped crops have j0 > j1); ``mask``: bool [src_side^2].
    Returns ``src_map`` [n, src_side^2] (one-hot rows for the VALID samples first, zero rows after) and ``tgt_map``
    [n, tgt_side^2] (bilinear weights on the target grid), n = number of samples. Vectorised numpy (float64):
    tiny torch ops cost more than the arithmetic here.
    """
    src = np.asarray(src, dtype=np.float64)
    tgt = np.asarray(tgt, dtype=np.float64)
    idx = np.flatnonzero(np.asarray(mask))
    n = idx.size
    a = (idx // src_side) / (src_side - 1)
    b = (idx % src_side) / (src_side - 1)
    pi = src[0] + a * (src[2] - src[0])
    pj = src[1] + b * (src[3] - src[1])
    valid = ((pi > min(tgt[0], tgt[2])) & (pi < max(tgt[0], tgt[2]))
             & (pj > min(tgt[1], tgt[3])) & (pj < max(tgt[1], tgt[3])))
    k = int(valid.sum())
    rows = np.arange(k)
    src_map = np.zeros((n, src_side * src_side), dtype=np.float32)
    src_map[rows, idx[valid]] = 1.0
    G = tgt_side
    ui = (pi[valid] - tgt[0]) * (G - 1) / (tgt[2] - tgt[0])
    uj = (pj[valid] - tgt[1]) * (G - 1) / (tgt[3] - tgt[1])
    i0, j0 = np.floor(ui), np.floor(uj)
    di, dj = ui - i0, uj - j0
    i0, j0 = np.clip(i0.astype(np.int64), 0, G - 1), np.clip(j0.astype(np.int64), 0, G - 1)
    i1, j1 = np.minimum(i0 + 1, G - 1), np.minimum(j0 + 1, G - 1)
    tgt_map = np.zeros((n, G * G), dtype=np.float64)
    for ii, jj, w in ((i0, j0, (1 - di) * (1 - dj)), (i0, j1, (1 - di) * dj), (i1, j0, di * (1 - dj)),
                      (i1, j1, di * dj)):
        np.add.at(tgt_map, (rows, ii * G + jj), w)  # add: the clamped +1 index may repeat a cell
    return torch.from_numpy(src_map), torch.from_numpy(tgt_map.astype(np.float32))


class UDIAugmentation:
    """Per image: 2 global + n_l local crops (nested as in the official code), photometric transforms, one global
    and one local SRS mask, and the correspondence maps, in the official list orders::

        crops    = [v1, v2, l1, ..., l_nl]
        src_maps = [v1->v2, v2->v1, l1->v2, ..., l_nl->v2, l1->v1, ..., l_nl->v1]   (local ones only if wanted)
        tgt_maps = [v1->v2, v2->v1, l1->v2, l1->v1, l2->v2, l2->v1, ...]

    The student never uses the local src maps (the official code computes SRS on local crops and throws it away),
    so ``local_src_maps=False`` skips them. Randomness comes from ``rng`` (python) and ``gen`` (torch) so a sample
    can be made a pure function of (seed, epoch, index).
    """

    def __init__(self, global_size=224, local_size=96, patch_size=16, global_crops_scale=(0.25, 1.0),
                 local_crops_scale=(0.05, 0.25), local_crops_number=10, window_global=3, window_local=2,
                 horizontal_flip=0.5, local_src_maps=False,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if size % patch_size:
                raise ValueError(f"UDI {name}={size} must be a multiple of the patch size {patch_size}.")
        self.global_size, self.local_size, self.patch = global_size, local_size, patch_size
        self.gscale, self.lscale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.n_local = local_crops_number
        self.wg, self.wl = window_global, window_local
        self.hflip = horizontal_flip
        self.local_src_maps = local_src_maps
        self.G, self.L = global_size // patch_size, local_size // patch_size
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(3, 1, 1) * 255.0

    @classmethod
    def from_config(cls, cfg: UDIConfig, patch_size: int, **kw) -> "UDIAugmentation":
        return cls(cfg.global_size, cfg.local_size, patch_size, cfg.global_crops_scale, cfg.local_crops_scale,
                   cfg.local_crops_number, cfg.window_global, cfg.window_local, cfg.horizontal_flip, **kw)

    # photometric part (section 2.2)
    def _blur(self, img, p, rng):
        from PIL import ImageFilter

        if rng.random() <= p:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        return img

    @staticmethod
    def _color(img, rng):
        """ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 (random op order), then RandomGrayscale(0.2), as
        torchvision's, but drawing from ``rng`` so no global RNG is touched."""
        from torchvision.transforms import functional as TF

        if rng.random() < 0.8:
            ops = [0, 1, 2, 3]
            rng.shuffle(ops)
            for op in ops:
                if op == 0:
                    img = TF.adjust_brightness(img, rng.uniform(0.6, 1.4))
                elif op == 1:
                    img = TF.adjust_contrast(img, rng.uniform(0.6, 1.4))
                elif op == 2:
                    img = TF.adjust_saturation(img, rng.uniform(0.8, 1.2))
                else:
                    img = TF.adjust_hue(img, rng.uniform(-0.1, 0.1))
        if rng.random() < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        return img

    def _to_tensor(self, img) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return (x - self.mean) / self.std

    def _photometric(self, img, rng):
        from PIL import ImageOps

        img = self._color(img, rng)
        if rng.random() < 0.5:
            img = self._blur(img, 0.5 if rng.random() < 0.5 else 1.0, rng)
        else:
            img = self._blur(img, 0.1, rng)
            if rng.random() < 0.2:
                img = ImageOps.solarize(img, 128)
        return self._to_tensor(img)

    def _crop(self, img, box, size, rng):
        from PIL import Image

        i, j, h, w = box
        H, W = img.height, img.width
        coord = [i / (H - 1), j / (W - 1), (i + h - 1) / (H - 1), (j + w - 1) / (W - 1)]
        out = img.crop((j, i, j + w, i + h))
        if rng.random() < self.hflip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
            coord[1], coord[3] = coord[3], coord[1]
        out = out.resize((size, size), Image.BICUBIC)
        return self._photometric(out, rng), coord

    def __call__(self, img, rng: random.Random | None = None, gen: torch.Generator | None = None):
        rng = rng or random.Random(random.getrandbits(64))
        img = img.convert("RGB")
        H, W = img.height, img.width
        if H < 2 or W < 2:
            raise ValueError(f"image of size {W}x{H} is too small for UDI crops")
        v1, c1 = self._crop(img, _rrc_box(H, W, self.gscale, rng), self.global_size, rng)
        v2, c2 = self._crop(img, _ref_box(H, W, self.gscale, c1, rng), self.global_size, rng)
        isec = [min(c1[0], c2[0]), min(c1[1], c2[1]), max(c1[2], c2[2]), max(c1[3], c2[3])]  # official quirk
        locals_, lcoords = [], []
        for _ in range(self.n_local):
            crop, c = self._crop(img, _ref_box(H, W, self.lscale, isec, rng), self.local_size, rng)
            locals_.append(crop)
            lcoords.append(c)
        mg = sampling_mask(self.G, self.wg, rng, gen)
        ml = sampling_mask(self.L, self.wl, rng, gen)
        t1, t2 = c1, c2
        s12, t12 = create_maps(t1, t2, mg, self.G, self.G)
        s21, t21 = create_maps(t2, t1, mg, self.G, self.G)
        src_l2, src_l1, tgt_l = [], [], []
        for c in lcoords:
            tc = c
            sa, ta = create_maps(tc, t2, ml, self.L, self.G)
            sb, tb = create_maps(tc, t1, ml, self.L, self.G)
            src_l2.append(sa)
            src_l1.append(sb)
            tgt_l += [ta, tb]
        src_maps = [s12, s21] + ((src_l2 + src_l1) if self.local_src_maps else [])
        return [v1, v2] + locals_, src_maps, [t12, t21] + tgt_l


# ================================================================================================================
# networks (section 3)

class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation W = g * v / ||v||_row (keys ``weight_g`` [out,1], ``weight_v``),
    i.e. ``torch.nn.utils.weight_norm`` without the deprecated hooks, same state-dict keys as the checkpoints."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        lin = nn.Linear(in_dim, out_dim, bias=False)  # default nn.Linear init, as the official last layer
        self.weight_v = nn.Parameter(lin.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    @property
    def weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (Linear-GELU x (nlayers-1), Linear to the bottleneck) -> L2 normalise -> weight-normed Linear to K."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class SRSModule(nn.Module):
    """The SRS cross-attention (official ``UDIWrapper.norm1`` + ``MaskedAttention``, section 3.2).

    Queries are the query projections of the patch tokens picked (student, one-hot) or bilinearly interpolated
    (teacher) by a map; keys/values are all patch tokens of the same image; a skip adds the mapped normalised
    tokens, then a LayerNorm. Invalid (all-zero) map rows give Q = 0, i.e. uniform attention, as in the official
    code. Several query groups of one image are simply concatenated along the query axis.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SRS: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        for m in (self.qkv, self.proj):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, patches: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``patches`` [B, N, C] (last block output, before any norm), ``maps`` [B, Q, N] -> [B, Q, C]."""
        B, N, C = patches.shape
        h = self.num_heads
        x = self.norm1(patches)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        maps = maps.to(x.dtype)
        q = maps @ q  # [B, Q, C]
        Q = q.shape[1]
        q = q.reshape(B, Q, h, C // h).transpose(1, 2)
        k = k.reshape(B, N, h, C // h).transpose(1, 2)
        v = v.reshape(B, N, h, C // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Q, C)
        return self.norm(self.proj(o) + maps @ x)


def _num_heads(backbone: nn.Module) -> int:
    try:
        return int(backbone.blocks[0].attn.num_heads)
    except AttributeError:
        raise ValueError("UDI needs a timm-style ViT backbone (blocks[i].attn.num_heads); pass srs_heads.") from None


def backbone_tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last block output BEFORE the final norm, [B, prefix + N, C], for any timm VisionTransformer."""
    if hasattr(backbone, "forward_tokens"):
        return backbone.forward_tokens(x)
    x = backbone.patch_embed(x)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    return backbone.blocks(x)


class UDINetwork(nn.Module):
    """Backbone + SRS module + ONE projection head shared by [CLS], [CLS+] and the SRS patch tokens.

    ``forward`` is the student pass (so a DDP wrapper sees it), ``forward_teacher`` the teacher pass.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, srs_heads: int | None = None):
        super().__init__()
        npt = getattr(backbone, "num_prefix_tokens", None)
        if npt is None or npt < 2 or getattr(backbone, "cls_token", None) is None:
            raise ValueError(
                "UDI needs a ViT with two class tokens ([CLS], [CLS+]): use a udi_vit_* model or a timm ViT built "
                "with class_token=True and reg_tokens=1 (the first register token serves as [CLS+]).")
        if getattr(backbone, "no_embed_class", False):
            raise ValueError("UDI needs a backbone with a pos_embed row per class token (no_embed_class=False).")
        self.backbone = backbone
        self.num_prefix_tokens = npt
        dim = backbone.embed_dim
        self.srs = SRSModule(dim, srs_heads or _num_heads(backbone))
        self.head = head

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([CLS], [CLS+]) after the final norm [B, 2, C], and the patch tokens before it [B, N, C]."""
        h = backbone_tokens(self.backbone, x)
        return self.backbone.norm(h[:, :2]), h[:, self.num_prefix_tokens:]

    def forward(self, global_crops: torch.Tensor, local_crops: Optional[torch.Tensor],
                src_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """Student. ``global_crops`` [2B] = [v1; v2]; ``local_crops`` [n_l*B] crop-major or None;
        ``src_map`` [2B, S, N] = cat(src_maps[0:2])."""
        cls2, patches = self.tokens(global_crops)
        z = self.srs(patches, src_map)
        out = self.head(torch.cat([cls2, z], dim=1))  # one head call on [2B, 2 + S, C]
        res = {"g_cls": out[:, 0:1], "g_clsp": out[:, 1:2], "g_patch": out[:, 2:].unsqueeze(0),
               "g_mask": src_map.sum(-1, keepdim=True).unsqueeze(0)}
        if local_crops is not None and local_crops.shape[0]:
            lout = self.head(self.tokens(local_crops)[0])
            res["l_cls"], res["l_clsp"] = lout[:, 0:1], lout[:, 1:2]
        return res

    def forward_teacher(self, global_crops_rev: torch.Tensor, tgt_map_g: torch.Tensor,
                        tgt_map_l: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Teacher, ONE backbone pass. ``global_crops_rev`` [2B] = [v2; v1]; ``tgt_map_g`` [2B, S, N];
        ``tgt_map_l`` [n_l, 2B, S_l, N] (row k: [l_k->v2; l_k->v1])."""
        cls2, patches = self.tokens(global_crops_rev)
        B2, S = tgt_map_g.shape[:2]
        maps = [tgt_map_g]
        if tgt_map_l is not None:
            nl, _, Sl, N = tgt_map_l.shape
            maps.append(tgt_map_l.permute(1, 0, 2, 3).reshape(B2, nl * Sl, N))
        z = self.srs(patches, torch.cat(maps, dim=1))
        out = self.head(torch.cat([cls2[:, :1], z], dim=1))  # the teacher's [CLS+] is never used
        res = {"g_cls": out[:, :1], "g_patch": out[:, 1:1 + S].unsqueeze(0),
               "g_mask": tgt_map_g.sum(-1, keepdim=True).unsqueeze(0)}
        if tgt_map_l is not None:
            res["l_patch"] = out[:, 1 + S:].reshape(B2, nl, Sl, -1).transpose(0, 1)
            res["l_mask"] = tgt_map_l.sum(-1, keepdim=True)
        return res


def network_checkpoint_filter(state_dict: dict, model: UDINetwork | None = None) -> dict[str, torch.Tensor]:
    """Official ``MultiCropWrapper`` state dict (student or teacher, ``module.`` ok) -> ``UDINetwork`` keys.

    ``backbone.backbone.*`` -> ``backbone.*`` (through the backbone's converter: the [1,2,C] cls_token splits into
    cls_token + reg_token), ``backbone.norm1.*`` -> ``srs.norm1.*``, ``backbone.attn.*`` -> ``srs.*``,
    ``head.0.*`` -> ``head.*`` (``head.1``/``head.2`` are the same module repeated, dropped). Our own keys pass.
    """
    from visionzoo.models.vit_udi import checkpoint_filter_fn as vit_filter

    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    out, bb = {}, {}
    for k, v in sd.items():
        if k.startswith("backbone.backbone."):
            bb[k[len("backbone.backbone."):]] = v
        elif k.startswith("backbone.norm1."):
            out["srs.norm1." + k[len("backbone.norm1."):]] = v
        elif k.startswith("backbone.attn."):
            out["srs." + k[len("backbone.attn."):]] = v
        elif k.startswith("backbone."):
            bb[k[len("backbone."):]] = v
        elif k.startswith("head.0."):
            out["head." + k[len("head.0."):]] = v
        elif k.startswith(("head.1.", "head.2.")):
            continue
        elif k.endswith("last_layer.parametrizations.weight.original0"):
            out[k.replace("parametrizations.weight.original0", "weight_g")] = v
        elif k.endswith("last_layer.parametrizations.weight.original1"):
            out[k.replace("parametrizations.weight.original1", "weight_v")] = v
        else:
            out[k] = v
    if bb:
        if model is not None and isinstance(getattr(model, "backbone", None), nn.Module):
            bb = vit_filter(bb, model.backbone)
        out.update({"backbone." + k: v for k, v in bb.items()})
    return out


# ================================================================================================================
# objective (section 4)

def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
                           np.ones(max(epochs - warmup_epochs, 0)) * temp))


class UDILoss(nn.Module):
    """The three-level UDI objective with three centers (cls, cls+ target, patch), section 4.

    ``forward(student, teacher, epoch)`` takes the dicts of ``UDINetwork`` and returns ``(loss, parts)`` with
    parts g_cls, g_clsp, g_patch, l_cls, l_clsp, teacher_temp (detached). Centers are updated in ``forward``.
    """

    def __init__(self, out_dim: int, num_local_crops: int, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.07, warmup_teacher_temp_epochs: int = 30, epochs: int = 300,
                 alpha: float = 0.5, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.num_local_crops = num_local_crops
        self.alpha, self.student_temp, self.center_momentum = alpha, student_temp, center_momentum
        self.temps = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs)
        self.final_temp = teacher_temp
        self.register_buffer("center", torch.zeros(3, out_dim))
        self.last_targets: dict[str, torch.Tensor] = {}

    def teacher_temp(self, epoch: int) -> float:
        epoch = int(epoch)
        return float(self.temps[epoch]) if epoch < len(self.temps) else float(self.final_temp)

    @staticmethod
    def _masked_mean(x: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
        return (x * m).sum(dim) / (m.sum(dim) + 1e-5)

    def forward(self, s: dict, t: dict, epoch: int):
        tau = self.teacher_temp(epoch)
        a = self.alpha
        c = self.center
        t_cls = t["g_cls"].float()  # [2B, 1, K], rows [v2; v1]
        B2, _, K = t_cls.shape
        B = B2 // 2
        t_patch, t_m = t["g_patch"][0].float(), t["g_mask"][0].float()  # [2B, S, K], [2B, S, 1]
        tg_clsp = a * self._masked_mean(t_patch, t_m, 1).unsqueeze(1) + (1 - a) * t_cls
        has_local = "l_cls" in s and "l_patch" in t
        if has_local:
            nl = t["l_patch"].shape[0]
            tl_cls = t_cls.reshape(2, B, K).transpose(0, 1).repeat(nl, 1, 1)  # [nl*B, 2, K] views (v2, v1)
            lm = self._masked_mean(t["l_patch"].float(), t["l_mask"].float(), 2)  # [nl, 2B, K]
            lm = lm.reshape(nl, 2, B, K).transpose(1, 2).reshape(nl * B, 2, K)
            tl_clsp = a * lm + (1 - a) * tl_cls

        def probs(logits, j):
            return F.softmax((logits - c[j]) / tau, dim=-1)

        def ce(p, logits):
            return -(p * F.log_softmax(logits.float() / self.student_temp, dim=-1)).sum(-1)

        P = {"g_cls": probs(t_cls, 0), "g_clsp": probs(tg_clsp, 1), "g_patch": probs(t_patch, 2)}
        parts = {"g_cls": ce(P["g_cls"], s["g_cls"]).mean(), "g_clsp": ce(P["g_clsp"], s["g_clsp"]).mean()}
        s_m = s["g_mask"][0, ..., 0].float()  # [2B, S]
        parts["g_patch"] = (ce(P["g_patch"], s["g_patch"][0]) * s_m).sum() / s_m.sum().clamp_min(1e-6)
        n_g, n_l = 2, 0
        if has_local:
            P["l_cls"], P["l_clsp"] = probs(tl_cls, 0), probs(tl_clsp, 1)
            parts["l_cls"] = ce(P["l_cls"], s["l_cls"]).mean()
            parts["l_clsp"] = ce(P["l_clsp"], s["l_clsp"]).mean()
            n_l = 2 * nl
            cls = (n_g * parts["g_cls"] + n_l * parts["l_cls"]) / (n_g + n_l)
            clsp = (n_g * parts["g_clsp"] + n_l * parts["l_clsp"]) / (n_g + n_l)
        else:
            cls, clsp = parts["g_cls"], parts["g_clsp"]
        loss = (cls + clsp + parts["g_patch"]) / 3
        self.last_targets = {k: v.detach() for k, v in P.items()}
        with torch.no_grad():
            mu0 = t_cls.mean(dim=(0, 1))
            clsp_all = [tg_clsp.reshape(-1, K)] + ([tl_clsp.reshape(-1, K)] if has_local else [])
            mu1 = torch.cat(clsp_all).mean(0)
            num = (t_patch * t_m).sum(dim=(0, 1))
            den = t_m.sum()
            if has_local:
                num = num + (t["l_patch"].float() * t["l_mask"].float()).sum(dim=(0, 1, 2))
                den = den + t["l_mask"].float().sum()
            mu2 = num / den.clamp_min(1e-6)
            self.update_center(torch.stack([mu0, mu1, mu2]))
        parts = {k: v.detach() for k, v in parts.items()}
        parts["teacher_temp"] = torch.tensor(tau)
        return loss, parts

    @torch.no_grad()
    def update_center(self, mu: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean; across processes an average of per-process means (as the official code)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mu)
            mu = mu / torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(mu.to(self.center.dtype), alpha=1 - self.center_momentum)


# ================================================================================================================
# the method

def split_maps(src_maps: Sequence[torch.Tensor], tgt_maps: Sequence[torch.Tensor], n_local: int):
    """Official map lists (after collation) -> (src_map_g [2B,S,N], tgt_map_g [2B,S,N], tgt_map_l [nl,2B,Sl,N])."""
    src_g = torch.cat(list(src_maps[:2]), dim=0)
    tgt_g = torch.cat(list(tgt_maps[:2]), dim=0)
    tgt_l = None
    if n_local:
        tl = torch.cat(list(tgt_maps[2:2 + 2 * n_local]), dim=0)  # [l1->v2, l1->v1, l2->v2, ...] each [B,Sl,N]
        B = tgt_maps[0].shape[0]
        tgt_l = tl.reshape(n_local, 2 * B, *tl.shape[1:])
    return src_g, tgt_g, tgt_l


class UDI(nn.Module):
    """Student and EMA teacher ``UDINetwork`` + ``UDILoss``. ``forward(crops, maps, epoch) -> (loss, parts)``.

    ``crops`` = [v1, v2, l1, ..., l_nl] batches; ``maps`` = (src_maps, tgt_maps) in the official list orders.
    """

    def __init__(self, student_backbone: nn.Module, teacher_backbone: nn.Module, cfg: UDIConfig):
        super().__init__()
        dim = student_backbone.embed_dim

        def head(norm_last_layer):
            return DINOHead(dim, cfg.out_dim, norm_last_layer=norm_last_layer, nlayers=cfg.head_nlayers,
                            hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)

        self.cfg = cfg
        self.student = UDINetwork(student_backbone, head(cfg.norm_last_layer), cfg.srs_heads)
        self.teacher = UDINetwork(teacher_backbone, head(True), cfg.srs_heads)
        self.teacher.load_state_dict(self.student.state_dict())  # the teacher starts as an exact copy
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = UDILoss(cfg.out_dim, cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                            cfg.warmup_teacher_temp_epochs, cfg.epochs, cfg.alpha, cfg.student_temp,
                            cfg.center_momentum)
        self._pairs: Optional[tuple[list, list]] = None

    def forward(self, crops: Sequence[torch.Tensor], maps: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
                epoch: int, student: nn.Module | None = None):
        """``student`` may be a DDP wrapper of ``self.student``. Returns (loss, parts) and keeps the network outputs
        in ``self.last_outputs``."""
        src_maps, tgt_maps = maps
        n_local = len(crops) - 2
        src_g, tgt_g, tgt_l = split_maps(src_maps, tgt_maps, n_local)
        with torch.no_grad():
            t_out = self.teacher.forward_teacher(torch.cat([crops[1], crops[0]]), tgt_g, tgt_l)
        local = torch.cat(list(crops[2:])) if n_local else None
        s_out = (student or self.student)(torch.cat([crops[0], crops[1]]), local, src_g)
        loss, parts = self.loss(s_out, t_out, epoch)
        self.last_outputs = {"student": s_out, "teacher": t_out}
        return loss, parts

    def _param_pairs(self):
        if self._pairs is None:
            s = [p for p in self.student.parameters()]
            t = [p for p in self.teacher.parameters()]
            self._pairs = (s, t)
        return self._pairs

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s over every parameter (fused foreach ops, no host sync)."""
        s, t = self._param_pairs()
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)


def cosine_schedule(base: float, final: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                    start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-iteration cosine schedule with a linear warm-up (``linspace(start, base, W)``), section 5.2."""
    warmup = np.array([])
    warmup_epochs = min(warmup_epochs, epochs)
    w_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base, w_iters)
    t = np.arange(epochs * niter_per_ep - w_iters)
    sched = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    sched = np.concatenate((warmup, sched))
    assert len(sched) == epochs * niter_per_ep
    return sched


def build_schedules(cfg: UDIConfig, niter_per_ep: int, world_size: int = 1) -> dict[str, np.ndarray]:
    return {
        "lr": cosine_schedule(cfg.peak_lr(world_size), cfg.min_lr, cfg.epochs, niter_per_ep, cfg.warmup_epochs),
        "wd": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter_per_ep),
        "momentum": cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, niter_per_ep),
    }


def param_groups(model: nn.Module) -> list[dict]:
    """Group 0 (weight decay): tensors with ndim >= 2 not ending in .bias (includes cls/pos tokens, weight_g);
    group 1: biases and 1-D tensors (no decay). Frozen tensors are left out."""
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_reg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_tensor(params: Sequence[torch.Tensor], clip: float) -> None:
    """Each gradient scaled by min(1, clip / (||g|| + 1e-6)) separately (DINO's clip_gradients), no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or clip <= 0:
        return
    norms = torch._foreach_norm(grads)
    factors = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)


def train_step(udi: UDI, optimizer: torch.optim.Optimizer, crops, maps, it: int, epoch: int,
               schedules: dict[str, np.ndarray], scaler: Optional[torch.amp.GradScaler] = None,
               autocast: Any = None, student: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step in the official order (section 1). ``it`` is the global iteration index."""
    cfg = udi.cfg
    for i, g in enumerate(optimizer.param_groups):
        g["lr"] = float(schedules["lr"][it])
        if i == 0:
            g["weight_decay"] = float(schedules["wd"][it])
    ctx = autocast if autocast is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        loss, parts = udi(crops, maps, epoch, student=student)
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in udi.student.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.clip_grad:
        clip_gradients_per_tensor(params, cfg.clip_grad)
    if epoch < cfg.freeze_last_layer:
        for n, p in udi.student.named_parameters():
            if "last_layer" in n:
                p.grad = None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    udi.update_teacher(float(schedules["momentum"][it]))
    parts = dict(parts)
    parts["loss"] = loss.detach()
    return parts


# ================================================================================================================
# k-NN monitor (weighted k-NN as DINO: cosine similarity, weights exp(sim / T))

def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, T: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> float:
    """Top-1 accuracy (in %) of the weighted k-NN classifier (``engine.features.knn_classify`` for one k)."""
    from ..engine.features import knn_classify

    return knn_classify(train_feats, train_labels, test_feats, test_labels, (k,), T, num_classes, chunk)[
        min(k, train_feats.shape[0])]["top1"]


def extract_features(backbone: nn.Module, loader, device: torch.device, token: str = "cls",
                     autocast: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] (``token='cls'``), [CLS+] (``'cls+'``) or both concatenated (``'both'``) after the final norm, on
    ``device`` (``engine.features.extract``)."""
    from ..engine.features import extract

    return extract(backbone, loader, device, token=token, autocast=autocast, to_cpu=False)


# ================================================================================================================
# data sets for the loop

class _SSLDataset(torch.utils.data.Dataset):
    """Wraps a labelled data set: each item is the UDI views of one image, a pure function of
    (seed, epoch, index), so that runs (and resumed runs) see exactly the same crops whatever the workers."""

    def __init__(self, base, aug: UDIAugmentation, seed: int):
        self.base, self.aug, self.seed, self.epoch = base, aug, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, _ = self.base[i]
        s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i
        s %= 2 ** 63
        return self.aug(img, random.Random(s), torch.Generator().manual_seed(s))


def _build_data(cfg: UDIConfig, patch_size: int):
    """(pretraining set, k-NN train set, k-NN val set or None, number of classes) through ``data.build_dataset``:
    the embedded digits use the library's fixed train/val split (val images are never pretrained on), folders and
    LMDBs skip corrupt images."""
    from torchvision import transforms as T

    from ..data.datasets import build_dataset, check_data_dir

    aug = UDIAugmentation.from_config(cfg, patch_size)
    crop_pct = 1.0 if cfg.dataset == "digits" else 0.875
    eval_tf = T.Compose([
        T.Resize(int(round(cfg.global_size / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(cfg.global_size), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    if cfg.dataset != "digits" and not cfg.data_dir:
        raise ValueError(f"dataset {cfg.dataset!r} needs data_dir (a folder with {cfg.train_split}/ and "
                         f"{cfg.val_split}/), or use dataset digits.")

    def split(name, transform):
        return build_dataset(cfg.dataset, cfg.data_dir, name, transform, img_size=cfg.global_size)

    base = split(cfg.train_split, None)
    knn_train = split(cfg.train_split, eval_tf)
    has_val = cfg.dataset == "digits"
    if not has_val:
        try:
            check_data_dir(cfg.data_dir, cfg.val_split, cfg.dataset)
            has_val = True
        except (FileNotFoundError, ValueError):
            _logger.warning("no %s split in %s: the online k-NN is skipped", cfg.val_split, cfg.data_dir)
    knn_val = split(cfg.val_split, eval_tf) if has_val else None
    num_classes = len(base.classes)

    def subset(ds, n, seed):
        if ds is None or n is None or len(ds) <= n:
            return ds
        idx = np.random.RandomState(seed).choice(len(ds), n, replace=False)
        return torch.utils.data.Subset(ds, sorted(idx.tolist()))

    return (_SSLDataset(subset(base, cfg.max_train_images, 0), aug, cfg.seed),
            subset(knn_train, cfg.knn_max_train, 1), subset(knn_val, cfg.knn_max_val, 1), num_classes)


def _epoch_batches(n: int, batch: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = n // world
    mine = perm[rank * per_rank:(rank + 1) * per_rank]
    nb = len(mine) // batch  # drop_last
    return [mine[b * batch:(b + 1) * batch] for b in range(nb)]


# ================================================================================================================
# the loop

_STATE = "train_state.pt"
_NETS = "udi_networks.safetensors"


def _atomic_save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)




def _save_checkpoint(out: Path, udi: UDI, optimizer, scaler, epoch: int, step_in_epoch: int, global_step: int,
                     extra_backbone_name: str | None = None) -> None:
    nets = {f"student.{k}": v for k, v in udi.student.state_dict().items()}
    nets.update({f"teacher.{k}": v for k, v in udi.teacher.state_dict().items()})
    nets["loss.center"] = udi.loss.center
    _atomic_save_tensors(nets, out / _NETS)
    # the teacher backbone alone, in our model layout (loads with create_model(name, checkpoint_path=...))
    _atomic_save_tensors(udi.teacher.backbone.state_dict(), out / "teacher_backbone.safetensors")
    if extra_backbone_name:
        _atomic_save_tensors(udi.teacher.backbone.state_dict(), out / extra_backbone_name)
    state = {"optimizer": optimizer.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
             "global_step": global_step, "torch_rng": torch.get_rng_state()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    atomic_torch_save(state, out / _STATE)


def _load_checkpoint(out: Path, udi: UDI, optimizer, scaler) -> dict:
    from safetensors.torch import load_file

    if not (out / _STATE).exists() or not (out / _NETS).exists():
        raise FileNotFoundError(f"nothing to resume in {out}: no {_STATE} / {_NETS}. Start without --resume.")
    nets = load_file(str(out / _NETS))
    udi.student.load_state_dict({k[8:]: v for k, v in nets.items() if k.startswith("student.")})
    udi.teacher.load_state_dict({k[8:]: v for k, v in nets.items() if k.startswith("teacher.")})
    udi.loss.center.copy_(nets["loss.center"])
    state = torch.load(out / _STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def _plot_curves(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    ep = [r["epoch"] for r in rows if r.get("loss") not in ("", None)]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ep, [float(r["loss"]) for r in rows if r.get("loss") not in ("", None)])
    ax[0].set_xlabel("epoch"), ax[0].set_title("UDI loss")
    kr = [r for r in rows if r.get("knn_top1") not in ("", None)]
    ax[1].plot([r["epoch"] for r in kr], [float(r["knn_top1"]) for r in kr], marker="o")
    ax[1].set_xlabel("epoch"), ax[1].set_title("k-NN top-1 (%)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


_CSV_FIELDS = ["epoch", "global_step", "loss", "g_cls", "g_clsp", "g_patch", "l_cls", "l_clsp", "lr", "wd",
               "momentum", "teacher_temp", "knn_top1", "epoch_time_s", "img_per_s"]


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def build_udi(cfg: UDIConfig, device: torch.device | str = "cpu") -> UDI:
    """Student/teacher backbones from ``cfg.model`` (+ ``model_kwargs``) and the UDI module."""
    import timm

    import visionzoo  # noqa: F401  (registers our models)

    kw = dict(num_classes=0, **cfg.model_kwargs)
    kw.setdefault("img_size", cfg.global_size)
    if not cfg.model.startswith("udi_"):
        kw.setdefault("dynamic_img_size", True)
        kw.setdefault("reg_tokens", 1)
    torch.manual_seed(cfg.seed)
    student = timm.create_model(cfg.model, drop_path_rate=cfg.drop_path, **kw)
    teacher = timm.create_model(cfg.model, drop_path_rate=0.0, **kw)
    return UDI(student, teacher, cfg).to(device)


def _dist_env() -> tuple[int, int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def profile_pretrain(cfg: UDIConfig, steps: int = 10, device: str | None = None) -> dict:
    """Loader img/s (the augmentation pipeline alone, ``cfg.workers`` processes) and step img/s (``train_step`` on
    one batch held on the device) over ``steps`` batches each: whether the data pipeline keeps up with training.
    Returns ``{"loader_img_s", "step_img_s", "batch_size", "workers", "device"}``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    udi = build_udi(cfg, device)
    train_set, *_ = _build_data(cfg, udi.student.backbone.patch_embed.patch_size[0])
    workers = min(cfg.workers, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) < 2:
        raise ValueError(f"profiling needs at least 2 batches of {cfg.batch_size}: lower batch_size.")
    steps = min(steps, len(loader) - 1)
    batches = iter(loader)
    first = next(batches)  # worker start-up is not counted
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    loader_s = time.perf_counter() - t0
    crops, src, tgt = first
    crops = [c.to(device) for c in crops]
    maps = ([m.to(device) for m in src], [m.to(device) for m in tgt])
    optimizer = torch.optim.AdamW(param_groups(udi.student))
    schedules = build_schedules(cfg, max(steps + 1, 2))
    use_amp = cfg.amp and device.type == "cuda"
    dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and dtype == torch.float16 else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=use_amp)
    train_step(udi, optimizer, crops, maps, 0, 0, schedules, scaler, autocast)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(udi, optimizer, crops, maps, i, 0, schedules, scaler, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - t0
    n = steps * cfg.batch_size
    return {"loader_img_s": n / loader_s, "step_img_s": n / step_s, "batch_size": cfg.batch_size,
            "workers": workers, "device": str(device), "steps": steps}


def pretrain(cfg: UDIConfig, out_dir: str | os.PathLike, resume: bool = False, device: str | None = None,
             progress: bool = True) -> dict:
    """UDI pretraining: metrics CSV + curve PNG, online k-NN each ``knn_every`` epochs, checkpoints, exact resume.

    Single process by default; DDP when ``WORLD_SIZE`` > 1 is set (torchrun). Returns a summary dict
    (``knn_init``, ``knn_final``, ``steps``, ``epochs_done``).
    """
    world, rank, local_rank = _dist_env()
    distributed = world > 1
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main = rank == 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    udi = build_udi(cfg, device)
    patch = udi.student.backbone.patch_embed.patch_size[0]
    train_set, knn_train, knn_val, num_classes = _build_data(cfg, patch)
    n_iter = len(train_set) // (cfg.batch_size * world)
    if n_iter == 0:
        raise ValueError(f"batch_size {cfg.batch_size} x {world} process(es) is larger than the data set "
                         f"({len(train_set)} images): lower batch_size.")
    schedules = build_schedules(cfg, n_iter, world)
    optimizer = torch.optim.AdamW(param_groups(udi.student))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    student = udi.student
    if distributed:
        student = torch.nn.parallel.DistributedDataParallel(
            udi.student, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, start_step, global_step = 0, 0, 0
    if resume:
        st = _load_checkpoint(out, udi, optimizer, scaler)
        start_epoch, start_step, global_step = st["epoch"], st["step_in_epoch"], st["global_step"]
        if start_step >= n_iter:
            start_epoch, start_step = start_epoch + 1, 0

    workers = min(cfg.workers, os.cpu_count() or 1)  # more processes than cores only thrash

    def loader_for(ds, bs):
        return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False, num_workers=workers,
                                           pin_memory=device.type == "cuda")

    def knn_eval() -> float | None:
        if knn_val is None or not cfg.knn_every:
            return None
        ac = torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)
        ftr, ltr = extract_features(udi.teacher.backbone, loader_for(knn_train, cfg.batch_size * 2), device,
                                    autocast=ac)
        fva, lva = extract_features(udi.teacher.backbone, loader_for(knn_val, cfg.batch_size * 2), device,
                                    autocast=ac)
        return knn_accuracy(ftr, ltr, fva, lva, cfg.knn_k, cfg.knn_t, num_classes)

    summary: dict = {"knn_init": None, "knn_final": None}
    csv_path = out / "metrics.csv"
    if main and not resume:
        if csv_path.exists():
            csv_path.unlink()
        summary["knn_init"] = knn_eval()
        _append_csv(csv_path, {"epoch": -1, "global_step": 0, "knn_top1": summary["knn_init"]})
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)
    stop = cfg.stop_after_steps
    for epoch in range(start_epoch, cfg.epochs):
        train_set.epoch = epoch
        batches = _epoch_batches(len(train_set), cfg.batch_size, epoch, cfg.seed, rank, world)[:n_iter]
        first = start_step if epoch == start_epoch else 0
        # own generator: creating a DataLoader iterator draws a seed from the global RNG, which would shift the
        # drop-path masks of a resumed run (the restored RNG state is taken after that draw)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches[first:], num_workers=workers,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        sums: dict[str, torch.Tensor] = {}
        n_steps, t0 = 0, time.time()
        bar = None
        if progress and main:
            from tqdm import tqdm

            bar = tqdm(total=n_iter, initial=first, desc=f"udi epoch {epoch}", leave=False, dynamic_ncols=True)
        for step, (crops, src_maps, tgt_maps) in enumerate(loader, start=first):
            it = epoch * n_iter + step
            crops = [c.to(device, non_blocking=True) for c in crops]
            maps = ([m.to(device, non_blocking=True) for m in src_maps],
                    [m.to(device, non_blocking=True) for m in tgt_maps])
            parts = train_step(udi, optimizer, crops, maps, it, epoch, schedules, scaler, autocast, student)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.float()
            n_steps += 1
            global_step += 1
            if bar is not None:
                bar.update(1)
            if (step + 1) % cfg.log_every == 0 and not math.isfinite(float(parts["loss"])):
                raise FloatingPointError(f"UDI loss is {float(parts['loss'])} at step {global_step}; stopping.")
            if stop is not None and global_step >= stop:
                break
        if bar is not None:
            bar.close()
        dt = time.time() - t0
        done_epoch = not (stop is not None and global_step >= stop and step + 1 < n_iter)
        if not done_epoch:  # stopped inside the epoch (stop_after_steps): save the exact position
            if main:
                _save_checkpoint(out, udi, optimizer, scaler, epoch, step + 1, global_step)
            if distributed:
                torch.distributed.barrier()
            summary.update(steps=global_step, epochs_done=epoch)
            return summary
        if main:
            knn = knn_eval() if cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs) \
                else None
            row = {"epoch": epoch, "global_step": global_step, "knn_top1": knn, "epoch_time_s": round(dt, 2),
                   "img_per_s": round(n_steps * cfg.batch_size * world / max(dt, 1e-9), 1),
                   "lr": schedules["lr"][it], "wd": schedules["wd"][it], "momentum": schedules["momentum"][it]}
            row.update({k: float(v) / max(n_steps, 1) for k, v in sums.items()})
            _append_csv(csv_path, row)
            _plot_curves(_read_csv(csv_path), out / "curves.png")
            snap = f"teacher_backbone_ep{epoch + 1:04d}.safetensors" if cfg.save_every and \
                (epoch + 1) % cfg.save_every == 0 else None
            _save_checkpoint(out, udi, optimizer, scaler, epoch + 1, 0, global_step, snap)
            summary["knn_final"] = knn if knn is not None else summary["knn_final"]
            print(f"udi epoch {epoch}: loss {row.get('loss', float('nan')):.4f} knn {knn} "
                  f"({row['img_per_s']} img/s)", flush=True)
        if distributed:
            torch.distributed.barrier()
        if stop is not None and global_step >= stop:
            break
    summary.update(steps=global_step, epochs_done=cfg.epochs)
    return summary
