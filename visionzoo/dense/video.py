"""``visionzoo videoseg``: semi-supervised video object segmentation by label propagation (DINO's protocol, used by
UDI: spec udi.md section 7) on the DAVIS-2017 layout, for any ViT, scored with J and F as davis2017-evaluation does.

Protocol (DINO ``eval_video_segmentation.py``): each frame is resized so its short side is ``--short-side`` (480)
and its long side floored to a multiple of 64, normalised with the model's mean/std; its feature is the last block's
final-normed patch tokens (every class / register token dropped: 2 for UDI, 1 for DINO-style ViTs), L2-normalised.
The first frame's annotation, resized (nearest) to the patch grid and one-hot encoded, and the soft label maps of the
7 previous frames form the context. For each target patch the affinity ``exp(cos / 0.1)`` to every context patch is
restricted to a (2*12+1)^2-patch neighbourhood, only the top 5 over all context frames are kept and renormalised,
and the label map is their weighted sum. It is upsampled (bilinear, x patch size), min-max normalised per object,
arg-maxed, resized (nearest) to the original frame size and written as a palette PNG.

Scoring (davis2017-evaluation, semi-supervised): for every object of every sequence, over all frames but the first
and the last: J = region IoU (1 when both masks are empty), F = boundary F-measure (boundaries of the masks, a
boundary pixel matches when the other boundary is within ceil(0.008 * image diagonal) pixels; the official code
matches through dilation with a disk of that radius, as here). Per object: mean (M), recall (fraction of frames
> 0.5) and decay (first quarter minus last quarter); the headline J&F-Mean is the mean of J-Mean and F-Mean, each
averaged over all objects.

``--data shapes`` (or ``visionzoo videoseg make-data``) writes an embedded procedural video set in DAVIS layout:
textured shapes moving (and occluding each other) over a slowly panning textured background, deterministic from a
seed, so the whole path runs on CPU in tests. ``--style texture`` (``--data-style texture``) makes objects and
background share one colour distribution so only their textures separate them (raw pixels no longer solve it).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..engine.precision import autocast_context
from ..errors import InputNotFoundError, UserError

RESOLUTION = "480p"


# ----------------------------------------------------------------------------------------------------------------
# palette PNGs

def davis_palette() -> np.ndarray:
    """The 256-entry PASCAL VOC / DAVIS colour map (uint8 [256, 3]): index 1 red, 2 green, 3 yellow, ..."""
    idx = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):  # 8 bit planes, not a loop over pixels
        for ch in range(3):
            pal[:, ch] |= ((idx >> (3 * bit + ch)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


def write_indexed_png(path, labels: np.ndarray, palette: np.ndarray) -> None:
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    img.save(path)


def read_indexed_png(path) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 HxW, palette uint8 [256, 3]) of a palette PNG (an RGB PNG is an error naming the file)."""
    with Image.open(path) as img:
        if img.mode != "P":
            raise UserError(f"{path} is a {img.mode} image; DAVIS annotations are palette (mode P) PNGs whose "
                            f"pixel values are the object ids")
        pal = np.zeros((256, 3), dtype=np.uint8)
        raw = np.asarray(img.getpalette() or [], dtype=np.uint8)[:768].reshape(-1, 3)
        pal[:len(raw)] = raw
        return np.array(img), pal


# ----------------------------------------------------------------------------------------------------------------
# embedded procedural videos (DAVIS layout)

