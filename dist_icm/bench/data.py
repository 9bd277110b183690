"""``bench data``: images/s of the trainer's two loaders on a JPEG ImageFolder tree.

``data.loader=torch`` (DataLoader processes) against ``data.loader=ffcv`` (decoding threads), same
augmentation, batch and workers, after a warm-up pass (page cache, ffcv's JIT); the first batch
of each pass (worker start-up) is not counted. ``--step MODEL`` also times one training step
(forward, backward, SGD) fed by each loader and by one synthetic batch: ``fed`` = synthetic step
time / real step time.

Without ``--root`` it uses the CIFAR-10 tree in ``$DIST_ICM_CACHE/cifar10-jpeg``, unpacking it
there from ``../shared/data/cifar10-jpeg.tar.xz`` (beside the checkout) the first time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from dist_icm.data.datasets import cache_root
from dist_icm.data.unpack import unpack_once

ARCHIVE = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.xz"


def stop(line: str) -> NoReturn:
    """Bad input to a bench: ``line`` on stderr, exit code 2."""
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(2)


def find_cifar10(root: str | None, bench: str = "data") -> str:
    """The JPEG tree to read: ``root``, or the cached CIFAR-10 tree (unpacked on first use).
    ``bench``: the subcommand asking, which its lines name."""
    who = f"python -m dist_icm.bench {bench}"
    if root is not None:
        if not Path(root, "train").is_dir():
            stop(
                f"{who}: error: --root {root} holds no train/ folder: "
                "point it at a JPEG ImageFolder tree"
            )
        return root
    tree = cache_root() / "cifar10-jpeg" / "cifar10"
    if not (tree / "train").is_dir():
        if not ARCHIVE.is_file():
            stop(
                f"{who}: error: no CIFAR-10 tree in {tree.parent} and no archive at {ARCHIVE}: "
                "pass --root DIR (a JPEG ImageFolder tree with train/ and test/)"
            )
        print(f"{who}: unpacking {ARCHIVE} into {tree.parent} (once)", file=sys.stderr)
        unpack_once(ARCHIVE, tree.parent)
    return str(tree)


def _data_pass(bundle, batches: int, epoch: int, step=None) -> float:
    """Seconds per batch over ``batches`` batches after the first (each running ``step``)."""
    bundle.sampler.set_epoch(epoch)
    bundle.train.set_epoch(epoch)
    it = iter(bundle.loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
        if step is not None:
            step(x, y)
    seconds = time.perf_counter() - start
    del it  # stops the ffcv thread / DataLoader workers before the next pass
    return seconds / batches


def _sgd_step(model_name: str, spec, device: str):
    from dist_icm.models import build_model

    model = build_model(model_name, spec.num_classes, spec.in_channels).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(x, y) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def bench_data(
    root: str, batch: int, workers: int, batches: int, repeats: int, step: str | None, mode: str
):
    from dist_icm.config import DataConfig
    from dist_icm.data.pipeline import build_data

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bundles, built = {}, {}
    for loader in ("torch", "ffcv"):
        cfg = DataConfig(
            name="imagefolder",
            root=root,
            loader=loader,
            augment="cifar",
            global_batch=batch,
            num_workers=workers,
            ffcv_write_mode=mode,
        )
        start = time.perf_counter()
        dev = {"device": device} if loader == "ffcv" else {}
        bundles[loader] = build_data(cfg, seed=0, micro_global=batch, rank=0, world_size=1, **dev)
        built[loader] = round(time.perf_counter() - start, 2)
        per_epoch = bundles[loader].sampler.batches_per_epoch
        if per_epoch < 3:  # before the ffcv file is written: the first batch is not timed
            stop(
                f"python -m dist_icm.bench data: error: --root {root} holds {per_epoch} "
                f"batch{'es' * (per_epoch != 1)} of --batch {batch} per epoch; timing needs 3 "
                "(the first untimed): pass a smaller --batch or a larger tree"
            )
    n = min(batches, bundles["torch"].sampler.batches_per_epoch - 1)
    warm = {k: _data_pass(b, min(n, 20), 0) for k, b in bundles.items()}
    times: dict[str, list[float]] = {k: [] for k in bundles}
    for r in range(repeats):  # alternate, so that machine noise hits both alike
        for k, b in bundles.items():
            times[k].append(_data_pass(b, n, r + 1))
    rate = {k: round(batch / statistics.median(t)) for k, t in times.items()}
    out = {
        "bench": "data",
        "root": root,
        "batch": batch,
        "workers": workers,
        "batches": n,
        "repeats": repeats,
        "augment": "cifar",
        "ffcv_write_mode": mode,
        "cpus": len(os.sched_getaffinity(0)),
        "build_s": built,
        "warmup_s_per_batch": {k: round(v, 4) for k, v in warm.items()},
        "torch_images_per_s": rate["torch"],
        "ffcv_images_per_s": rate["ffcv"],
        "ffcv_over_torch": round(rate["ffcv"] / rate["torch"], 2),
    }
    if step is not None:
        run = _sgd_step(step, bundles["torch"].spec, device)
        x, y = next(iter(bundles["ffcv"].loader))
        x, y = x.clone(), y.clone()
        run(x, y)  # warm-up
        synthetic = statistics.median([_time_steps(run, x, y, min(n, 30)) for _ in range(repeats)])
        steps = {k: _data_pass(b, min(n, 30), 9, run) for k, b in bundles.items()}
        out["step"] = {
            "model": step,
            "device": device,
            "synthetic_s": round(synthetic, 4),
            **{f"{k}_s": round(v, 4) for k, v in steps.items()},
            **{f"{k}_fed": round(synthetic / v, 3) for k, v in steps.items()},
        }
    return out


def _time_steps(run, x, y, k: int) -> float:
    start = time.perf_counter()
    for _ in range(k):
        run(x, y)
    return (time.perf_counter() - start) / k
