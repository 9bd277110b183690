"""Batch sampling in which the *global* batch is the invariant.

Each epoch is one permutation of the data set (the ``sampler`` stream keyed by (seed, epoch)) cut
into consecutive global batches; rank ``r`` of ``P`` takes the contiguous slice
``[r * n, (r + 1) * n)`` of every global batch, ``n = global_batch // P``. Concatenating the
ranks' slices in rank order gives exactly the batches of a single-process run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_icm import preempt, streams

__all__ = ["GlobalBatchSampler", "make_loader"]


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share (a list of data set indices) of each global batch.

    With ``drop_last=True`` the incomplete last global batch is dropped and every sample appears
    at most once per epoch. With ``drop_last=False`` the epoch is padded by wrapping around to the
    start of its permutation, to whole optimizer steps of ``step_batches`` global batches each
    (the micro-batches of gradient accumulation), so every rank gets equally many equal-sized
    batches and no sample is left out; the padding samples then appear twice in that epoch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        step_batches: int = 1,
    ) -> None:
        if world_size < 1 or global_batch < 1:
            raise ValueError(
                f"need world_size >= 1 and global_batch >= 1, got {world_size}, {global_batch}"
            )
        if step_batches < 1:
            raise ValueError(f"step_batches must be >= 1, got {step_batches}")
        if global_batch % world_size != 0:
            raise ValueError(
                f"global_batch {global_batch} is not divisible by world_size {world_size}"
            )
        if global_batch > num_samples:
            raise ValueError(f"global_batch {global_batch} exceeds the {num_samples} samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch = self.global_batch // self.world_size
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.step_batches = int(step_batches)
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in a full epoch (regardless of the start batch)."""
        if self.drop_last:
            return self.num_samples // self.global_batch
        per_step = self.global_batch * self.step_batches
        return -(-self.num_samples // per_step) * self.step_batches  # ceil, in whole steps

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its permutation), from its first batch; call before iterating, on
        every rank alike."""
        self.epoch, self.start_batch = int(epoch), 0

    def set_start_batch(self, k: int) -> None:
        """Skip the first ``k`` global batches of the current epoch when resuming mid-epoch.

        It holds for every iteration until the next :meth:`set_epoch`: a DataLoader with worker
        processes iterates its sampler twice as it starts (torch 2.14), and a skip used up by the
        first pass trained the epoch's first batches again on resume. ``len`` counts from it.
        """
        if not 0 <= k <= self.batches_per_epoch:
            raise ValueError(f"start batch {k} is outside [0, {self.batches_per_epoch}]")
        self.start_batch = int(k)

    def global_order(self) -> np.ndarray:
        """The epoch's indices in order, padded (drop_last=False) or cut to whole batches."""
        if self.shuffle:
            order = streams.rng("sampler", self.seed, self.epoch).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        total = self.batches_per_epoch * self.global_batch
        return np.resize(order, total)  # cut, or wrapped around (as often as a step needs)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_order().reshape(-1, self.global_batch)[self.start_batch :]
        local = batches[:, self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        return iter(local.tolist())

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def make_loader(
    dataset: Dataset, sampler: GlobalBatchSampler, *, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader driven by ``sampler`` (default collation, non-persistent workers that leave
    the stop signals to the trainer: :func:`dist_icm.preempt.quiet_worker`).

    Per epoch call ``sampler.set_epoch(e)`` and, for :class:`~dist_icm.data.augment.Augmented`
    data, ``dataset.set_epoch(e)`` before iterating the loader.
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=preempt.quiet_worker,
    )
