"""The ICM loss on one process against a dense reference written here from the paper (Eq. 9)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dist_icm.loss import icm_loss, mixed_scores, mixing_matrix, target_groups


def reference(logits, a, b, lam, axis="both"):
    """S̃ = S Ỹᵀ with Ỹ from one-hot vectors; cross-entropy along the requested axes."""
    c = logits.shape[1]
    y = lam[:, None] * F.one_hot(a, c).to(logits) + (1 - lam[:, None]) * F.one_hot(b, c).to(logits)
    st_ = logits @ y.T
    eye = torch.arange(len(a))
    cc, ci = F.cross_entropy(st_, eye), F.cross_entropy(st_.T, eye)
    return {"class": cc, "pair": ci, "both": cc + ci}[axis]


def problem(n=10, c=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=dtype) * 3
    a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
    lam = torch.rand(n, generator=g, dtype=dtype)
    return logits.requires_grad_(), a, b, lam


@pytest.mark.parametrize("axis", ["class", "pair", "both"])
@pytest.mark.parametrize("method", ["matmul", "gather", "auto"])
@pytest.mark.parametrize("c", [5, 1000])  # below and above the auto switch (DENSE_MAX_CLASSES)
def test_matches_dense_reference_values_and_gradients(axis, method, c):
    logits, a, b, lam = problem(n=12, c=c)
    ours = icm_loss(logits, a, b, lam, axis=axis, method=method)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = reference(logits, a, b, lam, axis)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-14)


def test_auto_switches_to_gathers_above_900_classes_on_the_cpu_and_4096_on_cuda():
    from dist_icm.loss import _form, uses_dense_stats

    assert [_form("auto", c) for c in (900, 901)] == ["matmul", "gather"]  # the CPU's switch
    assert [_form("auto", c, "cuda") for c in (1000, 4096, 4097)] == ["matmul"] * 2 + ["gather"]
    assert _form("gather", 10, "cuda") == "gather"  # asked for, it is what runs
    assert not uses_dense_stats(1000) and uses_dense_stats(1000, device_type="cuda")


def test_matmul_and_gather_forms_agree():
    logits, a, b, lam = problem(n=9, c=11)
    dense = mixed_scores(logits, a, b, lam, method="matmul")
    gathered = mixed_scores(logits, a, b, lam, method="gather")
    assert torch.allclose(dense, gathered, rtol=1e-13, atol=1e-13)
    y = mixing_matrix(a, b, lam, 11)
    assert torch.allclose(y.sum(1), torch.ones(9, dtype=y.dtype))


@pytest.mark.parametrize("axis", ["class", "pair", "both"])
@pytest.mark.parametrize("dedup", [False, True])
def test_gradcheck_float64(axis, dedup):
    logits, a, b, lam = problem(n=6, c=4, seed=3)
    a[3], b[3], lam[3] = a[1], b[1], lam[1]  # one duplicate target, so dedup has work to do
    assert torch.autograd.gradcheck(
        lambda s: icm_loss(s, a, b, lam, axis=axis, dedup=dedup), (logits,)
    )


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), c=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
def test_permuting_the_batch_leaves_the_loss_unchanged(n, c, seed):
    logits, a, b, lam = problem(n=n, c=c, seed=seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for dedup in (False, True):
        base = icm_loss(logits, a, b, lam, dedup=dedup)
        permuted = icm_loss(logits[perm], a[perm], b[perm], lam[perm], dedup=dedup)
        assert torch.allclose(base, permuted, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), c=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
def test_class_axis_ignores_a_per_image_logit_shift(n, c, seed):
    # lam + (1 - lam) = 1, so adding c_i to every logit of image i adds c_i to row i of S̃.
    logits, a, b, lam = problem(n=n, c=c, seed=seed)
    shift = torch.randn(n, 1, dtype=logits.dtype) * 5
    base = icm_loss(logits, a, b, lam, axis="class")
    assert torch.allclose(base, icm_loss(logits + shift, a, b, lam, axis="class"), rtol=1e-10)


@pytest.mark.parametrize("dedup", [False, True])
def test_swapped_triples_are_the_same_target(dedup):
    # (a, b, lam) and (b, a, 1 - lam) are one mixing vector. Rows 4..7 repeat rows 0..3's
    # targets, written swapped: the loss is the one of the same rows written alike (bit for bit
    # with dyadic weights, where 1 - (1 - lam) is exact), and with dedup they are duplicates.
    logits, a, b, _ = problem(n=8, c=6)
    lam = torch.tensor([0.5, 0.25, 0.875, 0.0], dtype=torch.float64)
    a4, b4 = a[:4], b[:4]
    swapped = (torch.cat([a4, b4]), torch.cat([b4, a4]), torch.cat([lam, 1 - lam]))
    alike = (torch.cat([a4, a4]), torch.cat([b4, b4]), torch.cat([lam, lam]))
    assert torch.equal(
        icm_loss(logits, *swapped, dedup=dedup), icm_loss(logits, *alike, dedup=dedup)
    )
    if dedup:  # the repeats really are duplicates: the plain loss differs
        assert not torch.allclose(icm_loss(logits, *alike), icm_loss(logits, *alike, dedup=True))
    lam = torch.rand(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    one, other = icm_loss(logits, a, b, lam), icm_loss(logits, b, a, 1 - lam)
    assert torch.allclose(one, other, rtol=1e-13, atol=0)
    # ...and a different vector is a different target: the comparison can tell
    assert not torch.allclose(one, icm_loss(logits, b, a, lam), rtol=1e-3)


def test_uniform_scores_give_log_n_per_axis():
    n = 16
    _, a, b, lam = problem(n=n, c=5)
    zeros = torch.zeros(n, 5, dtype=torch.float64)
    assert icm_loss(zeros, a, b, lam).item() == pytest.approx(2 * math.log(n), rel=1e-12)


def test_target_groups_canonical_forms():
    a = torch.tensor([1, 2, 3, 3, 4, 0, 5, 1])
    b = torch.tensor([2, 1, 3, 0, 9, 4, 5, 2])
    lam = torch.tensor([0.25, 0.75, 0.3, 1.0, 0.0, 1.0, 0.9, 0.5], dtype=torch.float64)
    g = target_groups(a, b, lam).tolist()
    assert g[0] == g[1]  # (1,2,.25) == (2,1,.75)
    assert g[2] == g[3]  # a == b  and  lam == 1: both one-hot class 3
    assert g[4] != g[5]  # one-hot 9 vs one-hot 0
    assert g[0] != g[7]  # same classes, other weight
    assert len(set(g)) == 6


def test_dedup_without_duplicates_is_the_plain_loss():
    logits, a, b, lam = problem(n=10, c=50, seed=1)
    assert torch.allclose(icm_loss(logits, a, b, lam, dedup=True), icm_loss(logits, a, b, lam))


def _fit(a, b, lam, dedup, c, steps=300):
    logits = torch.zeros(len(a), c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = icm_loss(logits, a, b, lam, dedup=dedup)
        loss.backward()
        opt.step()
    return icm_loss(logits, a, b, lam, dedup=dedup).item()


def test_dedup_removes_the_log_k_floor():
    # 4 distinct targets, each k = 3 times: free logits cannot push the plain loss below
    # 2 log k (log k per axis), while the multi-positive form goes towards 0.
    k = 3
    a = torch.tensor([0, 1, 2, 3] * k)
    b = torch.tensor([1, 2, 3, 0] * k)
    lam = torch.full((4 * k,), 0.7, dtype=torch.float64)
    plain, dedup = _fit(a, b, lam, False, 4), _fit(a, b, lam, True, 4)
    assert plain >= 2 * math.log(k) - 1e-6
    assert plain < 2 * math.log(k) + 0.2  # it does get close to its floor
    assert dedup < 0.1 * math.log(k)


def test_low_precision_inputs_are_computed_in_float32():
    logits, a, b, lam = problem(n=64, c=10, dtype=torch.float32)
    ref = icm_loss(logits.double(), a, b, lam.double())
    for dtype in (torch.bfloat16, torch.float16):
        out = icm_loss(logits.detach().to(dtype), a, b, lam)
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(ref.item(), rel=2e-2)
    big = logits.detach() * 1e3  # scores far beyond exp's float32 range stay finite
    assert torch.isfinite(icm_loss(big.to(torch.bfloat16), a, b, lam))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"axis": "rows"}, "axis must be"),
        ({"gather": "all"}, "gather must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    logits, a, b, lam = problem()
    with pytest.raises(ValueError, match=match):
        icm_loss(logits, a, b, lam, **kwargs)


def test_bad_inputs():
    logits, a, b, lam = problem(n=4, c=3)
    with pytest.raises(ValueError, match="shape"):
        icm_loss(logits, a[:3], b, lam)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        icm_loss(logits, a + 3, b, lam)
    with pytest.raises(ValueError, match="int64"):
        icm_loss(logits, a.int(), b, lam)
    with pytest.raises(ValueError, match=r"lam must lie"):
        icm_loss(logits, a, b, lam + 1)


def _under_autocast(logits, a, b, lam, device="cpu", dtype=torch.bfloat16):
    with torch.autocast(device, dtype=dtype):
        return icm_loss(logits, a, b, lam)


@pytest.mark.parametrize("dedup", [False, True])
def test_autocast_does_not_lower_the_loss_precision(dedup):
    # the usual call: `with autocast(): loss = icm_loss(model(x), ...)`; a bf16 matmul and
    # logsumexp would be off by ~1e-3 relative (measured 1.4e-3 here before the fix)
    g = torch.Generator().manual_seed(0)
    n, c = 512, 100
    logits = torch.randn(n, c, generator=g) * 4
    a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
    lam = torch.rand(n, generator=g)
    ref = icm_loss(logits, a, b, lam, dedup=dedup)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = icm_loss(logits, a, b, lam, dedup=dedup)
        assert torch.is_autocast_enabled("cpu")  # the caller's state is left as it was
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    # negative control: the same computation with autocast left on is visibly less precise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lossy = mixed_scores(logits, a, b, lam).logsumexp(1).mean()
    exact = mixed_scores(logits, a, b, lam).logsumexp(1).mean()
    assert abs(lossy.float() - exact) > 1e-4 * abs(exact)


def test_an_empty_batch_raises_instead_of_returning_nan():
    logits, a, b, lam = problem(n=0, c=5)
    for validate in (True, False):
        with pytest.raises(ValueError, match="empty batch"):
            icm_loss(logits, a, b, lam, validate=validate)


class _SyncCounter(TorchDispatchMode):
    """Counts reads of a tensor's value back to the host (item(), bool(), int() ...)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_validate_false_reads_nothing_back_from_the_device():
    logits, a, b, lam = problem(n=16, c=7)
    with _SyncCounter() as checked:
        icm_loss(logits, a, b, lam).backward()
    with _SyncCounter() as trusted:
        icm_loss(logits, a, b, lam, validate=False).backward()
    assert checked.syncs >= 2 and trusted.syncs == 0
    # value checks are skipped, the free ones (shapes, dtypes, arguments) are not
    icm_loss(logits, a, b, lam + 1, validate=False)
    with pytest.raises(ValueError, match="shape"):
        icm_loss(logits, a[:3], b, lam, validate=False)
    with pytest.raises(ValueError, match="axis must be"):
        icm_loss(logits, a, b, lam, axis="rows", validate=False)


