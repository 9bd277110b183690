r"""The Infinite Class Mixup loss (Mensink & Mettes, BMVC 2023, Sec. 3), over the global batch.

Every mixed image i has its own class, the classifier interpolated with its mixing vector
:math:`\tilde y_i = \lambda_i e_{a_i} + (1-\lambda_i) e_{b_i}`. With logits S (n x C) the score
matrix is :math:`\tilde S = S \tilde Y^\top`, i.e.
:math:`\tilde S_{ij} = \lambda_j S_{i a_j} + (1-\lambda_j) S_{i b_j}`, and the loss is the
cross-entropy along both of its axes with the identity as target (Eq. 9):

* class axis, :math:`p_{cc}`: row i is a softmax over the batch's classes, CE(S̃, I);
* pair axis, :math:`p_{ci}`: column j is a softmax over the batch's images, CE(S̃ᵀ, I).

Both are means over the batch; ``axis="both"`` is their sum.

With a process group, S̃ spans the *global* batch (N = sum of the ranks' n). Each rank owns n
rows of S̃ (its images) and the same n columns (its mixing vectors), and returns the mean of the
class-axis terms of its rows plus the pair-axis terms of its columns. The mean of the ranks'
values is the global loss, and under DDP (gradients averaged over ranks) the parameter gradient
is exactly the single-process gradient on the whole batch. Two ways to get there:

* ``gather="triples"`` (default): the mixing triples (a, b, lam) are all-gathered (8 bytes a
  sample in float32: a and b as int16 while the classes fit, 12 beyond 32,767 classes, 4 more
  for float64 lam). Row i of S̃ needs only S_i, so the rank computes its row block S_r Ỹᵀ
  (n x N) and the class axis is local. For the pair axis each rank takes the logsumexp of
  every column over its own n rows, and one all-to-all sends each column's W partial values
  to the column's owner, which adds them up (a logsumexp over W); the all-to-all's backward
  returns each rank's share of the gradient. 4 bytes a sample forward and 4 backward (twice
  that with dedup, whose positives need their own sums).
* ``gather="scores"``: the logits are all-gathered with gradient (4·C bytes a sample, beside
  the triples' 8; their gradient is reduce-scattered back to the owners, 4·C more) and the rank
  computes its column block S Ỹ_rᵀ (N x n) in full.

Untiled with the dense Ỹ and without dedup (the default), the rank's block of S̃, its row and
column logsumexps and its positives' scores come from one autograd function with a
hand-written backward (``dist_icm.tiled.dense_stats``): the same math in about half the kernels.
``tile=T`` computes the same statistics in T x T tiles (``dist_icm.tiled``), recomputing them in
the backward pass, so no (n x N) block is ever held. ``fused=True`` takes them from two Triton
kernels instead (``dist_icm.fused``: one launch forward, one backward, no (n x N) block either).
Counted bytes per collective: ``dist.count_bytes`` and ``python -m dist_icm.bench comm``.

``dedup=True`` (beyond the paper) treats rows whose mixing vectors are identical as positives of
each other (multi-positive CE: -log of the softmax mass on all positives), so duplicates of a
target are no longer pushed apart; the plain loss cannot go below log k for k duplicates. (Its
grouping, ``torch.unique``, reads its output size back from the device.)

The loss runs in float32 (float64 for float64 logits) with autocast disabled, whatever the
caller's autocast state, and so does its backward pass, also where ``backward()`` is called
under autocast.

A non-finite logit reaches the loss where its class takes part in S̃: always on the dense
(matmul) forms, whose 0 · NaN is NaN, but only where a target names its class on the gather
and fused forms. In a model such a logit comes from non-finite features or classifier weights,
whose gradients are then non-finite on every form, which is what the trainer's skip checks.
"""

from __future__ import annotations

import torch

from dist_icm import dist
from dist_icm.fused import fused_stats
from dist_icm.tiled import (
    dense_mixing,
    dense_stats,
    is_tile,
    lse_stats,
    resolve_tile,
    tile_scores,
)

AXES = ("class", "pair", "both")
GATHERS = ("triples", "scores")
METHODS = ("auto", "matmul", "gather")

