"""Supervised classification and fine-tuning: timm models, timm data pipeline, CE/BCE or a family loss (GA), timm
optimizers or a family optimizer (GCR), timm schedulers. Everything else is the loop's."""
from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..engine.config import TrainConfig
from ..engine.loop import NonFiniteLossError, fit  # noqa: F401  (NonFiniteLossError re-exported for callers)
from ..engine.schedule import timm_schedule
from ..engine.task import Context, Task
from ..errors import UserError
from ..evals.evaluate import evaluate, per_class_report

# loss name -> "module:class" of a family loss taking (smoothing=..., **loss_kwargs)
LOSSES = {"ga": "visionzoo.models.gramian:GALoss"}


def build_loss(cfg: TrainConfig, mixup_active: bool) -> nn.Module:
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.loss == "ce":
        if mixup_active:
            return SoftTargetCrossEntropy()  # timm's Mixup already smooths the targets
        return LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()
    if cfg.loss == "bce":
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else cfg.smoothing,
                                  target_threshold=cfg.bce_target_thresh, **cfg.loss_kwargs)
    if cfg.loss in LOSSES:
        module, name = LOSSES[cfg.loss].split(":")
        kwargs = {"smoothing": 0.0 if mixup_active else cfg.smoothing, **cfg.loss_kwargs}
        return getattr(importlib.import_module(module), name)(**kwargs)
    raise UserError(f"Unknown loss '{cfg.loss}'. Valid: ce, bce, {', '.join(LOSSES)}.")


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from ..engine.optim import create_optimizer

    return create_optimizer(cfg, model, lr)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """The recipe's timm schedule (None for ``sched: none``)."""
    schedule = timm_schedule(optimizer, cfg.sched, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.warmup_lr,
                             cfg.warmup_prefix, cfg.min_lr, cfg.decay_epochs, cfg.decay_rate)
    return getattr(schedule, "scheduler", None)


