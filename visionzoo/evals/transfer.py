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
* Angles between classes (spec section 5 point 5, the poster's "Angles between classes" heat maps), from the
  model's trained classifier (``--angles``, on by default; skipped for a model without a trained classifier):
  - GCR head: class i is the span of its k orthonormal basis vectors S_i; the k principal angles between classes
    i and j are ``arccos(sigma_m(S_i^T S_j))`` in degrees, ascending (one batched SVD over all pairs). The heat
    map shows the smallest one (``--angle-stat min``, default; ``mean`` / ``max`` also offered): the poster shows
    the smallest, 4th and largest for k = 8.
  - softmax (linear) classifier: class i is its weight vector w_i and the angle is ``arccos(cos(w_i, w_j))`` in
    [0, 180] degrees, as the poster's vector panels. It is not the [0, 90] principal angle between the lines
    the vectors span: a softmax logit w.x changes sign with w, a GCR k = 1 logit |w.x| does not, so GCR k = 1
    classes are lines (principal angle in [0, 90]) while softmax classes are directions.
  [reconstructed] the poster's colour range is 70-110 degrees; ours is 0-90 (subspaces) or 0-180 (vectors) so
  all models share one scale; the summary statistics (mean / min / max over class pairs, mean angle to the
  nearest other class) are ours.

Checkpoints: a weights file (ours or official) is loaded into the backbone built with ``num_classes=0``; its
classifier tensors are kept aside for the angles (so a checkpoint trained on any number of classes loads). A folder
written by ``visionzoo train`` (``RUN_DIR`` or ``RUN_DIR/last``, holding ``config.json``) is rebuilt with its own
model arguments (e.g. a GCR ``dim``) and preprocessing (e.g. 32x32 input).

Output: ``OUT/transfer.csv`` (one row per model and dataset), ``OUT/transfer_<dataset>.png`` (bar plots) and, per
model with a classifier, ``OUT/principal_angles_<tag>.png`` (heat map), ``.csv`` (the C x C matrix shown) and
``.npy`` (all angles, C x C x k), with one summary row per model in ``OUT/principal_angles.csv``. ``<tag>`` is the
model name, with ``-<position>`` appended when the same name is given twice.
"""
from __future__ import annotations

import csv
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputNotFoundError, UserError

CSV_COLUMNS = ["model", "checkpoint", "dataset", "num_classes", "num_train", "num_val", "feature_dim",
               "classifier", "best_C", "top1", "r2", "intra_class_var", "variability_deg"]
DEFAULT_C_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3]
ANGLE_STATS = ("min", "mean", "max")
ANGLE_COLUMNS = ["model", "checkpoint", "tag", "kind", "num_classes", "dim", "stat", "mean_deg", "min_deg", "max_deg",
                 "nearest_mean_deg"]


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
        raise UserError(f"class separation needs at least 2 classes, got {len(classes)}")
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
# angles between classes (torch, float64: arccos is ill-conditioned near 0 degrees, float32 would show ~0.03 deg
# between identical subspaces)

def principal_angles(a, b=None, max_elems: int = 1 << 24):
    """Principal angles in degrees between the column spans of ``a[i]`` and ``b[j]``: ``(Ka, Kb, min(ka, kb))``.

    ``a`` is ``(Ka, n, ka)`` (``b`` is ``(Kb, n, kb)``, default ``a``), one basis per class; the bases need not be
    orthonormal (they are orthonormalised by QR, which keeps their spans). Angles are ascending along the last axis:
    ``arccos`` of the singular values of ``Q_i^T Q_j``, clamped to [0, 1], from one batched SVD over all pairs (in
    chunks of rows so that ``Ka * Kb * ka * kb`` stays below ``max_elems``: 1000 classes of k = 32 would need 8 GB).
    """
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = a if b is None else torch.as_tensor(b).detach().to(torch.float64)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1] != b.shape[1]:
        raise UserError(f"principal_angles expects bases of shape (classes, n, k) with the same n, got "
                        f"{tuple(a.shape)} and {tuple(b.shape)}")
    qa = torch.linalg.qr(a).Q
    qb = qa if b is a else torch.linalg.qr(b).Q
    rows = max(1, max_elems // max(1, qb.shape[0] * qa.shape[-1] * qb.shape[-1]))
    sv = torch.cat([torch.linalg.svdvals(torch.einsum("inp,jnq->ijpq", qa[s:s + rows], qb))
                    for s in range(0, qa.shape[0], rows)])  # descending, so the angles come out ascending
    return torch.rad2deg(torch.arccos(sv.clamp(0.0, 1.0)))


def vector_angles(w):
    """Angles in degrees, in [0, 180], between the rows of ``w`` (K, n): the softmax classes' weight vectors."""
    u = F.normalize(torch.as_tensor(w).detach().to(torch.float64).flatten(1), dim=1)
    return torch.rad2deg(torch.arccos((u @ u.T).clamp(-1.0, 1.0)))


def class_angle_matrix(bases, kind: str = "subspace", stat: str = "min"):
    """``(matrix (K, K), angles (K, K, k))`` in degrees (numpy) for class ``bases`` (K, n, k).

    ``kind='subspace'``: principal angles, ``matrix`` is their ``stat`` (min / mean / max) per pair.
    ``kind='vector'`` (k = 1, softmax weights): the angle between the vectors, in [0, 180]. The diagonal is 0.
    """
    if stat not in ANGLE_STATS:
        raise UserError(f"unknown angle stat {stat!r}; choose one of {', '.join(ANGLE_STATS)}")
    if kind == "vector":
        full = vector_angles(bases[..., 0] if bases.ndim == 3 else bases)[..., None]
    elif kind == "subspace":
        full = principal_angles(bases)
    else:
        raise UserError(f"unknown class representation kind {kind!r}; use 'subspace' or 'vector'")
    mat = {"min": full[..., 0], "mean": full.mean(-1), "max": full[..., -1]}[stat].clone()
    mat.fill_diagonal_(0.0)  # a class against itself: exactly 0 (rounding would give ~1e-6 deg)
    return mat.numpy(), full.numpy()


def angle_summary(matrix) -> dict:
    """Mean / min / max of the angles over pairs of distinct classes, and the mean angle to the nearest class."""
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    k = m.shape[0]
    if k < 2:
        raise UserError(f"angle summary needs at least 2 classes, got {k}")
    off = m[~np.eye(k, dtype=bool)].reshape(k, k - 1)
    return {"mean_deg": float(off.mean()), "min_deg": float(off.min()), "max_deg": float(off.max()),
            "nearest_mean_deg": float(off.min(1).mean())}


def class_representation(model, classifier: dict | None = None):
    """``(bases (K, n, k), kind)`` of the model's trained classifier, or None when it has none.

    GCR models (a ``GrassmannHead``, or a ``GrassmannClassifier`` whose head weight was set aside in
    ``classifier``) give their k-dim subspaces (kind 'subspace'); a linear classifier gives its weight rows
    (kind 'vector', k = 1). ``classifier`` holds ``weight`` (and ``bias``) read from a weights file.
    """
    from ..models.grassmann import GrassmannClassifier, grassmann_heads

    heads = grassmann_heads(model)
    if heads:
        return heads[-1][1].subspaces().detach(), "subspace"
    w = (classifier or {}).get("weight")
    if w is None:
        clf = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(clf, (nn.Linear, nn.Conv2d)) and getattr(model, "num_classes", 1) > 0:
            w = clf.weight
    if w is None:
        return None
    w = w.detach().flatten(1)  # (K, n); a 1x1-conv classifier flattens to the same
    if isinstance(model, GrassmannClassifier):
        dim = int(model.dim)
        if w.shape[0] % dim:
            raise UserError(f"GCR head weight has {w.shape[0]} rows, not a multiple of the model's subspace dim "
                            f"{dim}; pass --model-kwargs dim=K_DIM (rows = classes x dim)")
        return w.view(-1, dim, w.shape[1]).transpose(1, 2), "subspace"
    return w[:, :, None], "vector"


def plot_angle_heatmap(matrix, path: str, title: str, label: str, vmax: float = 90.0) -> None:
    """C x C heat map of ``matrix`` (degrees) with a colour bar, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(matrix)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(label, fontsize=9)
    if k <= 30:
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.tick_params(labelsize=7)
    ax.set_xlabel("class j")
    ax.set_ylabel("class i")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_class_angles(model, classifier, out: str, tag: str, stat: str = "min", title: str | None = None):
    """Heat map + CSV + NPY of the angles between the classes of ``model``; returns the summary row or None."""
    import numpy as np

    rep = class_representation(model, classifier)
    if rep is None:
        return None
    bases, kind = rep
    matrix, full = class_angle_matrix(bases, kind, stat)
    stat_used = stat if kind == "subspace" else "vector"
    base = os.path.join(out, f"principal_angles_{tag}")
    np.save(base + ".npy", full.astype(np.float32))
    np.savetxt(base + ".csv", matrix, delimiter=",", fmt="%.4f")
    dim = int(bases.shape[-1])
    if kind == "subspace":
        label = f"{ {'min': 'smallest', 'mean': 'mean', 'max': 'largest'}[stat]} principal angle (deg)"
        what = f"{dim}-dim class subspaces"
    else:
        label, what = "angle between weight vectors (deg)", "class weight vectors (softmax)"
    vmax = 90.0 if kind == "subspace" else 180.0
    plot_angle_heatmap(matrix, base + ".png", title or f"{tag}: {what}", label, vmax=vmax)
    return dict(tag=tag, kind=kind, num_classes=len(matrix), dim=dim, stat=stat_used,
                **{k: round(v, 4) for k, v in angle_summary(matrix).items()})


# ----------------------------------------------------------------------------------------------------------------
# models

def _config_folder(path: str) -> str | None:
    """The folder holding ``config.json`` for a save_pretrained folder or a ``visionzoo train`` run directory."""
    for cand in (path, os.path.join(path, "last")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    return None


def load_frozen_model(name: str, checkpoint: str | None = None, model_kwargs: dict | None = None):
    """``(model, classifier)``: the model in eval mode for frozen features, and the classifier tensors of a weights
    file (``{'weight': ..., 'bias': ...}``, empty when none) set aside for :func:`class_representation`.

    A folder with ``config.json`` (``visionzoo train`` run directory or its ``last/`` / ``best/``) is rebuilt with
    its own arguments and preprocessing, classifier included; a weights file is loaded into the model built with
    ``num_classes=0``, so checkpoints trained on any number of classes load.
    """
    import json

    from ..models import create_model, load_pretrained
    from ..models._registry import family_filter_fn, load_weights

    kwargs = dict(model_kwargs or {})
    folder = _config_folder(checkpoint) if checkpoint and os.path.isdir(checkpoint) else None
    if folder is not None:
        with open(os.path.join(folder, "config.json")) as f:
            arch = json.load(f).get("architecture")
        if arch and arch != name:
            raise UserError(f"checkpoint {checkpoint} holds a '{arch}' model (its config.json), not '{name}': "
                            f"pass --model {arch}")
        return load_pretrained(folder, **kwargs).eval(), {}
    model = create_model(name, num_classes=0, **kwargs)
    classifier: dict = {}
    if checkpoint:
        names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or []
        names = [names] if isinstance(names, str) else list(names)
        family = family_filter_fn(model)

        def pop_classifier(sd):
            for suffix in ("weight", "bias"):
                for n in names:
                    if f"{n}.{suffix}" in sd:  # the first classifier is kept (distilled models have two)
                        classifier.setdefault(suffix, sd.pop(f"{n}.{suffix}"))

        def keep_classifier_aside(sd, m):
            pop_classifier(sd)  # our own keys: nothing else to convert
            own = m.state_dict()
            if family is not None and not all(k in own for k in sd):  # an official checkpoint
                sd = family(sd, m)
                pop_classifier(sd)
            return sd

        load_weights(model, checkpoint, filter_fn=keep_classifier_aside)
    return model.eval(), classifier


def _model_tags(names) -> list[str]:
    """File-name tags: the model name, plus ``-<position>`` (1-based) where a name is repeated."""
    return [n if names.count(n) == 1 else f"{n}-{i + 1}" for i, n in enumerate(names)]


def _parse_kwargs(items) -> dict:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--model-kwargs entry {item!r} must look like KEY=VALUE (e.g. dim=4)")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


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
            raise InputNotFoundError(f"transfer dataset folder not found: {spec} "
                                     f"(pass a root holding train/ and val/, or 'digits')")
        for split in ("train", "val"):
            check_data_dir(spec, split)


def _extract(model, dataset, batch_size, workers, device, amp="fp32"):
    """Pooled pre-logits features as numpy arrays (``evals.features.extract`` with ``token='pooled'``)."""
    import numpy as np

    from .features import extract

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = extract(model, loader, device, token="pooled", amp=amp)
    return feats.numpy(), labels.numpy().astype(np.int64)


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
        raise UserError(f"--checkpoint needs one file per --model: got {len(checkpoints)} checkpoints for "
                        f"{len(args.model)} models")
    checkpoints = checkpoints or [None] * len(args.model)
    names = [_dataset_name(d) for d in args.datasets]
    if len(set(names)) != len(names):
        raise UserError(f"--datasets have repeated names {names}; give each root a distinct folder name")
    if any(c <= 0 for c in args.c_grid):
        raise UserError(f"--c-grid values must be > 0, got {args.c_grid}")
    model_kwargs = _parse_kwargs(getattr(args, "model_kwargs", None))
    _check_datasets(args.datasets)

    import numpy as np

    from ..data.datasets import build_dataset
    from ..data.transforms import build_eval_transform
    from ..engine.precision import describe

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    os.makedirs(args.out, exist_ok=True)
    amp = getattr(args, "amp", "fp32")
    print(f"transfer: {len(args.model)} model(s) x {len(names)} dataset(s) on {device}, {describe(amp, device)}")
    rows, angle_rows = [], []
    for model_name, ckpt, tag in zip(args.model, checkpoints, _model_tags(list(args.model))):
        model, classifier = load_frozen_model(model_name, ckpt, model_kwargs)
        model.to(device)
        if getattr(args, "angles", True):
            summary = write_class_angles(model, classifier, args.out, tag, getattr(args, "angle_stat", "min"))
            if summary is None:
                print(f"{tag}: no trained classifier (give a checkpoint that has one): no class angles")
            else:
                angle_rows.append(dict(model=model_name, checkpoint=ckpt or "", **summary))
                what = (f"{summary['dim']}-dim subspaces, {summary['stat']} principal angle"
                        if summary["kind"] == "subspace" else "weight vectors")
                print(f"{tag}: angles between {summary['num_classes']} classes ({what}): "
                      f"mean {summary['mean_deg']:.1f}, min {summary['min_deg']:.1f}, "
                      f"nearest {summary['nearest_mean_deg']:.1f} deg", flush=True)
        transform = build_eval_transform(model, img_size=args.img_size)
        img_size = args.img_size or int(model.pretrained_cfg.get("input_size", (3, 32, 32))[-1])
        for spec, name in zip(args.datasets, names):
            kind = "digits" if spec == "digits" else "auto"
            data = {s: build_dataset(kind, spec, s, transform, img_size=img_size) for s in ("train", "val")}
            (xt, yt), (xv, yv) = (_extract(model, data[s], args.batch_size, args.workers, device, amp)
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
    _write_csv(csv_path, CSV_COLUMNS, rows)
    for name in names:
        _plot([r for r in rows if r["dataset"] == name], name, os.path.join(args.out, f"transfer_{name}.png"))
    if angle_rows:
        _write_csv(os.path.join(args.out, "principal_angles.csv"), ANGLE_COLUMNS, angle_rows)
    print(f"wrote {csv_path}, {len(names)} plot(s) and {len(angle_rows)} angle heat map(s) in {args.out}")
    return 0


def _write_csv(path: str, columns, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
