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

import argparse
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
    DATASET_NAMES,
    DataError,
    DatasetSpec,
    _reason,
    build_datasets,
)
from dist_icm.data.datasets import cache_root as project_cache
from dist_icm.data.imagefolder import ImageFolderImages, load_rgb

__all__ = ["FFCV_INSTALL", "BetonSet", "WriteOptions", "ensure_betons", "main"]

FORMAT = 1  # bump when what is written changes
FFCV_APT = "apt-get install -y libopencv-dev pkg-config libturbojpeg0-dev"
FFCV_INSTALL = f'install the system libraries (`{FFCV_APT}`), then `pip install -e ".[ffcv]"`'
WRITE_MODES = ("auto", "raw", "jpg")

# how messages name the options: the trainer's config keys, or dist-icm-data's flags
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
CLI_NAMES = {
    "ffcv": "dist-icm-data",
    "root": "--root",
    "cache": "--cache",
    "mode": "--mode",
    "max_side": "--max-side",
    "quality": "--quality",
    "workers": "--workers",
    "download": "--no-download",
    "imagefolder": "dist-icm-data imagefolder",
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


def _files_digest(data: Dataset) -> str | None:
    """A digest of an ImageFolder split's files (path under the split, size, mtime; one stat
    each, nothing read), so that a file added, removed, moved to another class or rewritten
    makes another cache entry; None for other data sets (CIFAR's files are checksummed)."""
    if not isinstance(data, ImageFolderImages):
        return None
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
    if isinstance(train, ImageFolderImages):  # only: the other data sets keep their entries
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
                print(f"dist_icm: writing {name} {split} ({n} images) to {folder}", flush=True)
                _write(_Source(data, kind, fixed), folder / f"{split}.beton", opts, workers)
            sizes = {s: (folder / f"{s}.beton").stat().st_size for s in ("train", "test")}
            meta = ident | {"kind": kind, "fixed_size": fixed, "bytes": sizes, "spec": asdict(spec)}
            meta_path.with_suffix(".tmp").write_text(json.dumps(meta, indent=1))
            meta_path.with_suffix(".tmp").replace(meta_path)
        meta = json.loads(meta_path.read_text())
    return BetonSet(folder, kind, fixed, spec, meta)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends like the trainer's: one line, exit code 2."""

    def error(self, message: str):
        print(f"dist_icm: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _seed(text: str) -> int:
    """``--seed``: an integer in [0, 2^32), as ``train.seed``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2^32), got {value}")
    return value


def _count(text: str) -> int:
    """``--workers``: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: all cores), got {value}")
    return value


def _path(text: str) -> str:
    """``--root``, ``--cache``: not empty (which would mean the current or the default folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """``dist-icm-data``'s command line (every option has a help text)."""
    parser = _Parser(
        prog="dist-icm-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=DATASET_NAMES, help="the data set to write")
    parser.add_argument(
        "--root", type=_path, help="data set folder (CIFAR: where it is or goes; not digits)"
    )
    parser.add_argument("--cache", type=_path, help="cache folder (default $DIST_ICM_CACHE/ffcv)")
    parser.add_argument(
        "--mode",
        default="auto",
        choices=WRITE_MODES,
        help="RGB storage: raw pixels, jpg, or auto (raw up to 64 px, else jpg; default)",
    )
    parser.add_argument("--max-side", type=int, help="cap the longer image side (RGB, > 64 px)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (mode jpg)")
    parser.add_argument("--workers", type=_count, default=0, help="writer processes (0: all cores)")
    parser.add_argument("--seed", type=_seed, default=0, help="digits' train/test split seed")
    parser.add_argument("--no-download", action="store_true", help="CIFAR: never download")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m dist_icm.data.write`` / ``dist-icm-data``: write (or find) a cache entry.

    Prints the entry as one JSON line; a bad option or data set prints one line
    (``dist_icm: error: ...``) and exits with code 2, as the trainer does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    names = CLI_NAMES
    try:
        check_options(args.mode, args.max_side, args.quality, names)
        train, test, spec = build_datasets(
            args.name, args.root, download=not args.no_download, seed=args.seed, names=names
        )
        found = ensure_betons(
            train,
            test,
            spec,
            name=args.name,
            root=args.root,
            seed=args.seed,
            options=WriteOptions(args.mode, args.max_side, args.quality),
            cache=args.cache,
            workers=args.workers,
            names=names,
        )
    except DataError as e:
        print(f"dist_icm: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    for note in spec.notes:  # e.g. which size an ImageFolder tree of mixed sizes is read at
        print(f"dist_icm: {note}", flush=True)
    print(json.dumps({"train": str(found.train), "test": str(found.test), "meta": found.meta}))


if __name__ == "__main__":
    main()
