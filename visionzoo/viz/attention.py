"""Last-layer class-token self-attention maps of a ViT, one panel per head (DINO's visualisation).

Works for any timm ``VisionTransformer`` (ours included): the blocks run as usual up to the last one, whose
attention probabilities for the chosen class token are recomputed from its q/k projections (timm's fused attention
does not return them).

    visionzoo visualize attention --model udi_vit_small_patch16 --checkpoint W --image photo.jpg --token cls+
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from ..engine.precision import autocast_context, describe
from ..errors import UserError
from .common import load_image, load_model, upsample_map
from .groups import prepare_image, save_panels

__all__ = ["cls_attention", "mass_threshold", "render_attention", "run"]


def _token_index(model, token: str) -> int:
    if token == "cls":
        return 0
    if token == "cls+":
        if model.num_prefix_tokens < 2:
            raise UserError(f"token 'cls+' needs a model with two class tokens (UDI); {type(model).__name__} has "
                            f"{model.num_prefix_tokens} prefix token(s). Use --token cls.")
        return 1
    raise UserError(f"unknown token {token!r}: use 'cls' or 'cls+'.")


@torch.no_grad()
def cls_attention(model: torch.nn.Module, images: torch.Tensor, token: str = "cls") -> torch.Tensor:
    """Attention of a class token over the patch tokens in the last block: (B, heads, h, w), rows sum to <= 1
    (the mass on the prefix tokens is left out)."""
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "_pos_embed")):
        raise UserError(f"{type(model).__name__} is not a ViT (timm VisionTransformer); attention maps need one.")
    idx = _token_index(model, token)
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for blk in model.blocks[:-1]:
        x = blk(x)
    blk = model.blocks[-1]
    attn = blk.attn
    y = blk.norm1(x)
    B, N, C = y.shape
    qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    probs = ((q[:, :, idx:idx + 1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]  # (B, heads, N)
    patch = probs[:, :, model.num_prefix_tokens:]
    ph, pw = model.patch_embed.patch_size
    return patch.reshape(B, attn.num_heads, images.shape[-2] // ph, images.shape[-1] // pw)


def mass_threshold(maps: torch.Tensor, mass: float) -> torch.Tensor:
    """DINO's masks: per map, the smallest set of positions holding ``mass`` of the attention. (..., h, w) -> bool."""
    flat = maps.flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True)
    vals, order = flat.sort(-1, descending=True)
    keep_sorted = vals.cumsum(-1) - vals < mass  # include the position that crosses the threshold
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.view_as(maps)


def render_attention(image: np.ndarray, maps: torch.Tensor, out, title: str = "", masks=None) -> Path:
    """PNG: the image, then one panel per head with its map (and the threshold mask outline) over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = maps.float().cpu().numpy()
    heads, h, w = maps.shape
    H, W = image.shape[:2]
    up = lambda m: upsample_map(m, H, W)  # patches -> pixels
    cols = min(heads + 1, 4)
    rows = -(-(heads + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * H / W + 0.4), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(image)
    axes[0].set_title("input")
    for i in range(heads):
        m = maps[i]
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        axes[i + 1].imshow(image)
        axes[i + 1].imshow(up(m), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        if masks is not None:
            axes[i + 1].contour(up(masks[i].cpu().numpy().astype(float)), levels=[0.5], colors=["cyan"], linewidths=1)
        axes[i + 1].set_title(f"head {i}")
    for ax in axes[heads + 1:]:
        ax.set_visible(False)
    return save_panels(fig, axes, out, title)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.checkpoint)
    cfg = model.pretrained_cfg
    name = args.model or cfg.get("architecture")
    if args.checkpoint is None:
        warnings.warn(f"no --checkpoint: showing the attention of a randomly initialised {name}", stacklevel=1)
    size = args.img_size or cfg["input_size"][-1]
    x, shown = prepare_image(load_image(args.image), size, cfg["mean"], cfg["std"])
    # centre square crop: timm ViTs take their fixed input size unless built with dynamic_img_size
    H, W = x.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    x, shown = x[..., top:top + size, left:left + size], shown[top:top + size, left:left + size]
    amp = getattr(args, "amp", None) or "fp32"
    with autocast_context("cpu", amp):
        maps = cls_attention(model, x, getattr(args, "token", "cls"))[0].float()
    threshold = getattr(args, "threshold", None)
    masks = mass_threshold(maps, threshold) if threshold else None
    title = f"{name}, last block, [{getattr(args, 'token', 'cls').upper()}] attention" + (
        "" if args.checkpoint else " (random weights)")
    out = render_attention(shown, maps, args.out or "attention.png", title=title, masks=masks)
    print(f"wrote {out} ({describe(amp, 'cpu')})")
    return 0
