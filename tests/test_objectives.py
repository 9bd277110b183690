"""Objectives by name: each composes mixing and a loss, and the IC variants use icm_loss."""

import pytest
import torch
import torch.nn.functional as F

from dist_icm.loss import icm_loss
from dist_icm.mixing import MixContext, Mixed, mixup, remix_lam
from dist_icm.objectives import OBJECTIVES, Objective, ObjectiveConfig, soft_ce


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 5
    return model, x, y


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_gives_a_finite_differentiable_loss(name):
    model, x, y = _setup()
    objective = Objective(ObjectiveConfig(name=name), class_counts=torch.tensor([5, 1, 9, 2, 3]))
    loss, _ = objective(model, x, y, MixContext(seed=0, step=0))
    loss.backward()
    assert torch.isfinite(loss) and model[1].weight.grad.abs().sum() > 0


def test_ce_is_cross_entropy():
    model, x, y = _setup()
    loss, _ = Objective(ObjectiveConfig(name="ce"))(model, x, y, MixContext(0, 0))
    assert torch.equal(loss, F.cross_entropy(model(x), y))


def test_icm_objective_is_icm_loss_of_the_mixed_batch():
    model, x, y = _setup()
    cfg = ObjectiveConfig(name="icm_mixup", alpha=0.4, axis="pair", dedup=True)
    objective = Objective(cfg)
    loss, stats = objective(model, x, y, MixContext(3, 1))
    mixed = objective.mix(x, y, MixContext(3, 1))
    ref = icm_loss(model(mixed.x), mixed.a, mixed.b, mixed.lam, axis="pair", dedup=True)
    assert torch.equal(loss, ref) and float(stats["lam"]) == pytest.approx(float(mixed.lam[0]))


def test_soft_ce_interpolates_the_two_cross_entropies():
    logits, a, b = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5])
    expected = (
        lam * F.cross_entropy(logits, a, reduction="none")
        + (1 - lam) * F.cross_entropy(logits, b, reduction="none")
    ).mean()
    assert torch.allclose(soft_ce(logits, Mixed(logits, a, b, lam)), expected)


def test_regmixup_adds_clean_ce_and_uses_alpha_20():
    model, x, y = _setup()
    cfg = ObjectiveConfig(name="regmixup")
    assert cfg.mix_alpha == 20.0
    objective = Objective(cfg)
    ctx = MixContext(0, 0)
    loss, _ = objective(model, x, y, ctx)
    mixed = objective.mix(x, y, ctx)
    expected = F.cross_entropy(model(x), y) + soft_ce(model(mixed.x), mixed)
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_remix_uses_the_decoupled_label_weight():
    model, x, y = _setup()
    counts = torch.tensor([1000, 1, 1, 1, 1])
    objective = Objective(ObjectiveConfig(name="icm_remix", alpha=0.2), class_counts=counts)
    mixed = objective.mix(x, y, MixContext(0, 0))
    plain = mixup(x, y, alpha=0.2, ctx=MixContext(0, 0))
    assert torch.equal(mixed.x, plain.x)  # inputs mixed with λ ...
    assert torch.equal(mixed.lam, remix_lam(plain.lam, plain.a, plain.b, counts))  # labels not
    assert not torch.equal(mixed.lam, plain.lam)


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="unknown loss 'mixupp'"):
        ObjectiveConfig(name="mixupp")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ObjectiveConfig(alpha=-1.0)
    with pytest.raises(ValueError, match="class counts"):
        Objective(ObjectiveConfig(name="remix"))
