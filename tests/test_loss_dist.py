"""The global-batch contract of icm_loss on real gloo groups (2 and 3 CPU processes).

Every case (gather mode, axis, dedup, tiled or not) runs on each rank's share of the batch.
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
_PLAIN = itertools.product(["triples", "scores"], ["class", "pair", "both"], [False, True])
# tiled (2 x 2 tiles, so every rank's block spans several tiles on both axes), both forms of S̃
CASES = [(*c, 0, "auto") for c in _PLAIN] + [
    (*c, 2, method)
    for c in itertools.product(["triples", "scores"], ["class", "pair", "both"], [False, True])
    for method in ("matmul", "gather")
]
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
            gather, axis, dedup, tile, method = (
                case if case != "global_div" else ("triples", "both", False, 0, "auto")
            )
            loss = icm_loss(
                ddp(x[sl]),
                a[sl],
                b[sl],
                lam[sl],
                axis=axis,
                process_group=group,
                gather=gather,
                dedup=dedup,
                tile=tile,
                method=method,
            )
            if case == "global_div":
                loss = loss * n / N
        loss.backward()
        out[case] = (loss.item(), _grads(model))
    return out


def _reference(case):
    axis, dedup = case[1:3] if isinstance(case, tuple) else ("both", False)
    x, a, b, lam = _problem()  # one process, untiled: the reference for every case
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


def _bytes_worker(rank, world):
    from dist_icm import dist as D

    g = torch.Generator().manual_seed(rank)
    n, c = 4, 6
    out = {}
    for gather, dedup in (("triples", False), ("triples", True), ("scores", False)):
        x = torch.randn(n, c, generator=g).requires_grad_()
        a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
        with D.count_bytes() as sent:
            loss = icm_loss(
                x,
                a,
                b,
                torch.rand(n, generator=g),
                process_group=torch.distributed.group.WORLD,
                gather=gather,
                dedup=dedup,
                validate=False,
            )
            loss.backward()
        out[gather, dedup] = dict(sent)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_bytes_on_the_wire_are_counted_per_collective(world):
    """Per rank and step, float32, 4 rows a rank, 6 classes: the triples (a, b as int16 and
    lam: 8 bytes a sample) once, each column's partial logsumexp to its owner (4 bytes, and
    4 back in the backward; twice that with dedup); the scores path gathers the logits and
    reduce-scatters their gradient."""
    n, c, w1 = 4, 6, world - 1
    for sent in run_group(_bytes_worker, world):
        assert sent["triples", False] == {"all_gather": w1 * n * 8, "all_to_all": 2 * w1 * n * 4}
        assert sent["triples", True] == {"all_gather": w1 * n * 8, "all_to_all": 4 * w1 * n * 4}
        assert sent["scores", False] == {
            "all_gather": w1 * n * 8 + w1 * n * c * 4,
            "reduce_scatter": w1 * n * c * 4,
        }


WIDE = [(32_767, torch.float32), (32_768, torch.float32), (40_000, torch.float32),
        (40_000, torch.float64)]  # fmt: skip


def _wide_problem(c, dtype, world, n=3):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(n * world, c, generator=g, dtype=dtype)
    a = torch.randint(0, c, (n * world,), generator=g)
    b = torch.randint(0, c, (n * world,), generator=g)
    a[0], b[-1] = c - 1, c - 2  # the highest classes, past int16 from 32,768 classes on
    return x, a, b, torch.rand(n * world, generator=g, dtype=dtype)


def _wide_worker(rank, world, pack_int16=False):
    from dist_icm import dist as D
    from dist_icm import loss as L

    if pack_int16:  # the negative control: int16 words at any number of classes
        L._INT16_CLASSES = 10**6
    out = {}
    for c, dtype in WIDE:
        x, a, b, lam = _wide_problem(c, dtype, world)
        sl = slice(rank * 3, rank * 3 + 3)
        xr = x[sl].clone().requires_grad_()
        with D.count_bytes() as sent:
            group = torch.distributed.group.WORLD
            loss = icm_loss(xr, a[sl], b[sl], lam[sl], process_group=group, validate=False)
        loss.backward()
        out[c, dtype] = (loss.item(), xr.grad, sent["all_gather"])
    return out


def test_triples_past_int16_classes_travel_as_int32():
    """a and b are int16 on the wire up to 32,767 classes and int32 beyond (12 bytes a sample
    in float32, 16 with float64 lam): the 2-process loss and gradient are one process's."""
    world = 2
    results = run_group(_wide_worker, world)
    for c, dtype in WIDE:
        x, a, b, lam = _wide_problem(c, dtype, world)
        xx = x.clone().requires_grad_()
        ref = icm_loss(xx, a, b, lam)
        ref.backward()
        per_sample = (8 if c <= 32_767 else 12) + (4 if dtype == torch.float64 else 0)
        mean = sum(r[c, dtype][0] for r in results) / world
        assert abs(mean - ref.item()) <= 1e-5 * abs(ref.item()), (c, dtype)
        grad = torch.cat([r[c, dtype][1] for r in results]) / world
        assert (grad - xx.grad).norm() <= 1e-5 * xx.grad.norm(), (c, dtype)
        assert all(r[c, dtype][2] == (world - 1) * 3 * per_sample for r in results)
    # negative control: int16 words for 40,000 classes wrap the highest classes around
    wrapped = run_group(_wide_worker, world, True)
    x, a, b, lam = _wide_problem(40_000, torch.float32, world)
    ref = icm_loss(x, a, b, lam).item()
    mean = sum(r[40_000, torch.float32][0] for r in wrapped) / world
    assert abs(mean - ref) > 1e-3 * abs(ref)
