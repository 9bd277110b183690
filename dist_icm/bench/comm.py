"""``bench comm``: what the global-batch loss sends, counted, and what it costs over gloo.

For each world size W (real gloo process groups on this machine, one thread each) and each
gather mode, every rank computes the ICM loss on its n = N / W rows and back-propagates it,
under ``dist.count_bytes()``: the JSON gives the bytes each rank sends per *global* sample
per step (forward + backward, by collective) and the median time of a forward + backward.
The counts are exact for the calls made; the per-call volume is the ring algorithm's
(see ``dist_icm.dist``), and ``*_limit`` gives its value as W grows (the (W-1)/W factors -> 1).
The loss runs with ``validate=False``, as in the trainer.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dist_icm import dist
from dist_icm.loss import icm_loss

MODES = (("triples", False), ("triples", True), ("scores", False))


def _name(gather: str, dedup: bool) -> str:
    return gather + ("_dedup" if dedup else "")


def _rank_main(rank, world, folder, batch, classes, repeats):
    torch.set_num_threads(1)
    group, n = dist.start_gloo(rank, world, f"file://{folder}/store"), batch // world
    gen = torch.Generator().manual_seed(rank)
    logits = torch.randn(n, classes, generator=gen) * 3
    a = torch.randint(0, classes, (n,), generator=gen)
    b = torch.randint(0, classes, (n,), generator=gen)
    lam = torch.full((n,), 0.3)
    out = {}
    for gather, dedup in MODES:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            x = logits.clone().requires_grad_()
            dist.barrier(group)
            with dist.count_bytes() as sent:
                start = time.perf_counter()
                icm_loss(
                    x, a, b, lam, process_group=group, gather=gather, dedup=dedup, validate=False
                ).backward()
                times.append(time.perf_counter() - start)
        out[_name(gather, dedup)] = {
            "bytes_per_sample": {k: v / batch for k, v in sent.items()},
            "total": sum(sent.values()) / batch,
            "s": statistics.median(times[1:]),
        }
    if rank == 0:
        torch.save(out, Path(folder) / "out.pt")
    dist.shutdown()


def bench_comm(batch: int, classes: int, worlds: list[int], repeats: int) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {
        "bench": "comm",
        "batch": batch,
        "classes": classes,
        "backend": "gloo",
        "repeats": repeats,
        "worlds": {},
    }
    for world in worlds:
        if batch % world:
            raise ValueError(f"--batch {batch} is not divisible by world size {world}")
        with tempfile.TemporaryDirectory() as folder:
            mp.start_processes(
                _rank_main,
                args=(world, folder, batch, classes, repeats),
                nprocs=world,
                start_method="spawn",
            )
            out = torch.load(Path(folder) / "out.pt")
        result["worlds"][world] = {
            k: {
                "bytes_per_sample": {c: round(v, 3) for c, v in m["bytes_per_sample"].items()},
                "total": round(m["total"], 3),
                "fwd_bwd_s": round(m["s"], 4),
            }
            for k, m in out.items()
        }
    # the figures the issue asks for, at the largest world measured and in the limit W -> inf
    w = max(worlds)
    trip, scores = result["worlds"][w]["triples"]["total"], result["worlds"][w]["scores"]["total"]
    result["triples_bytes_per_sample"] = trip
    result["scores_bytes_per_sample"] = scores
    result["at_world"] = w
    result["triples_bytes_per_sample_limit"] = round(trip * w / (w - 1), 3)
    result["scores_bytes_per_sample_limit"] = round(scores * w / (w - 1), 3)
    return result
