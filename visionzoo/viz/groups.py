"""Group maps for GPViT: which learnable group token each image position feeds most, and where a few groups look.

In a GP block, M group tokens gather the N image tokens by cross-attention (softmax over the image positions for
each group). The *group map* assigns every position to the group that attends to it most (argmax over groups of the
head-averaged grouping attention); the *group attention maps* show the attention of single groups over the image.

Python API::

    from visionzoo.viz.groups import group_attention, render_group_map
    attn = group_attention(model, images, layer=1)          # (B, heads, M, H/8, W/8), sums to 1 over positions
    render_group_map(image_rgb_uint8, attn[0], "groups.png")

Command line (wired as ``visionzoo visualize groups``)::

    visionzoo visualize groups --model gpvit_l1 --checkpoint gpvit_l1_in1k_300e.pth --image sample --layer 1 --out g.png
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..engine.precision import autocast_context, describe
from ..errors import UserError
from .common import load_image, load_model, upsample_map

__all__ = ["group_attention", "group_assignment", "load_image", "prepare_image", "render_group_map",
           "add_arguments", "run", "write_group_map"]


def _gp_layers(model) -> list[int]:
    from visionzoo.models.gpvit import GPBlock

    return [i for i, b in enumerate(getattr(model, "blocks", [])) if isinstance(b, GPBlock)]


def group_attention(model: torch.nn.Module, images: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
    """Grouping attention of the GP block at block index ``layer`` (default: the first GP block) for a normalised
    image batch (B, 3, H, W): softmax weights (B, heads, M, H/8, W/8), each group's weights summing to 1 over the
    image positions."""
    gp = _gp_layers(model)
    if not gp:
        raise UserError(f"{type(model).__name__} has no GP blocks: group maps need a GPViT model (gpvit_l1..l4, "
                        "gpvit_test).")
    layer = gp[0] if layer is None else int(layer)
    if layer not in gp:
        raise UserError(f"layer {layer} is not one of this model's GP blocks; GP blocks are at layers "
                        f"{', '.join(map(str, gp))}.")
    return model.group_attention(images, layers=[layer])[layer]


def group_assignment(attn: torch.Tensor, head: Optional[int] = None) -> torch.Tensor:
    """(..., heads, M, h, w) grouping attention -> (..., h, w) index of the group that takes most from each position
    (heads averaged unless ``head`` picks one)."""
    a = attn.mean(dim=-4) if head is None else attn.select(-4, head)
    return a.argmax(dim=-3)


def prepare_image(img, short_side: int, mean: Sequence[float], std: Sequence[float]):
    """Resize keeping the aspect ratio so that the short side is ``short_side`` and both sides are multiples of 16
    (what GPViT takes). Returns (normalised tensor (1, 3, H, W), displayed RGB uint8 array (H, W, 3))."""
    from PIL import Image

    w, h = img.size
    s = short_side / min(w, h)
    nw, nh = (max(16, int(round(v * s / 16)) * 16) for v in (w, h))
    arr = np.asarray(img.resize((nw, nh), Image.BICUBIC), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    t = (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return t.unsqueeze(0), arr


def _palette(n: int) -> np.ndarray:
    import matplotlib

    cols = np.concatenate([matplotlib.colormaps[c](np.arange(20))[:, :3] for c in ("tab20", "tab20b", "tab20c")])
    if n > len(cols):
        cols = np.concatenate([cols, matplotlib.colormaps["hsv"](np.linspace(0, 1, n - len(cols), endpoint=False))[:, :3]])
    return cols[:n]


def render_group_map(
        image: np.ndarray,
        attn: torch.Tensor,
        out: Union[str, Path],
        groups: Optional[Sequence[int]] = None,
        num_groups: int = 4,
        head: Optional[int] = None,
        title: Optional[str] = None,
) -> Path:
    """Write a PNG: the image, the group map (argmax group per position, one colour per group, over the image) and
    the attention maps of a few groups (``groups``, default: the ``num_groups`` groups owning most positions).

    ``image``: (H, W, 3) uint8 as fed to the model; ``attn``: (heads, M, h, w) grouping attention of that image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attn = attn.detach().float().cpu()
    heads, M, h, w = attn.shape
    a = attn.mean(0) if head is None else attn[head]  # (M, h, w)
    labels = a.argmax(0).numpy()  # (h, w)
    counts = np.bincount(labels.ravel(), minlength=M)
    if groups is None:
        groups = [int(g) for g in np.argsort(-counts, kind="stable")[:num_groups]]
    bad = [g for g in groups if not 0 <= g < M]
    if bad:
        raise UserError(f"group(s) {bad} out of range: this GP block has {M} groups (0..{M - 1}).")
    H, W = image.shape[:2]
    img = image.astype(np.float32) / 255
    cols = _palette(M)
    up = lambda m: upsample_map(m, H, W)  # stride-8 cells -> pixels
    lab_rgb = cols[up(labels).astype(int)]
    overlay = 0.45 * img + 0.55 * lab_rgb

    n = 2 + len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n * W / max(H, W) + 0.5, 3.6 * H / max(H, W) + 0.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(img)
    axes[0].set_title("input")
    axes[1].imshow(overlay)
    axes[1].set_title(f"argmax group ({len(np.unique(labels))} of {M} used)")
    for j, g in enumerate(groups):
        m = a[g].numpy()
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        ax = axes[2 + j]
        ax.imshow(img)
        ax.imshow(up(m), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        ax.contour(up(labels == g).astype(float), levels=[0.5], colors=[cols[g]], linewidths=1.5)
        ax.set_title(f"group {g} ({100 * counts[g] / labels.size:.0f}% argmax)")
    return save_panels(fig, axes, out, title, dpi=110)


def save_panels(fig, axes, out, title: str = "", dpi: int = 100) -> Path:
    """Hide the ticks of image panels, add the title, write the PNG (parent folders made) and close the figure."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------------------
# command line: visionzoo visualize groups

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="a GPViT model name (gpvit_l1..gpvit_l4, gpvit_test)")
    parser.add_argument("--checkpoint", default=None,
                        help="weights: ours or an official gpvit_lX_in1k_300e.pth (random weights if omitted)")
    parser.add_argument("--image", required=True, help="image file, or 'sample' (scikit-learn's china.jpg)")
    parser.add_argument("--layer", type=int, default=None,
                        help="block index of a GP block (1, 4, 7 or 10 for L1-L4; default: the first)")
    parser.add_argument("--out", default="groups.png", help="output PNG path")
    parser.add_argument("--groups", type=int, nargs="+", default=None,
                        help="group indices to show attention maps for (default: the largest groups)")
    parser.add_argument("--num-groups", type=int, default=4, help="how many groups to show when --groups is omitted")
    parser.add_argument("--head", type=int, default=None, help="one grouping head instead of the mean over heads")
    parser.add_argument("--img-size", type=int, default=None,
                        help="short side of the resized image (default: the model's input size); the long side "
                             "keeps the aspect ratio, both rounded to multiples of 16")
    parser.add_argument("--device", default="cpu")
    return parser


def write_group_map(args: argparse.Namespace) -> Path:
    """Build the model, run the image through it and write the PNG; returns its path. ``args`` may come from
    ``add_arguments`` or from the ``visionzoo visualize groups`` parser, which defines fewer flags (the missing
    ones take the defaults of ``add_arguments``)."""
    device = getattr(args, "device", None) or "cpu"
    out_path = getattr(args, "out", None) or "groups.png"
    model = load_model(args.model, args.checkpoint).to(device)
    cfg = model.pretrained_cfg
    name = args.model or cfg.get("architecture")
    if not _gp_layers(model):
        raise UserError(f"model '{name}' has no GP blocks; group maps need a GPViT model (gpvit_l1..l4, gpvit_test).")
    if args.checkpoint is None:
        warnings.warn(f"no --checkpoint: showing the groups of a randomly initialised {name}", stacklevel=1)
    size = getattr(args, "img_size", None) or cfg["input_size"][-1]
    x, shown = prepare_image(load_image(args.image), size, cfg["mean"], cfg["std"])
    amp = getattr(args, "amp", None) or "fp32"
    with autocast_context(device, amp):
        attn = group_attention(model, x.to(device), args.layer).float()
    layer = args.layer if args.layer is not None else _gp_layers(model)[0]
    title = f"{name}, GP block at layer {layer}" + ("" if args.checkpoint else " (random weights)")
    out = render_group_map(shown, attn[0], out_path, groups=args.groups or None,
                           num_groups=getattr(args, "num_groups", 4), head=getattr(args, "head", None), title=title)
    print(f"wrote {out} ({describe(amp, device)})")
    return out


def run(args: argparse.Namespace) -> int:
    """CLI entry point (the CLI turns the return value into the exit status)."""
    write_group_map(args)
    return 0


if __name__ == "__main__":
    run(add_arguments(argparse.ArgumentParser(prog="visionzoo visualize groups", allow_abbrev=False)).parse_args())
