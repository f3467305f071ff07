"""``visionzoo transfer``: linear transfer of frozen features, class separation R^2 and intra-class variability.

Follows the GCR paper's evaluation (Table 3, "Linear transfer using SVM"; spec gcr.md section 5). The public
copies of the paper do not show every detail, so parts of the protocol are RECONSTRUCTED (marked [reconstructed]):

* Features: the model's pooled pre-logits feature, ``forward_head(forward_features(x), pre_logits=True)``, eval
  mode, no grad, the model's own eval transform (resize by ``crop_pct``, center crop, its mean/std).
  [reconstructed] raw features by default; ``--features l2`` L2-normalises them first (the spec offers both).
* Classifier [reconstructed, after Kornblith et al. 2019]: standardise features, one-vs-rest ``LinearSVC``
  (``--classifier svm``, default) or multinomial ``LogisticRegression`` (``--classifier logreg``); C picked from
  a log grid by accuracy on a stratified held-out 20% of the training split, then refit on the whole training
  split; top-1 reported on the ``val`` split.
* Class separation R^2 (Kornblith et al. 2021, as defined in the spec): ``1 - d_within / d_total`` with cosine
  distance, d_within the mean over classes of the mean pairwise distance inside a class, d_total the mean over
  all class pairs of the mean pairwise distance between them. [reconstructed] computed on the val features of
  each dataset, by default after subtracting the mean feature (``--no-center`` turns that off): the paper's
  numbers imply d_total close to 1, which centred features give.
* Intra-class variability [reconstructed; the paper does not define it]: ``intra_class_var`` = mean over
  classes of the mean squared distance of the L2-normalised features to their class mean (= d_within), and
  ``variability_deg`` = arccos(1 - d_within) in degrees, the spec's best guess for the paper's "Variability"
  column.

Not done: the principal-angle heat maps between class subspaces (spec section 5 point 5).

Output: ``OUT/transfer.csv`` (one row per model and dataset) and ``OUT/transfer_<dataset>.png`` (bar plots).
"""
from __future__ import annotations

import argparse
import csv
import math
import os

CSV_COLUMNS = ["model", "checkpoint", "dataset", "num_classes", "num_train", "num_val", "feature_dim",
               "classifier", "best_C", "top1", "r2", "intra_class_var", "variability_deg"]
DEFAULT_C_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True, metavar="NAME",
                        help="one or more timm/visionzoo model names (features of each are evaluated)")
    parser.add_argument("--checkpoint", nargs="*", default=None, metavar="W",
                        help="weights for each --model, in the same order (.safetensors/.pth or HF folder); "
                             "default: random init")
    parser.add_argument("--datasets", nargs="+", required=True, metavar="ROOT",
                        help="ImageFolder roots holding train/ and val/ (or LMDBs), or 'digits' (embedded)")
    parser.add_argument("--out", required=True, metavar="DIR", help="writes DIR/transfer.csv and one PNG per dataset")
    parser.add_argument("--batch-size", "-b", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes (default: 0)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="eval input size (default: the model's pretrained cfg)")
    parser.add_argument("--classifier", choices=("svm", "logreg"), default="svm",
                        help="linear classifier on frozen features (default: svm = LinearSVC)")
    parser.add_argument("--c-grid", type=float, nargs="+", default=DEFAULT_C_GRID, metavar="C",
                        help="values of C tried on the held-out 20%% of train (default: 1e-4 ... 1e3)")
    parser.add_argument("--features", choices=("raw", "l2"), default="raw",
                        help="L2-normalise the features before the classifier (default: raw)")
    parser.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                        help="subtract the mean feature before the R^2 / variability metrics (default: on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")


# ----------------------------------------------------------------------------------------------------------------
# metrics (numpy; closed forms, no loop over samples)

def class_separation(features, labels, center: bool = True) -> dict:
    """R^2, intra-class variance and variability (degrees) of ``features`` (N, D) with integer ``labels`` (N,).

    For unit vectors u, the mean pairwise cosine distance inside a set is ``1 - ||mean(u)||^2``, and between
    sets j, k it is ``1 - mu_j . mu_k``; so both averages need only the class means.
    """
    import numpy as np

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if center:
        x = x - x.mean(0, keepdims=True)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    classes, inv = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"class separation needs at least 2 classes, got {len(classes)}")
    sums = np.zeros((len(classes), u.shape[1]))
    np.add.at(sums, inv, u)
    mu = sums / np.bincount(inv)[:, None]  # class means of the unit vectors
    d_within = float(np.mean(1.0 - (mu * mu).sum(1)))
    d_total = float(1.0 - np.square(mu.mean(0)).sum())
    return {
        "r2": 1.0 - d_within / max(d_total, 1e-12),
        "intra_class_var": d_within,
        "variability_deg": math.degrees(math.acos(min(max(1.0 - d_within, -1.0), 1.0))),
    }


