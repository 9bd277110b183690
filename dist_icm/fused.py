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

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU-only wheels come without Triton
    triton = None

# Fixed, not autotuned: a pick by timing could differ from run to run, and the sums' order with it
BLOCK_ROWS = 32  # rows of a tile (tl.dot needs every edge >= 16)
BLOCK_COLS = 64  # mixed classes of a tile
BLOCK_CLASSES = 64  # classes of the backward's output block


def unavailable(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on ``device`` (None: they can), in one line."""
    if triton is None:
        return "loss.fused needs Triton (pip install triton; torch's CUDA wheels bring it)"
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"loss.fused runs on CUDA (or on the CPU in Triton's interpreter, TRITON_INTERPRET=1, "
            f"for tests), not on {device.type}"
        )
    return None


if triton is not None:

    @triton.jit
    def _tile(x_ptr, a_ptr, b_ptr, lam_ptr, ri, rj, m, k, C):
        """S̃ on rows ri x columns rj (-inf outside the k columns), and the column mask."""
        ok_i, ok_j = ri < m, rj < k
        a = tl.load(a_ptr + rj, mask=ok_j, other=0)
        b = tl.load(b_ptr + rj, mask=ok_j, other=0)
        lam = tl.load(lam_ptr + rj, mask=ok_j, other=0.0)
        row = ri[:, None].to(tl.int64) * C
        both = ok_i[:, None] & ok_j[None, :]
        xa = tl.load(x_ptr + row + a[None, :], mask=both, other=0.0)
        xb = tl.load(x_ptr + row + b[None, :], mask=both, other=0.0)
        s = lam[None, :] * xa + (1.0 - lam[None, :]) * xb
        return tl.where(ok_j[None, :], s, float("-inf")), ok_j

    @triton.jit
    def _row_stats(x_ptr, a_ptr, b_ptr, lam_ptr, rows_ptr, diag_ptr, ri, m, k, C, offset, BN):
        """Rows ri: the logsumexp along each row (a running maximum and sum), and its own score."""
        top = tl.full(ri.shape, float("-inf"), tl.float32)
        total = tl.zeros(ri.shape, tl.float32)
        for j0 in range(0, k, BN):
            s, _ = _tile(x_ptr, a_ptr, b_ptr, lam_ptr, ri, j0 + tl.arange(0, BN), m, k, C)
            new = tl.maximum(top, tl.max(s, 1))
            total = total * tl.exp(top - new) + tl.sum(tl.exp(s - new[:, None]), 1)
            top = new
        ok = ri < m
        tl.store(rows_ptr + ri, top + tl.log(total), mask=ok)
        own = offset + ri
        a = tl.load(a_ptr + own, mask=ok, other=0)
        b = tl.load(b_ptr + own, mask=ok, other=0)
        lam = tl.load(lam_ptr + own, mask=ok, other=0.0)
        xa = tl.load(x_ptr + ri.to(tl.int64) * C + a, mask=ok, other=0.0)
        xb = tl.load(x_ptr + ri.to(tl.int64) * C + b, mask=ok, other=0.0)
        tl.store(diag_ptr + ri, lam * xa + (1.0 - lam) * xb, mask=ok)

    @triton.jit
    def _col_stats(x_ptr, a_ptr, b_ptr, lam_ptr, cols_ptr, rj, m, k, C, BM):
        """Columns rj: the logsumexp down each column."""
        # columns beyond k repeat the last (not stored): an all -inf column would give nan
        safe = tl.minimum(rj, k - 1)
        top = tl.full(rj.shape, float("-inf"), tl.float32)
        total = tl.zeros(rj.shape, tl.float32)
        for i0 in range(0, m, BM):
            ri = i0 + tl.arange(0, BM)
            s, _ = _tile(x_ptr, a_ptr, b_ptr, lam_ptr, ri, safe, m, k, C)
            s = tl.where((ri < m)[:, None], s, float("-inf"))
            new = tl.maximum(top, tl.max(s, 0))
            total = total * tl.exp(top - new) + tl.sum(tl.exp(s - new[None, :]), 0)
            top = new
        tl.store(cols_ptr + rj, top + tl.log(total), mask=rj < k)

    @triton.jit
    def _forward(
        x_ptr, a_ptr, b_ptr, lam_ptr, rows_ptr, cols_ptr, diag_ptr,
        m, k, C, offset, row_programs,
        BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        """Programs 0 ... row_programs - 1 take BM rows each, the rest BN columns each."""
        pid = tl.program_id(0)
        if pid < row_programs:
            ri = pid * BM + tl.arange(0, BM)
            _row_stats(x_ptr, a_ptr, b_ptr, lam_ptr, rows_ptr, diag_ptr, ri, m, k, C, offset, BN)
        else:
            rj = (pid - row_programs) * BN + tl.arange(0, BN)
            _col_stats(x_ptr, a_ptr, b_ptr, lam_ptr, cols_ptr, rj, m, k, C, BM)

    @triton.jit
    def _mixing(a_ptr, b_ptr, lam_ptr, rj, ok_j, rc):
        """The (BN x BC) tile of Ỹ: lam_j at class a_j plus 1 - lam_j at b_j (0 beyond k)."""
        a = tl.load(a_ptr + rj, mask=ok_j, other=-1)
        b = tl.load(b_ptr + rj, mask=ok_j, other=-1)
        lam = tl.load(lam_ptr + rj, mask=ok_j, other=0.0)
        on_a = tl.where(a[:, None] == rc[None, :], lam[:, None], 0.0)
        return on_a + tl.where(b[:, None] == rc[None, :], 1.0 - lam[:, None], 0.0)

    @triton.jit
    def _backward(
        x_ptr, a_ptr, b_ptr, lam_ptr, rows_ptr, cols_ptr,
        g_rows_ptr, g_cols_ptr, g_diag_ptr, g_rows_step, g_cols_step, g_diag_step,
        dx_ptr, m, k, C, offset,
        BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    ):  # fmt: skip
        ri = tl.program_id(0) * BM + tl.arange(0, BM)
        rc = tl.program_id(1) * BC + tl.arange(0, BC)
        ok_i = ri < m
        rows = tl.load(rows_ptr + ri, mask=ok_i, other=0.0)
        g = tl.load(g_rows_ptr + ri * g_rows_step, mask=ok_i, other=0.0)
        acc = tl.zeros((BM, BC), tl.float32)
        for j0 in range(0, k, BN):
            rj = j0 + tl.arange(0, BN)
            s, ok_j = _tile(x_ptr, a_ptr, b_ptr, lam_ptr, ri, rj, m, k, C)
            cols = tl.load(cols_ptr + rj, mask=ok_j, other=0.0)
            h = tl.load(g_cols_ptr + rj * g_cols_step, mask=ok_j, other=0.0)
            ds = g[:, None] * tl.exp(s - rows[:, None]) + h[None, :] * tl.exp(s - cols[None, :])
            ds = tl.where(ok_i[:, None], ds, 0.0)
            y = _mixing(a_ptr, b_ptr, lam_ptr, rj, ok_j, rc)
            acc += tl.dot(ds, y, input_precision="ieee")
        gd = tl.load(g_diag_ptr + ri * g_diag_step, mask=ok_i, other=0.0)
        acc += gd[:, None] * _mixing(a_ptr, b_ptr, lam_ptr, offset + ri, ok_i, rc)
        out = ri[:, None].to(tl.int64) * C + rc[None, :]
        tl.store(dx_ptr + out, acc, mask=ok_i[:, None] & (rc < C)[None, :])


def _upstream(grad: torch.Tensor | None, size: int, like: torch.Tensor):
    """An upstream gradient and its element step (0 for a broadcast scalar, as autograd hands
    the gradient of a mean), or zeros where that output got none."""
    if grad is None:
        grad = like.new_zeros(()).expand(size)
    return grad, grad.stride(0)


class _FusedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, lam, offset):
        x, a, b, lam = (t.contiguous() for t in (x, a, b, lam))
        (m, num_classes), k = x.shape, a.shape[0]
        rows, cols, diag = x.new_empty(m), x.new_empty(k), x.new_empty(m)
        row_programs = triton.cdiv(m, BLOCK_ROWS)
        grid = (row_programs + triton.cdiv(k, BLOCK_COLS),)
        _forward[grid](
            x, a, b, lam, rows, cols, diag, m, k, num_classes, offset, row_programs,
            BM=BLOCK_ROWS, BN=BLOCK_COLS,
        )  # fmt: skip
        ctx.offset = offset
        ctx.save_for_backward(x, a, b, lam, rows, cols)
        return rows, cols, diag

    @staticmethod
    def backward(ctx, g_rows, g_cols, g_diag):
        x, a, b, lam, rows, cols = ctx.saved_tensors
        (m, num_classes), k = x.shape, a.shape[0]
        g_rows, row_step = _upstream(g_rows, m, x)
        g_cols, col_step = _upstream(g_cols, k, x)
        g_diag, diag_step = _upstream(g_diag, m, x)
        dx = torch.empty_like(x)
        grid = (triton.cdiv(m, BLOCK_ROWS), triton.cdiv(num_classes, BLOCK_CLASSES))
        _backward[grid](
            x, a, b, lam, rows, cols, g_rows, g_cols, g_diag, row_step, col_step, diag_step,
            dx, m, k, num_classes, ctx.offset,
            BM=BLOCK_ROWS, BN=BLOCK_COLS, BC=BLOCK_CLASSES,
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
