"""``visionzoo knn``: weighted k-NN classification on frozen features (DINO protocol), for any model.

Features of the train split form the memory bank; each val image takes the k nearest by cosine similarity and
votes with weight exp(sim / T) (T = 0.07). Reported: top-1 / top-5 for every k (10, 20, 100, 200 by default;
DINO's headline is k = 20). The model runs in eval mode with its own eval transform (resize by ``crop_pct``,
center crop, its mean/std). Works for ViTs (``--token cls``, ``cls+``, ``both``) and for any other model
(``--token pooled``: the model's pooled pre-logits feature); ``auto`` picks ``cls`` for class-token ViTs.

This module also holds the options and the model/data setup shared with ``visionzoo linear``.
"""
from __future__ import annotations

import csv
import json
import os

import torch

from ..errors import InputNotFoundError, UserError

# ----------------------------------------------------------------------------------------------------------------
# setup shared with `visionzoo linear`

def check_data(args) -> None:
    """Fail before any model is built, naming the missing folder."""
    if args.data == "digits":
        return
    from ..data.datasets import check_data_dir

    if not os.path.isdir(args.data):
        raise InputNotFoundError(f"data folder not found: {args.data} (pass a root holding "
                                 f"{args.train_split}/ and {args.val_split}/, or 'digits')")
    for split in (args.train_split, args.val_split):
        check_data_dir(args.data, split)


def resolve_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(model_name: str | None, checkpoint: str | None, num_classes: int = 0, seed: int = 0, **model_kwargs):
    """A model for feature extraction or fine-tuning, from a name and/or weights (see ``--checkpoint``);
    ``model_kwargs`` go to the constructor (e.g. ``dynamic_img_size=True`` for dense features). A saved model (or
    a train run) is rebuilt with the arguments in its config.json (e.g. ``global_pool``) unless ``model_name``
    names another architecture."""
    import visionzoo

    from ..models import load_pretrained

    torch.manual_seed(seed)  # a random-init model (the usual baseline) is the same in every run
    from ..models import resolve_checkpoint, saved_model_dir

    folder = saved_model_dir(checkpoint) if checkpoint and os.path.isdir(checkpoint) else None
    if folder:
        with open(os.path.join(folder, "config.json")) as f:
            architecture = json.load(f)["architecture"]
        if model_name in (None, architecture):
            return load_pretrained(folder, num_classes=num_classes, **model_kwargs)  # the folder names its arch
    if checkpoint:
        checkpoint = str(resolve_checkpoint(checkpoint))
    if model_name is None:
        raise UserError("--model is needed unless --checkpoint is a folder written by save_pretrained "
                        "(config.json + model.safetensors) or a `visionzoo train` run.")
    return visionzoo.create_model(model_name, checkpoint_path=checkpoint, num_classes=num_classes, **model_kwargs)


def eval_datasets(args, model, splits=None, transform=None):
    """{split: dataset} with the model's eval transform (or ``transform``) at ``args.img_size``."""
    from ..data.datasets import build_dataset, check_same_classes
    from ..data.transforms import build_eval_transform

    img_size = args.img_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    transform = transform or build_eval_transform(model, img_size=img_size)
    kind = "digits" if args.data == "digits" else "auto"
    splits = splits or (args.train_split, args.val_split)
    data = {s: build_dataset(kind, args.data, s, transform, img_size=img_size) for s in splits}
    check_same_classes(data)  # a val split missing a class would shift its labels
    return data


def loader(dataset, args, shuffle: bool = False, drop_last: bool = False, seed: int = 0):
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, drop_last=drop_last,
                                       num_workers=args.workers, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(seed) if shuffle else None)


def write_results(out: str | None, name: str, rows: list[dict], summary: dict) -> None:
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from ..files import atomic_write_text

    atomic_write_text(os.path.join(out, f"{name}.json"), json.dumps(summary, indent=1))


# ----------------------------------------------------------------------------------------------------------------

def knn_eval(model, args, device) -> dict:
    """{"token": ..., "results": {k: {"top1", "top5"}}, "num_train", "num_val", "feature_dim"}."""
    from ..engine.precision import describe
    from .features import extract, knn_classify, resolve_token

    token = resolve_token(model, args.token)
    data = eval_datasets(args, model)
    amp = getattr(args, "amp", "fp32")
    (ftr, ytr), (fva, yva) = (extract(model, loader(data[s], args), device, token, amp=amp)
                              for s in (args.train_split, args.val_split))
    num_classes = len(getattr(data[args.train_split], "classes", [])) or None
    results = knn_classify(ftr.to(device), ytr, fva, yva, args.nb_knn, args.temperature, num_classes)
    return {"token": token, "results": results, "num_train": len(ytr), "num_val": len(yva),
            "feature_dim": int(ftr.shape[1]), "precision": describe(amp, device)}


def frozen_model(args):
    """The start of every frozen-feature command: data checked, then (model in eval mode, device, its name)."""
    check_data(args)
    device = resolve_device(args.device)
    model = load_model(args.model, args.checkpoint, seed=args.seed).to(device).eval()
    return model, device, args.model or model.pretrained_cfg.get("architecture", "model")


def run(args) -> int:
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if min(args.nb_knn) < 1:
        raise UserError(f"--nb-knn values must be >= 1, got {args.nb_knn}")
    model, device, name = frozen_model(args)
    res = knn_eval(model, args, device)
    print(f"k-NN on {args.data} ({res['num_train']} train / {res['num_val']} val, token {res['token']}, "
          f"{res['feature_dim']}-d, T={args.temperature}, {res['precision']}) for {name}"
          + (f" from {args.checkpoint}" if args.checkpoint else " (random init)"))
    rows = []
    for k, r in res["results"].items():
        print(f"  {k:>4}-NN  top-1 {r['top1']:6.2f}%  top-5 {r['top5']:6.2f}%")
        rows.append({"model": name, "checkpoint": args.checkpoint or "", "token": res["token"], "k": k,
                     "top1": round(r["top1"], 4), "top5": round(r["top5"], 4)})
    write_results(args.out, "knn", rows, {**res, "model": name, "checkpoint": args.checkpoint,
                                          "temperature": args.temperature})
    return 0
