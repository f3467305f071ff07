"""Throughput, parameter count and GMACs of registered models, the way timm's ``benchmark.py`` measures them.

Method (timm ``benchmark.py``): one synthetic batch is created on the device once (no data loader, so the model
is measured, not the I/O); ``num_warm_iter`` untimed steps, then ``num_bench_iter`` timed steps with a device
sync after each. ``samples_per_sec`` = samples / wall time of the whole timed loop; ``step_time_ms`` = mean time
of one step. Inference runs under ``torch.inference_mode``; a train step is forward + cross-entropy on random
targets + backward + SGD (timm ``create_optimizer_v2('sgd', lr=1e-4)``). AMP is ``torch.autocast``. An
out-of-memory error retries with a smaller batch (timm ``decay_batch_step``: 256, 192, 128, 96, ...).
GMACs come from ``torch.utils.flop_counter.FlopCounterMode`` on a batch-1 eval forward (FLOPs / 2), run with the
math SDPA backend so that attention is counted on every device (unlike fvcore).

torch and timm are imported inside functions so that ``visionzoo benchmark --help`` starts at once.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputNotFoundError, UserError

PRECISIONS = ("float32", "amp", "amp_bfloat16", "float16", "bfloat16")
BENCH_MODES = ("both", "infer", "train")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# CSV columns, in order (a row always has all of them, so rows of different runs append to one file).
FIELDS = (
    "model", "model_kwargs", "baseline", "device", "precision", "channels_last", "compile", "batch_size", "img_size",
    "infer_samples_per_sec", "infer_step_time_ms", "infer_batch_size",
    "train_samples_per_sec", "train_step_time_ms", "train_batch_size",
    "param_count", "params", "gmacs",
    "torch", "timm", "visionzoo", "date", "cpu_count", "torch_threads", "cpu", "gpu", "error",
)


# ----------------------------------------------------------------------------------------------------------------
# small helpers

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _sync(device) -> None:
    """Wait for queued device work so ``perf_counter`` sees it (a no-op on CPU)."""
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


def _is_oom(err: BaseException) -> bool:
    """Out-of-memory errors get a smaller batch. Unlike timm (which retries any RuntimeError but a few), other
    errors are raised at once: retrying a shape bug down to batch 1 only hides it."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _flat_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def train_loss(output, target, num_classes: int | None):
    """Cross-entropy summed over every classification output of a train-mode forward.

    Accepts logits ``[B, C]``, several of them in a tuple/list/dict (e.g. distillation or multi-head models), or
    a stacked ``[K, B, C]`` tensor. Tensors of other shapes (features, aux maps) are ignored. A model without
    classifier (``num_classes`` 0) gets the mean of its outputs, so backward still runs through it.
    """
    tensors = [t for t in _flat_tensors(output) if t.is_floating_point()]
    batch = target.shape[0]
    loss = None
    for t in tensors:
        if not num_classes or t.shape[-1] != num_classes or t.ndim not in (2, 3) or t.shape[-2] != batch:
            continue
        k = 1 if t.ndim == 2 else t.shape[0]
        # mean CE over all K heads, times K == the sum of the K per-head CE losses
        part = F.cross_entropy(t.reshape(-1, num_classes).float(), target.repeat(k)) * k
        loss = part if loss is None else loss + part
    if loss is None:
        if not tensors:
            raise TypeError(f"train-mode forward returned {type(output).__name__}, which holds no float tensor")
        loss = sum(t.float().mean() for t in tensors)
    return loss


