"""Raw data sets: float32 CHW images in [0, 1] and integer labels, no augmentation.

Every data set returned by :func:`build_datasets` exposes ``.targets`` (one label per sample)
so that subsets can stratify without decoding images. Normalisation statistics travel in the
:class:`DatasetSpec`; augmentation and normalisation are applied by ``dist_icm.data.augment``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_icm.folders import missing_top, remove_empty


def cache_root() -> Path:
    """The project's cache folder: ``$DIST_ICM_CACHE``, else ``~/.cache/dist_icm``.

    Unpacked test data and FFCV ``.beton`` files live below it, never in the repository.
    """
    return Path(os.environ.get("DIST_ICM_CACHE", "~/.cache/dist_icm")).expanduser()


__all__ = ["DATASET_NAMES", "DataError", "DatasetSpec", "TensorImageDataset", "build_datasets"]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagefolder", "cifair10", "cifair100")

# ciFAIR (Barz & Denzler 2020, https://cvjena.github.io/cifair/): CIFAR's training sets with the
# test-set near-duplicates replaced. The official release and checksums, as in its own torchvision
# loaders (github.com/cvjena/cifair, loaders/pytorch/cifair.py): each zip holds the whole data set
# in CIFAR's pickle layout under ciFAIR-10/ (ciFAIR-100/); the training files are CIFAR's own.
CIFAIR = {
    "cifair10": {
        "pretty": "ciFAIR-10",
        "base_folder": "ciFAIR-10",
        "url": "https://github.com/cvjena/cifair/releases/download/v1.0/ciFAIR-10.zip",
        "filename": "ciFAIR-10.zip",
        "tgz_md5": "ca08fd390f0839693d3fc45c4e49585f",
        "test_list": [["test_batch", "01290e6b622a1977a000eff13650aca2"]],
    },
    "cifair100": {
        "pretty": "ciFAIR-100",
        "base_folder": "ciFAIR-100",
        "url": "https://github.com/cvjena/cifair/releases/download/v1.0/ciFAIR-100.zip",
        "filename": "ciFAIR-100.zip",
        "tgz_md5": "ddc236ab4b12eeb8b20b952614861a33",
        "test_list": [["test", "8130dae8d6fc6a436437f0ebdb801df1"]],
    },
}


def _cifair_class(name: str):
    """torchvision's CIFAR10/CIFAR100 reading (and md5-checked download) of a ciFAIR release.

    ``download`` fetches :data:`CIFAIR`'s zip and checks its md5, then torchvision extracts it;
    reading checks every file's md5 (the training files' are CIFAR's, inherited).
    """
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    info = CIFAIR[name]
    base = datasets.CIFAR10 if name == "cifair10" else datasets.CIFAR100

    def download(self) -> None:  # torchvision's CIFAR.download, for a .zip instead of a .tar.gz
        if self._check_integrity():
            return
        download_and_extract_archive(self.url, self.root, filename=self.filename, md5=self.tgz_md5)

    fields = {k: v for k, v in info.items() if k != "pretty"}
    return type(f"CiFAIR{name.removeprefix('cifair')}", (base,), fields | {"download": download})


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """A data set cannot be built or a file of it cannot be read; the message's first line says
    what the user should do (the entry point prints that line).

    A DataError raised in a DataLoader worker comes back to the main process re-raised by
    torch as ``DataError("Caught DataError in DataLoader worker process 0.\nOriginal
    Traceback ...")``; the original message is then put first, the worker's traceback after it.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        if isinstance(message, str) and message.startswith("Caught DataError"):
            prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
            lines = message.splitlines()
            original = [line[len(prefix) :] for line in lines if line.startswith(prefix)]
            if original:
                message = "\n".join([original[-1], *lines])
        super().__init__(message, *args)


@dataclass(frozen=True)
class DatasetSpec:
    """What the trainer needs to know about a data set."""

    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    notes: tuple[str, ...] = field(default=(), compare=False)  # start-up lines about the data


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W) with labels; uint8 images are scaled to [0, 1] on access."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.ndim != 4 or len(images) != len(targets):
            raise ValueError(f"need images (N,C,H,W) and N targets, got {tuple(images.shape)}")
        self.images = images
        self.targets = targets.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return image, int(self.targets[i])


