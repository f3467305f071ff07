"""Seeded, resumable data order for every task.

A run's data are a pure function of (seed, epoch, index): the order of an epoch comes from a permutation seeded by
(seed, epoch), and each item's augmentation from RNGs seeded by (seed, epoch, index) just before it is built. The
step's own randomness (dropout, drop path, mixup, RoI sampling) is seeded from (seed, rank, step). So a run stopped
anywhere and resumed, with any number of data-loader workers, ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import UserError


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def seed_model_init(seed: int) -> None:
    """The RNG state a run's model is built in: the loop calls it before ``task.build_model``, and a task calls it
    to rebuild the untrained model a run started from (a learning check's baseline)."""
    seed_everything(mix_seed(seed, 11))


class SeededDataset(Dataset):
    """Seeds Python's, numpy's and torch's RNGs from (seed, epoch, index) before each item is built."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_everything(mix_seed(self.seed, self.epoch, index))
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

    def order(self) -> torch.Tensor:
        """This rank's indices of the whole epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        return order[self.rank:: self.world_size][: self.per_rank]

    def __iter__(self):
        return iter(self.order()[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def group_batches(groups, batch_size: int, world_size: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches that each come from one group (e.g. mmdet's aspect flag ``width / height > 1``), as mmdet's
    (Distributed)GroupSampler builds them: every group shuffled and padded by wrap-around to whole global batches,
    cut into batches, the batches shuffled, rank r taking the r-th contiguous share."""
    rng = np.random.default_rng([seed, epoch, 7])
    glob = batch_size * world_size
    groups = np.asarray(groups)
    chunks = []
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        members = np.resize(members, math.ceil(len(members) / glob) * glob)
        chunks.append(members.reshape(-1, batch_size))
    chunks = np.concatenate(chunks)[rng.permutation(sum(len(c) for c in chunks))]
    share = len(chunks) // world_size
    return [[int(i) for i in b] for b in chunks[rank * share:(rank + 1) * share]]


class EpochBatches:
    """The batch sampler of the loop: this rank's batches of one epoch, from batch ``start`` on.

    ``mode`` ``drop`` (default): a seeded permutation (with repeated augmentation when ``repeats`` > 1), the tail
    that does not fill a batch on every rank dropped. ``pad``: wrapped around to whole global batches so every item
    is seen (DistributedSampler). ``groups``: one group per batch (aspect-ratio grouping, see ``group_batches``).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 repeats: int = 0, mode: str = "drop", groups=None):
        if mode not in ("drop", "pad"):
            raise UserError(f"unknown sampling mode {mode!r}: use drop or pad")
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.mode, self.groups = mode, (None if groups is None or len(set(groups)) < 2 else list(groups))
        self.sampler = ResumableSampler(size, True, seed, rank, world_size, repeats)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        b = self.batch_size
        if self.groups is not None:
            return group_batches(self.groups, b, self.world_size, self.rank, self.seed, epoch)
        if self.mode == "pad":
            rng = np.random.default_rng([self.seed, epoch, 7])
            glob = b * self.world_size
            order = np.resize(rng.permutation(self.size), math.ceil(self.size / glob) * glob)
            return [[int(i) for i in row] for row in order.reshape(-1, self.world_size, b)[:, self.rank]]
        self.sampler.set_epoch(epoch)
        order = self.sampler.order().tolist()
        return [order[i:i + b] for i in range(0, len(order) - b + 1, b)]

    def __len__(self) -> int:
        return max(len(self.epoch_batches(self.epoch)) - self.start, 0)

    def __iter__(self):
        return iter(self.epoch_batches(self.epoch)[self.start:])
