"""Named random streams: every consumer of randomness draws from a generator of its own.

A generator is ``np.random.default_rng([tag, seed, *key])``: the consumer's tag first, then the
run's seed, then a key of the consumer's fixed arity (epoch, step, sample or group index...).
NumPy's ``SeedSequence`` ignores trailing zeros (``[s, 0]``, ``[s, 0, 0]`` and ``[s]`` are one
stream), so untagged keys of different consumers collide whenever the numbers happen to agree:
sample 0's crop in epoch 0 and the mixing weight of step 0 would be the same draw. A distinct
leading tag per consumer keeps them apart, and a fixed arity per tag keeps one consumer's keys
apart from each other.

Consumers and keys:

========== ================================= ===========================================
tag        key                               drawn by
========== ================================= ===========================================
sampler    (epoch,)                          the global-batch permutation of an epoch
augment    (epoch, sample index)             crop and flip of one training sample
mix_batch  (step,)                           λ for the batch, CutMix's box
mix_group  (step, global group index)        partners (and per-sample λ) of one group
fraction   ()                                ``data.fraction``'s stratified subset
long_tail  ()                                ``data.long_tail``'s subset
init       ()                                the model's initial weights (torch's RNG)
model      (step, rank)                      dropout / drop-path masks (torch's RNG)
========== ================================= ===========================================

The ``model`` stream is the one keyed by rank on purpose: a model's own random layers draw
different masks on different ranks (as they would for different samples in one process), so a
model with dropout gives reproducible runs and exact resumes for a fixed world size, but not
the same losses on a different number of processes.
"""

from __future__ import annotations

import numpy as np
import torch

# tag -> (number, arity of the key after the seed); numbers are part of every stream's identity
STREAMS: dict[str, tuple[int, int]] = {
    "sampler": (1, 1),
    "augment": (2, 2),
    "mix_batch": (3, 1),
    "mix_group": (4, 2),
    "fraction": (5, 0),
    "long_tail": (6, 0),
    "init": (7, 0),
    "model": (8, 2),
}


def entropy(stream: str, seed: int, *key: int) -> list[int]:
    """The seed words of ``stream``'s generator for ``seed`` and ``key`` (checked arity)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}: one of {', '.join(STREAMS)}")
    tag, arity = STREAMS[stream]
    if len(key) != arity:
        raise ValueError(f"stream {stream!r} takes {arity} key value(s), got {len(key)}")
    words = [tag, int(seed), *(int(k) for k in key)]
    if min(words) < 0:
        raise ValueError(f"seeds and keys must be non-negative, got {words[1:]}")
    return words


def rng(stream: str, seed: int, *key: int) -> np.random.Generator:
    """A fresh NumPy generator of ``stream`` for ``seed`` and ``key``."""
    return np.random.default_rng(entropy(stream, seed, *key))


def torch_seed(stream: str, seed: int, *key: int) -> int:
    """A 63-bit integer for ``torch.manual_seed``, derived from the stream like :func:`rng`."""
    words = np.random.SeedSequence(entropy(stream, seed, *key)).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_torch(stream: str, seed: int, *key: int) -> None:
    """Seed torch's global generators (CPU and every CUDA device) from the stream."""
    torch.manual_seed(torch_seed(stream, seed, *key))
