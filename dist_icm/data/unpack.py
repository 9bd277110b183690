"""Unpack an archive into a cache folder once, atomically.

Extraction goes to a temporary sibling folder that is renamed into place after a complete
unpack (with a marker file naming the archive and its size), so an interrupted unpack or
concurrent processes never leave or see a half-written tree. Used by the tests and by
``python -m dist_icm.bench data`` for the CIFAR-10 JPEG archive.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

MARKER = ".extracted"


def unpack_once(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` unless a complete unpack of it is already there."""
    stamp = f"{archive.name} {archive.stat().st_size}\n"
    marker = dest / MARKER
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
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
