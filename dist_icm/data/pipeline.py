"""From the ``data`` config to this rank's loaders: data set, subset, augmentation, sampling.

The training sampler hands out *micro-global* batches (one accumulation micro-step across all
ranks; rank r takes its contiguous slice), so the ICM score matrix of micro-step m is the same
set of samples on any world size. The test set is split into contiguous, disjoint shards (one
per rank, sizes may differ by one); the ranks add up their metric sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from dist_icm.data.augment import Augmented, normalize_only
from dist_icm.data.datasets import DatasetSpec, build_datasets
from dist_icm.data.sampler import GlobalBatchSampler, make_loader
from dist_icm.data.subsets import class_counts, labeled_subset, long_tailed, stratified_fraction


@dataclass
class DataBundle:
    train: Augmented
    sampler: GlobalBatchSampler
    loader: DataLoader
    test_loader: DataLoader
    spec: DatasetSpec
    class_counts: torch.Tensor  # of the (sub-sampled) training set, for Remix
    train_size: int


def augment_mode(requested: str, spec: DatasetSpec) -> str:
    """``auto``: the paper's crop+flip for 32-pixel data, random resized crop above, none below."""
    if requested != "auto":
        return requested
    if spec.image_size == 32:
        return "cifar"
    return "imagenet" if spec.image_size > 32 else "none"


def build_data(
    data_cfg,
    *,
    seed: int,
    micro_global: int,
    rank: int,
    world_size: int,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
):
    """Data sets, subset, loaders; raises DataError / ValueError on bad input.

    ``device`` and ``channels_last`` are used by ``data.loader=ffcv`` only, whose pipeline ends
    with the transfer to the device; the torch path leaves that to the trainer.
    """
    train, test, spec = build_datasets(
        data_cfg.name, data_cfg.root, download=data_cfg.download, seed=seed
    )
    # --- data.loader=ffcv (dist_icm/data/ffcv_loader.py): same sampler, subsets and bundle ---
    if data_cfg.loader == "ffcv":
        from dist_icm.data.ffcv_loader import build_ffcv_data  # DataError without ffcv

        return build_ffcv_data(
            data_cfg,
            train,
            test,
            spec,
            seed=seed,
            micro_global=micro_global,
            rank=rank,
            world_size=world_size,
            device=device,
            channels_last=channels_last,
        )
    # --- end of the ffcv branch ---
    if data_cfg.fraction < 1:
        train = labeled_subset(train, stratified_fraction(train.targets, data_cfg.fraction, seed))
    if data_cfg.long_tail is not None:
        train = labeled_subset(train, long_tailed(train.targets, data_cfg.long_tail, seed))
    counts = torch.as_tensor(class_counts(train.targets, spec.num_classes))
    mode = augment_mode(data_cfg.augment, spec)
    train_aug = Augmented(train, mode=mode, seed=seed, mean=spec.mean, std=spec.std)
    sampler = GlobalBatchSampler(
        len(train_aug), micro_global, rank=rank, world_size=world_size, seed=seed
    )
    loader = make_loader(train_aug, sampler, num_workers=data_cfg.num_workers)
    test_loader = DataLoader(
        _shard(normalize_only(test, spec.mean, spec.std), rank, world_size),
        batch_size=data_cfg.eval_batch,
        num_workers=data_cfg.num_workers,
    )
    return DataBundle(train_aug, sampler, loader, test_loader, spec, counts, len(train_aug))


def _shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    n = len(dataset)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    return torch.utils.data.Subset(dataset, range(lo, hi))
