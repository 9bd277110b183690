"""Non-finite steps: skipped on every rank together, counted, and the run stopped with one line
(exit code 3) after ``train.max_skipped`` of them in a row; never a checkpoint of non-finite
weights.

The faults are real: a batch with a NaN pixel fed through the real model, loss and optimizer
(on one rank of two: the other must skip too), and a learning rate that blows the weights up.
"""

import json
import math

import pytest
import torch
from cli import last_logged, run_train, setup_job
from multiproc import run_launched

from dist_icm.checkpoint import list_checkpoints, load
from dist_icm.train import DIVERGED_EXIT

ARGS = ["experiment=quickstart", "train.progress=false", "train.tensorboard=false",
        "runtime.threads=1", "train.log_every=1"]  # fmt: skip


def _job(overrides):
    job = setup_job(overrides)
    job.data.sampler.set_epoch(0)
    job.data.train.set_epoch(0)
    return job


def _state(job):
    params = list(job.rt.full_state_dict(job.model).values())  # whole, also under ZeRO-3
    momenta = [s["momentum_buffer"].clone() for s in job.optimizer.state.values()]
    return params, momenta, job.scheduler.last_epoch, job.scheduler.get_last_lr()[0]


def _skip_worker(rank, world, poisoned_rank, mode, extra=()):
    """Steps 0-3 on the loader's first four batches; step 2's batch carries a NaN pixel on
    ``poisoned_rank``. ``mode``: "guard" (the trainer's step), "reference" (step 2 left out),
    "unguarded" (the negative control: step 2 applied without the check)."""
    from dist_icm import trainer

    job = _job([*ARGS, "optim.momentum=0.9", *extra])
    loader = iter(job.data.loader)
    out = {"why": []}
    for step in range(4):
        x, y = next(loader)
        if step == 2 and mode == "reference":
            continue
        if step == 2 and rank == poisoned_rank:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")  # one pixel of one image
        before = _state(job)
        if mode == "unguarded" and step == 2:  # the step as it was before this issue
            loss, _ = job.objective(job.model, x.to(job.rt.device), y.to(job.rt.device),
                                    trainer.MixContext(0, step, 16, 0))  # fmt: skip
            job.rt.backward(loss, last=True, accum=1)
            job.optimizer.step()
            job.scheduler.step()
            job.optimizer.zero_grad(set_to_none=True)
            why = None
        else:
            _, why = trainer.train_step(job, iter([(x, y)]), step)
        out["why"].append(why)
        if step == 2:
            after = _state(job)
            same = [all(map(torch.equal, b, a)) for b, a in zip(before[:2], after[:2], strict=True)]
            out["params_same"], out["momenta_same"] = same
            out["sched"] = (before[2], after[2], before[3], after[3])
            out["grads"] = [p.grad for p in job.model.parameters()]
    out["finite"] = all(torch.isfinite(p).all().item() for p in job.model.parameters())
    out["params"] = [p.detach().clone() for p in job.rt.full_state_dict(job.model).values()]
    return out


def _check_skipped(ranks, reference, ddp=True, exact=True):
    for out in ranks:
        assert out["why"][:2] == [None, None] and out["why"][3] is None
        assert out["why"][2] is not None and "loss nan" in out["why"][2]
        assert out["params_same"]  # no optimizer step at all
        last_epoch, after_epoch, lr, after_lr = out["sched"]
        assert after_epoch == last_epoch and after_lr == lr  # the schedule did not advance
        assert out["finite"]
        if ddp:
            assert out["momenta_same"]
            assert all(g is None for g in out["grads"])  # the non-finite gradients are dropped
        # and nothing of the skipped step lingers: the next step is the one a run without
        # the bad batch takes, bit for bit (no stale gradient, momentum or schedule step)
        for a, b in zip(out["params"], reference[0]["params"], strict=True):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "world, poisoned",
    [
        pytest.param(1, 0, marks=pytest.mark.slow),
        (2, 1),
        pytest.param(2, 0, marks=pytest.mark.slow),
    ],
)
def test_a_nan_batch_on_one_rank_is_skipped_by_every_rank(world, poisoned):
    reference = run_launched(_skip_worker, world, poisoned, "reference")
    _check_skipped(run_launched(_skip_worker, world, poisoned, "guard"), reference)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_skips_a_non_finite_step_in_float32_too(stage):
    pytest.importorskip("deepspeed")
    extra = (f"runtime=deepspeed_zero{stage}", "runtime.device=auto")
    reference = run_launched(_skip_worker, 2, 1, "reference", extra)
    _check_skipped(run_launched(_skip_worker, 2, 1, "guard", extra), reference, ddp=False)


