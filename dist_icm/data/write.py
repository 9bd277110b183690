"""Write data sets to FFCV ``.beton`` files, cached by data set, split and options.

    python -m dist_icm.data.write cifar10 --root data/cifar10      # or: dist-icm-data cifar10 ...
    python -m dist_icm.data.write imagefolder --root /data/imagenet --max-side 512 --quality 90

One cache entry ``<cache>/<name>-<key>/`` holds ``train.beton``, ``test.beton`` and ``meta.json``
(written last: an entry without it is incomplete and is written again). The key hashes the data
set, its root, the digits split seed, the sizes and class names of the splits, the write options
and, for ImageFolder trees, each file's path, size and mtime (a file added, removed, moved or
rewritten makes a new entry), so a second run with the same inputs reuses the entry.
``<cache>`` is ``--cache`` (or ``data.ffcv_cache``), else ``$DIST_ICM_CACHE/ffcv``, else
``~/.cache/dist_icm/ffcv``.

Subsets (``data.fraction``, ``data.long_tail``) are never written: they select indices of the
full training ``.beton`` at load time, so each source is stored once per set of options.
Images: RGB data as ``RGBImageField`` (``raw`` pixels, or ``jpg`` at ``quality``; ``auto`` is raw
up to 64 pixels and jpg above, ``max_side`` caps the longer side); other data (digits, 1 channel)
as float32 ``NDArrayField``. Labels as ``IntField``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_icm.data.datasets import (
    DataError,
    DatasetSpec,
    _reason,
)
from dist_icm.data.datasets import cache_root as project_cache
from dist_icm.data.imagefolder import ImageFolderImages, load_rgb

__all__ = ["FFCV_INSTALL", "BetonSet", "WriteOptions", "ensure_betons"]

FORMAT = 1  # bump when what is written changes
FFCV_APT = "apt-get install -y libopencv-dev pkg-config libturbojpeg0-dev"
FFCV_INSTALL = f'install the system libraries (`{FFCV_APT}`), then `pip install -e ".[ffcv]"`'
WRITE_MODES = ("auto", "raw", "jpg")

# how messages name the options: the trainer's config keys (dist-icm-data's flags: data/cli.py)
TRAINER_NAMES = {
    "ffcv": "data.loader=ffcv",
    "root": "data.root",
    "cache": "data.ffcv_cache",
    "mode": "data.ffcv_write_mode",
    "max_side": "data.ffcv_max_side",
    "quality": "data.ffcv_quality",
    "workers": "data.num_workers",
    "download": "data.download=false",
    "imagefolder": "data=imagefolder",
}


def require_ffcv(what: str = TRAINER_NAMES["ffcv"]) -> None:
    """Raise a one-line :class:`DataError` saying how to install ffcv when it cannot be imported
    (``what`` names what needs it)."""
    threads = torch.get_num_threads()
    try:  # importing ffcv sets torch's threads to 1 (its Compiler's default): undone below
        import ffcv.loader  # noqa: F401  (also loads ffcv's C extension and its libraries)
    except Exception as e:  # ImportError, or OSError for a missing libturbojpeg / libopencv
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise DataError(f"{what} needs the ffcv package ({reason}): {FFCV_INSTALL}") from e
    finally:
        torch.set_num_threads(threads)


def check_options(
    mode: str, max_side: int | None, quality: int, names: dict[str, str] = TRAINER_NAMES
) -> None:
    """Raise a one-line :class:`DataError` naming the bad option (as ``names`` calls it)."""
    if mode not in WRITE_MODES:
        raise DataError(f"{names['mode']} must be one of {', '.join(WRITE_MODES)}, got {mode!r}")
    if max_side is not None and max_side < 8:
        raise DataError(f"{names['max_side']} must be >= 8, got {max_side}")
    if not 1 <= quality <= 100:
        raise DataError(f"{names['quality']} must lie in [1, 100], got {quality}")


@dataclass(frozen=True)
class WriteOptions:
    """How RGB images are stored (ignored for non-RGB data, which is stored raw)."""

    mode: str = "auto"  # auto | raw | jpg
    max_side: int | None = None  # resize so that the longer side is at most this
    quality: int = 90  # JPEG quality for mode jpg

    def __post_init__(self) -> None:
        check_options(self.mode, self.max_side, self.quality)

    def resolve(self, image_size: int) -> WriteOptions:
        """Concrete options: ``auto`` is raw up to 64 pixels and jpg above; ``max_side`` only
        applies above 64 pixels (smaller data is stored at the data set's fixed size)."""
        small = image_size <= 64
        mode = self.mode if self.mode != "auto" else ("raw" if small else "jpg")
        side = None if small else self.max_side
        return WriteOptions(mode, side, self.quality if mode == "jpg" else 90)


@dataclass(frozen=True)
class BetonSet:
    """A complete cache entry: the two files, how images are stored, and the data set's spec."""

    folder: Path
    kind: str  # "rgb" (RGBImageField) or "ndarray" (float32 CHW NDArrayField)
    fixed_size: bool  # every image has the spec's size (else decoders crop and resize)
    spec: DatasetSpec
    meta: dict

    @property
    def train(self) -> Path:
        return self.folder / "train.beton"

    @property
    def test(self) -> Path:
        return self.folder / "test.beton"


class _Source(Dataset):
    """What the writer's worker processes index: (HWC uint8 or CHW float32 array, label).

    Failures are recorded in a shared value (the first failing index) and a blank sample is
    returned instead, because ffcv's writer waits forever for a worker that died.
    """

    def __init__(self, base: Dataset, kind: str, fixed: bool) -> None:
        self.base, self.kind, self.fixed = base, kind, fixed
        self.failed = multiprocessing.Value("q", -1)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        try:
            return self._get(int(i))
        except Exception:
            with self.failed.get_lock():
                if self.failed.value < 0:
                    self.failed.value = int(i)
            blank = np.zeros((8, 8, 3), np.uint8) if self.kind == "rgb" else self._get(0)[0]
            return blank, 0

    def _get(self, i: int) -> tuple[np.ndarray, int]:
        base = self.base
        if isinstance(base, ImageFolderImages):  # PIL only: torch in ffcv's workers is slow
            path, label = base.samples[i]
            pixels = np.asarray(load_rgb(path), dtype=np.uint8)  # as the torch path's
            if not self.fixed or pixels.shape[:2] == (base.image_size,) * 2:
                return pixels, int(label)
        images = getattr(base, "images", None)
        if self.kind == "rgb" and isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            pixels = images[i].permute(1, 2, 0).numpy()  # CIFAR: uint8 CHW in memory
            return np.ascontiguousarray(pixels), int(base.targets[i])  # type: ignore[attr-defined]
        image, label = base[i]  # float CHW in [0, 1], resized by ImageFolderImages
        if self.kind == "ndarray":
            return image.numpy().astype(np.float32), int(label)
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        return np.ascontiguousarray(pixels.numpy()), int(label)

    def failure(self, i: int) -> DataError:
        """What went wrong with sample ``i``, in the torch path's words (read once more here)."""
        try:
            self._get(i)
        except DataError as e:
            return e
        except Exception as e:
            return DataError(f"cannot read sample {i} ({_reason(e)}): fix or remove it")
        return DataError(f"cannot read sample {i} (it failed in a writer process): try again")


def _files_digest(data: ImageFolderImages) -> str:
    """A digest of an ImageFolder split's files (path under the split, size, mtime; one stat
    each, nothing read), so that a file added, removed, moved to another class or rewritten
    makes another cache entry."""
    digest = hashlib.sha256()
    for path, _ in data.samples:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:  # met (and named) when it is read
            stamp = "?"
        digest.update(f"{os.path.relpath(path, data.root)}\0{stamp}\0".encode())
    return digest.hexdigest()


def cache_root(cache: str | None) -> Path:
    """``cache``, else ``$DIST_ICM_CACHE/ffcv``, else ``~/.cache/dist_icm/ffcv``."""
    if cache:
        return Path(cache).expanduser()
    return project_cache() / "ffcv"


def _write(source: _Source, path: Path, options: WriteOptions, workers: int) -> None:
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    if source.kind == "rgb":
        image = RGBImageField(options.mode, options.max_side, jpeg_quality=options.quality)
    else:
        image = NDArrayField(np.dtype("float32"), tuple(source._get(0)[0].shape))
    tmp = path.with_suffix(".beton.tmp")
    writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()}, num_workers=workers)
    with _progress_on_a_terminal():
        writer.from_indexed_dataset(source, chunksize=64)
    if source.failed.value >= 0:
        tmp.unlink(missing_ok=True)
        raise source.failure(source.failed.value)
    tmp.replace(path)


