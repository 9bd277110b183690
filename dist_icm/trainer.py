"""The training loop, top to bottom: set up a :class:`Job`, restore, step, evaluate, save.

One optimizer step is ``grad_accum`` micro-steps; in each, every rank mixes its slice of the
micro-global batch (randomness keyed by seed, micro-step and global group), runs the objective
(the ICM loss spans the micro-global batch through the runtime's process group) and
back-propagates; DDP's all-reduce runs on the last micro-step only. Logged losses are means
over ranks. Start-up problems raise :class:`~dist_icm.config.ConfigError` or
:class:`~dist_icm.data.datasets.DataError` before any training happens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dist_icm import checkpoint, dist
from dist_icm.config import BatchPlan, Config, ConfigError, check_against_data, plan_batches
from dist_icm.data.pipeline import DataBundle, build_data
from dist_icm.metrics import evaluate_sums, finalize
from dist_icm.mixing import MixContext
from dist_icm.models import build_model
from dist_icm.objectives import Objective
from dist_icm.optim import build_optimizer
from dist_icm.report import Report
from dist_icm.runtime import Runtime
from dist_icm.schedule import lambda_for, plot_schedule


@dataclass
class Job:
    """Everything the loop needs, built and checked at start."""

    cfg: Config
    rt: Runtime
    plan: BatchPlan
    data: DataBundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    steps_per_epoch: int
    total_steps: int
    run_dir: Path

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def setup(cfg: Config) -> Job:
    """Runtime, data, model, optimizer, schedule and objective, validated against each other."""
    rt = Runtime(cfg.runtime)
    rt.check(cfg.model)
    plan = plan_batches(cfg, rt.world_size)
    torch.manual_seed(cfg.train.seed)  # model init; all other randomness is keyed explicitly
    data = build_data(
        cfg.data,
        seed=cfg.train.seed,
        micro_global=plan.micro_global,
        rank=rt.rank,
        world_size=rt.world_size,
        device=rt.device,
        channels_last=cfg.runtime.channels_last,
    )
    check_against_data(cfg, data.spec.num_classes, data.train_size)
    steps_per_epoch = data.sampler.batches_per_epoch // plan.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(f"data.global_batch={plan.global_batch} leaves no full step per epoch")
    model = build_model(cfg.model.name, data.spec.num_classes, data.spec.in_channels)
    optimizer = build_optimizer(model, cfg.optim, plan.global_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda_for(steps_per_epoch, cfg.schedule)
    )
    model, optimizer = rt.prepare(model, optimizer, cfg.model)
    group = rt.process_group
    objective = Objective(cfg.loss, class_counts=data.class_counts, process_group=group)
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    run_dir = Path(dist.broadcast_object(cfg.run_dir or "outputs/run", group))
    return Job(
        cfg, rt, plan, data, model, optimizer, scheduler, objective, steps_per_epoch, total, run_dir
    )


def find_checkpoint(job: Job) -> dict | None:
    """The state to resume from: ``resume=auto`` takes the newest valid one (or none)."""
    resume = job.cfg.resume
    if resume is None:
        return None
    if resume == "auto":
        found = checkpoint.latest(job.ckpt_dir)
        return None if found is None else found[1]
    if not Path(resume).is_file():
        raise ConfigError(f"resume={resume!r}: no such checkpoint file (or use resume=auto)")
    return checkpoint.load(resume)


def restore(job: Job, state: dict) -> int:
    """Load model, optimizer, schedule, scaler and RNG states; returns the step to go on from.

    The sampler position follows from the step (epoch and batch within it).
    """
    job.rt.unwrap(job.model).load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    job.rt.load_scaler_state(state.get("scaler"))
    checkpoint.set_rng_state(state["rng"])
    return state["step"]


def save(job: Job, step: int) -> None:
    """Rank 0 writes an atomic checkpoint; every rank waits for it."""
    if job.rt.is_main:
        state = {
            "model": job.rt.unwrap(job.model).state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict(),
            "scaler": job.rt.scaler_state(),
            "rng": checkpoint.rng_state(),
            "step": step,
            "config": asdict(job.cfg),
        }
        checkpoint.save(job.ckpt_dir, step, state, keep=job.cfg.train.keep_ckpts)
    dist.barrier(job.rt.process_group)


def evaluate(job: Job) -> dict:
    """Metrics of the whole test set: each rank's shard, sums added over ranks."""
    rt = job.rt
    sums = evaluate_sums(rt.unwrap(job.model), job.data.test_loader, rt.device)
    sums = dist.all_reduce_sum(sums.to(rt.device), rt.process_group).cpu()
    return {f"test/{k}": v for k, v in finalize(sums).items() if k != "count"}


