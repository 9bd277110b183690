r"""The ICM loss's statistics of S̃ in two Triton kernels, one forward and one backward.

``fused_stats(x, a, b, lam, offset)`` returns what ``dist_icm.tiled.dense_stats`` returns for
``y = mixing_matrix(a, b, lam, C)``: the row and column logsumexps of S̃ = X Ỹᵀ (m x k) and its
entries S̃[i, offset + i]. Where the torch form is ~20 kernels forward and ~10 backward (Ỹ,
the matmul, two logsumexps of 7 kernels each, the softmaxes and a second matmul), these are one
launch each way, and no (m x k) block is ever held: each program recomputes its tiles of S̃
from two gathers, S̃_ij = lam_j X[i, a_j] + (1 - lam_j) X[i, b_j].

* forward: a program per block of rows folds its rows' logsumexp over all k columns (a running
  maximum and sum) and takes the rows' own scores; a program per block of columns does the same
  down its columns. No atomics: the result does not depend on scheduling.
* backward: a program per block of rows and of classes sums dS̃ Ỹ over the column blocks with
  dS̃_ij = g_i exp(S̃_ij - rows_i) + h_j exp(S̃_ij - cols_j), building each tile of Ỹ from the
  triples in registers, then adds the diagonal's gradient (after the sum, as ``dense_stats``).

Same math as ``dense_stats``, summed in another order: equal up to float32 rounding
(``tests/test_fused.py``). Float32 only. On a CUDA device the kernels are compiled; on CPU
tensors they run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported; the tests do), which runs the same code in NumPy, slowly. ``loss.fused`` turns them
on (default off: they are checked against the torch form, but not yet measured on a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def unavailable(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on ``device`` (None: they can), in one line. (Triton itself
    is imported only when they run: ``dist_icm.fused_kernels``.)"""
    if importlib.util.find_spec("triton") is None:  # torch's CPU-only wheels come without it
        return "loss.fused needs Triton (pip install triton; torch's CUDA wheels bring it)"
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"loss.fused runs on CUDA (or on the CPU in Triton's interpreter, TRITON_INTERPRET=1, "
            f"for tests), not on {device.type}"
        )
    return None


def _upstream(grad: torch.Tensor | None, size: int, like: torch.Tensor):
    """An upstream gradient and its element step (0 for a broadcast scalar, as autograd hands
    the gradient of a mean), or zeros where that output got none."""
    if grad is None:
        grad = like.new_zeros(()).expand(size)
    return grad, grad.stride(0)


class _FusedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, lam, offset):
        from dist_icm import fused_kernels as kern

        x, a, b, lam = (t.contiguous() for t in (x, a, b, lam))
        (m, num_classes), k = x.shape, a.shape[0]
        rows, cols, diag = x.new_empty(m), x.new_empty(k), x.new_empty(m)
        row_programs = kern.triton.cdiv(m, kern.BLOCK_ROWS)
        grid = (row_programs + kern.triton.cdiv(k, kern.BLOCK_COLS),)
        kern._forward[grid](
            x, a, b, lam, rows, cols, diag, m, k, num_classes, offset, row_programs,
            BM=kern.BLOCK_ROWS, BN=kern.BLOCK_COLS,
        )  # fmt: skip
        ctx.offset = offset
        ctx.save_for_backward(x, a, b, lam, rows, cols)
        return rows, cols, diag

    @staticmethod
    def backward(ctx, g_rows, g_cols, g_diag):
        from dist_icm import fused_kernels as kern

        x, a, b, lam, rows, cols = ctx.saved_tensors
        (m, num_classes), k = x.shape, a.shape[0]
        g_rows, row_step = _upstream(g_rows, m, x)
        g_cols, col_step = _upstream(g_cols, k, x)
        g_diag, diag_step = _upstream(g_diag, m, x)
        dx = torch.empty_like(x)
        cdiv = kern.triton.cdiv
        grid = (cdiv(m, kern.BLOCK_ROWS), cdiv(num_classes, kern.BLOCK_CLASSES))
        kern._backward[grid](
            x, a, b, lam, rows, cols, g_rows, g_cols, g_diag, row_step, col_step, diag_step,
            dx, m, k, num_classes, ctx.offset,
            BM=kern.BLOCK_ROWS, BN=kern.BLOCK_COLS, BC=kern.BLOCK_CLASSES,
        )  # fmt: skip
        return dx, None, None, None, None


def fused_stats(x, a, b, lam, offset: int = 0):
    """(rows, cols, diag) of S̃ = X Ỹᵀ for X (m x C, float32) against the mixed classes
    (a, b, lam) (k of them), as ``dense_stats(x, mixing_matrix(a, b, lam, C), offset)``; only
    X receives a gradient."""
    m, k = x.shape[0], a.shape[0]
    if x.dtype != torch.float32 or lam.dtype != torch.float32:
        raise ValueError(f"fused_stats takes float32 x and lam, got {x.dtype} and {lam.dtype}")
    if not 0 <= offset <= k - m:
        raise ValueError(f"offset {offset} leaves no full diagonal in an {m} x {k} S̃")
    why = unavailable(x.device)
    if why:
        raise RuntimeError(why)
    return _FusedLSE.apply(x, a, b, lam, offset)
