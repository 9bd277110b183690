r"""The logsumexps of the score matrix S̃ = X Ỹᵀ along both axes, in tiles, without ever holding it.

The ICM loss needs, for a block of images X (m x C) against mixed classes (a, b, lam) (k of
them), only these per-row and per-column statistics of S̃ (m x k):

* ``rows[i] = log sum_j exp S̃_ij`` and ``cols[j] = log sum_i exp S̃_ij``;
* with positives (``keys``: S̃_ij is a positive iff ``row_keys[i] == col_keys[j]``), also
  ``pos_rows`` and ``pos_cols``, the same sums over the positives only (-inf where none).

``lse_stats`` computes them by walking S̃ in tiles of at most ``tile x tile`` entries and folding
each tile's logsumexps into running ones (``logaddexp``); the backward pass recomputes every tile
instead of storing it. Memory is O(tile² + tile·C + (m + k) + m·C) instead of O(m·k) (the
tile·C: a tile's dense slice of Ỹ; m·C: X and its gradient), the idea of Inf-CL
(Cheng et al. 2024) for CLIP, here for the ICM score matrix, whose tile is a matmul with a
dense slice of Ỹ (or two column gathers, see ``dist_icm.loss.mixed_scores``). With ``tile=0`` it
forms S̃ whole and lets autograd keep it (the faster choice while n x N fits).

Gradient: only X receives one (the mixing triples are data). With upstream gradients
g (per row), h (per column) and their positive-only counterparts,

    dS̃_ij = g_i p_ij + h_j q_ij + [pos_ij] (g'_i p'_ij + h'_j q'_ij),   dX = dS̃ Ỹ,

where p, q are the softmaxes of S̃ along rows and columns (exp(S̃_ij - rows_i), exp(S̃_ij -
cols_j)) and p', q' those over the positives. Pure tensor code: no collectives here.
"""

from __future__ import annotations

import functools

import torch


def dense_mixing(a, b, lam, num_classes: int, like: torch.Tensor):
    """The dense Ỹ slice (k x C) of mixed classes (a, b, lam): 4 kernels (a == b adds up to 1)."""
    y = torch.zeros(a.shape[0], num_classes, dtype=like.dtype, device=like.device)
    y.scatter_(1, a[:, None], lam[:, None])
    return y.scatter_add_(1, b[:, None], (1 - lam)[:, None])


def tile_scores(x, a, b, lam, y):
    """One tile of S̃: a matmul with the dense slice y, or (y None) two column gathers."""
    if y is not None:
        return x @ y.T
    return x[:, a] * lam + x[:, b] * (1 - lam)


def _without_autocast(backward):
    """A custom backward that runs in its inputs' dtype also where ``backward()`` is called
    under autocast (which would run its matmuls in bf16): the device of the first saved
    tensor, autocast off."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return backward(ctx, *grads)

    return run


class _Scores(torch.autograd.Function):
    """S̃ = X Yᵀ, as ``tile_scores`` with y, with its own backward (dX = dS̃ Y) so that it runs
    in X's dtype under autocast too (autograd's own matmul would not). Y, made from the triples,
    takes no gradient."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(y)
        return x @ y.T

    @staticmethod
    @_without_autocast
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g @ y, None


