"""Softmax vs GCR heads (k = 1, 4, 8) on the embedded digits: accuracy, R^2, variability, transfer, class angles.

    python -m visionzoo.studies.gcr_digits --out runs/gcr_digits            # the table in docs/models/gcr.md
    python -m visionzoo.studies.gcr_digits --out /tmp/s --epochs 2 --seeds 0 --heads softmax gcr4   # smoke run

A small CPU version of the GCR paper's Table 3 (spec gcr.md section 5), on data that ships with the library:

1. Data: the 1797 scikit-learn digits at 32x32 with the library's fixed split (1437 train / 360 val). Digits 0-4
   are the training ("source") classes, digits 5-9 the held-out ("target") classes of the transfer. Both halves
   are written as ImageFolders (``OUT/data/digits_0-4``, ``OUT/data/digits_5-9``), the form ``visionzoo transfer``
   reads.
2. Training: one backbone for every head, timm ``resnet18d`` cut to one block per stage, channels 8-16-32-64 (a
   64-d pooled feature, ~0.1 M params), trained from scratch on digits 0-4 with either a softmax head (linear
   layer with bias) or a GCR head with k-dim class subspaces (gamma 25). Hyper-parameters are those of the
   ``gcr/gcr_digits_cpu`` recipe (the official coslr ResNet settings): SGD momentum 0.9 (not Nesterov, as
   mmpretrain's SGD), lr 0.1, weight decay 1e-4 on every Euclidean parameter, cosine to 0 per step, no warmup,
   batch 64, cross-entropy; GCR subspaces by the Riemannian SGD (geometry lr factor 1, no weight decay). Augmentation:
   a random affine per image (scale 0.85-1.15, rotation +-10 degrees, shift +-10%), done batched on tensors.
   Each run is a task of the engine's one loop (a run folder per head and seed, exact resume) on in-memory
   tensors with the affine batched per step (no PIL decode per sample). Weights are in the run folder's last/ and
   best/ (config.json + model.safetensors with the 32x32 preprocessing), the layout ``visionzoo train`` writes.
3. Evaluation: val top-1 of the trained head on the source classes, then ``visionzoo transfer`` (the CLI itself)
   on the saved models with both ImageFolders: a linear SVM on frozen features (C on a held-out 20% of train),
   class separation R^2 and variability on the val features (mean-centred), and the class-angle heat maps.
4. Output in ``--out``: ``results.csv`` (one row per run), ``results.md`` (mean +- std over seeds per head, and the
   differences to softmax on the same seed, with the command, date and machine), ``angles.png`` (the class-angle
   heat maps of the first seed of every head), ``transfer/`` (the CLI's CSVs, bar plots, heat maps), ``models/``
   and ``data/``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from ..engine.task import Task
from ..errors import UserError
from ..tasks.classify import build_optimizer, timm_schedule

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
HEADS = ("softmax", "gcr1", "gcr4", "gcr8")
BACKBONE = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)
IMG_SIZE = 32
RESULT_COLUMNS = ["head", "k", "seed", "epochs", "train_time_s", "val_top1", "source_probe_top1", "source_r2",
                  "source_variability_deg", "transfer_top1", "target_r2", "target_variability_deg",
                  "angle_mean_deg", "angle_nearest_deg", "angle_min_deg"]
# columns of the markdown table: (column, header, decimals)
TABLE = [("val_top1", "val top-1 (0-4, head)", 2), ("source_r2", "R^2 (0-4)", 3),
         ("source_variability_deg", "variability (0-4, deg)", 1), ("transfer_top1", "transfer top-1 (5-9, SVM)", 2),
         ("target_r2", "R^2 (5-9)", 3), ("target_variability_deg", "variability (5-9, deg)", 1),
         ("angle_mean_deg", "class angle, mean (deg)", 1), ("angle_nearest_deg", "to nearest class (deg)", 1)]


def head_dim(head: str) -> int:
    """0 for softmax, k for 'gcr<k>'."""
    if head == "softmax":
        return 0
    if head.startswith("gcr") and head[3:].isdigit() and int(head[3:]) >= 1:
        return int(head[3:])
    raise UserError(f"unknown head {head!r}: use softmax or gcr<k> (e.g. gcr4)")


# ----------------------------------------------------------------------------------------------------------------
# data

def digits_subset(split: str, classes, img_size: int = IMG_SIZE):
    """(images uint8 (N, S, S), labels int64 (N,) renumbered 0..len(classes)-1) of the digits in ``classes``."""
    import numpy as np

    from ..data.datasets import DigitsDataset

    ds = DigitsDataset(split, img_size)
    y = np.asarray(ds.targets)
    keep = np.isin(y, classes)
    remap = {c: i for i, c in enumerate(classes)}
    return ds._images[keep], np.array([remap[int(t)] for t in y[keep]], dtype=np.int64)


def take_per_class(x, y, n: int | None, seed: int = 0):
    """The first ``n`` images of each class after a fixed shuffle (the same subset for every head and run seed)."""
    import numpy as np

    if n is None:
        return x, y
    order = np.random.RandomState(seed).permutation(len(y))
    idx = order[np.argsort(y[order], kind="stable")]  # grouped by class, shuffled inside each class
    cls = y[idx]
    rank = np.arange(len(idx)) - np.searchsorted(cls, cls)  # position inside its class
    keep = np.sort(idx[rank < n])
    return x[keep], y[keep]


def write_digits_classes(root: str, classes, img_size: int = IMG_SIZE) -> str:
    """Write the digits of ``classes`` as ``root/{train,val}/<digit>/<index>.png`` (ImageFolder); return ``root``."""
    from PIL import Image

    from ..data.datasets import DigitsDataset

    for split in ("train", "val"):
        ds = DigitsDataset(split, img_size)
        for pos, (src, t) in enumerate(zip(ds.indices, ds.targets)):
            if t in classes:
                folder = os.path.join(root, split, str(t))
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(ds._images[pos]).convert("RGB").save(os.path.join(folder, f"{src:04d}.png"))
    return root


def random_affine(x, generator, scale=(0.85, 1.15), degrees: float = 10.0, shift: float = 0.1):
    """A random scale / rotation / shift per image of ``x`` (B, C, H, W) in [0, 1], batched; black outside."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=generator, dtype=x.dtype)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    a = torch.deg2rad((2 * u[:, 1] - 1) * degrees)
    t = (2 * u[:, 2:] - 1) * shift * 2  # affine_grid coordinates span [-1, 1]: a shift of 10% is 0.2
    theta = torch.stack([torch.stack([torch.cos(a) / s, -torch.sin(a) / s, t[:, 0]], 1),
                         torch.stack([torch.sin(a) / s, torch.cos(a) / s, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------
# one run

def build_model(head: str, num_classes: int):
    from ..models import create_model

    k = head_dim(head)
    if k == 0:
        return create_model("resnet18d", num_classes=num_classes, **BACKBONE)
    return create_model("gcr_test", num_classes=num_classes, dim=k, backbone_kwargs=dict(BACKBONE))


def train_run(head: str, seed: int, epochs: int, data: dict, save_dir: str) -> dict:
    """Train ``head`` on ``data['train']`` (uint8 images, labels) through the engine's loop into the run folder
    ``save_dir``; return val top-1 on ``data['val']``, the time and the architecture."""
    from ..engine.config import load_config, split_run_path
    from ..engine.loop import fit

    k = head_dim(head)
    # the recipe's numbers; softmax uses the same SGD as the GCR optimizer's Euclidean part (timm 'momentum' is
    # SGD without Nesterov; timm 'sgd' would add Nesterov)
    cfg = load_config("gcr/gcr_digits_cpu", {
        "epochs": epochs, "seed": seed, "model": "gcr_test" if k else "resnet18d", "eval_every": epochs,
        "log_interval": 10 ** 6, **split_run_path(save_dir),
        **({} if k else {"opt": "momentum", "opt_kwargs": {"filter_bias_and_bn": False}})})
    cfg.check()
    t0 = time.time()
    summary = fit(DigitsStudyTask(cfg, head, data), device="cpu")
    return {"val_top1": summary["val_top1"], "train_time_s": time.time() - t0,
            "model": "gcr_test" if k else "resnet18d"}


class DigitsStudyTask(Task):
    """In-memory digits, a batched random affine per step (no PIL decode per sample), GCR or softmax head."""

    name = "gcr_digits"
    best_metric = "val_top1"

    def __init__(self, cfg, head: str, data: dict):
        super().__init__(cfg)
        self.head, (xt, yt), (xv, yv) = head, data["train"], data["val"]
        self.train_set = torch.utils.data.TensorDataset(_to_input(xt), torch.as_tensor(yt))
        self.x_val, self.y_val = _to_input(xv), torch.as_tensor(yv)
        self.num_classes = int(yt.max()) + 1

    def build_model(self, ctx):
        model = build_model(self.head, self.num_classes)
        self.mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
        return model

    def train_dataset(self, ctx):
        return self.train_set

    def build_optimizer(self, model, lr):
        return build_optimizer(self.cfg, model, lr)

    def build_schedule(self, optimizer, ctx, lr):
        c = self.cfg
        return timm_schedule(optimizer, c.sched, c.epochs, ctx.steps_per_epoch, c.warmup_epochs, c.warmup_lr,
                             c.warmup_prefix, c.min_lr)

    def train_step(self, net, batch, ctx):
        x, y = batch
        x = (random_affine(x, None) - self.mean.to(x.device)) / self.std.to(x.device)  # global RNG, seeded per step
        return {"loss": F.cross_entropy(net(x), y)}

    def evaluate(self, model, ctx):
        model.eval()
        with torch.no_grad():
            pred = model((self.x_val - self.mean) / self.std).argmax(1)
        return {"val_top1": 100.0 * float((pred == self.y_val).float().mean())}

    def export(self, model, folder, metadata):
        from ..models import save_pretrained

        data_cfg = {"input_size": (3, IMG_SIZE, IMG_SIZE), "crop_pct": 1.0, "interpolation": "bicubic",
                    "mean": tuple(model.pretrained_cfg["mean"]), "std": tuple(model.pretrained_cfg["std"])}
        save_pretrained(model, folder, data_config=data_cfg, metadata={**metadata, "head": self.head})


def _to_input(u8):
    return torch.as_tensor(u8).float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# table

def summarize(rows: list[dict], heads) -> list[dict]:
    """Per head: mean and (sample) std over seeds of every numeric column; std is 0 for a single seed."""
    out = []
    for head in heads:
        mine = [r for r in rows if r["head"] == head]
        if not mine:
            continue
        agg = {"head": head, "k": mine[0]["k"], "n": len(mine)}
        for col, _, _ in TABLE:
            vals = [float(r[col]) for r in mine]
            m = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            agg[col], agg[col + "_std"] = m, sd
        out.append(agg)
    return out


def markdown_table(summary: list[dict]) -> str:
    lines = ["| head | k | seeds | " + " | ".join(h for _, h, _ in TABLE) + " |",
             "|---|---|---|" + "---|" * len(TABLE)]
    for s in summary:
        cells = []
        for col, _, d in TABLE:
            cells.append(f"{s[col]:.{d}f} ± {s[col + '_std']:.{d}f}" if s["n"] > 1 else f"{s[col]:.{d}f}")
        lines.append(f"| {s['head']} | {s['k'] or '-'} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED = [("val_top1", "val top-1", 2), ("source_r2", "R^2 (0-4)", 3),
          ("source_variability_deg", "variability (0-4)", 1), ("transfer_top1", "transfer top-1 (5-9)", 2),
          ("target_r2", "R^2 (5-9)", 3)]


def paired_differences(rows: list[dict], heads, baseline: str = "softmax") -> list[dict]:
    """Per head: mean and std over seeds of (head - baseline) on the same seed, for the PAIRED columns."""
    base = {int(r["seed"]): r for r in rows if r["head"] == baseline}
    out = []
    for head in heads:
        mine = [r for r in rows if r["head"] == head and int(r["seed"]) in base]
        if head == baseline or not mine:
            continue
        agg = {"head": head, "n": len(mine)}
        for col, _, _ in PAIRED:
            d = [float(r[col]) - float(base[int(r["seed"])][col]) for r in mine]
            m = sum(d) / len(d)
            agg[col] = m
            agg[col + "_std"] = math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1)) if len(d) > 1 else 0.0
        out.append(agg)
    return out


def paired_table(diffs: list[dict], baseline: str = "softmax") -> str:
    lines = [f"| head - {baseline} (same seed) | seeds | " + " | ".join(h for _, h, _ in PAIRED) + " |",
             "|---|---|" + "---|" * len(PAIRED)]
    for s in diffs:
        cells = [f"{s[c]:+.{d}f} ± {s[c + '_std']:.{d}f}" for c, _, d in PAIRED]
        lines.append(f"| {s['head']} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_angle_panels(matrices, titles, kinds, path: str) -> None:
    """One heat map per head side by side (degrees; 0-90 for subspaces, 0-180 for softmax vectors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False)
    for ax, m, title, kind in zip(axes[0], matrices, titles, kinds):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=180 if kind == "vector" else 90, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(m)), [str(c) for c in SOURCE_CLASSES], fontsize=7)
        ax.set_yticks(range(len(m)), [str(c) for c in SOURCE_CLASSES], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m visionzoo.studies.gcr_digits", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--out", required=True, help="output folder (data, models, transfer/, results.csv, results.md)")
    p.add_argument("--heads", nargs="+", default=list(HEADS), help="softmax and/or gcr<k> (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="one run per head and seed (default: 0 1)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per run (default: 30)")
    p.add_argument("--train-per-class", type=int, default=None, metavar="N",
                   help="train the heads on N images per source class only (a fixed subset; default: all, ~144)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; the machine is shared)")
    p.add_argument("--classifier", choices=("svm", "logreg"), default="svm", help="transfer classifier (default svm)")
    args = p.parse_args(argv)
    for h in args.heads:
        head_dim(h)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..evals import transfer

    t_start = time.time()
    out = os.path.abspath(args.out)
    src_root, tgt_root = os.path.join(out, "data", "digits_0-4"), os.path.join(out, "data", "digits_5-9")
    for root, classes in ((src_root, SOURCE_CLASSES), (tgt_root, TARGET_CLASSES)):
        if os.path.isdir(root):
            shutil.rmtree(root)
        write_digits_classes(root, classes)
    data = {s: digits_subset(s, SOURCE_CLASSES) for s in ("train", "val")}
    data["train"] = take_per_class(*data["train"], args.train_per_class)

    runs = []
    for head in args.heads:
        for seed in args.seeds:
            save_dir = os.path.join(out, "models", f"{head}-s{seed}")
            res = train_run(head, seed, args.epochs, data, save_dir)
            runs.append(dict(head=head, k=head_dim(head), seed=seed, epochs=args.epochs, save_dir=save_dir, **res))
            print(f"{head} seed {seed}: val top-1 {res['val_top1']:.2f}% ({res['train_time_s']:.0f} s)", flush=True)

    tdir = os.path.join(out, "transfer")
    transfer_parser = argparse.ArgumentParser(allow_abbrev=False)
    transfer.add_arguments(transfer_parser)
    rc = transfer.run(transfer_parser.parse_args([
        "--model", *[r["model"] for r in runs], "--checkpoint", *[r["save_dir"] for r in runs], "--datasets",
        src_root, tgt_root, "--out", tdir, "--device", "cpu", "--classifier", args.classifier]))
    if rc:
        raise RuntimeError(f"visionzoo transfer failed (exit code {rc})")
    with open(os.path.join(tdir, "transfer.csv")) as f:
        trans = list(csv.DictReader(f))
    with open(os.path.join(tdir, "principal_angles.csv")) as f:
        angles = list(csv.DictReader(f))

    rows = []
    for i, r in enumerate(runs):  # transfer.csv: one row per (model, dataset) in run order; angles: one per model
        src, tgt = (next(t for t in trans if t["checkpoint"] == r["save_dir"] and t["dataset"] == d)
                    for d in ("digits_0-4", "digits_5-9"))
        ang = next(a for a in angles if a["checkpoint"] == r["save_dir"])
        rows.append(dict(head=r["head"], k=r["k"], seed=r["seed"], epochs=r["epochs"],
                         train_time_s=round(r["train_time_s"], 1), val_top1=round(r["val_top1"], 3),
                         source_probe_top1=src["top1"], source_r2=src["r2"],
                         source_variability_deg=src["variability_deg"], transfer_top1=tgt["top1"],
                         target_r2=tgt["r2"], target_variability_deg=tgt["variability_deg"],
                         angle_mean_deg=ang["mean_deg"], angle_nearest_deg=ang["nearest_mean_deg"],
                         angle_min_deg=ang["min_deg"]))
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)

    # heat maps of the first seed of every head in one figure (the CLI names them by model tag)
    from ..evals.transfer import _model_tags

    tags = _model_tags([r["model"] for r in runs])
    first = [i for i, r in enumerate(runs) if r["seed"] == args.seeds[0]]
    import numpy as np

    plot_angle_panels(
        [np.loadtxt(os.path.join(tdir, f"principal_angles_{tags[i]}.csv"), delimiter=",") for i in first],
        [f"{runs[i]['head']} (seed {runs[i]['seed']}): " + ("vector angle" if runs[i]["k"] == 0 else
                                                             "smallest principal angle") for i in first],
        ["vector" if runs[i]["k"] == 0 else "subspace" for i in first], os.path.join(out, "angles.png"))

    summary = summarize(rows, args.heads)
    cmd = "python -m visionzoo.studies.gcr_digits " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"Command: `{cmd}`  \nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
              f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores, torch "
              f"{torch.__version__}, {args.threads} thread(s)); total {time.time() - t_start:.0f} s; heads trained on "
              f"{len(data['train'][1])} images of digits 0-4.  \n"
              f"Angles: smallest principal angle between class subspaces (GCR), angle between weight vectors "
              f"(softmax); mean over class pairs and mean over classes of the angle to the nearest class.")
    table = markdown_table(summary)
    if "softmax" in args.heads and len(args.heads) > 1:
        table += "\n\n" + paired_table(paired_differences(rows, args.heads))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    print("\n" + header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
