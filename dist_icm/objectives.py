"""Training objectives by name: how a batch becomes a loss (mixing -> model -> loss).

``ce`` is plain cross-entropy; ``mixup``, ``cutmix``, ``regmixup`` and ``remix`` are the
standard soft-label formulations; ``icm_<method>`` mixes the inputs the same way and replaces the
soft-label cross-entropy by the Infinite Class Mixup loss over the global batch.

* RegMixup (Pinto et al. 2022): CE on the clean batch plus the mixed term, α = 20 by default.
  Clean and mixed inputs go through the model in one forward pass.
* Remix (Chou et al. 2020): inputs mixed with λ, labels with Remix's decoupled weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dist_icm import dist
from dist_icm.graphs import GraphedLoss
from dist_icm.loss import AXES, GATHERS, duplicate_share, icm_loss
from dist_icm.mixing import MixContext, Mixed, cutmix, mixup, remix_lam
from dist_icm.tiled import is_tile

METHODS = ("ce", "mixup", "cutmix", "regmixup", "remix")
OBJECTIVES = METHODS + tuple(f"icm_{m}" for m in METHODS[1:])
DEFAULT_ALPHA = {"mixup": 0.2, "cutmix": 1.0, "regmixup": 20.0, "remix": 0.2}
_ICM = tuple(o for o in OBJECTIVES if o.startswith("icm_"))
# the options only some losses read, and which: set to anything but its default elsewhere, an
# option would change nothing (alpha and group_size are left out: sweeps set them for all)
SCOPED = {
    **dict.fromkeys(("axis", "gather", "dedup", "tile", "cuda_graph", "fused"), _ICM),
    "per_sample": tuple(
        o for o in OBJECTIVES if o.removeprefix("icm_") in ("mixup", "remix", "regmixup")
    ),
    "regmix_weight": ("regmixup", "icm_regmixup"),
    **dict.fromkeys(("tau", "kappa"), ("remix", "icm_remix")),
}


def unread_options(name: str) -> tuple[str, ...]:
    """The options of :data:`SCOPED` that loss ``name`` does not read: settings the study does
    not tell its runs apart by."""
    return tuple(key for key, users in SCOPED.items() if name not in users)


def unused_options(loss: dict) -> dict[str, object]:
    """The options of a loss config (as a dict: a config's ``loss`` section) that are set away
    from their defaults but that its loss does not read, with their values (a start-up note)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ObjectiveConfig)}
    unread = unread_options(loss.get("name", defaults["name"]))
    return {k: loss[k] for k in unread if k in loss and loss[k] != defaults[k]}


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "icm_mixup"
    alpha: float | None = None  # None: the paper's default for the method
    per_sample: bool = False  # one λ per sample instead of per batch (Mixup, RegMixup, Remix)
    group_size: int | None = None  # mixing group size; None: the whole per-device batch
    axis: str = "both"  # ICM only
    gather: str = "triples"  # ICM only
    dedup: bool = False  # ICM only
    # ICM only: 0 holds the (n x N) score block; T > 0 walks it in T x T tiles; "auto": 0 while
    # the block fits a budget, else tiles (dist_icm.tiled.resolve_tile). Any: an int or a str
    tile: Any = 0
    cuda_graph: bool = True  # ICM only: replay the loss from CUDA graphs where exact (graphs.py)
    # ICM only: S̃'s statistics from two Triton kernels and Mixup's blend from one (dist_icm.fused)
    fused: bool = False
    regmix_weight: float = 1.0  # RegMixup: weight of the mixed term
    tau: float = 0.5  # Remix
    kappa: float = 3.0  # Remix

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(
                f"unknown loss {self.name!r} (loss.name): use one of {', '.join(OBJECTIVES)}"
            )
        if not is_tile(self.tile):
            raise ValueError(
                f"loss.tile must be an int >= 0 (0: untiled) or auto, got {self.tile!r}"
            )
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"loss.alpha must be > 0 (null: the method's), got {self.alpha}")
        if self.axis not in AXES:
            raise ValueError(f"loss.axis must be one of {', '.join(AXES)}, got {self.axis!r}")
        if self.gather not in GATHERS:
            raise ValueError(
                f"loss.gather must be one of {', '.join(GATHERS)}, got {self.gather!r}"
            )
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(
                f"loss.group_size must be >= 1 (null: the per-device batch), got {self.group_size}"
            )
        if not self.regmix_weight >= 0:
            raise ValueError(f"loss.regmix_weight must be >= 0, got {self.regmix_weight}")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"loss.tau must lie in [0, 1], got {self.tau}")
        if not self.kappa >= 1:
            raise ValueError(f"loss.kappa must be >= 1, got {self.kappa}")

    @property
    def icm(self) -> bool:
        return self.name.startswith("icm_")

    @property
    def method(self) -> str:
        return self.name.removeprefix("icm_")

    @property
    def mix_alpha(self) -> float:
        return self.alpha if self.alpha is not None else DEFAULT_ALPHA[self.method]


