"""``bench step``: a whole training step with the ICM loss against plain cross-entropy.

Same model, same batch, same optimizer (SGD, momentum 0.9, weight decay 5e-4), one process:

* ``ce``: ``cross_entropy(model(x), y)``, backward, optimizer step;
* ``icm``: the trainer's objective (``icm_mixup``: Mixup of the batch with its seeded λ and
  pairing, the model, ``icm_loss`` with ``validate=False``), backward, optimizer step.

On CUDA both replay the model's forward and backward from CUDA graphs, and the ICM loss's too,
as the trainer does (``dist_icm.graphs``; not with ``--compile``); ``ce_eager`` and
``icm_eager`` are the same two steps without any graphs (``icm_eager_over_ce_eager``), and
``icm_fused`` is the ICM step with ``loss.fused`` (``icm_fused_over_ce``: Mixup's blend and the
loss's statistics from Triton kernels) where they can run (CUDA with Triton; Triton's
interpreter in the tests). Should they fail, ``icm_fused_error`` says why, and the other forms
are still timed.

The forms alternate in blocks of ``--steps`` back-to-back steps (``--repeats`` blocks each, after
``--warmup`` steps of each), so machine noise hits both alike and, as in training, the host
queues a step's kernels while the device still runs the previous one; ``icm_over_ce`` is the
ratio of the median times per step. ``queue`` then times single steps from an idle device:
the host's time to queue one (``host_ms``) against the whole step (``step_ms``), which tells
a host-bound step (on a GPU, the two are close) from a device-bound one. ``--precision bf16``
runs the model under autocast (the loss itself always runs in float32); images and weights are
channels-last as in the trainer (``--no-channels-last``: NCHW); ``--compile`` wraps the model in
``torch.compile``. It also times a forward-only evaluation pass and projects the wall time of
``--epochs`` epochs over 50,000 training and 10,000 test images (CIFAR) from these rates: model
compute only, with the data loader assumed to keep up (``bench data`` measures loaders).
``--profile`` then traces a block of each of ``ce``, ``icm`` (and ``icm_fused``) with
``torch.profiler`` and lists where ICM spends more than CE, kernel by kernel (on the CPU:
operator by operator): what to fuse, or to move into the graphs, next.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from dist_icm.fused import unavailable
from dist_icm.graphs import GraphedModel, first_line
from dist_icm.mixing import MixContext
from dist_icm.models import build_model
from dist_icm.objectives import Objective, ObjectiveConfig


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_block(run, first: int, count: int, device: str) -> float:
    """Seconds per step of ``run(i)`` for ``count`` back-to-back steps from ``first``: as in
    training, the host queues the next step while the device runs this one; synced only at the
    block's ends."""
    _sync(device)
    start = time.perf_counter()
    for i in range(first, first + count):
        run(i)
    _sync(device)
    return (time.perf_counter() - start) / count


def queue_time(run, first: int, count: int, device: str) -> dict:
    """Milliseconds to queue one step from an idle device (host) and to finish it (step), the
    medians of ``count`` steps synced one by one: where queueing takes as long as the step,
    the host bounds it and every launch it adds costs step time."""
    host, total = [], []
    for i in range(first, first + count):
        _sync(device)
        start = time.perf_counter()
        run(i)
        host.append(time.perf_counter() - start)
        _sync(device)
        total.append(time.perf_counter() - start)
    return {
        "host_ms": round(statistics.median(host) * 1e3, 3),
        "step_ms": round(statistics.median(total) * 1e3, 3),
    }


