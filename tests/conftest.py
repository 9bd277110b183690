"""Shared pytest fixtures.

``cifar10_jpeg_root``: the real CIFAR-10 as a JPEG ImageFolder tree, unpacked once from
``../shared/data/cifar10-jpeg.tar.xz`` into ``$DIST_ICM_CACHE/cifar10-jpeg`` (default
``~/.cache/dist_icm/cifar10-jpeg``), never into the repository. Extraction goes to a temporary
sibling folder that is renamed into place after a complete unpack (with a marker file), so an
interrupted run or concurrent pytest-xdist workers never leave or see a half-written tree.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from dist_icm.data.datasets import cache_root as project_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_JPEG_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
MARKER = ".extracted"


def cache_root() -> Path:
    """Where test data is unpacked: ``$DIST_ICM_CACHE`` or ``~/.cache/dist_icm``."""
    root = project_cache().resolve()
    if root == REPO_ROOT or REPO_ROOT in root.parents:
        raise RuntimeError(f"DIST_ICM_CACHE={root} is inside the repository; point it elsewhere")
    return root


def _unpack_once(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` unless a complete unpack of it is already there."""
    stamp = f"{archive.name} {archive.stat().st_size}\n"
    marker = dest / MARKER
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:xz") as tar:
            # filter="data" (Python >= 3.10.12 / 3.11.4) refuses links and paths out of tmp
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **safe)
        (tmp / MARKER).write_text(stamp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if dest.exists() and not (marker.is_file() and marker.read_text() == stamp):
            shutil.rmtree(dest)  # stale or incomplete
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first
            if not (marker.is_file() and marker.read_text() == stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@pytest.fixture(scope="session")
def cifar10_jpeg_root() -> Path:
    """Folder holding ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` of CIFAR-10."""
    if not CIFAR10_JPEG_ARCHIVE.is_file():
        pytest.skip(
            "../shared/data/cifar10-jpeg.tar.xz not found: the CIFAR-10 JPEG archive lives beside "
            f"the repository (looked at {CIFAR10_JPEG_ARCHIVE})"
        )
    root = _unpack_once(CIFAR10_JPEG_ARCHIVE, cache_root() / "cifar10-jpeg") / "cifar10"
    assert (root / "train").is_dir() and (root / "test").is_dir(), f"unexpected layout in {root}"
    return root


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly, with a reason, where no CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