def _texture(rng: np.random.Generator, h: int, w: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A colour texture evaluated at coordinates (yy, xx): base colour + two oriented gratings + a checker."""
    base = rng.uniform(30, 225, size=3)
    out = np.broadcast_to(base, yy.shape + (3,)).astype(np.float64)
    for _ in range(2):
        theta, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.6)
        amp = rng.uniform(15, 45, size=3)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) * freq
        out = out + amp * np.sin(phase + rng.uniform(0, 2 * math.pi))[..., None]
    cell = int(rng.integers(4, 12))
    checker = ((np.floor(yy / cell) + np.floor(xx / cell)) % 2)[..., None]
    return out + rng.uniform(-25, 25, size=3) * checker


def _oriented_noise(rng: np.random.Generator, h: int, w: int, theta: float, freq: float) -> np.ndarray:
    """Band-pass filtered white noise ``[h, w]`` with energy around spatial frequency ``freq`` (cycles / pixel)
    and orientation ``theta`` (wave vector angle), scaled to zero mean and unit variance: a stochastic, oriented
    texture whose per-pixel values are Gaussian whatever its orientation and frequency."""
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.fftfreq(w)[None, :]
    radius = np.hypot(ky, kx)
    dang = np.angle(np.exp(2j * (np.arctan2(ky, kx) - theta))) / 2  # angle difference modulo pi
    gain = np.exp(-((radius - freq) / (0.3 * freq)) ** 2 / 2) * np.exp(-(dang / 0.25) ** 2 / 2)
    field = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(h, w))) * gain))
    return (field - field.mean()) / max(float(field.std()), 1e-12)


def _step(o: dict, h: int, w: int) -> None:
    """Move an object one frame on (bouncing off the borders) and spin it."""
    o["pos"] = o["pos"] + o["vel"]
    lo, hi = np.array([o["r"], o["r"]]), np.array([h - o["r"], w - o["r"]])
    bounce = (o["pos"] < lo) | (o["pos"] > hi)
    o["vel"] = np.where(bounce, -o["vel"], o["vel"])
    o["pos"] = np.clip(o["pos"], lo, hi)
    o["angle"] += o["spin"]


def _render_texture(seed: int, n_frames: int, size: tuple[int, int], max_objects: int):
    """``render_video(style="texture")``: objects and background are separable by texture only.

    Background and objects are oriented band-pass noise fields (unit-variance Gaussian per pixel) mapped through
    ONE colour ramp per sequence (``base + s * amp``), so object and background pixels have the same colour
    distribution (each region is also standardised per frame). The orientations of the background's and the
    objects' textures are spread evenly over 180 degrees (+- 9) and each object's frequency is the background's
    x1.8 or /1.8. The textures also change over time (each frame blends two fields with an angle that advances
    1.2 rad per frame, so pixels decorrelate within a few frames), the objects move with their texture, spin and
    pulse in size, and the background pans: a raw-pixel patch match cannot follow them for long.
    """
    from PIL import ImageDraw

    h, w = size
    rng = np.random.default_rng(seed)
    base = rng.uniform(90, 165, size=3)
    amp = rng.uniform(25, 40, size=3) * rng.choice([-1.0, 1.0], size=3)
    pad = 2 * max(h, w)
    theta_bg, f_bg = rng.uniform(0, math.pi), rng.uniform(0.1, 0.16)
    bg = [_oriented_noise(rng, h + pad, w + pad, theta_bg, f_bg) for _ in range(2)]
    pan = rng.uniform(-1.0, 1.0, size=2)
    n_obj = int(rng.integers(1, max_objects + 1))
    objs = []
    for i in range(n_obj):
        r = rng.uniform(0.14, 0.24) * min(h, w)
        theta = theta_bg + math.pi * (i + 1) / (n_obj + 1) + rng.uniform(-0.15, 0.15)  # evenly spread
        freq = f_bg * (1.8 if rng.random() < 0.5 else 1 / 1.8)
        objs.append(dict(kind=int(rng.integers(3)), r=r, aspect=rng.uniform(0.7, 1.3),
                         pos=np.array([rng.uniform(r, h - r), rng.uniform(r, w - r)]),
                         vel=rng.uniform(-3.0, 3.0, size=2), angle=rng.uniform(0, 2 * math.pi),
                         spin=rng.uniform(-0.08, 0.08), pulse=rng.uniform(0.1, 0.2),
                         pulse_rate=rng.uniform(0.2, 0.5), phase=rng.uniform(0, 2 * math.pi),
                         tex=[_oriented_noise(rng, 2 * h, 2 * w, theta, freq) for _ in range(2)]))
    mix = rng.uniform(0, 2 * math.pi)
    frames = np.empty((n_frames, h, w, 3), dtype=np.uint8)
    labels = np.zeros((n_frames, h, w), dtype=np.uint8)
    for t in range(n_frames):  # frames depend on the previous positions: a loop over time is inherent
        a = mix + 1.2 * t  # texture evolution: unit variance is kept by the cos / sin blend
        oy, ox = np.clip(np.round(pan * t).astype(int) + pad // 2, 0, pad)
        s = (math.cos(a) * bg[0] + math.sin(a) * bg[1])[oy:oy + h, ox:ox + w].copy()
        for k, o in enumerate(objs, start=1):
            cy, cx = o["pos"]
            r = o["r"] * (1 + o["pulse"] * math.sin(o["pulse_rate"] * t + o["phase"]))
            n_vert = {0: 40, 1: 4, 2: 3}[o["kind"]]
            ang = o["angle"] + 2 * math.pi * np.arange(n_vert) / n_vert
            poly = np.stack([cx + r * o["aspect"] * np.cos(ang), cy + r * np.sin(ang)], axis=1)
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in poly.tolist()], fill=1)
            mask = np.asarray(canvas, dtype=bool)
            # the texture window moves with the object (integer shift of a 2h x 2w field)
            y0, x0 = h - int(round(cy)), w - int(round(cx))
            tex = math.cos(a + k) * o["tex"][0] + math.sin(a + k) * o["tex"][1]
            s[mask] = tex[y0:y0 + h, x0:x0 + w][mask]
            labels[t][mask] = k
            _step(o, h, w)
        # standardise each region of the frame (background, every object) so their intensity statistics match
        # exactly and not just in expectation (a small object holds few independent texture samples)
        for k in np.unique(labels[t]):  # a few labels per frame
            region = labels[t] == k
            s[region] = (s[region] - s[region].mean()) / max(float(s[region].std()), 1e-6)
        img = base + s[..., None] * amp
        noise = np.random.default_rng(seed * 7919 + t).normal(0, 6, size=img.shape)
        frames[t] = np.clip(img + noise, 0, 255).astype(np.uint8)
    return frames, labels


STYLES = ("shapes", "texture", "lighting")

# per-frame photometric change of the "lighting" style: factor ranges inside DINO's colour jitter (brightness and
# contrast 0.4, saturation 0.2, hue 0.1), so invariance to them is what the SSL augmentations teach
LIGHTING = dict(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.8, 1.2), hue=(-0.1, 0.1))


def _relight(frames: np.ndarray, seed: int) -> np.ndarray:
    """Each frame of ``[T, H, W, 3]`` uint8 with its own random brightness, contrast, saturation and hue
    (torchvision's colour functions), as auto-exposure and white-balance flicker would do."""
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(seed)
    factors = {k: rng.uniform(lo, hi, size=len(frames)) for k, (lo, hi) in LIGHTING.items()}
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # the factors differ per frame: one call per frame
    out = [TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
        f, float(factors["brightness"][t])), float(factors["contrast"][t])), float(factors["saturation"][t])),
        float(factors["hue"][t])) for t, f in enumerate(x)]
    return torch.stack(out).permute(0, 2, 3, 1).contiguous().numpy()


