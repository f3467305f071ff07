"""``visionzoo linear``: a linear probe on frozen features (DINO / UDI protocol, spec udi.md section 7), any model.

The backbone stays frozen in eval mode. Feature: for class-token ViTs the [CLS] token (``--token``) of the last
``--n-last-blocks`` blocks (default 4, as DINO/UDI for ViT-S), each through the final norm, concatenated, optionally
with the mean patch token (``--avgpool-patchtokens``); for other models the pooled pre-logits feature. A Linear layer
(weights N(0, 0.01), zero bias; no BatchNorm unless ``--batchnorm``, MAE's variant) is trained with SGD (momentum 0.9, weight decay 0) at
lr = ``--lr`` x batch / 256, cosine-annealed per epoch to 0, for ``--epochs`` epochs; the best and the last val
top-1/top-5 are reported and the head is saved.

``--augment`` picks the training images:

* ``simple``: RandomResizedCrop + horizontal flip (DINO's ``eval_linear.py``; the default);
* ``strong``: UDI's script (RandomResizedCrop scale (0.08, 1), flip, color jitter 0.4, RandAugment
  rand-m9-mstd0.5-inc1, random erasing 0.25);
* ``none``: the eval transform; features are then computed ONCE and the probe trains on the cached features
  (fastest; the usual choice for small data such as the embedded digits).

Single process. torch is imported only inside functions, so ``visionzoo --help`` stays fast.
"""
from __future__ import annotations

import argparse
import math
import os

from .knn import add_common_arguments, check_data, eval_datasets, load_model, loader, resolve_device, write_results

AUGMENTS = ("simple", "strong", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    add_common_arguments(parser)
    parser.add_argument("--n-last-blocks", type=int, default=None, metavar="N",
                        help="concatenate the class token of the last N blocks (default: 4 for class-token ViTs, "
                             "else 1)")
    parser.add_argument("--avgpool-patchtokens", action="store_true",
                        help="also append the mean of the last block's patch tokens (ViTs)")
    parser.add_argument("--batchnorm", action="store_true",
                        help="BatchNorm without affine before the linear layer (MAE's probe): standardises "
                             "features, which badly scaled ones (e.g. of a random-init CNN) need")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.001, help="base lr for batch 256 (default: 0.001; UDI's "
                                                                 "README uses 0.02)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--augment", choices=AUGMENTS, default="simple",
                        help="training images: simple (DINO), strong (UDI) or none (cached features)")
    parser.add_argument("--hflip", type=float, default=0.5, help="flip probability with --augment (0 for digits)")
    parser.add_argument("--eval-every", type=int, default=1, metavar="N", help="validate every N epochs")


def _train_transform(args, model, img_size: int):
    from timm.data import resolve_data_config

    from ..data.transforms import build_train_transform

    cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    strong = args.augment == "strong"
    return build_train_transform(img_size, aa="rand-m9-mstd0.5-inc1" if strong else None,
                                 reprob=0.25 if strong else 0.0, color_jitter=0.4 if strong else None,
                                 interpolation="random" if strong else cfg["interpolation"], mean=cfg["mean"],
                                 std=cfg["std"], hflip=args.hflip)


def _accuracy(logits, labels) -> tuple[int, int]:
    k = min(5, logits.shape[1])
    pred = logits.topk(k, dim=1).indices
    return int((pred[:, 0] == labels).sum()), int((pred == labels[:, None]).any(1).sum())