# S Ỹᵀ as a matmul with a dense Ỹ costs n*N*C multiply-adds; as two column gathers it costs
# 2*n*N plus the scatter in the backward pass. `python -m dist_icm.bench loss` measures both
# side by side; on the 2-core CPU machines here (fwd+bwd, float32, N=4096) the gathers took
# 1.79x the matmul's time at C=10, 1.36x at C=300, 1.09x at C=700, 0.97x at C=1000 and 0.72x
# at C=2000 (N=8192: 1.55x at C=100, 1.00x at C=1000). On an H200 (bf16, untiled, N=16,384;
# README, Performance) they took 7.8x at C=100 and 3.1x at C=1000, a ratio that falls slowly
# with C: CUDA keeps the matmul up to 4,096 classes, where the dense Ỹ (N x C floats) stays
# modest (256 MiB at N = 16,384); an extrapolation: 1,000 is the largest C measured there.
DENSE_MAX_CLASSES = 900
DENSE_MAX_CLASSES_CUDA = 4096


def _form(method: str, num_classes: int, device_type: str = "cpu") -> str:
    """``method`` with "auto" resolved: "matmul" up to ``DENSE_MAX_CLASSES`` classes
    (``DENSE_MAX_CLASSES_CUDA`` on CUDA), else "gather" (any other value is passed on, for the
    caller to reject)."""
    if method == "auto":
        most = DENSE_MAX_CLASSES_CUDA if device_type == "cuda" else DENSE_MAX_CLASSES
        return "matmul" if num_classes <= most else "gather"
    return method


def uses_fused(dtype: torch.dtype, *, fused: bool, tile: int = 0, dedup=False) -> bool:
    """Whether the loss takes its statistics from ``dist_icm.fused`` (``fused=True``, untiled,
    without dedup, float32 loss math)."""
    return fused and not tile and not dedup and dtype == torch.float32


def uses_dense_stats(
    num_classes: int, *, method="auto", tile: int = 0, dedup=False, device_type: str = "cpu"
) -> bool:
    """Whether the loss forms this rank's block of S̃ with ``dense_stats`` (one autograd function
    with a hand-written backward): untiled, from the dense Ỹ, without dedup. The default, and
    the path ``dist_icm.graphs`` replays."""
    return _form(method, num_classes, device_type) == "matmul" and not tile and not dedup


def mixing_matrix(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, num_classes: int):
    """Dense Ỹ (N x C): row j is lam_j * e_{a_j} + (1 - lam_j) * e_{b_j}."""
    return dense_mixing(a, b, lam, num_classes, lam)


def mixed_scores(
    logits: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lam: torch.Tensor,
    method: str = "auto",
) -> torch.Tensor:
    """S Ỹᵀ: scores of the n images in ``logits`` against the N mixed classes (a, b, lam).

    ``method`` is "matmul" (dense Ỹ), "gather" (two column gathers) or "auto" (matmul up to
    ``DENSE_MAX_CLASSES`` classes, ``DENSE_MAX_CLASSES_CUDA`` on CUDA, gathers above).
    """
    num_classes = logits.shape[1]
    method = _form(method, num_classes, logits.device.type)
    if method in ("matmul", "gather"):
        dense = method == "matmul"
        return tile_scores(
            logits, a, b, lam, mixing_matrix(a, b, lam, num_classes) if dense else None
        )
    raise ValueError(f"unknown method {method!r}: use 'auto', 'matmul' or 'gather'")


