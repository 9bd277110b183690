"""Ghost batch norm: BatchNorm whose training statistics come from fixed groups of K samples.

Plain BatchNorm normalises each device's batch with that batch's statistics, so a model with it
trains differently on 1 GPU x 256 and on 8 GPUs x 32. With ``model.bn_group=K`` every
BatchNorm layer is replaced by :class:`GhostBatchNorm`, which cuts its input into consecutive
groups of K samples and normalises each group with its own mean and (biased) variance, like the
mixing groups of ``loss.group_size``. The global batch is cut into the same groups on any
number of processes (each rank holds a contiguous slice of it, a whole number of groups), so
the forward pass, the losses and the gradients no longer depend on the world size.

Running statistics (what evaluation uses) move towards the mean over the groups of the group
means, and of the groups' unbiased variances, with the layer's momentum: a linear update. So
when every rank keeps its own running statistics (DDP with ``broadcast_buffers=False``, as the
trainer sets it) and they are averaged over ranks before an evaluation or a save
(:func:`dist_icm.dist.average_buffers`), the average is exactly the running statistics one
process would hold after the same steps on the whole global batch.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dist_icm import dist

__all__ = [
    "GhostBatchNorm",
    "convert_ghost_bn",
    "count_batch_norms",
    "rank_averaged",
    "restore_stats",
    "running_stats",
]


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over groups of ``group`` consecutive samples in training; in eval, the running
    statistics (without them, ``track_running_stats=False``, the groups' own, as in training)."""

    def __init__(self, num_features: int, group: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if group < 1:
            raise ValueError(f"ghost batch norm group must be >= 1, got {group}")
        self.group = int(group)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"GhostBatchNorm expects (N, C, ...) input, got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group={self.group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return super().forward(x)  # eval: the running statistics
        n, k = x.shape[0], self.group
        if n % k:
            raise ValueError(
                f"model.bn_group={k} must divide the batch a BatchNorm layer sees, got {n}"
            )
        if k == 1 and x[0].numel() == x.shape[1]:
            raise ValueError("model.bn_group=1 leaves one value per channel: nothing to normalise")
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # stats in fp32+
        groups = wide.reshape(n // k, k, *x.shape[1:])  # (G, K, C, ...)
        dims = (1, *range(3, groups.ndim))  # over a group's samples and positions
        var, mean = torch.var_mean(groups, dim=dims, keepdim=True, correction=0)
        y = (groups - mean) * torch.rsqrt(var + self.eps)
        if self.training and self.track_running_stats:
            self._update_running(mean, var, count=groups[0].numel() // x.shape[1])
        y = y.reshape(x.shape)
        if self.affine:
            shape = (1, -1, *([1] * (x.ndim - 2)))
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as in nn.BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / max(count - 1, 1))
        batch_mean = mean.reshape(mean.shape[0], -1).mean(0)
        batch_var = unbiased.reshape(var.shape[0], -1).mean(0)
        self.running_mean.lerp_(batch_mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(batch_var.to(self.running_var.dtype), momentum)


def convert_ghost_bn(module: nn.Module, group: int) -> nn.Module:
    """Replace every BatchNorm layer (1d/2d/3d, not SyncBatchNorm) by a :class:`GhostBatchNorm`
    with the same parameters and buffers; returns the module (a new one if it was itself a BN).
    """
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if isinstance(module, bn_types):
        ghost = GhostBatchNorm(
            module.num_features,
            group,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:  # the very parameters (dtype, device, optimizer references kept)
            ghost.weight, ghost.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(ghost, name, getattr(module, name))
        ghost.train(module.training)
        return ghost
    for name, child in module.named_children():
        module.add_module(name, convert_ghost_bn(child, group))
    return module


def count_batch_norms(module: nn.Module) -> int:
    """How many BatchNorm-like layers (plain, sync or ghost) ``module`` holds."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def running_stats(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s BatchNorm running means and variances, in module order: what
    :func:`dist_icm.dist.average_buffers` averages over ranks."""
    return [
        t
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for t in (m.running_mean, m.running_var)
    ]


@contextlib.contextmanager
def rank_averaged(module: nn.Module, group: dist.Group):
    """Inside, ``module``'s running statistics are averaged over ranks (the one model the
    ranks evaluate and save); after, each rank's own again. Averaging in place for good made
    every evaluation and checkpoint a step in training's rounding, so a run cut and resumed
    (one more checkpoint) came out in the last digits unlike the whole run. Yields this rank's
    own statistics (copies), which a checkpoint keeps for an exact resume."""
    if not dist.is_distributed(group):
        yield None
        return
    stats = running_stats(module)
    own = [t.detach().clone() for t in stats]
    dist.average_buffers(module, group, stats)
    try:
        yield own
    finally:
        restore_stats(module, own)


def restore_stats(module: nn.Module, stats: list[torch.Tensor]) -> None:
    """Put ``stats`` (as :func:`running_stats` lists them) back into ``module``."""
    with torch.no_grad():
        for t, saved in zip(running_stats(module), stats, strict=True):
            t.copy_(saved)
