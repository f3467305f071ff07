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

The probe is a task of the one training loop (visionzoo/tasks/linear_probe.py): a run folder with metrics.csv,
summary.json and the head in last/ and best/, exact resume, DDP. ``--out DIR`` names the run folder itself.
"""
from __future__ import annotations

AUGMENTS = ("simple", "strong", "none")


def config_from_args(args):
    from ..engine.config import split_run_path
    from ..tasks.linear_probe import LinearProbeConfig

    run = split_run_path(args.out) if args.out else {"output": args.output, "experiment": args.experiment}
    return LinearProbeConfig(
        model=args.model, checkpoint=args.checkpoint, data=args.data, train_split=args.train_split,
        val_split=args.val_split, token=args.token, img_size=args.img_size, n_last_blocks=args.n_last_blocks,
        avgpool_patchtokens=args.avgpool_patchtokens, batchnorm=args.batchnorm, augment=args.augment,
        hflip=args.hflip, momentum=args.momentum, weight_decay=args.weight_decay, epochs=args.epochs,
        batch_size=args.batch_size, lr_base=args.lr, workers=args.workers, eval_every=args.eval_every,
        seed=args.seed, amp=getattr(args, "amp", "fp32"), **run)


def run(args) -> int:
    from ..tasks.linear_probe import linear_probe

    cfg = config_from_args(args)
    print(f"linear probe on {cfg.data} for {cfg.model or 'model'}"
          + (f" from {cfg.checkpoint}" if cfg.checkpoint else " (random init)"))
    linear_probe(cfg, resume=args.resume, device=args.device)  # the engine's header gives the features and the lr
    return 0
