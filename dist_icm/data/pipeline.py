"""From the ``data`` config to this rank's loaders: data set, subset, augmentation, sampling.

The training sampler hands out *micro-global* batches (one accumulation micro-step across all
ranks; rank r takes its contiguous slice), so the ICM score matrix of micro-step m is the same
set of samples on any world size. The test set is split into contiguous, disjoint shards (one
per rank, sizes may differ by one); the ranks add up their metric sums.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from dist_icm import preempt
from dist_icm.data.augment import Augmented, normalize_only
from dist_icm.data.bundle import (
    DataBundle,
    augment_mode,
    normalization,
    test_shard,
    train_indices,
    train_sampler,
)
from dist_icm.data.datasets import build_datasets
from dist_icm.data.sampler import make_loader
from dist_icm.data.subsets import as_labels, class_counts, labeled_subset


def build_data(
    data_cfg,
    *,
    seed: int,
    micro_global: int,
    grad_accum: int = 1,
    rank: int,
    world_size: int,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> DataBundle:
    """Data sets, subset, loaders; raises DataError / ValueError on bad input.

    ``data.loader=ffcv``'s pipeline ends with the transfer to ``device`` (and ``channels_last``);
    the torch path leaves that to the trainer and, for a CUDA ``device``, pins its batches.
    """
    train, test, spec = build_datasets(
        data_cfg.name, data_cfg.root, download=data_cfg.download, seed=seed
    )
    if data_cfg.loader == "ffcv":
        from dist_icm.data.ffcv_loader import build_ffcv_data  # DataError without ffcv

        return build_ffcv_data(
            data_cfg,
            train,
            test,
            spec,
            seed=seed,
            micro_global=micro_global,
            grad_accum=grad_accum,
            rank=rank,
            world_size=world_size,
            device=device,
            channels_last=channels_last,
        )
    labels = as_labels(train.targets)
    keep = train_indices(
        labels, fraction=data_cfg.fraction, long_tail=data_cfg.long_tail, seed=seed
    )
    if len(keep) < len(labels):
        train = labeled_subset(train, keep)
    counts = torch.as_tensor(class_counts(labels[keep], spec.num_classes))
    mode = augment_mode(data_cfg.augment, spec)
    mean, std = normalization(data_cfg.name, data_cfg.augment, spec)  # as ffcv_loader's
    train_aug = Augmented(train, mode=mode, seed=seed, mean=mean, std=std)
    sampler = train_sampler(
        data_cfg,
        len(train_aug),
        micro_global=micro_global,
        grad_accum=grad_accum,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    # pinned batches on CUDA: the trainer's non-blocking copy then overlaps the running step
    pin = torch.device(device).type == "cuda"
    loader = make_loader(train_aug, sampler, num_workers=data_cfg.num_workers, pin_memory=pin)
    shard = test_shard(len(test), rank, world_size)
    test_loader = DataLoader(
        Subset(normalize_only(test, mean, std), shard),
        batch_size=data_cfg.eval_batch,
        num_workers=data_cfg.num_workers,
        worker_init_fn=preempt.quiet_worker,
    )
    return DataBundle(
        train_aug, sampler, loader, test_loader, spec, counts, len(train_aug), len(test)
    )
