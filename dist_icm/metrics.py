"""Evaluation metrics kept as exact, additive sums, so ranks can all-reduce them.

Each rank evaluates its own disjoint shard of the test set into one float64 vector of sums
(:func:`evaluate_sums`); the trainer all-reduces those vectors (SUM) and :func:`finalize` turns
the total into top-1 / top-5 accuracy, mean NLL and the expected calibration error (ECE). Because
only sums cross the wire, the result equals a single-process evaluation of the whole test set.

Layout of the sums vector (length ``4 + 3 * n_bins``)::

    [count, correct1, correct5, nll_sum, (count_b, conf_sum_b, correct_b) for b in bins]

ECE uses ``n_bins`` equal-width bins over the max-softmax confidence, assigned like torchmetrics
(``bucketize(conf, linspace(0, 1, n_bins + 1), right=True) - 1``, i.e. bin b holds
``b/n <= conf < (b+1)/n``), except that a confidence of exactly 1.0 goes into the last bin, where
torchmetrics gives it an extra (n_bins + 1)-th bin of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

ECE_BINS = 15
_HEAD = 4  # count, correct1, correct5, nll_sum


def _n_sums(n_bins: int) -> int:
    """Length of the sums vector for ``n_bins`` ECE bins."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return _HEAD + 3 * n_bins


@torch.no_grad()
def batch_sums(logits: Tensor, targets: Tensor, n_bins: int = ECE_BINS) -> Tensor:
    """The additive metric sums of one batch: a 1-D float64 vector on ``logits.device``.

    Softmax runs in float32 (float64 when the logits are float64); top-5 means top-min(5, C).
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    out = torch.zeros(_n_sums(n_bins), dtype=torch.float64, device=logits.device)
    n, c = logits.shape
    if n == 0:
        return out
    x = logits.detach().to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    targets = targets.to(device=x.device, dtype=torch.long)

    probs = torch.softmax(x, dim=1)
    conf, pred = probs.max(dim=1)
    correct1 = pred.eq(targets)
    topk = x.topk(min(5, c), dim=1).indices
    # or correct1: among exactly tied logits topk may pick other classes than max does
    correct5 = topk.eq(targets[:, None]).any(dim=1) | correct1
    nll = -torch.log_softmax(x, dim=1).gather(1, targets[:, None]).squeeze(1)

    out[0] = n
    out[1] = correct1.sum()
    out[2] = correct5.sum()
    out[3] = nll.to(torch.float64).sum()

    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    bins = (torch.bucketize(conf, edges, right=True) - 1).clamp_(0, n_bins - 1)
    per_bin = out[_HEAD:].view(n_bins, 3)  # a view: writes land in ``out``
    per_bin[:, 0].index_add_(0, bins, torch.ones_like(conf, dtype=torch.float64))
    per_bin[:, 1].index_add_(0, bins, conf.to(torch.float64))
    per_bin[:, 2].index_add_(0, bins, correct1.to(torch.float64))
    return out


def finalize(sums: Tensor, n_bins: int = ECE_BINS) -> dict[str, float]:
    """Metrics from (all-reduced) sums: top1/top5 in percent, mean nll, ece in [0, 1], count."""
    s = sums.detach().to(device="cpu", dtype=torch.float64)
    if s.shape != (_n_sums(n_bins),):
        raise ValueError(f"sums must have shape ({_n_sums(n_bins)},), got {tuple(s.shape)}")
    count = float(s[0])
    if count <= 0:
        raise ValueError("cannot finalize metrics over zero samples")
    per_bin = s[_HEAD:].view(n_bins, 3)
    gap = (
        per_bin[:, 2] - per_bin[:, 1]
    ).abs()  # |correct_b - conf_sum_b| = count_b |acc_b - conf_b|
    return {
        "top1": 100.0 * float(s[1]) / count,
        "top5": 100.0 * float(s[2]) / count,
        "nll": float(s[3]) / count,
        "ece": float(gap.sum()) / count,
        "count": count,
    }


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    n_bins: int = ECE_BINS,
) -> Tensor:
    """Sum of :func:`batch_sums` over ``loader`` (batches ``(inputs, targets, ...)``), on the CPU.

    The model runs in eval mode; its previous train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros(_n_sums(n_bins), dtype=torch.float64, device=device)
        for batch in loader:
            inputs, targets = batch[0], batch[1]
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            total += batch_sums(model(inputs), targets, n_bins)
        return total.cpu()
    finally:
        model.train(was_training)
