"""The Triton kernels behind ``dist_icm.fused``, which imports this module only when they run, so
that Triton's import stays out of every other run's start-up. (Importing it early also made a
rank stopping on a start-up error abort, SIGABRT, instead of exiting 2: a race in the
interpreter's teardown that ``dist_icm.train.leave`` now avoids for every process.)

* ``_forward``: programs 0 ... row_programs - 1 take BLOCK_ROWS rows each (logsumexp along the
  row, and the row's own score), the rest BLOCK_COLS columns each (logsumexp down the column).
* ``_backward``: a program per BLOCK_ROWS rows and BLOCK_CLASSES classes of dX.
* ``_blend``: Mixup's blend, a program per image and BLOCK_BLEND of its elements.
"""

import triton
import triton.language as tl

# Fixed, not autotuned: a pick by timing could differ from run to run, and the sums' order with it
BLOCK_ROWS = 32  # rows of a tile (tl.dot needs every edge >= 16)
BLOCK_COLS = 64  # mixed classes of a tile
BLOCK_CLASSES = 64  # classes of the backward's output block
BLOCK_BLEND = 1024  # elements of one image per program of the blend


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


@triton.jit
def _blend(x_ptr, perm_ptr, lam_ptr, out_ptr, D, BLOCK: tl.constexpr):
    """Image i of ``out`` (D elements, dense) is lam_i x_i + (1 - lam_i) x_perm_i. Launched
    without floating-point fusion, so the products and the sum each round, as torch's separate
    kernels for ``w * x + (1 - w) * x[perm]`` do: the same bits."""
    i = tl.program_id(0)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = d < D
    partner = tl.load(perm_ptr + i)
    w = tl.load(lam_ptr + i)
    x = tl.load(x_ptr + i.to(tl.int64) * D + d, mask=ok)
    xp = tl.load(x_ptr + partner.to(tl.int64) * D + d, mask=ok)
    tl.store(out_ptr + i.to(tl.int64) * D + d, w * x + (1.0 - w) * xp, mask=ok)
