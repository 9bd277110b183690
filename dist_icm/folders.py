"""Folders a step of the run makes, and taking them back when it fails.

Before making a folder (a run folder, a data root a download fills), note the top-most of its
folders that does not exist yet (:func:`missing_top`); after a failure, remove the empty ones
of them again, never a folder that was there before (:func:`remove_empty`).
"""

from __future__ import annotations

from pathlib import Path


def missing_top(path: Path) -> Path | None:
    """The top-most folder of ``path`` (made absolute) that does not exist yet; None where
    ``path`` exists."""
    top, path = None, Path(path).absolute()
    while path != path.parent and not path.exists():
        top, path = path, path.parent
    return top


def remove_empty(path: Path, top: Path | None) -> None:
    """Remove ``path`` and its parents up to ``top`` (what :func:`missing_top` found missing),
    each only while empty; nothing when ``top`` is None."""
    if top is None:
        return
    path = Path(path).absolute()
    while path == top or top in path.parents:
        try:
            path.rmdir()  # only when empty
        except OSError:
            return
        path = path.parent
