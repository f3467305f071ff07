"""``visionzoo semisup``: semi-supervised evaluation by logistic regression on 1 % / 10 % of the labels (UDI / DINO /
MSN protocol, spec udi.md section 7), any model.

Frozen features of a labelled subset of the train split (the model's eval transform, the last block's token 0 after
the final norm by default, ``--token`` as in ``visionzoo knn``), L2-normalised, feed a multinomial logistic
regression with an L2 penalty and no intercept, fitted for each lambda of ``--lambdas`` (default 0.01 0.1 1, each
divided by the number of training samples as the official script does); top-1 / top-5 on the whole val split are
reported per lambda, and the best.

The official code fits with cyanure (``MultiClassifier(loss='multiclass-logistic', penalty='l2',
fit_intercept=False)``, solver catalyst-miso, tol 1e-3), which is not installable here. cyanure minimises
``(1/n) sum_i CE(W x_i, y_i) + (lambda'/2) ||W||^2`` with ``lambda' = lambda / n``. We minimise exactly that
objective with full-batch L-BFGS in torch (strong-Wolfe line search, float64 by default): it is strictly convex, so
every correct solver reaches the same optimum; torch runs on the features' device (GPU for ImageNet's 10 % split)
without another dependency. scikit-learn's ``LogisticRegression(C=..., fit_intercept=False)`` minimises ``C sum_i CE + 1/2 ||W||^2``,
the same objective times ``C n`` when ``C = 1 / (n lambda') = 1 / lambda``; the tests check our optimum against it.

The subset (``--percent``): ``balanced`` takes round(percent % of each class) images per class (at least one), as
SimCLR describes its class-balanced ImageNet splits (about 12.8 / 128 images per class); ``random`` takes round(percent % of the split) uniformly. Both
are deterministic from ``--seed``. ``--subset-file`` takes a list of file names instead (one per line, e.g.
SimCLRv2's ``1percent.txt`` / ``10percent.txt``: ``n01440764_10026.JPEG``), matched by base name against the train
split (ImageFolder file names, LMDB record names, or for the embedded digits the ``<index>.png`` names of
``write_digits_folder``). The fine-tuning variant of the protocol (``visionzoo finetune --label-percent`` /
``--label-subset-file``: the classify task on the one loop) draws its labelled subset with the same rule
(:func:`labelled_subset`).

"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..engine.config import LABEL_SAMPLINGS as SAMPLINGS
from ..errors import InputNotFoundError, UserError
from .knn import eval_datasets, frozen_model, loader, write_results

# ----------------------------------------------------------------------------------------------------------------
# subset

def subset_indices(labels, percent: float, sampling: str = "balanced", seed: int = 0):
    """Sorted indices (LongTensor) of a labelled subset of ``labels`` (see the module docstring).

    Vectorised: one random key per sample, a stable sort by class, and the rank inside the class decides.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    if not 0 < percent <= 100:
        raise UserError(f"--percent must be in (0, 100], got {percent}")
    if sampling not in SAMPLINGS:
        raise UserError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    if n == 0:
        raise UserError("the train split is empty: nothing to sample a subset from")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    if sampling == "random":
        k = max(1, int(round(n * percent / 100.0)))
        return perm[:k].sort().values
    order = perm[labels[perm].argsort(stable=True)]  # grouped by class, random inside a class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[labels[order]]
    keep = (counts.double() * percent / 100.0).round().clamp(min=1).long()
    return order[rank < keep[labels[order]]].sort().values


def sample_names(dataset) -> list[str]:
    """Base file name of every sample of a train split (for matching a subset file)."""
    if hasattr(dataset, "samples"):  # ImageFolder
        return [os.path.basename(p) for p, _ in dataset.samples]
    if hasattr(dataset, "indices") and type(dataset).__name__ == "DigitsDataset":
        return [f"{int(i):04d}.png" for i in dataset.indices]  # write_digits_folder's names
    if hasattr(dataset, "_txn_get"):  # LMDB: names are stored with each record
        return [os.path.basename(dataset._txn_get(i)[0]) for i in range(len(dataset))]
    raise UserError(f"--subset-file cannot name the samples of {type(dataset).__name__}; use --percent")