def render_video(seed: int, n_frames: int = 16, size: tuple[int, int] = (96, 128), max_objects: int = 3,
                 style: str = "shapes"):
    """One sequence: ``(frames uint8 [T, H, W, 3], labels uint8 [T, H, W])``; label k = object k (0 background).

    ``style="shapes"`` (default): 1..max_objects shapes (ellipse, rectangle, triangle) with their own textures
    (which move with them) travel along straight lines, bouncing off the borders, in front of a panning textured
    background; later objects are in front (occlusions happen). Every object is visible in the first frame.
    Each texture has its own colours, so colour alone separates the objects (raw pixels solve it).
    ``style="texture"``: the same motion, but objects and background share one colour distribution and differ
    only by the orientation / frequency of their (time-varying) textures; see :func:`_render_texture`.
    ``style="lighting"``: the default videos with a random brightness, contrast, saturation and hue per frame
    (:data:`LIGHTING`): colour is no longer constant over time, so raw colour matching across frames fails.
    """
    from PIL import ImageDraw

    if style not in STYLES:
        raise UserError(f"unknown video style {style!r}; choose one of {', '.join(STYLES)}")
    if style == "texture":
        return _render_texture(seed, n_frames, size, max_objects)
    if style == "lighting":
        frames, labels = render_video(seed, n_frames, size, max_objects, "shapes")
        return _relight(frames, seed * 7919 + 1), labels

    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pan = rng.uniform(-1.0, 1.0, size=2)
    bg_rng_state = rng.integers(2 ** 31)
    n_obj = int(rng.integers(1, max_objects + 1))
    objs = []
    for _ in range(n_obj):
        r = rng.uniform(0.12, 0.22) * min(h, w)
        objs.append(dict(kind=int(rng.integers(3)), r=r, aspect=rng.uniform(0.7, 1.3),
                         pos=np.array([rng.uniform(r, h - r), rng.uniform(r, w - r)]),
                         vel=rng.uniform(-3.0, 3.0, size=2), angle=rng.uniform(0, 2 * math.pi),
                         spin=rng.uniform(-0.08, 0.08), tex_seed=int(rng.integers(2 ** 31))))
    frames = np.empty((n_frames, h, w, 3), dtype=np.uint8)
    labels = np.zeros((n_frames, h, w), dtype=np.uint8)
    for t in range(n_frames):  # frames depend on the previous positions: a loop over time is inherent
        dy, dx = pan * t
        img = _texture(np.random.default_rng(bg_rng_state), h, w, yy + dy, xx + dx)
        for k, o in enumerate(objs, start=1):
            cy, cx = o["pos"]
            n_vert = {0: 40, 1: 4, 2: 3}[o["kind"]]
            a = o["angle"] + 2 * math.pi * np.arange(n_vert) / n_vert
            poly = np.stack([cx + o["r"] * o["aspect"] * np.cos(a), cy + o["r"] * np.sin(a)], axis=1)
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in poly.tolist()], fill=1)
            mask = np.asarray(canvas, dtype=bool)
            tex = _texture(np.random.default_rng(o["tex_seed"]), h, w, yy - cy, xx - cx)  # moves with the object
            img[mask] = tex[mask]
            labels[t][mask] = k
            _step(o, h, w)
        noise = np.random.default_rng(seed * 7919 + t).normal(0, 6, size=img.shape)
        frames[t] = np.clip(img + noise, 0, 255).astype(np.uint8)
    return frames, labels


