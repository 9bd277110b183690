"""Benchmarks that print figures (JSON), measured side by side in one run.

    python -m dist_icm.bench loss [--batch 4096] [--classes 10 100 1000] [--repeats 5]

``loss``: forward + backward time of the ICM loss with S̃ = S Ỹᵀ computed as a dense matmul and
as two column gathers, at each class count; the two forms alternate inside every repeat so that
machine noise hits both alike, and the medians and their ratio are printed. This is the
measurement behind ``dist_icm.loss.DENSE_MAX_CLASSES``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dist_icm import loss as L


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dist_icm.bench", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("loss", help="ICM loss: dense matmul vs column gathers")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 300, 1000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.what == "loss":
        print(json.dumps(bench_loss(args.batch, args.classes, args.repeats, args.device)))


if __name__ == "__main__":
    main()
