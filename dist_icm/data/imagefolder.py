"""ImageFolder trees (``<root>/{train,test or val}/<class>/**/<image>``) as raw data sets.

Files are listed as torchvision's ImageFolder lists them (classes sorted, then folders, then
names), except that names starting with "." are skipped (``.thumbnails/``, macOS's ``._x.jpg``)
and a link that leads back into a folder being read stops the run naming it (torchvision
would read the tree again, or forever). Every image is read as 8-bit RGB by one function that
both loaders share (:func:`load_rgb`; 16-bit grey is scaled down, not clipped to white), and is
resized to one square size: the most common shorter side of a small sample of the images, with
a start-up note naming files where the sample holds other sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_icm.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    DatasetSpec,
    _reason,
)


def rgb8(image):
    """A PIL image of any mode as 8-bit RGB: 16-bit (and 32-bit integer) grey is scaled down
    (``>> 8``) instead of clipped to white, as ``convert("RGB")`` would."""
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        image = Image.fromarray(pixels.astype(np.uint8), "L")
    return image.convert("RGB")


def load_rgb(path: str):
    """The image at ``path`` as an 8-bit RGB PIL image (both loaders read through this), or a
    :class:`DataError` naming the file and why."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return rgb8(image)
    except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), ...
        raise DataError(f"cannot read image {path} ({_reason(e)}): fix or remove it") from e


def _class_files(folder: str) -> list[str]:
    """The image files below ``folder`` in torchvision's ImageFolder order (sorted by folder,
    then name), following links but refusing one that leads back into a folder being read
    (``os.walk(followlinks=True)`` would read it again, or forever); names starting with "."
    are skipped."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    found: list[tuple[str, list[str]]] = []

    def walk(path: str, open_: tuple[str, ...]) -> None:
        real = os.path.realpath(path)
        if real in open_:  # name the first link on the way
            parts = Path(os.path.relpath(path, folder)).parts
            steps = [os.path.join(folder, *parts[: k + 1]) for k in range(len(parts))]
            link = next((p for p in steps if os.path.islink(p)), path)
            raise DataError(
                f"{link} is a link loop ({path} is {real} again): remove or replace the link"
            )
        files = []
        for entry in os.scandir(path):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows links
                walk(entry.path, (*open_, real))
            elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                files.append(entry.name)
        found.append((path, sorted(files)))

    walk(folder, ())
    return [os.path.join(path, name) for path, names in sorted(found) for name in names]


def _size_sample(samples: list[tuple[str, int]], n: int = 64) -> list[int]:
    """Indices of a small deterministic sample: evenly spaced, and each class's first (for up
    to ``n`` classes); index 0 first."""
    spaced = np.linspace(0, len(samples) - 1, min(n, len(samples))).round().astype(int)
    firsts = {}
    for i, (_, label) in enumerate(samples):
        firsts.setdefault(label, i)
    return sorted(set(spaced.tolist()) | set(list(firsts.values())[:n]))


class ImageFolderImages(Dataset):
    """An ImageFolder tree (``<root>/<class>/**/<image>``, torchvision's order; names starting
    with "." are skipped) that yields RGB float CHW tensors of one fixed square size.

    Images whose size differs from ``image_size`` are resized (shorter side) and centre-cropped,
    which is deterministic, so that default collation works on trees of mixed sizes. Without
    ``image_size`` it is the most common shorter side of a small sample of the images (their
    headers only); where the sample holds other sizes, or non-square images, :attr:`notes` says
    so, naming files.
    """

    def __init__(self, root: Path, image_size: int | None = None) -> None:
        self.root = str(root)
        with os.scandir(root) as entries:
            classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        if not classes:  # as torchvision's ImageFolder
            raise FileNotFoundError(f"Couldn't find any class folder in {root}.")
        self.classes: list[str] = sorted(classes)
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in _class_files(os.path.join(root, name))
        ]
        self.targets: list[int] = [label for _, label in self.samples]
        empty = sorted(set(self.classes) - {self.classes[t] for t in set(self.targets)})
        if empty:  # as torchvision's ImageFolder
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}.")
        self.notes: list[str] = []
        self.image_size = image_size or self._choose_size()

    def _choose_size(self) -> int:
        from PIL import Image

        first = self.samples[0][0]
        sizes = {first: load_rgb(first).size}  # the first whole: a broken tree stops at start
        for i in _size_sample(self.samples)[1:]:
            path = self.samples[i][0]
            try:
                with Image.open(path) as image:  # the header only
                    sizes[path] = image.size
            except Exception:  # met (and named) when it is read
                continue
        shorter = [min(size) for size in sizes.values()]
        size = max(sorted(set(shorter)), key=shorter.count)  # most common; a tie: the smallest
        odd = [(p, s) for p, s in sizes.items() if s != (size, size)]
        if odd:
            oblong = [(p, (w, h)) for p, (w, h) in odd if w != h]  # named too, if any
            shown = [odd[0], *[x for x in oblong[:1] if x != odd[0]]] if oblong else odd[:2]
            named = ", ".join(f"{p} is {w}x{h}" for p, (w, h) in shown)
            self.notes.append(
                f"{self.root}: {len(odd)} of {len(sizes)} images sampled are not {size}x{size} "
                f"({named}): every image is resized (shorter side) and centre-cropped to "
                f"{size}x{size}"
            )
        return size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import torchvision.transforms.functional as TF

        path, label = self.samples[i]
        image = TF.to_tensor(load_rgb(path))
        s = self.image_size
        if image.shape[-2:] != (s, s):
            image = TF.center_crop(TF.resize(image, s, antialias=True), [s, s])
        return image, int(label)


def imagefolder_sets(
    root: str | None, names: dict[str, str]
) -> tuple[Dataset, Dataset, DatasetSpec]:
    if not root:
        raise DataError(
            f"imagefolder needs {names['root']}: a folder holding train/ and test/ (or val/)"
        )
    base = Path(root).expanduser()
    if not base.is_dir():  # checked here, not in the config: each node may read its own copy
        raise DataError(
            f"{names['root']} '{base}' is not a folder ({names['imagefolder']} needs one)"
        )
    train_dir = base / "train"
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"imagefolder root '{base}' must hold train/<class>/*.jpg and test/<class>/*.jpg "
            f"(or val/ instead of test/): point {names['root']} at such a folder"
        )
    try:
        train = ImageFolderImages(train_dir)
        test = ImageFolderImages(test_dir, train.image_size)
    except (FileNotFoundError, OSError) as e:
        raise DataError(
            f"imagefolder under {str(base)!r} is unusable ({_reason(e)}): check the tree"
        ) from e
    if test.classes != train.classes:
        raise DataError(f"{train_dir} and {test_dir} have different class folders: make them match")
    if len(train.classes) < 2:
        raise DataError(
            f"{train_dir} has {len(train.classes)} class folder(s): classification needs 2 or more"
        )
    mean, std = (
        (CIFAR10_MEAN, CIFAR10_STD) if train.image_size == 32 else (IMAGENET_MEAN, IMAGENET_STD)
    )
    spec = DatasetSpec(
        len(train.classes), 3, train.image_size, tuple(train.classes), mean, std, tuple(train.notes)
    )
    return train, test, spec
