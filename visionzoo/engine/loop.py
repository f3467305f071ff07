"""THE training loop. Every task (classify, udi, detect, segment, pointcloud, ...) runs through ``fit``, which alone
owns distributed set-up, DDP and SyncBN, torch.compile, seeding, the resumable sampler and DataLoader, autocast and
the grad scaler, accumulation with ``no_sync``, clipping, the optimizer step, per-step schedules, EMA, the NaN stop,
the progress bar, metrics, evaluation, best tracking, the run folder, checkpointing, resume and max steps.

A task (engine/task.py) supplies only what differs. The loop never looks at a task's, model's or method's name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import UserError
from ..files import atomic_write_text
from .config import save_config
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, cleanup, init_distributed
from .logging import MetricsWriter, plot_curves, progress_bar, setup_logging
from .precision import Precision
from .sampling import EpochBatches, SeededDataset, mix_seed, seed_everything, seed_model_init
from .state import RunFolder, StopSignal, load_train_state
from .task import Context, Task, to_device

_logger = logging.getLogger("visionzoo")

# fields a resumed run may change; everything else comes from the saved config
RUN_CONTROL = ("max_steps", "checkpoint_every_steps", "workers", "log_interval")


class NonFiniteLossError(UserError, RuntimeError):
    pass


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: the state of the current step was saved; ``--resume`` continues it."""


@dataclasses.dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    global_step: int = 0
    best: float | None = None
    period_start: int = 0  # first step of the metrics row being accumulated
    sums: dict = dataclasses.field(default_factory=dict)  # train_step outputs summed since ``period_start``
    count: int = 0  # micro-batches summed


def run_dir_for(cfg, info: DistInfo) -> Path:
    """``output/experiment``; without an experiment name, ``<model>-<time>`` made unique (as timm's get_outdir)."""
    name = cfg.experiment
    if name and (Path(name).is_absolute() or Path(name).name != name or name in (".", "..")):
        raise UserError(f"--experiment {name!r} must be a plain folder name (it is created inside --output "
                        f"{cfg.output}); to write elsewhere, change --output.")
    if not name:
        base = f"{getattr(cfg, 'model', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
        name, n = base, 1
        while (Path(cfg.output) / name).exists():
            name, n = f"{base}-{n}", n + 1
    path = Path(cfg.output) / name
    return Path(broadcast_object(str(path)))  # every rank agrees on the folder


def config_for_resume(saved: dict, cfg):
    """The saved recipe, with the run-control fields of ``cfg``."""
    known = {f.name for f in dataclasses.fields(cfg)}
    new = type(cfg)(**{k: v for k, v in type(cfg).with_older_defaults(saved).items() if k in known})
    return dataclasses.replace(new, **{k: getattr(cfg, k) for k in RUN_CONTROL if hasattr(cfg, k)})


def fit(task: Task, resume: str | Path | None = None, device: str | None = None) -> dict:
    """Train ``task.cfg`` in a new run folder (``output/experiment``), or continue ``resume`` exactly."""
    info = init_distributed(device)
    setup_logging(info.is_main)
    state = None
    if resume is not None:
        state = load_train_state(resume)
        if state.get("format") != 2:
            raise UserError(f"{resume} was written by an older visionzoo whose training state cannot be resumed "
                            f"by this one; its weights still load (--checkpoint {resume}). Start a new run.")
        task.cfg = config_for_resume(state["config"], task.cfg)
        run_path = Path(resume)
    else:
        run_path = run_dir_for(task.cfg, info)
    cfg = task.cfg
    run = RunFolder.open(run_path, resume=state is not None, lock=info.is_main) if info.is_main else RunFolder(run_path)
    barrier()
    try:
        with StopSignal() as stop_signal:
            return _fit(task, cfg, info, run, state, stop_signal)
    finally:
        run.release()
        barrier()
        cleanup()


@dataclasses.dataclass
class Setup:
    """What a training run is built from, the same for ``fit`` and ``--profile``."""
    ctx: Context
    model: nn.Module
    trainable: nn.Module  # ``task.trainable(model)``: what the step runs and DDP wraps
    train_set: object
    batches: EpochBatches
    steps_per_epoch: int
    total_steps: int
    lr: float
    optimizer: torch.optim.Optimizer
    schedule: object
    precision: Precision


