"""The training step's model and ICM loss, each replayed from a pair of CUDA graphs (forward and
backward), for a step bound by its host.

A ResNet-18 step at batch 512 in bf16 on an H200 spends about as long queueing its kernels as the
GPU spends running them, so every kernel the loss adds costs its launch in step time. The eager
loss is ~40 small kernels forward and backward (~1 ms of host time there); replayed from CUDA
graphs it is a few copies and two launches (~0.15 ms, what plain cross-entropy's costs).
``python -m dist_icm.bench step`` measures the whole step.

A graph replays the very kernels it captured, so the loss and its gradient are bit for bit the
eager ones (``tests/test_gpu.py``). It is used only where that holds, was tested and pays:

* on CUDA, with one process (no collectives inside the capture), for logits that need a
  gradient;
* for the default loss (``dist_icm.loss.uses_dense_stats``): untiled, S̃ from the dense Ỹ
  (up to 4,096 classes on CUDA; the gather form's backward adds up with atomics, in no fixed
  order), without ``dedup`` (its grouping reads a size back from the device), when the (n x N)
  score block has at most ``MAX_ENTRIES`` entries: a graph's intermediates stay allocated
  between steps (its private memory pool), and a larger block's kernels are no longer small
  anyway;
* for the fused loss (``loss.fused``, ``dist_icm.loss.uses_fused``) at any size: its two
  Triton kernels hold no (n x N) block and add up in a fixed order.

Anything else runs the eager loss. One graph pair is captured per input shape and dtype, at the
first call with it (a few warm-up runs, then the capture). A capture that fails leaves that
shape to the eager loss, with a warning, instead of ending the run: on an H200, one of the GPU
tests' captures once failed (``cudaErrorStreamCaptureInvalidated``; the same test passed in two
other runs) and the next capture in that process succeeded.

``GraphedModel`` does the same for the model's training forward and backward (the bulk of the
step's ~400 launches; ``runtime.cuda_graph``): on CUDA, one process, in training mode, for a model
without dropout, for the shape of the first batch it sees, and while every parameter's gradient
is None (the first micro-step of an accumulating step); anything else runs the model itself.
With both, the ICM step in ``bench step`` queues in 3.7-4.8 ms on that H200, against 9-10 ms of
GPU work.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable

import torch

from dist_icm.loss import uses_dense_stats, uses_fused
from dist_icm.tiled import resolve_tile

MAX_ENTRIES = 2**24  # n·N: 3 float32 blocks of 64 MiB held by the graph's pool at this size

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def eligible(
    *,
    world: int,
    dedup: bool,
    tile: int | str,
    rows: int,
    classes: int,
    itemsize: int = 4,
    fused: bool = False,
) -> bool:
    """Whether a loss of this configuration and size is one that graphs replay (see above);
    ``itemsize``: of the loss's floats (float32, or float64 for float64 logits)."""
    tile = resolve_tile(tile, rows, rows * world, itemsize)
    dtype = torch.float64 if itemsize == 8 else torch.float32
    if world != 1:
        return False
    if uses_fused(dtype, fused=fused, tile=tile, dedup=dedup):
        return True
    dense = uses_dense_stats(classes, tile=tile, dedup=dedup, device_type="cuda")  # graphs: CUDA
    return dense and rows * rows <= MAX_ENTRIES


def model_eligible(*, device: str, world: int, zero_stage: int, compile: bool) -> bool:
    """Whether the trainer calls its model through ``GraphedModel``: on CUDA and one process
    (DDP's backward hooks run collectives, which are not captured), not under DeepSpeed ZeRO (its
    engine owns the parameters' gradients) and not compiled (neither tried with graphs)."""
    return device == "cuda" and world == 1 and not zero_stage and not compile


def usable(
    logits: torch.Tensor, *, world: int, dedup: bool, tile: int | str, fused: bool = False
) -> bool:
    """Whether ``GraphedLoss`` replays graphs for these logits (else it runs the loss eagerly)."""
    rows, classes = logits.shape
    itemsize = 8 if logits.dtype == torch.float64 else 4  # the loss's own dtype
    return (
        logits.is_cuda
        and logits.requires_grad
        and torch.is_grad_enabled()
        and not torch.cuda.is_current_stream_capturing()
        and eligible(
            world=world,
            dedup=dedup,
            tile=tile,
            rows=rows,
            classes=classes,
            itemsize=itemsize,
            fused=fused,
        )
    )


def first_line(err: Exception) -> str:
    """An error's first line (its type's name where it has no message)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _warn_failed(what: str, err: Exception, instead: str) -> None:
    """One warning for a capture that raised: its first line, and what runs instead."""
    why = first_line(err)
    warnings.warn(
        f"capturing {what} as CUDA graphs failed ({why}); {instead} (the same math, more launches)",
        RuntimeWarning,
        stacklevel=4,
    )


class _OwnGradient(torch.autograd.Function):
    """The identity, whose backward hands on a copy of the gradient: the graph's gradient
    buffer is overwritten by the next replay, and a leaf's ``.grad`` would otherwise keep it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


