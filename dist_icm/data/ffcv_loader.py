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
- Augmentation: ``cifar`` = crop after zero padding by 4 + horizontal flip; ``imagenet`` = ffcv's
  random-resized-crop decoder (numba's unseeded generator) + flip. Crops and flips are drawn from
  a hash of (seed, epoch, sample index): independent of ranks and threads, like the torch path
  (whose draws differ).
- Output: float32 NCHW normalised images (``channels_last`` strides on request) and int64 labels
  of shape (n,), fresh tensors moved to ``device`` by the pipeline's last op (RGB as uint8).
- Quirk: importing or iterating ffcv sets torch's thread count; this module restores it.
"""

from __future__ import annotations

from dist_icm.data.write import require_ffcv

require_ffcv()

import queue  # noqa: E402
from dataclasses import replace  # noqa: E402

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
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.transforms import ToTensor, ToTorchImage  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

from dist_icm import dist  # noqa: E402
from dist_icm.data.datasets import DataError, DatasetSpec  # noqa: E402
from dist_icm.data.pipeline import DataBundle, augment_mode  # noqa: E402
from dist_icm.data.sampler import GlobalBatchSampler  # noqa: E402
from dist_icm.data.subsets import class_counts, long_tailed, stratified_fraction  # noqa: E402
from dist_icm.data.write import BetonSet, WriteOptions, check_beton, ensure_betons  # noqa: E402

__all__ = ["AugmentState", "FFCVLoader", "build_ffcv_data", "pipelines"]


@numba.njit(inline="always")
def _mix(x):  # splitmix64's finaliser on uint64
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(parallel=True, nogil=True, cache=True)
def _crop_flip(images, out, indices, seed, epoch, pad):  # pragma: no cover (numba)
    n, h, w, c = images.shape
    span = np.uint64(2 * pad + 1)
    key = _mix(_mix(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(epoch))
    for i in numba.prange(n):
        r = _mix(key ^ _mix(np.uint64(indices[i]) + np.uint64(0x632BE59BD9B4E019)))
        top = np.int64(r % span) - pad
        left = np.int64((r >> np.uint64(16)) % span) - pad
        flip = (r >> np.uint64(32)) & np.uint64(1)
        for y in range(h):
            sy = y + top
            for x in range(w):
                sx = (w - 1 - x if flip else x) + left
                if 0 <= sy < h and 0 <= sx < w:
                    for k in range(c):
                        out[i, y, x, k] = images[i, sy, sx, k]
                else:
                    for k in range(c):
                        out[i, y, x, k] = 0
    return out


class AugmentState:
    """``bundle.train`` of the FFCV path: holds the augmentation epoch and the labels."""

    def __init__(self, seed: int, targets: np.ndarray) -> None:
        self.seed, self.epoch, self.targets = int(seed), 0, torch.from_numpy(targets)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's crops and flips; call before iterating the loader."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.targets)


class _CropFlip(Operation):
    """Seeded crop (zero padding ``pad``) and horizontal flip of HWC uint8 images."""

    def __init__(self, state: AugmentState, pad: int) -> None:
        super().__init__()
        self.state, self.pad = state, int(pad)

    def generate_code(self):
        state, pad = self.state, self.pad

        def crop_flip(images, dst, indices):  # runs in Python, calls the compiled kernel
            return _crop_flip(images, dst[: len(images)], indices, state.seed, state.epoch, pad)

        crop_flip.with_indices = True
        return crop_flip

    def declare_state_and_memory(self, previous_state):
        query = AllocationQuery(previous_state.shape, previous_state.dtype)
        return replace(previous_state, jit_mode=False), query


class _ToDevice(Operation):
    """Last op: to ``device``, float32 (scaled, normalised images) or int64 (n,) labels."""

    def __init__(self, device, mean=None, std=None, scale=1.0, channels_last=False) -> None:
        super().__init__()
        self.device, self.channels_last = torch.device(device), channels_last
        self.mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1) * scale
        self.std = None if std is None else torch.tensor(std).view(1, -1, 1, 1) * scale
        cuda = self.device.type == "cuda"
        self.consumer = torch.cuda.current_stream(self.device) if cuda else None

    def generate_code(self):
        dev, mean, std, last = self.device, self.mean, self.std, self.channels_last
        if mean is not None:
            mean, std = mean.to(dev), std.to(dev)

        def to_device(inp, _):
            x = inp.to(dev, non_blocking=True)
            if mean is None:
                out = x.reshape(-1).to(torch.int64, copy=True)
            else:
                out = torch.sub(x.float(), mean).div_(std)
                fmt = torch.channels_last if last else torch.contiguous_format
                out = out.contiguous(memory_format=fmt)
            if out.is_cuda:  # allocated on ffcv's side stream, used on the consumer's
                out.record_stream(self.consumer)
            return out

        return to_device

    def declare_state_and_memory(self, previous_state):
        dtype = torch.int64 if self.mean is None else torch.float32
        return replace(previous_state, jit_mode=False, device=self.device, dtype=dtype), None


def pipelines(
    betons: BetonSet, mode: str, state: AugmentState | None, device, channels_last: bool = False
) -> dict:
    """Per-field FFCV pipelines; ``state`` None (or ``mode`` none) means no augmentation."""
    spec: DatasetSpec = betons.spec
    s, scale = spec.image_size, 1.0 if betons.kind == "ndarray" else 255.0
    last = _ToDevice(device, spec.mean, spec.std, scale, channels_last)
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
        if state is not None and mode != "none":
            image.append(_CropFlip(state, 4 if mode == "cifar" else 0))
        image += [ToTensor(), ToTorchImage(channels_last=True, convert_back_int16=False), last]
    return {"image": image, "label": [IntDecoder(), ToTensor(), _ToDevice(device)]}


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
    rank: int,
    world_size: int,
    device="cpu",
    channels_last: bool = False,
) -> DataBundle:
    """The FFCV :class:`~dist_icm.data.pipeline.DataBundle` (writes the .betons if needed).

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
    subset = np.arange(len(labels))
    if data_cfg.fraction < 1:
        subset = subset[stratified_fraction(labels[subset], data_cfg.fraction, seed)]
    if data_cfg.long_tail is not None:
        subset = subset[long_tailed(labels[subset], data_cfg.long_tail, seed)]
    state = AugmentState(seed, labels[subset])
    sampler = GlobalBatchSampler(
        len(subset), micro_global, rank=rank, world_size=world_size, seed=seed
    )
    nb_threads = numba.config.NUMBA_NUM_THREADS
    threads = max(1, min(data_cfg.num_workers or nb_threads, nb_threads))

    def loader(path, batch: int, mode: str, state, **kw) -> FFCVLoader:
        return FFCVLoader(
            threads,
            fname=str(path),
            batch_size=batch,
            seed=seed,
            os_cache=data_cfg.ffcv_os_cache,
            batches_ahead=3,
            pipelines=pipelines(betons, mode, state, device, channels_last),
            **kw,
        )

    mode = augment_mode(data_cfg.augment, spec)
    train_loader = loader(
        betons.train,
        sampler.local_batch,
        mode,
        state,
        drop_last=True,
        order=_Replay(sampler, subset),
        distributed=world_size > 1,
    )
    lo, hi = n_test * rank // world_size, n_test * (rank + 1) // world_size
    test_loader = loader(
        betons.test,
        data_cfg.eval_batch,
        "none",
        None,
        drop_last=False,
        order=OrderOption.SEQUENTIAL,
        indices=np.arange(lo, hi),
    )
    counts = torch.as_tensor(class_counts(labels[subset], spec.num_classes))
    return DataBundle(state, sampler, train_loader, test_loader, spec, counts, len(subset))
