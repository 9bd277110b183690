"""Each collective of dist_icm.dist on real gloo groups against a one-process reference."""

import pytest
import torch
from multiproc import run_group

from dist_icm import dist as D
from dist_icm.norm import running_stats

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

    # all_to_all: block q of this rank's rows goes to rank q
    x = _shard(rank, n=2 * world).requires_grad_()
    with D.count_bytes() as sent:
        swapped = D.all_to_all(x, group)
        (_weights(rank, swapped.shape) * swapped).sum().backward()
        D.all_gather_nograd(_shard(rank), group)
    out["a2a"], out["a2a_grad"], out["sent"] = swapped.detach(), x.grad.clone(), dict(sent)

    # a second order is refused: the backward's collectives are not recorded by autograd
    # (they used to give a wrong one silently: 2 where a whole-batch reference gives 4)
    out["second_order"] = []
    for collective in (D.all_gather, D.all_reduce_sum, D.all_to_all):
        x = _shard(rank, n=world).requires_grad_()
        (g,) = torch.autograd.grad(collective(x, group).pow(2).sum(), x, create_graph=True)
        try:
            g.sum().backward()
            out["second_order"].append("computed")
        except RuntimeError as e:
            out["second_order"].append("once_differentiable" * ("twice" in str(e)))

    # the no-grad reductions work on a copy: the caller's tensor (a loss it logs, a flag it
    # goes on using) must come back as it went in, not as the ranks' reduction
    for name, reduce in (("mean", D.all_reduce_mean), ("max", D.all_reduce_max)):
        x = _shard(rank)
        out[name] = reduce(x, group)
        out[f"{name}_kept_input"] = torch.equal(x, _shard(rank))
    out["nograd"] = D.all_gather_nograd(_shard(rank), group)
    out["size"], out["rank"] = D.size(group), D.rank(group)
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
        assert out["max_kept_input"] and out["mean_kept_input"]
        assert not torch.equal(out["max"], shards[r])  # (a local max would not pass)
        assert torch.allclose(out["mean"], sum(shards) / world, rtol=1e-13)
        assert not torch.allclose(out["mean"], sum(shards), rtol=1e-3)  # nor the plain sum
        assert out["second_order"] == ["once_differentiable"] * 3
        # a backward that kept the gradient local would give rank r's own weights
        assert not torch.allclose(out["sum_grad"], _weights(r, shards[0].shape), rtol=1e-3)
        assert torch.equal(out["nograd"], full)
        # the negative control really is wrong: it misses the other ranks' gradient
        assert not torch.allclose(out["naive_grad"], w_total[3 * r : 3 * r + 3], rtol=1e-3)
        # all_to_all: block q of the result is rank q's block r; the gradient of rank r's
        # block q is rank q's weight on it (a backward that kept the gradient local, the
        # identity, would give rank r's own weights, which differ: the negative control)
        blocks = [_shard(q, n=2 * world).split(2) for q in range(world)]
        assert torch.equal(out["a2a"], torch.cat([blocks[q][r] for q in range(world)]))
        w = [_weights(q, (2 * world, 4)).split(2) for q in range(world)]
        assert torch.equal(out["a2a_grad"], torch.cat([w[q][r] for q in range(world)]))
        assert not torch.equal(out["a2a_grad"], _weights(r, (2 * world, 4)))
        # bytes counted: all-to-all (W-1)/W of 2W x 4 float64 values, twice (forward and
        # backward); all-gather (W-1) x 3 x 4 float64
        assert out["sent"] == {
            "all_to_all": 2 * (world - 1) * 2 * 4 * 8,
            "all_gather": (world - 1) * 96,
        }


def test_single_process_collectives_are_identities():
    x = _shard(0)
    assert D.size(None) == 1 and D.rank(None) == 0 and not D.is_distributed(None)
    assert D.all_gather(x, None) is x and D.all_reduce_sum(x, None) is x
    assert torch.equal(D.all_reduce_max(x, None), x)


