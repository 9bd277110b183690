"""Mixing methods: Mixup, CutMix and Remix's label rule, with explicit, rank-free randomness.

Every method returns a :class:`Mixed` batch: the mixed inputs and the triples (a, b, lam) that
define each mixed target ỹ = lam·e_a + (1 - lam)·e_b (what both the soft-label losses and the
Infinite Class Mixup loss consume).

Randomness never comes from a global RNG. Partners are drawn inside *mixing groups* of a fixed
size; the permutation (and, per sample, λ) of a group comes from the ``mix_group`` stream keyed
by (seed, step, global group index), and the per-batch λ (and CutMix box) from the ``mix_batch``
stream keyed by (seed, step) (:mod:`dist_icm.streams`). A rank passes the global index of its
first group, so with a fixed group size the mixed global batch is the same on 1 or on P
processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_icm import streams
from dist_icm.fused import blend_applies, fused_blend


@dataclass(frozen=True)
class MixContext:
    """Where this batch sits: seed, optimiser step, group size and this rank's first group."""

    seed: int
    step: int
    group_size: int | None = None  # None: the whole local batch is one group
    first_group: int = 0  # global index of this rank's first group

    def groups(self, n: int) -> tuple[int, int]:
        """(group size, number of groups) for a local batch of n, validated."""
        size = n if self.group_size is None else self.group_size
        if size < 1 or n % size:
            raise ValueError(f"mixing group size {size} must divide the per-device batch {n}")
        return size, n // size

    def batch_rng(self) -> np.random.Generator:
        """The generator every rank shares for this step (per-batch λ, CutMix box)."""
        return streams.rng("mix_batch", self.seed, self.step)

    def group_rng(self, k: int) -> np.random.Generator:
        """The generator of local group k (global index first_group + k)."""
        return streams.rng("mix_group", self.seed, self.step, self.first_group + k)


@dataclass
class Mixed:
    """A mixed batch: inputs and the triples of its targets."""

    x: torch.Tensor
    a: torch.Tensor  # (n,) int64: class of the sample itself
    b: torch.Tensor  # (n,) int64: class of its partner
    lam: torch.Tensor  # (n,) float32: weight of class a in the target


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"the Beta(α, α) parameter α must be > 0, got {alpha}")


def partners(n: int, ctx: MixContext) -> np.ndarray:
    """Partner index of each of the n samples: a random permutation inside each group."""
    size, count = ctx.groups(n)
    return np.concatenate([ctx.group_rng(k).permutation(size) + k * size for k in range(count)])


def draw_lam(alpha: float, n: int, ctx: MixContext, per_sample: bool = False) -> np.ndarray:
    """λ ~ Beta(α, α): one per batch (the paper's setting), or one per sample."""
    _check_alpha(alpha)
    if not per_sample:
        return np.full(n, ctx.batch_rng().beta(alpha, alpha))
    size, count = ctx.groups(n)
    # a group's λs come after its permutation in the same stream, so they are rank-free too
    draws = []
    for k in range(count):
        rng = ctx.group_rng(k)
        rng.permutation(size)
        draws.append(rng.beta(alpha, alpha, size))
    return np.concatenate(draws)


def _as_tensors(x, y, perm: np.ndarray, lam: np.ndarray):
    """(perm, lam, a, b) on x's device. perm (int64) and lam (float32) travel in one copy of one
    host buffer, pinned and asynchronous on CUDA: a copy from pageable memory would wait for
    every queued kernel, and each copy costs the host a launch."""
    n, cuda = perm.shape[0], x.device.type == "cuda"
    host = torch.empty(12 * n, dtype=torch.uint8, pin_memory=cuda)
    host[: 8 * n].view(torch.int64).copy_(torch.as_tensor(perm, dtype=torch.int64))
    host[8 * n :].view(torch.float32).copy_(torch.as_tensor(lam, dtype=torch.float32))
    both = host.to(x.device, non_blocking=cuda)
    perm_t, lam_t = both[: 8 * n].view(torch.int64), both[8 * n :].view(torch.float32)
    return perm_t, lam_t, y, y[perm_t]


def mixup(
    x, y, *, alpha: float, ctx: MixContext, per_sample: bool = False, fused: bool = False
) -> Mixed:
    """Mixup: x̃ = λ x + (1 - λ) x[partner]. ``fused``: the blend in one Triton kernel
    (``dist_icm.fused.fused_blend``, the same bits) where it applies, else torch's 5 kernels."""
    if y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise ValueError("labels must be an int64 tensor with one entry per input")
    n = x.shape[0]
    perm, lam, a, b = _as_tensors(x, y, partners(n, ctx), draw_lam(alpha, n, ctx, per_sample))
    if fused and blend_applies(x):
        return Mixed(fused_blend(x, perm, lam), a, b, lam)
    w = lam.to(x.dtype)
    lam = w.to(lam.dtype)  # the weight the images got: rounded where they are bf16 (DeepSpeed)
    w = w.view(-1, *([1] * (x.ndim - 1)))
    return Mixed(w * x + (1 - w) * x[perm], a, b, lam)


def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator):
    """A box of area about (1 - λ)·H·W at a uniform centre, clipped: (y0, y1, x0, x1). As
    timm's ``rand_bbox``; CutMix's own code spans ±cut // 2, a pixel less where the cut is odd
    (λ is corrected to the area pasted either way)."""
    ratio = np.sqrt(1.0 - lam)
    h, w = int(height * ratio), int(width * ratio)
    cy, cx = rng.integers(height), rng.integers(width)
    y0, y1 = np.clip([cy - h // 2, cy + h // 2 + h % 2], 0, height)
    x0, x1 = np.clip([cx - w // 2, cx + w // 2 + w % 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def cutmix(x, y, *, alpha: float, ctx: MixContext) -> Mixed:
    """CutMix: paste a box from the partner; lam is recomputed from the clipped box's area."""
    if x.ndim != 4:
        raise ValueError(f"CutMix needs image batches (n, C, H, W), got shape {tuple(x.shape)}")
    _check_alpha(alpha)
    n, _, height, width = x.shape
    rng = ctx.batch_rng()
    lam0 = rng.beta(alpha, alpha)
    y0, y1, x0, x1 = cutmix_box(lam0, height, width, rng)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    perm, lam_t, a, b = _as_tensors(x, y, partners(n, ctx), np.full(n, lam))
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return Mixed(out, a, b, lam_t)


def remix_lam(
    lam: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    class_counts: torch.Tensor,
    *,
    tau: float = 0.5,
    kappa: float = 3.0,
) -> torch.Tensor:
    """Remix's label weight (Chou et al. 2020), decoupled from the input weight λ.

    0 when class a outnumbers b by κ or more and λ < τ (the label goes to the minority b);
    1 when b outnumbers a by κ or more and 1 - λ < τ; λ otherwise.
    """
    if not kappa >= 1 or not 0 <= tau <= 1:
        raise ValueError(f"Remix needs κ >= 1 and 0 <= τ <= 1, got κ={kappa}, τ={tau}")
    counts = class_counts.to(device=lam.device, dtype=torch.float64)
    ratio = counts[a] / counts[b]
    out = torch.where((ratio >= kappa) & (lam < tau), torch.zeros_like(lam), lam)
    return torch.where((ratio <= 1 / kappa) & (1 - lam < tau), torch.ones_like(lam), out)
