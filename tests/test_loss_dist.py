"""The global-batch contract of icm_loss on real gloo groups (2 and 3 CPU processes).

Under DDP (gradients averaged over ranks) the parameter gradients must equal those of one
process computing the loss on the concatenated global batch (float64, relative error <= 1e-9),
and the mean of the ranks' returned values must equal that global loss. Two negative controls
(dividing by the global batch instead of the local one; each rank's loss on its own rows only)
show that the same comparison rejects a wrong implementation.
"""

import itertools

import pytest
import torch
from multiproc import run_group
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_icm.loss import icm_loss

pytestmark = pytest.mark.multiproc

N, D_IN, C = 12, 5, 4
CASES = list(itertools.product(["triples", "scores"], ["class", "pair", "both"], [False, True]))
CONTROLS = ["global_div", "local_only"]


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    a, b = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (N,), generator=g)
    lam = torch.full((N,), 0.3, dtype=torch.float64)  # one lam per batch, as in the paper
    lam[[1, 7]], lam[[4, 10]] = 1.0, 0.0  # un-mixed rows: one-hot targets, likely duplicated
    return x, a, b, lam


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, C)
    ).double()


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank, world):
    x, a, b, lam = _problem()
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    group = torch.distributed.group.WORLD
    out = {}
    for case in CASES + CONTROLS:
        model = _model()
        ddp = DDP(model)
        if case == "local_only":
            loss = icm_loss(ddp(x[sl]), a[sl], b[sl], lam[sl])
        else:
            gather, axis, dedup = case if case != "global_div" else ("triples", "both", False)
            loss = icm_loss(
                ddp(x[sl]),
                a[sl],
                b[sl],
                lam[sl],
                axis=axis,
                process_group=group,
                gather=gather,
                dedup=dedup,
            )
            if case == "global_div":
                loss = loss * n / N
        loss.backward()
        out[case] = (loss.item(), _grads(model))
    return out


def _reference(case):
    gather, axis, dedup = case if isinstance(case, tuple) else ("triples", "both", False)
    x, a, b, lam = _problem()
    model = _model()
    loss = icm_loss(model(x), a, b, lam, axis=axis, dedup=dedup)
    loss.backward()
    return loss.item(), _grads(model)


def _flat(grads):
    return torch.cat([g.flatten() for g in grads])


def _matches(results, case):
    """Mean loss and every rank's (DDP-averaged) gradients within 1e-9 of the reference.

    Gradients compare as one flat vector: the pair axis is blind to the last layer's bias
    (adding b to the logits adds b·ỹ_j to a whole column), whose gradient is zero up to
    rounding, so a per-tensor relative error would divide noise by noise.
    """
    ref_loss, ref_grads = _reference(case)
    mean_loss = sum(r[case][0] for r in results) / len(results)
    ok_loss = abs(mean_loss - ref_loss) <= 1e-9 * abs(ref_loss)
    ref = _flat(ref_grads)
    ok_grads = all((_flat(r[case][1]) - ref).norm() <= 1e-9 * ref.norm() for r in results)
    return ok_loss and bool(ok_grads)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def results(request):
    return run_group(_worker, request.param)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ddp_gradients_and_loss_equal_the_global_batch(results, case):
    assert _matches(results, case)


@pytest.mark.parametrize("control", CONTROLS)
def test_negative_controls_are_rejected(results, control):
    assert not _matches(results, control)


def test_problem_has_duplicate_targets():
    from dist_icm.loss import target_groups

    _, a, b, lam = _problem()
    assert len(set(target_groups(a, b, lam).tolist())) < N


def _unequal_worker(rank, world):
    n = 2 + rank
    logits = torch.zeros(n, C, dtype=torch.float64)
    idx = torch.zeros(n, dtype=torch.int64)
    try:
        icm_loss(logits, idx, idx, torch.ones(n), process_group=torch.distributed.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


def test_unequal_rows_fail_clearly_on_every_rank():
    messages = run_group(_unequal_worker, 2)
    assert all(m and "same number of rows" in m for m in messages)


def _bad_value_worker(rank, world):
    logits = torch.zeros(3, C, dtype=torch.float64)
    idx = torch.zeros(3, dtype=torch.int64)
    lam = torch.full((3,), 2.0 if rank == 1 else 0.5)  # only rank 1's batch is bad
    try:
        icm_loss(logits, idx, idx, lam, process_group=torch.distributed.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


def test_a_bad_batch_on_one_rank_raises_on_every_rank():
    # rank 0's values are fine: it must not go on into the loss's collectives alone
    assert run_group(_bad_value_worker, 3) == ["lam must lie in [0, 1] (on rank 1)"] * 3
