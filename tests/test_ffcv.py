"""The FFCV path (``data.loader=ffcv``): writer, cache, loader, errors, processes, trainer.

Skipped, with the reason, only where ffcv cannot be imported; CI installs it (README, .ci/run)
and sets ``DIST_ICM_REQUIRE_FFCV=1``, which turns that skip into an error.
Real data throughout: sklearn's digits and a few hundred CIFAR-10 JPEGs of the shared archive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import REPO, losses, run_train
from cli import summary as read_summary
from multiproc import run_group
from PIL import Image

from dist_icm.config import DataConfig
from dist_icm.data.datasets import DataError, build_datasets
from dist_icm.data.pipeline import build_data
from dist_icm.data.write import WriteOptions, ensure_betons, require_ffcv
from dist_icm.job import available_cores

try:
    require_ffcv()
except DataError as e:
    if os.environ.get("DIST_ICM_REQUIRE_FFCV"):  # CI sets it: there these tests must run
        raise
    pytest.skip(f"ffcv is not importable: {e}", allow_module_level=True)

from ffcv.loader import Loader, OrderOption  # noqa: E402

from dist_icm.data.ffcv_loader import check_beton  # noqa: E402

# numba quirk: the finaliser of a garbage-collected ffcv-compiled function can raise KeyError
# while ffcv's loader thread compiles (numba.core.dispatcher, "Exception ignored"): harmless.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """A fresh .beton cache (``$DIST_ICM_CACHE`` layout: ``<cache>/ffcv/...``)."""
    return tmp_path_factory.mktemp("dist_icm_cache")


@pytest.fixture(scope="session")
def tree(tmp_path_factory, cifar10_jpeg_root) -> Path:
    """301 training (31 airplanes, 30 of each other class) and 100 test CIFAR-10 JPEGs."""
    root = tmp_path_factory.mktemp("cifar_small")
    for split, n in (("train", 30), ("test", 10)):
        for cls in sorted(p.name for p in (cifar10_jpeg_root / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            files = sorted((cifar10_jpeg_root / split / cls).glob("*.jpg"))
            for f in files[: n + (split == "train" and cls == "airplane")]:
                (root / split / cls / f.name).symlink_to(f)
    return root


def cfg(cache: Path, **kw) -> DataConfig:
    return DataConfig(**({"loader": "ffcv", "ffcv_cache": str(cache / "ffcv")} | kw))


def bundle(config: DataConfig, *, rank: int = 0, world: int = 1):
    return build_data(config, seed=0, micro_global=config.global_batch, rank=rank, world_size=world)


def epoch_batches(b, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    b.sampler.set_epoch(epoch)
    b.train.set_epoch(epoch)
    b.sampler.set_start_batch(start)
    return [(x.clone(), y.clone()) for x, y in b.loader]


def raw_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a .beton in file order, through ffcv's default decoders."""
    images, labels = [], []
    for x, y in Loader(str(path), batch_size=100, order=OrderOption.SEQUENTIAL, drop_last=False):
        images.append(x.numpy().copy())
        labels.append(y.numpy().reshape(-1).copy())
    return np.concatenate(images), np.concatenate(labels)


def write(tree_or_name, cache: Path, **options):
    name, root = ("digits", None) if tree_or_name == "digits" else ("imagefolder", tree_or_name)
    train, test, spec = build_datasets(name, None if root is None else str(root))
    found = ensure_betons(
        train,
        test,
        spec,
        name=name,
        root=root and str(root),
        seed=0,
        options=WriteOptions(**options),
        cache=str(cache / "ffcv"),
        workers=2,
    )
    return found, train, test


# ------------------------------------------------------------------ writer and cache


