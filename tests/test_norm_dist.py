"""Ghost batch norm under DDP on real gloo groups: the gradient and the running statistics of
P processes equal one process's on the whole global batch (float64, 1e-9), and plain BatchNorm
does not (the negative control)."""

import pytest
import torch
from multiproc import run_group
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_icm import dist as D
from dist_icm.loss import icm_loss
from dist_icm.norm import convert_ghost_bn, rank_averaged, running_stats

pytestmark = pytest.mark.multiproc

N, C, GROUP = 24, 5, 4


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, 6, 6, generator=g, dtype=torch.float64)
    a, b = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (N,), generator=g)
    return x, a, b, torch.full((N,), 0.3, dtype=torch.float64)


def _model(ghost: bool, momentum: float | None):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.BatchNorm2d(8, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, C),
    ).double()
    return convert_ghost_bn(model, GROUP) if ghost else model


def _state(model):
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    return grads, stats


def _worker(rank, world, momentum):
    x, a, b, lam = _problem()
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    group = torch.distributed.group.WORLD
    out = {}
    for ghost in (True, False):
        model = _model(ghost, momentum)
        ddp = DDP(model, broadcast_buffers=False)
        for _ in range(2):  # two steps' worth of running-statistics updates
            model.zero_grad()
            icm_loss(ddp(x[sl]), a[sl], b[sl], lam[sl], process_group=group).backward()
        D.average_buffers(model, group, running_stats(model))
        out[ghost] = _state(model)
    return out


def _reference(ghost, momentum):
    x, a, b, lam = _problem()
    model = _model(ghost, momentum)
    for _ in range(2):
        model.zero_grad()
        icm_loss(model(x), a, b, lam).backward()
    return _state(model)


# momentum None: BatchNorm's cumulative average (momentum 1/t at update t), linear too
@pytest.mark.parametrize("world, momentum", [(2, 0.1), (3, 0.1), (2, None)])
def test_ghost_batch_norm_is_world_size_invariant(world, momentum):
    results = run_group(_worker, world, momentum)
    for ghost in (True, False):
        ref_grads, ref_stats = _reference(ghost, momentum)
        for out in results:
            grads, stats = out[ghost]
            grads_ok = (grads - ref_grads).norm() <= 1e-9 * ref_grads.norm()
            stats_ok = all(torch.allclose(stats[k], ref_stats[k], rtol=1e-9) for k in ref_stats)
            # ghost BN: the whole batch's gradient and statistics; plain BN: per-device ones
            assert (grads_ok and stats_ok) == ghost, (ghost, world)


def _averaged_worker(rank, world):
    model = _model(True, 0.1)
    x, *_ = _problem()
    model(x[rank * 4 : rank * 4 + 4] * (1 + rank))  # running statistics of this rank's own
    own = [t.clone() for t in running_stats(model)]
    with rank_averaged(model, torch.distributed.group.WORLD) as kept:
        inside = [t.clone() for t in running_stats(model)]
    return own, kept, inside, [t.clone() for t in running_stats(model)]


def test_rank_averaged_averages_inside_and_gives_each_rank_its_own_back_after():
    # evaluation and saving see the ranks' mean; training must then go on from each rank's
    # own statistics, or every evaluation would be a step in training's rounding
    results = run_group(_averaged_worker, 2)
    owns = [own for own, *_ in results]
    mean = [(p + q) / 2 for p, q in zip(*owns, strict=True)]
    assert not any(torch.allclose(p, q) for p, q in zip(*owns, strict=True))  # they differ
    for own, kept, inside, after in results:
        assert all(torch.allclose(t, m, rtol=1e-12) for t, m in zip(inside, mean, strict=True))
        assert all(torch.equal(t, o) for t, o in zip(after, own, strict=True))
        assert all(torch.equal(t, o) for t, o in zip(kept, own, strict=True))
