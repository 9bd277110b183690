"""FFCV pipeline operations of ``data.loader=ffcv``: the seeded augmentations and the device step.

- :class:`CropFlip`: crop after zero padding by ``pad`` and a horizontal flip of HWC uint8
  images, drawn from a splitmix64 hash of (the ``augment`` stream's tag, seed, epoch, sample
  index) in a numba kernel: independent of ranks and threads, like the torch path's
  ``augment`` stream (the two paths draw different crops: different generators).
- :class:`RotCropFlip`: ``data.augment=cifar_rot15``, the paper code's crop (padding 4), flip
  and rotation (uniform in [-15, 15] degrees, nearest neighbour, zero fill) in one numba pass.
  Its draws are :func:`dist_icm.data.augment.paper_draws`' (the same hash, here in numba) and its
  rotation samples like torchvision's ``functional.rotate``: the torch path draws the same.
- :class:`ToDevice`: the last op of a pipeline; float32 normalised NCHW images or int64 (n,)
  labels on the device, fresh tensors (``channels_last`` strides on request).

Imported only where ffcv is importable (:mod:`.ffcv_loader` checks first).
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
import torch
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation

from dist_icm.data.augment import MAX_ANGLE
from dist_icm.streams import STREAMS

__all__ = ["AugmentState", "CropFlip", "RotCropFlip", "ToDevice"]

TAG = STREAMS["augment"][0]  # the hash is keyed like the torch path's ``augment`` stream


@numba.njit(inline="always")
def _mix(x):  # splitmix64's finaliser on uint64
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(parallel=True, nogil=True, cache=True)
def _crop_flip(images, out, indices, tag, seed, epoch, pad):  # pragma: no cover (numba)
    n, h, w, c = images.shape
    span = np.uint64(2 * pad + 1)
    key = _mix(_mix(np.uint64(tag) + np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(seed))
    key = _mix(key ^ np.uint64(epoch))
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


@numba.njit(nogil=True, cache=True)
def _rot_draws(tag, seed, epoch, index, pad):  # pragma: no cover (numba)
    """augment.paper_draws in numba: (top, left, flip, angle in degrees)."""
    key = _mix(_mix(np.uint64(tag) + np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(seed))
    key = _mix(key ^ np.uint64(epoch))
    r = _mix(key ^ _mix(np.uint64(index) + np.uint64(0x632BE59BD9B4E019)))
    span = np.uint64(2 * pad + 1)
    top = np.int64(r % span) - pad
    left = np.int64((r >> np.uint64(16)) % span) - pad
    flip = np.int64((r >> np.uint64(32)) & np.uint64(1))
    r2 = _mix(r ^ np.uint64(0xD1B54A32D192ED03))
    angle = np.float64(r2 >> np.uint64(11)) * 2.0**-53 * (2 * MAX_ANGLE) - MAX_ANGLE
    return top, left, flip, angle


@numba.njit(parallel=True, nogil=True, cache=True)
def _rot_crop_flip(images, out, indices, tag, seed, epoch, pad):  # pragma: no cover (numba)
    n, h, w, c = images.shape
    cy, cx = (h - 1) * 0.5, (w - 1) * 0.5
    for i in numba.prange(n):
        top, left, flip, angle = _rot_draws(tag, seed, epoch, indices[i], pad)
        a = angle * np.pi / 180.0
        cos, sin = np.cos(a), np.sin(a)
        for y in range(h):
            yc = y - cy
            for x in range(w):
                xc = x - cx
                # the pixel of the cropped, flipped image that lands here (torchvision's inverse
                # map: rotate by -angle about the centre, nearest, half to even)
                ry = np.int64(np.rint(sin * xc + cos * yc + cy))
                rx = np.int64(np.rint(cos * xc - sin * yc + cx))
                inside = 0 <= ry < h and 0 <= rx < w
                sy = ry + top
                sx = (w - 1 - rx if flip else rx) + left
                if inside and 0 <= sy < h and 0 <= sx < w:
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


class CropFlip(Operation):
    """Seeded crop (zero padding ``pad``) and horizontal flip of HWC uint8 images."""

    kernel = staticmethod(_crop_flip)  # numba: (images, out, indices, tag, seed, epoch, pad)

    def __init__(self, state: AugmentState, pad: int) -> None:
        super().__init__()
        self.state, self.pad = state, int(pad)

    def generate_code(self):
        state, pad, kernel = self.state, self.pad, self.kernel

        def augment(images, dst, indices):  # runs in Python, calls the compiled kernel
            return kernel(images, dst[: len(images)], indices, TAG, state.seed, state.epoch, pad)

        augment.with_indices = True
        return augment

    def declare_state_and_memory(self, previous_state):
        query = AllocationQuery(previous_state.shape, previous_state.dtype)
        return replace(previous_state, jit_mode=False), query


class RotCropFlip(CropFlip):
    """``cifar_rot15`` on HWC uint8 images: crop (zero padding ``pad``), flip and rotation by
    the per-sample draws of :func:`dist_icm.data.augment.paper_draws`."""

    kernel = staticmethod(_rot_crop_flip)

    def __init__(self, state: AugmentState, pad: int = 4) -> None:
        super().__init__(state, pad)


class ToDevice(Operation):
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
