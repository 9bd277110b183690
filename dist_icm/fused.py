r"""The ICM loss's statistics of S̃ in two Triton kernels, one forward and one backward, and
Mixup's blend in a third.

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
(``tests/test_fused.py``).

``fused_blend(x, perm, lam)`` is Mixup's blend ``w * x + (1 - w) * x[perm]`` (5 kernels in
torch: the gather, two products, 1 - w and the sum) in one launch, bit for bit: compiled without
floating-point contraction, each product and the sum round as torch's own kernels do.

Float32 only. On a CUDA device the kernels are compiled; on CPU tensors they run only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported; the tests do), which
runs the same code in NumPy, slowly. ``loss.fused`` turns them on (default off: they are
checked against the torch form, and on an H200 they were too little faster to be the default;
README, Performance).
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


def blend_applies(x: torch.Tensor) -> bool:
    """Whether :func:`fused_blend` takes ``x``: float32 images without a gradient, each one
    dense in memory (contiguous or channels-last), on a device where the kernels run."""
    dense = x.is_contiguous() or (
        x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
    )
    per_image = x[0].numel() if x.ndim and x.shape[0] else 0
    return (
        x.dtype == torch.float32
        and not x.requires_grad
        and dense
        and 0 < per_image < 2**31
        and unavailable(x.device) is None
    )


def fused_blend(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``lam_i * x_i + (1 - lam_i) * x_perm_i`` for every image i of ``x`` (n, ...), in ``x``'s
    memory format, bit for bit what ``w * x + (1 - w) * x[perm]`` gives with ``w`` = ``lam``
    viewed as (n, 1, ...). ``perm`` (n,) int64 and ``lam`` (n,) float32 on ``x``'s device."""
    if not blend_applies(x):
        raise ValueError(
            "fused_blend takes dense float32 images without a gradient where its kernel runs, "
            f"got {x.dtype} {tuple(x.shape)} on {x.device}"
        )
    n = x.shape[0]
    if perm.shape != (n,) or perm.dtype != torch.int64 or lam.shape != (n,):
        raise ValueError(f"perm (int64) and lam must have shape ({n},) like x's images")
    if lam.dtype != torch.float32:
        raise ValueError(f"lam must be float32, got {lam.dtype}")
    from dist_icm import fused_kernels as kern

    out = torch.empty_like(x)  # the same strides: each image is the same dense block
    per_image = x[0].numel()
    grid = (n, kern.triton.cdiv(per_image, kern.BLOCK_BLEND))
    kern._blend[grid](
        x, perm.contiguous(), lam.contiguous(), out, per_image,
        BLOCK=kern.BLOCK_BLEND, enable_fp_fusion=False,
    )  # fmt: skip
    return out


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