def test_digits_round_trip_is_exact(cache):
    found, train, test = write("digits", cache)
    # a root does not matter to digits (scikit-learn's): the same entry, not a second one
    again = ensure_betons(train, test, build_datasets("digits", None)[2], name="digits",
                          root="/nowhere", seed=0, options=WriteOptions(),
                          cache=str(cache / "ffcv"), workers=2)  # fmt: skip
    assert again.train == found.train
    assert found.kind == "ndarray" and found.meta["sizes"] == [len(train), len(test)]
    for path, data in ((found.train, train), (found.test, test)):
        images, labels = raw_read(path)
        assert np.array_equal(images, data.images.numpy())
        assert np.array_equal(labels, data.targets.numpy())


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_jpeg_tree_round_trip(cache, tree, mode):
    found, train, _ = write(tree, cache, mode=mode, quality=95)
    images, labels = raw_read(found.train)
    source = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in train.samples])
    assert np.array_equal(labels, np.asarray(train.targets))
    diff = np.abs(images.astype(int) - source.astype(int))
    if mode == "raw":
        assert diff.max() == 0
    else:  # JPEG once more at quality 95 (cv2 encode, fast libjpeg-turbo decode): mean 2.1
        assert diff.mean() < 3.0 and np.percentile(diff, 99) <= 16, (
            diff.mean(),
            np.percentile(diff, 99),
        )


def test_second_write_reuses_the_cache(cache, tree, capsys):
    first, _, _ = write(tree, cache, mode="raw")
    stamp = {p: p.stat().st_mtime_ns for p in first.folder.iterdir()}
    capsys.readouterr()
    again, _, _ = write(tree, cache, mode="raw")
    assert again.folder == first.folder and "writing" not in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in again.folder.iterdir()} == stamp
    other, _, _ = write(tree, cache, mode="jpg", quality=80)  # other options: another entry
    assert other.folder != first.folder


