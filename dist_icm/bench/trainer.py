"""``bench trainer``: the trainer's own step against a bare loop of the same work.

Both train the same model (same initial weights) with the same SGD settings and the ICM loss on
the same real CIFAR-10 JPEG batches, taken from the trainer's own loader before timing (so
loading is not counted; ``bench data`` measures it): ``--steps`` of them, or the epoch's all
where it holds fewer (``batches``), taken in turn:

* ``trainer``: ``dist_icm.trainer.train_step`` on the job ``dist_icm.job.setup`` builds from the
  config (``experiment=cifar10_jpeg`` with the model, batch and runtime overrides given);
* ``bare``: ``mixup`` -> ``model`` -> ``icm_loss`` -> ``backward`` -> ``SGD.step``, no wrapper
  and, on CUDA, no CUDA graphs (pass ``runtime.cuda_graph=false loss.cuda_graph=false`` to
  compare like with like there).

They alternate in blocks of back-to-back steps; ``trainer_over_bare`` is the ratio of the median
times per step. ``--profile`` adds each one's top operators by self CPU time (torch.profiler)
to the JSON, to see where a difference comes from.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from pathlib import Path

import torch

from dist_icm.bench.step import time_block

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _job(root: str, overrides: list[str], run_dir: str):
    from hydra import compose, initialize_config_dir

    from dist_icm import job
    from dist_icm.compose import register_schema, to_config

    register_schema()
    base = ["experiment=cifar10_jpeg", f"data.root={root}", "data.num_workers=0"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = to_config(compose("train", overrides=base + overrides))
    cfg.run_dir = run_dir
    return job.setup(cfg)


def _bare(job):
    """The same model, optimizer settings and loss without any of the trainer's machinery."""
    from dist_icm import streams
    from dist_icm.loss import icm_loss
    from dist_icm.mixing import MixContext, mixup

    cfg, device = job.cfg, job.rt.device
    streams.seed_torch("init", cfg.train.seed)
    model = job.fresh_model().to(device)
    fmt = torch.channels_last if cfg.runtime.nhwc else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    alpha = cfg.loss.mix_alpha
    loss_kw = {"axis": cfg.loss.axis, "dedup": cfg.loss.dedup, "tile": cfg.loss.tile}
    loss_kw["validate"] = False
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.runtime.precision)

    def step(batches, i: int) -> None:
        x, y = next(batches)
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            mixed = mixup(x, y, alpha=alpha, ctx=MixContext(cfg.train.seed, i))
            logits = model(mixed.x)
            loss = icm_loss(logits, mixed.a, mixed.b, mixed.lam, **loss_kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _top_ops(fn, k: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)}
        for e in rows[:k]
    ]


def bench_trainer(root: str, overrides: list[str], steps: int, repeats: int, profile: bool):
    from dist_icm import trainer

    with tempfile.TemporaryDirectory() as run_dir:
        job = _job(root, overrides, run_dir)
        if job.plan.grad_accum != 1 or job.rt.world_size != 1:
            raise SystemExit("bench trainer: one process, no accumulation")
        job.data.sampler.set_epoch(0)
        job.data.train.set_epoch(0)
        loader = iter(job.data.loader)
        batches = list(itertools.islice(loader, steps))  # fewer where an epoch holds fewer
        del loader
        bare = _bare(job)

        def one(i: int):  # the i-th step's batch, as an iterator (the batches taken, in turn)
            return iter(batches[i % len(batches) : i % len(batches) + 1])

        contestants = {
            "trainer": lambda i: trainer.train_step(job, one(i), i),
            "bare": lambda i: bare(one(i), i),
        }
        device = job.rt.device

        def block(k: str, first: int) -> float:
            return time_block(contestants[k], first, steps, str(device))

        job.model.train()
        for k in contestants:
            block(k, 0)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in contestants}
        for r in range(repeats):
            for k in contestants:
                times[k].append(block(k, (r + 1) * steps))
        med = {k: statistics.median(t) for k, t in times.items()}
        out = {
            "bench": "trainer",
            "overrides": overrides,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "batch": job.plan.global_batch,
            "steps": steps,
            "batches": len(batches),  # distinct ones, taken in turn by the steps of a block
            "repeats": repeats,
            "trainer_s": round(med["trainer"], 4),
            "bare_s": round(med["bare"], 4),
            "trainer_over_bare": round(med["trainer"] / med["bare"], 4),
        }
        if profile:
            out["top_ops"] = {k: _top_ops(lambda fn=fn: fn(0)) for k, fn in contestants.items()}
        return out
