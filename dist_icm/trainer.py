"""The training loop, top to bottom: resume, step, evaluate, save (a :class:`~dist_icm.job.Job`
built by :func:`dist_icm.job.setup`).

One optimizer step is ``grad_accum`` micro-steps; in each, every rank mixes its slice of the
micro-global batch (randomness keyed by seed, micro-step and global group), runs the objective
(the ICM loss spans the micro-global batch through the runtime's process group) and
back-propagates; DDP's all-reduce runs on the last micro-step only. The hot path adds no
collective on the training process group to the loss's and DDP's (the stop flags travel in a
2-number all-reduce on a separate gloo group, not waited for: :mod:`dist_icm.preempt`) and
reads one number back from the device per optimizer step:
whether the gradients' norm is finite. A step whose gradients are not is skipped on every rank
alike (the gradients are all-reduced by then), counted (``train/skipped_steps``), and more
than ``train.max_skipped`` in a row stop the run (:class:`Diverged`). Logged losses are summed
on the device and read (a mean over ranks) only every ``train.log_every`` steps.

What ranks must agree on is decided once: the data set is fetched by rank 0 first, the
checkpoint is chosen by rank 0 (checkpoints are written and restored by
:mod:`dist_icm.resume`), and BatchNorm statistics are averaged over ranks before every
evaluation and save, so the metrics reported are those of the model saved (in the run's
precision: under ``runtime=bf16`` evaluation runs under the same autocast as training, and a
float32 re-evaluation of the checkpoint differs in the last digits). Start-up problems
raise :class:`~dist_icm.config.ConfigError`, :class:`~dist_icm.data.datasets.DataError` or
``CheckpointError`` before any training happens.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from dist_icm import dist, preempt, resume, streams
from dist_icm.job import Job
from dist_icm.metrics import evaluate_sums, finalize
from dist_icm.mixing import MixContext
from dist_icm.norm import rank_averaged
from dist_icm.report import Report
from dist_icm.schedule import plot_schedule


def evaluate(job: Job) -> dict:
    """Metrics of the whole test set: each rank's shard, scored by one (rank-averaged) model,
    sums added over ranks. Under DeepSpeed the model scored is a plain copy of the whole model
    (float32, every parameter on every rank), as a checkpoint stores it."""
    rt = job.rt
    model = rt.unwrap(job.model)
    with rank_averaged(model, rt.process_group):  # each rank's own statistics again after
        if rt.engine is not None:
            state = rt.full_state_dict(job.model)
            model = job.fresh_model()
            model.load_state_dict(state)
            model.to(rt.device)
        sums = evaluate_sums(model, job.data.test_loader, rt.device)
    sums = dist.all_reduce_sum(sums.to(rt.device), rt.process_group).cpu()
    return {f"test/{k}": v for k, v in finalize(sums).items() if k != "count"}


def train_step(job: Job, batches, step: int) -> tuple[torch.Tensor, str | None]:
    """One optimizer step over ``grad_accum`` micro-steps; returns this rank's mean loss and
    None, or, when the step was skipped for non-finite gradients (no optimizer or schedule
    step; the gradients dropped; the same decision on every rank), why."""
    cfg, rt, accum = job.cfg, job.rt, job.plan.grad_accum
    group_size = cfg.loss.group_size
    first_group = rt.rank * job.plan.per_device // (group_size or job.plan.per_device)
    streams.seed_torch("model", cfg.train.seed, step, rt.rank)  # dropout differs by rank
    total = torch.zeros((), device=rt.device)
    for m in range(accum):
        x, y = next(batches)
        x, y = rt.to_device(x), y.to(rt.device, non_blocking=True)
        ctx = MixContext(cfg.train.seed, step * accum + m, group_size, first_group)
        with rt.no_sync(job.model, skip=m < accum - 1):
            loss, _ = job.objective(job.forward, x, y, ctx)
            rt.backward(loss, last=m == accum - 1, accum=accum)
        total += loss.detach() / accum
    applied, why = rt.step(job.model, job.optimizer, cfg.optim.grad_clip)
    if not applied:
        return total, f"{why}; loss {total.item():.4g} on rank {rt.rank}"
    job.scheduler.step()
    return total, None


class Diverged(RuntimeError):
    """Training stopped on non-finite steps or weights (the entry point exits with code 3)."""


def check_weights(job: Job, step: int, before: str) -> None:
    """Raise :class:`Diverged` if any rank holds a non-finite parameter or buffer (its shard of
    them under ZeRO-3; one small all-reduce; called before every evaluation and checkpoint,
    never per step), so that no checkpoint or metric of non-finite weights is ever written."""
    rt = job.rt
    state = rt.held_tensors(job.model)
    peaks = [t.detach().abs().amax().float() for t in state if t.is_floating_point() and t.numel()]
    bad = torch.zeros((), device=rt.device)
    if peaks:  # a nan entry makes its tensor's peak nan
        bad += (~torch.isfinite(torch.stack(peaks).to(rt.device))).any()
    bad = dist.all_reduce_max(bad, rt.process_group)
    if bad.item():
        raise Diverged(f"step {step}: the weights are non-finite; stopped before {before}")


def _loss_window(job: Job, window: dict | None) -> tuple[torch.Tensor, int]:
    """This rank's sum of the losses trained since the last logged step, and their count, as a
    checkpoint left them (each rank its own; on another number of ranks, their mean), so that
    the first record a resumed run logs is the whole run's; zeros without one."""
    device = job.rt.device
    if not window or not window["count"]:
        return torch.zeros((), device=device), 0
    sums = window["sums"]
    mine = sums[job.rt.rank] if len(sums) == job.rt.world_size else torch.stack(sums).mean()
    return mine.to(device), window["count"]