def write_davis(root, n_sequences: int = 4, n_frames: int = 16, size: tuple[int, int] = (96, 128),
                max_objects: int = 3, seed: int = 0, split: str = "val", style: str = "shapes") -> Path:
    """DAVIS-2017 layout under ``root``: ``JPEGImages/480p/<seq>/%05d.jpg``, palette PNGs
    ``Annotations/480p/<seq>/%05d.png`` and ``ImageSets/2017/<split>.txt``. Returns ``root``. ``style``: see
    :func:`render_video` (sequence names start with the style: ``shapes_val_000``, ``texture_val_000``)."""
    root = Path(root)
    palette = davis_palette()
    names = []
    for i in range(n_sequences):
        name = f"{style}_{split}_{i:03d}"
        frames, labels = render_video(seed * 100_003 + i + (0 if split == "val" else 50_000), n_frames, size,
                                      max_objects, style)
        img_dir, ann_dir = root / "JPEGImages" / RESOLUTION / name, root / "Annotations" / RESOLUTION / name
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for t in range(n_frames):
            Image.fromarray(frames[t]).save(img_dir / f"{t:05d}.jpg", quality=95)
            write_indexed_png(ann_dir / f"{t:05d}.png", labels[t], palette)
        names.append(name)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def frames_to_image_folder(root, dest, split: str = "val", val_every: int = 12) -> int:
    """Copy the frames of ``root``'s ``split`` sequences to ``dest/train/frames/<seq>_<frame>.jpg`` (every
    ``val_every``-th to ``dest/val/frames/``): an image folder for self-supervised pretraining on the videos.
    Returns the number of frames."""
    dest = Path(dest)
    for name in ("train", "val"):
        (dest / name / "frames").mkdir(parents=True, exist_ok=True)
    n = 0
    for seq in list_sequences(root, split):
        for frame in sequence_files(root, seq)[0]:
            shutil.copyfile(frame, dest / ("val" if n % val_every == 0 else "train") / "frames" / f"{seq}_{frame.name}")
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------------------
# data set access

def list_sequences(root, split: str = "val", sequences=None) -> list[str]:
    root = Path(root)
    if not (root / "JPEGImages" / RESOLUTION).is_dir():
        raise InputNotFoundError(f"{root} is not a DAVIS-2017 root: {root}/JPEGImages/{RESOLUTION}/<sequence>/ is "
                                 f"missing (pass the folder holding JPEGImages/, Annotations/ and ImageSets/, or "
                                 f"'shapes' for the embedded videos)")
    if sequences:
        return list(sequences)
    split_file = root / "ImageSets" / "2017" / f"{split}.txt"
    if not split_file.is_file():
        raise InputNotFoundError(f"split file not found: {split_file} (DAVIS-2017 lists its sequences in "
                                 f"ImageSets/2017/{{train,val}}.txt; or name them with --sequences)")
    return [s.strip() for s in split_file.read_text().splitlines() if s.strip()]


def sequence_files(root, seq: str) -> tuple[list[Path], list[Path]]:
    """(frame JPEGs, annotation PNGs) of a sequence, sorted; the first annotation must exist."""
    root = Path(root)
    frames = sorted((root / "JPEGImages" / RESOLUTION / seq).glob("*.jpg"))
    if not frames:
        raise InputNotFoundError(f"no frames for sequence {seq!r}: {root}/JPEGImages/{RESOLUTION}/{seq}/*.jpg")
    ann_dir = root / "Annotations" / RESOLUTION / seq
    anns = [ann_dir / (f.stem + ".png") for f in frames]
    if not anns[0].is_file():
        raise InputNotFoundError(f"the first frame's annotation {anns[0]} is missing (label propagation starts "
                                 f"from it)")
    return frames, anns


