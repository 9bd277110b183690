"""Benchmarks that print figures (JSON), measured side by side in one run.

    python -m dist_icm.bench loss [--batch 4096] [--classes 10 100 1000] [--repeats 5]

``loss``: forward + backward time of the ICM loss with S̃ = S Ỹᵀ computed as a dense matmul and
as two column gathers, at each class count; the two forms alternate inside every repeat so that
machine noise hits both alike, and the medians and their ratio are printed. This is the
measurement behind ``dist_icm.loss.DENSE_MAX_CLASSES``.

    python -m dist_icm.bench data [--root CIFAR10_TREE] [--batch 256] [--workers 2] [--step MODEL]

``data``: images/s of the trainer's two loaders (``data.loader=torch``: DataLoader processes;
``data.loader=ffcv``: decoding threads) on a JPEG ImageFolder tree (default: the CIFAR-10 tree
the tests unpack into ``$DIST_ICM_CACHE/cifar10-jpeg``), same augmentation, batch and workers,
after a warm-up pass (page cache, ffcv's JIT); the first batch of each pass (worker start-up)
is not counted. ``--step MODEL`` also times one training step (forward, backward, SGD) fed by
each loader and by one synthetic batch: ``fed`` = synthetic step time / real step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dist_icm import loss as L
from dist_icm.data.datasets import cache_root


def _time_loss(logits, a, b, lam, method: str) -> float:
    logits = logits.detach().requires_grad_()
    start = time.perf_counter()
    L.icm_loss(logits, a, b, lam, method=method).backward()
    if logits.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_loss(batch: int, classes: list[int], repeats: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for c in classes:
        logits = torch.randn(batch, c, generator=gen).to(device)
        a = torch.randint(0, c, (batch,), generator=gen).to(device)
        b = torch.randint(0, c, (batch,), generator=gen).to(device)
        lam = torch.rand(batch, generator=gen).to(device)
        times: dict[str, list[float]] = {"matmul": [], "gather": []}
        for method in times:  # warm-up
            _time_loss(logits, a, b, lam, method)
        for _ in range(repeats):
            for method in times:
                times[method].append(_time_loss(logits, a, b, lam, method))
        med = {m: statistics.median(t) for m, t in times.items()}
        rows.append(
            {
                "classes": c,
                "matmul_s": round(med["matmul"], 4),
                "gather_s": round(med["gather"], 4),
                "gather_over_matmul": round(med["gather"] / med["matmul"], 3),
                "auto_picks": "matmul" if c <= L.DENSE_MAX_CLASSES else "gather",
            }
        )
    return {
        "bench": "loss",
        "batch": batch,
        "device": device,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "rows": rows,
    }


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dist_icm.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("loss", help="ICM loss: dense matmul vs column gathers")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 300, 1000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d = sub.add_parser("data", help="images/s: ffcv loader vs torch DataLoader")
    d.add_argument("--root", default=str(cache_root() / "cifar10-jpeg" / "cifar10"))
    d.add_argument("--batch", type=int, default=256)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--batches", type=int, default=150)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--step", metavar="MODEL", help="also time training steps of this model")
    d.add_argument("--write-mode", default="auto", choices=("auto", "raw", "jpg"), help="ffcv")
    args = parser.parse_args(argv)
    if args.what == "loss":
        print(json.dumps(bench_loss(args.batch, args.classes, args.repeats, args.device)))
    elif args.what == "data":
        if not Path(args.root, "train").is_dir():
            parser.error(f"--root {args.root} holds no train/ folder: point it at a JPEG tree")
        out = bench_data(
            args.root,
            args.batch,
            args.workers,
            args.batches,
            args.repeats,
            args.step,
            args.write_mode,
        )
        print(json.dumps(out))


if __name__ == "__main__":
    main()
