"""Subset selection, the imagenet random resized crop, Augmented indexing and sampler edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import resized_crop

from dist_icm import streams
from dist_icm.data import (
    Augmented,
    GlobalBatchSampler,
    TensorImageDataset,
    class_counts,
    long_tailed,
    stratified_fraction,
)
from dist_icm.data.augment import _resized_crop_box
from dist_icm.data.subsets import as_labels

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)

# ---------------------------------------------------------------- subsets


def test_long_tailed_scales_from_the_largest_class_not_class_0() -> None:
    # without it n_max would be class 0's size and a small class 0 would shrink every other class
    labels = np.repeat([0, 1, 2], [100, 500, 500])
    counts = class_counts(labels[long_tailed(labels, 0.1, seed=0)], 3)
    assert counts.tolist() == [100, int(np.floor(500 * 0.1**0.5)), 50] == [100, 158, 50]


def test_long_tailed_keeps_at_least_one_per_class() -> None:
    # without it a class whose profile floors to 0 would vanish from the data set
    labels = np.repeat([0, 1, 2], 500)
    counts = class_counts(labels[long_tailed(labels, 0.001, seed=0)], 3)
    assert counts.tolist() == [500, 15, 1]


def test_long_tailed_rounding_epsilon() -> None:
    # without it 100 * 0.29 = 28.999999999999996 would floor to 28
    labels = np.repeat([0, 1], 100)
    assert class_counts(labels[long_tailed(labels, 0.29, 0)], 2).tolist() == [100, 29]


def test_long_tailed_draws_from_its_own_stream() -> None:
    # without it long_tailed would share the "fraction" stream and correlate with other subsets
    labels = np.repeat([0, 1, 2], 50)
    rng = streams.rng("long_tail", 5)
    want = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in enumerate([50, 35, 25])
    ]
    assert np.array_equal(long_tailed(labels, 0.5, 5), np.sort(np.concatenate(want)))


def test_stratified_fraction_golden_indices() -> None:
    # without it a non-stable argsort would reorder ties and change the subset of a seed
    labels = np.random.default_rng(0).integers(0, 5, 2000)
    idx = stratified_fraction(labels, 0.5, 3)
    assert idx[:10].tolist() == [0, 1, 3, 4, 5, 6, 8, 12, 13, 16]


def test_label_range_checks() -> None:
    # without it label == num_classes (bincount grows) or a negative label would pass silently
    with pytest.raises(ValueError, match="out of range for num_classes=2"):
        class_counts([0, 1, 2], 2)
    assert class_counts([0, 1, 1], 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="non-negative"):
        as_labels([-1, 0])


# ---------------------------------------------------------------- imagenet resized crop


def test_resized_crop_box_statistics() -> None:
    # without it the crop would lose small scales, tilt its aspect, or fall back to the centre
    boxes = [
        _resized_crop_box(224, 224, np.random.default_rng(s), SCALE, RATIO) for s in range(2000)
    ]
    area = np.array([ch * cw for _, _, ch, cw in boxes]) / 224**2
    assert area.min() >= 0.08 and area.max() <= 1.0
    assert (area < 0.2).mean() > 0.08  # 15% here; none with the scale floored at 0.25
    log_aspect = np.array([math.log(cw / ch) for _, _, ch, cw in boxes])
    assert abs(log_aspect.mean()) < 0.012  # 0.001 here; 0.028 for an aspect uniform in ratio
    small = [_resized_crop_box(32, 32, np.random.default_rng(s), SCALE, RATIO) for s in range(2000)]
    assert np.mean([b == (0, 0, 32, 32) for b in small]) < 0.02  # 0.2% here; 11% with one try


def test_imagenet_sample_matches_torchvision_resized_crop() -> None:
    # the crop box, resize and flip are torchvision's RandomResizedCrop + flip on the same draws
    # (crops are only ever enlarged here, where antialias changes nothing but float rounding)
    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.rand(4, 3, 64, 64, generator=g), torch.arange(4))
    aug = Augmented(data, mode="imagenet", seed=1, mean=(0.0,) * 3, std=(1.0,) * 3)
    for i in range(len(aug)):
        rng = streams.rng("augment", 1, 0, i)
        top, left, ch, cw = _resized_crop_box(64, 64, rng, SCALE, RATIO)
        want = resized_crop(data[i][0], top, left, ch, cw, [64, 64], antialias=True).clamp(0, 1)
        if rng.random() < 0.5:
            want = want.flip(-1)
        torch.testing.assert_close(aug[i][0], want, rtol=0, atol=1e-6)


def test_augmented_negative_index() -> None:
    # without it aug[-1] would draw its augmentation from the key -1, not from its real index
    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.rand(5, 3, 16, 16, generator=g), torch.arange(5))
    for mode in ("cifar", "imagenet"):
        aug = Augmented(data, mode=mode, seed=3, mean=MEAN, std=STD)
        assert torch.equal(aug[-1][0], aug[len(aug) - 1][0]) and aug[-1][1] == 4


# ---------------------------------------------------------------- sampler


def test_sampler_global_batch_equal_to_data_set() -> None:
    # without it a global batch of exactly the data set's size would be rejected
    batches = list(GlobalBatchSampler(8, 8, seed=0))
    assert len(batches) == 1 and sorted(batches[0]) == list(range(8))