def subset_from_file(path: str, dataset):
    """Sorted indices of the samples whose base names are listed in ``path``; every listed name must exist."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"subset file not found: {path} (one file name per line, e.g. SimCLRv2's "
                                 f"1percent.txt)")
    with open(path) as f:
        wanted = [os.path.basename(line.strip()) for line in f if line.strip()]
    if not wanted:
        raise UserError(f"subset file {path} lists no file names")
    index = {name: i for i, name in enumerate(sample_names(dataset))}
    missing = [w for w in wanted if w not in index]
    if missing:
        raise UserError(f"{len(missing)} of {len(wanted)} names in {path} are not in the train split "
                        f"(e.g. {', '.join(missing[:3])}); is it the subset file of this data set?")
    return torch.tensor(sorted({index[w] for w in wanted}), dtype=torch.long)


def labelled_subset(dataset, percent: float | None, sampling: str = "balanced", seed: int = 0,
                    subset_file: str | None = None):
    """``(subset, description)``: the labelled part of a train split, by ``subset_file`` (wins) or ``percent``.

    The one subset rule of the semi-supervised protocols: the logistic regression below and the fine-tuning
    (the classify task with ``label_percent`` / ``label_subset_file``) draw the same images for the same seed.
    """
    if subset_file:
        idx, how = subset_from_file(subset_file, dataset), f"subset file {subset_file}"
    else:
        idx, how = subset_indices(dataset.targets, percent, sampling, seed), f"{percent:g}% {sampling} (seed {seed})"
    return LabelledSubset(dataset, idx.tolist()), how


class LabelledSubset(torch.utils.data.Subset):
    """A Subset that keeps what the tasks read from a dataset: classes, targets and the skipped-image count."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.classes = getattr(dataset, "classes", None)
        self.targets = [dataset.targets[i] for i in self.indices]

    @property
    def num_skipped(self) -> int:
        return int(getattr(self.dataset, "num_skipped", 0))


# ----------------------------------------------------------------------------------------------------------------
# logistic regression

def logreg_objective(weight, feats, labels, lam: float):
    """cyanure's multiclass-logistic + L2 objective: mean CE(x W^T, y) + lam / 2 ||W||^2 (no intercept)."""
    return F.cross_entropy(feats @ weight.T, labels) + 0.5 * lam * weight.square().sum()