@pytest.mark.multiproc
def test_negative_control_without_the_check_the_nan_reaches_the_weights():
    (out,) = run_launched(_skip_worker, 1, 0, "unguarded")
    assert not out["params_same"] and not out["finite"]


def _weights_worker(rank, world, extra=()):
    from dist_icm import trainer

    job = _job([*ARGS, *extra])
    results = [None, None]
    for attempt in range(2):
        if attempt == 1 and rank == world - 1:  # the last rank's weights go bad
            last = list(job.model.parameters())[-1]  # under ZeRO-3: this rank's shard of it
            with torch.no_grad():
                getattr(last, "ds_tensor", last).view(-1)[0].fill_(float("inf"))
        try:
            trainer.check_weights(job, 7, "its checkpoint")
        except trainer.Diverged as e:
            results[attempt] = str(e)
    return results


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [0, 3])
def test_non_finite_weights_on_one_rank_stop_every_rank(stage):
    # under ZeRO-3 each rank holds a shard of every parameter, and the bad entry is in rank 1's
    extra = ()
    if stage:
        pytest.importorskip("deepspeed")
        extra = (f"runtime=deepspeed_zero{stage}", "runtime.device=auto")
    for out in run_launched(_weights_worker, 2, extra):
        assert out[0] is None
        assert out[1] == "step 7: the weights are non-finite; stopped before its checkpoint"


@pytest.mark.parametrize("max_skipped, stops_at", [(3, 6), (0, 3)])
def test_a_diverging_run_stops_with_one_line_and_no_checkpoint(tmp_path, max_skipped, stops_at):
    # lr=1e10: step 2 makes the weights huge (still finite), every later loss is NaN
    run = tmp_path / "run"
    out = run_train(run, *ARGS, "optim.lr=1e10", "train.ckpt_every_steps=1",
                    f"train.max_skipped={max_skipped}", check=False)  # fmt: skip
    assert out.returncode == DIVERGED_EXIT, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("dist_icm")]
    assert "Traceback" not in out.stderr and out.stderr.strip().endswith(errors[-1])
    assert errors == [
        f"dist_icm: error: training diverged: step {stops_at}: {max_skipped + 1} non-finite "
        f"steps in a row, more than train.max_skipped={max_skipped} (gradient norm nan; loss "
        "nan on rank 0); no checkpoint of it was written"
    ]
    assert f"step {stops_at - 1} skipped" in out.stderr or max_skipped == 0
    assert last_logged(run) == errors[0]  # the run's log ends with it too
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/skipped_steps"] == max_skipped
    assert all("train/loss" not in r for r in records if r["step"] > 2)  # no NaN logged
    assert not (run / "summary.json").exists()
    saved = list_checkpoints(run / "checkpoints")
    # a skipped step leaves the weights as they were (finite): those steps may be saved; the
    # step that stops the run is not
    assert int(saved[-1].name[5:-3]) == stops_at - 1
    for path in saved:
        model = load(path)["model"]
        assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())
    assert all(math.isfinite(r.get("train/loss", 0.0)) for r in records)


def test_the_skipped_steps_count_carries_over_a_resume(tmp_path):
    # lr=1e10 as above: steps 3-5 are skipped, step 6 stops the run; step 5 is saved
    run = tmp_path / "run"
    common = [*ARGS, "optim.lr=1e10", "train.ckpt_every_steps=1"]
    out = run_train(run, *common, "train.max_skipped=3", check=False)
    assert out.returncode == DIVERGED_EXIT, out.stderr[-2000:]
    # resumed at step 5 with more patience: steps 6 and 7 are skipped too, counted on top
    run_train(run, *common, "train.max_skipped=10", "train.max_steps=7", "resume=auto")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_at_step"] == 5 and summary["steps"] == 7
    assert summary["skipped_steps"] == 5  # 3 before the checkpoint, 2 since
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in logged if "train/lr" in r][-3:] == [3, 4, 5]


@pytest.mark.gpu
def test_fp16_counts_the_gradient_scaler_s_skip_and_holds_the_schedule():
    """fp16: the scaler finds the NaN gradients, skips the optimizer step and lowers its scale;
    the trainer reports the skip and does not step the schedule. The next step equals the
    reference's up to the scale's rounding (the scale differs by a factor 2 afterwards)."""
    extra = ("runtime.precision=fp16", "runtime.device=cuda")
    reference = run_launched(_skip_worker, 1, 0, "reference", extra)
    ranks = run_launched(_skip_worker, 1, 0, "guard", extra)
    assert "fp16 gradient overflow" in ranks[0]["why"][2]
    _check_skipped(ranks, reference, exact=False)
