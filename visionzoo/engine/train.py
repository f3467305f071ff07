"""Supervised training engine: plain PyTorch, DDP via torchrun, AMP, accumulation, EMA and exact resume.

The run is a pure function of (recipe, seed): data order comes from a per-epoch seeded permutation, each sample's
augmentation from a seed derived from (seed, epoch, index), and the step's own randomness (mixup, drop path) from
a seed derived from (seed, rank, step). So a run stopped anywhere, even mid-epoch, and resumed from its training
state ends with the same weights as an uninterrupted run, whatever the number of data-loader workers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import STATE_FILE, atomic_torch_save, load_train_state, rng_state, set_rng_state
from .config import TrainConfig, save_config
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .evaluate import autocast_ctx, evaluate, per_class_report
from .logging import MetricsWriter, plot_curves, setup_logging

_logger = logging.getLogger("visionzoo")


class NonFiniteLossError(RuntimeError):
    pass


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class SeededDataset(Dataset):
    """Seeds the RNGs before each sample's transform from (seed, epoch, index): augmentation is reproducible
    whatever the worker count, and does not depend on where a run was resumed."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_everything(_mix_seed(self.seed, self.epoch, index))
        return self.dataset[index]


class ResumableSampler(Sampler):
    """Per-epoch seeded permutation, sharded across ranks, that can start part-way through an epoch."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, repeats: int = 0):
        self.size, self.shuffle, self.seed, self.rank, self.world_size = size, shuffle, seed, rank, world_size
        self.repeats = max(int(repeats), 1)
        self.epoch, self.start = 0, 0
        self.per_rank = size // world_size  # drop the tail so every rank sees the same number of samples
        if self.repeats > 1 and size >= 256:
            # repeated augmentation (timm's RepeatAugSampler): each image `repeats` times in a row, dealt
            # round-robin so its copies land on different ranks; an epoch keeps about `size` samples, rounded
            # down to a multiple of 256 as timm does
            self.per_rank = size // 256 * 256 // world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        mine = order[self.rank:: self.world_size][: self.per_rank]
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


# ----------------------------------------------------------------------------------------------------------------
# pieces built from the config

def build_loss(cfg: TrainConfig, mixup_active: bool) -> nn.Module:
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.loss == "ce":
        if mixup_active:
            return SoftTargetCrossEntropy()  # timm's Mixup already smooths the targets
        return LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()
    if cfg.loss == "bce":
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else cfg.smoothing,
                                  target_threshold=cfg.bce_target_thresh, **cfg.loss_kwargs)
    if cfg.loss == "ga":
        from ..models.gramian import GALoss

        kwargs = {"smoothing": 0.0 if mixup_active else cfg.smoothing, **cfg.loss_kwargs}
        return GALoss(**kwargs)
    raise ValueError(f"Unknown loss '{cfg.loss}'. Valid: ce, bce, ga.")


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    kwargs = dict(cfg.opt_kwargs)
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    if cfg.opt.startswith("gcr_"):  # Euclidean optimizer + Riemannian SGD on Grassmann subspaces (GCR)
        from ..optim.grassmann import create_grassmann_optimizer

        return create_grassmann_optimizer(model, opt=cfg.opt[len("gcr_"):], lr=lr, weight_decay=cfg.weight_decay,
                                          momentum=cfg.momentum, **kwargs)
    return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               layer_decay=cfg.layer_decay, **kwargs)


def clip_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """Parameters whose gradients are clipped: all but groups marked ``grassmann`` (GCR subspaces)."""
    return [p for g in optimizer.param_groups if not g.get("grassmann", False) for p in g["params"]]


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    from timm.scheduler import create_scheduler_v2

    if cfg.sched in ("none", None):
        return None
    # timm's warmup_prefix runs the whole decay AFTER the warm-up; mmengine's LinearLR + CosineAnnealing(begin=w)
    # decays over the remaining epochs, so the decay gets epochs - warmup_epochs to keep the run length
    decay_epochs = cfg.epochs - cfg.warmup_epochs if cfg.warmup_prefix else cfg.epochs
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=decay_epochs, decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs, warmup_prefix=cfg.warmup_prefix, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


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
            raise ValueError(f"head_init_scale needs a classifier; model '{cfg.model}' has none (num_classes=0?)")
        if any(type(m).__name__ == "GrassmannHead" for m in head.modules()):
            raise ValueError("head_init_scale would move GCR class subspaces off the Grassmann manifold (their "
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
        raise ValueError(f"Model '{model.pretrained_cfg.get('architecture')}' cannot take {img_size}x{img_size} "
                         f"inputs: {e}") from None
    finally:
        model.train(was_training)


def make_run_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    name = cfg.experiment or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if info.distributed:  # every rank must agree on the folder
        import torch.distributed as dist

        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    run_dir = Path(cfg.output) / name
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# the loop

@dataclasses.dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    global_step: int = 0
    best_top1: float = -1.0
    skipped_images: int = 0


def train(
    cfg: TrainConfig,
    resume: str | os.PathLike | None = None,
    device: str | None = None,
) -> dict:
    """Train ``cfg``; ``resume`` is an earlier run directory to continue exactly. Returns a summary dict."""
    from ..data.datasets import build_dataset
    from ..data.transforms import build_eval_transform, build_train_transform
    from ..models import save_pretrained, unwrap_model

    info = init_distributed(device)
    setup_logging(info.is_main)
    dev = info.device

    if resume is not None:
        state = load_train_state(resume)  # a clear error when the folder holds no training state
        saved_cfg = TrainConfig(**state["config"])
        # the recipe of a resumed run is the saved one; only run-control fields may change
        cfg = dataclasses.replace(saved_cfg, max_steps=cfg.max_steps, checkpoint_every_steps=cfg.checkpoint_every_steps,
                                  workers=cfg.workers, epochs=saved_cfg.epochs)
    # data first: a missing folder fails before any model is built
    probe = build_dataset(cfg.dataset, cfg.data_dir, cfg.train_split, transform=None)
    num_classes = cfg.num_classes or len(probe.classes)
    seed_everything(_mix_seed(cfg.seed, 11))  # model initialisation
    model = build_model(cfg, num_classes)
    img_size = cfg.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    eval_size = cfg.eval_img_size or img_size
    check_input_size(model, img_size)
    if eval_size != img_size:
        check_input_size(model, eval_size)
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config(model=model)
    data_cfg["crop_pct"] = cfg.crop_pct if cfg.crop_pct is not None else data_cfg["crop_pct"]
    train_tf = build_train_transform(img_size, aa=cfg.aa, reprob=cfg.reprob, remode=cfg.remode,
                                     color_jitter=cfg.color_jitter, interpolation=cfg.train_interpolation,
                                     mean=data_cfg["mean"], std=data_cfg["std"],
                                     scale=tuple(cfg.scale) if cfg.scale else (0.08, 1.0), hflip=cfg.hflip)
    eval_tf = build_eval_transform(model=model, img_size=eval_size, crop_pct=data_cfg["crop_pct"])
    train_set = build_dataset(cfg.dataset, cfg.data_dir, cfg.train_split, transform=train_tf)
    val_set = build_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, transform=eval_tf)

    lr = cfg.resolved_lr(info.world_size)
    per_step = cfg.batch_size * cfg.grad_accum_steps
    sampler = ResumableSampler(len(train_set), True, cfg.seed, info.rank, info.world_size, cfg.aug_repeats)
    steps_per_epoch = sampler.per_rank // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"The training set ({len(train_set)} images over {info.world_size} processes) is smaller "
                         f"than one step (batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps}).")

    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    mixup_fn = build_mixup(cfg, num_classes)
    loss_fn = build_loss(cfg, mixup_fn is not None).to(dev)
    optimizer = build_optimizer(cfg, model, lr)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    use_scaler = cfg.amp and cfg.amp_dtype == "float16" and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)

    prog = Progress()
    run_dir = Path(resume) if resume is not None else make_run_dir(cfg, info)
    if resume is not None:
        unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        prog = Progress(**state["progress"])
        set_rng_state(state["rng"])
        _logger.info("resumed %s at epoch %d, step %d", run_dir, prog.epoch, prog.global_step)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml", extra={
            "lr": lr, "global_batch": cfg.global_batch(info.world_size), "world_size": info.world_size,
            "steps_per_epoch": steps_per_epoch, "num_classes": num_classes, "img_size": img_size})

    train_model = model
    if info.distributed and cfg.sync_bn:
        if dev.type != "cuda":
            raise ValueError("sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel): set sync_bn=false.")
        from timm.layers import convert_sync_batchnorm

        train_model = model = convert_sync_batchnorm(model)  # also converts timm's BatchNormAct2d
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.torchcompile:
        train_model = torch.compile(train_model, mode=None if cfg.torchcompile == "default" else cfg.torchcompile)

    seeded_train = SeededDataset(train_set, cfg.seed)
    if info.distributed:  # every rank evaluates its own slice; counts are summed
        val_idx = list(range(info.rank, len(val_set), info.world_size))
        val_set_local = torch.utils.data.Subset(val_set, val_idx)
    else:
        val_set_local = val_set
    val_loader = DataLoader(val_set_local, batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.workers, pin_memory=dev.type == "cuda")

    metrics = MetricsWriter(run_dir, enabled=info.is_main)
    n_nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
    data_cfg_saved = {"input_size": (3, eval_size, eval_size), "crop_pct": data_cfg["crop_pct"],
                      "mean": data_cfg["mean"], "std": data_cfg["std"], "interpolation": data_cfg["interpolation"]}

    def check_finite(where: str) -> None:
        if int(n_nonfinite) > 0:  # host sync only at log/checkpoint points
            raise NonFiniteLossError(
                f"Loss became NaN/inf ({int(n_nonfinite)} times) before {where}, epoch {prog.epoch}, step "
                f"{prog.global_step}. Training stopped; the last good checkpoint is kept in {run_dir}. Lower the lr, "
                f"enable clip_grad, or use amp_dtype=bfloat16.")

    def save_state() -> None:
        check_finite("saving a checkpoint")
        if not info.is_main:
            return
        state = {
            "model": {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.module.state_dict() if ema is not None else None,
            "progress": dataclasses.asdict(prog),
            "rng": rng_state(),
            "config": dataclasses.asdict(cfg),
        }
        atomic_torch_save(state, run_dir / STATE_FILE)
        save_pretrained(model, run_dir / "last", data_config=data_cfg_saved, metadata={"step": prog.global_step})
        if ema is not None:
            save_pretrained(ema.module, run_dir / "ema", data_config=data_cfg_saved, metadata={"step": prog.global_step})

    _logger.info("%s: %d train / %d val images, %d classes, %d steps/epoch, lr %.3g, global batch %d, %s",
                 cfg.model, len(train_set), len(val_set), num_classes, steps_per_epoch, lr,
                 cfg.global_batch(info.world_size), dev)
    summary: dict = {"run_dir": str(run_dir)}
    stop = False
    t_start = time.time()
    try:
        while prog.epoch < cfg.epochs and not stop:
            epoch = prog.epoch
            seeded_train.epoch = epoch
            sampler.set_epoch(epoch, start=prog.step_in_epoch * per_step)
            loader = DataLoader(seeded_train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                num_workers=cfg.workers, pin_memory=dev.type == "cuda",
                                persistent_workers=False)
            train_model.train()
            micro_total = (steps_per_epoch - prog.step_in_epoch) * cfg.grad_accum_steps
            loss_sum = torch.zeros((), device=dev)
            loss_count = 0
            t_epoch, seen = time.time(), 0
            bar = _progress_bar(info, micro_total // cfg.grad_accum_steps, f"epoch {epoch + 1}/{cfg.epochs}")
            for micro, (images, target) in enumerate(loader):
                if micro >= micro_total:
                    break
                # the step's own randomness (mixup, drop path) depends only on (seed, rank, step, micro)
                seed_everything(_mix_seed(cfg.seed, 7, info.rank, prog.global_step, micro % cfg.grad_accum_steps))
                images = images.to(dev, non_blocking=True)
                target = target.to(dev, non_blocking=True)
                if mixup_fn is not None:
                    images, target = mixup_fn(images, target)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                last_micro = (micro + 1) % cfg.grad_accum_steps == 0
                sync = train_model.no_sync() if info.distributed and not last_micro else contextlib.nullcontext()
                with sync:
                    with autocast_ctx(dev, cfg.amp, cfg.amp_dtype):
                        output = train_model(images)
                        loss = loss_fn(output, target)
                    scaled = loss / cfg.grad_accum_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_d = loss.detach().float()
                n_nonfinite += (~torch.isfinite(loss_d)).long()
                loss_sum += loss_d
                loss_count += 1
                seen += images.shape[0]
                if not last_micro:
                    continue
                if cfg.clip_grad is not None:
                    from timm.utils import dispatch_clip_grad

                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    dispatch_clip_grad(clip_parameters(optimizer), cfg.clip_grad, mode=cfg.clip_mode)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                prog.global_step += 1
                prog.step_in_epoch += 1
                if scheduler is not None:
                    scheduler.step_update(prog.global_step)
                if ema is not None:
                    ema.update(model, step=prog.global_step)
                if bar is not None:
                    bar.update(1)
                if prog.global_step % cfg.log_interval == 0:
                    check_finite("logging")
                    if bar is not None:
                        rate = seen * info.world_size / max(time.time() - t_epoch, 1e-9)
                        bar.set_postfix(loss=f"{float(loss_sum) / loss_count:.4f}",
                                        lr=f"{optimizer.param_groups[0]['lr']:.3g}", img_s=f"{rate:.0f}")
                if cfg.checkpoint_every_steps and prog.global_step % cfg.checkpoint_every_steps == 0:
                    save_state()
                if cfg.max_steps is not None and prog.global_step >= cfg.max_steps:
                    stop = True
                    break
            if bar is not None:
                bar.close()
            check_finite("the end of the epoch")
            if stop and prog.step_in_epoch < steps_per_epoch:
                save_state()  # stopped mid-epoch: the state resumes exactly here
                break
            train_loss = float(loss_sum) / max(loss_count, 1)
            elapsed = time.time() - t_epoch
            row = {"epoch": epoch + 1, "step": prog.global_step, "train_loss": train_loss,
                   "lr": optimizer.param_groups[0]["lr"], "img_per_sec": seen * info.world_size / max(elapsed, 1e-9),
                   "epoch_time_s": elapsed}
            prog.epoch += 1
            prog.step_in_epoch = 0
            if (epoch + 1) % cfg.eval_every == 0 or prog.epoch == cfg.epochs:
                res = evaluate(model, val_loader, dev, num_classes, cfg.amp, cfg.amp_dtype, cfg.channels_last)
                row.update(val_loss=res["loss"], val_top1=res["top1"], val_top5=res["top5"])
                if ema is not None:
                    res_ema = evaluate(ema.module, val_loader, dev, num_classes, cfg.amp, cfg.amp_dtype,
                                       cfg.channels_last)
                    row.update(ema_val_top1=res_ema["top1"], ema_val_loss=res_ema["loss"])
                _logger.info("epoch %d: train_loss %.4f  val_loss %.4f  top1 %.2f  top5 %.2f  (%.0f img/s)",
                             epoch + 1, train_loss, res["loss"], res["top1"], res["top5"], row["img_per_sec"])
                summary.update(val_top1=res["top1"], val_top5=res["top5"], val_loss=res["loss"],
                               per_class=per_class_report(res, getattr(val_set, "classes", None)))
                if res["top1"] > prog.best_top1:
                    prog.best_top1 = res["top1"]
                    if info.is_main:
                        save_pretrained(model, run_dir / "best", data_config=data_cfg_saved,
                                        metadata={"step": prog.global_step, "top1": res["top1"]})
            prog.skipped_images = int(getattr(train_set, "num_skipped", 0)) + int(getattr(val_set, "num_skipped", 0))
            row["skipped_images"] = prog.skipped_images
            metrics.write(row, step=prog.global_step)
            save_state()
    finally:
        metrics.close()
    if info.is_main and (run_dir / "metrics.csv").exists():
        plot_curves(run_dir / "metrics.csv", run_dir / "curves.png", title=cfg.model)
    summary.update(epochs_done=prog.epoch, global_step=prog.global_step, best_top1=prog.best_top1,
                   skipped_images=prog.skipped_images, time_s=time.time() - t_start)
    if info.is_main:
        _logger.info("done: %s", {k: (round(v, 3) if isinstance(v, float) else v)
                                 for k, v in summary.items() if k != "per_class"})
        if prog.skipped_images:
            _logger.warning("%d unreadable images were skipped (named in the warnings above)", prog.skipped_images)
    barrier()
    cleanup()
    return summary


def _progress_bar(info: DistInfo, total: int, desc: str):
    if not info.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None)