def train_step(job: Job, batches, step: int) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-steps; returns this rank's mean loss."""
    cfg, rt, accum = job.cfg, job.rt, job.plan.grad_accum
    group_size = cfg.loss.group_size
    first_group = rt.rank * job.plan.per_device // (group_size or job.plan.per_device)
    total = torch.zeros((), device=rt.device)
    for m in range(accum):
        x, y = next(batches)
        x, y = rt.to_device(x), y.to(rt.device)
        ctx = MixContext(cfg.train.seed, step * accum + m, group_size, first_group)
        with rt.no_sync(job.model, skip=m < accum - 1):
            loss, _ = job.objective(job.model, x, y, ctx)
            rt.backward(loss / accum)
        total += loss.detach() / accum
    job.optimizer.step()
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    return total


def train(job: Job, state: dict | None = None) -> dict:
    """Train from ``state`` (a checkpoint) or from scratch to ``total_steps``, evaluating and
    checkpointing on the way; returns the summary (on every rank)."""
    t_start = time.perf_counter()
    cfg, rt, data, spe = job.cfg, job.rt, job.data, job.steps_per_epoch
    step = restore(job, state) if state is not None else 0
    report = Report(
        job.run_dir,
        enabled=rt.is_main,
        total_steps=job.total_steps,
        start_step=step,
        progress=cfg.train.progress,
        tensorboard=cfg.train.tensorboard,
    )
    report.print(
        f"global batch {job.plan.global_batch} = {rt.world_size} processes x "
        f"{job.plan.per_device} x {job.plan.grad_accum} micro-steps; {spe} steps/epoch; "
        f"run dir {job.run_dir}" + (f"; resumed at step {step}" if state else "")
    )
    if rt.is_main:  # the lr schedule at a glance, beside the metrics
        plot_schedule(cfg.schedule, spe, job.run_dir / "lr_schedule.png")
    job.model.train()
    seen, train_time, metrics = 0, 0.0, {}
    loss_sum, loss_count = torch.zeros((), device=rt.device), 0
    while step < job.total_steps:
        epoch, in_epoch = divmod(step, spe)
        data.sampler.set_epoch(epoch)
        data.train.set_epoch(epoch)
        data.sampler.set_start_batch(in_epoch * job.plan.grad_accum)
        batches = iter(data.loader)
        t0 = time.perf_counter()
        for _ in range(in_epoch, spe):
            loss_sum += train_step(job, batches, step)
            step, loss_count = step + 1, loss_count + 1
            seen += job.plan.global_batch
            if step % cfg.train.log_every == 0 or step == job.total_steps:
                mean = dist.all_reduce_mean(loss_sum / loss_count, rt.process_group).item()
                rate = seen / (train_time + time.perf_counter() - t0)
                lr = job.scheduler.get_last_lr()[0]
                record = {"step": step, "epoch": step / spe, "train/loss": mean}
                report.log(record | {"train/lr": lr, "train/images_per_sec": rate})
                report.progress(step, {"loss": mean, "lr": lr, "img/s": rate})
                loss_sum, loss_count = loss_sum.zero_(), 0
            if step == job.total_steps:
                break
        train_time += time.perf_counter() - t0
        end, epochs_done = step == job.total_steps, step // spe
        if end or (step % spe == 0 and epochs_done % cfg.train.eval_every == 0):
            metrics = evaluate(job)
            report.log({"step": step, "epoch": step / spe} | metrics)
            job.model.train()
        if end or (step % spe == 0 and epochs_done % cfg.train.ckpt_every == 0):
            save(job, step)
    if not metrics:  # resumed at (or past) the end: nothing was trained, still report
        metrics = evaluate(job)
    summary = {k.removeprefix("test/"): v for k, v in metrics.items()} | {
        "epochs": step / spe,
        "steps": step,
        "global_batch": job.plan.global_batch,
        "world_size": rt.world_size,
        "images_per_sec": seen / train_time if train_time else 0.0,
        "wall_s": time.perf_counter() - t_start,
    }
    report.summary(summary)
    report.close()
    return summary
