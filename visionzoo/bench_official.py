"""`visionzoo benchmark --suite official`: each family's published configurations on the given device, in fp32 and
bf16, eager and compiled, with img/s, peak memory, GMACs, achieved TFLOP/s and MFU next to the published figures.

The rows (``OFFICIAL_SUITE``): the CoC README throughput rows (tiny, small, medium), the GA paper's Table 3 rows
(GA-ResNet50, GA-ViT-S, GA-ConvNeXt-T/S/B) and the plain backbones that table compares them with, GPViT L1-L4, the
UDI ViT-S/16 pretraining step (2 global + 10 local crops, 65536-d head, AdamW, per-tensor clipping, teacher EMA)
and GCR ResNet50-D k=8 (its Riemannian step). Each is timed by :func:`visionzoo.bench.benchmark_model` (or, for
UDI, the method step in the same timing loop), so the numbers mean what `visionzoo benchmark` rows mean.

Achieved TFLOP/s = 2 x MACs per image x img/s: the forward's MACs for inference, the counted forward + backward of
one train step (``bench.count_train_gmacs``) for training. MFU = achieved / the GPU's dense peak for the precision
(``PEAK_TFLOPS``: bf16 on tensor cores; fp32 on CUDA cores, which TF32 convolutions can exceed).

``smoke=True`` swaps every model for its family's tiny test model (and the UDI step for the 32-px CPU recipe's), so
the whole suite runs end to end on a CPU in seconds: tests/test_bench.py runs it.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from . import bench
from .errors import UserError

# dense peak TFLOP/s (no sparsity) from NVIDIA's datasheets: (substring of torch.cuda.get_device_name, bf16 tensor
# core, fp32 CUDA core). First match wins, so the more specific names come first. None: no bf16 tensor cores.
PEAK_TFLOPS: tuple[tuple[str, float | None, float], ...] = (
    ("H200 NVL", 835.0, 60.0),
    ("H200", 989.0, 67.0),          # H200 SXM
    ("H100 NVL", 835.0, 60.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),          # H100 SXM
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),          # SXM and PCIe, 40 and 80 GB
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),      # GeForce: bf16 with fp32 accumulate
    ("RTX 6000 Ada", 364.2, 91.1),
    ("V100", None, 15.7),
    ("T4", None, 8.1),
)

# suite variant -> (bench precision, torch.compile mode or None)
VARIANTS = {"fp32": ("float32", None), "bf16": ("amp_bfloat16", None),
            "fp32+compile": ("float32", "default"), "bf16+compile": ("amp_bfloat16", "default")}

SUITE_FIELDS = (
    "config", "family", "model", "variant", "device", "gpu", "batch_size", "img_size",
    "infer_samples_per_sec", "train_samples_per_sec", "published_samples_per_sec", "published_source",
    "infer_peak_mem_mb", "train_peak_mem_mb", "model_mem_mb", "memory", "param_count", "gmacs", "train_gmacs",
    "infer_first_step_ms", "train_first_step_ms",  # compiled variants: the compile time is in the first step
    "infer_tflops", "train_tflops", "peak_tflops", "infer_mfu", "train_mfu",
    "torch", "timm", "visionzoo", "date", "float32_matmul_precision", "error",
)


@dataclass(frozen=True)
class OfficialConfig:
    """One published configuration. ``kind``: ``model`` (inference + train step of a registered model) or
    ``udi_step`` (the UDI pretraining step of ``recipe``). ``published`` img/s, where the source gives one."""
    name: str
    family: str
    model: str
    smoke_model: str
    kind: str = "model"
    published: float | None = None
    source: str = ""
    opt: str = "sgd"
    recipe: str | None = None
    smoke_recipe: str | None = None
    batch_size: int = 256
    model_kwargs: dict = field(default_factory=dict)


_COC = "CoC README (setting not stated)"
_GA = "GA paper Table 3 (setting not stated)"
OFFICIAL_SUITE: tuple[OfficialConfig, ...] = (
    OfficialConfig("coc_tiny", "CoC", "coc_tiny", "coc_test", published=518.4, source=_COC),
    OfficialConfig("coc_small", "CoC", "coc_small", "coc_test", published=513.0, source=_COC),
    OfficialConfig("coc_medium", "CoC", "coc_medium", "coc_test", published=325.2, source=_COC),
    OfficialConfig("ga_resnet50", "GA", "ga_resnet50", "ga_test", published=2145, source=_GA),
    OfficialConfig("ga_vit_small", "GA", "ga_vit_small", "ga_test", published=2289, source=_GA),
    OfficialConfig("ga_convnext_tiny", "GA", "ga_convnext_tiny", "ga_test", published=1452, source=_GA),
    OfficialConfig("ga_convnext_small", "GA", "ga_convnext_small", "ga_test", published=967, source=_GA),
    OfficialConfig("ga_convnext_base", "GA", "ga_convnext_base", "ga_test", published=668, source=_GA),
    # the backbones of GA Table 3 (timm models): their ratio to the published rows calibrates the GPU
    OfficialConfig("resnet50 (RSB)", "GA baseline", "resnet50", "resnet10t", published=3409, source=_GA),
    OfficialConfig("vit_small", "GA baseline", "vit_small_patch16_224", "test_vit", published=2556, source=_GA),
    OfficialConfig("convnext_tiny", "GA baseline", "convnext_tiny", "test_convnext", published=2098, source=_GA),
    OfficialConfig("convnext_small", "GA baseline", "convnext_small", "test_convnext", published=1282, source=_GA),
    OfficialConfig("convnext_base", "GA baseline", "convnext_base", "test_convnext", published=903, source=_GA),
    OfficialConfig("gpvit_l1", "GPViT", "gpvit_l1", "gpvit_test"),
    OfficialConfig("gpvit_l2", "GPViT", "gpvit_l2", "gpvit_test"),
    OfficialConfig("gpvit_l3", "GPViT", "gpvit_l3", "gpvit_test"),
    OfficialConfig("gpvit_l4", "GPViT", "gpvit_l4", "gpvit_test"),
    OfficialConfig("udi_vit_small pretrain step", "UDI", "udi_vit_small_patch16", "udi_vit_test", kind="udi_step",
                   recipe="udi/pretrain_vit_small_300ep", smoke_recipe="udi/pretrain_vit_test_cpu", batch_size=128),
    OfficialConfig("resnet50d_gcr8", "GCR", "resnet50d_gcr8", "gcr_test", opt="gcr_sgd"),
)


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The dense peak of ``device`` for ``precision`` (bench names), or None (a CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in name:
            return bf16 if precision == "amp_bfloat16" else fp32
    return None


def select(patterns: list[str] | None) -> list[OfficialConfig]:
    """The suite's configurations whose name or model matches one of ``patterns`` (fnmatch; all when empty)."""
    if not patterns:
        return list(OFFICIAL_SUITE)
    out = [c for c in OFFICIAL_SUITE if any(fnmatch.fnmatch(c.name, p) or fnmatch.fnmatch(c.model, p)
                                            for p in patterns)]
    if not out:
        names = ", ".join(c.name for c in OFFICIAL_SUITE)
        raise UserError(f"No configuration of the official suite matches {' '.join(patterns)}. They are: {names}.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the UDI pretraining step

def _udi_batch(cfg, patch: int, batch_size: int, seed: int = 0):
    """One collated multi-crop batch, made by the method's own augmentation from random images."""
    import random

    import numpy as np
    from PIL import Image

    from .ssl.udi.augment import UDIAugmentation

    aug = UDIAugmentation.from_config(cfg, patch)
    rng, side = np.random.default_rng(seed), cfg.global_size * 5 // 4
    items = [aug(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), random.Random(seed + i),
                 torch.Generator().manual_seed(seed + i)) for i in range(batch_size)]
    return torch.utils.data.default_collate(items)


