"""The job: everything a run needs, built and checked against each other before any training.

:func:`setup` turns a validated :class:`~dist_icm.config.Config` into a :class:`Job`: the
runtime (device, process group, precision), the batch plan, the data (fetched by rank 0
first), the model (the same initial weights on every rank), optimizer, schedule and objective.
Problems found here raise :class:`~dist_icm.config.ConfigError` (or the data's and the
runtime's own errors) before a step is taken; :mod:`dist_icm.trainer` runs the job.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_icm import dist, streams
from dist_icm.config import BatchPlan, Config, ConfigError, check_against_data, plan_batches
from dist_icm.data.bundle import DataBundle, augment_mode, check_same_data, fingerprint
from dist_icm.data.pipeline import build_data
from dist_icm.fused import unavailable as fused_unavailable
from dist_icm.graphs import GraphedModel, model_eligible
from dist_icm.models import build_model, check_input
from dist_icm.norm import convert_ghost_bn, count_batch_norms
from dist_icm.objectives import SCOPED, Objective, unused_options
from dist_icm.optim import OptimConfig, build_optimizer
from dist_icm.runtime import Runtime
from dist_icm.schedule import lambda_for, scaled_lr, unread_settings
from dist_icm.tiled import resolve_tile


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
    fresh_model: Callable[[], torch.nn.Module]  # the architecture, new (ZeRO evaluation)
    # the training step's model call: the model, or its CUDA graphs (runtime.cuda_graph)
    forward: Callable[[torch.Tensor], torch.Tensor]
    control: dist.Group = None  # a gloo group for the stop flags (dist_icm.preempt)
    notes: list[str] = field(default_factory=list)  # start-up lines for the run's report
    # what summary.json records of how the run was asked for (the entry point's overrides)
    labels: dict = field(default_factory=dict)

    @property
    def peak_lr(self) -> float:
        """The optimizer's peak lr, after optim.lr_scaling (as build_optimizer sets it)."""
        o = self.cfg.optim
        return scaled_lr(o.lr, self.plan.global_batch, o.reference_batch, o.lr_scaling)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, as torch's DataLoader counts)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def setup(cfg: Config) -> Job:
    """Runtime, data, model, optimizer, schedule and objective, validated against each other."""
    rt = Runtime(cfg.runtime)
    group = rt.process_group

    def node_checks() -> None:  # this rank's device and software: each node's own
        rt.check(cfg.model)
        if cfg.loss.icm and cfg.loss.fused and (why := fused_unavailable(rt.device)):
            raise ConfigError(why)

    dist.agree(node_checks, group)
    plan = plan_batches(cfg, rt.world_size)

    notes = []
    data_cfg, cores = cfg.data, available_cores()
    if cfg.runtime.threads is not None and cfg.runtime.threads > cores:  # as the workers below
        torch.set_num_threads(cores)
        notes.append(f"runtime.threads={cfg.runtime.threads}: {cores} cores here, {cores} threads")
    if cfg.data.num_workers > cores:  # more would only contend (torch workers, FFCV threads)
        data_cfg = dataclasses.replace(cfg.data, num_workers=cores)
        notes.append(
            f"data.num_workers={cfg.data.num_workers}: {cores} cores here, {cores} workers"
        )

    def data():  # rank 0 first: a download (or .beton write) happens once, the others reuse it
        return build_data(
            data_cfg,
            seed=cfg.train.seed,
            micro_global=plan.micro_global,
            grad_accum=plan.grad_accum,
            rank=rt.rank,
            world_size=rt.world_size,
            device=rt.device,
            channels_last=cfg.runtime.nhwc,
        )

    data = dist.rank_zero_first(data, group)
    notes += [f"data: {note}" for note in data.spec.notes]  # e.g. images of several sizes
    check_same_data(dist.all_gather_object(fingerprint(data), group))  # one data set, each copy
    check_against_data(cfg, data.spec.num_classes, data.train_size)
    if data_cfg.loader == "ffcv" and augment_mode(data_cfg.augment, data.spec) == "imagenet":
        notes.append(
            "data.augment=imagenet with data.loader=ffcv: FFCV draws its random-resized crops "
            "from an unseeded generator, so this run will not repeat, nor resume, bit for bit "
            "(data.loader=torch does)"
        )
    spe = data.sampler.batches_per_epoch // plan.grad_accum  # optimizer steps per epoch
    if spe < 1:
        raise ConfigError(f"data.global_batch={plan.global_batch} leaves no full step per epoch")

    def fresh_model() -> torch.nn.Module:
        model = build_model(
            cfg.model.name, data.spec.num_classes, data.spec.in_channels, cfg.model.dropout
        )
        bn_group = cfg.model.bn_group
        return model if bn_group is None else convert_ghost_bn(model, bn_group)

    streams.seed_torch("init", cfg.train.seed)  # the same initial weights on every rank
    model = fresh_model()
    try:
        bn_batch = cfg.model.bn_group or (
            plan.micro_global if cfg.model.sync_bn and rt.world_size > 1 else plan.per_device
        )  # the images a BatchNorm layer normalises over in training
        check_input(model, cfg.model.name, data.spec.in_channels, data.spec.image_size, bn_batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.bn_group is not None and not count_batch_norms(model):
        notes.append(f"model.bn_group={cfg.model.bn_group}: {cfg.model.name} has no BatchNorm")
    for key, value in unused_options(dataclasses.asdict(cfg.loss)).items():  # a sweep's cell
        shown = str(value).lower() if isinstance(value, bool) else value  # as Hydra writes it
        users = ", ".join(SCOPED[key])
        notes.append(f"loss.{key}={shown}: loss.name={cfg.loss.name} does not use it ({users} do)")
    for setting, why in unread_settings(cfg.schedule).items():
        notes.append(f"schedule.{setting}: {why}")
    if cfg.optim.lr_scaling == "none" and cfg.optim.reference_batch != OptimConfig.reference_batch:
        notes.append(
            f"optim.reference_batch={cfg.optim.reference_batch}: optim.lr_scaling=none does not "
            "use it"
        )
    if cfg.loss.icm and cfg.loss.tile == "auto":  # what it picks for a micro-step's S̃ block
        n, big = plan.per_device, plan.micro_global
        tile = resolve_tile("auto", n, big, 4)
        notes.append(f"loss.tile=auto: {f'tiles of {tile}' if tile else 'untiled'} ({n} x {big})")
    if cfg.loss.icm and cfg.loss.fused and rt.device.type != "cuda":
        notes.append("loss.fused=true off CUDA: Triton's interpreter runs the kernels (slow)")
    optimizer = build_optimizer(model, cfg.optim, plan.global_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda_for(spe, cfg.schedule))
    model, optimizer = rt.prepare(model, optimizer, cfg.model, plan, grad_clip=cfg.optim.grad_clip)
    objective = Objective(
        cfg.loss, class_counts=data.class_counts, process_group=group, validate=False
    )
    total = cfg.train.epochs * spe
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    run_dir = Path(dist.broadcast_object(cfg.run_dir or "outputs/run", group))
    parts = (cfg, rt, plan, data, model, optimizer, scheduler, objective, spe, total, run_dir)
    control = dist.control_group(cfg.runtime.timeout_s)
    r = cfg.runtime
    where = {"device": rt.device.type, "world": rt.world_size, "zero_stage": r.zero_stage}
    graphs = r.cuda_graph and model_eligible(**where, compile=r.compile)
    forward = GraphedModel(model) if graphs else model
    return Job(*parts, fresh_model, forward, control=control, notes=notes)
