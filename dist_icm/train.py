"""The main job: ``python -m dist_icm.train`` / ``dist-icm-train`` / ``accelerate launch -m ...``.

Reads top to bottom: config -> runtime -> data -> model/optimizer/schedule -> objective ->
(resume) -> the loop (micro-steps of one optimizer step, logging, evaluation, checkpoints) ->
summary. Every start-up failure (bad config value, missing data, unknown model) prints one line
and exits with code 2.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dist_icm import checkpoint, dist
from dist_icm.config import (
    Config,
    ConfigError,
    check_against_data,
    plan_batches,
    register_schema,
    to_config,
)
from dist_icm.data.datasets import DataError
from dist_icm.data.pipeline import build_data
from dist_icm.metrics import evaluate_sums, finalize
from dist_icm.mixing import MixContext
from dist_icm.models import build_model
from dist_icm.objectives import Objective
from dist_icm.optim import build_optimizer
from dist_icm.report import Report
from dist_icm.runtime import Runtime
from dist_icm.schedule import lambda_for

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
START_ERRORS = (ConfigError, DataError, ValueError)


def evaluate(model, loader, rt: Runtime) -> dict:
    """Metrics of the whole test set: each rank's shard, sums added over ranks."""
    sums = evaluate_sums(rt.unwrap(model), loader, rt.device)
    sums = dist.all_reduce_sum(sums.to(rt.device), rt.process_group).cpu()
    return {f"test/{k}": v for k, v in finalize(sums).items() if k != "count"}


def run(cfg: Config) -> dict:
    """Train as configured; returns the summary (on every rank)."""
    t_start = time.perf_counter()
    try:
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
        )
        check_against_data(cfg, data.spec.num_classes, data.train_size)
        model = build_model(cfg.model.name, data.spec.num_classes, data.spec.in_channels)
        optimizer = build_optimizer(model, cfg.optim, plan.global_batch)
    except START_ERRORS as e:
        _fail(e)
    group = rt.process_group
    run_dir = Path(dist.broadcast_object(cfg.run_dir or "outputs/run", group))
    ckpt_dir = run_dir / "checkpoints"
    accum = plan.grad_accum
    steps_per_epoch = data.sampler.batches_per_epoch // accum
    if steps_per_epoch < 1:
        _fail(ConfigError(f"data.global_batch={plan.global_batch} leaves no full step per epoch"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda_for(steps_per_epoch, cfg.schedule)
    )
    model, optimizer = rt.prepare(model, optimizer, cfg.model)
    objective = Objective(cfg.loss, class_counts=data.class_counts, process_group=group)
    first_group = rt.rank * plan.per_device // (cfg.loss.group_size or plan.per_device)

    step = 0
    if cfg.resume is not None:
        found = _find_checkpoint(cfg.resume, ckpt_dir)
        if found is not None:
            state = found
            rt.unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rt.load_scaler_state(state.get("scaler"))
            checkpoint.set_rng_state(state["rng"])
            step = state["step"]
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    report = Report(
        run_dir,
        enabled=rt.is_main,
        total_steps=total,
        start_step=step,
        progress=cfg.train.progress,
        tensorboard=cfg.train.tensorboard,
    )
    report.print(
        f"global batch {plan.global_batch} = {rt.world_size} processes x {plan.per_device} "
        f"x {accum} micro-steps; {steps_per_epoch} steps/epoch; run dir {run_dir}"
    )

    def save(step: int) -> None:
        if rt.is_main:
            state = {
                "model": rt.unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": rt.scaler_state(),
                "rng": checkpoint.rng_state(),
                "step": step,
                "config": asdict(cfg),
            }
            checkpoint.save(ckpt_dir, step, state, keep=cfg.train.keep_ckpts)
        dist.barrier(group)

    model.train()
    seen, train_time, metrics = 0, 0.0, {}
    loss_sum, loss_count = torch.zeros((), device=rt.device), 0
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        data.sampler.set_epoch(epoch)
        data.train.set_epoch(epoch)
        data.sampler.set_start_batch(in_epoch * accum)
        batches = iter(data.loader)
        t0 = time.perf_counter()
        for _ in range(in_epoch, steps_per_epoch):
            for m in range(accum):
                x, y = next(batches)
                x, y = rt.to_device(x), y.to(rt.device)
                ctx = MixContext(cfg.train.seed, step * accum + m, cfg.loss.group_size, first_group)
                with rt.no_sync(model, skip=m < accum - 1):
                    loss, _ = objective(model, x, y, ctx)
                    rt.backward(loss / accum)
                loss_sum += loss.detach() / accum
                seen += x.shape[0] * rt.world_size
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_count += 1
            if step % cfg.train.log_every == 0 or step == total:
                mean = dist.all_reduce_mean(loss_sum / loss_count, group).item()
                rate = seen / (train_time + time.perf_counter() - t0)
                lr = scheduler.get_last_lr()[0]
                record = {"step": step, "epoch": step / steps_per_epoch, "train/loss": mean}
                report.log(record | {"train/lr": lr, "train/images_per_sec": rate})
                report.progress(step, {"loss": mean, "lr": lr, "img/s": rate})
                loss_sum.zero_()
                loss_count = 0
            if step == total:
                break
        train_time += time.perf_counter() - t0
        done_epoch = step % steps_per_epoch == 0
        epochs_done = step // steps_per_epoch
        if step == total or (done_epoch and epochs_done % cfg.train.eval_every == 0):
            metrics = evaluate(model, data.test_loader, rt)
            report.log({"step": step, "epoch": step / steps_per_epoch} | metrics)
            model.train()
        if step == total or (done_epoch and epochs_done % cfg.train.ckpt_every == 0):
            save(step)

    summary = {k.removeprefix("test/"): v for k, v in metrics.items()} | {
        "epochs": step / steps_per_epoch,
        "steps": step,
        "global_batch": plan.global_batch,
        "world_size": rt.world_size,
        "images_per_sec": seen / train_time if train_time else 0.0,
        "wall_s": time.perf_counter() - t_start,
    }
    report.summary(summary)
    report.close()
    return summary


def _find_checkpoint(resume: str, ckpt_dir: Path) -> dict | None:
    """``auto``: the newest valid checkpoint in the run dir (None when there is none)."""
    if resume == "auto":
        found = checkpoint.latest(ckpt_dir)
        return None if found is None else found[1]
    if not Path(resume).is_file():
        _fail(ConfigError(f"resume={resume!r}: no such checkpoint file (or use resume=auto)"))
    return checkpoint.load(resume)


def _fail(error: Exception) -> None:
    print(f"dist_icm: error: {str(error).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


_STARTED = False


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def _hydra_main(raw: DictConfig) -> None:
    global _STARTED
    _STARTED = True
    try:
        cfg = to_config(raw)
    except ConfigError as e:
        _fail(e)
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    run(cfg)


def main() -> None:
    """Console entry point. Ranks other than 0 leave no Hydra files behind."""
    if int(os.environ.get("RANK", "0")) != 0:
        if not any(a.startswith("hydra.run.dir=") for a in sys.argv):
            sys.argv.append("hydra.run.dir=.")  # rank 0's run dir is broadcast at start
        sys.argv += [
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]
    register_schema()
    try:
        _hydra_main()
    except SystemExit as e:  # Hydra's own composition errors exit 1 before the job starts
        if e.code == 1 and not _STARTED:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
