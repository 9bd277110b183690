"""Every consumer of randomness draws from its own stream (dist_icm.streams)."""

import itertools

import numpy as np
import pytest
import torch

from dist_icm import streams
from dist_icm.data.augment import Augmented
from dist_icm.data.datasets import TensorImageDataset
from dist_icm.data.sampler import GlobalBatchSampler
from dist_icm.data.subsets import long_tailed, stratified_fraction
from dist_icm.mixing import MixContext, draw_lam, partners


def _zeros(stream):
    return (0,) * streams.STREAMS[stream][1]


def test_numpy_ignores_trailing_zeros_which_is_why_streams_are_tagged():
    # the trap: untagged keys of different consumers are one stream when the numbers agree
    same = [np.random.default_rng(k).random() for k in ([0], [0, 0], [0, 0, 0])]
    assert same[0] == same[1] == same[2]


def test_all_streams_differ_for_the_same_numbers():
    first = {s: streams.rng(s, 0, *_zeros(s)).random(4).tolist() for s in streams.STREAMS}
    for a, b in itertools.combinations(first, 2):
        assert first[a] != first[b], (a, b)
    seeds = {s: streams.torch_seed(s, 0, *_zeros(s)) for s in streams.STREAMS}
    assert len(set(seeds.values())) == len(seeds)


def test_keys_are_checked():
    with pytest.raises(ValueError, match="takes 2 key"):
        streams.rng("augment", 0, 1)
    with pytest.raises(ValueError, match="unknown random stream"):
        streams.rng("dropout", 0)
    with pytest.raises(ValueError, match="non-negative"):
        streams.rng("sampler", -1, 0)


def _crop_of_sample_zero(seed, epoch):
    """Where Augmented put sample 0's pixels in ``epoch``: (top, left) offset and flip."""
    image = torch.arange(64.0).view(1, 8, 8) / 64 + 1  # distinct, non-zero pixels
    data = TensorImageDataset(image[None], torch.tensor([0]))
    aug = Augmented(data, mode="cifar", seed=seed, mean=(0.0,), std=(1.0,), pad=2)
    aug.set_epoch(epoch)
    return aug[0][0]


def _crop_from(rng, pad=2):
    image = torch.arange(64.0).view(1, 8, 8) / 64 + 1
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    out = torch.nn.functional.pad(image, (pad,) * 4)[:, top : top + 8, left : left + 8]
    return out.flip(-1) if rng.random() < 0.5 else out


def test_the_consumers_use_their_own_streams():
    seed = 3
    for epoch in range(6):  # the crop of sample 0 comes from the augment stream...
        crop = _crop_of_sample_zero(seed, epoch)
        assert torch.equal(crop, _crop_from(streams.rng("augment", seed, epoch, 0)))
    # ...and is not the draw that mixing makes for the step of the same number
    differ = [
        not torch.equal(_crop_of_sample_zero(seed, e), _crop_from(MixContext(seed, e).batch_rng()))
        for e in range(6)
    ]
    assert all(differ)
    ctx = MixContext(seed, 4, group_size=8, first_group=2)
    assert ctx.batch_rng().random() == streams.rng("mix_batch", seed, 4).random()
    assert ctx.group_rng(1).random() == streams.rng("mix_group", seed, 4, 3).random()
    assert np.array_equal(partners(8, ctx), streams.rng("mix_group", seed, 4, 2).permutation(8))
    lam = draw_lam(0.2, 8, ctx)[0]
    assert lam == streams.rng("mix_batch", seed, 4).beta(0.2, 0.2)
    sampler = GlobalBatchSampler(20, 5, seed=seed)
    sampler.set_epoch(2)
    assert np.array_equal(sampler.global_order(), streams.rng("sampler", seed, 2).permutation(20))


def test_the_subsets_draw_from_different_streams():
    labels = np.repeat(np.arange(4), 50)
    frac = stratified_fraction(labels, 0.5, seed=0)
    tail = long_tailed(labels, 1.0, seed=0)  # keeps all; the draw order still comes from it
    assert len(frac) == 100 and len(tail) == 200
    rng = streams.rng("fraction", 0)
    first = np.sort(rng.choice(np.arange(50), size=25, replace=False))
    assert np.array_equal(frac[:25], first)
