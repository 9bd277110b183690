"""Unpack an archive into a cache folder once, atomically.

Extraction goes to a temporary sibling folder that is renamed into place after a complete
unpack (with a marker file naming the archive and its size), so an interrupted unpack never
leaves a half-written tree. Concurrent processes take turns (a lock on the parent folder):
the first unpacks, the others find its marker and use its tree, so none removes a tree another
has already been given (two that both found a stale tree used to remove it under each other).
Used by the tests and by ``python -m dist_icm.bench data`` for the CIFAR-10 JPEG archive.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

MARKER = ".extracted"


def unpack_once(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` unless a complete unpack of it is already there."""
    stamp = f"{archive.name} {archive.stat().st_size}\n"
    marker = dest / MARKER

    def done() -> bool:
        return marker.is_file() and marker.read_text() == stamp

    if done():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(dest.parent, os.O_RDONLY)  # the lock: no file of its own left behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if done():  # unpacked by another process while this one waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            with tarfile.open(archive, "r:*") as tar:
                # filter="data" (Python >= 3.10.12 / 3.11.4) refuses links and paths out of tmp
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, **safe)
            (tmp / MARKER).write_text(stamp)
            tmp.chmod(0o755)  # mkdtemp makes it private
            if dest.exists():
                shutil.rmtree(dest)  # stale or incomplete: no process holds it (the lock)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(folder)  # and with it the lock
    return dest
