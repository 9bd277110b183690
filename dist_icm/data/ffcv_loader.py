"""FFCV loaders for ``data.loader=ffcv``: the torch path's batches, read from cached ``.beton``s.

Imported by :func:`dist_icm.data.pipeline.build_data` only for that loader; without ffcv the
import raises the one-line :class:`~dist_icm.data.datasets.DataError` that says how to install it.

- Order: ffcv's ``Loader`` replays :class:`~dist_icm.data.sampler.GlobalBatchSampler` (the very
  ``bundle.sampler``), so global batches, the drop-last epoch, per-epoch seeding, the per-device
  batch and ``set_start_batch`` (skipped batches are never read) are those of the torch path.
  Under several processes it runs with ``distributed=True`` and checks that ``torch.distributed``
  is initialised with the sampler's rank and world size. ffcv's own distributed orders are not
  used: they wrap ``DistributedSampler(drop_last=False)``, which interleaves the ranks and pads
  the epoch with repeated samples.
- Augmentation: ``cifar`` = :class:`~dist_icm.data.ffcv_ops.CropFlip` (seeded per sample,
  independent of ranks and threads); ``cifar_rot15`` =
  :class:`~dist_icm.data.ffcv_ops.RotCropFlip` (the torch path's draws, normalised with
  :func:`~dist_icm.data.augment.paper_stats`); ``imagenet`` = ffcv's random-resized-crop
  decoder (numba's unseeded generator) + flip. Training indices and test shards come from
  :mod:`dist_icm.data.bundle`, as on the torch path.
- Output: float32 NCHW normalised images and int64 labels of shape (n,) on ``device``
  (:class:`~dist_icm.data.ffcv_ops.ToDevice`).
- Quirk: importing or iterating ffcv sets torch's thread count; this module restores it.
"""

from __future__ import annotations

from dist_icm.data.write import require_ffcv

require_ffcv()

import queue  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.ndarray import NDArrayDecoder  # noqa: E402
from ffcv.fields.rgb_image import (  # noqa: E402
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import ToTensor, ToTorchImage  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

from dist_icm import dist  # noqa: E402
from dist_icm.data.bundle import (  # noqa: E402
    DataBundle,
    augment_mode,
    normalization,
    test_shard,
    train_indices,
    train_sampler,
)
from dist_icm.data.datasets import DataError, DatasetSpec  # noqa: E402
from dist_icm.data.ffcv_ops import AugmentState, CropFlip, RotCropFlip, ToDevice  # noqa: E402
from dist_icm.data.sampler import GlobalBatchSampler  # noqa: E402
from dist_icm.data.subsets import class_counts  # noqa: E402
from dist_icm.data.write import BetonSet, WriteOptions, ensure_betons  # noqa: E402

__all__ = ["AugmentState", "FFCVLoader", "build_ffcv_data", "check_beton", "pipelines"]


def check_beton(
    path: Path, *, kind: str, num_classes: int, size: int | None = None, all_classes: bool = False
) -> np.ndarray:
    """Validate a ``.beton`` and return its labels; raises :class:`DataError` when it is
    truncated or corrupt (or not ``size`` bytes), has other fields than ``kind`` needs, has
    labels outside ``[0, num_classes)`` or (``all_classes``) lacks some of the classes."""
    fix = "delete it (or its cache folder) so that it is written again"
    if not path.is_file():
        raise DataError(f".beton {path} is missing: {fix}")
    actual = path.stat().st_size
    try:
        reader = Reader(str(path))
        table_at, table = int(reader.header["alloc_table_ptr"]), reader.alloc_table
        ends = (table["ptr"] + table["size"]).max() if len(table) else 0
        complete = len(reader.metadata) == reader.num_samples and ends <= table_at
        complete = complete and table_at + table.nbytes == actual and size in (None, actual)
    except Exception as e:  # short header, bad version, unreadable field descriptors...
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise DataError(f".beton {path} is truncated or corrupt ({reason}): {fix}") from e
    if not complete:
        raise DataError(f".beton {path} is truncated or corrupt ({actual} bytes): {fix}")
    fields = {f: type(h).__name__ for f, h in reader.handlers.items()}
    want = {"image": "RGBImageField" if kind == "rgb" else "NDArrayField", "label": "IntField"}
    if fields != want:
        raise DataError(f".beton {path} has fields {fields} but the config needs {want}: {fix}")
    labels = np.asarray(reader.metadata["f1"], dtype=np.int64)
    found = len(np.unique(labels))
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f".beton {path} has labels {labels.min()}..{labels.max()} but the data set has "
            f"{num_classes} classes: {fix}"
        )
    if all_classes and found != num_classes:
        raise DataError(f".beton {path} holds {found} of the {num_classes} classes: {fix}")
    return labels


def pipelines(
    betons: BetonSet,
    mode: str,
    state: AugmentState | None,
    device,
    channels_last: bool = False,
    stats: tuple | None = None,
) -> dict:
    """Per-field FFCV pipelines; ``state`` None (or ``mode`` none) means no augmentation;
    ``stats``: (mean, std) to normalise with instead of the spec's."""
    spec: DatasetSpec = betons.spec
    s, scale = spec.image_size, 1.0 if betons.kind == "ndarray" else 255.0
    mean, std = stats or (spec.mean, spec.std)
    last = ToDevice(device, mean, std, scale, channels_last)
    if betons.kind == "ndarray":
        if state is not None and mode != "none":
            raise DataError(
                f"data.augment={mode} is not supported for {spec.in_channels}-channel "
                "data with data.loader=ffcv: use data.augment=none"
            )
        image = [NDArrayDecoder(), ToTensor(), last]
    else:
        if state is not None and mode == "imagenet":
            decoder = RandomResizedCropRGBImageDecoder((s, s))
        else:
            decoder = SimpleRGBImageDecoder() if betons.fixed_size else None
            decoder = decoder or CenterCropRGBImageDecoder((s, s), ratio=1.0)
        image = [decoder]
        if state is not None and mode == "cifar_rot15":
            image.append(RotCropFlip(state, 4))
        elif state is not None and mode != "none":
            image.append(CropFlip(state, 4 if mode == "cifar" else 0))
        image += [ToTensor(), ToTorchImage(channels_last=True, convert_back_int16=False), last]
    return {"image": image, "label": [IntDecoder(), ToTensor(), ToDevice(device)]}


