"""Stopping on a signal, and checkpoints on a clock: decided once, acted on by every rank.

Slurm warns a job before its time ends (``#SBATCH --signal=USR1@<seconds>``) and sends SIGTERM
on preemption; Ctrl-C is SIGINT. On any of them the trainer finishes the step it is in, writes a
checkpoint of the step it stopped at (rank 0 writes it for all), records the stop in
``<run dir>/preempted.json`` and exits with :data:`PREEMPTED_EXIT` (75, ``EX_TEMPFAIL``: "try
again"), which ``launch/slurm.sbatch`` answers with a requeue; the requeued job resumes from that
checkpoint (``resume=auto``). A second Ctrl-C stops at once, without a checkpoint.

A signal may reach only some ranks, and at different moments; a checkpoint due by the clock
(``train.ckpt_every_min``) is rank 0's reading of its clock. So after every optimizer step each
rank starts an all-reduce (max) of its two flags, [signal received, checkpoint due], on a small
gloo group, without waiting for it; the next step's poll reads the result. Every rank therefore
acts on the same agreed flags at the same step, one step after they were raised, and the
training step never waits for the flags (nor, on a GPU, for the device).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_icm import dist

PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
MARKER = "preempted.json"


class Preempted(Exception):
    """Raised by the trainer after the checkpoint of the step it stopped at is written."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"stopped at step {step} on {reason}")
        self.step, self.reason = step, reason


@dataclass(frozen=True)
class Decision:
    stop: bool = False
    checkpoint: bool = False


class StopFlags:
    """The agreed [stop, checkpoint] flags of every rank, polled once per optimizer step.

    The signals are caught from construction on: the main job makes its flags before it sets
    the run up (which may take minutes, e.g. writing FFCV files), so that a stop met there is
    acted on at the first step (checkpoint, exit 75: requeued) instead of killing the process;
    the trainer then :meth:`join` s them to the run's group and clock. Until then a Ctrl-C,
    with nothing to save yet, stops at once."""

    def __init__(self) -> None:
        self.group, self.is_main, self.every_s = None, True, None
        self._joined = False
        self.received: str | None = None
        self._interrupts = 0
        self._last_ckpt = time.monotonic()
        self._pending: tuple[object, torch.Tensor] | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1 or not self._joined:  # a second Ctrl-C, or one before
                self._interrupts = 0  # training, when nothing is to be saved: stop now
                self.close()
                raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def join(self, group: dist.Group, *, is_main: bool, ckpt_every_min: float | None) -> StopFlags:
        """Agree over ``group`` from now on, with rank 0's clock starting now; a signal caught
        before is kept. Returns the flags."""
        self.group, self.is_main, self.every_s = group, is_main, ckpt_every_min
        self._joined = True
        self._last_ckpt = time.monotonic()
        return self

    def checkpoint_written(self) -> None:
        """Restart the clock of ``train.ckpt_every_min``."""
        self._last_ckpt = time.monotonic()

    def poll(self) -> Decision:
        """The flags agreed over every rank as of the previous poll (this one's, alone)."""
        now = time.monotonic()
        due = self.every_s is not None and now - self._last_ckpt >= self.every_s * 60
        if due and self.is_main:  # the clock restarts at the asking: the save comes a step later,
            self._last_ckpt = now  # and asking again at that step would write a second one
        mine = torch.tensor([self.received is not None, self.is_main and due], dtype=torch.int32)
        if not dist.is_distributed(self.group):
            return Decision(bool(mine[0]), bool(mine[1]))
        agreed = Decision()
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            agreed = Decision(bool(flags[0]), bool(flags[1]))
        self._pending = (dist.all_reduce_max_async(mine, self.group), mine)
        return agreed

    def reason(self) -> str:
        return self.received or "a signal to another rank"

    def close(self) -> None:
        """Finish the pending reduction and put the previous signal handlers back. The
        reduction is waited for once: where a dead peer fails it, this raises that error the
        first time, and a second close (the main job's, after the trainer's) only restores the
        handlers, so the run still ends with its one line and exit 5."""
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                pending[0].wait()
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}


def quiet_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the trainer's DataLoaders: their worker processes leave the stop
    signals to the trainer. Slurm signals every process of a job step (on preemption, and
    ``launch/slurm.sbatch`` forwards a stop that way) and torch's launcher its ranks' process
    groups; a worker killed by that SIGTERM (or USR1) made the trainer raise at its next batch,
    or in its SIGCHLD handler mid-checkpoint, instead of stopping with a checkpoint.

    SIGUSR1 and SIGINT are ignored. A SIGTERM from the worker's own trainer (torch and
    multiprocessing shut a worker down with one) still ends it, any other is ignored: a thread
    reads who sent it. On Linux the kernel also kills the worker when its trainer exits."""
    del worker_id
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there torch's handling stays
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads made later too
        threading.Thread(target=_end_on_parent_s_sigterm, args=(os.getppid(),), daemon=True).start()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() == 1:  # the trainer exited before the request was made
            os._exit(0)


def _end_on_parent_s_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def mark(run_dir: Path, step: int, reason: str) -> None:
    """Record where and why the run stopped (rank 0, after the checkpoint is written): whole or
    not at all (a temporary file renamed over it), should the job be killed while writing."""
    tmp = run_dir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "signal": reason}) + "\n")
    os.replace(tmp, run_dir / MARKER)


def unmark(run_dir: Path) -> None:
    """A run that goes on is no longer stopped."""
    (run_dir / MARKER).unlink(missing_ok=True)