def _open_report(job: Job, step: int, resumed: bool) -> Report:
    """The run's report (writing on rank 0), with the start-up lines and the lr plot. Where
    the run resumes, or may (resume=auto), what an earlier session logged past ``step`` goes."""
    cfg, rt, spe = job.cfg, job.rt, job.steps_per_epoch
    report = Report(
        job.run_dir,
        enabled=rt.is_main,
        total_steps=job.total_steps,
        start_step=step,
        redo=resumed or cfg.resume == "auto",
        progress=cfg.train.progress,
        tensorboard=cfg.train.tensorboard,
    )
    for note in job.notes:
        report.print(note)
    optimizer = type(getattr(job.optimizer, "optimizer", job.optimizer)).__name__
    procs = f"{rt.world_size} process" + ("es" if rt.world_size > 1 else "")
    report.print(
        f"global batch {job.plan.global_batch} = {procs} x {job.plan.per_device} x "
        f"{job.plan.grad_accum} micro-steps; {spe} steps/epoch; optimizer {optimizer}; "
        f"run dir {job.run_dir}" + (f"; resumed at step {step}" if resumed else "")
    )
    if resumed and step > job.total_steps:  # e.g. train.max_steps lowered: no step goes back
        report.print(
            f"the checkpoint's step {step} is past this run's {job.total_steps} steps "
            "(train.max_steps, train.epochs): nothing to train; it is evaluated as it is"
        )
    if rt.is_main:  # the lr schedule at a glance, beside the metrics; a resumed run goes on
        plot_schedule(cfg.schedule, spe, job.run_dir / "lr_schedule.png")
        preempt.unmark(job.run_dir)
    return report


def _log_step(job: Job, report: Report, step: int, mean_loss, rate: float, skipped: int) -> dict:
    """Log step ``step``'s record (written by rank 0; returned on every rank): ``mean_loss``
    (this rank's mean over the steps trained since the last log, a device tensor; None where
    every one was skipped) averaged over ranks, lr, images/s, skipped steps so far and the
    batch's duplicate share."""
    lr = job.scheduler.get_last_lr()[0]
    record = {"step": step, "epoch": step / job.steps_per_epoch}
    if mean_loss is not None:  # None on every rank alike: skips are agreed
        record["train/loss"] = dist.all_reduce_mean(mean_loss, job.rt.process_group).item()
    record |= {"train/lr": lr, "train/images_per_sec": rate}
    record |= {"train/dup_share": job.objective.duplicate_share(), "train/skipped_steps": skipped}
    report.log(record)
    loss = record.get("train/loss", float("nan"))
    report.progress(step, {"loss": loss, "lr": lr, "img/s": rate})
    return record


