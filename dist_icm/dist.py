"""The one module that talks to ``torch.distributed``.

It holds the process-group facts the rest of the code asks for (rank, world size) and the few
collectives the global-batch loss needs, each with the autograd rule that makes the gradient
exactly the one a single process would get on the whole batch:

* ``all_gather(x)`` with gradient: forward concatenates every rank's ``x`` in rank order;
  backward sums, over ranks, the gradient that reached each rank's copy and hands the owner its
  slice (so a row's gradient flows back to the process that computed it).
* ``all_reduce_sum(x)`` with gradient: forward sums over ranks; backward sums the incoming
  gradients over ranks (every rank's loss depends on the sum).
* ``all_reduce_max(x)`` and ``all_gather_nograd(x)``: no gradient (maxima that only stabilise a
  logsumexp, and integer data such as the mixing triples).

Every function takes the process group explicitly; ``None`` means "no group": one process, and
the collectives are the identity. Nothing here multiplies by the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


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
        ctx.group, ctx.rank, ctx.n = group, rank(group), x.shape[0]
        return torch.cat(_gather_list(x, group), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        lo = ctx.rank * ctx.n
        return grad[lo : lo + ctx.n], None


def all_gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along dim 0; gradients flow to the owner."""
    if not is_distributed(group):
        return x
    return _AllGather.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable (backward sums the ranks' gradients)."""
    if not is_distributed(group):
        return x
    return _AllReduceSum.apply(x, group)


def all_reduce_max(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Elementwise maximum of ``x`` over ranks; no gradient (the result is detached)."""
    out = x.detach().clone()
    if is_distributed(group):
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
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def check_equal_rows(n: int, group: Group, device: torch.device) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold ``n`` rows."""
    if not is_distributed(group):
        return
    sizes = all_gather_nograd(torch.tensor([n], device=device, dtype=torch.int64), group)
    if not bool((sizes == n).all()):
        raise ValueError(
            f"the global-batch loss needs the same number of rows on every rank, got "
            f"{sizes.tolist()}: make the global batch divisible by the world size and drop "
            f"incomplete last batches"
        )


def barrier(group: Group = None) -> None:
    """Wait for every process of ``group`` (or the world group) when distributed."""
    group = group if group is not None else default_group()
    if is_distributed(group):
        dist.barrier(group=group)
