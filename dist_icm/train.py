"""The main job's entry point: ``python -m dist_icm.train`` / ``dist-icm-train`` /
``accelerate launch -m dist_icm.train``.

Hydra composes ``configs/`` (onto the schema from :mod:`dist_icm.config`), the config is
validated, :mod:`dist_icm.trainer` sets the job up and trains. Every start-up failure (a bad
config value, missing data, an unknown model, an unreadable checkpoint) ends every rank with
exit code 2 and one line, printed once (by rank 0: a failure one rank meets is shared with the
others first). Failures during training have their own codes (``*_EXIT`` below).
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dist_icm import dist
from dist_icm.checkpoint import CheckpointError
from dist_icm.compose import register_schema, to_config
from dist_icm.config import Config, ConfigError
from dist_icm.data.datasets import DataError
from dist_icm.job import setup
from dist_icm.launch import tell_exit_code
from dist_icm.preempt import PREEMPTED_EXIT, Preempted, StopFlags
from dist_icm.report import LOG
from dist_icm.resume import find_checkpoint
from dist_icm.startup import (
    CONFIG_DIR,
    RUN_DIR_IN_SWEEP,
    BadSweep,
    hydra_error_message,
    remove_unused_run_dir,
)
from dist_icm.trainer import Diverged, train

START_ERRORS = (ConfigError, DataError, CheckpointError, ValueError)

# Exit codes (README "Exit codes"); each comes with one line on stderr starting "dist_icm: ".
BAD_INPUT_EXIT = 2  # a bad config value or input file, found at start (or a bad file later)
DIVERGED_EXIT = 3  # more than train.max_skipped non-finite steps in a row, or non-finite weights
WRITE_EXIT = 4  # a checkpoint (or log) could not be written, e.g. the disk is full
PEER_EXIT = 5  # a collective failed: a peer process died, or waited past runtime.timeout_s
_QUIET_RANK_GRACE_S = 10.0
_COMM_MARKS = ("gloo", "nccl", "connection", "timed out", "timeout", "closed by peer", "socket")


def run(cfg: Config, labels: dict | None = None) -> dict:
    """Set up (or stop with one line) and train; returns the summary. A run stopped by a signal
    exits with code 75 (``PREEMPTED_EXIT``) after checkpointing the step it stopped at; the
    other ways a run ends early are the ``*_EXIT`` codes above."""
    # a log line that cannot be written (a full disk) is dropped instead of printing a traceback
    # per line; the metrics file's next write then stops the run (WRITE_EXIT) with one line
    logging.raiseExceptions = False
    flags = StopFlags()  # a stop signal met while the run is set up: acted on at its first step
    try:
        return _run(cfg, labels, flags)
    finally:
        flags.close()


def _run(cfg: Config, labels: dict | None, flags: StopFlags) -> dict:
    try:
        job = setup(cfg)
        job.labels = dict(labels or {})  # recorded in summary.json
        found = find_checkpoint(job)
    except START_ERRORS as e:  # raised on every rank alike (shared where one rank found it)
        _fail(e, BAD_INPUT_EXIT, rank_zero=True)
    # from here on the run's folder stays, and the line that ends a run early also goes to its
    # train.log (rank 0's), as the last of the lines the run showed
    try:
        return train(job, found, flags)
    except Preempted as stop:
        if job.rt.is_main:
            line = (
                f"dist_icm: {stop}: checkpoint written; resume with resume=auto "
                f"(exit code {PREEMPTED_EXIT})"
            )
            print(line, file=sys.stderr, flush=True)
            LOG.info(line)
        sys.exit(PREEMPTED_EXIT)
    except Diverged as e:  # decided on every rank alike
        _fail(f"training diverged: {e}; no checkpoint of it was written", DIVERGED_EXIT,
              rank_zero=True, log=True)  # fmt: skip
    except CheckpointError as e:  # a save that failed; rank 0 shares the outcome
        _fail(e, WRITE_EXIT, rank_zero=True, log=True)
    except DataError as e:  # a bad file met during training, by this rank
        _fail(e, BAD_INPUT_EXIT, log=True)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _fail(f"cannot write {e.filename or 'to the run folder'}: {e.strerror}", WRITE_EXIT,
              log=True)  # fmt: skip
    except RuntimeError as e:
        if job.rt.world_size == 1 or not _is_comm_failure(e):
            raise
        cause = dist.peer_cause()
        if cause is not None:  # the peer that stopped printed why; rank 0's log says it too
            LOG.info(f"dist_icm: error: {cause}")
            sys.exit(PEER_EXIT)
        _fail(
            f"rank {job.rt.rank}: a collective failed ({_gist(e)}): another process died, or "
            f"waited longer than runtime.timeout_s={cfg.runtime.timeout_s:g}",
            PEER_EXIT,
            log=True,
        )


def _is_comm_failure(error: RuntimeError) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(error).lower()
    return isinstance(error, dist_error) or any(mark in text for mark in _COMM_MARKS)


def _gist(error: Exception) -> str:
    """The backend's message without its source location and advice (one short clause)."""
    text = " ".join(str(error).split())
    text = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    return text.split(". ")[0].rstrip(".")[:200]


