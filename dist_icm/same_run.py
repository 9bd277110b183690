"""Whether a run is one run: what a resumed run may change, and where a new one may start.

* **The same steps** (:func:`check_config`). A checkpoint holds its config. Resuming with other
  values of the keys that define what a step is and what the weights are (:data:`GUARDED`: the
  data, its subset and its short last batch, the global batch and accumulation, the seed, the
  model, the loss and its mixing groups, but not ``loss.cuda_graph``, ``loss.tile`` and
  ``loss.fused``: :data:`UNGUARDED`) is refused with one line naming them;
  ``resume_force=true`` continues anyway. The optimizer's settings and the ZeRO stage never
  change (their state's layout).
* **Another number of processes** is allowed (but under ZeRO, whose shards are per rank): the
  global batch is the invariant. What follows the per-device batch instead (mixing groups of
  ``loss.group_size=null``, plain BatchNorm, dropout's per-rank masks) makes such a run go on
  as a run of that size would; a line at start says so (:func:`moved_note`).
* **A new run** may not start in a folder that holds an earlier run's checkpoints or logged
  steps (:func:`held_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dist_icm import checkpoint
from dist_icm.config import ConfigError
from dist_icm.norm import count_batch_norms

if TYPE_CHECKING:
    from dist_icm.job import Job

# Config keys (or whole sections) that must match between a checkpoint and the resumed run.
GUARDED = (
    "data.name",
    "data.fraction",
    "data.long_tail",
    "data.global_batch",
    "data.augment",
    "data.drop_last",  # the steps of an epoch, so where in the data a step is
    "runtime.grad_accum",
    "runtime.zero_stage",  # DeepSpeed's sharded optimizer state is not DDP's, nor another stage's
    "train.seed",
    "model",
    "loss",
    "optim",  # its state holds all but grad_clip (see check_config)
)
# inside a guarded section, but the same step either way: the loss replayed from CUDA graphs
# is the eager loss bit for bit (graphs.py), and the tiled and fused forms are the same loss up
# to float rounding (as another memory layout is), so a run may switch them and resume
UNGUARDED = ("loss.cuda_graph", "loss.tile", "loss.fused")


def changed_keys(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for each :data:`GUARDED` key that differs."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    changed = []
    for key in sorted(set(saved_flat) | set(current_flat)):
        guarded = any(key == g or key.startswith(g + ".") for g in GUARDED)
        if guarded and key not in UNGUARDED:
            old, new = saved_flat.get(key), current_flat.get(key)
            if old != new:
                changed.append((key, old, new))
    return changed


def _changes(changed) -> str:
    return ", ".join(f"{k}={old!r} (now {new!r})" for k, old, new in changed)


def check_config(saved: dict | None, current: dict, *, force: bool, step: int) -> str | None:
    """Raise ConfigError when the checkpoint's config differs in a guarded key (one line);
    with ``force``, return the line to show instead. None when nothing differs.

    The optimizer's settings (``optim.*`` but ``grad_clip``) never change, forced or not: the
    optimizer's state holds them (its name, its buffers, the hyper-parameters of its parameter
    groups, and the schedule's base learning rates), so loading it would either fail deep in
    the first step or quietly bring the old values back. Nor does ``runtime.zero_stage``, but
    between 1 and 2 (DDP is stage 0): the shards lay the optimizer state out for their stage.
    """
    if saved is None:
        return None
    changed = changed_keys(saved, current)
    held = [c for c in changed if c[0].startswith("optim.") and c[0] != "optim.grad_clip"]
    if held:
        raise ConfigError(
            f"the checkpoint at step {step} holds the optimizer state of {_changes(held)}: "
            "the optimizer's settings cannot change on resume (not even with resume_force); "
            "resume with them, or start a new run folder"
        )
    stage = [c for c in changed if c[0] == "runtime.zero_stage" and {c[1], c[2]} != {1, 2}]
    if stage:  # the optimizer state's layout (and, from ZeRO-3, the weights'): 1 <-> 2 alone
        (_, old, new) = stage[0]  # keep it (the same shards of the same optimizer state)
        raise ConfigError(
            f"the checkpoint at step {step} was written with runtime.zero_stage={old} (now "
            f"{new}): its optimizer state is laid out for that stage, not even resume_force "
            f"changes it; resume with runtime.zero_stage={old}, or start a new run folder"
        )
    if not changed:
        return None
    what = _changes(changed)
    if force:
        return f"resume_force=true: resuming step {step} despite a changed config: {what}"
    raise ConfigError(
        f"the checkpoint at step {step} was made with {what}: its steps would mean something "
        "else now; use a new run folder, or resume_force=true to continue anyway"
    )


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flatten(value, name + ".")
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def held_run(run_dir: Path, ckpt_dir: Path) -> str | None:
    """Why a run that does not resume cannot start in ``run_dir`` (None: it may): the folder
    holds an earlier run's checkpoints or logged steps. Started anyway, the new run logged its
    steps after the old run's in one metrics.jsonl, and a later ``resume=auto`` took the old
    run's newest checkpoint for its own."""
    ckpts = checkpoint.list_checkpoints(ckpt_dir)
    metrics = Path(run_dir) / "metrics.jsonl"
    if ckpts:
        what = f"its checkpoints up to {ckpts[-1].name}"
    elif metrics.is_file() and metrics.stat().st_size:
        what = "its metrics.jsonl"
    else:
        return None
    return (
        f"run_dir {run_dir} holds an earlier run ({what}): resume=auto goes on from it; "
        "to start afresh, name another run_dir or remove that one"
    )


def moved_note(job: Job, was: int | None) -> str | None:
    """A start-up line when the run resumes on another number of processes than the
    checkpoint's (``was``; None: an older checkpoint, which does not say) and its losses depend
    on the per-device batch or the rank: then the resumed steps are those of a run on this many
    processes, not those the uninterrupted run would have taken."""
    cfg, world = job.cfg, job.rt.world_size
    if was in (None, world):
        return None
    tied = []
    if cfg.loss.name != "ce" and cfg.loss.group_size is None:
        tied.append("the mixing groups (loss.group_size=null: each device's batch)")
    plain_bn = cfg.model.bn_group is None and not cfg.model.sync_bn
    if plain_bn and count_batch_norms(job.rt.unwrap(job.model)):
        tied.append("BatchNorm's statistics (model.bn_group=null: each device's batch)")
    if cfg.model.dropout:
        tied.append("dropout's masks (drawn per rank)")
    if not tied:
        return None
    procs = f"{world} process" + ("es" if world > 1 else "")
    return (
        f"resumed on {procs}, the checkpoint's run had {was}: "
        + "; ".join(tied)
        + f" depend on it, so the steps from here are a {world}-process run's, not the whole run's"
    )