def set_up(task: Task, cfg, dev: torch.device, run_dir: Path, rank: int = 0, world_size: int = 1) -> Setup:
    """Data checks, the seeded model, the sampler, the lr, the optimizer, the schedule and the precision."""
    ctx = Context(cfg=cfg, device=dev, rank=rank, world_size=world_size, run_dir=run_dir)
    task.prepare(ctx)  # data checks first: a missing folder fails before any model is built
    seed_model_init(cfg.seed)
    model = task.build_model(ctx).to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_set = task.train_dataset(ctx)
    batches = EpochBatches(len(train_set), cfg.batch_size, cfg.seed, rank, world_size,
                           getattr(cfg, "aug_repeats", 0), task.sampling, task.sample_groups())
    steps_per_epoch = len(batches.epoch_batches(0)) // cfg.grad_accum_steps
    if steps_per_epoch == 0:
        raise UserError(f"The training set ({len(train_set)} items over {world_size} process(es)) is smaller "
                        f"than one step (batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps}): "
                        f"lower batch_size.")
    ctx.steps_per_epoch, ctx.total_steps = steps_per_epoch, cfg.steps or cfg.epochs * steps_per_epoch
    lr = cfg.resolved_lr(world_size)
    optimizer = task.build_optimizer(model, lr)
    schedule = task.build_schedule(optimizer, ctx, lr)
    precision = Precision(dev, cfg.amp)
    ctx.autocast = precision.autocast
    return Setup(ctx, model, task.trainable(model), train_set, batches, steps_per_epoch, ctx.total_steps, lr,
                 optimizer, schedule, precision)