def train(
    job: Job, found: resume.Resumed | None = None, flags: preempt.StopFlags | None = None
) -> dict:
    """Train from ``found`` (a checkpoint) or from scratch to ``total_steps``, evaluating and
    checkpointing on the way; returns the summary (on every rank).

    Raises :class:`~dist_icm.preempt.Preempted` after checkpointing the step it stopped at
    when a signal asked it to stop (see :mod:`dist_icm.preempt`); ``flags`` are the stop flags
    that caught signals before (new ones if None), closed on return.
    """
    t_start = time.perf_counter()
    cfg, rt, data, spe = job.cfg, job.rt, job.data, job.steps_per_epoch
    state = found.state if found is not None else None
    start = step = resume.restore(job, found) if found is not None else 0
    before = dict(state.get("run", {})) if state is not None else {}
    report = _open_report(job, step, resumed=state is not None)
    flags = preempt.StopFlags() if flags is None else flags  # the main job's: from its start
    flags.join(job.control, is_main=rt.is_main, ckpt_every_min=cfg.train.ckpt_every_min)
    seen, train_time, metrics, saved, stopping = 0, 0.0, {}, step, False
    dup_shares: list[float] = []  # this session's, one per logged step (with dup_before: summary)
    end_share = None
    dup_before = before.get("dup_shares", [0.0, 0])  # [sum, count] over the sessions before
    loss_sum, loss_count = _loss_window(job, before.get("loss_window"))  # since the last log
    skipped, in_a_row = before.get("skipped", 0), before.get("in_a_row", 0)  # non-finite steps

    def run_totals(in_epoch_s: float = 0.0) -> dict:  # the whole run so far: what a resume
        now = train_time + in_epoch_s  # goes on from (summed in the whole run's order)
        return {
            "train_s": before.get("train_s", 0.0) + now,
            "images": before.get("images", 0) + seen,
            "skipped": skipped,
            "in_a_row": in_a_row,
            "dup_shares": [sum(dup_shares, dup_before[0]), dup_before[1] + len(dup_shares)],
            "end_share": end_share,  # the run's end, off the log grid (a resume there reads it)
        }

    def save(in_epoch_s: float = 0.0) -> int:  # a checkpoint of this step; returns the step
        check_weights(job, step, "its checkpoint")
        sums = dist.all_gather_object(loss_sum.cpu(), rt.process_group)  # each rank's own
        window = {"loss_window": {"sums": sums, "count": loss_count}}
        resume.save(job, step, run_totals(in_epoch_s) | window)
        flags.checkpoint_written()
        return step

    job.model.train()
    try:
        while step < job.total_steps:
            epoch, in_epoch = divmod(step, spe)
            data.sampler.set_epoch(epoch)
            data.train.set_epoch(epoch)
            data.sampler.set_start_batch(in_epoch * job.plan.grad_accum)
            batches = iter(data.loader)
            t0, asked = time.perf_counter(), False
            for _ in range(in_epoch, spe):
                loss, why = train_step(job, batches, step)
                step, seen = step + 1, seen + job.plan.global_batch
                if why is None:
                    loss_sum, loss_count, in_a_row = loss_sum + loss, loss_count + 1, 0
                else:
                    skipped, in_a_row = skipped + 1, in_a_row + 1
                    report.print(f"step {step} skipped: {why} ({in_a_row} in a row)")
                    if in_a_row > cfg.train.max_skipped:
                        raise Diverged(
                            f"step {step}: {in_a_row} non-finite steps in a row, more than "
                            f"train.max_skipped={cfg.train.max_skipped} ({why})"
                        )
                on_grid = step % cfg.train.log_every == 0
                if on_grid or step == job.total_steps:
                    rate = seen / (train_time + time.perf_counter() - t0)
                    mean = loss_sum / loss_count if loss_count else None
                    record = _log_step(job, report, step, mean, rate, skipped)
                    share = record["train/dup_share"]
                    if on_grid:
                        dup_shares += [] if share is None else [share]
                        loss_sum, loss_count = torch.zeros((), device=rt.device), 0
                    else:  # the run's end, off the log grid: the window and share stay out of
                        end_share = share  # a checkpoint's totals, as a resume goes on
                decision = flags.poll()  # agreed by every rank (one step late on several)
                stopping = decision.stop and step < job.total_steps
                if step == job.total_steps or stopping:
                    break
                every = cfg.train.ckpt_every_steps
                asked = decision.checkpoint or bool(every and step % every == 0)
                if asked and step % spe == 0:  # an epoch's last step: saved after its
                    continue  # evaluation, below, so a resume from it never skips one
                if asked:
                    saved = save(time.perf_counter() - t0)
            train_time += time.perf_counter() - t0
            end, epochs_done = step == job.total_steps, step // spe
            if end or (step % spe == 0 and epochs_done % cfg.train.eval_every == 0):
                check_weights(job, step, "its evaluation")
                metrics = evaluate(job)
                report.log({"step": step, "epoch": step / spe} | metrics)
                job.model.train()
            due = step % spe == 0 and epochs_done % cfg.train.ckpt_every == 0
            if saved != step and (end or due or stopping or asked):
                saved = save()
            if stopping:  # what an epoch's end does was done above; the step is saved
                if rt.is_main:
                    preempt.mark(job.run_dir, step, flags.reason())
                raise preempt.Preempted(step, flags.reason())
    finally:
        flags.close()
        report.close()
    if not metrics:  # resumed at (or past) the end: nothing was trained, still report
        metrics = evaluate(job)
        end_share = before.get("end_share")  # its last session logged the end off the grid
    run = run_totals()
    total, count = run["dup_shares"]  # the logged steps' duplicate shares, the run's end too
    if end_share is not None:
        total, count = total + end_share, count + 1
    summary = {k.removeprefix("test/"): v for k, v in metrics.items()} | {
        "epochs": step / spe,
        "steps": step,
        "global_batch": job.plan.global_batch,
        "world_size": rt.world_size,
        # whether this session's training steps replayed the model from CUDA graphs
        "cuda_graphs": bool(getattr(job.forward, "captured", False)),
        "skipped_steps": skipped,  # non-finite steps skipped, over the whole run
        "dup_share": total / count if count else None,
        "peak_lr": job.peak_lr,
        # this process (since its start, or its resume at `resumed_at_step`)
        "resumed_at_step": start if state is not None else None,
        "session_wall_s": time.perf_counter() - t_start,
        "session_train_s": train_time,
        "session_images_per_sec": seen / train_time if train_time else 0.0,
        # the whole run: every session up to its last checkpoint, and this one
        "run_train_s": run["train_s"],
        "run_images_per_sec": run["images"] / run["train_s"] if run["train_s"] else 0.0,
    }
    # what the run was: the whole validated config, and how it was asked for (dist_icm.study)
    summary |= {"config": dataclasses.asdict(cfg)} | job.labels
    report.summary(summary)
    return summary