def profile_forms(step, forms: list[str], first: int, count: int, device: str, k: int = 15):
    """``--profile``: ``count`` steps of each form under ``torch.profiler``. Per form, the
    device time and the kernels per step (on the CPU: self time and operators), and where ICM
    spends more than CE: the ``k`` kernels (operators) with the most extra time per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    per: dict[str, dict[str, tuple[float, float]]] = {}  # form: name -> (calls, µs) per step
    out: dict[str, object] = {"what": "CUDA kernels" if cuda else "CPU operators (self time)"}
    for form in forms:
        _sync(device)
        with profile(activities=activities) as prof:
            for i in range(first, first + count):
                step(form, i)
            _sync(device)
        events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
        timed = "self_device_time_total" if cuda else "self_cpu_time_total"
        per[form] = {e.key: (e.count / count, getattr(e, timed) / count) for e in events}
        out[form] = {
            "ms_per_step": round(sum(t for _, t in per[form].values()) / 1e3, 3),
            "calls_per_step": round(sum(c for c, _ in per[form].values()), 1),
        }
    base = per.get("ce", {})
    for form in (f for f in forms if f != "ce"):
        extra = {
            name: (calls - base.get(name, (0.0, 0.0))[0], us - base.get(name, (0.0, 0.0))[1])
            for name, (calls, us) in per[form].items()
        }
        top = sorted(extra.items(), key=lambda item: item[1][1], reverse=True)[:k]
        out[f"{form}_over_ce"] = [
            {"name": name[:120], "extra_calls": round(c, 1), "extra_us": round(us, 1)}
            for name, (c, us) in top
        ]
    return out


def bench_step(
    model_name: str,
    batch: int,
    classes: int,
    image: int,
    steps: int,
    repeats: int,
    warmup: int,
    device: str,
    precision: str,
    channels_last: bool,
    compile_model: bool = False,
    train_images: int = 50_000,
    test_images: int = 10_000,
    epochs: int = 200,
    profile: bool = False,
) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image, image, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    icm = ObjectiveConfig(name="icm_mixup")
    objectives = {"ce": None, "icm": Objective(icm, validate=False)}
    cuda = device.startswith("cuda")
    if cuda:  # the same two steps without CUDA graphs (graphs.py), alongside
        eager = ObjectiveConfig(name="icm_mixup", cuda_graph=False)
        objectives.update(ce_eager=None, icm_eager=Objective(eager, validate=False))
    if unavailable(device) is None:  # the Triton kernels of dist_icm.fused (or the interpreter)
        fused = ObjectiveConfig(name="icm_mixup", fused=True)
        objectives["icm_fused"] = Objective(fused, validate=False)
    models, optims = {}, {}
    for k in objectives:
        torch.manual_seed(0)
        models[k] = build_model(model_name, classes, 3).to(device, memory_format=fmt)
        optims[k] = torch.optim.SGD(
            models[k].parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    calls = {
        k: torch.compile(m) if compile_model else m if k.endswith("_eager") else GraphedModel(m)
        for k, m in models.items()
    }

    def step(k: str, i: int) -> None:
        model, opt = calls[k], optims[k]
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            if objectives[k] is None:
                loss = F.cross_entropy(model(x).float(), y)
            else:
                loss, _ = objectives[k](model, x, y, MixContext(seed=0, step=i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fused_error = None

    def block(k: str, first: int, count: int) -> float | None:
        """Seconds per step of ``count`` steps of form ``k``; None where the fused form failed
        (then dropped, why in ``fused_error``: the other forms' figures still come out)."""
        nonlocal fused_error
        try:
            return time_block(lambda i: step(k, i), first, count, device)
        except Exception as err:  # only the fused form's, whose kernels no GPU has run yet
            if k != "icm_fused":
                raise
            fused_error = first_line(err)[:300]
            del objectives[k]
            return None

    if warmup:  # --warmup 0: straight to the timed blocks
        for k in list(objectives):
            block(k, 0, warmup)
    times: dict[str, list[float]] = {k: [] for k in objectives}
    for r in range(repeats):
        for k in list(objectives):
            seconds = block(k, warmup + r * steps, steps)
            if seconds is None:
                del times[k]
            else:
                times[k].append(seconds)
    med = {k: statistics.median(t) for k, t in times.items()}
    host = {k: queue_time(lambda i, k=k: step(k, i), warmup, steps, device) for k in objectives}

    def evaluate() -> float:  # forward only, as the trainer's evaluation
        _sync(device)
        start = time.perf_counter()
        with (
            torch.no_grad(),
            torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None),
        ):
            calls["icm"](x)  # no gradient: GraphedModel calls the model itself
        _sync(device)
        return time.perf_counter() - start

    traced = {}
    if profile:  # after the timing, so the profiler's overhead never reaches the figures
        forms = [k for k in ("ce", "icm", "icm_fused") if k in objectives]
        first = warmup + repeats * steps
        traced = {"profile": profile_forms(step, forms, first, steps, device)}
    for _ in range(warmup):
        evaluate()
    eval_s = statistics.median(evaluate() for _ in range(max(steps, 3)))
    epoch_s = train_images / (batch / med["icm"]) + test_images / (batch / eval_s)
    return {
        "bench": "step",
        "model": model_name,
        "batch": batch,
        "classes": classes,
        "image": image,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "precision": precision,
        "channels_last": channels_last,
        "steps": steps,
        "repeats": repeats,
        "ce_s": round(med["ce"], 4),
        "icm_s": round(med["icm"], 4),
        "ce_images_per_s": round(batch / med["ce"], 1),
        "icm_images_per_s": round(batch / med["icm"], 1),
        "icm_over_ce": round(med["icm"] / med["ce"], 4),
        "compile": compile_model,
        # whether both forms' model calls did replay graphs (a capture may fail and fall back)
        "cuda_graphs": all(getattr(calls[k], "captured", False) for k in ("ce", "icm")),
        "queue": host,  # per form: host time to queue one step vs the step, synced alone
        **(
            {
                "ce_eager_s": round(med["ce_eager"], 4),
                "icm_eager_s": round(med["icm_eager"], 4),
                "icm_eager_over_ce_eager": round(med["icm_eager"] / med["ce_eager"], 4),
                "ce_eager_over_ce": round(med["ce_eager"] / med["ce"], 4),  # graphs' speed-up
            }
            if cuda
            else {}
        ),
        **(
            {
                "icm_fused_s": round(med["icm_fused"], 4),
                "icm_fused_over_ce": round(med["icm_fused"] / med["ce"], 4),
            }
            if "icm_fused" in med
            else {}
        ),
        **({"icm_fused_error": fused_error} if fused_error else {}),
        "eval_images_per_s": round(batch / eval_s, 1),
        # model compute only (no data loading): train + test images per epoch, at these rates
        "epoch_s": round(epoch_s, 2),
        f"projected_{epochs}_epochs_h": round(epochs * epoch_s / 3600, 3),
        **traced,
    }
