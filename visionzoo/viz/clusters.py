"""Cluster maps of Context Cluster models: which points each center gathered, drawn over the image.

Python API: :func:`cluster_assignment` (hard assignment tensor of one block and head) and
:func:`render_cluster_map` (PNG with one colour per cluster and visible region borders). CLI:
``visionzoo visualize clusters --model M [--checkpoint W] --image IMG --stage S --block B --head H --out PNG``
(:func:`add_arguments` / :func:`run`).

Fixes over the official ``cluster_visualize.py``: any batch size and non-square folds (cluster ids come from the
block itself), as many colours as clusters, RGB order kept, and the image is never stretched: it is resized on its
short side and center-cropped to a size the model's folds accept, and the map is drawn over exactly those pixels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data.image_io import decode_image
from ..errors import InputNotFoundError, UserError

__all__ = ["cluster_assignment", "render_cluster_map", "cluster_colors", "prepare_image", "add_arguments", "run",
           "draw"]


def _coc_model(model):
    from visionzoo.models import unwrap_model
    from visionzoo.models.context_cluster import ContextCluster

    model = unwrap_model(model)
    if not isinstance(model, ContextCluster):
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise UserError(f"cluster maps need a Context Cluster model (coc_*), got {name}. "
                        "`visionzoo list models coc*` shows them.")
    return model


@torch.no_grad()
def cluster_assignment(model, image_tensor: torch.Tensor, stage: int, block: int, head: int) -> torch.LongTensor:
    """Hard cluster assignment of every point of ``stage``'s map at ``block`` and ``head``.

    ``image_tensor``: normalised images ``[B, 3, H, W]`` (or ``[3, H, W]``). Returns ``LongTensor [B, h, w]`` with
    the stage map's shape; ids are ``region * centers_per_region + center`` (unique over the whole map), computed
    from the input of the block's token mixer (the norm1 output), as the block itself assigns them.
    ``block`` and ``head`` may be negative (Python indexing).
    """
    model = _coc_model(model)
    if image_tensor.ndim == 3:
        image_tensor = image_tensor.unsqueeze(0)
    n_stages = len(model.stage_indices)
    if not -n_stages <= stage < n_stages:
        raise UserError(f"stage {stage} out of range: the model has {n_stages} stages (0..{n_stages - 1})")
    stage = stage % n_stages
    blocks = model.network[model.stage_indices[stage]]
    if not -len(blocks) <= block < len(blocks):
        raise UserError(f"block {block} out of range: stage {stage} has {len(blocks)} blocks (0..{len(blocks) - 1})")
    mixer = blocks[block].token_mixer
    if not -mixer.heads <= head < mixer.heads:
        raise UserError(f"head {head} out of range: stage {stage} has {mixer.heads} heads (0..{mixer.heads - 1})")

    captured = {}

    def hook(_module, args):
        captured["x"] = args[0]

    handle = mixer.register_forward_pre_hook(hook)
    was_training = model.training
    try:
        model.eval()
        model.forward_intermediates(image_tensor, indices=[stage], stop_early=True, intermediates_only=True)
    finally:
        handle.remove()
        model.train(was_training)
    return mixer.cluster_assignment(captured["x"])[:, head]


def cluster_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct RGB colours (uint8 [n, 3]): matplotlib's tab20/tab20b/tab20c up to 60, else ``n`` evenly
    spaced hues of 'hsv' at alternating lightness; shuffled with a fixed seed so neighbouring ids differ."""
    from matplotlib import colormaps

    if n <= 60:
        base = np.concatenate([colormaps[c].colors for c in ("tab20", "tab20b", "tab20c")])[:, :3]
        cols = base[:n]
    else:
        hues = colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))[:, :3]
        shade = np.where(np.arange(n) % 3 == 0, 1.0, np.where(np.arange(n) % 3 == 1, 0.75, 0.5))[:, None]
        cols = hues * shade + (1 - shade) * 0.15
    order = np.random.RandomState(seed).permutation(n)
    return (np.asarray(cols)[order] * 255).round().astype(np.uint8)


