"""Tests of the torch data path on real data: digits, CIFAR-10 as JPEG, synthetic labels."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_icm import streams
from dist_icm.data import (
    Augmented,
    DataError,
    DatasetSpec,
    GlobalBatchSampler,
    TensorImageDataset,
    build_datasets,
    class_counts,
    labeled_subset,
    long_tailed,
    make_loader,
    normalize_only,
    stratified_fraction,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def images32() -> TensorImageDataset:
    """64 random 3x32x32 images with labels 0..9 (uint8 storage, as CIFAR)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    return TensorImageDataset(images, torch.arange(64) % 10)


# ---------------------------------------------------------------- datasets


def test_digits_split_shapes_and_determinism() -> None:
    train, test, spec = build_datasets("digits", None, seed=0)
    assert (len(train), len(test)) == (1347, 450)
    assert spec.num_classes == 10 and spec.in_channels == 1 and spec.image_size == 8
    assert spec.class_names == tuple(str(i) for i in range(10))
    assert len(spec.mean) == len(spec.std) == 1 and spec.std[0] > 0
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert isinstance(y, int)
    for ds in (train, test):
        assert len(ds.targets) == len(ds)
        assert set(torch.as_tensor(ds.targets).tolist()) == set(range(10))
    again, _, _ = build_datasets("digits", None, seed=0)
    assert torch.equal(train.images, again.images) and torch.equal(train.targets, again.targets)
    other, _, _ = build_datasets("digits", None, seed=1)
    assert not torch.equal(train.targets, other.targets)


def _sklearn_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, test = train_test_split(
        np.arange(len(digits.target)), test_size=0.25, stratify=digits.target, random_state=seed
    )
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    return x[train], torch.from_numpy(digits.target)[train], x[test]


def _digits_from(cache: Path, seed: int = 3, block_sklearn: bool = False):
    """``build_datasets("digits")`` in a fresh process with ``DIST_ICM_CACHE=cache``, where
    ``block_sklearn`` makes importing scikit-learn fail: the train images, or the error."""
    block = "import sys; sys.modules['sklearn'] = None; " if block_sklearn else ""
    code = (
        f"{block}import torch; from dist_icm.data import build_datasets; "
        f"train, _, _ = build_datasets('digits', None, seed={seed}); "
        f"torch.save((train.images, train.targets), {str(cache / 'out.pt')!r})"
    )
    env = {**os.environ, "DIST_ICM_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return torch.load(cache / "out.pt") if out.returncode == 0 else out.stderr


def test_digits_come_from_the_cache_once_made_and_equal_scikit_learn_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels, test_images = _sklearn_digits(seed=3)
    # a cold cache needs scikit-learn (negative control: with it blocked, the build fails)
    assert "ModuleNotFoundError" in _digits_from(tmp_path, block_sklearn=True)
    first = _digits_from(tmp_path)  # made by scikit-learn, and cached
    (path,) = (tmp_path / "digits").iterdir()
    assert "seed-3" in path.name and path.suffix == ".npz"
    cached = _digits_from(tmp_path, block_sklearn=True)  # from the cache alone
    for got in (first, cached):
        assert torch.equal(got[0], images) and torch.equal(got[1], labels)
    # an unreadable cache file is made again, and the data are scikit-learn's
    path.write_bytes(b"not a zip")
    monkeypatch.setenv("DIST_ICM_CACHE", str(tmp_path))
    train, test, _ = build_datasets("digits", None, seed=3)
    assert torch.equal(train.images, images) and torch.equal(test.images, test_images)
    assert np.load(path)["train"].shape == (1347,)
    # a cache folder that cannot be written: the data still come, nothing is cached
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("DIST_ICM_CACHE", str(blocker))
    train, _, _ = build_datasets("digits", None, seed=3)
    assert torch.equal(train.images, images)


def test_cifar10_without_internet_raises_clear_error(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()  # a root that was there before stays; the folders made go
    try:
        build_datasets("cifar10", str(tmp_path / "new" / "cifar"), download=True)
    except DataError as e:
        msg = str(e)
        assert "CIFAR-10 not found under" in msg and "download it on a machine with internet" in msg
        assert "imagefolder" in msg and "\n" not in msg
        assert not (tmp_path / "new").exists()  # torchvision made it; nothing was fetched
        with pytest.raises(DataError):
            build_datasets("cifar10", str(tmp_path / "kept"), download=True)
        assert (tmp_path / "kept").is_dir()
    else:
        pytest.skip("CIFAR-10 downloaded: this machine has internet")
    with pytest.raises(DataError, match="CIFAR-100 not found"):
        build_datasets("cifar100", str(tmp_path / "absent"), download=False)


def test_unknown_name_and_missing_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="digits, cifar10, cifar100, imagefolder"):
        build_datasets("mnist", None)
    with pytest.raises(DataError, match="nowhere' is not a folder"):
        build_datasets("imagefolder", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="must hold train/"):
        build_datasets("imagefolder", str(tmp_path))  # a folder, without train/ and test/
    with pytest.raises(DataError, match="needs data.root"):
        build_datasets("imagefolder", None)
    (tmp_path / "afile").write_text("")  # not "could not be downloaded (FileExistsError ...)"
    with pytest.raises(DataError, match=r"data.root '.*afile' is a file: CIFAR-100 needs a folder"):
        build_datasets("cifar100", str(tmp_path / "afile"))
    for split in ("train", "test"):  # one class: named, not a model's "num_classes >= 2"
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "one" / split / "cat" / "0.jpg")
    with pytest.raises(DataError, match=r"train has 1 class folder\(s\): classification needs"):
        build_datasets("imagefolder", str(tmp_path / "one"))