def _bn_model(rank):
    """A BatchNorm model whose running statistics were updated on this rank's own data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    model.register_buffer("constant", torch.full((2,), 1.0 / 3, dtype=torch.float64))
    model(_shard(rank, n=5, c=3) * (1 + rank))  # rank-dependent batch statistics
    model.constant += rank  # a non-BN buffer that (wrongly) differs: rank 0's wins
    return model


def _buffers_worker(rank, world):
    group = torch.distributed.group.WORLD
    model = _bn_model(rank)
    D.average_buffers(model, group, running_stats(model))
    out = {k: v.clone() for k, v in model.state_dict().items()}
    out["objects"] = D.all_gather_object({"rank": rank}, group)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_average_buffers_is_the_mean_of_the_ranks_statistics(world):
    results = run_group(_buffers_worker, world)
    models = [_bn_model(r) for r in range(world)]
    for key in ("1.running_mean", "1.running_var"):
        expected = sum(m.state_dict()[key] for m in models) / world
        for out in results:
            assert torch.allclose(out[key], expected, rtol=1e-14)
        # negative control: the ranks' own statistics differed, so rank 0's copy is not it
        assert not torch.allclose(models[0].state_dict()[key], expected, rtol=1e-3)
    for out in results:
        assert torch.equal(out["constant"], models[0].constant)  # not averaged: rank 0's
        assert torch.equal(out["1.num_batches_tracked"], models[0][1].num_batches_tracked)
        assert out["objects"] == [{"rank": r} for r in range(world)]


def _first_worker(rank, world, folder, fail_on, direct=False):
    import time
    from pathlib import Path

    def fetch():  # a stand-in download: slow, and leaves a file the later ranks can see
        start = time.monotonic()
        if rank == fail_on:
            raise FileNotFoundError(f"rank {rank} could not fetch")
        time.sleep(0.3)
        Path(folder).mkdir(exist_ok=True)
        (Path(folder) / f"rank{rank}").write_text(f"{start} {time.monotonic()}")
        return sorted(p.name for p in Path(folder).iterdir())

    try:
        if direct:  # negative control: every rank at once
            torch.distributed.barrier()
            return fetch()
        return D.rank_zero_first(fetch, torch.distributed.group.WORLD)
    except FileNotFoundError as e:
        return f"error: {e}"


def test_rank_zero_first_runs_rank_zero_before_the_others(tmp_path):
    seen = run_group(_first_worker, 3, str(tmp_path), -1)
    assert seen[0] == ["rank0"]  # rank 0 alone at its time; the others found its result
    assert all("rank0" in s for s in seen[1:])
    spans = {p.name: [float(t) for t in p.read_text().split()] for p in tmp_path.iterdir()}
    assert spans["rank0"][1] <= min(spans["rank1"][0], spans["rank2"][0])
    # negative control: without it, the ranks fetch at the same time and the check tells
    run_group(_first_worker, 3, str(tmp_path / "direct"), -1, True)
    spans = {
        p.name: [float(t) for t in p.read_text().split()] for p in (tmp_path / "direct").iterdir()
    }
    assert not spans["rank0"][1] <= min(spans["rank1"][0], spans["rank2"][0])


@pytest.mark.parametrize("fail_on", [0, 2])
def test_rank_zero_first_fails_on_every_rank_together(tmp_path, fail_on):
    outcomes = run_group(_first_worker, 3, str(tmp_path), fail_on)
    assert outcomes == [f"error: rank {fail_on} could not fetch"] * 3
    if fail_on == 0:  # the others never tried
        assert list(tmp_path.iterdir()) == []


def _agree_worker(rank, world, fail_on, agreed):
    def check():
        if rank in fail_on:
            raise ValueError(f"rank {rank}: no Triton here")
        return rank * 10

    try:
        return D.agree(check, torch.distributed.group.WORLD) if agreed else check()
    except ValueError as e:
        return f"error: {e}"


@pytest.mark.parametrize("fail_on", [(), (2,), (1, 2)], ids=["none", "rank 2", "ranks 1, 2"])
def test_agree_stops_every_rank_with_the_first_failing_rank_s_error(fail_on):
    outcomes = run_group(_agree_worker, 3, fail_on, True)
    first = f"error: rank {min(fail_on)}: no Triton here" if fail_on else None
    assert outcomes == ([first] * 3 if fail_on else [0, 10, 20])  # each its own result
    if fail_on:  # negative control: each rank alone, the others go on (into a collective)
        alone = run_group(_agree_worker, 3, fail_on, False)
        assert alone[0] == 0 and alone != outcomes


class _Unpicklable(Exception):
    """An exception that cannot travel between processes: it holds a lambda."""

    def __init__(self, *args):
        super().__init__(*args)
        self.hook = lambda: None


def _unpicklable_worker(rank, world, message):
    def fetch():
        if rank == world - 1:
            raise _Unpicklable(*message)
        return "fetched"

    try:
        return D.rank_zero_first(fetch, torch.distributed.group.WORLD)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("message", [("rank 2 cannot\nfetch",), ()], ids=["text", "empty"])
def test_an_exception_that_cannot_be_pickled_reaches_every_rank_as_one_line(message):
    # rank 2's exception holds a lambda: every rank raises a RuntimeError with its first line
    line = "rank 2 cannot" if message else ""
    outcomes = run_group(_unpicklable_worker, 3, message)
    assert outcomes == [f"RuntimeError: _Unpicklable: {line}"] * 3


def _cause_worker(rank, world):
    before = D.peer_cause(wait_s=0.2)  # nobody told one yet
    D.barrier()
    if rank == world - 1:
        D.tell_cause(f"rank {rank} met a bad file")
    D.barrier()
    return before, D.peer_cause(wait_s=0.2)


def test_a_rank_s_cause_reaches_its_peers_through_the_store():
    results = run_group(_cause_worker, 3)
    assert [before for before, _ in results] == [None] * 3  # the negative control
    assert [after for _, after in results] == ["rank 2 met a bad file"] * 3
    assert D.peer_cause() is None and D.tell_cause("no group") is None  # one process: no store
