"""Per-sample augmentation whose randomness depends only on (seed, epoch, index).

Each ``__getitem__`` draws from its own generator, the ``augment`` stream keyed by (seed, epoch,
i) (:mod:`dist_icm.streams`), never from torch's global RNG or torchvision's random transforms.
A sample therefore gets the same crop and flip on any rank and in any DataLoader worker, so a
run on P processes sees exactly the global batches of a run on one.

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

__all__ = ["AUGMENT_MODES", "Augmented", "normalize_only"]

AUGMENT_MODES = ("cifar", "imagenet", "none")


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
        if self.mode != "none":
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