@contextlib.contextmanager
def _no_collection():
    """No Python garbage collection during a capture. A dead reference cycle that holds an
    older CUDA graph (an earlier Objective and its GraphedLoss), collected mid-capture, destroys
    that graph while the stream captures, which invalidates the capture (on an H200 with torch
    2.11, which no longer collects before a capture, the second test's capture failed every
    time). So: collect first, then hold the collector off until the capture is done."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class GraphedLoss:
    """``loss_fn(logits, a, b, lam) -> scalar``, replayed from CUDA graphs where ``usable``.

    ``loss_fn`` must be a pure function of its four tensors (no host reads, no collectives).
    The loss it returns and the gradient it sends back are fresh tensors (copies of the graphs'
    output buffers), so keeping them across steps is safe. Like every graphed callable, a
    call's backward must run before the next call's forward (the trainer's micro-steps do),
    since both replay into the same buffers.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        world: int = 1,
        dedup: bool = False,
        tile: int | str = 0,
        fused: bool = False,
    ):
        self.loss_fn = loss_fn
        self.config = {"world": world, "dedup": dedup, "tile": tile, "fused": fused}
        self._graphs: dict[tuple, Callable | None] = {}  # None: the capture failed

    def __call__(self, logits, a, b, lam) -> torch.Tensor:
        if not usable(logits, **self.config):
            return self.loss_fn(logits, a, b, lam)
        key = (logits.shape, logits.dtype, logits.device, a.dtype, b.dtype, lam.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._capture(logits, a, b, lam)
        graphed = self._graphs[key]
        if graphed is None:
            return self.loss_fn(logits, a, b, lam)
        return graphed(_OwnGradient.apply(logits), a, b, lam).clone()

    def _capture(self, logits, a, b, lam) -> Callable | None:
        # the samples become the graphs' input buffers: copies, not the caller's tensors
        samples = (logits.detach().clone().requires_grad_(), a.clone(), b.clone(), lam.clone())
        try:
            # outside the caller's autocast (make_graphed_callables refuses its weight cache);
            # the loss runs its own math in float32 with autocast off anyway
            with torch.autocast(logits.device.type, enabled=False), _no_collection():
                return torch.cuda.make_graphed_callables(self.loss_fn, samples)
        except RuntimeError as err:  # torch.AcceleratorError included
            _warn_failed(
                "the ICM loss", err, f"logits of shape {tuple(logits.shape)} run the eager loss"
            )
            return None

    @property
    def captured(self) -> int:
        """How many input shapes have graphs."""
        return sum(g is not None for g in self._graphs.values())


def autocast_state() -> tuple[bool, torch.dtype]:
    """Whether CUDA autocast is on here, and its dtype."""
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class _Region(torch.nn.Module):
    """The model under the caller's autocast state, entered inside the capture and without the
    weight cache (``make_graphed_callables`` refuses a cache that could outlive the capture)."""

    def __init__(self, model: torch.nn.Module, enabled: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.enabled, self.dtype = model, enabled, dtype

    def forward(self, x):
        # An autocast region inside the model (Accelerate's forward wrapper) caches its weight
        # casts for as long as any autocast context is open around it, here the whole capture:
        # the captured forward would read the warm-up runs' casts (no cast kernel in the graph),
        # freed afterwards. Tried on an H200: the trainer's loss stuck at 2 ln 64 from step 2.
        torch.clear_autocast_cache()
        try:
            with torch.autocast(
                "cuda", dtype=self.dtype, enabled=self.enabled, cache_enabled=False
            ):
                return self.model(x)
        finally:
            torch.clear_autocast_cache()


class GraphedModel:
    """``model(x)`` for the training step, its forward and backward replayed from CUDA graphs
    where ``usable``; anything else (evaluation, another shape) calls the model itself.

    The graphs replay the kernels they captured: the step's loss, gradients and BatchNorm
    statistics are bit for bit the eager ones (``tests/test_gpu.py``). The capture's warm-up
    runs update the BatchNorm statistics, which are put back afterwards. The parameters and
    buffers must stay the same tensors (``load_state_dict`` copies into them; moving the model
    would not). The output is the graph's buffer, valid until the next call's forward.

    The backward hands autograd the graph's own gradient buffers, and autograd keeps such a
    buffer as a parameter's ``.grad`` where that is None; the next replay overwrites it. So the
    graphs replay only while every ``.grad`` is None (``zero_grad(set_to_none=True)`` before the
    step): with gradient accumulation, the first micro-step of each step. A failed capture
    warns once and leaves the model to run itself, as ``GraphedLoss`` does.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.random = any(
            isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._key: tuple | None = None
        self._graphed: torch.nn.Module | None = None
        self.failed = False  # the capture raised: the model runs itself from then on

    def usable(self, x: torch.Tensor) -> bool:
        """Whether this call replays graphs (its shape aside: see ``__call__``)."""
        return (
            x.is_cuda
            and not self.random
            and self.model.training
            and torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing()
            and not self.failed
            and all(p.grad is None for p in self.params)  # see the class's docstring
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.usable(x):
            return self.model(x)
        key = (x.shape, x.stride(), x.dtype, x.device, autocast_state())
        if self._graphed is None:
            self._graphed, self._key = self._capture(x, *key[-1]), key
            self.failed = self._graphed is None
        if self.failed or key != self._key:  # one graph pair: the training batch's
            return self.model(x)
        return self._graphed(x)

    def _capture(self, x: torch.Tensor, enabled: bool, dtype: torch.dtype):
        region = _Region(self.model, enabled, dtype)
        saved = [b.detach().clone() for b in self.model.buffers()]
        try:
            with torch.autocast("cuda", enabled=False), _no_collection():
                return torch.cuda.make_graphed_callables(region, (x.detach().clone(),))
        except RuntimeError as err:  # torch.AcceleratorError included
            _warn_failed("the model", err, "it runs eagerly")
            return None
        finally:  # the warm-up runs' BatchNorm updates undone
            with torch.no_grad():
                for b, s in zip(self.model.buffers(), saved, strict=True):
                    b.copy_(s)

    @property
    def captured(self) -> bool:
        return self._graphed is not None