def soft_ce(logits: torch.Tensor, mixed: Mixed) -> torch.Tensor:
    """Mixup's cross-entropy with the interpolated one-hot target, mean over the batch."""
    logp = F.log_softmax(logits.float(), dim=1)
    lam = mixed.lam.to(logp.dtype)
    nll_a = -logp.gather(1, mixed.a[:, None]).squeeze(1)
    nll_b = -logp.gather(1, mixed.b[:, None]).squeeze(1)
    return (lam * nll_a + (1 - lam) * nll_b).mean()


class Objective:
    """``objective(model, x, y, ctx) -> (loss, stats)`` for the configured method.

    ``stats`` holds detached tensors (e.g. ``lam``, the batch's λ per row); reading them as Python
    numbers is left to whoever logs them, so the step itself never waits for the device.
    ``validate=False`` skips the ICM loss's value checks and row-count gather (see
    :func:`~dist_icm.loss.icm_loss`): for callers whose triples come from :mod:`dist_icm.mixing`.
    """

    def __init__(
        self,
        cfg: ObjectiveConfig,
        *,
        class_counts: torch.Tensor | None = None,
        process_group: dist.Group = None,
        validate: bool = True,
    ) -> None:
        if cfg.method == "remix" and class_counts is None:
            raise ValueError("Remix needs the training set's class counts")
        self.cfg, self.class_counts, self.group = cfg, class_counts, process_group
        self.validate = validate  # icm_loss's value checks (off in the trainer's hot path)
        self.loss_fn = self._icm_loss
        if cfg.icm and cfg.cuda_graph and not validate:  # validation reads values back
            world = dist.size(process_group)
            self.loss_fn = GraphedLoss(
                self._icm_loss, world=world, dedup=cfg.dedup, tile=cfg.tile, fused=cfg.fused
            )
        # the last call's targets (a, b, lam), detached and on the device, for whoever
        # measures them between steps (the trainer's duplicate share); ce: (y, y, 1)
        self.last_targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def duplicate_share(self) -> float | None:
        """The share of rows of the last call's batch over all ranks (the rows one loss sees)
        whose target another row also has (see :func:`~dist_icm.loss.duplicate_share`); None
        before the first call. One all-gather of the targets: for log steps, not every step."""
        if self.last_targets is None:
            return None
        local = torch.stack([t.detach().double() for t in self.last_targets], dim=1)
        rows = dist.all_gather_nograd(local, self.group)
        return duplicate_share(rows[:, 0].long(), rows[:, 1].long(), rows[:, 2])

    def mix(self, x: torch.Tensor, y: torch.Tensor, ctx: MixContext) -> Mixed:
        cfg = self.cfg
        if cfg.method == "cutmix":
            return cutmix(x, y, alpha=cfg.mix_alpha, ctx=ctx)
        fused = cfg.fused and cfg.icm  # the blend's kernel, with the loss's
        mixed = mixup(x, y, alpha=cfg.mix_alpha, ctx=ctx, per_sample=cfg.per_sample, fused=fused)
        if cfg.method == "remix":
            counts = self.class_counts  # onto the device once: a copy every step would wait
            if counts.device != mixed.lam.device or counts.dtype != torch.float64:
                counts = self.class_counts = counts.to(mixed.lam.device, torch.float64)
            mixed.lam = remix_lam(mixed.lam, mixed.a, mixed.b, counts, tau=cfg.tau, kappa=cfg.kappa)
        return mixed

    def mixed_loss(self, logits: torch.Tensor, mixed: Mixed) -> torch.Tensor:
        if not self.cfg.icm:
            return soft_ce(logits, mixed)
        return self.loss_fn(logits, mixed.a, mixed.b, mixed.lam)

    def _icm_loss(self, logits, a, b, lam) -> torch.Tensor:
        return icm_loss(
            logits,
            a,
            b,
            lam,
            axis=self.cfg.axis,
            process_group=self.group,
            gather=self.cfg.gather,
            dedup=self.cfg.dedup,
            tile=self.cfg.tile,
            fused=self.cfg.fused,
            validate=self.validate,
        )

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, ctx: MixContext):
        cfg = self.cfg
        if cfg.method == "ce":
            self.last_targets = (y, y, torch.ones(y.shape, device=y.device))
            return F.cross_entropy(model(x).float(), y), {}
        mixed = self.mix(x, y, ctx)
        self.last_targets = (mixed.a, mixed.b, mixed.lam.detach())
        # the batch's λs, as they are: no device sync, and no kernel, in the training step
        stats = {"lam": mixed.lam.detach()}
        if cfg.method == "regmixup":
            logits = model(torch.cat([x, mixed.x]))
            clean, mixed_logits = logits.split(x.shape[0])
            loss = F.cross_entropy(clean.float(), y)
            return loss + cfg.regmix_weight * self.mixed_loss(mixed_logits, mixed), stats
        return self.mixed_loss(model(mixed.x), mixed), stats
