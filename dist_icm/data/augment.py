"""Per-sample augmentation whose randomness depends only on (seed, epoch, index).

Each ``__getitem__`` draws from its own generator, the ``augment`` stream keyed by (seed, epoch,
i) (:mod:`dist_icm.streams`), never from torch's global RNG or torchvision's random transforms.
A sample therefore gets the same crop and flip on any rank and in any DataLoader worker, so a
run on P processes sees exactly the global batches of a run on one.

``cifar_rot15`` (the augmentation of the paper's published code: crop with padding 4, flip, a
rotation by an angle uniform in [-15, 15) degrees, nearest neighbour, zero fill) draws its four
numbers from :func:`paper_draws`, a splitmix64 hash of (the ``augment`` stream's tag, seed,
epoch, i) that :mod:`.ffcv_ops` computes in its numba kernel too: the torch and FFCV loaders
draw the same crop, flip and angle for a sample.

Epochs and DataLoader workers: :meth:`Augmented.set_epoch` stores the epoch as an attribute.
Workers receive a copy of the data set when the loader's iterator is created, so call
``set_epoch`` *before* ``iter(loader)`` each epoch and keep ``persistent_workers=False`` (the
default of :func:`dist_icm.data.sampler.make_loader`); persistent workers would keep a stale epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dist_icm import streams

__all__ = ["AUGMENT_MODES", "Augmented", "normalize_only", "paper_draws", "paper_stats"]

AUGMENT_MODES = ("cifar", "cifar_rot15", "imagenet", "none")
MAX_ANGLE = 15.0  # cifar_rot15: degrees either way (torchvision's RandomRotation(15))
# the paper code's normalisation of 10-class CIFAR (kuangliu's std); its CIFAR-100 statistics
# are this project's CIFAR100_MEAN/STD (datasets.py)
PAPER_CIFAR10_MEAN, PAPER_CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64), as ffcv_ops._mix does in numba."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def paper_draws(seed: int, epoch: int, index: int, pad: int = 4) -> tuple[int, int, bool, float]:
    """cifar_rot15's draws for sample ``index`` of ``epoch``: (top, left) offsets of the crop in
    [-pad, pad], the horizontal flip, and the angle in degrees, uniform in [-15, 15).

    The same integer arithmetic as the FFCV kernel (:func:`dist_icm.data.ffcv_ops._rot_draws`),
    keyed like the ``augment`` stream: both loaders draw the same numbers.
    """
    if min(seed, epoch, index, pad) < 0:
        raise ValueError(f"seed, epoch, index and pad must be >= 0, got {seed, epoch, index, pad}")
    tag = streams.STREAMS["augment"][0]
    key = _mix(_mix((tag + 0x9E3779B97F4A7C15) & _M64) ^ int(seed))
    key = _mix(key ^ int(epoch))
    r = _mix(key ^ _mix((int(index) + 0x632BE59BD9B4E019) & _M64))
    span = 2 * pad + 1
    top, left, flip = r % span - pad, (r >> 16) % span - pad, bool((r >> 32) & 1)
    r2 = _mix(r ^ 0xD1B54A32D192ED03)
    angle = ((r2 >> 11) * 2.0**-53) * (2 * MAX_ANGLE) - MAX_ANGLE
    return int(top), int(left), flip, float(angle)


def paper_stats(name: str, mean: Sequence[float], std: Sequence[float]):
    """The normalisation ``cifar_rot15`` uses: the paper code's statistics for 10-class CIFAR
    (cifar10, cifair10), the data set's own (``mean``, ``std``) for anything else."""
    if name in ("cifar10", "cifair10"):
        return PAPER_CIFAR10_MEAN, PAPER_CIFAR10_STD
    return tuple(mean), tuple(std)