def count_gmacs(model, input_size, device=None, dtype=None) -> float:
    """GMACs of one eval forward at batch 1 (``FlopCounterMode`` FLOPs / 2 / 1e9), as papers and timm report."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(iter(model.parameters()), None)
    device = device or (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    x = torch.randn((1,) + tuple(input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        # the math SDPA backend decomposes attention into matmuls the counter sees (it has no formula for the
        # fused CPU kernels, which would leave attention uncounted on CPU)
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def _input_size(model, img_size) -> tuple[int, int, int]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model, use_test_size=True)
    chans = cfg["input_size"][0]
    if img_size is None:
        return tuple(cfg["input_size"])
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return (chans, h, w)


def _build_model(model_name: str, img_size, num_classes, model_kwargs):
    from visionzoo.models import create_model

    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None and "img_size" not in kwargs:
        # Models with fixed position embeddings (ViT-style) must be built at the benchmark size; others
        # (CNNs) have no img_size argument, so fall back to building without it.
        try:
            return create_model(model_name, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return create_model(model_name, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# the two runners

def _time_loop(step, device, num_warm_iter: int, num_bench_iter: int, batch_size: int) -> dict[str, float]:
    import time

    def now():
        _sync(device)
        return time.perf_counter()

    for _ in range(num_warm_iter):
        step()
    _sync(device)
    total_step = 0.0
    t_start = now()
    for _ in range(num_bench_iter):
        t0 = now()
        step()
        total_step += now() - t0
    elapsed = now() - t_start
    return dict(
        samples_per_sec=round(batch_size * num_bench_iter / elapsed, 2),
        step_time_ms=round(1000 * total_step / num_bench_iter, 3),
    )


def _bench_infer(model, x, autocast, device, num_warm_iter, num_bench_iter):
    model.eval()

    def step():
        with autocast():
            model(x)

    with torch.inference_mode():
        return _time_loop(step, device, num_warm_iter, num_bench_iter, x.shape[0])


def _bench_train(model, x, autocast, device, num_warm_iter, num_bench_iter, num_classes):
    from timm.optim import create_optimizer_v2

    model.train()
    optimizer = create_optimizer_v2(model, opt="sgd", lr=1e-4)
    target = torch.randint(max(num_classes or 1, 1), (x.shape[0],), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            output = model(x)
            loss = train_loss(output, target, num_classes)
        loss.backward()
        optimizer.step()

    return _time_loop(step, device, num_warm_iter, num_bench_iter, x.shape[0])


def _run_with_retry(fn, batch_size: int, retry_oom: bool, what: str, device):
    """Call ``fn(batch_size)``, decaying the batch on out-of-memory errors like timm's ``_try_run``."""
    import gc
    import logging

    from timm.utils import decay_batch_step

    while True:
        try:
            return fn(batch_size), batch_size
        except RuntimeError as e:
            smaller = decay_batch_step(batch_size)
            if not (retry_oom and _is_oom(e)) or smaller <= 0:
                raise
            logging.getLogger(__name__).warning(
                "%s: out of memory at batch %d, retrying with batch %d", what, batch_size, smaller)
            batch_size = smaller
            if device.type == "cuda":  # free the failed attempt's blocks (gc: tensors held by the traceback)
                gc.collect()
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# public API

def benchmark_model(
    model_name,
    device: str = "cpu",
    batch_size: int = 8,
    img_size: int | tuple[int, int] | None = None,
    precision: str = "float32",
    channels_last: bool = False,
    torchcompile: str | None = None,
    bench: str = "both",
    num_warm_iter: int = 10,
    num_bench_iter: int = 40,
    model_kwargs: dict | None = None,
    num_classes: int | None = None,
    retry_oom: bool = True,
) -> dict[str, Any]:
    """Benchmark one model; returns a row dict with the keys of ``FIELDS``.

    ``model_name`` is a registered name (ours or timm's), or an ``nn.Module`` instance (benchmarked as given,
    e.g. a custom module). ``img_size`` defaults to the model's test input size (timm ``resolve_data_config``);
    when given it is also passed to the constructor of models that take an ``img_size`` argument.
    ``precision``: ``float32``, ``amp`` (fp16 autocast), ``amp_bfloat16``, or ``float16`` / ``bfloat16`` (model and
    input cast). ``torchcompile``: ``None`` (eager) or a ``torch.compile`` mode such as ``'default'``.
    """
    import contextlib
    from functools import partial

    import timm

    import visionzoo

    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision '{precision}'. Use one of: {', '.join(PRECISIONS)}.")
    if bench not in BENCH_MODES:
        raise UserError(f"Unknown bench mode '{bench}'. Use one of: {', '.join(BENCH_MODES)}.")
    if num_bench_iter < 1 or num_warm_iter < 0 or batch_size < 1:
        raise UserError("batch_size and num_bench_iter must be >= 1 and num_warm_iter >= 0.")
    device = torch.device(device)

    if isinstance(model_name, nn.Module):
        model, name = model_name, type(model_name).__name__
    else:
        from visionzoo.models import check_model_name

        check_model_name(model_name)
        model, name = _build_model(model_name, img_size, num_classes, model_kwargs), model_name
    input_size = _input_size(model, img_size)

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision, torch.float32)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, dtype=dtype, memory_format=memory_format)
    if precision.startswith("amp"):
        amp_dtype = torch.bfloat16 if precision == "amp_bfloat16" else torch.float16
        autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
    else:
        autocast = contextlib.nullcontext

    params = sum(p.numel() for p in model.parameters())
    gmacs = count_gmacs(model, input_size, device=device, dtype=dtype)
    n_classes = getattr(model, "num_classes", None)
    runner = torch.compile(model, backend="inductor", mode=torchcompile) if torchcompile else model

    def make_input(b):
        return torch.randn((b,) + input_size, device=device, dtype=dtype).contiguous(memory_format=memory_format)

    h, w = input_size[1:]
    row: dict[str, Any] = dict.fromkeys(FIELDS)
    row.update(
        model=name, baseline=False, device=str(device), precision=precision, channels_last=channels_last,
        compile=torchcompile or "", batch_size=batch_size, img_size=h if h == w else f"{h}x{w}",
        param_count=round(params / 1e6, 2), params=params, gmacs=float(f"{gmacs:.4g}"),
        torch=torch.__version__, timm=timm.__version__, visionzoo=visionzoo.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), cpu=_cpu_model(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "", error="",
    )
    if bench in ("both", "infer"):
        res, b = _run_with_retry(
            lambda b: _bench_infer(runner, make_input(b), autocast, device, num_warm_iter, num_bench_iter),
            batch_size, retry_oom, f"{name} infer", device)
        row.update(infer_samples_per_sec=res["samples_per_sec"], infer_step_time_ms=res["step_time_ms"],
                   infer_batch_size=b)
    if bench in ("both", "train"):
        res, b = _run_with_retry(
            lambda b: _bench_train(runner, make_input(b), autocast, device, num_warm_iter, num_bench_iter,
                                   n_classes),
            batch_size, retry_oom, f"{name} train", device)
        row.update(train_samples_per_sec=res["samples_per_sec"], train_step_time_ms=res["step_time_ms"],
                   train_batch_size=b)
    return row


