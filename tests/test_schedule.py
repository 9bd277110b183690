"""The lr schedules: the paper's step decay, MultiStepLR equivalence, warm-up, cosine, scaling."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch

from dist_icm.schedule import (
    ScheduleConfig,
    _plot_steps,
    lambda_for,
    lr_factor,
    plot_schedule,
    scaled_lr,
)

SPE = 7  # optimizer steps per epoch


def test_paper_schedule_phases() -> None:
    cfg = ScheduleConfig()
    at = {e: lr_factor(e * SPE, SPE, cfg) for e in (0, 49, 50, 99, 100, 149, 150, 199)}
    assert at[0] == at[49] == 1.0
    assert at[50] == pytest.approx(0.2, rel=1e-12) and at[99] == at[50]
    assert at[100] == pytest.approx(0.04, rel=1e-12) and at[149] == at[100]
    assert at[150] == pytest.approx(0.008, rel=1e-12) and at[199] == at[150]
    # the decay happens at the epoch boundary, not within an epoch
    assert lr_factor(50 * SPE - 1, SPE, cfg) == 1.0
    assert lr_factor(50 * SPE, SPE, cfg) == pytest.approx(0.2)


def test_equals_multisteplr_stepped_per_epoch() -> None:
    cfg = ScheduleConfig()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[50, 100, 150], gamma=0.2)
    for epoch in range(200):
        want = opt.param_groups[0]["lr"]
        for k in range(SPE):
            assert lr_factor(epoch * SPE + k, SPE, cfg) == pytest.approx(want, rel=1e-12)
        opt.step()
        sched.step()


def test_lambdalr_per_optimizer_step() -> None:
    cfg = ScheduleConfig(name="cosine", epochs=5, warmup_epochs=1, warmup_start_factor=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda_for(SPE, cfg))
    for step in range(5 * SPE):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * lr_factor(step, SPE, cfg))
        opt.step()
        sched.step()
    # the lambda is picklable, so the scheduler's state_dict round-trips
    torch.optim.lr_scheduler.LambdaLR(opt, lambda_for(SPE, cfg)).load_state_dict(sched.state_dict())


@pytest.mark.parametrize("name", ["step", "cosine", "constant"])
def test_warmup_is_linear(name: str) -> None:
    cfg = ScheduleConfig(name=name, epochs=20, milestones=(10,), warmup_epochs=2.5)
    n = 2.5 * SPE  # warm-up steps (fractional: the ramp is per step, not per epoch)
    ramp = [lr_factor(s, SPE, cfg) for s in range(int(n) + 1)]
    # before the first milestone and the start of the cosine decay, the warm-up alone shapes it
    assert ramp == pytest.approx([s / n for s in range(int(n) + 1)], abs=1e-12)
    after = int(n) + 1
    if name == "cosine":  # cosine starts from the peak once warm-up ends
        assert lr_factor(after, SPE, cfg) == pytest.approx(1.0, abs=1e-4)
    else:  # the warm-up is gone; the plain schedule continues
        plain = ScheduleConfig(name=name, epochs=20, milestones=(10,))
        assert lr_factor(after, SPE, cfg) == lr_factor(after, SPE, plain) == 1.0
    start = ScheduleConfig(name="constant", warmup_epochs=2, warmup_start_factor=0.25)
    assert lr_factor(0, SPE, start) == 0.25
    assert lr_factor(SPE, SPE, start) == pytest.approx(0.625)
    assert lr_factor(2 * SPE, SPE, start) == 1.0
    # a milestone inside the warm-up multiplies the ramp
    early = ScheduleConfig(epochs=20, milestones=(1,), gamma=0.5, warmup_epochs=2)
    assert lr_factor(SPE, SPE, early) == pytest.approx(0.5 * 0.5)


def test_cosine_endpoints_and_monotone() -> None:
    cfg = ScheduleConfig(name="cosine", epochs=10, min_factor=0.1)
    f = [lr_factor(s, SPE, cfg) for s in range(10 * SPE + 1)]
    assert f[0] == 1.0
    assert f[-1] == pytest.approx(0.1)
    assert f[5 * SPE] == pytest.approx(0.55)  # half-way: floor + half the range
    assert all(b < a for a, b in pairwise(f))
    warm = ScheduleConfig(name="cosine", epochs=10, warmup_epochs=2)
    g = [lr_factor(s, SPE, warm) for s in range(10 * SPE + 1)]
    assert g[2 * SPE] == 1.0 and g[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(b < a for a, b in pairwise(g[2 * SPE :]))
    assert lr_factor(100 * SPE, SPE, cfg) == pytest.approx(0.1)  # past the end: the floor


def test_constant() -> None:
    cfg = ScheduleConfig(name="constant", epochs=3)  # default milestones: ignored, not validated
    assert {lr_factor(s, SPE, cfg) for s in range(3 * SPE)} == {1.0}


def test_scaled_lr() -> None:
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 128, rule="linear") == pytest.approx(0.05)
    assert scaled_lr(0.1, 1024, rule="sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 4096, reference_batch=1024, rule="sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 1024, rule="none") == 0.1
    with pytest.raises(ValueError, match="scaling rule"):
        scaled_lr(0.1, 1024, rule="cubic")
    with pytest.raises(ValueError, match="global_batch=0"):
        scaled_lr(0.1, 0)


GAMMA = r"schedule.gamma must lie in \(0, 1\] \(the lr's factor at each milestone\)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "poly"}, "schedule.name must be one of"),
        ({"epochs": 0}, "schedule.epochs must be >= 1, got 0"),
        ({"milestones": (100, 50)}, "schedule.milestones must be strictly increasing"),
        ({"milestones": (50, 50)}, "schedule.milestones must be strictly increasing"),
        ({"milestones": (0, 50)}, r"schedule.milestones must lie in \(0, epochs=200\]"),
        ({"milestones": (50, 201)}, r"schedule.milestones must lie in \(0, epochs=200\]"),
        ({"gamma": -1}, rf"{GAMMA}, got -1"),
        ({"gamma": 0}, rf"{GAMMA}, got 0"),
        ({"gamma": 1.5}, rf"{GAMMA}, got 1.5"),  # a "decay" that raises the lr
        ({"warmup_epochs": -1}, r"schedule.warmup_epochs must be in \[0, epochs=200\)"),
        ({"warmup_epochs": 200}, r"schedule.warmup_epochs must be in \[0, epochs=200\)"),
        ({"warmup_start_factor": 2}, "schedule.warmup_start_factor"),
        ({"min_factor": -0.1}, "schedule.min_factor"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        ScheduleConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_milestones_coerced_and_step_args_checked() -> None:
    cfg = ScheduleConfig(milestones=[30, 60])  # type: ignore[arg-type]  # as Hydra passes lists
    assert cfg.milestones == (30, 60) and hash(cfg)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_factor(0, 0, cfg)
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_factor(-1, 1, cfg)


def test_plot_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "lr.png"
    plot_schedule(ScheduleConfig(warmup_epochs=5), 391, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_closed_ends_of_the_ranges_are_accepted() -> None:
    # without it a last milestone at the final epoch, gamma 1 (no decay) or a cosine floor of 1
    # (a constant lr) would be refused although the documented ranges include them
    assert ScheduleConfig(epochs=10, milestones=(5, 10)).milestones == (5, 10)
    assert ScheduleConfig(gamma=1.0).gamma == 1.0
    assert ScheduleConfig(name="cosine", min_factor=1.0).min_factor == 1.0


def test_plot_steps_keep_both_sides_of_each_milestone() -> None:
    # without it the plot would miss the last step before or the first after a decay (a slope)
    spe = 391
    steps = set(_plot_steps(ScheduleConfig(), spe))  # stride 19: the edges are off its grid
    for m in (50, 100, 150):
        assert {m * spe - 1, m * spe} <= steps
        assert (m * spe - 1) % 19 and (m * spe) % 19
