"""Optimizers by name: SGD and AdamW from torch, LARS and LAMB from timm.

The peak lr is ``schedule.scaled_lr(cfg.lr, global_batch, cfg.reference_batch, cfg.lr_scaling)``;
the lr schedule then multiplies it (``schedule.lambda_for`` with ``LambdaLR``). With
``no_decay_norm_bias`` the 1-D parameters (norm weights, biases) get weight decay 0; for LARS and
LAMB that also exempts them from the layer-wise trust ratio (timm adapts only parameters with
weight decay), as is usual for large-batch training. For AdamW and LAMB, ``momentum`` is beta1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_icm.schedule import LR_SCALING_RULES, scaled_lr

OPTIMIZERS = ("sgd", "lars", "lamb", "adamw")
ADAM_BETA2 = 0.999

ParamsOrModel = nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@dataclass(frozen=True)
class OptimConfig:
    """Which optimizer and its hyper-parameters; validated on construction."""

    name: str = "sgd"
    lr: float = 0.1  # at reference_batch; scaled by lr_scaling to the global batch
    momentum: float = 0.9  # beta1 for adamw / lamb
    weight_decay: float = 5e-4
    nesterov: bool = False  # sgd and lars only
    no_decay_norm_bias: bool = False  # exclude 1-D params (norm weights, biases) from decay
    lr_scaling: str = "none"  # "none" | "linear" | "sqrt"
    reference_batch: int = 256
    grad_clip: float | None = None  # clip the global gradient norm to this (None: no clipping)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and self.name not in ("sgd", "lars"):
            raise ValueError(f"optim.nesterov applies to sgd and lars only, not {self.name!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov needs optim.momentum > 0, got 0")
        if self.lr_scaling not in LR_SCALING_RULES:
            raise ValueError(
                f"optim.lr_scaling must be one of {LR_SCALING_RULES}, got {self.lr_scaling!r}"
            )
        if self.reference_batch < 1:
            raise ValueError(f"optim.reference_batch must be >= 1, got {self.reference_batch}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 (or null), got {self.grad_clip}")


def param_groups(params_or_model: ParamsOrModel, no_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """Parameter groups; with ``no_decay_norm_bias`` each group is split by ndim (1-D: decay 0).

    A module contributes its parameters that require grad; given groups (dicts) keep their keys.
    """
    if isinstance(params_or_model, nn.Module):
        items: list[Any] = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        items = list(params_or_model)
    if not items:
        raise ValueError("build_optimizer got no parameters")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    if not no_decay_norm_bias:
        return groups
    out: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            out.append({**group, "params": decay})
        if no_decay:
            out.append({**group, "params": no_decay, "weight_decay": 0.0})
    return out


def _timm_optim() -> Any:
    """The ``timm.optim`` module, imported on first use (only LARS and LAMB need it)."""
    try:
        import timm.optim
    except ImportError as err:  # pragma: no cover - timm is a declared dependency
        raise ImportError("the lars and lamb optimizers need timm: pip install timm") from err
    return timm.optim


def build_optimizer(
    params_or_model: ParamsOrModel, cfg: OptimConfig, global_batch: int
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg``, at the peak lr scaled to ``global_batch``."""
    lr = scaled_lr(cfg.lr, global_batch, cfg.reference_batch, cfg.lr_scaling)
    groups = param_groups(params_or_model, cfg.no_decay_norm_bias)
    wd, momentum = cfg.weight_decay, cfg.momentum
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, weight_decay=wd, nesterov=cfg.nesterov
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, ADAM_BETA2), weight_decay=wd)
    if cfg.name == "lars":
        return _timm_optim().Lars(
            groups, lr=lr, momentum=momentum, weight_decay=wd, nesterov=cfg.nesterov
        )
    # "lamb": timm's NVLAMB, which also clips the global grad norm to 1 (its default)
    return _timm_optim().Lamb(groups, lr=lr, betas=(momentum, ADAM_BETA2), weight_decay=wd)
