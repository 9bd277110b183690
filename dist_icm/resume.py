"""A run's checkpoints: what they hold, and the one every rank resumes from.

* **What a checkpoint holds** (:func:`save`, :func:`restore`): the whole model as a plain state
  dict (BatchNorm statistics averaged over ranks first), the optimizer (under DeepSpeed: every
  rank's shards, in the checkpoint's companion folder), the schedule, the config, and the run's
  training time and images so far; the data position follows from the step.

* **One truth.** Rank 0 alone chooses the checkpoint (``resume=auto``: the newest that loads in
  the run folder; else the path given) and shares its path; every rank loads that file, and
  all ranks compare what they got (the step, or why the file could not be read) before any of
  them goes on. With node-local disks, a slow network file system or a read error on one rank,
  the ranks therefore either resume from the same step or stop together with one message,
  instead of training different weights until a collective hangs.
* **The same run.** A checkpoint holds its config, and a resumed run may change only what
  leaves its steps the same (:mod:`dist_icm.same_run`); a run that does not resume may not
  start in the folder of another.
* **Said once, in one line.** A newest checkpoint that does not load (torn by a crash, overwritten)
  is skipped for the one before, with one line per skipped file in the run's report. A save that
  fails (a full disk) raises :class:`~dist_icm.checkpoint.CheckpointWriteError` on every rank:
  rank 0 writes and shares its outcome, so no rank waits for a checkpoint that never comes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dist_icm import checkpoint, dist
from dist_icm.checkpoint import CheckpointError, CheckpointWriteError
from dist_icm.config import ConfigError
from dist_icm.norm import rank_averaged, restore_stats
from dist_icm.same_run import check_config, held_run, moved_note

if TYPE_CHECKING:
    from dist_icm.job import Job


@dataclass
class Resumed:
    """The checkpoint every rank resumes from."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def choose(
    folder: Path, resume: str | None, group: dist.Group, skipped: list[str] | None = None
) -> Resumed | None:
    """The checkpoint to resume from, the same on every rank (None: start from scratch).

    ``resume`` is None (no resume), ``"auto"`` (rank 0 takes the newest loadable checkpoint in
    ``folder``) or a path. Raises, on every rank alike, :class:`ConfigError` for a path that is
    missing or that rank 0 cannot read, and :class:`CheckpointError` when another rank cannot
    read the file rank 0 chose or the ranks' files hold different steps. With
    ``resume="auto"``, one line per newer file that rank 0 could not load (and skipped) is
    appended to ``skipped``, on every rank.
    """
    if resume is None:
        return None
    chosen, error, passed = None, None, []
    if dist.rank(group) == 0:
        chosen, error = _rank_zero_choice(Path(folder), resume, passed)
    # with resume=auto only the file's name travels: each rank reads it in its own view of the
    # run folder (the same folder on a shared file system, or a node-local copy of it)
    name = None if chosen is None else chosen[0].name if resume == "auto" else str(chosen[0])
    name, error, passed = dist.broadcast_object((name, error, passed), group)
    if skipped is not None:
        skipped += passed
    if error is not None:
        raise ConfigError(error)
    if name is None:
        return None
    path = Path(folder) / name if resume == "auto" else Path(name)
    state, reason = (chosen[1], None) if chosen is not None else _load(path)
    outcomes = dist.all_gather_object(reason or int(state["step"]), group)
    failed = [(r, o) for r, o in enumerate(outcomes) if isinstance(o, str)]
    if failed:
        rank, why = failed[0]
        raise CheckpointError(f"rank {rank} cannot read the checkpoint rank 0 chose: {why}")
    if len(set(outcomes)) > 1:
        raise CheckpointError(
            f"the ranks' copies of {path.name} hold different steps {outcomes}: "
            "they must see the same file (a shared folder)"
        )
    return Resumed(path, state)


def _rank_zero_choice(folder: Path, resume: str, skipped: list[str]):
    if resume == "auto":
        found = checkpoint.latest(folder, skipped=skipped)
        return found, None
    if not Path(resume).is_file():
        return None, f"resume={resume!r}: no such checkpoint file (or use resume=auto)"
    state, reason = _load(resume)
    if reason is not None:
        return None, reason
    return (Path(resume), state), None