def benchmark_udi_step(recipe: str, device="cpu", batch_size: int = 128, img_size: int | None = None,
                       precision: str = "float32", torchcompile: str | None = None, num_warm_iter: int = 10,
                       num_bench_iter: int = 40, retry_oom: bool = True) -> dict[str, Any]:
    """The UDI pretraining step of ``recipe`` (student + teacher forward, loss, backward, per-tensor clipping, AdamW,
    teacher EMA) on one synthetic multi-crop batch; one "sample" = one image's 2 + n_l crops. ``img_size`` rescales
    the global crops (local crops keep the recipe's ratio)."""
    from .ssl.udi import UDIConfig, build_udi, param_groups
    from .ssl.udi.meta_arch import clip_gradients_per_tensor

    device = torch.device(device)
    cfg = UDIConfig.from_yaml(recipe)
    if img_size and img_size != cfg.global_size:
        import timm

        with torch.device("meta"):  # the patch size, without building weights
            patch = timm.create_model(cfg.model).patch_embed.patch_size[0]
        local = max(patch * 2, round(img_size * cfg.local_size / cfg.global_size / patch) * patch)
        cfg = UDIConfig.from_yaml(recipe, global_size=img_size, local_size=local)
    udi = build_udi(cfg, device)
    patch = udi.student.backbone.patch_embed.patch_size[0]
    autocast = bench.autocast_factory(precision, device)
    runner = torch.compile(udi, backend="inductor", mode=torchcompile) if torchcompile else udi
    optimizer = torch.optim.AdamW(param_groups(udi.student), lr=1e-4)
    student_params = [p for p in udi.student.parameters() if p.requires_grad]

    def to_device(batch):
        crops, src, tgt = batch
        return ([c.to(device) for c in crops], ([m.to(device) for m in src], [m.to(device) for m in tgt]))

    def run_at(b):
        crops, maps = to_device(_udi_batch(cfg, patch, b))

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = runner(crops, maps, 0)
            loss.backward()
            if cfg.clip_grad:
                clip_gradients_per_tensor(student_params, cfg.clip_grad)
            optimizer.step()
            udi.update_teacher(cfg.momentum_teacher)

        return bench._time_loop(step, device, num_warm_iter, num_bench_iter, b)

    def one_step_gmacs():
        crops, maps = to_device(_udi_batch(cfg, patch, 2))
        gmacs = bench.count_gmacs_of(lambda: udi(crops, maps, 0)[0].backward()) / 2
        udi.zero_grad(set_to_none=True)
        return gmacs

    train_gmacs = one_step_gmacs()
    backbone_gmacs = bench.count_gmacs(udi.teacher.backbone, (3, cfg.global_size, cfg.global_size))
    res, b = bench._run_with_retry(run_at, batch_size, retry_oom, f"{cfg.model} UDI step", device)
    params = sum(p.numel() for p in udi.student.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in list(udi.parameters()) + list(udi.buffers()))
    return dict(model=cfg.model, train_samples_per_sec=res["samples_per_sec"], train_step_time_ms=res["step_time_ms"],
                train_batch_size=b, train_peak_mem_mb=res["peak_mem_mb"], memory=res["memory"],
                train_first_step_ms=res["first_step_ms"], model_mem_mb=round(model_bytes / bench._MiB, 1), param_count=round(params / 1e6, 2),
                gmacs=float(f"{backbone_gmacs:.4g}"), train_gmacs=float(f"{train_gmacs:.4g}"),
                img_size=cfg.global_size)