def fit_logreg(feats, labels, lam: float, num_classes: int | None = None, max_iter: int = 500, tol: float = 1e-6,
               dtype=None):
    """Weights (num_classes, D) minimising :func:`logreg_objective` (``lam`` already divided by n), by full-batch
    L-BFGS from zero; returns ``(weight, info)`` with the final objective, gradient max-norm and iterations."""
    feats = feats.to(dtype or torch.float64)
    labels = labels.to(feats.device).long()
    if lam <= 0:
        raise UserError(f"lambda must be > 0 (the problem has no bounded optimum otherwise), got {lam}")
    num_classes = num_classes or int(labels.max()) + 1
    weight = torch.zeros(num_classes, feats.shape[1], device=feats.device, dtype=feats.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = logreg_objective(weight, feats, labels, lam)
        loss.backward()
        return loss

    opt.step(closure)  # one call runs up to max_iter iterations
    loss = closure()
    info = {"objective": float(loss.detach()), "grad_max": float(weight.grad.abs().max()),
            "iterations": int(opt.state[weight].get("n_iter", 0))}
    return weight.detach().float(), info


def _topk_correct(logits, labels) -> tuple[float, float]:
    k = min(5, logits.shape[1])
    pred = logits.topk(k, dim=1).indices
    n = max(labels.numel(), 1)
    return (100.0 * float((pred[:, 0] == labels).sum()) / n, 100.0 * float((pred == labels[:, None]).any(1).sum()) / n)


def evaluate_lambdas(train_feats, train_labels, val_feats, val_labels, lambdas, num_classes: int | None = None,
                     max_iter: int = 500, tol: float = 1e-6, dtype=None) -> list[dict]:
    """One row per lambda: {"lambda", "lambda_eff" (= lambda / n), "C" (sklearn), "top1", "top5", solver info}.
    Features are L2-normalised here (the protocol's input)."""
    train_feats, val_feats = F.normalize(train_feats.float(), dim=1), F.normalize(val_feats.float(), dim=1)
    val_feats, val_labels = val_feats.to(train_feats.device), val_labels.to(train_feats.device).long()
    n = train_feats.shape[0]
    num_classes = num_classes or int(max(int(train_labels.max()), int(val_labels.max()))) + 1
    rows = []
    for lam in lambdas:  # three fits: the protocol's grid, not a loop over data
        weight, info = fit_logreg(train_feats, train_labels, lam / n, num_classes, max_iter, tol, dtype)
        top1, top5 = _topk_correct(val_feats @ weight.T, val_labels)
        if not math.isfinite(info["objective"]):
            raise FloatingPointError(f"logistic regression diverged for lambda {lam}")
        rows.append({"lambda": lam, "lambda_eff": lam / n, "C": 1.0 / lam, "top1": round(top1, 4),
                     "top5": round(top5, 4), **info})
    return rows


# ----------------------------------------------------------------------------------------------------------------

def semisup_eval(model, args, device) -> dict:
    from ..engine.precision import describe
    from .features import extract, resolve_token

    token = resolve_token(model, args.token)
    n_blocks = args.n_last_blocks
    if n_blocks > 1 and hasattr(model, "blocks"):
        n_blocks = min(n_blocks, len(model.blocks))
    data = eval_datasets(args, model)
    train_set, val_set = data[args.train_split], data[args.val_split]
    subset, how = labelled_subset(train_set, args.percent, args.sampling, args.seed, args.subset_file)
    amp = getattr(args, "amp", "fp32")
    feat_kw = dict(token=token, n_last_blocks=n_blocks, amp=amp)
    ftr, ytr = extract(model, loader(subset, args), device, **feat_kw)
    fva, yva = extract(model, loader(val_set, args), device, **feat_kw)
    num_classes = len(getattr(train_set, "classes", None) or []) or None
    rows = evaluate_lambdas(ftr.to(device), ytr, fva, yva, args.lambdas, num_classes, args.max_iter, args.tol,
                            getattr(torch, args.fit_dtype))
    best = max(rows, key=lambda r: r["top1"])
    return {"token": token, "n_last_blocks": n_blocks, "subset": how, "num_train": len(ytr),
            "num_train_split": len(train_set), "num_val": len(yva), "feature_dim": int(ftr.shape[1]),
            "classes_in_subset": int(torch.unique(ytr).numel()), "results": rows, "best": best,
            "precision": describe(amp, device)}


def run(args) -> int:
    if min(args.lambdas) <= 0:
        raise UserError(f"--lambdas must be > 0, got {args.lambdas}")
    if args.n_last_blocks < 1 or args.max_iter < 1:
        raise UserError("--n-last-blocks and --max-iter must be >= 1")
    if args.subset_file is None and not 0 < args.percent <= 100:
        raise UserError(f"--percent must be in (0, 100], got {args.percent}")
    model, device, name = frozen_model(args)
    res = semisup_eval(model, args, device)
    print(f"semi-supervised logistic regression on {args.data} for {name}"
          + (f" from {args.checkpoint}" if args.checkpoint else " (random init)")
          + f": {res['subset']}, {res['num_train']} of {res['num_train_split']} train images "
            f"({res['classes_in_subset']} classes), {res['num_val']} val, token {res['token']}, "
            f"{res['feature_dim']}-d, {res['precision']}")
    for r in res["results"]:
        print(f"  lambda {r['lambda']:<6g} (C={r['C']:g})  top-1 {r['top1']:6.2f}%  top-5 {r['top5']:6.2f}%  "
              f"[{r['iterations']} L-BFGS iterations, grad {r['grad_max']:.1e}]")
    print(f"  best: lambda {res['best']['lambda']:g}, top-1 {res['best']['top1']:.2f}%")
    rows = [{"model": name, "checkpoint": args.checkpoint or "", "subset": res["subset"], **r} for r in res["results"]]
    write_results(args.out, "semisup", rows, {**res, "model": name, "checkpoint": args.checkpoint,
                                              "percent": None if args.subset_file else args.percent,
                                              "sampling": None if args.subset_file else args.sampling})
    return 0
