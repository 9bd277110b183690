"""data.augment=cifar_rot15, the published code's augmentation: crop (padding 4), flip and a
rotation uniform in [-15, 15] degrees, drawn per (seed, epoch, sample), the same in the torch and
FFCV loaders; normalised with the code's statistics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import InterpolationMode
from torchvision.transforms.functional import rotate as tv_rotate

from dist_icm.config import DataConfig
from dist_icm.data import TensorImageDataset, build_datasets
from dist_icm.data.augment import (
    PAPER_CIFAR10_MEAN,
    PAPER_CIFAR10_STD,
    Augmented,
    paper_draws,
    paper_stats,
)
from dist_icm.data.datasets import DataError
from dist_icm.data.pipeline import build_data

ID = dict(mean=(0.0,) * 3, std=(1.0,) * 3)  # no normalisation: compare pixel values


@pytest.fixture(scope="module")
def real32(cifar10_jpeg_root) -> TensorImageDataset:
    """40 real CIFAR-10 training images (4 per class) as uint8, from the JPEG tree."""
    train, _, _ = build_datasets("imagefolder", str(cifar10_jpeg_root))
    labels = np.asarray(train.targets)
    keep = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(10)])
    images = torch.stack([(train[int(i)][0] * 255).round().to(torch.uint8) for i in keep])
    return TensorImageDataset(images, torch.as_tensor(labels[keep]))


def test_draws_are_deterministic_bounded_and_vary_by_sample_epoch_and_seed():
    draws = [paper_draws(0, 0, i) for i in range(2000)]
    assert draws == [paper_draws(0, 0, i) for i in range(2000)]
    tops, lefts, flips, angles = map(np.asarray, zip(*draws, strict=True))
    assert set(tops) == set(lefts) == set(range(-4, 5))
    assert 0.45 < flips.mean() < 0.55
    assert angles.min() >= -15 and angles.max() < 15
    assert angles.min() < -14.5 and angles.max() > 14.5 and abs(angles.mean()) < 0.5
    assert len(set(angles)) == 2000  # a different angle for every sample
    for other in (
        [paper_draws(0, 1, i) for i in range(2000)],
        [paper_draws(1, 0, i) for i in range(2000)],
    ):
        assert sum(a[3] == b[3] for a, b in zip(draws, other, strict=True)) == 0


def test_the_rotation_is_torchvisions_at_the_drawn_angle(real32):
    aug = Augmented(real32, mode="cifar_rot15", seed=5, **ID)
    for epoch in (0, 3):
        aug.set_epoch(epoch)
        for i in range(len(real32)):
            top, left, flip, angle = paper_draws(5, epoch, i)
            image = real32[i][0]
            padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
            crop = padded[:, 4 + top : 36 + top, 4 + left : 36 + left]
            crop = crop.flip(-1) if flip else crop
            want = tv_rotate(crop, angle, interpolation=InterpolationMode.NEAREST)
            got, label = aug[i]
            assert torch.equal(got, want) and label == real32[i][1]


def test_it_is_a_real_rotation(real32):
    """The output is the crop turned by the angle: rotating it back recovers the crop's centre
    (nearest neighbour loses a little), and a wrong angle or direction does not."""
    aug = Augmented(real32, mode="cifar_rot15", seed=0, **ID)
    errs, wrong = [], []
    for i in range(len(real32)):
        top, left, flip, angle = paper_draws(0, 0, i)
        if abs(angle) < 5:
            continue
        crop = torch.nn.functional.pad(real32[i][0], (4, 4, 4, 4))[
            :, 4 + top : 36 + top, 4 + left : 36 + left
        ]
        crop = crop.flip(-1) if flip else crop
        out = aug[i][0]
        back = tv_rotate(out, -angle, interpolation=InterpolationMode.BILINEAR)
        other = tv_rotate(out, angle, interpolation=InterpolationMode.BILINEAR)
        c = slice(10, 22)
        errs.append((back - crop)[:, c, c].abs().mean().item())
        wrong.append((other - crop)[:, c, c].abs().mean().item())
        assert (out != crop).float().mean() > 0.1  # it moved
    assert len(errs) > 10 and np.median(errs) < 0.5 * np.median(wrong)


def test_same_item_twice_and_other_epochs_differ(real32):
    aug = Augmented(real32, mode="cifar_rot15", seed=1, mean=(0.5,) * 3, std=(0.25,) * 3)
    first = torch.stack([aug[i][0] for i in range(len(real32))])
    assert torch.equal(first, torch.stack([aug[i][0] for i in range(len(real32))]))
    aug.set_epoch(1)
    second = torch.stack([aug[i][0] for i in range(len(real32))])
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_normalisation_is_the_published_codes():
    assert paper_stats("cifar10", (0.1,), (0.2,)) == (PAPER_CIFAR10_MEAN, PAPER_CIFAR10_STD)
    assert paper_stats("cifair10", (0.1,), (0.2,)) == (PAPER_CIFAR10_MEAN, PAPER_CIFAR10_STD)
    assert PAPER_CIFAR10_STD == (0.2023, 0.1994, 0.2010)
    assert paper_stats("cifar100", (0.1,), (0.2,)) == ((0.1,), (0.2,))  # the data set's own


def test_the_option_is_validated():
    assert DataConfig(augment="cifar_rot15").augment == "cifar_rot15"
    with pytest.raises(ValueError, match="cifar_rot15"):
        DataConfig(augment="rot15")


# ---------------------------------------------------------------- FFCV


@pytest.fixture(scope="module")
def ffcv_ready():
    from dist_icm.data.write import require_ffcv

    try:
        require_ffcv()
    except DataError as e:
        if os.environ.get("DIST_ICM_REQUIRE_FFCV"):
            raise
        pytest.skip(f"ffcv is not importable: {e}")


def test_the_numba_draws_are_the_torch_draws(ffcv_ready):
    from dist_icm.data import ffcv_ops

    for seed, epoch in ((0, 0), (7, 3)):
        for i in range(0, 5000, 7):
            top, left, flip, angle = ffcv_ops._rot_draws(ffcv_ops.TAG, seed, epoch, i, 4)
            assert (top, left, bool(flip), angle) == paper_draws(seed, epoch, i)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, cifar10_jpeg_root) -> Path:
    """100 training (10 per class) and 50 test CIFAR-10 JPEGs."""
    root = tmp_path_factory.mktemp("rot_tree")
    for split, n in (("train", 10), ("test", 5)):
        for cls in sorted(p.name for p in (cifar10_jpeg_root / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((cifar10_jpeg_root / split / cls).glob("*.jpg"))[:n]:
                (root / split / cls / f.name).symlink_to(f)
    return root


def _epoch(b, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    b.sampler.set_epoch(epoch)
    b.train.set_epoch(epoch)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in b.loader], strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_torch_and_ffcv_loaders_give_the_same_rotated_batches(ffcv_ready, tree, tmp_path):
    base = dict(name="imagefolder", root=str(tree), global_batch=50, augment="cifar_rot15",
                ffcv_write_mode="raw", ffcv_cache=str(tmp_path / "ffcv"))  # fmt: skip
    bundles = {
        loader: build_data(
            DataConfig(loader=loader, **base), seed=3, micro_global=50, rank=0, world_size=1
        )  # fmt: skip
        for loader in ("torch", "ffcv")
    }
    for epoch in (0, 2):
        (x0, y0), (x1, y1) = (_epoch(bundles[k], epoch) for k in ("torch", "ffcv"))
        assert torch.equal(y0, y1) and x0.shape == (100, 3, 32, 32)
        assert torch.allclose(x0, x1, atol=1e-5), "the loaders drew or rotated differently"
    plain = build_data(DataConfig(loader="ffcv", **(base | {"augment": "none"})), seed=3,
                       micro_global=50, rank=0, world_size=1)  # fmt: skip
    assert not torch.allclose(_epoch(plain, 0)[0], _epoch(bundles["ffcv"], 0)[0])
    tests = [torch.cat([x for x, _ in bundles[k].test_loader]) for k in ("torch", "ffcv")]
    assert torch.allclose(tests[0], tests[1], atol=1e-5)