# ----------------------------------------------------------------------------------------------------------------
# the suite

def _tflops(gmacs, img_s):
    return None if not gmacs or not img_s else float(f"{2 * gmacs * img_s / 1e3:.4g}")


def run_config(c: OfficialConfig, variant: str, device: torch.device, batch_size: int | None = None,
               img_size: int | None = None, num_warm_iter: int = 10, num_bench_iter: int = 40,
               smoke: bool = False) -> dict[str, Any]:
    """One row of the suite (keys ``SUITE_FIELDS``)."""
    import datetime

    import timm

    import visionzoo

    precision, compile_mode = VARIANTS[variant]
    batch = batch_size or c.batch_size
    common = dict(device=device, batch_size=batch, img_size=img_size, precision=precision, torchcompile=compile_mode,
                  num_warm_iter=num_warm_iter, num_bench_iter=num_bench_iter)
    if c.kind == "udi_step":
        r = benchmark_udi_step(c.smoke_recipe if smoke else c.recipe, **common)
    else:
        model = c.smoke_model if smoke else c.model
        r = bench.benchmark_model(model, opt=c.opt, model_kwargs=c.model_kwargs, train_gmacs=True, **common)
    peak = peak_tflops(device, precision)
    row: dict[str, Any] = dict.fromkeys(SUITE_FIELDS)
    row.update({k: r.get(k) for k in SUITE_FIELDS if k in r})
    row.update(
        config=c.name, family=c.family, variant=variant, device=str(device), batch_size=batch,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        published_samples_per_sec=c.published, published_source=c.source,
        infer_tflops=_tflops(row["gmacs"], row["infer_samples_per_sec"]),
        train_tflops=_tflops(row["train_gmacs"], row["train_samples_per_sec"]), peak_tflops=peak,
        torch=torch.__version__, timm=timm.__version__, visionzoo=visionzoo.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        float32_matmul_precision=torch.get_float32_matmul_precision(), error="",
    )
    for mode in ("infer", "train"):
        achieved = row[f"{mode}_tflops"]
        row[f"{mode}_mfu"] = round(achieved / peak, 4) if achieved and peak else None
    return row