def _small_tree(root: Path, cifar: Path) -> Path:
    """4 real CIFAR-10 JPEGs of airplane and cat each in train/ and test/ (copies)."""
    for split in ("train", "test"):
        for cls in ("airplane", "cat"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((cifar / split / cls).glob("*.jpg"))[:4]:
                shutil.copy2(f, root / split / cls / f.name)
    return root


def test_a_changed_tree_makes_a_new_entry(tmp_path, cifar10_jpeg_root, capsys):
    tree = _small_tree(tmp_path / "tree", cifar10_jpeg_root)
    first, _, _ = write(tree, tmp_path, mode="raw")
    moved = sorted((tree / "train" / "airplane").iterdir())[0]  # a label fixed: same totals
    moved.rename(tree / "train" / "cat" / f"z{moved.name}")
    capsys.readouterr()
    again, train, _ = write(tree, tmp_path, mode="raw")
    assert again.folder != first.folder and "dist_icm: writing" in capsys.readouterr().err
    assert raw_read(again.train)[1].tolist() == train.targets == [0] * 3 + [1] * 5
    from dist_icm.data.write import _files_digest

    digest = _files_digest(train)  # a file rewritten (stat only: its size or time changes)
    os.utime(train.samples[0][0], ns=(0, 0))
    assert _files_digest(build_datasets("imagefolder", str(tree))[0]) != digest


def test_16_bit_pngs_read_alike_on_both_paths(tmp_path, cifar10_jpeg_root):
    tree = _small_tree(tmp_path / "tree", cifar10_jpeg_root)
    for path in sorted((tree / "train" / "cat").iterdir()):  # "I;16", once solid white
        grey = np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 257
        Image.fromarray(grey).save(path.with_suffix(".png"))
        path.unlink()
    found, train, _ = write(tree, tmp_path, mode="raw")
    images, labels = raw_read(found.train)
    torch_path = np.stack([(train[i][0] * 255).round().byte().permute(1, 2, 0).numpy()
                           for i in range(len(train))])  # fmt: skip
    assert labels.tolist() == train.targets and np.array_equal(images, torch_path)
    assert images[4:].std() > 10  # not white


def test_the_cache_folder_is_the_option_then_the_variable_then_home(monkeypatch, tmp_path):
    from dist_icm.data.write import cache_root

    monkeypatch.setenv("DIST_ICM_CACHE", str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "mine")) == tmp_path / "mine"  # data.ffcv_cache / --cache
    assert cache_root(None) == tmp_path / "env" / "ffcv"
    monkeypatch.delenv("DIST_ICM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(None) == tmp_path / "home" / ".cache" / "dist_icm" / "ffcv"


def test_cli_writes_and_reports_the_entry(tmp_path):
    cmd = [sys.executable, "-m", "dist_icm.data.write", "digits", "--cache", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = out.stdout.splitlines()  # the entry, alone on stdout: `| jq` reads it
    report = json.loads(line)
    assert Path(report["train"]).is_file() and report["meta"]["sizes"] == [1347, 450]
    assert "dist_icm: writing digits train (1347 images)" in out.stderr


# ------------------------------------------------------------------ loader


def test_digits_batches_equal_the_torch_path(cache):
    ffcv = bundle(cfg(cache, global_batch=64))
    torch_path = bundle(cfg(cache, loader="torch", global_batch=64))
    assert ffcv.train_size == torch_path.train_size
    assert torch.equal(ffcv.class_counts, torch_path.class_counts)
    for epoch, start in ((0, 0), (3, 5)):  # resumed mid-epoch: batches 0..4 are skipped
        got, want = epoch_batches(ffcv, epoch, start), epoch_batches(torch_path, epoch, start)
        assert len(got) == len(want) == ffcv.sampler.batches_per_epoch - start
        for (x, y), (x0, y0) in zip(got, want, strict=True):
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (64,)
            assert torch.equal(x, x0) and torch.equal(y, y0)
    tests = [list(map(torch.cat, zip(*b.test_loader, strict=True))) for b in (ffcv, torch_path)]
    assert torch.equal(tests[0][0], tests[1][0]) and torch.equal(tests[0][1], tests[1][1])


def test_no_drop_last_pads_the_same_batches_as_the_torch_path(cache):
    config = dict(global_batch=64, drop_last=False)
    kw = dict(seed=0, micro_global=64, grad_accum=2, rank=0, world_size=1)
    ffcv = build_data(cfg(cache, **config), **kw)
    torch_path = build_data(cfg(cache, loader="torch", **config), **kw)
    n = ffcv.train_size
    assert ffcv.sampler.batches_per_epoch == -(-n // 128) * 2 > n // 64  # whole steps of 2
    got, want = epoch_batches(ffcv, 1), epoch_batches(torch_path, 1)
    assert len(got) == len(want) == ffcv.sampler.batches_per_epoch
    for (x, y), (x0, y0) in zip(got, want, strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_subsets_select_indices_at_load_time(cache):
    small = dict(fraction=0.5, long_tail=0.1, global_batch=32)
    ffcv, torch_path = bundle(cfg(cache, **small)), bundle(cfg(cache, loader="torch", **small))
    assert ffcv.train_size == torch_path.train_size < 400
    assert torch.equal(ffcv.class_counts, torch_path.class_counts)
    for (x, y), (x0, y0) in zip(epoch_batches(ffcv, 1), epoch_batches(torch_path, 1), strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert len(list(Path(cache, "ffcv").glob("digits-*"))) == 1  # no second copy written


def test_channels_last_and_the_process_cache(cache, tree):
    base = dict(name="imagefolder", root=str(tree), global_batch=100, ffcv_write_mode="raw")
    plain = bundle(cfg(cache, **base))
    config = cfg(cache, ffcv_os_cache=False, **base)
    other = build_data(config, seed=0, micro_global=100, rank=0, world_size=1, channels_last=True)
    for (x, y), (x0, y0) in zip(epoch_batches(other, 1), epoch_batches(plain, 1), strict=True):
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.gpu
def test_the_pipeline_ends_on_the_gpu(cache, tree):
    base = dict(name="imagefolder", root=str(tree), global_batch=100, ffcv_write_mode="raw")
    cpu = bundle(cfg(cache, **base))
    gpu = build_data(
        cfg(cache, **base),
        seed=0,
        micro_global=100,
        rank=0,
        world_size=1,
        device="cuda",
        channels_last=True,
    )
    gpu.sampler.set_epoch(1)
    gpu.train.set_epoch(1)
    held = list(gpu.loader)  # every batch of the epoch held, not copied: none is overwritten
    for (x, y), (x0, y0) in zip(held, epoch_batches(cpu, 1), strict=True):
        assert x.is_cuda and y.is_cuda and y.dtype == torch.int64 and y.shape == (100,)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(x.cpu(), x0, atol=1e-5) and torch.equal(y.cpu(), y0)


def _crop_flip_options(image: torch.Tensor) -> torch.Tensor:
    """All 162 crops (zero padding 4) and flips of a CHW image, stacked."""
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crops = [padded[:, t : t + 32, s : s + 32] for t in range(9) for s in range(9)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_cifar_augmentation_is_crop_and_flip_seeded_per_epoch(cache, tree):
    base = dict(name="imagefolder", root=str(tree), global_batch=100, ffcv_write_mode="raw")
    plain, aug = bundle(cfg(cache, augment="none", **base)), bundle(cfg(cache, **base))
    mean = torch.tensor(plain.spec.mean).view(3, 1, 1)
    std = torch.tensor(plain.spec.std).view(3, 1, 1)
    x0, y0 = map(torch.cat, zip(*epoch_batches(plain, 2), strict=True))
    x1, y1 = map(torch.cat, zip(*epoch_batches(aug, 2), strict=True))
    assert torch.equal(y0, y1) and x1.shape == (300, 3, 32, 32) and x1.is_contiguous()
    flips, offsets = 0, set()
    for a, b in zip(x0 * std + mean, x1 * std + mean, strict=True):
        err = (_crop_flip_options(a) - b).abs().flatten(1).max(1).values
        k = int(err.argmin())
        assert err[k] < 1e-5, "an augmented image is no crop/flip of its source"
        flips, offsets = flips + (k >= 81), offsets | {k % 81}
    assert 100 < flips < 200 and len(offsets) > 60
    again = torch.cat([x for x, _ in epoch_batches(aug, 2)])
    other = torch.cat([x for x, _ in epoch_batches(aug, 3)])
    assert torch.equal(again, x1)  # the epoch's draws are fixed
    assert not torch.equal(torch.cat([x for x, _ in epoch_batches(plain, 3)]), other)


# ------------------------------------------------------------------ errors


def test_missing_ffcv_stops_the_trainer_with_the_install_lines(tmp_path):
    # the real check, run where importing ffcv fails (None in sys.modules blocks an import)
    code = (
        "import sys; sys.modules['ffcv'] = None; from dist_icm.train import main; "
        f"sys.argv = ['train', 'data.loader=ffcv', 'hydra.run.dir={tmp_path}']; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2, out.stderr[-2000:]
    assert last.startswith("dist_icm: error: data.loader=ffcv needs the ffcv package")
    assert "apt-get install -y libopencv-dev pkg-config libturbojpeg0-dev" in last
    assert 'pip install -e ".[ffcv]"' in last


def test_wrong_fields_and_class_counts_are_refused(cache, tree):
    digits, _, _ = write("digits", cache)
    rgb, _, _ = write(tree, cache, mode="raw")
    with pytest.raises(DataError, match="has fields .*NDArrayField.* but the config needs"):
        check_beton(digits.train, kind="rgb", num_classes=10)
    with pytest.raises(DataError, match=r"labels 0\.\.9 but the data set has 3 classes"):
        check_beton(rgb.train, kind="rgb", num_classes=3)
    with pytest.raises(DataError, match="holds 10 of the 100 classes"):
        check_beton(rgb.train, kind="rgb", num_classes=100, all_classes=True)
    assert len(check_beton(rgb.train, kind="rgb", num_classes=10, all_classes=True)) == 301


def test_truncated_or_corrupt_betons_are_refused(cache, tree, tmp_path):
    found, _, _ = write(tree, cache, mode="raw")
    size = found.train.stat().st_size
    for cut, message in ((size - 7, r"corrupt \(\d+ bytes\)"), (10, r"corrupt \(IndexError")):
        bad = tmp_path / f"cut{cut}.beton"
        bad.write_bytes(found.train.read_bytes()[:cut])
        with pytest.raises(DataError, match=message):
            check_beton(bad, kind="rgb", num_classes=10)
    # in the cache: a file that changed after it was written stops build_data
    shutil.copytree(cache / "ffcv", tmp_path / "copy" / "ffcv")
    entry = tmp_path / "copy" / "ffcv" / found.folder.name / "train.beton"
    os.truncate(entry, size // 2)
    config = cfg(tmp_path / "copy", name="imagefolder", root=str(tree), ffcv_write_mode="raw")
    with pytest.raises(DataError, match="truncated or corrupt"):
        bundle(config)


def test_an_unreadable_image_stops_the_writer_instead_of_hanging_it(tmp_path, tree, capfd):
    bad = tmp_path / "tree"
    shutil.copytree(tree, bad, symlinks=True)
    victim = sorted((bad / "train" / "cat").iterdir())[3]
    victim.unlink()
    victim.write_bytes(b"not a jpeg")
    capfd.readouterr()
    with pytest.raises(DataError) as info:
        write(bad, tmp_path)
    # the torch path's words, and no progress bar of ffcv's before the line (off a terminal):
    # stderr holds only the line saying what is written
    assert str(info.value) == f"cannot read image {victim} (not an image file PIL can decode): " \
        "fix or remove it"  # fmt: skip
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("dist_icm: writing imagefolder train"), err
    assert not list((tmp_path / "ffcv").glob("*/meta.json"))  # nothing half-written is kept


def test_distributed_needs_an_initialised_process_group(cache, tree):
    found, _, _ = write(tree, cache, mode="raw")
    with pytest.raises(ValueError, match="process group"):  # ffcv's own distributed order
        Loader(str(found.train), batch_size=10, order=OrderOption.RANDOM, distributed=True)
    config = cfg(cache, name="imagefolder", root=str(tree), ffcv_write_mode="raw", global_batch=64)
    with pytest.raises(DataError, match="needs torch.distributed initialised"):
        bundle(config, rank=0, world=2)


# ------------------------------------------------------------------ processes and trainer


def _rank_epochs(rank: int, world: int, config: DataConfig) -> dict:
    b = bundle(config, rank=rank, world=world)
    epochs = [epoch_batches(b, e) for e in range(2)]
    # ffcv's own distributed order, for comparison: DistributedSampler(drop_last=False)
    own = Loader(
        str(b.loader.loader.fname),
        batch_size=50,
        order=OrderOption.RANDOM,
        distributed=True,
        seed=0,
        drop_last=False,
    )
    return {"epochs": epochs, "own": own.traversal_order.sample_order(0)}


@pytest.mark.multiproc
def test_two_gloo_processes_split_each_global_batch(cache, tree):
    config = cfg(cache, name="imagefolder", root=str(tree), ffcv_write_mode="raw", global_batch=64)
    single = bundle(config)  # also writes the entry, so the ranks only read it
    ranks = run_group(_rank_epochs, 2, config)
    for e in range(2):
        whole = epoch_batches(single, e)
        assert len(whole) == 301 // 64 == 4  # drop-last epoch: 256 of 301 samples
        for k, (x, y) in enumerate(whole):
            parts = [r["epochs"][e][k] for r in ranks]
            assert [p[0].shape[0] for p in parts] == [32, 32]  # equal per-rank batches
            assert torch.equal(torch.cat([p[0] for p in parts]), x)  # same crops and flips
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
        seen = torch.cat([p[0] for r in ranks for p in r["epochs"][e]]).flatten(1)
        assert len(torch.unique(seen, dim=0)) == 256  # each sample at most once
    own = np.concatenate([r["own"] for r in ranks])  # 2 x 151: one sample comes twice
    assert len(own) == 302 and len(np.unique(own)) == 301


def test_trainer_cli_with_ffcv_matches_the_torch_loader(tmp_path, cache):
    write("digits", cache)  # already written: the runs read it
    env = os.environ | {"DIST_ICM_CACHE": str(cache)}
    loss, stderr, cores = {}, {}, available_cores()
    for loader in ("ffcv", "torch"):
        run = tmp_path / loader
        out = run_train(
            run,
            "experiment=quickstart",
            f"data.loader={loader}",
            f"data.num_workers={cores + 3 if loader == 'ffcv' else 0}",
            "train.max_steps=5",
            "train.log_every=1",
            "train.progress=false",
            "train.tensorboard=false",
            env=env,
            timeout=300,
        )
        loss[loader], stderr[loader] = list(losses(run).values()), out.stderr
    # more decoding threads than cores: as many as there are, and a line at start says so
    assert f"data.num_workers={cores + 3}: {cores} cores here, {cores} workers" in stderr["ffcv"]
    assert len(loss["ffcv"]) == 5 and np.allclose(loss["ffcv"], loss["torch"], rtol=1e-5)


@pytest.mark.slow
def test_cifar10_accuracy_is_similar_with_both_loaders(tmp_path, cache, cifar10_jpeg_root):
    env = os.environ | {"DIST_ICM_CACHE": str(cache)}
    top1 = {}
    for loader in ("torch", "ffcv"):
        run = tmp_path / loader
        run_train(
            run,
            "experiment=cifar10_jpeg",
            "model=small_cnn",
            f"data.root={cifar10_jpeg_root}",
            f"data.loader={loader}",
            "data.num_workers=2",
            "train.epochs=3",
            "schedule=cosine",
            "train.progress=false",
            "train.tensorboard=false",
            env=env,
            timeout=3600,
        )
        summary = read_summary(run)
        top1[loader] = summary["top1"]
        print(loader, json.dumps(summary))
    assert top1["torch"] > 35 and abs(top1["ffcv"] - top1["torch"]) < 3.0, top1


@pytest.mark.parametrize("loader", ["ffcv", "torch"])
def test_a_run_whose_crops_ffcv_draws_unseeded_says_so_at_start(tmp_path, loader):
    # FFCV's random-resized crop (images over 32 px) draws from numba's unseeded generator
    from cli import setup_job
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split in ("train", "test"):
        for label in range(2):
            (tmp_path / "tree" / split / str(label)).mkdir(parents=True)
            for i in np.flatnonzero(digits.target == label)[:8]:
                pixels = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert("RGB").resize((48, 48)).save(
                    tmp_path / "tree" / split / str(label) / f"{i}.jpg"
                )
    job = setup_job(["experiment=quickstart", "data=imagefolder", f"data.root={tmp_path}/tree",
                     f"data.loader={loader}", f"data.ffcv_cache={tmp_path}/ffcv",
                     "data.global_batch=8", "loss.group_size=null",
                     "data.num_workers=0"])  # fmt: skip
    noted = [n for n in job.notes if "unseeded" in n]
    assert noted == ([] if loader == "torch" else [
        "data.augment=imagenet with data.loader=ffcv: FFCV draws its random-resized crops from "
        "an unseeded generator, so this run will not repeat, nor resume, bit for bit "
        "(data.loader=torch does)"])  # fmt: skip
