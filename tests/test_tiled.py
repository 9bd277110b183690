"""The tiled ICM loss (``tile=T``) equals the untiled one: loss and gradients, one process.

float64: relative error <= 1e-9 (measured ~1e-16); float32: <= 1e-5 on the loss and the
gradient (as one vector), where the tiles' logaddexp folds round differently from one
logsumexp over the whole row. The multi-process cases are in test_loss_dist.py.
"""

import itertools

import pytest
import torch

from dist_icm import tiled
from dist_icm.loss import icm_loss, mixing_matrix
from dist_icm.tiled import _lse, dense_stats, lse_stats, masked_lse

C = 5


def _problem(n, dtype=torch.float64, seed=0, classes=C):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, classes, generator=g, dtype=dtype) * 3
    a = torch.randint(0, classes, (n,), generator=g)
    b = torch.randint(0, classes, (n,), generator=g)
    lam = torch.full((n,), 0.3, dtype=dtype)
    lam[::4], lam[1::5] = 1.0, 0.0  # one-hot rows: duplicated targets for dedup
    return x, a, b, lam


def _loss_and_grad(x, a, b, lam, **kw):
    x = x.detach().clone().requires_grad_()
    loss = icm_loss(x, a, b, lam, **kw)
    loss.backward()
    return loss.detach(), x.grad


def _rel(got, ref):
    return ((got - ref).norm() / ref.norm()).item()


CASES = list(
    itertools.product(["class", "pair", "both"], [False, True], ["matmul", "gather"], [1, 3, 8, 64])
)


@pytest.mark.parametrize("axis,dedup,method,tile", CASES)
def test_tiled_equals_untiled_float64(axis, dedup, method, tile):
    x, a, b, lam = _problem(13)  # 13 rows: the last tile is partial for every tile size < 13
    kw = {"axis": axis, "dedup": dedup, "method": method}
    ref_loss, ref_grad = _loss_and_grad(x, a, b, lam, **kw)
    loss, grad = _loss_and_grad(x, a, b, lam, tile=tile, **kw)
    assert _rel(loss, ref_loss) <= 1e-9
    assert _rel(grad, ref_grad) <= 1e-9


@pytest.mark.parametrize("dedup", [False, True])
def test_tiled_float32_within_1e_5(dedup):
    x, a, b, lam = _problem(300, dtype=torch.float32, seed=1, classes=10)
    ref_loss, ref_grad = _loss_and_grad(x, a, b, lam, dedup=dedup)
    loss, grad = _loss_and_grad(x, a, b, lam, dedup=dedup, tile=64)
    assert _rel(loss, ref_loss) <= 1e-5
    assert _rel(grad, ref_grad) <= 1e-5


def test_a_wrong_fold_is_caught():
    """Negative control: the comparison above rejects a tiling that drops the last partial
    tile (summing over 12 of 13 columns)."""
    x, a, b, lam = _problem(13)
    rows, cols = lse_stats(x, a, b, lam, tile=4)
    short_rows, _ = lse_stats(x, a[:12], b[:12], lam[:12], tile=4)
    assert _rel(rows, short_rows) > 1e-9
    ref_rows, ref_cols = lse_stats(x, a, b, lam)
    assert _rel(rows, ref_rows) <= 1e-12 and _rel(cols, ref_cols) <= 1e-12


@pytest.mark.parametrize("dense", [True, False])
def test_gradcheck_of_the_tiled_statistics(dense):
    x, a, b, lam = _problem(7)
    x.requires_grad_()
    keys = (torch.tensor([0, 1, 1, 2, 0, 3, 1]), torch.tensor([1, 0, 4, 1, 2, 0, 3]))

    def fn(x):  # every output; column 2 has no positive at all (-inf, compared as 0)
        out = lse_stats(x, a, b, lam, keys=keys, tile=3, dense=dense)
        return tuple(torch.where(o.isfinite(), o, 0.0) for o in out)

    assert torch.autograd.gradcheck(fn, (x,))