class _Replay(TraversalOrder):
    """Order replaying ``sampler`` (its indices map through ``subset`` to .beton indices).

    ffcv's Loader takes an order instance and calls it with itself: ``__call__`` checks the
    process group when the Loader is distributed and returns the order.
    """

    def __init__(self, sampler: GlobalBatchSampler, subset: np.ndarray) -> None:
        self.sampler, self.subset = sampler, subset  # no super(): it wants the loader

    def __call__(self, loader: Loader) -> _Replay:
        if loader.distributed:
            group = dist.default_group()
            if group is None:
                raise DataError(
                    "data.loader=ffcv on several processes needs torch.distributed "
                    "initialised first (start with accelerate launch or torchrun)"
                )
            if (dist.rank(group), dist.size(group)) != (self.sampler.rank, self.sampler.world_size):
                raise DataError("the sampler's rank/world size differ from torch.distributed's")
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        """ffcv's epoch counter is ignored: ``bundle.sampler.set_epoch`` chooses the epoch."""
        return self.subset[np.asarray(list(self.sampler), dtype=np.int64).reshape(-1)]


class FFCVLoader:
    """An ffcv ``Loader`` that yields ``(images, labels)`` and leaves torch's threads alone."""

    def __init__(self, threads: int, **kwargs) -> None:
        before = torch.get_num_threads()
        self.loader = Loader(num_workers=threads, **kwargs)
        torch.set_num_threads(before)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        before = torch.get_num_threads()
        epoch = iter(self.loader)
        try:
            first = next(epoch, None)  # ffcv's thread has set the thread counts by now
            torch.set_num_threads(before)
            if first is not None:
                yield first
                yield from epoch
        finally:  # also when abandoned mid-epoch: stop ffcv's thread before the next loader
            epoch.terminate_event.set()
            while epoch.is_alive():
                try:
                    epoch.output_queue.get_nowait()
                except queue.Empty:
                    epoch.join(0.05)
            epoch.close()


def build_ffcv_data(
    data_cfg,
    train,
    test,
    spec: DatasetSpec,
    *,
    seed: int,
    micro_global: int,
    grad_accum: int = 1,
    rank: int,
    world_size: int,
    device="cpu",
    channels_last: bool = False,
) -> DataBundle:
    """The FFCV :class:`~dist_icm.data.bundle.DataBundle` (writes the .betons if needed).

    ``bundle.sampler`` is the torch path's sampler (ffcv replays it), ``bundle.train`` an
    :class:`AugmentState`; subsets select indices of the full training .beton at load time.
    """
    options = WriteOptions(data_cfg.ffcv_write_mode, data_cfg.ffcv_max_side, data_cfg.ffcv_quality)
    betons = ensure_betons(
        train,
        test,
        spec,
        name=data_cfg.name,
        root=data_cfg.root,
        seed=seed,
        options=options,
        cache=data_cfg.ffcv_cache,
        workers=data_cfg.num_workers,
    )
    kind, sizes, n = betons.kind, betons.meta["bytes"], spec.num_classes
    labels = check_beton(
        betons.train, kind=kind, num_classes=n, size=sizes["train"], all_classes=True
    )
    n_test = len(check_beton(betons.test, kind=kind, num_classes=n, size=sizes["test"]))
    subset = train_indices(
        labels, fraction=data_cfg.fraction, long_tail=data_cfg.long_tail, seed=seed
    )
    state = AugmentState(seed, labels[subset])
    sampler = train_sampler(
        data_cfg,
        len(subset),
        micro_global=micro_global,
        grad_accum=grad_accum,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    nb_threads = numba.config.NUMBA_NUM_THREADS
    threads = max(1, min(data_cfg.num_workers or nb_threads, nb_threads))

    mode = augment_mode(data_cfg.augment, spec)
    stats = normalization(data_cfg.name, data_cfg.augment, spec)  # as the torch path's

    def loader(path, batch: int, mode: str, state, **kw) -> FFCVLoader:
        return FFCVLoader(
            threads,
            fname=str(path),
            batch_size=batch,
            seed=seed,
            os_cache=data_cfg.ffcv_os_cache,
            batches_ahead=3,
            pipelines=pipelines(betons, mode, state, device, channels_last, stats),
            **kw,
        )

    train_loader = loader(
        betons.train,
        sampler.local_batch,
        mode,
        state,
        drop_last=True,
        order=_Replay(sampler, subset),
        distributed=world_size > 1,
    )
    test_loader = loader(
        betons.test,
        data_cfg.eval_batch,
        "none",
        None,
        drop_last=False,
        order=OrderOption.SEQUENTIAL,
        indices=np.asarray(test_shard(n_test, rank, world_size), dtype=np.int64),
    )
    counts = torch.as_tensor(class_counts(labels[subset], spec.num_classes))
    return DataBundle(state, sampler, train_loader, test_loader, spec, counts, len(subset), n_test)
