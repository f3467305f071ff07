"""The networks (spec section 3): DINO head, SRS cross-attention, backbone + SRS + head, checkpoint filter."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ...errors import UserError
from ...models._attention import sdpa

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
            raise UserError(f"SRS: dim {dim} is not divisible by num_heads {num_heads}")
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
        o = sdpa(q, k, v).transpose(1, 2).reshape(B, Q, C)
        return self.norm(self.proj(o) + maps @ x)


def _num_heads(backbone: nn.Module) -> int:
    try:
        return int(backbone.blocks[0].attn.num_heads)
    except AttributeError:
        raise UserError("UDI needs a timm-style ViT backbone (blocks[i].attn.num_heads); pass srs_heads.") from None


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
            raise UserError(
                "UDI needs a ViT with two class tokens ([CLS], [CLS+]): use a udi_vit_* model or a timm ViT built "
                "with class_token=True and reg_tokens=1 (the first register token serves as [CLS+]).")
        if getattr(backbone, "no_embed_class", False):
            raise UserError("UDI needs a backbone with a pos_embed row per class token (no_embed_class=False).")
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
