"""Process set-up: torchrun / SLURM environment detection and the few collectives the engine needs (nanoGPT / timm
style), and the CPU heap policy of every `visionzoo` command (:func:`keep_freed_heap`)."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_env() -> None:
    """Under ``srun`` without torchrun, derive torch's variables from SLURM's (as mmengine's slurm launcher does):
    rank = SLURM_PROCID, world = SLURM_NTASKS, local rank = SLURM_LOCALID, the master the first node of
    SLURM_NODELIST (``scontrol show hostnames``), the port MASTER_PORT or 29500."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    if "MASTER_ADDR" not in os.environ:
        import subprocess

        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodes.split(",")[0]  # a single plain host name
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])


def resolve_device(device: str | None = None) -> torch.device:
    """``auto``/None: CUDA when available, else CPU; a CUDA device asked for on a machine without one is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                        f"use --device cpu or auto.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}).")
    return dev


def init_distributed(device: str | None = None) -> DistInfo:
    """torchrun (RANK / WORLD_SIZE / LOCAL_RANK, one or many nodes) or SLURM's srun; nccl on CUDA, gloo on CPU."""
    _slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (the object itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_heap() -> bool:
    """Keep freed CPU memory in the process instead of handing it back to the system after every step (glibc).

    By default glibc maps large tensors with their own mmap and trims the heap when its free top grows, so every
    step's activations are unmapped on free and page-faulted (and zeroed) back on the next step: at batch 8 that was
    about 40% of a coc_tiny bf16 forward here (docs/benchmarks.md, "The CPU heap"). Tensors up to 32 MiB (glibc's
    largest mmap threshold) then come from the heap, which is never trimmed: the process keeps its peak, as
    PyTorch's CUDA caching allocator does on GPUs (jemalloc / tcmalloc, the usual advice for PyTorch on CPUs, do
    the same). ``VISIONZOO_KEEP_HEAP=0`` keeps glibc's defaults. Returns whether the policy is in force."""
    if os.environ.get("VISIONZOO_KEEP_HEAP", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): another allocator, left as it is
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
