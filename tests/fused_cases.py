"""The fused kernels' numerical cases (``dist_icm.fused``, ``loss.fused``), for Triton's
interpreter on CPU tensors: ``tests/test_fused.py`` runs this file in a pytest process of its own
with ``TRITON_INTERPRET=1`` (which triton reads at import), so the interpreter never runs in the
main test process. (It did at first, through conftest.py: in two full runs of the suite an
``ast.parse`` in that process then failed with CPython 3.11's "AST constructor recursion depth
mismatch", once as pytest formatted a report at the start of these cases and once in a later
module's import of hypothesis. These cases with ``test_loss.py`` alone did not repeat it.)

The kernels compute in float32 what ``dense_stats`` computes, summed in another order, so they
are held to float32 rounding: relative error <= 1e-5 against the float64 torch form (measured
<= 2e-7), on their own, inside ``icm_loss`` on one process, and on 2 gloo processes against one.
The blend's kernel rounds each operation as torch does, so it is held to the same bits.
"""

import os

import pytest
import torch
from multiproc import run_group
from torch.utils._python_dispatch import TorchDispatchMode

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run through tests/test_fused.py: these cases need TRITON_INTERPRET=1")

from dist_icm.fused import blend_applies, fused_blend, fused_stats  # noqa: E402
from dist_icm.fused_kernels import BLOCK_BLEND, BLOCK_CLASSES, BLOCK_COLS, BLOCK_ROWS  # noqa: E402
from dist_icm.loss import icm_loss, mixing_matrix  # noqa: E402
from dist_icm.mixing import MixContext, mixup  # noqa: E402
from dist_icm.objectives import Objective, ObjectiveConfig  # noqa: E402
from dist_icm.tiled import dense_stats  # noqa: E402

TOL = 1e-5


def _problem(m, k, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, classes, generator=g, dtype=torch.float64) * 3
    a = torch.randint(0, classes, (k,), generator=g)
    b = torch.randint(0, classes, (k,), generator=g)
    lam = torch.rand(k, generator=g, dtype=torch.float64)
    lam[::5], lam[1::7] = 1.0, 0.0  # one-hot targets
    b[2::9] = a[2::9]  # a == b: the weights add up on one class
    return x, a, b, lam


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


# (m, k, C, offset): one block and less; blocks that do not divide m, k or C; several class
# blocks in the backward; a rank's rows among more mixed classes (offset > 0)
SHAPES = [
    (1, 1, 2, 0),
    (7, 7, 3, 0),
    (BLOCK_ROWS + 5, BLOCK_ROWS + 5, 10, 0),
    (40, 2 * BLOCK_COLS + 3, BLOCK_CLASSES + 6, 2 * BLOCK_COLS + 3 - 40),
    (24, 72, 100, 24),
]