def _load(path) -> tuple[dict | None, str | None]:
    try:
        return checkpoint.load(path), None
    except (OSError, CheckpointError) as e:
        return None, str(e).splitlines()[0]


def find_checkpoint(job: Job) -> Resumed | None:
    """The state every rank resumes from (chosen by rank 0; see :mod:`dist_icm.resume`), after
    checking that it was made with this run's config; None to start from scratch."""
    cfg, skipped = job.cfg, []
    if cfg.resume is None:  # rank 0 looks, every rank stops alike
        group = job.rt.process_group
        held = held_run(job.run_dir, job.ckpt_dir) if dist.rank(group) == 0 else None
        held = dist.broadcast_object(held, group)
        if held is not None:
            raise ConfigError(held)
        return None
    found = choose(job.ckpt_dir, cfg.resume, job.rt.process_group, skipped)
    if skipped and job.rt.is_main:  # every rank has chosen by now (choose agrees on the path)
        skipped = _set_aside(job.ckpt_dir, found.step if found is not None else -1, skipped)
    job.notes += [f"resume=auto: {line}" for line in skipped]
    if found is None:
        if cfg.resume == "auto":
            what = "no readable checkpoint" if skipped else "no checkpoint"
            job.notes.append(f"resume=auto: {what} in {job.ckpt_dir}; starting at step 0")
        return None
    saved = found.state.get("config")
    world, was = job.rt.world_size, found.state.get("world_size")
    if job.rt.engine is not None and was not in (None, world):  # (none: an older checkpoint)
        raise CheckpointError(
            f"resume: the checkpoint of step {found.step} holds ZeRO shards of {was} processes, "
            f"this run has {world}: resume on {was} (DeepSpeed's ds_to_universal can reshard)"
        )
    note = check_config(saved, asdict(cfg), force=cfg.resume_force, step=found.step)
    job.notes += [note] if note else []
    note = moved_note(job, was)
    job.notes += [note] if note else []
    # resume=PATH may name an older checkpoint than the folder's newest (resume=auto takes the
    # newest that loads, so what is newer there is unreadable, and was named as skipped)
    if job.rt.is_main and cfg.resume != "auto":  # every rank has read the chosen file by now
        dropped = checkpoint.drop_after(job.ckpt_dir, found.step)
        if dropped:
            names = ", ".join(p.name for p in dropped)
            job.notes.append(f"resumed at step {found.step}: removed the later {names}")
    return found


def _set_aside(folder: Path, step: int, skipped: list[str]) -> list[str]:
    """Rename the unreadable checkpoints after ``step`` (``resume=auto`` skipped them; kept
    among the listed ones, they took the kept places of the checkpoints written next); returns
    the skipped lines, each with its file's new name."""
    moved = {p.name.removesuffix(".unreadable"): p.name for p in checkpoint.set_aside(folder, step)}
    return [
        line + "".join(f"; set aside as {new}" for old, new in moved.items() if f"/{old} " in line)
        for line in skipped
    ]


