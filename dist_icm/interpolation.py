"""Section 4.3 of the paper: what a trained network does between two classes, the math.

One normalised image per class (class c at row c); every **ordered** pair of classes (a, b),
a != b, as the paper does (C(C-1) pairs: 9900 for CIFAR-100) is mixed at λ = 0, 0.1, ..., 1::

    x̃ = λ·x_a + (1 - λ)·x_b        (the paper's Eq. 1: λ weighs the first class)

Each mixed image goes through the network in eval mode, and with r̃ the representation the
classifier W receives (the input of the model's last ``nn.Linear``):

* **confidence** = ‖r̃‖², the class-independent squared norm (the paper's Figure 4, left);
* **dot difference** = r̃·w_a - r̃·w_b, the dot product with the first class's classifier minus
  the one with the other's (Figure 4, right); the classifier's bias is no part of it.

Per λ: the mean and the (population) standard deviation over the pairs. Ordered pairs make the
dot difference's mean antisymmetric about λ = 0.5 (the pair (b, a) at 1 - λ is the same image
with the sign flipped) and the confidence's symmetric. The command line around this (checkpoints,
test sets, CSV, plots) is ``dist_icm.analyze``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

STEPS = 10  # λ = k / STEPS, k = 0..STEPS: the paper's step of 0.1


class AnalysisError(ValueError):
    """Input the analysis cannot use; the message is the one line the user sees."""


@dataclass
class PairScores:
    """Per λ and ordered pair: the squared feature norm and the dot-product difference."""

    lambdas: np.ndarray  # (L,) float64: k / steps
    pairs: np.ndarray  # (P, 2) int64: (a, b), the class weighted by λ first
    confidence: np.ndarray  # (L, P) float64: ‖r̃‖²
    dot_diff: np.ndarray  # (L, P) float64: r̃·w_a - r̃·w_b

    def summary(self) -> list[dict]:
        """One dict per λ: the mean and population std over the pairs of both measures."""
        return [
            {
                "lambda": float(lam),
                "pairs": int(self.pairs.shape[0]),
                "confidence_mean": float(self.confidence[i].mean()),
                "confidence_std": float(self.confidence[i].std()),
                "dot_diff_mean": float(self.dot_diff[i].mean()),
                "dot_diff_std": float(self.dot_diff[i].std()),
            }
            for i, lam in enumerate(self.lambdas)
        ]


def ordered_pairs(num_classes: int) -> np.ndarray:
    """Every (a, b) with a != b, a-major: (0, 1), (0, 2), ..., (C-1, C-2)."""
    a, b = np.meshgrid(np.arange(num_classes), np.arange(num_classes), indexing="ij")
    keep = a != b
    return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)


def last_linear(model: nn.Module) -> nn.Linear:
    """The layer whose weight rows are the class classifiers w_c (the model's last Linear)."""
    from dist_icm.models import classifier

    return classifier(model)


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    images: torch.Tensor,
    *,
    steps: int = STEPS,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> PairScores:
    """Mix ``images[a]`` and ``images[b]`` (one image per class, class c at row c, as the model
    takes them: normalised) for every ordered pair at λ = k / steps, and score them.

    The mixed image of (a, b, k) is ``(k/steps)·x_a + ((steps-k)/steps)·x_b``, so the pair
    (b, a) at step steps - k is the same image, bit for bit. The model runs in eval mode (it is
    left in eval mode), in float32, in batches of ``batch_size`` images; ``progress(n)`` is
    called after each batch with the number of images it held.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    num_classes = images.shape[0]
    fc = last_linear(model)
    if fc.out_features != num_classes:
        raise AnalysisError(
            f"the model's classifier has {fc.out_features} classes, the images {num_classes}"
        )
    device = torch.device(device)
    model = model.to(device).float().eval()
    x = images.to(device, torch.float32)
    w = fc.weight.detach().to(device, torch.float64)  # (C, D): row c is w_c
    pairs = ordered_pairs(num_classes)
    n_pairs, n_lam = len(pairs), steps + 1
    # every (λ index, pair) triple, λ-major
    k_all = np.repeat(np.arange(n_lam), n_pairs)
    p_all = np.tile(np.arange(n_pairs), n_lam)
    confidence = np.empty(n_lam * n_pairs, dtype=np.float64)
    dot_diff = np.empty(n_lam * n_pairs, dtype=np.float64)
    captured: list[torch.Tensor] = []
    hook = fc.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with _full_float32():
            for start in range(0, len(k_all), batch_size):
                sl = slice(start, start + batch_size)
                k = torch.as_tensor(k_all[sl], device=device)
                a = torch.as_tensor(pairs[p_all[sl], 0], device=device)
                b = torch.as_tensor(pairs[p_all[sl], 1], device=device)
                shape = (-1,) + (1,) * (x.dim() - 1)
                lam = (k.to(torch.float32) / steps).view(shape)
                rest = ((steps - k).to(torch.float32) / steps).view(shape)
                mixed = lam * x[a] + rest * x[b]
                captured.clear()
                model(mixed)
                if len(captured) != 1:
                    raise AnalysisError(
                        f"{type(model).__name__} called its last Linear {len(captured)} times in "
                        "one forward pass: cannot tell its representation r"
                    )
                r = captured[0].flatten(1).to(torch.float64)
                confidence[sl] = (r * r).sum(1).cpu().numpy()
                dot_diff[sl] = ((r * w[a]).sum(1) - (r * w[b]).sum(1)).cpu().numpy()
                if progress is not None:
                    progress(len(k))
    finally:
        hook.remove()
    return PairScores(
        lambdas=np.arange(n_lam, dtype=np.float64) / steps,
        pairs=pairs,
        confidence=confidence.reshape(n_lam, n_pairs),
        dot_diff=dot_diff.reshape(n_lam, n_pairs),
    )


@contextlib.contextmanager
def _full_float32():
    """No TF32 in CUDA convolutions and matrix products while scoring (each is on by default
    for convolutions), so a GPU gives the CPU's numbers to float32 rounding."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def first_of_each_class(targets: Sequence[int], num_classes: int) -> list[int]:
    """The index of the first sample of each class (class order); AnalysisError if one has none."""
    first: dict[int, int] = {}
    for i, t in enumerate(np.asarray(targets).tolist()):
        first.setdefault(int(t), i)
        if len(first) == num_classes:
            break
    missing = [c for c in range(num_classes) if c not in first]
    if missing:
        raise AnalysisError(f"the test set has no image of class(es) {missing[:10]}")
    return [first[c] for c in range(num_classes)]