FORMS = [{}, {"tile": 16}, {"dedup": True}, {"dedup": True, "tile": 16}, {"method": "gather"},
         {"method": "gather", "tile": 16}, {"method": "gather", "dedup": True}]  # fmt: skip


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_a_backward_called_under_autocast_is_float32_too(form):
    # `with autocast(): loss = ...; loss.backward()`: the backward's matmuls ran in bf16
    # (gradients 2e-3 off float64 on the default form, 9e-3 tiled, before the fix)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g) * 3
    a = torch.randint(0, 10, (64,), generator=g)
    b, lam = a[torch.randperm(64, generator=g)], torch.full((64,), 0.3)
    grads = []
    for inside in (False, True):
        x = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = icm_loss(x, a, b, lam, **form)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append(x.grad)
    assert torch.equal(grads[1], grads[0])
    # negative control: autograd's own matmul, backward under autocast, is visibly off
    y = mixing_matrix(a, b, lam, 10)
    lossy = []
    for inside in (False, True):
        x = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            (x @ y.T).float().logsumexp(1).mean().backward()
        lossy.append(x.grad)
    assert (lossy[1] - lossy[0]).norm() > 1e-4 * lossy[0].norm()


@pytest.mark.parametrize("num_classes", [5, 1000], ids=["matmul", "gather"])
def test_a_non_finite_classifier_row_gives_non_finite_gradients_on_every_form(num_classes):
    # the documented difference: the dense form's loss is NaN, the gather form's is finite
    # (no target names the class), but the gradients the trainer checks are non-finite on both
    torch.manual_seed(3)
    features, head = torch.nn.Linear(8, 16), torch.nn.Linear(16, num_classes)
    with torch.no_grad():
        head.weight[num_classes - 1, 0] = float("nan")
    a, b = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 2, 0, 2, 0, 1])
    for method in ("matmul", "gather"):
        features.zero_grad()
        loss = icm_loss(head(features(torch.randn(6, 8))), a, b, torch.full((6,), 0.3),
                        method=method)  # fmt: skip
        loss.backward()
        assert torch.isfinite(loss).item() == (method == "gather")
        assert not all(torch.isfinite(p.grad).all() for p in features.parameters())


