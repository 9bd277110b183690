"""Each collective of dist_icm.dist on real gloo groups against a one-process reference."""

import pytest
import torch
from multiproc import run_group

from dist_icm import dist as D

pytestmark = pytest.mark.multiproc


def _shard(rank, n=3, c=4):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, c, generator=g, dtype=torch.float64)


def _weights(rank, shape):
    return torch.randn(
        shape, generator=torch.Generator().manual_seed(7 + rank), dtype=torch.float64
    )


def _worker(rank, world):
    group = torch.distributed.group.WORLD
    out = {}
    x = _shard(rank).requires_grad_()
    gathered = D.all_gather(x, group)
    (_weights(rank, gathered.shape) * gathered).sum().backward()
    out["gather"], out["gather_grad"] = gathered.detach(), x.grad.clone()

    x = _shard(rank).requires_grad_()
    summed = D.all_reduce_sum(x, group)
    (_weights(rank, summed.shape) * summed).sum().backward()
    out["sum"], out["sum_grad"] = summed.detach(), x.grad.clone()

    # Negative control: gather without autograd, keep only the local slice differentiable.
    x = _shard(rank).requires_grad_()
    parts = list(D.all_gather_nograd(x, group).split(x.shape[0]))
    parts[rank] = x
    (_weights(rank, (x.shape[0] * world, x.shape[1])) * torch.cat(parts)).sum().backward()
    out["naive_grad"] = x.grad.clone()

    out["max"] = D.all_reduce_max(_shard(rank), group)
    out["nograd"] = D.all_gather_nograd(_shard(rank), group)
    out["size"], out["rank"] = D.size(group), D.rank(group)
    try:
        D.check_equal_rows(2 + rank, group, torch.device("cpu"))
        out["unequal"] = None
    except ValueError as e:
        out["unequal"] = str(e)
    D.check_equal_rows(5, group, torch.device("cpu"))  # equal rows: no error
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_single_process(world):
    results = run_group(_worker, world)
    shards = [_shard(r) for r in range(world)]
    full = torch.cat(shards)
    # all_gather: value is the concatenation; the gradient of sum_r <w_r, gathered> w.r.t.
    # rank r's shard is the shard's slice of sum_r w_r.
    w_total = sum(_weights(r, full.shape) for r in range(world))
    s_total = sum(_weights(r, shards[0].shape) for r in range(world))
    for r, out in enumerate(results):
        assert out["size"] == world and out["rank"] == r
        assert torch.equal(out["gather"], full)
        assert torch.allclose(out["gather_grad"], w_total[3 * r : 3 * r + 3], rtol=1e-13)
        assert torch.allclose(out["sum"], sum(shards), rtol=1e-13)
        assert torch.allclose(out["sum_grad"], s_total, rtol=1e-13)
        assert torch.equal(out["max"], torch.stack(shards).amax(0))
        assert torch.equal(out["nograd"], full)
        assert "same number of rows" in out["unequal"]
        # the negative control really is wrong: it misses the other ranks' gradient
        assert not torch.allclose(out["naive_grad"], w_total[3 * r : 3 * r + 3], rtol=1e-3)


def test_single_process_collectives_are_identities():
    x = _shard(0)
    assert D.size(None) == 1 and D.rank(None) == 0 and not D.is_distributed(None)
    assert D.all_gather(x, None) is x and D.all_reduce_sum(x, None) is x
    assert torch.equal(D.all_reduce_max(x, None), x)
    D.check_equal_rows(3, None, x.device)