def _fail(error: Exception | str, code: int, *, rank_zero: bool = False, log: bool = False) -> None:
    """Print ``dist_icm: error: <first line>`` and exit with ``code``. ``rank_zero``: the error
    is known on every rank alike, so only rank 0 prints it (the others exit silently); else
    this rank alone met it, and tells its peers (``dist.tell_cause``), whose collectives its
    exit fails, so that they stop without a line of their own. ``log``: the line also goes to
    the run's train.log (a run that had started; a failed start leaves its folder to be
    removed)."""
    line = str(error).splitlines()[0]
    if not rank_zero:
        dist.tell_cause(line)
    if not rank_zero or int(os.environ.get("RANK", "0")) == 0:
        print(f"dist_icm: error: {line}", file=sys.stderr, flush=True)
        if log:
            LOG.info(f"dist_icm: error: {line}")
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        # torch's launcher stops every process when the first one exits: let that be rank 0,
        # after it printed the line (it may reach this point later than this rank)
        time.sleep(_QUIET_RANK_GRACE_S)
    sys.exit(code)


_STARTED = False
_OWN_FULL_ERROR = False  # main() set HYDRA_FULL_ERROR so that Hydra raises its start-up errors


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(raw: DictConfig) -> None:
    global _STARTED
    _STARTED = True
    if _OWN_FULL_ERROR:  # from here on Hydra reports a job's exceptions as it always does
        os.environ.pop("HYDRA_FULL_ERROR", None)
    try:
        cfg = to_config(raw)
    except ConfigError as e:
        _fail(e, BAD_INPUT_EXIT, rank_zero=True)
    hydra_cfg = HydraConfig.get()
    if cfg.run_dir is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        _fail(
            ConfigError(RUN_DIR_IN_SWEEP),  # (SweepCheck says it first, for the basic sweeper)
            BAD_INPUT_EXIT,
            rank_zero=True,
        )
    cfg.run_dir = hydra_cfg.runtime.output_dir
    try:
        run(cfg, _labels(hydra_cfg))
    except (RuntimeError, ValueError) as e:  # resume_force=true with another model/optimizer
        line = _state_mismatch(cfg, e)
        if line is None:
            raise
        _bad_start(line)


def _labels(hydra_cfg) -> dict:
    """How the run was asked for, for summary.json: the command line's overrides (a multirun
    job's own values) and the keys a config's ``hydra.sweeper.params`` sweeps."""
    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {}
    return {
        "overrides": list(hydra_cfg.overrides.task),
        "sweep_keys": sorted(str(k) for k in params),
        "multirun": hydra_cfg.mode == RunMode.MULTIRUN,
    }