def _to_uint8_rgb(image) -> np.ndarray:
    """PIL image, HxWx3 array, or [3, H, W] tensor (uint8, or float in [0, 1]) -> uint8 HxWx3."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    return arr


def render_cluster_map(image, assignment: torch.Tensor, path: Union[str, Path], alpha: float = 0.5,
                       border_color=(255, 255, 255), seed: int = 0) -> Path:
    """Write ``image`` with the clusters of ``assignment`` ([h, w] or [1, h, w] ids) drawn over it as a PNG.

    Each cluster gets its own colour blended with opacity ``alpha``; pixels where the cluster changes get
    ``border_color``. The map is upsampled (nearest) to the image, which must have the aspect ratio of the model
    input (e.g. the crop :func:`prepare_image` returns), so nothing is stretched. Returns the path written.
    """
    from PIL import Image

    rgb = _to_uint8_rgb(image)
    a = torch.as_tensor(assignment)
    if a.ndim == 3:
        if a.shape[0] != 1:
            raise UserError(f"render one image at a time: assignment has batch {a.shape[0]}; pass assignment[i]")
        a = a[0]
    H, W = rgb.shape[:2]
    h, w = a.shape
    if abs(H / W - h / w) > 0.02 * (h / w) + 1.0 / min(h, w):
        raise UserError(f"image {W}x{H} and cluster map {w}x{h} have different aspect ratios: pass the image the "
                        "model saw (see prepare_image), so that the map is not stretched")
    _, dense = torch.unique(a, return_inverse=True)  # 0..n-1 over the clusters present
    n = int(dense.max()) + 1
    up = F.interpolate(dense[None, None].float(), size=(H, W), mode="nearest")[0, 0].long().numpy()
    colors = cluster_colors(n, seed)
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * colors[up].astype(np.float32)
    edge = np.zeros((H, W), dtype=bool)
    edge[:, 1:] |= up[:, 1:] != up[:, :-1]
    edge[1:, :] |= up[1:, :] != up[:-1, :]
    out[edge] = border_color
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB").save(path)
    return path


def load_image(spec: str):
    """A PIL RGB image from a path, or scikit-learn's first sample image for ``'sample'``."""
    from PIL import Image, UnidentifiedImageError

    if spec == "sample":
        from sklearn.datasets import load_sample_images  # ships with scikit-learn, no download

        return Image.fromarray(load_sample_images().images[0]).convert("RGB")
    path = Path(spec)
    if not path.exists():
        raise InputNotFoundError(f"image not found: {path} (or pass --image sample for scikit-learn's sample image)")
    try:
        return decode_image(path)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}. Pass a JPEG/PNG file.") from None


def prepare_image(image, model, short_side: int = 224):
    """Resize ``image`` (PIL) on its short side, center-crop to the nearest size the model's folds accept (never
    stretched) and normalise with the model's mean/std.

    Returns (the same crop of the original full-resolution image, for drawing; tensor [1, 3, H, W]).
    """
    from PIL import Image

    model = _coc_model(model)
    mh, mw = model.size_multiple()
    W, H = image.size
    scale = short_side / min(W, H)
    rw, rh = max(mw, round(W * scale)), max(mh, round(H * scale))
    th, tw = max(mh, rh // mh * mh), max(mw, rw // mw * mw)
    top, left = (rh - th) // 2, (rw - tw) // 2
    img = image.resize((rw, rh), Image.BICUBIC).crop((left, top, left + tw, top + th))
    sx, sy = W / rw, H / rh
    full = image.crop((round(left * sx), round(top * sy), round((left + tw) * sx), round((top + th) * sy)))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return full, ((t - mean) / std).unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------------
# CLI: `visionzoo visualize clusters ...`

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="a Context Cluster model name, e.g. coc_tiny_plain")
    parser.add_argument("--checkpoint", default=None,
                        help="weights (ours, or an official .pth.tar, converted on load); random weights if omitted")
    parser.add_argument("--image", required=True, help="image file, or 'sample' (scikit-learn's sample image)")
    parser.add_argument("--stage", type=int, default=0, help="stage 0-3 (default 0)")
    parser.add_argument("--block", type=int, default=0, help="block index inside the stage, negative allowed")
    parser.add_argument("--head", type=int, default=0, help="head index (default 0)")
    parser.add_argument("--out", default=None, help="output PNG (default: <image>_<model>_s<S>b<B>h<H>.png)")
    parser.add_argument("--size", type=int, default=224, help="short side the image is resized to (default 224)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    parser.add_argument("--use-ema", action="store_true", help="load state_dict_ema from a training checkpoint")
    parser.add_argument("--device", default="cpu")
    return parser


def run(args: argparse.Namespace) -> int:
    """CLI entry (``visionzoo visualize clusters``): returns the exit status 0; :func:`draw` returns the path."""
    draw(args)
    return 0


def draw(args: argparse.Namespace) -> Path:
    """Load the model (and weights), compute the assignment of the chosen block/head and write the PNG."""
    import visionzoo
    from visionzoo.models import load_weights

    model = visionzoo.create_model(args.model)
    if args.checkpoint:
        load_weights(model, args.checkpoint, use_ema=getattr(args, "use_ema", False))
    else:
        print(f"note: no --checkpoint given, {args.model} has random weights", file=sys.stderr)
    # `visionzoo visualize clusters` shares its parser with the other viz tools (--img-size, no --alpha/--device)
    device = getattr(args, "device", None) or "cpu"
    size = getattr(args, "size", None) or getattr(args, "img_size", None) or 224
    alpha = getattr(args, "alpha", None)
    alpha = 0.5 if alpha is None else alpha
    model = _coc_model(model).to(device).eval()
    image = load_image(args.image)
    crop, x = prepare_image(image, model, size)
    assignment = cluster_assignment(model, x.to(device), args.stage, args.block, args.head)[0].cpu()
    out = args.out or f"{Path(args.image).stem}_{args.model}_s{args.stage}b{args.block}h{args.head}.png"
    path = render_cluster_map(crop, assignment, out, alpha=alpha)
    n = int(torch.unique(assignment).numel())
    print(f"wrote {path}: {n} clusters on a {assignment.shape[1]}x{assignment.shape[0]} (WxH) map, "
          f"model input {x.shape[3]}x{x.shape[2]}, drawn at {crop.size[0]}x{crop.size[1]}")
    return path


def main(argv: Optional[list] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="visionzoo visualize clusters",
                                                   description="Draw a CoC block's cluster assignment."))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