def test_bf16_logits_and_autocast_match_float32_bit_for_bit():
    x, a, b, lam = _problem(40, dtype=torch.float32, seed=2)
    xb = x.bfloat16()
    ref, _ = _loss_and_grad(xb.float(), a, b, lam, tile=16)
    got, grad = _loss_and_grad(xb, a, b, lam, tile=16)
    assert torch.equal(got, ref) and grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = _loss_and_grad(xb.float(), a, b, lam, tile=16)
    assert torch.equal(auto, ref)


def test_bad_tile_fails_clearly():
    x, a, b, lam = _problem(4)
    for bad in (-1, "big", 2.0, True):
        with pytest.raises(ValueError, match="tile must be an int >= 0"):
            icm_loss(x, a, b, lam, tile=bad)


def test_auto_tile_is_untiled_while_three_blocks_fit_the_budget():
    # 3 x 13,377^2 float32 = 2,147,329,548 bytes <= 2 GiB; one row more passes it
    assert tiled.resolve_tile("auto", 13_377, 13_377, 4) == 0
    assert tiled.resolve_tile("auto", 13_377, 13_378, 4) == tiled.AUTO_TILE == 4096
    assert tiled.resolve_tile("auto", 9_459, 9_459, 8) == 0  # float64: half the entries
    assert tiled.resolve_tile("auto", 9_460, 9_459, 8) == 4096
    assert tiled.resolve_tile("auto", 1_024, 65_536, 4) == 0  # n x N on one of 64 ranks
    assert tiled.resolve_tile(0, 10**6, 10**6, 4) == 0 and tiled.resolve_tile(64, 8, 8, 4) == 64


def test_auto_tile_is_the_loss_it_resolves_to(monkeypatch):
    """Within the budget "auto" is the untiled loss bit for bit; past it (a budget of 1 MiB
    here), the tiled loss bit for bit, which keeps no (n x N) block for the backward pass."""
    x, a, b, lam = _problem(256, dtype=torch.float32)
    assert all(
        torch.equal(got, ref)
        for got, ref in zip(
            _loss_and_grad(x, a, b, lam, tile="auto"), _loss_and_grad(x, a, b, lam), strict=True
        )
    )
    monkeypatch.setattr(tiled, "AUTO_BUDGET", 2**20)  # 3 x 256^2 x 4 bytes = 0.75 MiB fits
    assert tiled.resolve_tile("auto", 256, 256, 4) == 0
    monkeypatch.setattr(tiled, "AUTO_BUDGET", 2**19)
    monkeypatch.setattr(tiled, "AUTO_TILE", 32)
    ref = _loss_and_grad(x, a, b, lam, tile=32)
    assert not torch.equal(ref[1], _loss_and_grad(x, a, b, lam)[1])  # the forms do differ
    got = _loss_and_grad(x, a, b, lam, tile="auto")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        icm_loss(x.requires_grad_(), a, b, lam, tile="auto")
    assert max(saved) < 256 * C + 1


def test_tiled_memory_does_not_hold_the_score_matrix():
    """What autograd keeps for the backward: the tiled loss saves no (n x N) tensor."""
    x, a, b, lam = _problem(256, dtype=torch.float32)
    x.requires_grad_()
    sizes = {0: [], 32: []}
    for tile, seen in sizes.items():
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, s=seen: s.append(t.numel()) or t, lambda t: t
        ):
            icm_loss(x, a, b, lam, tile=tile)
    assert max(sizes[0]) >= 256 * 256  # untiled: the score matrix itself
    assert max(sizes[32]) < 256 * C + 1  # tiled: nothing bigger than the logits


def test_an_unknown_method_fails_clearly():
    x, a, b, lam = _problem(4)
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        icm_loss(x, a, b, lam, method="foo")