def dedup_reference(logits, a, b, lam, axis="both"):
    """Multi-positive CE written out on the full S̃ = S Ỹᵀ (float64): the positives of row i
    are the columns j whose mixing vector (the dense row of Ỹ) equals row i's, along the class
    axis on S̃ and along the pair axis on S̃ᵀ (the relation is symmetric)."""
    c = logits.shape[1]
    y = lam[:, None] * F.one_hot(a, c).to(logits) + (1 - lam[:, None]) * F.one_hot(b, c).to(logits)
    s = logits @ y.T
    pos = (y[:, None, :] == y[None, :, :]).all(-1)
    masked = s.masked_fill(~pos, float("-inf"))
    cc = (s.logsumexp(1) - masked.logsumexp(1)).mean()
    ci = (s.logsumexp(0) - masked.logsumexp(0)).mean()
    return {"class": cc, "pair": ci, "both": cc + ci}[axis]


@pytest.mark.parametrize("axis", ["class", "pair", "both"])
@pytest.mark.parametrize("method", ["matmul", "gather"])
def test_dedup_matches_a_brute_force_multi_positive_reference(axis, method):
    # A class axis that took its positives' sums from the columns (pos_cols) instead of the
    # rows gives another number once targets repeat; the plain-loss comparisons cannot see it.
    g = torch.Generator().manual_seed(11)
    n, c = 10, 5
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).requires_grad_()
    a = torch.tensor([0, 1, 0, 2, 3, 1, 4, 2, 0, 3])
    b = torch.tensor([1, 0, 1, 2, 4, 0, 3, 2, 1, 4])
    # dyadic weights, so swapped writings are exactly one vector: rows 0, 1, 2, 8 are one
    # target (0.75 e0 + 0.25 e1, row 1 swapped), rows 3 and 7 the one-hot e2, rows 4 and 6 one
    lam = torch.tensor([0.75, 0.25, 0.75, 0.5, 0.5, 0.625, 0.5, 0.25, 0.75, 0.125])
    lam = lam.to(torch.float64)
    ours = icm_loss(logits, a, b, lam, axis=axis, dedup=True, method=method)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = dedup_reference(logits, a, b, lam, axis)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    # the batch does hold duplicates: the plain loss is another number
    assert not torch.allclose(icm_loss(logits, a, b, lam, axis=axis), ref, rtol=1e-3)