# ----------------------------------------------------------------------------------------------------------------
# CLI: `visionzoo benchmark`

def _parse_kwargs(items: list[str]) -> dict[str, Any]:
    import ast

    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--model-kwargs expects key=value, got '{item}'.")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def resolve_model_names(patterns: list[str], baseline: bool = False) -> list[str]:
    """Expand wildcards and check every name before any work; unknown names raise the registry's clear error."""
    import timm

    from visionzoo.models import UnknownModelError, check_model_name, list_models

    names: list[str] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            found = timm.list_models(pat) if baseline else (list_models(pat) or timm.list_models(pat))
            if not found:
                raise UnknownModelError(f"No model matches '{pat}'. `visionzoo list models` shows every name.")
            names += found
        else:
            check_model_name(pat)
            names.append(pat)
    return list(dict.fromkeys(names))  # drop repeats, keep order


def _read_model_list(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"--model-list file not found: {p}")
    lines = (ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines())
    return [ln for ln in lines if ln]


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows to a CSV; the header is written only when the file is new or empty."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(FIELDS):
            raise UserError(f"{path} has other columns than a `visionzoo benchmark` CSV; pick another --results-file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the main columns (markdown-compatible)."""
    cols = [("model", "model"), ("infer_samples_per_sec", "infer img/s"), ("infer_step_time_ms", "infer ms"),
            ("train_samples_per_sec", "train img/s"), ("train_step_time_ms", "train ms"),
            ("batch_size", "batch"), ("img_size", "img"), ("param_count", "params (M)"), ("gmacs", "GMACs")]

    def cell(row, key):
        v = row.get(key)
        if key == "model" and row.get("baseline"):
            return f"{v} (timm baseline)"
        if key == "model" and row.get("model_kwargs"):
            v = f"{v} [{row['model_kwargs']}]"
        if key == "model" and row.get("error"):
            return f"{v} (failed)"
        return "" if v is None else str(v)

    table = [[title for _, title in cols]] + [[cell(r, k) for k, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run `visionzoo benchmark`; returns the exit code (1 when a model failed, 0 otherwise)."""
    patterns = list(args.model) + (_read_model_list(args.model_list) if args.model_list else [])
    if not patterns and not args.baseline:
        raise UserError("Nothing to benchmark: pass --model NAME [NAME ...] (or --model-list FILE).")
    jobs = [(n, False) for n in resolve_model_names(patterns)]
    jobs += [(n, True) for n in resolve_model_names(args.baseline, baseline=True)]
    model_kwargs = _parse_kwargs(args.model_kwargs)


    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (8 if device == "cpu" else 256)
    precision = "amp" if args.amp else args.precision

    rows, failed = [], 0
    for name, is_baseline in jobs:
        print(f"benchmarking {name}{' (timm baseline)' if is_baseline else ''} ...", file=sys.stderr, flush=True)
        try:
            row = benchmark_model(
                name, device=device, batch_size=batch_size, img_size=args.img_size, precision=precision,
                channels_last=args.channels_last, torchcompile=args.torchcompile, bench=args.bench,
                num_warm_iter=args.num_warm_iter, num_bench_iter=args.num_bench_iter,
                model_kwargs={} if is_baseline else model_kwargs,  # options of our models, not timm's
                num_classes=args.num_classes, retry_oom=not args.no_retry)
        except Exception as e:  # one broken model must not lose the others' rows (timm does the same)
            failed += 1
            print(f"  {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            row = dict.fromkeys(FIELDS)
            row.update(model=name, device=device, precision=precision, batch_size=batch_size,
                       error=f"{type(e).__name__}: {e}")
        row["baseline"] = is_baseline
        row["model_kwargs"] = "" if is_baseline else " ".join(args.model_kwargs)
        rows.append(row)
        if args.results_file:
            write_rows(args.results_file, [row])
    print(format_table(rows))
    if args.results_file:
        print(f"results appended to {args.results_file}", file=sys.stderr)
    return 1 if failed else 0
