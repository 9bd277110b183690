"""Metric sums against torchmetrics / F.cross_entropy, additivity, and evaluate_sums."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
)

from dist_icm.metrics import ECE_BINS, batch_sums, evaluate_sums, finalize


def _random(seed: int, n: int, c: int, scale: float, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, c, (n,), generator=g)
    # bias towards the right class so accuracy and confidence span their ranges
    logits[torch.arange(n), targets] += scale * torch.rand(n, generator=g, dtype=torch.float64).to(
        dtype
    )
    return logits, targets


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    c = logits.shape[1]
    return {
        "top1": 100 * multiclass_accuracy(logits, targets, c, top_k=1, average="micro").item(),
        "top5": 100
        * multiclass_accuracy(logits, targets, c, top_k=min(5, c), average="micro").item(),
        "nll": F.cross_entropy(logits, targets).item(),
        "ece": multiclass_calibration_error(logits, targets, c, n_bins=15, norm="l1").item(),
    }


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("c", [10, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchmetrics(seed: int, c: int, dtype: torch.dtype) -> None:
    logits, targets = _random(seed, 2000, c, scale=2.0 + seed, dtype=dtype)
    got = finalize(batch_sums(logits, targets))
    want = _reference(logits, targets)
    assert got["count"] == 2000
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6, rel=1e-6), key
    assert 0 < got["top1"] < got["top5"] < 100
    assert 0 < got["ece"] < 1


def test_few_classes_topk_is_min_5_c() -> None:
    logits, targets = _random(7, 500, 3, scale=1.0)
    got = finalize(batch_sums(logits, targets))
    assert got["top5"] == 100.0
    want = _reference(logits, targets)
    assert got["top1"] == pytest.approx(want["top1"], rel=1e-6)
    assert got["ece"] == pytest.approx(want["ece"], abs=1e-6)


def test_layout_and_dtype() -> None:
    logits, targets = _random(0, 64, 10, scale=3.0)
    s = batch_sums(logits, targets)
    assert s.dtype == torch.float64 and s.shape == (4 + 3 * ECE_BINS,)
    per_bin = s[4:].view(ECE_BINS, 3)
    assert per_bin[:, 0].sum() == s[0] == 64
    assert per_bin[:, 2].sum() == s[1]  # per-bin correct adds up to top-1 correct
    assert per_bin[:, 1].sum().item() == pytest.approx(torch.softmax(logits, 1).max(1)[0].sum())


def test_additive_over_halves_and_bf16_upcast() -> None:
    logits, targets = _random(5, 1001, 100, scale=4.0)
    whole = batch_sums(logits, targets)
    halves = batch_sums(logits[:400], targets[:400]) + batch_sums(logits[400:], targets[400:])
    torch.testing.assert_close(halves, whole, rtol=1e-12, atol=1e-9)
    empty = batch_sums(logits[:0], targets[:0])
    assert torch.count_nonzero(empty) == 0
    bf16 = batch_sums(logits.bfloat16(), targets)  # softmax runs in float32, not bf16
    torch.testing.assert_close(bf16, batch_sums(logits.bfloat16().float(), targets))


def test_ece_by_hand_with_saturated_confidence() -> None:
    # confidences: 1.0 (exact, saturated; goes to the last bin), 0.5 (bin 7: [7/15, 8/15)),
    # 1/3 for the uniform row (bin 5: [5/15, 6/15))
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 0.0, -1e4], [1.0, 1.0, 1.0]])
    targets = torch.tensor([1, 0, 0])
    s = batch_sums(logits, targets)
    per_bin = s[4:].view(ECE_BINS, 3)
    assert per_bin[ECE_BINS - 1].tolist() == [1.0, 1.0, 0.0]
    assert per_bin[7].tolist() == [1.0, 0.5, 1.0]
    assert per_bin[5, 0] == 1 and per_bin[5, 2] == 1
    m = finalize(s)
    assert m["ece"] == pytest.approx((1.0 + 0.5 + 2 / 3) / 3, abs=1e-7)
    assert m["top1"] == pytest.approx(200 / 3)
    assert math.isfinite(m["nll"]) and m["nll"] > 60


def test_validation() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        batch_sums(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="zero samples"):
        finalize(torch.zeros(4 + 3 * ECE_BINS, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        finalize(torch.ones(10, dtype=torch.float64))


def test_evaluate_sums_matches_concatenated_outputs() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 10)
    )
    x = torch.randn(203, 8)
    y = torch.randint(0, 10, (203,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    model.train()
    sums = evaluate_sums(model, loader, "cpu")
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        want = batch_sums(model(x), y)
    assert sums.device.type == "cpu" and sums.dtype == torch.float64
    torch.testing.assert_close(sums, want, rtol=1e-9, atol=1e-6)
    model.eval()
    evaluate_sums(model, loader, "cpu")
    assert not model.training
    assert finalize(sums)["count"] == 203


def test_a_sample_right_at_top_1_is_right_at_top_5_among_tied_logits() -> None:
    # constant logits: max takes class 0, topk(5) took five others, so top-1 100 and top-5 0
    out = finalize(batch_sums(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)))
    assert out["top1"] == 100.0 and out["top5"] == 100.0