def fit_linear_classifier(x_train, y_train, x_val, y_val, kind: str = "svm", c_grid=DEFAULT_C_GRID, seed: int = 0):
    """Pick C on a stratified 20% of train, refit on all of train, return (val top-1 in %, best C)."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    def make(c):
        clf = LinearSVC(C=c, max_iter=5000) if kind == "svm" else LogisticRegression(C=c, max_iter=2000)
        return make_pipeline(StandardScaler(), clf)

    _, counts = np.unique(y_train, return_counts=True)
    stratify = y_train if counts.min() >= 2 else None
    xa, xb, ya, yb = train_test_split(x_train, y_train, test_size=0.2, random_state=seed, stratify=stratify)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = [make(c).fit(xa, ya).score(xb, yb) for c in c_grid]
        best_c = float(c_grid[int(np.argmax(scores))])  # first best: the smallest C among ties
        top1 = 100.0 * make(best_c).fit(x_train, y_train).score(x_val, y_val)
    return top1, best_c


# ----------------------------------------------------------------------------------------------------------------

def _dataset_name(spec: str) -> str:
    return "digits" if spec == "digits" else os.path.basename(os.path.normpath(spec)) or spec


def _check_datasets(specs) -> None:
    """Fail before any model is built, naming the path."""
    from ..data.datasets import check_data_dir

    for spec in specs:
        if spec == "digits":
            continue
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"transfer dataset folder not found: {spec} "
                                    f"(pass a root holding train/ and val/, or 'digits')")
        for split in ("train", "val"):
            check_data_dir(spec, split)


def _extract(model, dataset, batch_size, workers, device):
    import numpy as np
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
                f = model.forward_head(model.forward_features(x), pre_logits=True)
            else:
                f = model(x)
            feats.append(f.flatten(1).float().cpu())
            labels.append(torch.as_tensor(y))
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def _plot(rows, dataset: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["model"] + (f"\n{os.path.basename(r['checkpoint'])}" if r["checkpoint"] else "") for r in rows]
    panels = [("top1", "transfer top-1 (%)"), ("r2", "class separation R$^2$"), ("variability_deg", "variability (deg)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (key, title) in zip(axes, panels):
        vals = [float(r[key]) for r in rows]
        bars = ax.bar(range(len(vals)), vals, color=[f"C{i % 10}" for i in range(len(vals))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"linear transfer: {dataset}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    checkpoints = args.checkpoint or []
    if checkpoints and len(checkpoints) != len(args.model):
        raise ValueError(f"--checkpoint needs one file per --model: got {len(checkpoints)} checkpoints for "
                         f"{len(args.model)} models")
    checkpoints = checkpoints or [None] * len(args.model)
    names = [_dataset_name(d) for d in args.datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"--datasets have repeated names {names}; give each root a distinct folder name")
    if any(c <= 0 for c in args.c_grid):
        raise ValueError(f"--c-grid values must be > 0, got {args.c_grid}")
    _check_datasets(args.datasets)

    import numpy as np
    import torch

    import visionzoo
    from ..data.datasets import build_dataset
    from ..data.transforms import build_eval_transform

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for model_name, ckpt in zip(args.model, checkpoints):
        model = visionzoo.create_model(model_name, checkpoint_path=ckpt, num_classes=0).to(device).eval()
        transform = build_eval_transform(model, img_size=args.img_size)
        img_size = args.img_size or int(model.pretrained_cfg.get("input_size", (3, 32, 32))[-1])
        for spec, name in zip(args.datasets, names):
            kind = "digits" if spec == "digits" else "auto"
            data = {s: build_dataset(kind, spec, s, transform, img_size=img_size) for s in ("train", "val")}
            (xt, yt), (xv, yv) = (_extract(model, data[s], args.batch_size, args.workers, device)
                                  for s in ("train", "val"))
            if args.features == "l2":
                xt = xt / np.maximum(np.linalg.norm(xt, axis=1, keepdims=True), 1e-12)
                xv = xv / np.maximum(np.linalg.norm(xv, axis=1, keepdims=True), 1e-12)
            top1, best_c = fit_linear_classifier(xt, yt, xv, yv, args.classifier, args.c_grid, args.seed)
            sep = class_separation(xv, yv, center=args.center)
            row = dict(model=model_name, checkpoint=ckpt or "", dataset=name, num_classes=len(np.unique(yt)),
                       num_train=len(yt), num_val=len(yv), feature_dim=xt.shape[1], classifier=args.classifier,
                       best_C=best_c, top1=round(top1, 4), r2=round(sep["r2"], 6),
                       intra_class_var=round(sep["intra_class_var"], 6),
                       variability_deg=round(sep["variability_deg"], 4))
            rows.append(row)
            print(f"{model_name} {name}: top-1 {top1:.2f}%  C={best_c:g}  R^2 {sep['r2']:.4f}  "
                  f"variability {sep['variability_deg']:.2f} deg", flush=True)

    csv_path = os.path.join(args.out, "transfer.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for name in names:
        _plot([r for r in rows if r["dataset"] == name], name, os.path.join(args.out, f"transfer_{name}.png"))
    print(f"wrote {csv_path} and {len(names)} plot(s) in {args.out}")
    return 0
