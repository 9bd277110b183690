"""Shared pytest fixtures.

``tmpfs``: mounts a small file system to fill (a full disk), where this machine lets it.
``cifar10_jpeg_root``: the real CIFAR-10 as a JPEG ImageFolder tree, unpacked once from
``../shared/data/cifar10-jpeg.tar.xz`` into ``$DIST_ICM_CACHE/cifar10-jpeg`` (default
``~/.cache/dist_icm/cifar10-jpeg``), never into the repository, atomically
(``dist_icm.data.unpack``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dist_icm.data.datasets import cache_root as project_cache
from dist_icm.data.unpack import unpack_once

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_JPEG_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def cache_root() -> Path:
    """Where test data is unpacked: ``$DIST_ICM_CACHE`` or ``~/.cache/dist_icm``."""
    root = project_cache().resolve()
    if root == REPO_ROOT or REPO_ROOT in root.parents:
        raise RuntimeError(f"DIST_ICM_CACHE={root} is inside the repository; point it elsewhere")
    return root


@pytest.fixture(scope="session")
def cifar10_jpeg_root() -> Path:
    """Folder holding ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` of CIFAR-10."""
    if not CIFAR10_JPEG_ARCHIVE.is_file():
        pytest.skip(
            "../shared/data/cifar10-jpeg.tar.xz not found: the CIFAR-10 JPEG archive lives beside "
            f"the repository (looked at {CIFAR10_JPEG_ARCHIVE})"
        )
    root = unpack_once(CIFAR10_JPEG_ARCHIVE, cache_root() / "cifar10-jpeg") / "cifar10"
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


@pytest.fixture
def tmpfs(tmp_path):
    """A function mounting a tmpfs of ``size`` bytes at a new folder; unmounted afterwards.
    Skips where mounting is not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    mounts = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command: cannot make a small file system to fill")
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode})")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)