def test_lams_that_differ_below_float32_precision_are_different_targets():
    # target_groups compares weights in float64: comparing them in float32 would merge
    # 0.3 and 0.3 + 1e-9 into one group, and dedup would then change the loss
    logits, a, b, lam = problem(n=6, c=4, seed=2)
    a[:2], b[:2] = 1, 2
    lam[0], lam[1] = 0.3, 0.3 + 1e-9
    assert lam[0].float() == lam[1].float()  # the same in float32
    g = target_groups(a, b, lam).tolist()
    assert g[0] != g[1]
    assert torch.allclose(
        icm_loss(logits, a, b, lam, dedup=True), icm_loss(logits, a, b, lam), rtol=1e-12
    )


def test_a_class_index_equal_to_the_number_of_classes_is_refused():
    # index C is one past the last column: a check `> C` would let it through (to a gather
    # out of range, or a one-hot of the wrong width)
    logits, a, b, lam = problem(n=4, c=3)
    a[:], b[:] = 0, 2
    icm_loss(logits, a, b, lam)  # C - 1 is the last valid class
    for bad_a, bad_b in ((a.index_fill(0, torch.tensor([1]), 3), b),
                         (a, b.index_fill(0, torch.tensor([3]), 3))):  # fmt: skip
        with pytest.raises(ValueError, match=r"class indices a, b must lie in \[0, 3\)"):
            icm_loss(logits, bad_a, bad_b, lam)


def test_duplicate_share_counts_the_rows_with_a_shared_target():
    from dist_icm.loss import duplicate_share

    # rows 0, 1: (1, 2, .25) == (2, 1, .75); rows 2, 3: one-hot 3; rows 6, 7, 8: (5, 6, .5)
    # thrice; rows 4, 5 and 9 are alone: 7 of 10 rows share their target
    a = torch.tensor([1, 2, 3, 3, 4, 0, 5, 5, 6, 5])
    b = torch.tensor([2, 1, 3, 0, 9, 4, 6, 6, 5, 6])
    lam = torch.tensor([0.25, 0.75, 0.3, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.25]).double()
    assert duplicate_share(a, b, lam) == pytest.approx(0.7, abs=1e-15)
    assert duplicate_share(a[4:6], b[4:6], lam[4:6]) == 0.0  # no duplicates
    assert duplicate_share(a[:0], b[:0], lam[:0]) == 0.0  # empty: 0, not NaN