def masked_lse(s: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp of ``s`` over the entries where ``mask`` holds; -inf, with a zero (not NaN)
    gradient, where it holds nowhere (e.g. a column with no positive among this rank's rows)."""
    masked = s.masked_fill(~mask, float("-inf"))
    shift = masked.detach().amax(dim, keepdim=True)
    shift = torch.where(shift.isfinite(), shift, torch.zeros_like(shift))
    total = (masked - shift).exp().sum(dim)
    some = total > 0
    out = shift.squeeze(dim) + torch.where(some, total, torch.ones_like(total)).log()
    return torch.where(some, out, torch.full_like(out, float("-inf")))


def _lse(s: torch.Tensor, dim: int) -> torch.Tensor:
    """``s.logsumexp(dim)`` as torch computes it (the maximum as shift, 0 where it is infinite),
    in 7 kernels instead of 9."""
    shift = s.amax(dim, keepdim=True).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return (s - shift).exp_().sum(dim).log_().add_(shift.squeeze(dim))


class _DenseLSE(torch.autograd.Function):
    """(rows, cols, diag) of S̃ = X Yᵀ, untiled, with a hand-written backward. The same math as
    autograd through ``(x @ y.T).logsumexp`` with S̃ kept, in about half the kernels: the
    trainer's ICM step on a GPU is a chain of small kernels, and each one costs a launch."""

    @staticmethod
    def forward(ctx, x, y, offset):
        s = x @ y.T
        rows, cols = _lse(s, 1), _lse(s, 0)
        ctx.offset = offset
        ctx.save_for_backward(s, y, rows, cols)
        return rows, cols, s.diagonal(offset).clone()

    @staticmethod
    @_without_autocast
    def backward(ctx, g_rows, g_cols, g_diag):
        s, y, rows, cols = ctx.saved_tensors
        ds = None
        if g_rows is not None:  # d rows_i / d S̃_ij: the softmax of row i
            ds = (s - rows[:, None]).exp_().mul_(g_rows[:, None])
        if g_cols is not None:
            q = (s - cols[None, :]).exp_().mul_(g_cols[None, :])
            ds = q if ds is None else ds.add_(q)
        dx = (torch.zeros_like(s) if ds is None else ds) @ y
        if g_diag is not None:  # d S̃[i, offset + i] / d x_i = row offset + i of y, added after
            # the matmul as autograd's gathers did. Folded into ds, the same math rounds
            # differently, and on the quickstart's trajectory 1 and 2 processes then drifted
            # from 1e-7 apart (the gradient averaging's rounding) to 2.6e-3 by step 40
            dx.add_(g_diag[:, None] * y[ctx.offset : ctx.offset + s.shape[0]])
        return dx, None, None


def dense_stats(x: torch.Tensor, y: torch.Tensor, offset: int = 0):
    """Row and column logsumexps of S̃ = X Yᵀ (m x k) and its entries S̃[i, offset + i], the
    positives' scores when X's images own the mixed classes ``offset ... offset + m - 1``.

    Untiled (S̃ is kept for the backward pass) and from the dense Ỹ slice ``y`` (k x C); only
    X receives a gradient. ``lse_stats`` covers tiles, gathers and positives.
    """
    if not 0 <= offset <= y.shape[0] - x.shape[0]:
        m, k = x.shape[0], y.shape[0]
        raise ValueError(f"offset {offset} leaves no full diagonal in an {m} x {k} S̃")
    return _DenseLSE.apply(x, y, offset)


# ``tile="auto"``: untiled while the untiled path's extra peak memory, three (m x k) blocks (S̃
# kept for the backward pass, then its two softmaxes there; measured: 3,085 MiB at m = k = 16,384
# in float32), fits in AUTO_BUDGET bytes; beyond, tiles of AUTO_TILE (the H200's best of those
# measured; each tile is ~40 kernel launches).
AUTO_BUDGET = 2 * 2**30
AUTO_TILE = 4096


def is_tile(value) -> bool:
    """Whether ``value`` is a valid ``tile``: an int >= 0 (0: untiled) or ``"auto"``."""
    if value == "auto":
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def resolve_tile(tile: int | str, rows: int, cols: int, itemsize: int) -> int:
    """The tile edge for an (rows x cols) block of S̃ of ``itemsize``-byte floats: ``tile``
    itself, or for ``"auto"`` 0 (untiled, the faster) within :data:`AUTO_BUDGET`, else
    :data:`AUTO_TILE`."""
    if tile != "auto":
        return tile
    return 0 if 3 * rows * cols * itemsize <= AUTO_BUDGET else AUTO_TILE


def _spans(size: int, tile: int):
    return [(lo, min(lo + tile, size)) for lo in range(0, size, tile)]


class _TiledLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, lam, row_keys, col_keys, tile, dense):
        m, k = x.shape[0], a.shape[0]
        with_pos = row_keys is not None
        neg = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
        rows, cols = neg.expand(m).clone(), neg.expand(k).clone()
        prows, pcols = (rows.clone(), cols.clone()) if with_pos else (None, None)
        for j0, j1 in _spans(k, tile):
            s_ab = (a[j0:j1], b[j0:j1], lam[j0:j1])
            y = dense_mixing(*s_ab, x.shape[1], x) if dense else None
            for i0, i1 in _spans(m, tile):
                s = tile_scores(x[i0:i1], *s_ab, y)
                rows[i0:i1] = torch.logaddexp(rows[i0:i1], s.logsumexp(1))
                cols[j0:j1] = torch.logaddexp(cols[j0:j1], s.logsumexp(0))
                if with_pos:
                    sp = s.masked_fill(row_keys[i0:i1, None] != col_keys[None, j0:j1], neg)
                    prows[i0:i1] = torch.logaddexp(prows[i0:i1], sp.logsumexp(1))
                    pcols[j0:j1] = torch.logaddexp(pcols[j0:j1], sp.logsumexp(0))
        ctx.tile, ctx.dense, ctx.with_pos = tile, dense, with_pos
        saved = [x, a, b, lam, rows, cols]
        if with_pos:
            saved += [row_keys, col_keys, prows, pcols]
        ctx.save_for_backward(*saved)
        if with_pos:
            return rows, cols, prows, pcols
        return rows, cols

    @staticmethod
    @_without_autocast
    def backward(ctx, g_rows, g_cols, g_prows=None, g_pcols=None):
        x, a, b, lam, rows, cols, *pos = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        g_rows = zero.expand(rows.shape) if g_rows is None else g_rows
        g_cols = zero.expand(cols.shape) if g_cols is None else g_cols
        if ctx.with_pos:
            row_keys, col_keys, prows, pcols = pos
            g_prows = zero.expand(prows.shape) if g_prows is None else g_prows
            g_pcols = zero.expand(pcols.shape) if g_pcols is None else g_pcols
        dx = torch.zeros_like(x)
        m, k, num_classes = x.shape[0], a.shape[0], x.shape[1]
        for j0, j1 in _spans(k, ctx.tile):
            tj = slice(j0, j1)
            s_ab = (a[tj], b[tj], lam[tj])
            y = dense_mixing(*s_ab, num_classes, x) if ctx.dense else None
            for i0, i1 in _spans(m, ctx.tile):
                ti = slice(i0, i1)
                s = tile_scores(x[ti], *s_ab, y)
                ds = g_rows[ti, None] * (s - rows[ti, None]).exp()
                ds += g_cols[None, tj] * (s - cols[None, tj]).exp()
                if ctx.with_pos:
                    p = row_keys[ti, None] == col_keys[None, tj]
                    # where p holds, the positive sums are finite, so no inf - inf
                    prow = torch.where(p, s - prows[ti, None], float("-inf")).exp()
                    pcol = torch.where(p, s - pcols[None, tj], float("-inf")).exp()
                    ds += g_prows[ti, None] * prow + g_pcols[None, tj] * pcol
                if y is not None:
                    dx[ti] += ds @ y
                else:
                    dx[ti].index_add_(1, s_ab[0], ds * s_ab[2])
                    dx[ti].index_add_(1, s_ab[1], ds * (1 - s_ab[2]))
        return dx, None, None, None, None, None, None, None


def lse_stats(x, a, b, lam, *, keys=None, tile: int = 0, dense: bool = True):
    """Row and column logsumexps of S̃ = X Ỹᵀ (and over the positives when ``keys`` is given).

    Args:
        x: (m, C) float scores X. a, b: (k,) int64 classes; lam: (k,) weights (x's dtype).
        keys: None, or (row_keys (m,), col_keys (k,)): S̃_ij is a positive iff the keys match.
        tile: 0 computes S̃ whole (autograd stores it); T > 0 walks it in T x T tiles and
            recomputes them in the backward (memory beyond the inputs linear in m and k,
            not O(m·k): the running statistics, with O(tile² + tile·C) per tile).
        dense: form each tile as a matmul with a dense Ỹ slice (True) or two column gathers.

    Returns:
        (rows (m,), cols (k,)) or, with keys, (rows, cols, pos_rows, pos_cols).
    """
    if tile < 0:
        raise ValueError(f"tile must be >= 0, got {tile}")
    if tile:
        row_keys, col_keys = keys if keys is not None else (None, None)
        return _TiledLSE.apply(x, a, b, lam, row_keys, col_keys, tile, dense)
    if dense:
        s = _Scores.apply(x, dense_mixing(a, b, lam, x.shape[1], x))
    else:
        s = tile_scores(x, a, b, lam, None)
    out = (s.logsumexp(1), s.logsumexp(0))
    if keys is None:
        return out
    pos = keys[0][:, None] == keys[1][None, :]
    return (*out, masked_lse(s, pos, 1), masked_lse(s, pos, 0))
