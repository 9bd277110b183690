"""The torch data path: data sets, seeded subsets, per-sample augmentation, global batches.

Everything random here is a function of explicit seeds (and epoch and sample index), so a run
on one process and a run on P processes see the same global batches, augmented alike.
"""

from dist_icm.data.augment import AUGMENT_MODES, Augmented, normalize_only
from dist_icm.data.datasets import (
    DATASET_NAMES,
    DataError,
    DatasetSpec,
    TensorImageDataset,
    build_datasets,
)
from dist_icm.data.sampler import GlobalBatchSampler, make_loader
from dist_icm.data.subsets import (
    LabeledSubset,
    class_counts,
    labeled_subset,
    long_tailed,
    stratified_fraction,
)

__all__ = [
    "AUGMENT_MODES",
    "DATASET_NAMES",
    "Augmented",
    "DataError",
    "DatasetSpec",
    "GlobalBatchSampler",
    "LabeledSubset",
    "TensorImageDataset",
    "build_datasets",
    "class_counts",
    "labeled_subset",
    "long_tailed",
    "make_loader",
    "normalize_only",
    "stratified_fraction",
]