def _reason(error: BaseException) -> str:
    if type(error).__name__ == "UnidentifiedImageError":  # its message repeats the file
        return "not an image file PIL can decode"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _digits_arrays(seed: int) -> tuple[np.ndarray, ...]:
    """scikit-learn's digits and its stratified 75/25 split for ``seed``: (images (n, 64) in
    [0, 1] as float32, labels (int64), train indices, test indices).

    They come from scikit-learn once and from the cache folder afterwards (``digits/``, keyed by
    scikit-learn's version and the seed): importing scikit-learn takes about 1.7 s here, in every
    process of a run, a fifth of a 2-step quickstart run's 8.5 s. An unreadable cache file is
    made again; a cache folder that cannot be written is left alone.
    """
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:  # the import below says so in its words
        version = "unknown"
    path = cache_root() / "digits" / f"sklearn-{version}-seed-{seed}.npz"
    try:
        with np.load(path) as saved:
            return tuple(saved[k] for k in ("images", "labels", "train", "test"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent or unreadable: made again below
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=seed
    )
    arrays = {"images": images, "labels": labels, "train": train, "test": test}
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # nodes share
    try:  # written whole, then renamed: a reader never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return images, labels, train, test


def _digits(seed: int) -> tuple[Dataset, Dataset, DatasetSpec]:
    images, labels, train_idx, test_idx = _digits_arrays(seed)
    x = torch.from_numpy(images).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(labels)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train = TensorImageDataset(x[train_idx], y[train_idx])
    test = TensorImageDataset(x[test_idx], y[test_idx])
    spec = DatasetSpec(
        num_classes=10,
        in_channels=1,
        image_size=8,
        class_names=tuple(str(c) for c in range(10)),
        mean=(float(train.images.mean()),),
        std=(float(train.images.std()),),
    )
    return train, test, spec


def _cifar(
    name: str, root: str | None, download: bool, names: dict[str, str]
) -> tuple[Dataset, Dataset, DatasetSpec]:
    from torchvision import datasets

    if name in CIFAIR:
        pretty, cls = CIFAIR[name]["pretty"], _cifair_class(name)
    else:
        pretty, cls = {
            "cifar10": ("CIFAR-10", datasets.CIFAR10),
            "cifar100": ("CIFAR-100", datasets.CIFAR100),
        }[name]
    if root is None:
        raise DataError(
            f"{pretty} needs a root folder: set {names['root']} to where it is (or goes)"
        )
    if (where := Path(root).expanduser()).exists() and not where.is_dir():
        raise DataError(f"{names['root']} '{root}' is a file: {pretty} needs a folder")
    splits = []
    made = missing_top(Path(root))  # what a failed download would leave behind, empty
    for train in (True, False):
        try:
            raw = cls(root, train=train, download=download)
        except Exception as e:  # URLError, RuntimeError("Dataset not found"), checksum errors...
            remove_empty(Path(root), made)
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            how = "could not be downloaded" if download else names["download"]
            if name in CIFAIR:
                url, folder = CIFAIR[name]["url"], CIFAIR[name]["base_folder"]
                raise DataError(
                    f"{pretty} not found under '{root}' and {how} ({reason}): on a machine with "
                    f"internet download {url} and unzip it into {root} (it holds {folder}/)"
                ) from e
            raise DataError(
                f"{pretty} not found under '{root}' and {how} ({reason}): "
                f"download it on a machine with internet into {root}, "
                f"or use {names['imagefolder']} with a JPEG tree"
            ) from e
        images = torch.from_numpy(raw.data).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
        splits.append((TensorImageDataset(images, torch.as_tensor(raw.targets)), raw.classes))
    (train_ds, classes), (test_ds, _) = splits
    ten = name in ("cifar10", "cifair10")  # ciFAIR's training sets are CIFAR's: same statistics
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if ten else (CIFAR100_MEAN, CIFAR100_STD)
    spec = DatasetSpec(len(classes), 3, 32, tuple(classes), mean, std)
    return train_ds, test_ds, spec


# how messages name the options (dist-icm-data passes its own flags)
OPTION_NAMES = {
    "root": "data.root",
    "download": "data.download=false",
    "imagefolder": "data=imagefolder",
}


def build_datasets(
    name: str,
    root: str | None,
    *,
    download: bool = True,
    seed: int = 0,
    names: dict[str, str] = OPTION_NAMES,
) -> tuple[Dataset, Dataset, DatasetSpec]:
    """Build (train, test, spec) for ``name`` in :data:`DATASET_NAMES`; raises :class:`DataError`.

    ``seed`` only affects ``digits`` (its stratified train/test split); ``root`` is ignored there.
    Messages name the options as ``names`` calls them (:data:`OPTION_NAMES`: the config keys).
    """
    if name == "digits":
        return _digits(seed)
    if name in ("cifar10", "cifar100", *CIFAIR):
        return _cifar(name, root, download, names)
    if name == "imagefolder":
        from dist_icm.data.imagefolder import imagefolder_sets

        return imagefolder_sets(root, names)
    raise DataError(f"unknown data set '{name}': choose one of {', '.join(DATASET_NAMES)}")