def test_imagefolder_cifar10_jpeg(cifar10_jpeg_root: Path) -> None:
    train, test, spec = build_datasets("imagefolder", str(cifar10_jpeg_root))
    assert (len(train), len(test)) == (50000, 10000)
    assert spec == DatasetSpec(
        num_classes=10,
        in_channels=3,
        image_size=32,
        class_names=spec.class_names,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )
    assert spec.class_names[:3] == ("airplane", "automobile", "bird")
    assert class_counts(train.targets, 10).tolist() == [5000] * 10
    assert class_counts(test.targets, 10).tolist() == [1000] * 10
    for ds, i in ((train, 0), (train, 49999), (test, 1234)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() < x.max() <= 1.0 and y == ds.targets[i]


def test_imagefolder_val_and_resize(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c, size in (("a", (40, 40)), ("b", (48, 40))):  # PIL size = (width, height)
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", size, (200, 10, 30)).save(tmp_path / split / c / "0.png")
    train, val, spec = build_datasets("imagefolder", str(tmp_path))
    assert spec.image_size == 40 and spec.class_names == ("a", "b")
    assert spec.mean == (0.485, 0.456, 0.406)
    assert [x.shape for x, _ in (train[0], train[1], val[1])] == [(3, 40, 40)] * 3
    b0 = tmp_path / "train" / "b" / "0.png"  # which size is used, and a non-square one
    assert spec.notes == (
        f"{tmp_path}/train: 1 of 2 images sampled are not 40x40 ({b0} is 48x40): every image "
        "is resized (shorter side) and centre-cropped to 40x40",
    )


def _jpeg_tree(root: Path, cifar: Path, n: int = 4) -> Path:
    """train/ and test/ with the first ``n`` real CIFAR-10 JPEGs of airplane and cat each."""
    for split in ("train", "test"):
        for cls in ("airplane", "cat"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((cifar / split / cls).glob("*.jpg"))[:n]:
                (root / split / cls / f.name).write_bytes(f.read_bytes())
    return root


def test_imagefolder_skips_hidden_folders_and_files(tmp_path: Path, cifar10_jpeg_root) -> None:
    tree = _jpeg_tree(tmp_path, cifar10_jpeg_root)
    for split in ("train", "test"):  # a viewer's thumbnails: class 0, every label shifted
        (tree / split / ".thumbnails").mkdir()
        first = sorted((tree / split / "cat").iterdir())[0]
        (tree / split / ".thumbnails" / first.name).write_bytes(first.read_bytes())
        (tree / split / ".ipynb_checkpoints").mkdir()  # empty: refused the whole tree
        (tree / split / "cat" / "._0.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    train, test, spec = build_datasets("imagefolder", str(tree))
    assert spec.class_names == ("airplane", "cat") and spec.notes == ()
    assert train.targets == test.targets == [0] * 4 + [1] * 4
    assert all(".thumbnails" not in p and "._" not in p for p, _ in train.samples + test.samples)


def test_a_link_loop_stops_with_one_line_naming_the_link(tmp_path: Path, cifar10_jpeg_root):
    tree = _jpeg_tree(tmp_path, cifar10_jpeg_root)
    elsewhere = tmp_path / "more"  # a linked folder that is no loop is read, once
    (tree / "train" / "cat").rename(elsewhere)
    (tree / "train" / "cat").symlink_to(elsewhere)
    (elsewhere / "sub").symlink_to(tree / "test" / "cat")
    train, _, _ = build_datasets("imagefolder", str(tree))
    assert train.targets == [0] * 4 + [1] * 8
    plane = tree / "train" / "airplane"
    (plane / "loop").symlink_to("..")  # cat read again as airplane, ~40 times (2: forever)
    line = f"{plane}/loop is a link loop ({plane}/loop/airplane is {plane.resolve()} again)"
    with pytest.raises(DataError, match=re.escape(line)):
        build_datasets("imagefolder", str(tree))


def test_16_bit_grayscale_is_scaled_down_not_white(tmp_path: Path, cifar10_jpeg_root) -> None:
    tree = _jpeg_tree(tmp_path, cifar10_jpeg_root)
    grey = {}
    for path in sorted((tree / "train" / "cat").iterdir()):  # 16-bit PNGs ("I;16")
        grey[path.stem] = np.asarray(Image.open(path).convert("L"))
        Image.fromarray(grey[path.stem].astype(np.uint16) * 257).save(path.with_suffix(".png"))
        path.unlink()
    train, _, _ = build_datasets("imagefolder", str(tree))
    for i, name in enumerate(sorted(grey), start=4):  # (v * 257) >> 8 == v, in every channel
        x, y = train[i]
        want = grey[name]
        assert y == 1 and all(np.array_equal(c, want) for c in (x * 255).round().byte().numpy())
    from dist_icm.data.imagefolder import rgb8

    as_int32 = Image.fromarray(grey["0000"].astype(np.int32) * 257)  # mode "I"
    assert np.array_equal(np.asarray(rgb8(as_int32))[..., 0], grey["0000"])


def test_the_image_size_comes_from_a_sample_not_the_first_image(tmp_path, cifar10_jpeg_root):
    tree = _jpeg_tree(tmp_path, cifar10_jpeg_root)
    first = sorted((tree / "train" / "airplane").iterdir())[0]
    Image.open(first).resize((40, 40)).save(first)  # was the size: 40 px, imagenet augmentation
    flat = tree / "train" / "cat" / "zz.jpg"
    Image.open(first).resize((64, 2)).save(flat)
    train, test, spec = build_datasets("imagefolder", str(tree))
    assert spec.image_size == 32 and spec.mean == (0.4914, 0.4822, 0.4465)
    assert [x.shape for x, _ in (train[0], train[len(train) - 1], test[0])] == [(3, 32, 32)] * 3
    assert spec.notes == (
        f"{tree}/train: 2 of 9 images sampled are not 32x32 ({first} is 40x40, {flat} is 64x2): "
        "every image is resized (shorter side) and centre-cropped to 32x32",
    )
    from cli import setup_job  # and the run says so at start

    job = setup_job(["experiment=quickstart", "data=imagefolder", f"data.root={tree}",
                     "data.global_batch=4", "loss.group_size=null"])  # fmt: skip
    assert f"data: {spec.notes[0]}" in job.notes


def test_a_run_without_drop_last_trains_every_sample_in_whole_steps(tmp_path: Path) -> None:
    from cli import records, run_train, setup_job

    job = setup_job(["experiment=quickstart", "data.drop_last=false", "runtime.grad_accum=2"])
    n = job.data.train_size  # 1347 digits: 21 steps of 64 and 3 left, which make a 22nd
    assert job.steps_per_epoch == -(-n // 64) == 22 and job.data.sampler.batches_per_epoch == 44
    assert setup_job(["experiment=quickstart"]).steps_per_epoch == n // 64 == 21
    run = tmp_path / "run"
    run_train(run, "experiment=quickstart", "data.drop_last=false", "runtime.grad_accum=2",
              "train.epochs=1", "train.log_every=1")  # fmt: skip
    assert [r["step"] for r in records(run) if "train/loss" in r][-1] == 22  # and epoch 1.0


@pytest.mark.parametrize("flag", ["--root", "--cache"])
def test_dist_icm_data_refuses_an_empty_folder_name(flag: str, capsys, tmp_path: Path) -> None:
    from dist_icm.data.cli import main

    args = {"--root": str(tmp_path), "--cache": str(tmp_path)} | {flag: ""}  # "": cwd, ~/.cache
    with pytest.raises(SystemExit) as info:
        main(["imagefolder", *(x for kv in args.items() for x in kv)])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dist_icm: error: argument {flag}: must name a folder, got '' (see dist-icm-data --help)"
    ]


# ---------------------------------------------------------------- subsets

LABELS = np.repeat(np.arange(10), np.arange(10, 110, 10))  # class c has 10 * (c + 1) samples


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.1])
def test_stratified_fraction_counts(fraction: float) -> None:
    idx = stratified_fraction(LABELS, fraction, seed=3)
    expected = [max(1, int(np.floor(fraction * n + 0.5))) for n in range(10, 110, 10)]
    assert class_counts(LABELS[idx], 10).tolist() == expected
    assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
    assert np.array_equal(idx, stratified_fraction(torch.as_tensor(LABELS), fraction, seed=3))
    assert not np.array_equal(idx, stratified_fraction(LABELS.tolist(), fraction, seed=4))


def test_stratified_fraction_keeps_one_per_class_and_validates() -> None:
    assert class_counts(LABELS[stratified_fraction(LABELS, 0.01, 0)], 10).min() == 1
    assert len(stratified_fraction(LABELS, 1.0, 0)) == len(LABELS)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            stratified_fraction(LABELS, bad, 0)


@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5])
def test_long_tailed_profile(rho: float) -> None:
    labels = np.repeat(np.arange(10), 500)
    idx = long_tailed(labels, rho, seed=0)
    counts = class_counts(labels[idx], 10)
    assert counts[0] == 500 and counts[-1] == int(500 * rho)
    assert np.all(np.diff(counts) <= 0)
    expected = [int(np.floor(500 * rho ** (c / 9) + 1e-9)) for c in range(10)]
    assert counts.tolist() == expected
    assert np.array_equal(idx, long_tailed(labels, rho, seed=0))
    assert not np.array_equal(idx, long_tailed(labels, rho, seed=1))
    with pytest.raises(ValueError, match="imbalance"):
        long_tailed(labels, 0.0, 0)