def restore(job: Job, found: Resumed) -> int:
    """Load model, optimizer, schedule and scaler states; returns the step to go on from.

    Under DeepSpeed every rank loads its shards (model and optimizer) from the checkpoint's
    companion folder; otherwise the model and optimizer come from the checkpoint file.

    The sampler position follows from the step (epoch and batch within it), and every random
    draw of the trainer is keyed by the step (:mod:`dist_icm.streams`); the global RNG states
    (rank 0's) are restored for code that draws from them anyway.
    """
    state = found.state
    if job.rt.engine is not None:
        job.rt.load_engine(checkpoint.engine_dir(found.path.parent, found.step))
    else:
        job.rt.unwrap(job.model).load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    # the next step's lr comes from this run's schedule, a pure function of the step (which
    # train.epochs, and so a cosine schedule, may have changed), not from the lr the
    # checkpoint's optimizer state holds: the old schedule's
    sched = job.scheduler
    for group, base, factor in zip(
        sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
    stats = state.get("rank_stats")  # "model" holds their average over the ranks
    if stats is not None and len(stats) == job.rt.world_size:
        restore_stats(job.rt.unwrap(job.model), stats[job.rt.rank])
    job.rt.load_scaler_state(state.get("scaler"))
    checkpoint.set_rng_state(state["rng"])
    return state["step"]


def save(job: Job, step: int, run: dict) -> None:
    """An atomic checkpoint of the (rank-averaged) model, and of each rank's own BatchNorm
    statistics, written by rank 0; under DeepSpeed every rank first writes its shards into the
    checkpoint's companion folder. Every rank waits for it, and learns its outcome: a failed
    write (e.g. a full disk) raises :class:`CheckpointWriteError` with the same line on every
    rank."""
    group = job.rt.process_group
    with rank_averaged(job.rt.unwrap(job.model), group) as own:
        # each rank's own BatchNorm statistics too: a resume on as many ranks goes on from them
        stats = None if own is None else dist.all_gather_object([t.cpu() for t in own], group)
        _save(job, step, run, stats)


def _save(job: Job, step: int, run: dict, rank_stats: list | None) -> None:
    rt, group, folder = job.rt, job.rt.process_group, job.ckpt_dir
    if rt.engine is not None:
        model = rt.full_state_dict(job.model)  # gathered on every rank under ZeRO-3
        tmp = checkpoint.engine_tmp(folder, step)

        def make_tmp():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        _agree(_attempt(make_tmp, tmp) if rt.is_main else None, group)
        _agree(_attempt(lambda: rt.save_engine(tmp), tmp), group, every_rank=True)

        def replace():  # over the shards of an unreadable checkpoint of this step, skipped
            checkpoint.write_manifest(tmp)  # every rank's shards are in: what a resume needs
            target = checkpoint.engine_dir(folder, step)  # by resume=auto (a folder's rename
            shutil.rmtree(target, ignore_errors=True)  # fails where one is in the way)
            os.replace(tmp, target)

        _agree(_attempt(replace, tmp) if rt.is_main else None, group)
    else:
        model = rt.unwrap(job.model).state_dict()
    error = None
    if rt.is_main:
        try:
            state = {
                "model": model,  # always the whole model: `torch.load(...)["state"]["model"]`
                "optimizer": None if rt.engine is not None else job.optimizer.state_dict(),
                "scheduler": job.scheduler.state_dict(),
                "scaler": rt.scaler_state(),
                "rng": checkpoint.rng_state(),
                "step": step,
                "config": asdict(job.cfg),
                "run": dict(run),  # training time and images over all sessions so far
                "rank_stats": rank_stats,  # each rank's BatchNorm statistics, on several
                "world_size": rt.world_size,  # ZeRO's shards are resumed on as many
            }
            checkpoint.save(folder, step, state, keep=job.cfg.train.keep_ckpts)
        except CheckpointWriteError as e:
            error = str(e)
        except Exception as e:  # a bug, not the disk: rank 0 raises it, the others learn of it
            why = f"rank 0 failed to write the checkpoint of step {step}: {_line(e)}"
            dist.broadcast_object(why, group)
            raise
    _agree(error, group)  # the barrier every rank waits at, carrying rank 0's outcome


def _line(e: BaseException) -> str:
    text = str(e).splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _attempt(fn, path: Path) -> str | None:
    """None when ``fn()`` succeeds; else the one line of why it could not write ``path``."""
    try:
        fn()
    except CheckpointWriteError as e:
        return str(e)
    except OSError as e:
        return f"cannot write checkpoint {path}: {e.strerror or _line(e)}"
    return None


def _agree(error: str | None, group, *, every_rank: bool = False) -> None:
    """Share a write's outcome (rank 0's, or ``every_rank``'s) and raise the first failure as
    :class:`CheckpointWriteError` on every rank. Also the barrier after the write."""
    if every_rank:
        failed = [e for e in dist.all_gather_object(error, group) if e is not None]
        error = failed[0] if failed else None
    else:
        error = dist.broadcast_object(error, group)  # the others wait for rank 0's write
    if error is not None:
        raise CheckpointWriteError(error)