def target_groups(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Group id per row such that two rows share an id iff their mixing vectors are identical.

    A vector is written canonically as (lower class, higher class, weight of the lower class);
    a == b, lam == 1 and lam == 0 all collapse to the one-hot vector of the class that carries
    the whole weight. Weights compare exactly (in float64), so (a, b, lam) and (b, a, 1 - lam)
    match whenever 1 - lam is exact, as it is for the single lam per batch that mixing draws.
    """
    lam = lam.detach().double()
    first = torch.where(lam == 0, b, a)
    second = torch.where(lam == 1, a, b)
    onehot = (first == second) | (lam == 0) | (lam == 1)
    lo = torch.where(onehot, first, torch.minimum(first, second))
    hi = torch.where(onehot, first, torch.maximum(first, second))
    w_lo = torch.where(onehot, torch.ones_like(lam), torch.where(a < b, lam, 1 - lam))
    key = torch.stack([lo.double(), hi.double(), w_lo], dim=1)
    return torch.unique(key, dim=0, return_inverse=True)[1]


def duplicate_share(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> float:
    """The share of rows whose mixing vector (see :func:`target_groups`) another row also has:
    the rows that the paper's loss treats as negatives of identical targets (``dedup`` makes
    them positives). One host read-back; for logging, not for the training step."""
    if a.numel() == 0:
        return 0.0
    groups = target_groups(a, b, lam)
    sizes = torch.bincount(groups)
    return (sizes[groups] > 1).double().mean().item()


def _stats(x, a, b, lam, keys, tile: int, dense: bool):
    """(rows, cols, pos_rows, pos_cols) logsumexps of S̃ = x Ỹᵀ (pos_* None without keys)."""
    out = lse_stats(x, a, b, lam, keys=keys, tile=tile, dense=dense)
    return out if keys is not None else (*out, None, None)


def _owners_lse(cols: torch.Tensor, group) -> torch.Tensor:
    """Global logsumexp of this rank's n columns, from every rank's logsumexp over its own rows
    of all N columns: one all-to-all sends each rank's N values to the columns' owners
    ((W-1)/W·4 bytes a sample in float32), and its backward sends the gradients back."""
    world = dist.size(group)
    return dist.all_to_all(cols, group).view(world, -1).logsumexp(0)


_INT16_CLASSES = 2**15 - 1


def _pack_triples(a, b, lam, num_classes: int):
    """(n, w) int32 words: a and b (int16 pairs in one word when the classes fit, else two
    words) and the bits of lam (1 word in float32, 2 in float64)."""
    words = lam.contiguous().view(torch.int32).reshape(lam.shape[0], -1)
    ab = torch.stack([a, b], dim=1)
    if num_classes <= _INT16_CLASSES:
        ab = ab.to(torch.int16).view(torch.int32)
    return torch.cat([ab.to(torch.int32), words], dim=1)


def _unpack_triples(wire: torch.Tensor, dtype: torch.dtype, num_classes: int):
    ab_words = 1 if num_classes <= _INT16_CLASSES else 2
    ab = wire[:, :ab_words].contiguous()
    if ab_words == 1:
        ab = ab.view(torch.int16)
    lam = wire[:, ab_words:].contiguous().view(dtype).reshape(-1)
    return ab[:, 0].long(), ab[:, 1].long(), lam


def _check_local(logits, a, b, lam, axis, gather, method) -> None:
    """Checks of arguments, shapes and dtypes: free (no device sync), every call."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if gather not in GATHERS:
        raise ValueError(f"gather must be one of {GATHERS}, got {gather!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use 'auto', 'matmul' or 'gather'")
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (n, C) tensor, got {tuple(logits.shape)}")
    n = logits.shape[0]
    for name, t in (("a", a), ("b", b), ("lam", lam)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) like the logits, got {tuple(t.shape)}")
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise ValueError(f"a and b must be int64 class indices, got {a.dtype} and {b.dtype}")
    if not lam.is_floating_point():
        raise ValueError(f"lam must be a float tensor, got {lam.dtype}")


_PROBLEMS = ("", "class indices a, b must lie in [0, {C})", "lam must lie in [0, 1]")


def _problem(logits, a, b, lam) -> int:
    """0 if the values are valid, else the index of what is wrong in ``_PROBLEMS``."""
    n, num_classes = logits.shape
    if n and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= num_classes):
        return 1
    if n and not bool(((lam >= 0) & (lam <= 1)).all()):
        return 2
    return 0


def _validate(logits, a, b, lam, group) -> None:
    """Value checks, and with a group the same verdict on every rank: each rank's row count and
    problem travel in one small all-gather, so a bad batch on one rank raises on all of them
    instead of leaving the others waiting in the loss's next collective."""
    n, num_classes = logits.shape
    mine = torch.tensor([[n, _problem(logits, a, b, lam)]], device=logits.device)
    verdicts = dist.all_gather_nograd(mine, group).tolist()
    for rank, (_, problem) in enumerate(verdicts):
        if problem:
            where = f" (on rank {rank})" if dist.is_distributed(group) else ""
            raise ValueError(_PROBLEMS[problem].format(C=num_classes) + where)
    sizes = [rows for rows, _ in verdicts]
    if any(rows != n for rows in sizes):
        raise ValueError(
            f"the global-batch loss needs the same number of rows on every rank, got {sizes}: "
            "make the global batch divisible by the world size and drop incomplete last batches"
        )


