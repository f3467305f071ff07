"""Nested multi-crop, SRS masks and correspondence maps (spec section 2), and the data sets of a run."""
from __future__ import annotations

import logging
import math
import random
from typing import Sequence

import numpy as np
import torch

from ...errors import UserError
from .config import UDIConfig

_logger = logging.getLogger("visionzoo")


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
        raise UserError(f"SRS window {window} is larger than the token grid side {F_side}: lower the window size.")
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
                raise UserError(f"UDI {name}={size} must be a multiple of the patch size {patch_size}.")
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
            raise UserError(f"image of size {W}x{H} is too small for UDI crops")
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
# data sets for the loop

class _SSLDataset(torch.utils.data.Dataset):
    """Wraps a labelled data set: each item is the UDI views of one image. The views draw from the global RNGs,
    which the training loop seeds per item from (seed, epoch, index) (``engine.sampling.SeededDataset``), so runs
    and resumed runs see exactly the same crops whatever the number of workers."""

    def __init__(self, base, aug: UDIAugmentation):
        self.base, self.aug = base, aug

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, _ = self.base[i]
        return self.aug(img)

    @property
    def num_skipped(self) -> int:
        base = getattr(self.base, "dataset", self.base)  # through a Subset
        return int(getattr(base, "num_skipped", 0) or 0)


def eval_transform(cfg: UDIConfig):
    """The k-NN images: resize to global_size / crop_pct, centre crop, ImageNet normalisation."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(cfg.global_size / eval_crop_pct(cfg))), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(cfg.global_size), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def eval_crop_pct(cfg: UDIConfig) -> float:
    return 1.0 if cfg.dataset == "digits" else 0.875


def _build_data(cfg: UDIConfig, patch_size: int):
    """(pretraining set, k-NN train set, k-NN val set or None, number of classes) through ``data.build_dataset``:
    the embedded digits use the library's fixed train/val split (val images are never pretrained on), folders and
    LMDBs skip corrupt images."""
    from ...data.datasets import build_dataset, check_data_dir

    aug = UDIAugmentation.from_config(cfg, patch_size)
    eval_tf = eval_transform(cfg)
    if cfg.dataset != "digits" and not cfg.data_dir:
        raise UserError(f"dataset {cfg.dataset!r} needs data_dir (a folder with {cfg.train_split}/ and "
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

    return (_SSLDataset(subset(base, cfg.max_train_images, 0), aug),
            subset(knn_train, cfg.knn_max_train, 1), subset(knn_val, cfg.knn_max_val, 1), num_classes)