def target_size(h: int, w: int, short_side: int, multiple: int, patch: int) -> tuple[int, int]:
    """DINO's ``read_frame`` size: short side = ``short_side`` (0: keep), long side floored to ``multiple``; both
    then floored to the patch size (a no-op for 480 / 64 / patch 8 or 16)."""
    if short_side > 0:
        if h > w:
            tw, th = short_side, int((short_side * h / w) // multiple * multiple)
        else:
            th, tw = short_side, int((short_side * w / h) // multiple * multiple)
    else:
        th, tw = h, w
    th, tw = th // patch * patch, tw // patch * patch
    if th < patch or tw < patch:
        raise UserError(f"frames of {h}x{w} resized with --short-side {short_side} --size-multiple {multiple} "
                        f"leave no whole patch of {patch} pixels; use a larger --short-side")
    return th, tw


# ----------------------------------------------------------------------------------------------------------------
# model and features

def load_vit(model_name: str | None, checkpoint: str | None, seed: int = 0):
    """A ViT for dense features at any input size (``dynamic_img_size``), from a name and/or weights (any weights
    ``visionzoo knn`` accepts, a ``visionzoo pretrain`` run folder included)."""
    from ..evals.knn import load_model

    try:
        model = load_model(model_name, checkpoint, num_classes=0, seed=seed, dynamic_img_size=True)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        raise UserError(f"videoseg needs a ViT (patch tokens at any frame size); {model_name} does not take "
                        f"dynamic_img_size") from None
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise UserError(f"videoseg needs a ViT with patch tokens; {model_name} is a {type(model).__name__}")
    return model


def patch_size(model) -> int:
    p = model.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def patch_features(model, x):
    """L2-normalised last-block final-normed patch tokens ``[B, h*w, C]`` (all prefix tokens dropped)."""
    tokens = model.forward_features(x)
    return F.normalize(tokens[:, int(model.num_prefix_tokens):].float(), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# label propagation

def neighbourhood_mask(h: int, w: int, radius: int, device=None):
    """Bool ``[h*w, h*w]``: patch pairs at most ``radius`` apart in both row and column (DINO's
    ``restrict_neighborhood``, vectorised); ``radius <= 0`` means no restriction."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    if radius <= 0:
        return torch.ones(h * w, h * w, dtype=torch.bool, device=device)
    return ((rows[:, None] - rows[None]).abs() <= radius) & ((cols[:, None] - cols[None]).abs() <= radius)


def propagate(feat_tar, feats_ctx, segs_ctx, mask=None, topk: int = 5, temperature: float = 0.1,
              chunk: int = 4096):
    """Label map ``[K, N]`` of a target frame from its features ``[N, C]`` and the context: features
    ``[M, N, C]`` and soft label maps ``[M, K, N]`` (all features L2-normalised; ``mask`` [N, N] bool).

    For each target patch: affinity exp(cos / T) to every context patch (zero outside ``mask``), keep the ``topk``
    largest over all M context frames, normalise them to sum 1, average the context labels with those weights.
    Target patches are processed in chunks (a loop over chunks of ``chunk`` patches bounds the memory of the
    M x N x chunk affinity at high resolution; it is one chunk at DAVIS 480p with patch 16).
    """
    M, N, _ = feats_ctx.shape
    K = segs_ctx.shape[1]
    src = feats_ctx.reshape(M * N, -1)
    labels_src = segs_ctx.permute(1, 0, 2).reshape(K, M * N)  # [K, M*N]
    out = []
    for s in range(0, feat_tar.shape[0], chunk):
        q = feat_tar[s:s + chunk]  # [n, C]
        aff = torch.exp(src @ q.T / temperature)  # [M*N, n]
        if mask is not None:
            aff = aff.view(M, N, -1) * mask[:, s:s + chunk]
            aff = aff.view(M * N, -1)
        vals, idx = aff.topk(min(topk, M * N), dim=0)  # [k, n]
        weights = vals / vals.sum(0, keepdim=True).clamp_min(1e-30)
        out.append((labels_src[:, idx] * weights).sum(1))  # [K, k, n] -> [K, n]
    return torch.cat(out, dim=1)


def _norm_mask(seg):
    """DINO's ``norm_mask``: each object channel with a positive maximum is min-max scaled to [0, 1]."""
    mn = seg.amin(dim=(-2, -1), keepdim=True)
    mx = seg.amax(dim=(-2, -1), keepdim=True)
    scaled = (seg - mn) / (mx - mn).clamp_min(1e-12)
    return seg.where(mx <= 0, scaled)


def _load_frame(path, size: tuple[int, int], mean, std):
    from ..data.image_io import decode_image  # the one decoder: 16-bit and other modes scaled, not clipped

    arr = np.asarray(decode_image(path), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    if tuple(x.shape[-2:]) != tuple(size):  # cv2.resize INTER_LINEAR as DINO: bilinear, no antialias
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def segment_sequence(model, frames: list, first_ann, out_dir=None, *, short_side: int = 480,
                     size_multiple: int = 64, n_last_frames: int = 7, radius: int = 12, topk: int = 5,
                     temperature: float = 0.1, device="cpu", batch_size: int = 8, amp="fp32") -> np.ndarray:
    """Propagate the first annotation through ``frames`` (paths); returns the predicted labels uint8
    ``[T, H, W]`` at the original size and, with ``out_dir``, writes them as palette PNGs (the first
    annotation's palette). Features do not depend on the predictions, so they are computed first, in batches of
    ``batch_size`` frames; only the propagation walks through time."""
    labels0, palette = read_indexed_png(first_ann)
    H, W = labels0.shape
    p = patch_size(model)
    th, tw = target_size(H, W, short_side, size_multiple, p)
    h, w = th // p, tw // p
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    # first frame's labels at patch resolution (PIL nearest, as DINO's read_seg), one-hot over 0..max id
    small = np.array(Image.fromarray(labels0).resize((w, h), Image.NEAREST)).astype(np.int64)
    n_labels = int(labels0.max()) + 1
    seg0 = F.one_hot(torch.from_numpy(small).reshape(-1), n_labels).T.float().to(device)  # [K, N]
    mask = neighbourhood_mask(h, w, radius, device) if radius > 0 else None

    with torch.no_grad(), autocast_context(device, amp):  # features in ``amp``; the propagation in fp32
        feats = torch.cat([
            patch_features(model, torch.cat([_load_frame(f, (th, tw), mean, std) for f in frames[i:i + batch_size]])
                           .to(device)).float() for i in range(0, len(frames), batch_size)])  # [T, N, C]

    preds = np.empty((len(frames), H, W), dtype=np.uint8)
    preds[0] = labels0
    first = (feats[0], seg0)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        write_indexed_png(os.path.join(out_dir, Path(frames[0]).stem + ".png"), labels0, palette)
    queue: list = []  # (features, soft labels) of the n_last_frames previous frames
    for t in range(1, len(frames)):  # each frame depends on the previous predictions
        f_tar = feats[t]
        used_f = torch.stack([first[0]] + [q[0] for q in queue])
        used_s = torch.stack([first[1]] + [q[1] for q in queue])
        with torch.no_grad():
            seg = propagate(f_tar, used_f, used_s, mask, topk, temperature)  # [K, N]
        if n_last_frames > 0:
            if len(queue) == n_last_frames:
                queue.pop(0)
            queue.append((f_tar, seg))
        up = F.interpolate(seg.view(1, -1, h, w), scale_factor=p, mode="bilinear", align_corners=False)[0]
        lab = _norm_mask(up).argmax(0).to(torch.uint8).cpu().numpy()
        lab = np.array(Image.fromarray(lab).resize((W, H), Image.NEAREST))
        preds[t] = lab
        if out_dir is not None:
            write_indexed_png(os.path.join(out_dir, Path(frames[t]).stem + ".png"), lab, palette)
    return preds


# ----------------------------------------------------------------------------------------------------------------
# J and F (davis2017-evaluation semantics, batched over frames in torch)

def region_j(pred, gt, void=None):
    """Region similarity J (IoU) per frame of bool ``[T, H, W]`` masks; 1 where both are empty."""
    pred, gt = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool()
    valid = torch.ones_like(gt) if void is None else ~torch.as_tensor(void).bool()
    inter = ((pred & gt) & valid).sum((-2, -1)).double()
    union = ((pred | gt) & valid).sum((-2, -1)).double()
    return torch.where(union == 0, torch.ones_like(union), inter / union.clamp_min(1))


def seg_to_boundary(seg):
    """Boundary pixels of bool masks ``[T, H, W]``: a pixel differing from its east, south or south-east neighbour
    (the last row / column compare along it only; the corner is never a boundary), as davis2017's ``_seg2bmap``."""
    seg = torch.as_tensor(seg).bool()
    e, s, se = torch.zeros_like(seg), torch.zeros_like(seg), torch.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def _dilate(b, radius: int):
    """Binary dilation of bool ``[T, H, W]`` by a disk of ``radius`` (skimage's ``disk``: dx^2 + dy^2 <= r^2).

    The disk is split into its 2r+1 rows: each row is a horizontal max-pool of half-width isqrt(r^2 - dy^2), shifted
    by dy; O(r) cheap passes instead of an O(r^2) convolution (r = 8 at DAVIS 480p).
    """
    if radius <= 0:
        return b
    x = b.float().unsqueeze(1)
    H = b.shape[-2]
    out = torch.zeros_like(b, dtype=torch.bool)
    rows = {}
    for dy in range(-radius, radius + 1):  # kernel rows, not pixels
        w = math.isqrt(radius * radius - dy * dy)
        if w not in rows:
            rows[w] = F.max_pool2d(x, (1, 2 * w + 1), stride=1, padding=(0, w)).squeeze(1) > 0
        lo, hi = max(0, -dy), min(H, H - dy)
        if lo < hi:
            out[..., lo:hi, :] |= rows[w][..., lo + dy:hi + dy, :]
    return out


def boundary_f(pred, gt, void=None, bound_th: float = 0.008):
    """Boundary F-measure per frame of bool ``[T, H, W]`` masks (davis2017 ``f_measure``): tolerance
    ``ceil(bound_th * diagonal)`` pixels (or ``bound_th`` pixels when >= 1), matching by disk dilation;
    both boundaries empty -> 1, exactly one empty -> 0."""
    pred, gt = torch.as_tensor(pred).bool(), torch.as_tensor(gt).bool()
    H, W = gt.shape[-2:]
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(H, W)))
    if void is not None:
        valid = ~torch.as_tensor(void).bool()
        pred, gt = pred & valid, gt & valid
    fg_b, gt_b = seg_to_boundary(pred), seg_to_boundary(gt)
    n_fg, n_gt = fg_b.sum((-2, -1)).double(), gt_b.sum((-2, -1)).double()
    fg_match = (fg_b & _dilate(gt_b, radius)).sum((-2, -1)).double()
    gt_match = (gt_b & _dilate(fg_b, radius)).sum((-2, -1)).double()
    precision = torch.where(n_fg == 0, torch.ones_like(n_fg), fg_match / n_fg.clamp_min(1))
    recall = torch.where(n_gt == 0, torch.ones_like(n_gt), gt_match / n_gt.clamp_min(1))
    f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return torch.where(precision + recall == 0, torch.zeros_like(f), f)


def statistics(x: np.ndarray, n_bins: int = 4) -> dict:
    """davis2017 ``db_statistics``: mean, recall (> 0.5) and decay (first bin minus last of 4 time bins)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {"M": float("nan"), "R": float("nan"), "D": float("nan")}
    ids = (np.round(np.linspace(1, len(x), n_bins + 1) + 1e-10) - 1).astype(int)
    bins = [x[ids[i]:ids[i + 1] + 1] for i in range(n_bins)]
    with np.errstate(all="ignore"):
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3])) if len(x) >= 1 else float("nan")
    return {"M": float(np.nanmean(x)), "R": float(np.nanmean(x > 0.5)), "D": decay}


def score_sequence(gt: np.ndarray, pred: np.ndarray, n_objects: int | None = None, void_label: int = 255) -> list:
    """Per object k = 1..n_objects (default: the largest id of the first annotation): J and F of every frame but
    the first and the last. ``gt`` / ``pred``: uint8 ``[T, H, W]`` label maps; ``void_label`` pixels are ignored."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise UserError(f"prediction shape {pred.shape} differs from the annotations' {gt.shape}")
    first = gt[0][gt[0] != void_label]
    n_objects = n_objects if n_objects is not None else int(first.max()) if first.size else 0
    gt_m, pred_m = gt[1:-1], pred[1:-1]
    void = gt_m == void_label
    out = []
    for k in range(1, n_objects + 1):  # a few objects per sequence; frames and pixels are batched
        j = region_j(pred_m == k, gt_m == k, void).numpy()
        f = boundary_f(pred_m == k, gt_m == k, void).numpy()
        out.append({"object": k, "J": j, "F": f})
    return out


def summarize(per_object: list[dict]) -> dict:
    """davis2017 global table: J/F mean, recall and decay averaged over all objects; J&F-Mean."""
    rows = []
    for o in per_object:
        js, fs = statistics(o["J"]), statistics(o["F"])
        rows.append({"sequence": o["sequence"], "object": o["object"], "frames": int(len(o["J"])),
                     "J_mean": js["M"], "J_recall": js["R"], "J_decay": js["D"],
                     "F_mean": fs["M"], "F_recall": fs["R"], "F_decay": fs["D"]})
    g = {k: float(np.nanmean([r[k] for r in rows])) if rows else float("nan")
         for k in ("J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay")}
    g["JF_mean"] = (g["J_mean"] + g["F_mean"]) / 2
    seqs = {}
    for r in rows:
        seqs.setdefault(r["sequence"], []).append(r)
    per_seq = {s: {"J_mean": float(np.mean([r["J_mean"] for r in rs])),
                   "F_mean": float(np.mean([r["F_mean"] for r in rs])), "objects": len(rs)} for s, rs in seqs.items()}
    for v in per_seq.values():
        v["JF_mean"] = (v["J_mean"] + v["F_mean"]) / 2
    return {"global": g, "per_sequence": per_seq, "per_object": rows}


def read_labels(paths) -> np.ndarray:
    return np.stack([read_indexed_png(p)[0] for p in paths])


def score_folder(root, results_dir, sequences: list[str]) -> dict:
    """Score palette PNGs ``results_dir/<seq>/<frame>.png`` against the DAVIS annotations."""
    per_object = []
    for seq in sequences:
        frames, anns = sequence_files(root, seq)
        missing = [a for a in anns if not a.is_file()]
        if missing:
            raise InputNotFoundError(f"sequence {seq}: {len(missing)} annotation PNGs missing (e.g. {missing[0]}); "
                                     f"the score needs every frame annotated (DAVIS val is)")
        res = [Path(results_dir) / seq / a.name for a in anns]
        absent = [r for r in res if not r.is_file()]
        if absent:
            raise InputNotFoundError(f"no prediction {absent[0]} ({len(absent)} missing for {seq})")
        for o in score_sequence(read_labels(anns), read_labels(res)):
            per_object.append({"sequence": seq, **o})
    return summarize(per_object)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def _resolve_data(args, out: str) -> str:
    if args.data != "shapes":
        return args.data
    root = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(root, "JPEGImages")):
        write_davis(root, seed=args.data_seed, split=args.split, style=args.data_style)
    return root


def _write(out: str, summary: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "videoseg.csv"), "w", newline="") as f:
        rows = summary["per_object"]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["sequence"])
        writer.writeheader()
        writer.writerows(rows)
    from ..files import atomic_write_text

    atomic_write_text(os.path.join(out, "videoseg.json"), json.dumps(summary, indent=1))


