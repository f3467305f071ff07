"""Throughput, parameter count and GMACs of registered models, the way timm's ``benchmark.py`` measures them.

Method (timm ``benchmark.py``): one synthetic batch is created on the device once (no data loader, so the model
is measured, not the I/O); ``num_warm_iter`` untimed steps, then ``num_bench_iter`` timed steps with a device
sync after each. ``samples_per_sec`` = samples / wall time of the whole timed loop; ``step_time_ms`` = mean time
of one step. Inference runs under ``torch.inference_mode``; a train step is forward + cross-entropy on random
targets + backward + SGD (timm ``create_optimizer_v2('sgd', lr=1e-4)``; ``opt`` picks another). AMP is
``torch.autocast``. An out-of-memory error retries with a smaller batch (timm ``decay_batch_step``: 256, 192, 128,
96, ...).
GMACs come from ``torch.utils.flop_counter.FlopCounterMode`` on a batch-1 eval forward (FLOPs / 2), run with the
math SDPA backend so that attention is counted on every device (unlike fvcore).

Peak memory (``*_peak_mem_mb``) is what a step needs on top of the model and its input at rest, over the warm-up and
timed steps: on CUDA the caching allocator's ``max_memory_allocated`` minus what was allocated before the loop (the
allocator's own peak is ``model_mem_mb`` + input + this); on CPU the process's resident high-water mark (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` before each loop) minus its resident size before the loop.
``visionzoo benchmark`` measures CPU rows in a fresh subprocess per model, so that no earlier model's freed heap
hides a later model's allocations. Gradient checkpointing (``grad_checkpointing=True``) uses the model's own
``set_grad_checkpointing``.

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

# CSV columns, in order (a row always has all of them, so rows of different runs append to one file).
FIELDS = (
    "model", "model_kwargs", "baseline", "device", "precision", "channels_last", "compile", "batch_size", "img_size",
    "infer_samples_per_sec", "infer_step_time_ms", "infer_batch_size",
    "train_samples_per_sec", "train_step_time_ms", "train_batch_size",
    "infer_peak_mem_mb", "train_peak_mem_mb", "model_mem_mb", "memory", "grad_checkpointing",
    "infer_first_step_ms", "train_first_step_ms",  # with --torchcompile: includes the compile time
    "param_count", "params", "gmacs", "train_gmacs",
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


_MiB = 2 ** 20


def _proc_status_kb(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM); None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory of the code run between ``start()`` and ``stop()``, above what was in use at ``start()``, in MiB.

    CUDA: the caching allocator's counters (exact, any process). CPU: the resident high-water mark. Freed heap is
    first given back to the system (``malloc_trim``) and the mark reset (``clear_refs``, Linux >= 4.0), so the
    number is the loop's own; where the mark cannot be reset, only the first measurement of a process is kept.
    ``how`` says which (the ``memory`` column), ``None`` where nothing can be measured.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.how: str | None = None
        self._base = 0
        self._measured = False

    def _trim(self) -> None:
        import ctypes

        try:  # (no gc.collect: tensors are freed by reference counting, and a full collection costs ~1 s here)
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: return freed heap pages, so RSS = memory in use
        except (OSError, AttributeError):
            pass

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base, self.how = torch.cuda.memory_allocated(self.device), "cuda allocator"
            return
        if self.device.type != "cpu" or _proc_status_kb("VmHWM") is None:
            return
        self._trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            self.how = "cpu rss"
        except OSError:
            self.how = None if self._measured else "cpu rss (first loop of the process)"
        self._base = _proc_status_kb("VmRSS") * 1024

    def stop(self) -> float | None:
        if self.how is None:
            return None
        self._measured = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            peak = _proc_status_kb("VmHWM") * 1024 - self._base
        return round(max(peak, 0) / _MiB, 1)


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


def count_gmacs_of(fn) -> float:
    """GMACs (FLOPs / 2 / 1e9) that ``fn()`` runs, forward and backward, by ``FlopCounterMode``. The math SDPA
    backend decomposes attention into matmuls the counter sees (it has no formula for the fused CPU kernels, which
    would leave attention uncounted on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2 / 1e9


def _param_device_dtype(model, device, dtype):
    param = next(iter(model.parameters()), None)
    device = device or (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    return device, dtype


def count_gmacs(model, input_size, device=None, dtype=None) -> float:
    """GMACs of one eval forward at batch 1 (``FlopCounterMode`` FLOPs / 2 / 1e9), as papers and timm report."""
    device, dtype = _param_device_dtype(model, device, dtype)
    x = torch.randn((1,) + tuple(input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count_gmacs_of(lambda: model(x))
    finally:
        model.train(was_training)


def count_train_gmacs(model, input_size, num_classes=None, device=None, dtype=None, batch_size: int = 2) -> float:
    """GMACs per image of one train step's forward + backward (counted at ``batch_size``, 2 so that BatchNorm
    trains; the optimizer's elementwise update is not counted). About 3x the forward for most models; the real
    count also sees what the train mode adds (distillation heads, drop paths off). Gradients are cleared after."""
    device, dtype = _param_device_dtype(model, device, dtype)
    x = torch.randn((batch_size,) + tuple(input_size), device=device, dtype=dtype)
    target = torch.randint(max(num_classes or 1, 1), (batch_size,), device=device)
    was_training = model.training
    model.train()
    try:
        return count_gmacs_of(lambda: train_loss(model(x), target, num_classes).backward()) / batch_size
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def autocast_factory(precision: str, device: torch.device):
    """A no-argument callable giving the autocast context of a benchmark ``precision`` (a null one for fp32 and
    for the cast precisions float16/bfloat16, which change the model's dtype instead)."""
    import contextlib
    from functools import partial

    if not precision.startswith("amp"):
        return contextlib.nullcontext
    from .engine.precision import autocast_context

    amp_dtype = torch.bfloat16 if precision == "amp_bfloat16" else torch.float16
    return partial(autocast_context, torch.device(device), dtype=amp_dtype)


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

    meter = PeakMemory(device)
    meter.start()
    first_step = None  # the first call: torch.compile's compile time, oneDNN's kernel set-up, allocator growth
    for _ in range(num_warm_iter):
        t0 = now()
        step()
        first_step = now() - t0 if first_step is None else first_step
    _sync(device)
    total_step = 0.0
    t_start = now()
    for _ in range(num_bench_iter):
        t0 = now()
        step()
        total_step += now() - t0
        first_step = total_step if first_step is None else first_step
    elapsed = now() - t_start
    return dict(
        samples_per_sec=round(batch_size * num_bench_iter / elapsed, 2),
        step_time_ms=round(1000 * total_step / num_bench_iter, 3), first_step_ms=round(1000 * first_step, 1),
        peak_mem_mb=meter.stop(), memory=meter.how,
    )


def _bench_infer(model, x, autocast, device, num_warm_iter, num_bench_iter):
    model.eval()

    def step():
        with autocast():
            model(x)

    with torch.inference_mode():
        return _time_loop(step, device, num_warm_iter, num_bench_iter, x.shape[0])


def make_optimizer(model, opt: str = "sgd"):
    """timm benchmark.py's optimizer (``sgd``, lr 1e-4, momentum 0.9, no weight decay), or any name of the
    engine's ``create_optimizer`` (``gcr_sgd``: GCR's Riemannian composite step)."""
    from types import SimpleNamespace

    from .engine.optim import create_optimizer

    return create_optimizer(SimpleNamespace(opt=opt, weight_decay=0.0, momentum=0.9), model, lr=1e-4)


def _bench_train(model, x, autocast, device, num_warm_iter, num_bench_iter, num_classes, opt="sgd"):
    model.train()
    optimizer = make_optimizer(model, opt)
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
    grad_checkpointing: bool = False,
    opt: str = "sgd",
    train_gmacs: bool = False,
) -> dict[str, Any]:
    """Benchmark one model; returns a row dict with the keys of ``FIELDS``.

    ``model_name`` is a registered name (ours or timm's), or an ``nn.Module`` instance (benchmarked as given,
    e.g. a custom module). ``img_size`` defaults to the model's test input size (timm ``resolve_data_config``);
    when given it is also passed to the constructor of models that take an ``img_size`` argument.
    ``precision``: ``float32``, ``amp`` (fp16 autocast), ``amp_bfloat16``, or ``float16`` / ``bfloat16`` (model and
    input cast). ``torchcompile``: ``None`` (eager) or a ``torch.compile`` mode such as ``'default'``.
    ``grad_checkpointing``: recompute activations in the backward (the model's ``set_grad_checkpointing``).
    ``opt``: the train step's optimizer (:func:`make_optimizer`). ``train_gmacs``: also count the train step's
    forward + backward GMACs per image (:func:`count_train_gmacs`).
    """
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
    if grad_checkpointing:
        if not callable(getattr(model, "set_grad_checkpointing", None)):
            raise UserError(f"{name} has no set_grad_checkpointing(): benchmark it without --grad-checkpointing.")
        model.set_grad_checkpointing(True)

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision, torch.float32)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, dtype=dtype, memory_format=memory_format)
    autocast = autocast_factory(precision, device)

    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    gmacs = count_gmacs(model, input_size, device=device, dtype=dtype)
    n_classes = getattr(model, "num_classes", None)
    step_gmacs = count_train_gmacs(model, input_size, n_classes, device, dtype) if train_gmacs else None
    runner = torch.compile(model, backend="inductor", mode=torchcompile) if torchcompile else model

    def make_input(b):
        return torch.randn((b,) + input_size, device=device, dtype=dtype).contiguous(memory_format=memory_format)

    h, w = input_size[1:]
    row: dict[str, Any] = dict.fromkeys(FIELDS)
    row.update(
        model=name, baseline=False, device=str(device), precision=precision, channels_last=channels_last,
        compile=torchcompile or "", batch_size=batch_size, img_size=h if h == w else f"{h}x{w}",
        param_count=round(params / 1e6, 2), params=params, gmacs=float(f"{gmacs:.4g}"),
        model_mem_mb=round(model_bytes / _MiB, 1), grad_checkpointing=grad_checkpointing,
        train_gmacs=None if step_gmacs is None else float(f"{step_gmacs:.4g}"),
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
                   infer_batch_size=b, infer_peak_mem_mb=res["peak_mem_mb"], memory=res["memory"],
                   infer_first_step_ms=res["first_step_ms"])
    if bench in ("both", "train"):
        res, b = _run_with_retry(
            lambda b: _bench_train(runner, make_input(b), autocast, device, num_warm_iter, num_bench_iter,
                                   n_classes, opt),
            batch_size, retry_oom, f"{name} train", device)
        row.update(train_samples_per_sec=res["samples_per_sec"], train_step_time_ms=res["step_time_ms"],
                   train_batch_size=b, train_peak_mem_mb=res["peak_mem_mb"], memory=res["memory"],
                   train_first_step_ms=res["first_step_ms"])
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


def write_rows(path: str | os.PathLike, rows: list[dict], fields: tuple[str, ...] = FIELDS) -> None:
    """Append rows to a CSV; the header is written only when the file is new or empty."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(fields):
            raise UserError(f"{path} has other columns than a `visionzoo benchmark` CSV; pick another --results-file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")  # e.g. "round": the row order says it
        if new:
            writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the main columns (markdown-compatible)."""
    cols = [("model", "model"), ("precision", "precision"), ("infer_samples_per_sec", "infer img/s"), ("infer_step_time_ms", "infer ms"),
            ("train_samples_per_sec", "train img/s"), ("train_step_time_ms", "train ms"),
            ("infer_peak_mem_mb", "infer peak MiB"), ("train_peak_mem_mb", "train peak MiB"), ("batch_size", "batch"),
            ("img_size", "img"), ("param_count", "params (M)"), ("gmacs", "GMACs")]

    def cell(row, key):
        v = row.get(key)
        if key == "model" and row.get("baseline"):
            return f"{v} (timm baseline)"
        if key == "model" and row.get("model_kwargs"):
            v = f"{v} [{row['model_kwargs']}]"
        if key == "model" and row.get("error"):
            return f"{v} (failed)"
        if key == "model" and row.get("grad_checkpointing"):
            v = f"{v} (grad ckpt)"
        return "" if v is None else str(v)

    return markdown_table([title for _, title in cols], [[cell(r, k) for k, _ in cols] for r in rows])


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table with padded columns (readable as printed text too)."""
    table = [header] + body
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _isolated_child() -> None:
    """The fresh process of :func:`benchmark_isolated`: kwargs as JSON on stdin, the row as JSON on stdout's last
    line (an error as ``{"error": ..., "user_error": ...}``)."""
    import json

    from .engine.distributed import keep_freed_heap

    keep_freed_heap()  # the heap policy of the command that started this process
    kwargs = json.loads(sys.stdin.read())
    threads = kwargs.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    try:
        out = benchmark_model(**kwargs)
    except Exception as e:  # the parent reports it as this model's failure
        out = {"error": f"{type(e).__name__}: {e}", "user_error": isinstance(e, UserError)}
    print(json.dumps(out, default=str))


def benchmark_isolated(model_name: str, threads: int | None = None, **kwargs) -> dict[str, Any]:
    """:func:`benchmark_model` in a fresh Python process: the CPU memory columns then hold this model's own
    high-water mark, whatever ran before it in the caller (freed heap of earlier models is not reused)."""
    import json
    import subprocess

    payload = json.dumps(dict(kwargs, model_name=model_name, threads=threads))
    code = "from visionzoo.bench import _isolated_child; _isolated_child()"
    proc = subprocess.run([sys.executable, "-c", code], input=payload, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        row = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"the benchmark process of {model_name} exited with code {proc.returncode} "
                           "and no result (see its messages above)") from None
    if set(row) == {"error", "user_error"}:
        raise (UserError if row["user_error"] else RuntimeError)(row["error"])
    if row.get("memory"):
        row["memory"] += ", fresh process"
    return row


def model_patterns(args: argparse.Namespace) -> list[str]:
    """The model names / patterns of ``--model`` and ``--model-list``."""
    return list(args.model) + (_read_model_list(args.model_list) if args.model_list else [])


def run(args: argparse.Namespace) -> int:
    """Run `visionzoo benchmark`; returns the exit code (1 when a model failed, 0 otherwise). ``--suite official``
    is :func:`visionzoo.bench_official.run` instead (the command dispatches, cli/commands.py)."""
    patterns = model_patterns(args)
    if not patterns and not args.baseline:
        raise UserError("Nothing to benchmark: pass --model NAME [NAME ...] (or --model-list FILE).")
    jobs = [(n, False) for n in resolve_model_names(patterns)]
    jobs += [(n, True) for n in resolve_model_names(args.baseline, baseline=True)]
    model_kwargs = _parse_kwargs(args.model_kwargs)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (8 if device == "cpu" else 256)
    precisions = [_precision_of_amp(a, device) for a in args.amp] if args.amp else [args.precision]
    rounds = getattr(args, "rounds", 1)

    rows, failed = [], 0
    for r in range(rounds):
        # A B, B A, ...: a drift of the machine's speed hits both sides of every ratio alike
        order, job_order = (precisions, jobs) if r % 2 == 0 else (precisions[::-1], jobs[::-1])
        for name, is_baseline in job_order:
            for precision in order:
                row = _benchmark_job(args, name, is_baseline, device, batch_size, precision, model_kwargs)
                failed += bool(row["error"])
                row["round"] = r
                rows.append(row)
                if args.results_file:
                    write_rows(args.results_file, [row])
    print(format_table(rows))
    if len(precisions) > 1 or (args.baseline and rounds > 1):
        print(format_ratio_table(rows, precisions))
    if args.results_file:
        print(f"results appended to {args.results_file}", file=sys.stderr)
    return 1 if failed else 0


def _precision_of_amp(amp: str, device: str) -> str:
    """The benchmark precision of an ``--amp`` name (auto: bf16 where the device computes it natively, else fp32)."""
    from .engine.precision import amp_dtype, amp_name

    name = amp_name(amp)
    if name == "auto":
        name = "bf16" if amp_dtype(name, device) is not None else "fp32"
    return {"bf16": "amp_bfloat16", "fp16": "amp", "fp32": "float32"}[name]


def _benchmark_job(args, name, is_baseline, device, batch_size, precision, model_kwargs) -> dict:
    """One row of `visionzoo benchmark` (a fresh process per model on CPU); a failure is a row with its error."""
    print(f"benchmarking {name}{' (timm baseline)' if is_baseline else ''} ({precision}, batch {batch_size}, "
          f"{device}) ...", file=sys.stderr, flush=True)
    kwargs = dict(
        device=device, batch_size=batch_size, img_size=args.img_size, precision=precision,
        channels_last=args.channels_last, torchcompile=args.torchcompile, bench=args.bench,
        num_warm_iter=args.num_warm_iter, num_bench_iter=args.num_bench_iter,
        model_kwargs=_parse_kwargs(getattr(args, "baseline_kwargs", [])) if is_baseline else model_kwargs,
        num_classes=args.num_classes, retry_oom=not args.no_retry, grad_checkpointing=args.grad_checkpointing)
    try:
        if torch.device(device).type == "cpu" and not args.in_process:
            row = benchmark_isolated(name, threads=args.threads, **kwargs)
        else:
            row = benchmark_model(name, **kwargs)
    except Exception as e:  # one broken model must not lose the others' rows (timm does the same)
        print(f"  {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        row = dict.fromkeys(FIELDS)
        row.update(model=name, device=device, precision=precision, batch_size=batch_size,
                   error=f"{type(e).__name__}: {e}")
    row["baseline"] = is_baseline
    row["model_kwargs"] = " ".join(getattr(args, "baseline_kwargs", []) if is_baseline else args.model_kwargs)
    return row


def _ratio_stats(pairs: list[tuple[dict, dict]]) -> dict:
    """Throughput ratios row / reference over ``pairs``, per step: median, min, max and count (> 1: faster)."""
    import statistics

    out = {}
    for step in ("infer", "train"):
        key = f"{step}_samples_per_sec"
        ratios = [row[key] / ref[key] for row, ref in pairs if row.get(key) and ref.get(key)]
        if ratios:
            out[step] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios), n=len(ratios))
    return out


def speed_ratios(rows: list[dict], precisions: list[str]) -> list[dict]:
    """Relative speeds from one interleaved run: each precision over the first one (per model), and each of our
    models over each timm baseline (per precision); a ratio pairs two rows of the same round."""
    rows = [r for r in rows if not r.get("error")]

    def find(model, baseline, rnd, precision):
        return next((r for r in rows if (r["model"], r["baseline"], r.get("round", 0), r["precision"])
                     == (model, baseline, rnd, precision)), None)

    out = []
    models = list(dict.fromkeys((r["model"], r["baseline"]) for r in rows))
    for model, baseline in models:
        for precision in precisions[1:]:
            pairs = [(r, find(model, baseline, r.get("round", 0), precisions[0])) for r in rows
                     if (r["model"], r["baseline"], r["precision"]) == (model, baseline, precision)]
            out.append(dict(model=model, of=precision, over=precisions[0],
                            **_ratio_stats([(a, b) for a, b in pairs if b])))
    for model, _ in [m for m in models if not m[1]]:
        for base, _ in [m for m in models if m[1]]:
            for precision in precisions:
                pairs = [(r, find(base, True, r.get("round", 0), precision)) for r in rows
                         if (r["model"], r["baseline"], r["precision"]) == (model, False, precision)]
                out.append(dict(model=model, of=precision, over=f"{base} (timm), {precision}",
                                **_ratio_stats([(a, b) for a, b in pairs if b])))
    return out


def format_ratio_table(rows: list[dict], precisions: list[str]) -> str:
    """The relative speeds of :func:`speed_ratios`, median (min-max) over the rounds, as a markdown table."""
    def cell(stat):
        return "" if not stat else f"{stat['median']:.2f}x ({stat['min']:.2f}-{stat['max']:.2f}, {stat['n']} rounds)"

    body = [[e["model"], f"{e['of']} over {e['over']}", cell(e.get("infer")), cell(e.get("train"))]
            for e in speed_ratios(rows, precisions)]
    return "\n" + markdown_table(["model", "speed", "inference", "train step"], body) if body else ""