@pytest.mark.parametrize("offset", [0, 4, 9])
@pytest.mark.parametrize("outputs", [(0,), (1,), (2,), (0, 1, 2), (0, 2)])
def test_dense_stats_hand_backward_equals_autograd(offset, outputs):
    """The untiled default path: ``dense_stats``'s hand-written backward against autograd
    through the plain formulas, float64, for every subset of its outputs that gets a gradient
    (an unused output sends back None), and gradcheck at a small size."""
    x, a, b, lam = _problem(13)
    y = mixing_matrix(a, b, lam, C)  # N = 13 mixed classes
    x = x[:4].clone().requires_grad_()  # m = 4 images owning classes offset ... offset + 3
    weights = [torch.randn(n, dtype=torch.float64) for n in (4, 13, 4)]
    s = x @ y.T
    ref = (s.logsumexp(1), s.logsumexp(0), s.diagonal(offset))
    got = dense_stats(x, y, offset)
    for r, o in zip(ref, got, strict=True):
        assert torch.allclose(o, r, rtol=1e-12, atol=0)
    ref_grad = torch.autograd.grad(sum((weights[k] * ref[k]).sum() for k in outputs), x)[0]
    grad = torch.autograd.grad(sum((weights[k] * got[k]).sum() for k in outputs), x)[0]
    assert _rel(grad, ref_grad) <= 1e-12
    assert torch.autograd.gradcheck(lambda t: dense_stats(t, y, offset), (x,))


def test_dense_stats_rejects_an_offset_without_a_full_diagonal():
    x, a, b, lam = _problem(5)
    with pytest.raises(ValueError, match="no full diagonal"):
        dense_stats(x, mixing_matrix(a, b, lam, C), 1)


def test_dense_stats_logsumexp_is_torch_logsumexp_with_infinite_scores():
    """Its logsumexp gives what ``torch.logsumexp`` gives where scores are infinite (inf for a
    row holding +inf, -inf for a row of -inf, not NaN), and the same bits elsewhere."""
    s = torch.randn(4, 6, dtype=torch.float64) * 5
    s[1, 2], s[2, :] = float("inf"), float("-inf")
    for dim in (0, 1):
        torch.testing.assert_close(_lse(s, dim), s.logsumexp(dim), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [0, 1])
def test_masked_lse_is_stable_on_large_scores(dim):
    """``masked_lse`` (the dedup positives' sums) shifts by the largest unmasked score: on
    float32 scores of +-300 it equals a float64 logsumexp over the unmasked entries, -inf with
    a zero gradient where nothing is unmasked, and its gradient (the softmax over the unmasked
    entries) is finite. Shifted by anything else (the minimum: -inf where any entry is masked,
    so no shift at all), exp(300) overflows float32 and exp(-300) underflows it."""
    g = torch.Generator().manual_seed(4)
    s = (torch.rand(5, 6, generator=g, dtype=torch.float64) * 40 + 280) * torch.tensor(
        [1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64
    )[:, None]  # rows of +280..320 and of -320..-280
    mask = torch.rand(5, 6, generator=g) < 0.6  # True: the entry is summed
    mask[0] = True  # a row with nothing masked out
    mask[1, 0], mask[3, 5], mask[4, 2] = True, True, True  # at least one entry summed ...
    mask[2] = False  # ... except here: nothing to sum
    s, mask = (s, mask) if dim == 1 else (s.T.contiguous(), mask.T.contiguous())
    x = s.float().requires_grad_()
    out = masked_lse(x, mask, dim)
    ref = s.float().double().masked_fill(~mask, float("-inf")).logsumexp(dim)
    empty = ~mask.any(dim)
    assert empty.sum() == 1 and torch.equal(out[empty], ref[empty])  # -inf
    assert torch.allclose(out[~empty].double(), ref[~empty], rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(torch.where(empty, 0.0, out).sum(), x)
    soft = (s.float().double() - ref.unsqueeze(dim)).exp() * mask
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad.double(), torch.where(mask, soft, 0.0), rtol=1e-5, atol=1e-6)