def linear_probe(model, args, device) -> dict:
    """Train the probe; returns the per-epoch log, best/last accuracies and the trained ``torch.nn.Linear``."""
    import torch

    from .features import extract, model_features, resolve_token

    torch.manual_seed(args.seed)
    token = resolve_token(model, args.token)
    n_blocks = args.n_last_blocks or (4 if token != "pooled" and hasattr(model, "blocks") else 1)
    n_blocks = min(n_blocks, len(model.blocks)) if hasattr(model, "blocks") else n_blocks
    feat_kw = dict(token=token, n_last_blocks=n_blocks, avgpool_patchtokens=args.avgpool_patchtokens)
    data = eval_datasets(args, model)
    train_set, val_set = data[args.train_split], data[args.val_split]
    val_feats, val_labels = extract(model, loader(val_set, args), device, **feat_kw)
    top_label = int(val_labels.max())
    if args.augment == "none":
        train_feats, train_labels = extract(model, loader(train_set, args), device, **feat_kw)
        train_feats, train_labels = train_feats.to(device), train_labels.to(device)
        top_label = max(top_label, int(train_labels.max()))
    else:
        img_size = args.img_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        train_set = eval_datasets(args, model, splits=(args.train_split,),
                                  transform=_train_transform(args, model, img_size))[args.train_split]
    num_classes = len(getattr(train_set, "classes", None) or []) or top_label + 1
    val_feats, val_labels = val_feats.to(device), val_labels.to(device)

    linear = torch.nn.Linear(val_feats.shape[1], num_classes)
    torch.nn.init.normal_(linear.weight, std=0.01)
    torch.nn.init.zeros_(linear.bias)
    head = (torch.nn.Sequential(torch.nn.BatchNorm1d(val_feats.shape[1], affine=False), linear)
            if args.batchnorm else linear).to(device)
    lr = args.lr * args.batch_size / 256.0
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs, eta_min=0)
    gen = torch.Generator().manual_seed(args.seed)
    model.eval()
    log, best = [], {"top1": -1.0}
    for epoch in range(args.epochs):
        head.train()
        loss_sum = torch.zeros((), device=device)
        n_seen = 0
        if args.augment == "none":
            perm = torch.randperm(train_feats.shape[0], generator=gen).to(device)
            batches = ((train_feats[i], train_labels[i]) for i in perm.split(args.batch_size))
        else:
            batches = ((model_features(model, x.to(device, non_blocking=True), **feat_kw).detach(),
                        torch.as_tensor(y).to(device)) for x, y in loader(train_set, args, shuffle=True,
                                                                            seed=args.seed + epoch))
        for f, y in batches:
            loss = torch.nn.functional.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * y.shape[0]
            n_seen += y.shape[0]
        sched.step()
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            head.eval()
            with torch.no_grad():
                c1, c5 = _accuracy(head(val_feats), val_labels)
            row = {"epoch": epoch, "train_loss": round(float(loss_sum) / max(n_seen, 1), 6),
                   "top1": round(100.0 * c1 / len(val_labels), 4), "top5": round(100.0 * c5 / len(val_labels), 4),
                   "lr": opt.param_groups[0]["lr"]}
            if not math.isfinite(row["train_loss"]):
                raise FloatingPointError(f"linear probe loss is {row['train_loss']} at epoch {epoch}: lower --lr")
            log.append(row)
            if row["top1"] > best["top1"]:
                best = dict(row)
    return {"token": token, "n_last_blocks": n_blocks, "feature_dim": int(val_feats.shape[1]), "lr": lr,
            "log": log, "best": best, "last": log[-1], "head": head.cpu()}


def run(args) -> int:
    if args.epochs < 1 or args.eval_every < 1:
        raise ValueError("--epochs and --eval-every must be >= 1")
    check_data(args)
    device = resolve_device(args.device)
    model = load_model(args.model, args.checkpoint, seed=args.seed).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    res = linear_probe(model, args, device)
    name = args.model or model.pretrained_cfg.get("architecture", "model")
    print(f"linear probe on {args.data} for {name}" + (f" from {args.checkpoint}" if args.checkpoint else
                                                         " (random init)")
          + f": token {res['token']} x {res['n_last_blocks']} block(s), {res['feature_dim']}-d, lr {res['lr']:.4g}, "
            f"{args.epochs} epochs, augment {args.augment}")
    print(f"  best top-1 {res['best']['top1']:.2f}% (epoch {res['best']['epoch']}), "
          f"last top-1 {res['last']['top1']:.2f}% top-5 {res['last']['top5']:.2f}%")
    head = res.pop("head")
    summary = {k: v for k, v in res.items() if k != "log"}
    write_results(args.out, "linear", res["log"], {**summary, "model": name, "checkpoint": args.checkpoint,
                                                   "augment": args.augment, "epochs": args.epochs})
    if args.out:
        from safetensors.torch import save_file

        tmp = os.path.join(args.out, "linear_head.safetensors.tmp")
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, tmp)
        os.replace(tmp, os.path.join(args.out, "linear_head.safetensors"))
    return 0
