"""``dist-icm-data`` (also ``python -m dist_icm.data.write``): write, or find, the FFCV cache
entry of a data set from the command line; :mod:`dist_icm.data.write` does the work.

Prints the entry as one JSON line, the only line on stdout (what it writes, and notes, go to
stderr); a bad option or data set prints one line (``dist_icm: error: ...``) and exits with
code 2, as the trainer does.
"""

from __future__ import annotations

import argparse
import json
import sys

from dist_icm.data import write
from dist_icm.data.datasets import DATASET_NAMES, DataError, build_datasets
from dist_icm.data.write import WRITE_MODES, WriteOptions, check_options, ensure_betons

__all__ = ["CLI_NAMES", "build_parser", "main"]

# how messages name the options here (the trainer's names: write.TRAINER_NAMES)
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
        description=write.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=DATASET_NAMES, help="the data set to write")
    parser.add_argument(
        "--root", type=_path, help="data set folder (CIFAR: where it is or goes; not digits)"
    )
    parser.add_argument(
        "--cache",
        type=_path,
        help="cache folder (default $DIST_ICM_CACHE/ffcv, else ~/.cache/dist_icm/ffcv)",
    )
    parser.add_argument(
        "--mode",
        default="auto",
        choices=WRITE_MODES,
        help="RGB storage: raw pixels, jpg, or auto (raw up to 64 px, else jpg; default)",
    )
    parser.add_argument("--max-side", type=int, help="cap the longer image side (RGB, > 64 px)")
    parser.add_argument(
        "--quality", type=int, default=90, help="JPEG quality 1-100 (mode jpg; default 90)"
    )
    parser.add_argument("--workers", type=_count, default=0, help="writer processes (0: all cores)")
    parser.add_argument(
        "--seed", type=_seed, default=0, help="digits' train/test split seed (default 0)"
    )
    parser.add_argument("--no-download", action="store_true", help="CIFAR: never download")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m dist_icm.data.write`` / ``dist-icm-data``: write (or find) a cache entry.

    Prints the entry as one JSON line on stdout (see the module's docstring).
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
        print(f"dist_icm: {note}", file=sys.stderr)
    print(json.dumps({"train": str(found.train), "test": str(found.test), "meta": found.meta}))