def icm_loss(
    logits: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lam: torch.Tensor,
    *,
    axis: str = "both",
    process_group: dist.Group = None,
    gather: str = "triples",
    dedup: bool = False,
    method: str = "auto",
    tile: int | str = 0,
    fused: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Infinite Class Mixup loss of this process's rows; see the module docstring.

    Args:
        logits: (n, C) scores S of the mixed images on this process (any float dtype). The
            whole loss runs in float32 (float64 for float64 input) with autocast disabled, so
            calling it inside ``torch.autocast`` gives the float32 result, not a bf16/fp16 one.
        a, b: (n,) int64 classes of the two sources; lam: (n,) weight of class a.
        axis: "class" (CE(S̃, I)), "pair" (CE(S̃ᵀ, I)) or "both" (their sum).
        process_group: ``None`` for one process; else S̃ spans the group's global batch and
            every rank must hold the same n.
        gather: "triples" or "scores" (see the module docstring); both are exact.
        dedup: identical mixing vectors count as positives of each other.
        method: how S̃ is formed, "matmul", "gather" or "auto" (see ``mixed_scores``).
        tile: 0 forms this rank's block of S̃ whole; T > 0 walks it in T x T tiles and
            recomputes them in the backward pass (``dist_icm.tiled``), so memory no longer
            grows with n·N. Same loss and gradients up to float rounding. "auto": whole while
            the (n x N) block's ~3 copies fit in 2 GiB, else tiles of 4096
            (``dist_icm.tiled.resolve_tile``).
        fused: take S̃'s statistics from two Triton kernels (``dist_icm.fused``: one launch
            forward, one backward, no (n x N) block held) where the loss is untiled, without
            dedup, in float32; elsewhere it has no effect. CUDA, or Triton's interpreter.
        validate: also check values (class indices in range, lam in [0, 1]: one host sync
            each) and, with a group, that every rank holds the same n (one small all-gather),
            so that a bad batch raises the same error on every rank instead of leaving the
            others waiting in a collective. Arguments, shapes and dtypes are always checked
            (that costs nothing). The trainer turns it off: its mixing makes valid triples.

    Returns:
        A scalar: the mean over this rank's rows of its class-axis and/or pair-axis terms.

    Raises:
        ValueError: on bad arguments or inputs, and on an empty batch (n = 0), which has no
            mean; with ``validate`` and a group, on every rank alike.
    """
    _check_local(logits, a, b, lam, axis, gather, method)
    if not is_tile(tile):
        raise ValueError(f"tile must be an int >= 0 (0: untiled) or 'auto', got {tile!r}")
    n = logits.shape[0]
    if validate:
        _validate(logits, a, b, lam, process_group)
    if n == 0:
        raise ValueError("icm_loss got an empty batch (n = 0): the loss has no rows to average")
    with torch.autocast(logits.device.type, enabled=False):
        return _loss(logits, a, b, lam, axis, process_group, gather, dedup, method, tile, fused)


def _loss(logits, a, b, lam, axis, process_group, gather, dedup, method, tile, fused):
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    lam = lam.to(x.dtype)
    world, n, num_classes = dist.size(process_group), x.shape[0], x.shape[1]
    tile = resolve_tile(tile, n, world * n, x.element_size())  # the same on every rank
    if world > 1:
        wire = _pack_triples(a, b, lam, num_classes)
        ga, gb, gl = _unpack_triples(
            dist.all_gather_nograd(wire, process_group), x.dtype, num_classes
        )
    else:
        ga, gb, gl = a, b, lam
    first = dist.rank(process_group) * n  # this rank's mixed classes are first ... first + n - 1
    dense = _form(method, num_classes, x.device.type) == "matmul"
    groups = target_groups(ga, gb, gl) if dedup else None

    # this rank's images against all N mixed classes: rows of S̃ and its columns' partial sums
    pos_rows = pos_cols = None
    if uses_fused(x.dtype, fused=fused, tile=tile, dedup=dedup):  # fewest kernels: 2
        rows, cols, diag = fused_stats(x, ga, gb, gl, first)
    elif uses_dense_stats(
        num_classes, method=method, tile=tile, dedup=dedup, device_type=x.device.type
    ):  # next fewest
        rows, cols, diag = dense_stats(x, mixing_matrix(ga, gb, gl, num_classes), first)
    else:
        own = first + torch.arange(n, device=x.device)
        keys = None if groups is None else (groups[own], groups)
        rows, cols, pos_rows, pos_cols = _stats(x, ga, gb, gl, keys, tile, dense)
        diag = x.gather(1, a[:, None]).squeeze(1) * lam
        diag = diag + x.gather(1, b[:, None]).squeeze(1) * (1 - lam)
    loss = None
    if axis in ("class", "both"):
        loss = (rows - (diag if groups is None else pos_rows)).mean()
    if axis in ("pair", "both"):
        if world == 1:
            col_lse, pos_lse = cols, pos_cols
        elif gather == "scores":  # every image against this rank's n mixed classes
            keys = None if groups is None else (groups, groups[first : first + n])
            _, col_lse, _, pos_lse = _stats(
                dist.all_gather(x, process_group), a, b, lam, keys, tile, dense
            )
        else:
            col_lse = _owners_lse(cols, process_group)
            pos_lse = None if groups is None else _owners_lse(pos_cols, process_group)
        pair = (col_lse - (diag if groups is None else pos_lse)).mean()
        loss = pair if loss is None else loss + pair
    return loss
