"""Cluster maps of Context Cluster models: which points each center gathered, drawn over the image, for one set of
weights or, as an animation, across the snapshots of a run (the CoC README's "from scratch to the last epoch").

Python API: :func:`cluster_assignment` (hard assignment tensor of one block and head), :func:`render_cluster_map`
(PNG with one colour per cluster and visible region borders) and :func:`animate_clusters` (GIF/MP4 over a run's
``snapshots/``). CLI: ``visionzoo visualize clusters [--model M] [--checkpoint W|RUN] --image IMG --stage S --block B
--head H [--animate] --out FILE`` (:func:`add_arguments` / :func:`run`).

Fixes over the official ``cluster_visualize.py``: any batch size and non-square folds (cluster ids come from the
block itself), as many colours as clusters, RGB order kept, and the image is never stretched: it is resized on its
short side and center-cropped to a size the model's folds accept, and the map is drawn over exactly those pixels
(small inputs zoomed whole-pixel, so that a 32 px digit is readable).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..engine.precision import autocast_context, describe
from ..errors import MissingDependencyError, UserError
from .common import display_zoom, load_image, load_model, upsample_map, zoom

__all__ = ["cluster_assignment", "render_cluster_map", "cluster_overlay", "cluster_colors", "prepare_image",
           "animate_clusters", "load_image", "add_arguments", "run", "draw"]


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


def cluster_overlay(image, assignment: torch.Tensor, alpha: float = 0.5, border_color=(255, 255, 255),
                    seed: int = 0, num_ids: Optional[int] = None) -> np.ndarray:
    """``image`` with the clusters of ``assignment`` ([h, w] or [1, h, w] ids) drawn over it: uint8 (H', W', 3).

    Each cluster gets its own colour blended with opacity ``alpha``; pixels where the cluster changes get
    ``border_color``. Images smaller than ``MIN_DISPLAY_SIDE`` are zoomed whole-pixel first. The map is spread
    (nearest) over the image, which must have the aspect ratio of the model input (e.g. the crop
    :func:`prepare_image` returns), so nothing is stretched. With ``num_ids`` (all ids a block can give) a colour
    belongs to a cluster id, so frames of one animation keep their colours; otherwise to the clusters present.
    """
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
    if num_ids is None:
        _, ids = torch.unique(a, return_inverse=True)  # 0..n-1 over the clusters present
        n = int(ids.max()) + 1
    else:
        ids, n = a, int(num_ids)
    rgb = zoom(rgb, display_zoom(H, W))
    H, W = rgb.shape[:2]
    up = upsample_map(ids.long(), H, W)
    colors = cluster_colors(n, seed)
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * colors[up].astype(np.float32)
    edge = np.zeros((H, W), dtype=bool)
    edge[:, 1:] |= up[:, 1:] != up[:, :-1]
    edge[1:, :] |= up[1:, :] != up[:-1, :]
    out[edge] = border_color
    return out.round().clip(0, 255).astype(np.uint8)


def render_cluster_map(image, assignment: torch.Tensor, path: Union[str, Path], alpha: float = 0.5,
                       border_color=(255, 255, 255), seed: int = 0) -> Path:
    """Write :func:`cluster_overlay` of ``image`` and ``assignment`` as a PNG; returns the path written."""
    from PIL import Image

    out = cluster_overlay(image, assignment, alpha, border_color, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out, mode="RGB").save(path)
    return path


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
# over training: one frame per snapshot of a run (`--save-every-epochs N`, engine/state.py)

def _caption(frame: np.ndarray, text: str) -> np.ndarray:
    """``frame`` with a dark band below it holding ``text`` (the frame itself is left uncovered)."""
    from PIL import Image, ImageDraw, ImageFont

    H, W = frame.shape[:2]
    size = max(11, W // 18)
    band = size + size // 2
    canvas = Image.new("RGB", (W, H + band), (24, 24, 24))
    canvas.paste(Image.fromarray(frame, mode="RGB"), (0, 0))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    ImageDraw.Draw(canvas).text((size // 3, H + size // 4), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def _write_animation(frames: list, path: Path, seconds_per_frame: float) -> Path:
    """GIF through Pillow; MP4 through imageio-ffmpeg when it is installed."""
    from PIL import Image

    from ..files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg
        except ImportError:
            raise MissingDependencyError(f"writing {path.name} needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                                         f"or write a GIF: --out {path.with_suffix('.gif')}") from None
        H, W = frames[0].shape[:2]
        even = [np.pad(f, ((0, H % 2), (0, W % 2), (0, 0)), mode="edge") for f in frames]  # yuv420p: even sides

        def write_mp4(tmp: str) -> None:
            writer = imageio_ffmpeg.write_frames(tmp, (W + W % 2, H + H % 2), fps=1.0 / seconds_per_frame,
                                                 macro_block_size=1, output_params=["-f", "mp4"])
            writer.send(None)
            for f in even:
                writer.send(np.ascontiguousarray(f))
            writer.close()

        return atomic_write(path, write_mp4)
    images = [Image.fromarray(f, mode="RGB") for f in frames]
    return atomic_write(path, lambda tmp: images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(seconds_per_frame * 1000), loop=0))


def animate_clusters(model, run, image, out, stage: int = 0, block: int = 0, head: int = 0, short_side=None,
                     alpha: float = 0.5, seconds_per_frame: float = 0.5, device="cpu",
                     amp="fp32") -> tuple[Path, list[int]]:
    """The cluster map of ``stage``/``block``/``head`` on ``image`` (PIL) after every snapshot of the run folder
    ``run`` (``snapshots/epoch_NNNN.safetensors``), one frame each with its epoch, written to ``out`` (.gif, or .mp4
    with imageio-ffmpeg). ``model`` is the run's architecture (its weights are replaced frame by frame). Returns
    (the path, the epochs drawn)."""
    from visionzoo.models import load_weights

    from ..engine.state import list_snapshots

    snaps = list_snapshots(run)
    if not snaps:
        raise UserError(f"{run} holds no snapshots/epoch_NNNN.safetensors to animate: train it with "
                        f"--save-every-epochs N (and --save-init-snapshot for the weights before training).")
    model = _coc_model(model).to(device).eval()
    crop, x = prepare_image(image, model, short_side or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    maps = []
    for _, path in snaps:
        load_weights(model, path)
        with autocast_context(device, amp):
            maps.append(cluster_assignment(model, x.to(device), stage, block, head)[0].cpu())
    num_ids = max(int(a.max()) for a in maps) + 1  # ids are fixed per block: a cluster keeps its colour
    last = snaps[-1][0]
    frames = [_caption(cluster_overlay(crop, a, alpha=alpha, num_ids=num_ids),
                       f"epoch {epoch}/{last}  s{stage} b{block} h{head}") for (epoch, _), a in zip(snaps, maps)]
    return _write_animation(frames, Path(out), seconds_per_frame), [e for e, _ in snaps]


# ----------------------------------------------------------------------------------------------------------------
# CLI: `visionzoo visualize clusters ...`

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None,
                        help="a Context Cluster model name, e.g. coc_tiny_plain (not needed when --checkpoint is a "
                             "run folder or save_pretrained folder)")
    parser.add_argument("--checkpoint", default=None,
                        help="weights (ours, or an official .pth.tar, converted on load), a save_pretrained folder or "
                             "a run folder; random weights if omitted")
    parser.add_argument("--image", required=True, help="image file, or 'sample' (scikit-learn's sample image)")
    parser.add_argument("--stage", type=int, default=0, help="stage 0-3 (default 0)")
    parser.add_argument("--block", type=int, default=0, help="block index inside the stage, negative allowed")
    parser.add_argument("--head", type=int, default=0, help="head index (default 0)")
    parser.add_argument("--out", default=None, help="output PNG, or with --animate .gif/.mp4 "
                                                    "(default: <image>_<model>_s<S>b<B>h<H>.png/.gif)")
    parser.add_argument("--size", type=int, default=None,
                        help="short side the image is resized to (default: the model's input size, from the "
                             "checkpoint when it records one)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    parser.add_argument("--animate", action="store_true",
                        help="one frame per snapshot of the run folder --checkpoint (--save-every-epochs N)")
    parser.add_argument("--use-ema", action="store_true", help="the EMA weights (a run folder's ema/)")
    parser.add_argument("--device", default="cpu")
    return parser


def run(args: argparse.Namespace) -> int:
    """CLI entry (``visionzoo visualize clusters``): returns the exit status 0; :func:`draw` returns the path."""
    draw(args)
    return 0


def draw(args: argparse.Namespace) -> Path:
    """Load the model (and weights), compute the assignment of the chosen block/head and write the PNG, or with
    ``--animate`` the GIF/MP4 over the run's snapshots."""
    # `visionzoo visualize clusters` shares its parser with the other viz tools (--img-size, no --alpha/--device)
    device = getattr(args, "device", None) or "cpu"
    size = getattr(args, "size", None) or getattr(args, "img_size", None)
    alpha = getattr(args, "alpha", None)
    alpha = 0.5 if alpha is None else alpha
    animate = getattr(args, "animate", False)
    amp = getattr(args, "amp", None) or "fp32"
    if animate and not args.checkpoint:
        raise UserError("--animate draws the snapshots of a run: pass its run folder as --checkpoint RUN (trained "
                        "with --save-every-epochs N).")
    model = _coc_model(load_model(args.model, args.checkpoint, getattr(args, "use_ema", False))).to(device)
    if not args.checkpoint:
        print(f"note: no --checkpoint given, {args.model} has random weights", file=sys.stderr)
    name = args.model or model.pretrained_cfg.get("architecture", "coc")
    image = load_image(args.image)
    stem = f"{Path(args.image).stem}_{name}_s{args.stage}b{args.block}h{args.head}"
    if animate:
        out = args.out or f"{stem}.gif"
        path, epochs = animate_clusters(model, args.checkpoint, image, out, args.stage, args.block, args.head,
                                        size, alpha, device=device, amp=amp)
        print(f"wrote {path}: {len(epochs)} frames, epochs {', '.join(map(str, epochs))} ({describe(amp, device)})")
        return path
    size = size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    crop, x = prepare_image(image, model, size)
    with autocast_context(device, amp):
        assignment = cluster_assignment(model, x.to(device), args.stage, args.block, args.head)[0].cpu()
    path = render_cluster_map(crop, assignment, args.out or f"{stem}.png", alpha=alpha)
    n = int(torch.unique(assignment).numel())
    zoomed = display_zoom(crop.size[1], crop.size[0])
    print(f"wrote {path}: {n} clusters on a {assignment.shape[1]}x{assignment.shape[0]} (WxH) map, "
          f"model input {x.shape[3]}x{x.shape[2]}, drawn at {crop.size[0] * zoomed}x{crop.size[1] * zoomed} "
          f"({describe(amp, device)})")
    return path


def main(argv: Optional[list] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="visionzoo visualize clusters", allow_abbrev=False,
                                                   description="Draw a CoC block's cluster assignment."))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