def _compare(shape, outputs=(0, 1, 2), flip=False):
    """Relative errors of the fused (rows, cols, diag) and of x's gradient (from the outputs
    in ``outputs``, weighted at random) against the float64 ``dense_stats``; ``flip`` gives the
    fused kernels 1 - lam (a wrong input: the negative control)."""
    m, k, classes, offset = shape
    x, a, b, lam = _problem(m, k, classes)
    x32 = x.float().requires_grad_()
    x64 = x.clone().requires_grad_()
    got = fused_stats(x32, a, b, (1 - lam if flip else lam).float(), offset)
    ref = dense_stats(x64, mixing_matrix(a, b, lam, classes), offset)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape[0], generator=g, dtype=torch.float64) for t in ref]
    sum((weights[i] * got[i].double()).sum() for i in outputs).backward()
    sum((weights[i] * ref[i]).sum() for i in outputs).backward()
    errors = [_rel(o.detach(), r.detach()) for o, r in zip(got, ref, strict=True)]
    return errors + [_rel(x32.grad, x64.grad)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_stats_equal_the_torch_form(shape):
    assert max(_compare(shape)) <= TOL


@pytest.mark.parametrize("outputs", [(0,), (1,), (2,), (0, 2)])
def test_fused_backward_with_some_outputs_unused(outputs):
    """An output without a gradient (axis=class or pair) gets none from autograd: the kernel
    reads zeros for it."""
    assert max(_compare(SHAPES[3], outputs)) <= TOL


def test_a_wrong_input_is_caught():
    """Negative control: the same comparison rejects the kernels given 1 - lam."""
    assert max(_compare(SHAPES[2], flip=True)) > 100 * TOL


def _loss_and_grad(x, a, b, lam, **kw):
    x = x.detach().clone().requires_grad_()
    loss = icm_loss(x, a, b, lam, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("axis", ["class", "pair", "both"])
@pytest.mark.parametrize("classes", [10, 1000])  # 1000: the torch form gathers instead
def test_fused_loss_equals_the_float64_loss(axis, classes):
    """``icm_loss(fused=True)`` from float32 and bf16 logits (the loss math in float32 either
    way) against the float64 loss of the same values: the gradient of the mean of a broadcast
    scalar reaches the kernel with a zero stride."""
    x, a, b, lam = _problem(48, 48, classes)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype).double()  # the values the low-precision logits hold
        ref_loss, ref_grad = _loss_and_grad(xd, a, b, lam, axis=axis)
        loss, grad = _loss_and_grad(x.to(dtype), a, b, lam.float(), axis=axis, fused=True)
        assert abs(loss.double() - ref_loss) <= TOL * ref_loss.abs()
        # bf16 logits get their gradient back in bf16: 8 bits of mantissa
        assert _rel(grad.double(), ref_grad) <= (TOL if dtype == torch.float32 else 1e-2)


def test_fused_under_autocast_is_the_fused_float32_loss():
    x, a, b, lam = _problem(16, 16, 10)
    x = x.float()
    plain = _loss_and_grad(x, a, b, lam.float(), fused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _loss_and_grad(x, a, b, lam.float(), fused=True)
    for p, q in zip(plain, autocast, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw", [{"tile": 8}, {"dedup": True}, {"dtype": torch.float64}], ids=["tiled", "dedup", "f64"]
)
def test_fused_has_no_effect_where_it_does_not_apply(kw):
    """Tiled, dedup or float64: the loss takes the torch path, bit for bit."""
    kw = dict(kw)
    x, a, b, lam = _problem(16, 16, 10)
    dtype = kw.pop("dtype", torch.float32)
    x, lam = x.to(dtype), lam.to(dtype)
    fused = _loss_and_grad(x, a, b, lam, fused=True, **kw)
    plain = _loss_and_grad(x, a, b, lam, **kw)
    for p, q in zip(fused, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's inf - inf
def test_a_non_finite_logit_gives_a_non_finite_loss():
    """What the trainer's non-finite skip relies on, as with the torch form. (A logit of a class
    that no target holds is read by neither form's S̃, but the torch form's matmul still
    multiplies it by 0: inf there makes its loss NaN and leaves the fused loss finite.)"""
    x, a, b, lam = _problem(8, 8, 5)
    x = x.float()
    x[3, a[0]] = float("inf")
    assert not torch.isfinite(icm_loss(x, a, b, lam.float(), fused=True))


class _Ops(TorchDispatchMode):
    """The names of the aten ops that run under it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_fused_loss_leaves_the_statistics_to_the_kernels():
    """Forward and backward of the fused loss run none of the torch form's ops for S̃ and its
    softmaxes (Ỹ's scatters, the matmuls, the reductions, the exponentials); what remains is
    the loss's means. The torch form, counted the same way, runs them all."""
    x, a, b, lam = _problem(16, 16, 10)
    statistics = {"scatter_", "scatter_add_", "mm", "amax", "exp_", "sum", "log_"}
    names = {}
    for fused in (False, True):
        xx = x.float().requires_grad_()
        with _Ops() as ops:
            icm_loss(xx, a, b, lam.float(), fused=fused, validate=False).backward()
        names[fused] = ops.names
    assert statistics <= names[False]
    assert not statistics & names[True] and "mean" in names[True]


def test_the_fused_loss_keeps_no_score_block():
    """What autograd keeps for the backward: nothing bigger than the logits (the torch form
    keeps the (n x N) S̃ itself)."""
    x, a, b, lam = _problem(128, 128, 10)
    sizes = {False: [], True: []}
    for fused, seen in sizes.items():
        xx = x.float().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, s=seen: s.append(t.numel()) or t, lambda t: t
        ):
            icm_loss(xx, a, b, lam.float(), fused=fused)
    assert max(sizes[False]) >= 128 * 128
    assert max(sizes[True]) <= 128 * 10


def test_fused_stats_reject_what_they_do_not_compute():
    x, a, b, lam = _problem(4, 6, 3)
    with pytest.raises(ValueError, match="float32"):
        fused_stats(x, a, b, lam)
    with pytest.raises(ValueError, match="no full diagonal"):
        fused_stats(x.float(), a, b, lam.float(), 3)


M, C = 6, 7


def _worker(rank, world):
    x, a, b, lam = _problem(M * world, M * world, C, seed=3)
    sl = slice(rank * M, (rank + 1) * M)
    out = {}
    for gather in ("triples", "scores"):
        xr = x[sl].float().requires_grad_()
        group = torch.distributed.group.WORLD
        loss = icm_loss(xr, a[sl], b[sl], lam[sl].float(), process_group=group, gather=gather)
        fused = icm_loss(
            xr, a[sl], b[sl], lam[sl].float(), process_group=group, gather=gather, fused=True
        )
        (grad,) = torch.autograd.grad(fused, xr)
        out[gather] = (loss.item(), fused.item(), grad)
    return out


@pytest.mark.multiproc
def test_fused_on_two_processes_equals_one_process():
    """Each rank's fused loss sums to the one-process global loss, and the ranks' gradients
    (each rank's own rows, as DDP's average leaves them times the world size) stack to its
    gradient; the torch form's per-rank value is the negative control (a rank's share is not
    the global loss)."""
    world = 2
    results = run_group(_worker, world)
    x, a, b, lam = _problem(M * world, M * world, C, seed=3)
    ref_loss, ref_grad = _loss_and_grad(x, a, b, lam)
    for gather in ("triples", "scores"):
        mean = sum(r[gather][1] for r in results) / world
        assert abs(mean - ref_loss.item()) <= TOL * abs(ref_loss.item())
        grad = torch.cat([r[gather][2] for r in results]) / world
        assert _rel(grad, ref_grad) <= TOL
        assert all(abs(r[gather][0] - r[gather][1]) <= TOL * abs(r[gather][0]) for r in results)
        assert abs(results[0][gather][1] - ref_loss.item()) > 100 * TOL * abs(ref_loss.item())


# ------------------------------------------------------------------ Mixup's blend


def _images(shape, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    n = shape[0]
    perm, lam = torch.randperm(n, generator=g), torch.rand(n, generator=g)
    lam[0] = 1.0  # the image itself, and (below) its partner alone
    lam[-1] = 0.0 if n > 1 else lam[-1]
    return (x.to(memory_format=torch.channels_last) if channels_last else x), perm, lam


def _torch_blend(x, perm, lam):
    w = lam.view(-1, *([1] * (x.ndim - 1)))
    return w * x + (1 - w) * x[perm]


# one image; CIFAR's size in both layouts; digits; images that are not a multiple of the block
@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((1, 3, 4, 4), False),
        ((5, 3, 32, 32), False),
        ((5, 3, 32, 32), True),
        ((6, 1, 8, 8), False),
        ((3, 3, 19, 23), True),
        ((4, BLOCK_BLEND + 7), False),
    ],
)
def test_the_fused_blend_is_torch_s_blend_bit_for_bit(shape, channels_last):
    x, perm, lam = _images(shape, channels_last)
    got = fused_blend(x, perm, lam)
    ref = _torch_blend(x, perm, lam)
    assert torch.equal(got, ref) and got.stride() == ref.stride() == x.stride()
    # negative control: the same blend rounded otherwise (one lerp) is told apart
    w = lam.view(-1, *([1] * (x.ndim - 1)))
    if x.numel() > 100:
        assert not torch.equal(torch.lerp(x[perm], x, w), ref)


def test_mixup_with_fused_runs_the_kernel_and_gives_the_same_batch():
    x, _, _ = _images((8, 3, 32, 32), channels_last=True)
    y = torch.arange(8) % 3
    ctx = MixContext(seed=4, step=2, group_size=4)
    names = {}
    for fused in (False, True):
        with _Ops() as ops:
            names[fused] = mixup(x, y, alpha=0.4, ctx=ctx, fused=fused), ops.names
    (plain, plain_ops), (fused, fused_ops) = names[False], names[True]
    assert torch.equal(fused.x, plain.x) and torch.equal(fused.lam, plain.lam)
    assert {"mul", "add", "rsub"} <= plain_ops and not {"mul", "add", "rsub"} & fused_ops


@pytest.mark.parametrize("case", ["bfloat16", "gradient", "strided", "empty", "flat"])
def test_mixup_falls_back_where_the_blend_kernel_does_not_apply(case):
    x, _, _ = _images((4, 3, 8, 8))
    if case == "bfloat16":
        x = x.bfloat16()
    elif case == "gradient":
        x = x.requires_grad_()
    elif case == "strided":
        x = x[:, :, ::2]
    elif case == "empty":
        x = x[:0]
    else:  # one number per image: that applies
        x = x.reshape(4, -1)[:, 0].contiguous()
    assert blend_applies(x) is (case == "flat")
    y = torch.zeros(x.shape[0], dtype=torch.int64)
    ctx = MixContext(seed=1, step=0)
    if case != "empty":
        plain, fused = (mixup(x, y, alpha=0.4, ctx=ctx, fused=f) for f in (False, True))
        assert torch.equal(fused.x, plain.x)
    if not blend_applies(x):
        with pytest.raises(ValueError, match="fused_blend takes dense float32 images"):
            fused_blend(x, torch.zeros(x.shape[0], dtype=torch.int64), torch.zeros(x.shape[0]))


def test_fused_blend_rejects_bad_partners_or_weights():
    x, perm, lam = _images((4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"perm \(int64\) and lam must have shape \(4,\)"):
        fused_blend(x, perm[:3], lam)
    with pytest.raises(ValueError, match="lam must be float32"):
        fused_blend(x, perm, lam.double())


def test_the_fused_objective_blends_in_the_kernel():
    """``loss.fused`` (the trainer's objective): the ICM step's blend is the kernel's."""
    x, _, _ = _images((8, 3, 8, 8))
    y = torch.arange(8) % 5
    ctx = MixContext(seed=0, step=0)
    for fused in (False, True):
        objective = Objective(ObjectiveConfig(name="icm_mixup", fused=fused), validate=False)
        with _Ops() as ops:
            objective.mix(x, y, ctx)
        assert ("rsub" in ops.names) is not fused
