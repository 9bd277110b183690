"""Seeded subset selection that returns sorted index arrays (data is never copied).

``targets`` may be a list, a NumPy array or a 1-D tensor of integer labels (a data set's
``.targets``). Use :func:`labeled_subset` to turn indices into a data set that keeps
``.targets``, so subsets of subsets and the augmentation wrappers keep working.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from dist_icm import streams

__all__ = [
    "LabeledSubset",
    "as_labels",
    "class_counts",
    "labeled_subset",
    "long_tailed",
    "stratified_fraction",
]

Targets = Sequence[int] | np.ndarray | torch.Tensor


def as_labels(targets: Targets) -> np.ndarray:
    """Labels as a 1-D int64 array."""
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    labels = np.asarray(targets)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"targets must be a 1-D array of integer labels, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("targets must be non-negative class indices")
    return labels.astype(np.int64)


def _per_class(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, indices of that class) for every class present, in class order."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return list(zip(classes.tolist(), np.split(order, starts[1:]), strict=True))


def class_counts(targets: Targets, num_classes: int) -> np.ndarray:
    """Number of samples of each class 0..num_classes-1."""
    labels = as_labels(targets)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} out of range for num_classes={num_classes}")
    return np.bincount(labels, minlength=num_classes)


def stratified_fraction(targets: Targets, fraction: float, seed: int) -> np.ndarray:
    """Keep ``fraction`` of every class, chosen at random per class; sorted indices.

    Class ``c`` with ``n_c`` samples keeps ``round(fraction * n_c)`` of them (halves round up),
    at least one.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = streams.rng("fraction", seed)
    kept = []
    for _, idx in _per_class(as_labels(targets)):
        k = max(1, int(np.floor(fraction * len(idx) + 0.5)))
        kept.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def long_tailed(targets: Targets, imbalance: float, seed: int) -> np.ndarray:
    """Exponential long-tailed profile (Cao et al., 2019, LDAM); sorted indices.

    With ``C`` classes present (in label order, ``c = 0..C-1``) and ``n_max`` the largest class
    size, class ``c`` keeps ``floor(n_max * imbalance ** (c / (C - 1)))`` samples (at least 1,
    at most what it has), chosen at random per class. ``imbalance`` is rho = n_min / n_max.
    """
    if not 0.0 < imbalance <= 1.0:
        raise ValueError(f"imbalance must be in (0, 1], got {imbalance}")
    groups = _per_class(as_labels(targets))
    if not groups:
        return np.zeros(0, dtype=np.int64)
    n_max = max(len(idx) for _, idx in groups)
    span = max(len(groups) - 1, 1)
    rng = streams.rng("long_tail", seed)
    kept = []
    for c, (_, idx) in enumerate(groups):
        # the epsilon keeps products such as 100 * 0.29 = 28.999999999999996 from flooring to 28
        k = int(np.floor(n_max * imbalance ** (c / span) + 1e-9))
        kept.append(rng.choice(idx, size=min(max(k, 1), len(idx)), replace=False))
    return np.sort(np.concatenate(kept))


class LabeledSubset(Subset):
    """A torch ``Subset`` that also exposes the ``.targets`` of its samples."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray) -> None:
        super().__init__(dataset, [int(i) for i in indices])
        labels = as_labels(dataset.targets)  # type: ignore[attr-defined]
        self.targets = torch.from_numpy(labels[np.asarray(self.indices, dtype=np.int64)])


def labeled_subset(dataset: Dataset, indices: Sequence[int] | np.ndarray) -> LabeledSubset:
    """``dataset`` restricted to ``indices`` (e.g. from :func:`stratified_fraction`)."""
    return LabeledSubset(dataset, indices)
