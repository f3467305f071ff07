"""Linear probe on frozen features (DINO / UDI protocol) as a task of the one loop: the backbone stays frozen in eval
mode, only the linear head (optionally behind a non-affine BatchNorm, MAE's variant) trains. With ``augment: none``
the features are computed once and the head trains on them; otherwise every step runs the frozen backbone on
augmented images."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.config import RunConfig
from ..engine.loop import fit
from ..engine.schedule import FactorSchedule
from ..engine.task import Context, Task, save_task_model


@dataclass
class LinearProbeConfig(RunConfig):
    model: str | None = None
    checkpoint: str | None = None
    data: str = "digits"
    train_split: str = "train"
    val_split: str = "val"
    token: str = "auto"
    img_size: int | None = None
    n_last_blocks: int | None = None  # default: 4 for class-token ViTs, else 1
    avgpool_patchtokens: bool = False
    batchnorm: bool = False
    augment: str = "simple"  # simple (DINO) | strong (UDI) | none (cached features)
    hflip: float = 0.5
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    # DINO's rule: lr = lr_base x global batch / 256, cosine-annealed per epoch to 0
    epochs: int = 100
    batch_size: int = 128
    lr_base: float = 0.001
    lr_base_size: int = 256


class Probe(nn.Module):
    """A frozen backbone and the trained head; ``forward`` takes images, or features when ``cached``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feat_kw: dict, cached: bool):
        super().__init__()
        self.backbone, self.head, self.feat_kw, self.cached = backbone, head, feat_kw, cached
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        from ..evals.features import model_features

        if self.cached:
            return x
        self.backbone.eval()
        with torch.no_grad():
            return model_features(self.backbone, x, **self.feat_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LinearProbeTask(Task):
    name = "linear"
    best_metric = "top1"

    def prepare(self, ctx: Context) -> None:
        from ..evals.knn import check_data

        check_data(self.cfg)

    def build_model(self, ctx: Context) -> nn.Module:
        from ..evals.features import extract, resolve_token
        from ..evals.knn import eval_datasets, load_model, loader

        cfg = self.cfg
        backbone = load_model(cfg.model, cfg.checkpoint, seed=cfg.seed).to(ctx.device).eval()
        token = resolve_token(backbone, cfg.token)
        n_blocks = cfg.n_last_blocks or (4 if token != "pooled" and hasattr(backbone, "blocks") else 1)
        n_blocks = min(n_blocks, len(backbone.blocks)) if hasattr(backbone, "blocks") else n_blocks
        feat_kw = dict(token=token, n_last_blocks=n_blocks, avgpool_patchtokens=cfg.avgpool_patchtokens)
        data = eval_datasets(cfg, backbone)
        self.val_feats, self.val_labels = extract(backbone, loader(data[cfg.val_split], cfg), ctx.device,
                                                  amp=cfg.amp, **feat_kw)
        top_label = int(self.val_labels.max())
        if cfg.augment == "none":
            feats, labels = extract(backbone, loader(data[cfg.train_split], cfg), ctx.device, amp=cfg.amp,
                                    **feat_kw)
            self.train_set = torch.utils.data.TensorDataset(feats, labels)
            top_label = max(top_label, int(labels.max()))
            classes = getattr(data[cfg.train_split], "classes", None)
        else:
            img_size = cfg.img_size or int(backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
            self.train_set = eval_datasets(cfg, backbone, splits=(cfg.train_split,),
                                           transform=self._train_transform(backbone, img_size))[cfg.train_split]
            classes = getattr(self.train_set, "classes", None)
        self.num_classes = len(classes or []) or top_label + 1
        self.info = {"token": token, "n_last_blocks": n_blocks, "feature_dim": int(self.val_feats.shape[1])}
        linear = nn.Linear(self.val_feats.shape[1], self.num_classes)
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        head = nn.Sequential(nn.BatchNorm1d(self.val_feats.shape[1], affine=False), linear) if cfg.batchnorm \
            else linear
        self.probe = Probe(backbone, head, feat_kw, cached=cfg.augment == "none")
        return self.probe

    def _train_transform(self, model, img_size: int):
        from timm.data import resolve_data_config

        from ..data.transforms import build_train_transform

        data_cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
        strong = self.cfg.augment == "strong"
        return build_train_transform(img_size, aa="rand-m9-mstd0.5-inc1" if strong else None,
                                     reprob=0.25 if strong else 0.0, color_jitter=0.4 if strong else None,
                                     interpolation="random" if strong else data_cfg["interpolation"],
                                     mean=data_cfg["mean"], std=data_cfg["std"], hflip=self.cfg.hflip)

    def train_dataset(self, ctx: Context):
        return self.train_set

    def trainable(self, model: Probe) -> nn.Module:
        return model.head

    def build_optimizer(self, model: Probe, lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg
        self.lr = lr  # the loop's resolved lr (lr_base x global batch / lr_base_size), for the summary
        return torch.optim.SGD(model.head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def build_schedule(self, optimizer, ctx: Context, lr: float):
        spe, epochs = ctx.steps_per_epoch, max(ctx.total_steps // ctx.steps_per_epoch, 1)
        # torch's CosineAnnealingLR stepped once per epoch: constant within an epoch
        return FactorSchedule(lr, lambda step: 0.5 * (1 + math.cos(math.pi * (step // spe) / epochs)))

    def train_step(self, net: nn.Module, batch, ctx: Context) -> dict:
        x, y = batch
        probe = self.probe
        return {"loss": nn.functional.cross_entropy(net(probe.features(x)), torch.as_tensor(y, device=x.device))}

    def evaluate(self, model: Probe, ctx: Context) -> dict:
        model.head.eval()
        with torch.no_grad():
            logits = model.head(self.val_feats.to(ctx.device))
        labels = self.val_labels.to(ctx.device)
        pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
        n = len(labels)
        return {"top1": 100.0 * float((pred[:, 0] == labels).sum()) / n,
                "top5": 100.0 * float((pred == labels[:, None]).any(1).sum()) / n}

    def export(self, model: Probe, folder, metadata: dict) -> None:
        save_task_model(model.head, folder, self.name, dataclasses.asdict(self.cfg), {**metadata, **self.info})

    def summary(self) -> dict:
        return {**self.info, "lr": self.lr}

    def header(self) -> str:
        i = self.info
        return (f"{self.cfg.model or 'model'}: token {i['token']} x {i['n_last_blocks']} block(s), "
                f"{i['feature_dim']}-d, {self.num_classes} classes, augment {self.cfg.augment}")


def linear_probe(cfg: LinearProbeConfig, resume=None, device: str | None = None) -> dict:
    """Train the probe through the loop; returns the summary plus the probe's feature description."""
    cfg.check()
    task = LinearProbeTask(cfg)
    return fit(task, resume=resume, device=device)
