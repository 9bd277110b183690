"""``bench loss``: the ICM loss's forward + backward time and extra peak memory against the
global batch N (one process, n = N), in four forms side by side (the fourth where it can run):

* ``dense``: S̃ = S Ỹᵀ whole, as a matmul with a dense (N x C) Ỹ (``method=matmul``, tile 0);
* ``gather``: S̃ whole, as two column gathers (``method=gather``, tile 0);
* ``tiled``: T x T tiles, recomputed in the backward (``tile=T``, in the trainer's form:
  matmul tiles up to 900 classes, 4,096 on CUDA, gather tiles above);
* ``fused``: S̃'s statistics from the Triton kernels of ``dist_icm.fused`` (``fused=True``),
  where they can run (CUDA with Triton; the interpreter in the tests), not for float64 (which
  they do not compute). Should they fail, ``fused_error`` says why and the rest still runs.

Every repeat runs the forms one after the other, so machine noise hits them alike; times are
medians. Extra peak memory is what one forward + backward adds on top of its inputs: on CUDA
``max_memory_allocated``, on the CPU the process's peak resident size (VmHWM, reset through
/proc/self/clear_refs before each call). The untiled forms are skipped above ``--max-untiled``
(their n x N blocks would not fit).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from dist_icm.fused import unavailable
from dist_icm.graphs import first_line
from dist_icm.loss import icm_loss

FORMS = {"dense": {"method": "matmul"}, "gather": {"method": "gather"}, "tiled": {}}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run(logits, a, b, lam, kw: dict) -> tuple[float, int]:
    """Seconds and extra peak bytes of one forward + backward."""
    x = logits.detach().clone().requires_grad_()
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        base = _kib("VmRSS") * 1024
    start = time.perf_counter()
    icm_loss(x, a, b, lam, validate=False, **kw).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _kib("VmHWM") * 1024
    return seconds, max(peak - base, 0)


def bench_loss(
    sizes: list[int],
    classes: list[int],
    tile: int,
    repeats: int,
    device: str,
    dtype: str,
    max_untiled: int,
) -> dict:
    gen = torch.Generator().manual_seed(0)
    fused = dtype != "float64" and unavailable(device) is None
    fused_error = None
    rows = []
    for c in classes:
        for n in sizes:
            logits = (torch.randn(n, c, generator=gen) * 3).to(device, getattr(torch, dtype))
            a = torch.randint(0, c, (n,), generator=gen).to(device)
            b = torch.randint(0, c, (n,), generator=gen).to(device)
            lam = torch.rand(n, generator=gen).to(device)
            forms = {k: v for k, v in FORMS.items() if k == "tiled" or n <= max_untiled}
            kws = {k: {**v, "tile": tile if k == "tiled" else 0} for k, v in forms.items()}
            if fused:
                kws["fused"] = {"fused": True}
            for k, kw in list(kws.items()):  # warm-up (and first-touch of the allocator)
                try:
                    _run(logits, a, b, lam, kw)
                except Exception as err:  # only the fused form's, whose kernels no GPU has run
                    if k != "fused":
                        raise
                    fused_error = first_line(err)[:300]
                    fused = False
                    del kws[k]
            runs: dict[str, list] = {k: [] for k in kws}
            for _ in range(repeats):
                for k, kw in kws.items():
                    runs[k].append(_run(logits, a, b, lam, kw))
            row = {"classes": c, "N": n}
            for k, r in runs.items():
                row[f"{k}_s"] = round(statistics.median(s for s, _ in r), 4)
                row[f"{k}_mib"] = round(statistics.median(m for _, m in r) / 2**20, 1)
            if "dense" in runs:
                row["tiled_over_dense_s"] = round(row["tiled_s"] / row["dense_s"], 3)
                row["tiled_over_dense_mib"] = round(
                    row["tiled_mib"] / max(row["dense_mib"], 0.1), 4
                )
            if "dense" in runs and "fused" in runs:
                row["fused_over_dense_s"] = round(row["fused_s"] / row["dense_s"], 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress
    return {
        "bench": "loss",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "tile": tile,
        "repeats": repeats,
        "rows": rows,
        **({"fused_error": fused_error} if fused_error else {}),
    }
