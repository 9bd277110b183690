"""The one module that talks to ``torch.distributed``.

It holds the process-group facts the rest of the code asks for (rank, world size) and the few
collectives the global-batch loss needs (``all_gather_nograd``, ``all_to_all``, ``all_gather``)
and the trainer's (the sums of the evaluation's metrics, the non-finite check's maximum), each
with the autograd rule that makes the gradient exactly the one a single process would get on
the whole batch:

* ``all_gather(x)`` with gradient: forward concatenates every rank's ``x`` in rank order;
  backward sums, over ranks, the gradient that reached each rank's copy and hands the owner its
  slice (a reduce-scatter: a row's gradient flows back to the process that computed it).
* ``all_to_all(x)`` with gradient: rank q's k-th block of rows goes to rank k; backward sends
  every gradient block back the same way (the exchange is its own transpose).
* ``all_reduce_sum(x)`` with gradient: forward sums over ranks; backward sums the incoming
  gradients over ranks (every rank's loss depends on the sum).
* ``all_reduce_max(x)`` and ``all_gather_nograd(x)``: no gradient (a flag any rank may raise,
  and integer data such as the mixing triples).

And the few things ranks must agree on, decided once and shared: ``broadcast_object`` (rank 0's
choice), ``all_gather_object`` (every rank's outcome, to fail together), ``agree`` (a check
each rank makes for itself, failed by one rank: that rank's error on every rank),
``rank_zero_first`` (rank 0 does it, e.g. a download, then the others) and
``average_buffers`` (one set of BatchNorm statistics for an evaluation or a save). Where one
rank stops on its own, ``tell_cause`` leaves its reason in the group's store for the peers its
exit fails (``peer_cause``).

The collectives take the process group explicitly; ``None`` means "no group": one process, and
they are the identity (``barrier(None)`` waits on the world group, and ``control_group`` makes
a group of its own). Nothing here multiplies by the world size.

``count_bytes()`` counts what this rank sends through the tensor collectives above while it is
open: per call, the per-rank send volume of the bandwidth-optimal (ring / pairwise) algorithm,
which is what NCCL's ring sends: all-gather (W-1)·s for s bytes per rank, all-reduce
2(W-1)/W·s, reduce-scatter (W-1)·s for s output bytes, all-to-all (W-1)/W·s. Gloo may send more
for some of them; the count is of the algorithm, not of packets.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

Group = dist.ProcessGroup | None

_counter: Counter | None = None  # bytes sent by kind, while count_bytes() is open


@contextlib.contextmanager
def count_bytes():
    """Count the bytes this rank sends through the tensor collectives, by kind (see above)."""
    global _counter
    outer, _counter = _counter, Counter()
    try:
        yield _counter
    finally:
        _counter = outer


def _sent(kind: str, tensor: torch.Tensor, group: Group, factor) -> None:
    if _counter is not None:
        world = size(group)
        _counter[kind] += round(tensor.numel() * tensor.element_size() * factor(world))


def is_distributed(group: Group) -> bool:
    """True when ``group`` names a process group of more than one process."""
    return group is not None and dist.is_available() and dist.is_initialized() and size(group) > 1


def size(group: Group) -> int:
    """Number of processes in ``group`` (1 for ``None``)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: Group) -> int:
    """This process's rank inside ``group`` (0 for ``None``)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def default_group() -> Group:
    """The default (world) process group when one is initialised, else ``None``."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _gather_list(x: torch.Tensor, group: Group) -> list[torch.Tensor]:
    _sent("all_gather", x, group, lambda w: w - 1)
    parts = [torch.empty_like(x) for _ in range(size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def all_gather_nograd(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order; no gradient."""
    if not is_distributed(group):
        return x
    with torch.no_grad():
        return torch.cat(_gather_list(x.detach(), group), dim=0)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group, ctx.n = group, x.shape[0]
        return torch.cat(_gather_list(x, group), dim=0)

    @staticmethod
    @once_differentiable  # the collective below is not recorded: a second order would be wrong
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((ctx.n, *grad.shape[1:]))
        _sent("reduce_scatter", out, ctx.group, lambda w: w - 1)
        _reduce_scatter(out, grad, group=ctx.group)
        return out, None


def all_gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along dim 0; gradients flow to the owner."""
    if not is_distributed(group):
        return x
    return _AllGather.apply(x, group)


# torch >= 2.12 names it reduce_scatter_single (and deprecates the old name)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _sum_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    out = x.contiguous().clone()
    _sent("all_reduce", out, group, lambda w: 2 * (w - 1) / w)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _exchange(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _sent("all_to_all", x, group, lambda w: (w - 1) / w)
    dist.all_to_all_single(out, x, group=group)
    return out


class _SelfAdjoint(torch.autograd.Function):
    """A linear collective that is its own adjoint (the sum over ranks, the block exchange):
    its backward applies the same collective to the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, collective) -> torch.Tensor:
        ctx.group, ctx.collective = group, collective
        return collective(x, group)

    @staticmethod
    @once_differentiable  # as _AllGather's
    def backward(ctx, grad: torch.Tensor):
        return ctx.collective(grad, ctx.group), None, None


def all_to_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Exchange blocks: ``x`` (W·k, ...) is W blocks of k rows; block q goes to rank q, and the
    result holds, in rank order, the block every rank sent here. Differentiable."""
    if not is_distributed(group):
        return x
    if x.shape[0] % size(group):
        raise ValueError(f"all_to_all needs rows divisible by the world size, got {x.shape[0]}")
    return _SelfAdjoint.apply(x, group, _exchange)


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable (backward sums the ranks' gradients)."""
    if not is_distributed(group):
        return x
    return _SelfAdjoint.apply(x, group, _sum_all)


def all_reduce_max(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Elementwise maximum of ``x`` over ranks; no gradient (the result is detached)."""
    out = x.detach().clone()
    if is_distributed(group):
        _sent("all_reduce", out, group, lambda w: 2 * (w - 1) / w)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def all_reduce_mean(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Mean of ``x`` over ranks, no gradient (for logging values such as the loss)."""
    out = x.detach().clone()
    if is_distributed(group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        out /= size(group)
    return out


def broadcast_object(obj, group: Group, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. the run folder rank 0 chose)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group)
    return box[0]


def all_gather_object(obj, group: Group) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` on one process)."""
    if not is_distributed(group):
        return [obj]
    out = [None] * size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def rank_zero_first(fn, group: Group):
    """``fn()`` on rank 0 first, then on the other ranks; every rank returns its own result.

    For work that must happen once before the others may look (a download into a shared folder).
    Failures are shared: if ``fn`` raises on rank 0 the others do not call it and raise the same
    exception; if it raises on any other rank, every rank raises that rank's exception (the first
    failing rank's), so no rank is left waiting in a later collective.
    """
    if not is_distributed(group):
        return fn()
    me, result, error = rank(group), None, None
    if me == 0:
        result, error = _attempt(fn)
    first = broadcast_object(_portable(error), group)
    if first is not None:
        raise first
    if me != 0:
        result, error = _attempt(fn)
    return _agreed(result, error, group)


def agree(fn, group: Group):
    """``fn()`` on every rank at once; if it raises on any rank, every rank raises that rank's
    exception (the first failing rank's), so that a check one rank fails (its node's software,
    its copy of the data) stops them all alike instead of leaving the others in a collective."""
    if not is_distributed(group):
        return fn()
    return _agreed(*_attempt(fn), group)


def _agreed(result, error: Exception | None, group: Group):
    for failed in all_gather_object(_portable(error), group):
        if failed is not None:
            raise failed
    return result


def _attempt(fn):
    try:
        return fn(), None
    except Exception as e:  # shared with the other ranks, then raised on every rank
        return None, e


def _portable(error: Exception | None) -> Exception | None:
    """``error`` if it survives pickling, else a RuntimeError with its one-line text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}")


def average_buffers(module: torch.nn.Module, group: Group, means: list[torch.Tensor]) -> None:
    """Make ``module``'s buffers one across ranks, in place: those in ``means`` (BatchNorm
    running means and variances, :func:`dist_icm.norm.running_stats`) become their mean over
    ranks; every other buffer (counters, constants) rank 0's.

    Averaging, not rank 0's copy: under DDP with ``broadcast_buffers=False`` each rank's running
    statistics follow its own share of every batch, and as the BatchNorm update is linear, their
    mean is the running average of the whole global batch's per-device (or ghost-group)
    statistics. A broadcast would throw away the other ranks' data.
    """
    if not is_distributed(group):
        return
    averaged = {id(t) for t in means}
    buffers = [b for b in module.buffers() if b.numel()]
    mean = [b for b in buffers if id(b) in averaged]
    _coalesced(mean, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group))
    with torch.no_grad():
        for b in mean:
            b.div_(size(group))
    src = dist.get_global_rank(group, 0)
    rest = [b for b in buffers if id(b) not in averaged]
    _coalesced(rest, lambda flat: dist.broadcast(flat, src=src, group=group))


def _coalesced(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective`` in place on one flat tensor per dtype, then copy the results back."""
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        collective(flat)
        offset = 0
        with torch.no_grad():
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def control_group(timeout_s: float | None = None) -> Group:
    """A gloo group over every rank for small control messages (stop flags), kept off the
    training backend's stream (NCCL) and its order of collectives; None on one process. Its
    collectives fail after ``timeout_s`` seconds (None: torch's default) without a peer.

    Every rank must call it, in the same order as its other group creations.
    """
    if not is_distributed(default_group()):
        return None
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    return dist.new_group(backend="gloo", timeout=timeout)


def all_reduce_max_async(x: torch.Tensor, group: Group):
    """Start an in-place elementwise max of ``x`` over ranks; returns the work to ``wait()`` on
    (None on one process, where ``x`` already is the result)."""
    if not is_distributed(group):
        return None
    return dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group, async_op=True)


_CAUSE_KEY = "dist_icm/cause"


def _store():
    """The default process group's key-value store (under torch's launchers the agent holds
    it, so it outlives any worker); None without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def tell_cause(line: str) -> None:
    """Leave ``line``, why this rank is about to stop on its own (a bad file it met, a disk that
    is full), in the store, for the peers whose collectives its exit will fail
    (:func:`peer_cause`). Best effort: nothing happens without a reachable store."""
    store = _store()
    if store is None:
        return
    try:
        store.set(_CAUSE_KEY, line)
    except (RuntimeError, ValueError, OSError):
        pass


def peer_cause(wait_s: float = 1.0) -> str | None:
    """The line a peer left with :func:`tell_cause` before it stopped, looked for during up to
    ``wait_s`` seconds; None where none did (or the store went with the peer)."""
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([_CAUSE_KEY]):
                return store.get(_CAUSE_KEY).decode()
        except (RuntimeError, ValueError, OSError):
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def start_gloo(rank: int, world: int, init_method: str) -> Group:
    """Join a gloo group of ``world`` CPU processes started without a launcher (the
    benchmarks'); returns the world group."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    return dist.group.WORLD


def shutdown() -> None:
    """Destroy every process group, if any, before the process ends (``train.leave`` then
    ends it without the interpreter's teardown)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Group = None) -> None:
    """Wait for every process of ``group`` (or the world group) when distributed."""
    group = group if group is not None else default_group()
    if is_distributed(group):
        dist.barrier(group=group)
