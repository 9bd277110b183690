"""Learning-rate schedules as pure functions of the optimizer step (no optimizer state).

:func:`lr_factor` gives the multiplier of the peak lr at a 0-based optimizer step, so a resumed
run (or any rank) recomputes it from the step count alone; :func:`lambda_for` wraps it for
``torch.optim.lr_scheduler.LambdaLR``. The default is the paper's schedule: step decay x0.2 at
epochs 50, 100 and 150 of 200. :func:`scaled_lr` is the large-batch scaling rule for the peak lr.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEDULES = ("step", "cosine", "constant")
LR_SCALING_RULES = ("none", "linear", "sqrt")


@dataclass(frozen=True)
class ScheduleConfig:
    """Shape of the lr schedule over ``epochs``; validated on construction."""

    name: str = "step"
    epochs: int = 200
    milestones: tuple[int, ...] = (50, 100, 150)  # epochs, for "step"
    gamma: float = 0.2  # the paper: x0.2 at 50/100/150 of 200 epochs
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start_factor to the peak
    warmup_start_factor: float = 0.0
    min_factor: float = 0.0  # cosine floor as a fraction of the peak

    def __post_init__(self) -> None:
        # accept any sequence (a Hydra ListConfig, a list) but store a hashable tuple of ints
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name must be one of {SCHEDULES}, got {self.name!r}")
        if self.epochs < 1:
            raise ValueError(f"schedule.epochs must be >= 1, got {self.epochs}")
        ms = self.milestones if self.name == "step" else ()  # ignored by the other schedules
        if any(b <= a for a, b in itertools.pairwise(ms)):
            raise ValueError(f"schedule.milestones must be strictly increasing, got {list(ms)}")
        if ms and not (0 < ms[0] and ms[-1] <= self.epochs):
            raise ValueError(
                f"schedule.milestones must lie in (0, epochs={self.epochs}], got {list(ms)}"
            )
        if not 0 < self.gamma <= 1:  # a decay: above 1, each milestone would raise the lr
            raise ValueError(
                f"schedule.gamma must lie in (0, 1] (the lr's factor at each milestone), "
                f"got {self.gamma}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs must be in [0, epochs={self.epochs}), "
                f"got {self.warmup_epochs}"
            )
        if not 0 <= self.warmup_start_factor <= 1:
            raise ValueError(
                f"schedule.warmup_start_factor must be in [0, 1], got {self.warmup_start_factor}"
            )
        if not 0 <= self.min_factor <= 1:
            raise ValueError(f"schedule.min_factor must be in [0, 1], got {self.min_factor}")


def unread_settings(cfg: ScheduleConfig) -> dict[str, str]:
    """The settings of ``cfg`` set away from their defaults that its schedule does not read,
    each with why: a start-up note, as a sweep over them would change nothing."""
    unread = {}
    if cfg.name != "step":
        unread |= dict.fromkeys(("milestones", "gamma"), f"schedule.name={cfg.name}")
    if cfg.name != "cosine":
        unread["min_factor"] = f"schedule.name={cfg.name}"
    if not cfg.warmup_epochs:
        unread["warmup_start_factor"] = "schedule.warmup_epochs=0"
    defaults = ScheduleConfig()
    return {
        f"{key}={list(value) if isinstance(value, tuple) else value}": f"{why} does not use it"
        for key, why in unread.items()
        if (value := getattr(cfg, key)) != getattr(defaults, key)
    }


def _warmup(epoch: float, cfg: ScheduleConfig) -> float:
    """Linear warm-up multiplier at a fractional epoch: start factor at 0, 1 from warmup_epochs."""
    if epoch >= cfg.warmup_epochs:
        return 1.0
    frac = epoch / cfg.warmup_epochs
    return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * frac


def lr_factor(step: int, steps_per_epoch: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    The epoch position is ``step / steps_per_epoch``. Step decay uses the integer epoch (like
    ``MultiStepLR`` stepped once per epoch); warm-up and cosine use the fractional one.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch = step / steps_per_epoch
    if cfg.name == "step":
        whole_epoch = step // steps_per_epoch
        factor = cfg.gamma ** sum(1 for m in cfg.milestones if m <= whole_epoch)
    elif cfg.name == "cosine":
        t = (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
        t = min(max(t, 0.0), 1.0)
        factor = cfg.min_factor + (1.0 - cfg.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # "constant"
        factor = 1.0
    return factor * _warmup(epoch, cfg)


def scaled_lr(
    base_lr: float, global_batch: int, reference_batch: int = 256, rule: str = "linear"
) -> float:
    """The peak lr for ``global_batch`` by the scaling rule (Goyal et al. 2017 for "linear").

    "linear": ``base_lr * global_batch / reference_batch``; "sqrt": times the square root of that
    ratio; "none": ``base_lr`` unchanged.
    """
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"lr scaling rule must be one of {LR_SCALING_RULES}, got {rule!r}")
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(
            f"batch sizes must be >= 1, got global_batch={global_batch}, "
            f"reference_batch={reference_batch}"
        )
    ratio = global_batch / reference_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


def lambda_for(optimizer_steps_per_epoch: int, cfg: ScheduleConfig) -> Callable[[int], float]:
    """``lr_lambda`` for ``LambdaLR``, stepped once per optimizer step (a picklable partial)."""
    if optimizer_steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {optimizer_steps_per_epoch}")
    return functools.partial(lr_factor, steps_per_epoch=optimizer_steps_per_epoch, cfg=cfg)


def _plot_steps(cfg: ScheduleConfig, steps_per_epoch: int, points: int = 4000) -> list[int]:
    """At most ~``points`` steps spread over training, plus both sides of each milestone."""
    total = cfg.epochs * steps_per_epoch
    stride = max(1, total // points)
    steps: set[int] = set(range(0, total, stride)) | {total - 1}
    edges: Sequence[int] = cfg.milestones if cfg.name == "step" else ()
    for m in edges:
        steps |= {max(0, m * steps_per_epoch - 1), min(total - 1, m * steps_per_epoch)}
    return sorted(steps)


def plot_schedule(cfg: ScheduleConfig, steps_per_epoch: int, path: str | Path) -> None:
    """Write a PNG of the lr factor against the (fractional) epoch, with the Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = _plot_steps(cfg, steps_per_epoch)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(
        [s / steps_per_epoch for s in steps], [lr_factor(s, steps_per_epoch, cfg) for s in steps]
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("lr / peak lr")
    warm = f", warm-up {cfg.warmup_epochs:g} ep" if cfg.warmup_epochs else ""
    ax.set_title(f"{cfg.name} schedule, {cfg.epochs} epochs{warm}")
    ax.set_xlim(0, cfg.epochs)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(path), format="png")