def _fit(task: Task, cfg, info: DistInfo, run: RunFolder, state: dict | None, stop_signal: StopSignal) -> dict:
    dev = info.device
    setup = set_up(task, cfg, dev, run.path, info.rank, info.world_size)
    ctx, model, trainable, train_set, batches = setup.ctx, setup.model, setup.trainable, setup.train_set, setup.batches
    optimizer, schedule, precision, lr = setup.optimizer, setup.schedule, setup.precision, setup.lr
    steps_per_epoch, total_steps, accum = setup.steps_per_epoch, setup.total_steps, cfg.grad_accum_steps
    epochs = -(-total_steps // steps_per_epoch)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(trainable, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)

    prog = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        precision.load_state_dict(state.get("scaler"))
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        task.load_state_dict(state.get("task") or {})
        prog = Progress(**state["progress"])
        if state.get("world_size", 1) != info.world_size and prog.step_in_epoch:
            raise UserError(f"{run.path} stopped in the middle of an epoch with {state.get('world_size', 1)} "
                            f"process(es); resume it with as many (the data order of an epoch depends on it).")
        _logger.info("resumed %s at epoch %d, step %d", run.path, prog.epoch, prog.global_step)
        if info.is_main:
            run.drop_snapshots_after(prog.epoch)  # the resumed run writes them again
    if info.is_main:
        save_config(cfg, run.path / "config.yaml", extra={
            "task": task.name, "lr": lr, "global_batch": cfg.global_batch(info.world_size),
            "world_size": info.world_size, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps})

    net = trainable
    if info.distributed and cfg.sync_bn:
        if dev.type != "cuda":
            raise UserError("sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel): set sync_bn=false.")
        from timm.layers import convert_sync_batchnorm

        net = convert_sync_batchnorm(net)
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                  find_unused_parameters=getattr(cfg, "find_unused_parameters",
                                                                                 False))
    if cfg.torchcompile:  # the mode is checked with the config (RunConfig.check)
        net = task.compile(net, cfg.torchcompile)  # the task says what its step compiles

    seeded = SeededDataset(train_set, cfg.seed)
    metrics = MetricsWriter(run.path, enabled=info.is_main)
    if state is not None and info.is_main:
        metrics.truncate(prog.global_step)  # rows written after the saved state are redone
    nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
    sums: dict[str, torch.Tensor] = {k: torch.tensor(v, device=dev) for k, v in prog.sums.items()}

    def check_finite(where: str) -> None:
        n = int(all_reduce_sum(nonfinite.clone()))  # a host sync: only at log, checkpoint and period ends
        if n > 0:
            raise NonFiniteLossError(
                f"Loss became NaN/inf ({n} times) before {where}, epoch {prog.epoch}, step {prog.global_step}. "
                f"Training stopped; the last good state is kept in {run.path}. Lower the lr, set clip_grad, or "
                f"use --amp bf16.")

    def export(folder: str, extra: dict | None = None, module: nn.Module | None = None) -> None:
        if info.is_main:
            task.export(module if module is not None else model, run.path / folder,
                        {"step": prog.global_step, "epoch": prog.epoch, **(extra or {})})

    def save_state() -> None:
        check_finite("saving a checkpoint")
        prog.sums = {k: float(v) for k, v in sums.items()}
        if not info.is_main:
            return
        run.save_state({
            "task": task.state_dict(), "progress": dataclasses.asdict(prog), "world_size": info.world_size,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scaler": precision.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None, "config": dataclasses.asdict(cfg)})
        export("last")
        if ema is not None:
            export("ema", module=ema.module)

    evaluated_at = -1  # the step of the last evaluation

    def evaluate(row: dict, summary: dict, track_best: bool = True) -> None:
        nonlocal evaluated_at
        evaluated_at = prog.global_step
        res = task.evaluate(model, ctx)
        if ema is not None:
            res.update({f"ema_{k}": v for k, v in task.evaluate(ema.module, ctx).items()})
        row.update({k: v for k, v in res.items() if isinstance(v, (int, float))})
        summary.update(res)
        value = res.get(task.best_metric) if task.best_metric and track_best else None
        if value is not None and (prog.best is None or value > prog.best):
            prog.best = float(value)
            export("best", {task.best_metric: value})

    def evaluate_at_stop() -> None:
        """A run stopped by max_steps ends measured (summary, best/) like a finished one; metrics.csv keeps only the
        rows of the full run, so that resuming it ends with the same file."""
        if evaluated_at != prog.global_step:
            evaluate({}, summary)

    def snapshot() -> None:
        if info.is_main:
            run.save_snapshot(task.export_model(model).state_dict(), epoch=prog.epoch, step=prog.global_step)

    def end_period(row: dict) -> None:
        check_finite("writing metrics")
        row.update({f"train_{k}": float(v) / max(prog.count, 1) for k, v in sums.items()})
        row.setdefault("skipped_images", int(getattr(train_set, "num_skipped", 0)))
        metrics.write(row, step=prog.global_step)
        for v in sums.values():
            v.zero_()
        prog.count, prog.period_start = 0, prog.global_step

    _logger.info("%s: %s%s steps/epoch, %d steps, %s, global batch %d, %s, %s", task.name,
                 task.header() + ", " if task.header() else "", steps_per_epoch, total_steps,
                 cfg.lr_rule(info.world_size), cfg.global_batch(info.world_size), precision.describe(), dev)
    summary: dict = {"run_dir": str(run.path)}
    stop = False
    t_start = time.time()
    values = row_values = schedule.apply(optimizer, prog.global_step)
    if task.eval_at_start and state is None:  # the baseline row (step 0) of methods that track it (UDI's k-NN)
        row = {"epoch": 0, "step": 0}
        evaluate(row, summary, track_best=False)  # the untrained model is a baseline, never best/
        summary.update({f"{k}_init": v for k, v in row.items() if k not in ("epoch", "step")})
        metrics.write(row, step=0)
    if state is None and cfg.save_every_epochs and cfg.save_init_snapshot:
        snapshot()  # epoch 0: the weights the run starts from
    loader_generator = torch.Generator()  # creating loader iterators must not draw from the global RNG
    try:
        while prog.epoch < epochs and not stop:
            epoch = prog.epoch
            ctx.epoch = seeded.epoch = epoch
            batches.set_epoch(epoch, start=prog.step_in_epoch * accum)
            loader = DataLoader(seeded, batch_sampler=batches, num_workers=cfg.workers, collate_fn=task.collate(),
                                pin_memory=dev.type == "cuda", generator=loader_generator)
            remaining = min(steps_per_epoch - prog.step_in_epoch, total_steps - prog.global_step)
            net.train()
            t_epoch, seen = time.time(), 0
            data_wait, t_ready = 0.0, time.perf_counter()  # time spent waiting for the loader (vs computing)
            bar = progress_bar(info.is_main, remaining, f"epoch {epoch + 1}/{epochs}")
            for micro, batch in enumerate(loader):
                data_wait += time.perf_counter() - t_ready
                if micro >= remaining * accum:
                    break
                ctx.step, ctx.micro, ctx.values = prog.global_step, micro % accum, values
                # the step's own randomness (dropout, drop path, mixup) depends only on (seed, rank, step, micro)
                seed_everything(mix_seed(cfg.seed, 7, info.rank, prog.global_step, ctx.micro))
                batch = to_device(batch, dev)
                last_micro = ctx.micro == accum - 1
                sync = net.no_sync() if info.distributed and not last_micro else contextlib.nullcontext()
                with sync:
                    with precision.autocast():
                        out = task.train_step(net, batch, ctx)
                    precision.backward(out["loss"] / accum)
                for k, v in out.items():
                    v = v.detach().float()
                    if k == "loss":
                        nonfinite += (~torch.isfinite(v)).long()
                    sums[k] = sums[k] + v if k in sums else v.clone()
                prog.count += 1
                seen += cfg.batch_size
                if not last_micro:
                    t_ready = time.perf_counter()
                    continue
                precision.step(optimizer, task.clip_parameters(model, optimizer), cfg.clip_grad, cfg.clip_mode,
                               lambda: task.before_optimizer_step(model, ctx))
                prog.global_step += 1
                prog.step_in_epoch += 1
                ctx.step = prog.global_step
                task.after_update(model, ctx)
                if ema is not None:
                    ema.update(trainable, step=prog.global_step)
                row_values = values
                values = schedule.apply(optimizer, prog.global_step)
                if bar is not None:
                    bar.update(1)
                at = prog.global_step
                if at % cfg.log_interval == 0:
                    check_finite("logging")
                    if bar is not None:
                        bar.set_postfix(loss=f"{float(sums['loss']) / max(prog.count, 1):.4f}",
                                        lr=f"{row_values.get('lr', 0.0):.3g}",
                                        img_s=f"{seen * info.world_size / max(time.time() - t_epoch, 1e-9):.0f}",
                                        data=f"{data_wait / max(time.time() - t_epoch, 1e-9):.0%}")
                interrupted = stop_signal.requested
                if info.distributed and (at % cfg.log_interval == 0 or at == total_steps):
                    interrupted = bool(all_reduce_sum(torch.tensor(int(interrupted), device=dev)))
                if cfg.eval_every_steps and (at % cfg.eval_every_steps == 0 or at == total_steps):
                    row = {"epoch": epoch + 1, "step": at, **_lr_values(row_values)}
                    evaluate(row, summary)
                    net.train()
                    end_period(row)
                    if at != total_steps:
                        save_state()
                if cfg.checkpoint_every_steps and at % cfg.checkpoint_every_steps == 0:
                    save_state()
                if interrupted:
                    save_state()
                    raise RunInterrupted(f"interrupted at step {at}: the state is saved; continue with "
                                         f"--resume {run.path}")
                if cfg.max_steps is not None and cfg.max_steps <= at < total_steps:
                    stop = True
                    break
                t_ready = time.perf_counter()
            if bar is not None:
                bar.close()
            check_finite("the end of the epoch")
            if stop and prog.step_in_epoch < steps_per_epoch:
                evaluate_at_stop()
                save_state()  # stopped mid-epoch: the state resumes exactly here
                break
            elapsed = time.time() - t_epoch
            prog.epoch += 1
            prog.step_in_epoch = 0
            if not cfg.eval_every_steps:
                row = {"epoch": epoch + 1, "step": prog.global_step, **_lr_values(row_values),
                       "img_per_sec": seen * info.world_size / max(elapsed, 1e-9), "epoch_time_s": elapsed,
                       "data_wait_time_s": data_wait}
                if (epoch + 1) % cfg.eval_every == 0 or prog.epoch == epochs:
                    evaluate(row, summary)
                end_period(row)
            if stop:
                evaluate_at_stop()
            if cfg.save_every_epochs and (prog.epoch % cfg.save_every_epochs == 0 or prog.epoch == epochs):
                snapshot()  # before the state: a run killed in between redoes the epoch and its snapshot
            save_state()
    finally:
        metrics.close()
    if info.is_main and (run.path / "metrics.csv").exists():
        plot_curves(run.path / "metrics.csv", run.path / "curves.png", title=getattr(cfg, "model", task.name))
    summary.update(epochs_done=prog.epoch, global_step=prog.global_step, best=prog.best,
                   time_s=time.time() - t_start)
    if task.best_metric:
        summary[f"best_{task.best_metric}"] = prog.best
    summary.update(task.summary())
    if info.is_main:
        atomic_write_text(run.path / "summary.json", json.dumps(
            {k: v for k, v in summary.items() if _jsonable(v)}, indent=1, default=str))
        _logger.info("%s", done_line(summary, task.best_metric))
        _logger.info("run folder: %s  (%s)", run.path, ", ".join(_run_folder_contents(run.path)))
    return summary


def done_line(summary: dict, metric: str | None) -> str:
    """The result of a finished run in one line: the task's metric (last, best, and before training where the task
    measures it then), steps and time. Every other number is in summary.json."""
    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    head = ""
    if metric and summary.get(metric) is not None:
        start = f", at start {fmt(summary[metric + '_init'])}" if metric + "_init" in summary else ""
        head = f"{metric} {fmt(summary[metric])} (best {fmt(summary.get('best'))}{start}); "
    def count(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}"

    return (f"done: {head}{count(summary['global_step'], 'step')}, {count(summary['epochs_done'], 'epoch')} in "
            f"{summary['time_s']:.0f} s; every number in summary.json")


def _run_folder_contents(path: Path) -> list[str]:
    """What a finished run folder holds, for the last line of every task: folders first (``best/``, ``last/``)."""
    entries = sorted(path.iterdir(), key=lambda p: (not p.is_dir(), p.name))
    return [p.name + "/" if p.is_dir() else p.name for p in entries if not p.name.startswith(".")]


def _lr_values(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, float)}


def _jsonable(v) -> bool:
    try:
        json.dumps(v, default=str)
        return True
    except (TypeError, ValueError):
        return False
