"""What both loaders share: the bundle they hand the trainer, and the indices they read.

The data package reads as data sets (:mod:`.datasets`) -> indices (here) -> sampler
(:mod:`.sampler`) -> loader (:mod:`.pipeline` for torch, :mod:`.ffcv_loader` for FFCV). Both
loaders take their training indices from :func:`train_indices` (``data.fraction`` then
``data.long_tail``, seeded) and their test shard from :func:`test_shard`, so the two paths read
the same samples by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dist_icm.data.augment import paper_stats
from dist_icm.data.datasets import DataError, DatasetSpec
from dist_icm.data.sampler import GlobalBatchSampler
from dist_icm.data.subsets import long_tailed, stratified_fraction

__all__ = [
    "DataBundle",
    "augment_mode",
    "check_same_data",
    "fingerprint",
    "normalization",
    "test_shard",
    "train_indices",
]


@dataclass
class DataBundle:
    """This rank's data, whichever loader reads it."""

    train: Any  # has set_epoch(epoch) and len(): the torch Augmented set or FFCV's AugmentState
    sampler: GlobalBatchSampler
    loader: Any  # iterable of (images, labels) batches of this rank's share
    test_loader: Any  # iterable of (images, labels) over this rank's test shard
    spec: DatasetSpec
    class_counts: torch.Tensor  # of the (sub-sampled) training set, for Remix
    train_size: int
    test_size: int  # the whole test set's, of which test_loader reads this rank's shard


def fingerprint(data: DataBundle) -> tuple:
    """What every rank's copy of the data must agree on (ranks on several nodes may each read
    their own copy): the sizes, the classes, and the training set's count per class."""
    s = data.spec
    counts = tuple(int(c) for c in data.class_counts.tolist())
    return (data.train_size, data.test_size, s.num_classes, s.image_size, s.in_channels, counts)


def check_same_data(prints: list[tuple]) -> None:
    """Raise a :class:`DataError` naming the first rank whose :func:`fingerprint` (``prints``,
    in rank order) is not rank 0's: their steps per epoch, test shards or classes would differ,
    and the run hang or stop in a collective, or report metrics on no one data set."""
    for rank, mine in enumerate(prints):
        if mine != prints[0]:
            raise DataError(
                f"rank {rank} reads other data than rank 0 ({_shape(mine)}, against "
                f"{_shape(prints[0])}): every rank's data.root must hold the same data set"
            )


def _shape(p: tuple) -> str:
    train, test, classes, size, channels, counts = p
    return (
        f"{train} training and {test} test images, {classes} classes, {size} px x {channels}, "
        f"{counts[:4]}{'...' if len(counts) > 4 else ''} images a class"
    )


def augment_mode(requested: str, spec: DatasetSpec) -> str:
    """``auto``: crop+flip (``cifar``) for 32-pixel data, random resized crop above, none below."""
    if requested != "auto":
        return requested
    if spec.image_size == 32:
        return "cifar"
    return "imagenet" if spec.image_size > 32 else "none"


def normalization(name: str, requested: str, spec: DatasetSpec) -> tuple[tuple, tuple]:
    """The (mean, std) both loaders normalise train and test images of data set ``name`` with
    under ``data.augment=requested``: the data set's own, except that ``cifar_rot15`` takes the
    paper code's (:func:`~dist_icm.data.augment.paper_stats`)."""
    if augment_mode(requested, spec) == "cifar_rot15":
        return paper_stats(name, spec.mean, spec.std)
    return tuple(spec.mean), tuple(spec.std)


def train_indices(
    labels: np.ndarray, *, fraction: float, long_tail: float | None, seed: int
) -> np.ndarray:
    """Sorted indices of the training samples kept: a stratified ``fraction``, then the
    long-tailed profile ``long_tail`` of what is left (each seeded, see :mod:`.subsets`)."""
    keep = np.arange(len(labels))
    if fraction < 1:
        keep = keep[stratified_fraction(labels[keep], fraction, seed)]
    if long_tail is not None:
        keep = keep[long_tailed(labels[keep], long_tail, seed)]
    return keep


def check_batch(micro_global: int, train_size: int) -> None:
    """Raise a one-line :class:`DataError` when one micro-step's global batch exceeds the
    training samples kept (the sampler would refuse it with its own words)."""
    if micro_global > train_size:
        raise DataError(
            f"data.global_batch: a micro-step's global batch of {micro_global} exceeds the "
            f"{train_size} training samples (after data.fraction and data.long_tail): lower "
            "data.global_batch (or raise runtime.grad_accum)"
        )


def train_sampler(
    data_cfg,
    size: int,
    *,
    micro_global: int,
    grad_accum: int,
    rank: int,
    world_size: int,
    seed: int,
) -> GlobalBatchSampler:
    """Both loaders' sampler of the ``size`` training samples kept: micro-global batches
    (checked against ``size`` first), this rank's slice of each, and the epoch's short last step
    dropped or padded (``data.drop_last``)."""
    check_batch(micro_global, size)
    return GlobalBatchSampler(
        size,
        micro_global,
        rank=rank,
        world_size=world_size,
        seed=seed,
        drop_last=data_cfg.drop_last,
        step_batches=grad_accum,
    )


def test_shard(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous, disjoint slice of ``n`` test samples (sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return range(n * rank // world_size, n * (rank + 1) // world_size)