def format_suite_table(rows: list[dict]) -> str:
    cols = [("config", "config"), ("variant", "variant"), ("batch_size", "batch"), ("img_size", "img"),
            ("infer_samples_per_sec", "infer img/s"), ("train_samples_per_sec", "train img/s"),
            ("published_samples_per_sec", "published img/s"), ("infer_peak_mem_mb", "infer peak MiB"),
            ("train_peak_mem_mb", "train peak MiB"), ("gmacs", "GMACs"), ("train_gmacs", "train GMACs"),
            ("infer_tflops", "infer TFLOP/s"), ("train_tflops", "train TFLOP/s"), ("infer_mfu", "infer MFU"),
            ("train_mfu", "train MFU"), ("train_first_step_ms", "train 1st step ms")]

    def cell(row, key):
        v = row.get(key)
        if key == "config" and row.get("error"):
            return f"{v} (failed)"
        if key.endswith("_mfu") and v is not None:
            return f"{100 * v:.1f}%"
        return "" if v is None else str(v)

    return bench.markdown_table([t for _, t in cols], [[cell(r, k) for k, _ in cols] for r in rows])


def run_suite(device="cpu", variants=tuple(VARIANTS), patterns=None, batch_size=None, img_size=None,
              num_warm_iter: int = 10, num_bench_iter: int = 40, smoke: bool = False, results_file=None,
              log=sys.stderr) -> tuple[list[dict], int]:
    """Every selected configuration x variant; returns (rows, number failed). A failing row (an out-of-memory
    even at batch 1, a compile error) is recorded with its error and the suite goes on."""
    device = torch.device(device)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"Unknown suite variant {' '.join(unknown)}: use {', '.join(VARIANTS)}.")
    rows, failed = [], 0
    for c in select(patterns):
        for variant in variants:
            print(f"official suite: {c.name} [{variant}] ...", file=log, flush=True)
            try:
                row = run_config(c, variant, device, batch_size, img_size, num_warm_iter, num_bench_iter, smoke)
            except Exception as e:  # noqa: BLE001  (one failure must not lose the other rows)
                failed += 1
                print(f"  {c.name} [{variant}] failed: {type(e).__name__}: {e}", file=log)
                row = dict.fromkeys(SUITE_FIELDS)
                row.update(config=c.name, family=c.family, model=c.model, variant=variant, device=str(device),
                           published_samples_per_sec=c.published, published_source=c.source,
                           error=f"{type(e).__name__}: {e}")
            rows.append(row)
            if results_file:
                bench.write_rows(results_file, [row], SUITE_FIELDS)
    return rows, failed


def run(args: argparse.Namespace) -> int:
    """`visionzoo benchmark --suite official`: the selected rows (``--model`` patterns; all without) as one table."""
    patterns = bench.model_patterns(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    smoke = dict(batch_size=2, img_size=32, num_warm_iter=0, num_bench_iter=1) if args.smoke else {}
    given = dict(batch_size=args.batch_size, img_size=args.img_size)
    settings = dict(smoke, **{k: v for k, v in given.items() if v is not None})
    if not args.smoke:  # the suite's own batch sizes unless -b; timm's step counts unless given
        settings.update(num_warm_iter=args.num_warm_iter, num_bench_iter=args.num_bench_iter)
    rows, failed = run_suite(device, args.variants, patterns, smoke=args.smoke, results_file=args.results_file,
                             **settings)
    print(format_suite_table(rows))
    if args.results_file:
        print(f"results appended to {args.results_file}", file=sys.stderr)
    return 1 if failed else 0