def _print(summary: dict) -> None:
    g = summary["global"]
    print(f"  J&F-Mean {100 * g['JF_mean']:.2f}  J-Mean {100 * g['J_mean']:.2f}  J-Recall {100 * g['J_recall']:.2f}  "
          f"F-Mean {100 * g['F_mean']:.2f}  F-Recall {100 * g['F_recall']:.2f}  "
          f"({len(summary['per_object'])} objects, {len(summary['per_sequence'])} sequences)")


def evaluate(model, root, sequences, out: str, device="cpu", **kw) -> dict:
    """Propagate every sequence (PNGs under ``out/<seq>/``) and score it; returns the :func:`summarize` dict."""
    model.eval()
    for seq in sequences:
        frames, anns = sequence_files(root, seq)
        segment_sequence(model, frames, anns[0], os.path.join(out, seq), device=device, **kw)
    return score_folder(root, out, sequences)


def run(args) -> int:
    if args.action == "make-data":
        root = write_davis(args.root, args.sequences_count, args.frames, tuple(args.size), seed=args.seed,
                           split=args.split, style=args.style)
        print(f"wrote {args.sequences_count} procedural {args.style} sequences of {args.frames} frames to {root}")
        if args.image_folder:
            n = frames_to_image_folder(root, args.image_folder, split=args.split)
            print(f"copied the {n} frames to {args.image_folder}/{{train,val}}/frames")
        return 0
    if args.action == "score":
        root = _resolve_data(args, args.out or args.results)
        summary = score_folder(root, args.results, list_sequences(root, args.split, args.sequences))
        _print(summary)
        _write(args.out or args.results, summary)
        return 0
    if args.short_side is None:
        args.short_side = 0 if args.data == "shapes" else 480
    for name in ("n_last_frames", "size_mask_neighborhood", "short_side"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    if args.topk < 1 or args.temperature <= 0 or args.size_multiple < 1 or args.batch_size < 1:
        raise UserError("--topk, --size-multiple and --batch-size must be >= 1 and --temperature > 0")
    from ..evals.knn import resolve_device
    from ..engine.precision import describe

    root = _resolve_data(args, args.out)
    sequences = list_sequences(root, args.split, args.sequences)
    device = resolve_device(args.device)
    model = load_vit(args.model, args.checkpoint, args.seed).to(device).eval()
    summary = evaluate(model, root, sequences, args.out, device, short_side=args.short_side,
                       size_multiple=args.size_multiple, n_last_frames=args.n_last_frames,
                       radius=args.size_mask_neighborhood, topk=args.topk, temperature=args.temperature,
                       batch_size=args.batch_size, amp=args.amp)
    summary.update(precision=describe(args.amp, device), model=args.model, checkpoint=args.checkpoint, data=args.data,
                   settings={k: getattr(args, k) for k in ("short_side", "size_multiple", "n_last_frames",
                                                           "size_mask_neighborhood", "topk", "temperature")})
    print(f"video object segmentation by label propagation on {root} for {args.model or args.checkpoint}"
          + ("" if args.checkpoint else " (random init)") + f", {summary['precision']}")
    _print(summary)
    _write(args.out, summary)
    return 0