def _state_mismatch(cfg: Config, error: Exception) -> str | None:
    """One line for torch's refusal to load a resumed checkpoint's model or optimizer state
    into this run's (``resume_force=true`` with another architecture or optimizer), else None."""
    text = str(error)
    if cfg.resume is None:
        return None
    if isinstance(error, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
        what, key = "weights do", f"model.name={cfg.model.name}"
    elif isinstance(error, ValueError) and text.startswith("loaded state dict"):
        what, key = "optimizer state does", f"optim.name={cfg.optim.name}"
    else:
        return None
    details = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    detail = details[0] if details else text.splitlines()[0]
    detail = detail if len(detail) <= 120 else detail[:117] + "..."
    return (
        f"resume={cfg.resume}: the checkpoint's {what} not fit {key} ({detail}); "
        "resume_force=true cannot change the model or optimizer: resume with the checkpoint's "
        "settings, or start a new run folder"
    )


def _bad_start(line: str) -> None:
    """Print ``dist_icm: error: <line>`` once (rank 0: every rank met it) and exit with 2."""
    _fail(line, BAD_INPUT_EXIT, rank_zero=True)


def _check_command_line() -> None:
    """Hydra's own flags, parsed as Hydra will, so that a bad one is one line and exit 2
    (argparse prints its usage first); the flags that print and exit are left to Hydra."""
    args = sys.argv[1:]
    if any(a in ("-h", "--help", "--hydra-help", "--version") for a in args):
        return
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError:  # another Hydra: it reports bad flags itself
        return
    parser = get_args_parser()

    def error(message: str) -> None:
        if message.startswith("unrecognized arguments"):
            message += " (Hydra's flags come first, then the key=value overrides)"
        _bad_start(f"{message}; see --help")

    parser.error = error  # type: ignore[method-assign]
    parser.parse_args(args)


def _die_with_launcher() -> None:
    """Under torch's elastic launcher (``accelerate launch``, torchrun) each rank runs in its own
    session, so a launcher killed outright (SIGKILL) leaves its ranks training on and writing
    checkpoints into the run folder that a restarted run resumes from. On Linux the kernel is
    asked to kill this process when its parent, the launcher, dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> NoReturn:
    """Console entry point: runs the job (:func:`_main`), then ends the process with its exit
    code through :func:`leave`."""
    try:
        _main()
    except SystemExit as e:
        leave(e.code)
    leave(0)


def leave(code: int | str | None) -> NoReturn:
    """End the process as ``sys.exit(code)`` would, minus the interpreter's teardown: the
    non-daemon threads are joined and the ``atexit`` handlers run (logs flushed, data workers
    stopped, temporary folders removed), then the process exits with ``code``.

    The teardown is where it goes wrong: a process group's thread that finishes a collective
    there (one that a peer's exit just failed) cannot take the interpreter's lock, and the
    process dies with SIGABRT ("terminate called ...") instead of its exit code. Seen in CI
    with Triton loaded, as ``loss.fused`` and ``torch.compile`` load it; tests/test_exit.py
    makes it happen every time."""
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("text"): the text on stderr, exit code 1
        print(code, file=sys.stderr)
        code = 1
    tell_exit_code(code)  # for dist-icm-launch, when it passed a signal on
    getattr(threading, "_shutdown", lambda: None)()  # the interpreter's first step out
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)


def _main() -> None:
    """The job under Hydra. Ranks other than 0 leave no Hydra files behind.

    Hydra's own start-up errors (an unknown key or group option, an override it cannot parse,
    a run folder it cannot make) become one ``dist_icm: error:`` line and exit code 2, like the
    job's; ``HYDRA_FULL_ERROR=1`` shows Hydra's traceback instead. A run that fails at start
    removes the run folder Hydra made for it, if that holds nothing but Hydra's own files.
    """
    global _OWN_FULL_ERROR
    _die_with_launcher()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if not rank0:
        if not any(a.startswith("hydra.run.dir=") for a in sys.argv):
            sys.argv.append("hydra.run.dir=.")  # rank 0's run dir is broadcast at start
        # a multirun's sweep folder is rank 0's: this rank's Hydra writes its multirun.yaml
        # (and makes the cells' folders) in a scratch folder, removed at exit
        scratch = tempfile.mkdtemp(prefix="dist_icm-sweep-")
        atexit.register(shutil.rmtree, scratch, True)
        sys.argv = [a for a in sys.argv if not a.startswith("hydra.sweep.dir=")]
        sys.argv += [
            f"hydra.sweep.dir={scratch}",
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]
    register_schema()
    _check_command_line()
    if "HYDRA_FULL_ERROR" not in os.environ:  # Hydra then raises instead of printing
        os.environ["HYDRA_FULL_ERROR"] = "1"
        _OWN_FULL_ERROR = True
    failed = True
    try:
        _hydra_main()
        failed = False
    except SystemExit as e:
        failed = e.code not in (0, None)
        if e.code == 1 and not _STARTED:  # Hydra's own exits before the job starts
            sys.exit(2)
        raise
    except BadSweep as e:  # a multirun's cell, before any cell ran
        _bad_start(str(e))
    except Exception as e:
        if _STARTED:
            raise
        if not _OWN_FULL_ERROR:  # HYDRA_FULL_ERROR=1 asked for Hydra's traceback
            traceback.print_exc()
            sys.exit(2)
        _bad_start(hydra_error_message(e, sys.argv[1:]))  # the same on every rank
    finally:
        if failed and rank0:
            remove_unused_run_dir()
        dist.shutdown()


if __name__ == "__main__":
    main()
