"""Optimizers by name: each lowers a real loss; param groups, lr scaling and validation."""

from __future__ import annotations

import pytest
import timm.optim
import torch
from torch import nn

from dist_icm.optim import OPTIMIZERS, OptimConfig, build_optimizer, param_groups

EXPECTED_CLASS = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "lars": timm.optim.Lars,
    "lamb": timm.optim.Lamb,
}


def _regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.5
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))
    return model, x, y


def _train(opt: torch.optim.Optimizer, model: nn.Module, x, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses.append(nn.functional.mse_loss(model(x), y).item())
    return losses


# LARS scales each layer's step by trust_coeff (1e-3) * |w| / |g|, so it takes a larger lr
LR = {"sgd": 0.05, "adamw": 0.01, "lars": 1.0, "lamb": 0.05}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("no_decay", [False, True])
def test_each_optimizer_lowers_the_loss(name: str, no_decay: bool) -> None:
    model, x, y = _regression()
    cfg = OptimConfig(name=name, lr=LR[name], no_decay_norm_bias=no_decay)
    opt = build_optimizer(model, cfg, global_batch=256)
    assert type(opt) is EXPECTED_CLASS[name]
    losses = _train(opt, model, x, y, steps=40)
    assert losses[1] < losses[0]  # the first step already helps
    assert losses[-1] < 0.7 * losses[0]


def test_nesterov_sgd_and_lars() -> None:
    for name in ("sgd", "lars"):
        model, x, y = _regression(1)
        cfg = OptimConfig(name=name, lr=LR[name], nesterov=True)
        opt = build_optimizer(model.parameters(), cfg, global_batch=256)
        assert opt.param_groups[0]["nesterov"] is True
        losses = _train(opt, model, x, y, steps=20)
        assert losses[-1] < losses[0]


def test_no_decay_norm_bias_groups() -> None:
    model, _, _ = _regression()
    cfg = OptimConfig(weight_decay=1e-4, no_decay_norm_bias=True)
    opt = build_optimizer(model, cfg, global_batch=256)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2} and len(decay["params"]) == 2
    # two linear biases plus the LayerNorm weight and bias
    assert {p.ndim for p in no_decay["params"]} == {1} and len(no_decay["params"]) == 4
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))
    plain = build_optimizer(model, OptimConfig(weight_decay=1e-4), global_batch=256)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 1e-4


def test_lars_no_decay_params_skip_the_trust_ratio() -> None:
    """timm adapts only parameters with weight decay: excluded ones take a plain SGD step."""
    model, x, y = _regression()
    cfg = OptimConfig(name="lars", lr=1.0, no_decay_norm_bias=True)
    opt = build_optimizer(model, cfg, global_batch=256)
    nn.functional.mse_loss(model(x), y).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        w, g = before[name]
        plain = w - 1.0 * g  # first step: the momentum buffer is the gradient
        if p.ndim == 1:
            torch.testing.assert_close(p.detach(), plain)
        else:  # trust ratio 1e-3 * |w| / (|g| + wd |w|) shrinks the step
            step, raw = (p.detach() - w).norm(), g.norm()
            assert 0 < step < 0.1 * raw


def test_param_groups_keep_given_groups_and_skip_frozen() -> None:
    model, _, _ = _regression()
    model[0].requires_grad_(False)
    groups = param_groups(model, no_decay_norm_bias=True)
    assert sum(len(g["params"]) for g in groups) == 4  # frozen first layer left out
    given = [{"params": list(model[3].parameters()), "lr": 0.01}]
    split = param_groups(given, no_decay_norm_bias=True)
    assert [g["lr"] for g in split] == [0.01, 0.01]
    assert "weight_decay" not in split[0] and split[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="no parameters"):
        param_groups([], no_decay_norm_bias=False)


@pytest.mark.parametrize(
    ("rule", "batch", "want"),
    [("linear", 1024, 0.4), ("sqrt", 1024, 0.2), ("none", 1024, 0.1), ("linear", 128, 0.05)],
)
def test_lr_scaling(rule: str, batch: int, want: float) -> None:
    model, _, _ = _regression()
    for name in OPTIMIZERS:
        cfg = OptimConfig(name=name, lr=0.1, lr_scaling=rule)
        opt = build_optimizer(model, cfg, global_batch=batch)
        assert opt.param_groups[0]["lr"] == pytest.approx(want)
    cfg = OptimConfig(lr=0.1, lr_scaling="linear", reference_batch=512)
    assert build_optimizer(model, cfg, 1024).param_groups[0]["lr"] == pytest.approx(0.2)


def test_adam_family_uses_momentum_as_beta1() -> None:
    model, _, _ = _regression()
    for name in ("adamw", "lamb"):
        opt = build_optimizer(model, OptimConfig(name=name, momentum=0.8), 256)
        assert opt.param_groups[0]["betas"] == (0.8, 0.999)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "adam"}, "optim.name must be one of"),
        ({"lr": 0}, "optim.lr must be > 0, got 0"),
        ({"lr": -0.1}, "optim.lr must be > 0, got -0.1"),
        ({"momentum": 1.0}, r"optim.momentum must be in \[0, 1\), got 1.0"),
        ({"momentum": -0.1}, r"optim.momentum must be in \[0, 1\)"),
        ({"weight_decay": -1e-4}, "optim.weight_decay must be >= 0"),
        ({"name": "adamw", "nesterov": True}, "optim.nesterov applies to sgd and lars only"),
        ({"momentum": 0.0, "nesterov": True}, "optim.nesterov needs optim.momentum > 0"),
        ({"lr_scaling": "log"}, "optim.lr_scaling must be one of"),
        ({"reference_batch": 0}, "optim.reference_batch must be >= 1"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        OptimConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_configured_weight_decay_reaches_the_optimizer(name: str) -> None:
    # without it an optimizer built with weight_decay=0.0 would silently never decay
    model, _, _ = _regression()
    for no_decay in (False, True):
        cfg = OptimConfig(name=name, weight_decay=3e-4, no_decay_norm_bias=no_decay)
        opt = build_optimizer(model, cfg, global_batch=256)
        assert opt.param_groups[0]["weight_decay"] == 3e-4
        assert opt.defaults["weight_decay"] == 3e-4


def test_lamb_and_lars_keep_timm_clipping_defaults() -> None:
    # without it LAMB could lose its global grad-norm clip at 1, or LARS clip its trust ratio
    model, _, _ = _regression()
    lamb = build_optimizer(model, OptimConfig(name="lamb"), global_batch=256)
    assert lamb.defaults["max_grad_norm"] == 1.0
    assert lamb.defaults["trust_clip"] is False
    lars = build_optimizer(model, OptimConfig(name="lars"), global_batch=256)
    assert lars.defaults["trust_clip"] is False


def test_zero_grad_clip_rejected_zero_weight_decay_accepted() -> None:
    # without it grad_clip=0 (which zeroes every gradient) or weight_decay=0 would flip validity
    with pytest.raises(ValueError, match="optim.grad_clip must be > 0"):
        OptimConfig(grad_clip=0.0)
    assert OptimConfig(grad_clip=1e-3).grad_clip == 1e-3
    assert OptimConfig(weight_decay=0.0).weight_decay == 0.0