def _crop_at(image: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """The crop at offset (top, left) of the zero-extended image, of the input size."""
    h, w = image.shape[-2:]
    out = torch.zeros_like(image)
    ys, xs = slice(max(0, -top), min(h, h - top)), slice(max(0, -left), min(w, w - left))
    src_y, src_x = slice(ys.start + top, ys.stop + top), slice(xs.start + left, xs.stop + left)
    out[:, ys, xs] = image[:, src_y, src_x]
    return out


def rotate(image: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotation by ``angle`` degrees (counter-clockwise) about the centre, nearest neighbour,
    zero fill: torchvision's ``functional.rotate`` (what RandomRotation applies)."""
    from torchvision.transforms.functional import InterpolationMode
    from torchvision.transforms.functional import rotate as tv_rotate

    return tv_rotate(image, angle, interpolation=InterpolationMode.NEAREST)


def _random_crop(image: torch.Tensor, rng: np.random.Generator, pad: int) -> torch.Tensor:
    """Crop of the input size from the image zero-padded by ``pad`` on every side."""
    if pad == 0:
        return image
    h, w = image.shape[-2:]
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    padded = F.pad(image, (pad, pad, pad, pad))
    return padded[:, top : top + h, left : left + w]


def _resized_crop_box(
    h: int, w: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop picks them, from ``rng``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    # fallback: the central crop with the aspect ratio clamped into range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _random_resized_crop(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random resized crop (scale (0.08, 1), ratio (3/4, 4/3)) back to the input size."""
    h, w = image.shape[-2:]
    top, left, ch, cw = _resized_crop_box(h, w, rng, (0.08, 1.0), (3 / 4, 4 / 3))
    crop = image[None, :, top : top + ch, left : left + cw]
    out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


class _Normalized(Dataset):
    """Shared plumbing: wrap ``base``, forward ``.targets``, normalise with mean/std."""

    def __init__(self, base: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.base = base
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @property
    def targets(self) -> list[int] | torch.Tensor:
        """The base data set's labels (augmentation never changes them)."""
        return self.base.targets  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        return ((image.float() - self.mean) / self.std).contiguous()


class Augmented(_Normalized):
    """Training augmentation of ``base`` (a data set yielding (CHW float in [0, 1], label)).

    ``mode``: ``"cifar"`` (random crop after zero padding by ``pad``, horizontal flip p=0.5),
    ``"cifar_rot15"`` (the same, then a rotation uniform in [-15, 15) degrees; drawn by
    :func:`paper_draws`, the same draws as the FFCV loader's),
    ``"imagenet"`` (random resized crop to the input size, scale (0.08, 1), ratio (3/4, 4/3),
    horizontal flip p=0.5) or ``"none"`` (normalise only). Item ``i`` of epoch ``e`` is drawn
    from ``streams.rng("augment", seed, e, i)``; ``i`` is the index into this wrapper.
    """

    def __init__(
        self,
        base: Dataset,
        *,
        mode: str,
        seed: int,
        mean: Sequence[float],
        std: Sequence[float],
        pad: int = 4,
    ) -> None:
        if mode not in AUGMENT_MODES:
            raise ValueError(f"unknown augmentation mode '{mode}': choose one of {AUGMENT_MODES}")
        if pad < 0 or seed < 0:
            raise ValueError(f"pad and seed must be non-negative, got pad={pad}, seed={seed}")
        super().__init__(base, mean, std)
        self.mode, self.seed, self.pad = mode, int(seed), int(pad)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation; call before creating the DataLoader iterator."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if i < 0:
            i += len(self)
        image, label = self.base[i]
        if self.mode == "cifar_rot15":
            top, left, flip, angle = paper_draws(self.seed, self.epoch, i, self.pad)
            image = _crop_at(image, top, left)
            image = rotate(image.flip(-1) if flip else image, angle)
        elif self.mode != "none":
            rng = streams.rng("augment", self.seed, self.epoch, i)
            if self.mode == "cifar":
                image = _random_crop(image, rng, self.pad)
            else:
                image = _random_resized_crop(image, rng)
            if rng.random() < 0.5:
                image = image.flip(-1)
        return self._normalize(image), int(label)


class _NormalizeOnly(_Normalized):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self._normalize(image), int(label)


def normalize_only(base: Dataset, mean: Sequence[float], std: Sequence[float]) -> Dataset:
    """``base`` with normalisation only (for test sets); forwards ``.targets``."""
    return _NormalizeOnly(base, mean, std)