def test_labeled_subset_keeps_targets(images32: TensorImageDataset) -> None:
    idx = stratified_fraction(images32.targets, 0.5, seed=0)
    sub = labeled_subset(images32, idx)
    assert len(sub) == len(idx) and sub.targets.tolist() == images32.targets[idx].tolist()
    assert sub[3][1] == int(sub.targets[3])
    aug = Augmented(sub, mode="cifar", seed=0, mean=MEAN, std=STD)
    assert torch.equal(torch.as_tensor(aug.targets), sub.targets)


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("mode", ["cifar", "imagenet"])
def test_augmented_depends_only_on_seed_epoch_index(
    images32: TensorImageDataset, mode: str
) -> None:
    aug = Augmented(images32, mode=mode, seed=7, mean=MEAN, std=STD)
    forward = [aug[i][0] for i in range(len(aug))]
    backward = [aug[i][0] for i in reversed(range(len(aug)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in forward)
    aug.set_epoch(1)
    changed = sum(not torch.equal(a, aug[i][0]) for i, a in enumerate(forward))
    assert changed > len(aug) // 2
    other_seed = Augmented(images32, mode=mode, seed=8, mean=MEAN, std=STD)
    assert sum(not torch.equal(a, other_seed[i][0]) for i, a in enumerate(forward)) > 0


def test_augmented_none_and_normalize_only(images32: TensorImageDataset) -> None:
    x, y = images32[5]
    want = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    plain = Augmented(images32, mode="none", seed=0, mean=MEAN, std=STD)
    assert torch.allclose(plain[5][0], want) and plain[5][1] == y
    assert torch.allclose(normalize_only(images32, MEAN, STD)[5][0], want)
    with pytest.raises(ValueError, match="unknown augmentation mode"):
        Augmented(images32, mode="autoaugment", seed=0, mean=MEAN, std=STD)


def test_cifar_crop_is_a_shifted_flipped_copy(images32: TensorImageDataset) -> None:
    """With pad=4 every output is the input shifted by <= 4 pixels, zero-filled, maybe flipped."""
    x, _ = images32[0]
    aug = Augmented(images32, mode="cifar", seed=0, mean=(0.0,) * 3, std=(1.0,) * 3)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for epoch in range(8):
        aug.set_epoch(epoch)
        out = aug[0][0]
        crops = [padded[:, t : t + 32, l : l + 32] for t in range(9) for l in range(9)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(-1)) for c in crops)


def test_same_batches_across_worker_counts(images32: TensorImageDataset) -> None:
    aug = Augmented(images32, mode="cifar", seed=1, mean=MEAN, std=STD)
    runs = []
    for workers in (0, 2):
        sampler = GlobalBatchSampler(len(aug), 16, seed=2)
        loader = make_loader(aug, sampler, num_workers=workers)
        batches = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            aug.set_epoch(epoch)
            batches += [(x.clone(), y.clone()) for x, y in loader]
        runs.append(batches)
    assert len(runs[0]) == len(runs[1]) == 8
    for (x0, y0), (x1, y1) in zip(*runs, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(runs[0][0][0], runs[0][4][0])  # epochs differ


def test_real_cifar_jpeg_through_loader(cifar10_jpeg_root: Path) -> None:
    train, _, spec = build_datasets("imagefolder", str(cifar10_jpeg_root))
    sub = labeled_subset(train, stratified_fraction(train.targets, 0.002, seed=0))
    assert class_counts(sub.targets, 10).tolist() == [10] * 10
    aug = Augmented(sub, mode="cifar", seed=0, mean=spec.mean, std=spec.std)
    loader = make_loader(aug, GlobalBatchSampler(len(aug), 50, world_size=2, rank=1))
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (25, 3, 32, 32)
    assert abs(float(batches[0][0].mean())) < 1.0


# ---------------------------------------------------------------- sampler


def _epoch(world: int, *, epoch: int = 0, start: int = 0, **kw: object) -> list[list[list[int]]]:
    """steps x ranks x local indices, for 100 samples and global batch 12."""
    per_rank = []
    for rank in range(world):
        s = GlobalBatchSampler(100, 12, rank=rank, world_size=world, seed=5, **kw)
        s.set_epoch(epoch)
        if start:
            s.set_start_batch(start)
        assert len(s) == 8 - start
        per_rank.append(list(s))
    return [list(step) for step in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_batches_match_single_process(world: int) -> None:
    single = [step[0] for step in _epoch(1)]
    steps = _epoch(world)
    assert len(steps) == 8
    for step, batch in zip(steps, single, strict=True):
        assert all(len(part) == 12 // world for part in step)
        assert sum(step, []) == batch
    seen = sum(single, [])
    assert len(seen) == len(set(seen)) == 96 and set(seen) <= set(range(100))
    assert _epoch(world) == steps  # deterministic
    assert sum(sum(_epoch(world, epoch=1), []), []) != sum(sum(steps, []), [])


@pytest.mark.parametrize("world", [1, 3])
def test_set_start_batch_resumes_until_the_next_epoch(world: int) -> None:
    full = _epoch(world, epoch=2)
    assert _epoch(world, epoch=2, start=3) == full[3:]
    s = GlobalBatchSampler(100, 12, seed=5)
    s.set_epoch(2)
    s.set_start_batch(5)
    assert len(list(s)) == len(list(s)) == len(s) == 3  # every pass (a loader may make two)
    s.set_epoch(3)
    assert len(list(s)) == len(s) == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumes_at_its_start_batch_with_workers_too(workers: int) -> None:
    # torch's loader with worker processes iterates its sampler twice as it starts: a start
    # batch used up by the first pass replayed the epoch from its first batch
    from torch.utils.data import TensorDataset

    s = GlobalBatchSampler(100, 12, seed=5)
    loader = make_loader(TensorDataset(torch.arange(100)), s, num_workers=workers)
    s.set_epoch(2)
    full = [b[0].tolist() for b in loader]
    s.set_epoch(2)
    s.set_start_batch(3)
    assert [b[0].tolist() for b in loader] == full[3:]


def test_no_shuffle_and_no_drop_last() -> None:
    s = GlobalBatchSampler(10, 4, shuffle=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    s = GlobalBatchSampler(10, 4, rank=1, world_size=2, shuffle=False, drop_last=False)
    assert len(s) == 3 and list(s) == [[2, 3], [6, 7], [0, 1]]  # last batch 8, 9, 0, 1


@pytest.mark.parametrize("world", [1, 2])
def test_no_drop_last_pads_the_epoch_to_whole_optimizer_steps(world: int) -> None:
    # 100 samples, global micro-batch 12, 3 micro-batches a step: 3 steps of 36, the last one
    # padded with the epoch's first 8 samples; every sample is seen, none is dropped
    ranks = [
        GlobalBatchSampler(100, 12, rank=r, world_size=world, seed=5, drop_last=False,
                           step_batches=3)
        for r in range(world)
    ]  # fmt: skip
    assert ranks[0].batches_per_epoch == len(ranks[0]) == 9
    batches = [sum(parts, []) for parts in zip(*(list(s) for s in ranks), strict=True)]
    seen = sum(batches, [])
    order = streams.rng("sampler", 5, 0).permutation(100).tolist()
    assert seen == order + order[:8] and all(len(b) == 12 for b in batches)
    dropped = GlobalBatchSampler(100, 12, seed=5, step_batches=3)
    assert dropped.batches_per_epoch == 8 and sum(list(dropped), []) == order[:96]
    tiny = GlobalBatchSampler(10, 4, shuffle=False, drop_last=False, step_batches=5)
    assert sum(list(tiny), []) == list(range(10)) * 2  # wraps as often as a step needs


def test_sampler_validation() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(100, 10, world_size=3)
    with pytest.raises(ValueError, match="exceeds"):
        GlobalBatchSampler(10, 12)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        GlobalBatchSampler(100, 12, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank -1 is outside"):
        GlobalBatchSampler(100, 12, rank=-1, world_size=2)
    with pytest.raises(ValueError, match="start batch 9"):
        GlobalBatchSampler(100, 12).set_start_batch(9)


def _unpack_worker(rank: int, world: int, archive: str, dest: str) -> list[str]:
    import torch.distributed as dist

    from dist_icm.data.unpack import unpack_once

    dist.barrier()  # all at once
    return sorted(
        str(p.relative_to(dest)) for p in unpack_once(Path(archive), Path(dest)).rglob("*")
    )


@pytest.mark.multiproc
@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_processes_unpacking_at_once_each_get_the_whole_tree(tmp_path: Path, stale: bool) -> None:
    # unpack.py: concurrent processes never leave or see a half-written tree (3 at once, into
    # a missing folder or over a stale unpack of another archive), and leave no temp folder
    import io
    import tarfile

    from multiproc import run_group

    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(2000):
            info = tarfile.TarInfo(f"tree/f{i}.bin")
            info.size = 1000
            tar.addfile(info, io.BytesIO(bytes(1000)))
    dest = tmp_path / "dest"
    if stale:
        (dest / "tree").mkdir(parents=True)
        (dest / "tree" / "old.bin").write_bytes(b"old")
        (dest / ".extracted").write_text("other.tar 1\n")
    expected = sorted([".extracted", "tree"] + [f"tree/f{i}.bin" for i in range(2000)])
    assert run_group(_unpack_worker, 3, str(archive), str(dest)) == [expected] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "tree.tar"]