def build_mixup(cfg: TrainConfig, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from ..models import create_model, load_weights

    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.drop is not None:
        kwargs["drop_rate"] = cfg.drop
    model = create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
    if cfg.initial_checkpoint:
        load_weights(model, cfg.initial_checkpoint)
    if cfg.head_init_scale is not None:
        head = model.get_classifier()
        if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
            raise UserError(f"head_init_scale needs a classifier; model '{cfg.model}' has none (num_classes=0?)")
        if any(getattr(m, "on_manifold", False) for m in head.modules()):
            raise UserError("head_init_scale would move GCR class subspaces off the Grassmann manifold (their "
                            "bases must stay orthonormal): leave it unset for GCR models.")
        with torch.no_grad():
            for p in head.parameters():
                p.mul_(cfg.head_init_scale)
    return model


def check_input_size(model: nn.Module, img_size: int, in_chans: int = 3) -> None:
    """Fail before training when the model cannot take ``img_size`` (the model's own error names valid sizes)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, img_size, img_size))
    except (ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f"Model '{model.pretrained_cfg.get('architecture')}' cannot take {img_size}x{img_size} "
                        f"inputs: {e}") from None
    finally:
        model.train(was_training)


def _data_name(cfg: TrainConfig) -> str:
    return "digits" if cfg.dataset == "digits" else f"{cfg.data_dir}/{cfg.train_split}"


class ClassifyTask(Task):
    name = "classify"
    best_metric = "val_top1"

    def prepare(self, ctx: Context) -> None:
        from ..data.datasets import build_dataset

        cfg = self.cfg
        probe = build_dataset(cfg.dataset, cfg.data_dir, cfg.train_split, transform=None)
        n_data = len(probe.classes)
        if cfg.num_classes is not None and cfg.num_classes < n_data:  # labels >= num_classes: an index error later
            raise UserError(f"--num-classes {cfg.num_classes} is fewer than the {n_data} classes of the training data "
                            f"({_data_name(cfg)}); leave it out to take {n_data} from the data, or pass "
                            f"--num-classes {n_data} or more.")
        self.num_classes = n_data if cfg.num_classes is None else cfg.num_classes  # None: from the data
        self.labelled = None  # semi-supervised fine-tuning: (indices, description) of the labelled train subset
        if cfg.label_percent is not None or cfg.label_subset_file:
            from ..evals.semisup import labelled_subset

            subset, how = labelled_subset(probe, cfg.label_percent, cfg.label_sampling, cfg.seed,
                                          cfg.label_subset_file)
            self.labelled = (subset.indices, how)

    def build_model(self, ctx: Context) -> nn.Module:
        from timm.data import resolve_data_config

        from ..data.datasets import build_dataset, check_same_classes
        from ..data.transforms import build_eval_transform, build_train_transform

        cfg = self.cfg
        model = build_model(cfg, self.num_classes)
        self.img_size = cfg.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        eval_size = cfg.eval_img_size or self.img_size
        check_input_size(model, self.img_size)
        if eval_size != self.img_size:
            check_input_size(model, eval_size)
        data_cfg = resolve_data_config(model=model)
        crop_pct = cfg.crop_pct if cfg.crop_pct is not None else data_cfg["crop_pct"]
        train_tf = build_train_transform(self.img_size, aa=cfg.aa, reprob=cfg.reprob, remode=cfg.remode,
                                         color_jitter=cfg.color_jitter, interpolation=cfg.train_interpolation,
                                         mean=data_cfg["mean"], std=data_cfg["std"],
                                         scale=tuple(cfg.scale) if cfg.scale else (0.08, 1.0), hflip=cfg.hflip)
        eval_tf = build_eval_transform(model=model, img_size=eval_size, crop_pct=crop_pct)
        self.train_set = build_dataset(cfg.dataset, cfg.data_dir, cfg.train_split, transform=train_tf)
        self.val_set = build_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, transform=eval_tf)
        check_same_classes({cfg.train_split: self.train_set, cfg.val_split: self.val_set})
        if self.labelled is not None:
            from ..evals.semisup import LabelledSubset

            self.train_set = LabelledSubset(self.train_set, self.labelled[0])
        self.data_config = {"input_size": (3, eval_size, eval_size), "crop_pct": crop_pct, "mean": data_cfg["mean"],
                            "std": data_cfg["std"], "interpolation": data_cfg["interpolation"]}
        self.mixup = build_mixup(cfg, self.num_classes)
        self.loss_fn = build_loss(cfg, self.mixup is not None)
        return model

    def train_dataset(self, ctx: Context):
        return self.train_set

    def build_schedule(self, optimizer, ctx: Context, lr: float):
        cfg = self.cfg
        epochs = ctx.total_steps / ctx.steps_per_epoch
        return timm_schedule(optimizer, cfg.sched, epochs, ctx.steps_per_epoch, cfg.warmup_epochs, cfg.warmup_lr,
                             cfg.warmup_prefix, cfg.min_lr, cfg.decay_epochs, cfg.decay_rate)

    def train_step(self, net: nn.Module, batch, ctx: Context) -> dict:
        images, target = batch
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = net(images)
        # the loss in fp32 under any autocast: CPU autocast leaves log_softmax in bf16 (CUDA's runs it in fp32), and a
        # bf16 loss and logit gradient slowed learning (docs/benchmarks.md, "Learning checks")
        return {"loss": self.loss_fn(logits.float() if torch.is_tensor(logits) else logits, target)}

    def evaluate(self, model: nn.Module, ctx: Context) -> dict:
        cfg = self.cfg
        val = self.val_set
        if ctx.distributed:  # every rank evaluates its own slice; counts are summed
            val = Subset(val, list(range(ctx.rank, len(val), ctx.world_size)))
        loader = DataLoader(val, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                            pin_memory=ctx.device.type == "cuda")
        res = evaluate(model, loader, ctx.device, self.num_classes, amp=cfg.amp, channels_last=cfg.channels_last)
        return {"val_loss": res["loss"], "val_top1": res["top1"], "val_top5": res["top5"],
                "per_class": per_class_report(res, getattr(self.val_set, "classes", None))}

    def export(self, model: nn.Module, folder, metadata: dict) -> None:
        from ..models import save_pretrained

        save_pretrained(model, folder, data_config=self.data_config, metadata=metadata)

    def summary(self) -> dict:
        if getattr(self, "labelled", None) is None:
            return {}
        return {"labelled_subset": self.labelled[1], "labelled_images": len(self.labelled[0])}

    def header(self) -> str:
        labelled = "" if getattr(self, "labelled", None) is None else f" (labelled subset: {self.labelled[1]})"
        return (f"{self.cfg.model}, {len(self.train_set)} train{labelled} / {len(self.val_set)} val images, "
                f"{self.num_classes} classes")


def train(cfg: TrainConfig, resume=None, device: str | None = None) -> dict:
    """Supervised training of ``cfg`` (``resume``: an earlier run folder to continue exactly). Returns a summary."""
    cfg.check()
    task = ClassifyTask(cfg)
    summary = fit(task, resume=resume, device=device)
    summary["best_top1"] = summary.get("best") if summary.get("best") is not None else -1.0
    summary["skipped_images"] = int(getattr(task.train_set, "num_skipped", 0)) + \
        int(getattr(task.val_set, "num_skipped", 0))
    return summary