@contextlib.contextmanager
def _progress_on_a_terminal():
    """ffcv's writer draws a tqdm bar (it has no flag for it): shown, as the trainer's, only on
    a terminal, and wiped when done, so that an error stays the one line on stderr."""
    import ffcv.writer

    bar = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(bar, disable=not sys.stderr.isatty(), leave=False)
    try:
        yield
    finally:
        ffcv.writer.tqdm = bar


def ensure_betons(
    train: Dataset,
    test: Dataset,
    spec: DatasetSpec,
    *,
    name: str,
    root: str | None,
    seed: int,
    options: WriteOptions = WriteOptions(),
    cache: str | None = None,
    workers: int = 0,
    names: dict[str, str] = TRAINER_NAMES,
) -> BetonSet:
    """The cache entry of these splits and options, written first if it is not complete.

    Safe under several processes: they take a file lock, the first writes, the others reuse.
    Problems raise a one-line :class:`DataError` naming the option as ``names`` calls it.
    """
    require_ffcv(names["ffcv"])
    if cache == "":  # not the default folder, unasked
        raise DataError(f"{names['cache']} is empty: name a folder, or leave it unset")
    if workers < 0:
        raise DataError(f"{names['workers']} must be >= 0 (0: all cores), got {workers}")
    kind = "rgb" if spec.in_channels == 3 else "ndarray"
    opts = options.resolve(spec.image_size)
    fixed = kind == "ndarray" or spec.image_size <= 64
    ident = {
        "format": FORMAT,
        "name": name,
        # digits come from scikit-learn, whatever the root: one entry for all roots
        "root": str(Path(root).expanduser().resolve()) if root and name != "digits" else None,
        "seed": seed if name == "digits" else None,  # only digits' split depends on it
        "sizes": [len(train), len(test)],  # type: ignore[arg-type]
        "classes": list(spec.class_names),
        "options": asdict(opts) if kind == "rgb" else None,
    }
    if isinstance(train, ImageFolderImages):  # CIFAR's files are checksummed, digits' embedded
        ident["files"] = [_files_digest(train), _files_digest(test)]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root(cache) / f"{name}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        where = f"{names['cache']}={cache}" if cache else "the FFCV cache"
        raise DataError(
            f"{where}: cannot create {e.filename or folder} ({e.strerror or e}): "
            f"set {names['cache']} to a folder that can be written"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            workers = workers or len(os.sched_getaffinity(0))
            for split, data in (("train", train), ("test", test)):
                n = len(data)  # type: ignore[arg-type]
                print(f"dist_icm: writing {name} {split} ({n} images) to {folder}", file=sys.stderr)
                _write(_Source(data, kind, fixed), folder / f"{split}.beton", opts, workers)
            sizes = {s: (folder / f"{s}.beton").stat().st_size for s in ("train", "test")}
            meta = ident | {"kind": kind, "fixed_size": fixed, "bytes": sizes, "spec": asdict(spec)}
            meta_path.with_suffix(".tmp").write_text(json.dumps(meta, indent=1))
            meta_path.with_suffix(".tmp").replace(meta_path)
        meta = json.loads(meta_path.read_text())
    return BetonSet(folder, kind, fixed, spec, meta)


if __name__ == "__main__":  # python -m dist_icm.data.write: dist-icm-data's command line
    from dist_icm.data.cli import main

    main()
