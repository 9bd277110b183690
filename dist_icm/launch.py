"""``dist-icm-launch`` (``python -m dist_icm.launch``): ``accelerate launch`` with the job's own
exit codes and nothing else when the job ends one of its documented ways.

It takes exactly ``accelerate launch``'s arguments and runs Accelerate's launcher in this
process. What it changes is only how a failed job is reported. Plain ``accelerate launch``
adds a Python traceback and a 30-line ``ChildFailedError`` table (and torch's elastic agent
its log lines) to the one line dist_icm already printed, and exits with code 1 whatever the
job's code was. Here, when the first failed process exited with one of the codes of
:mod:`dist_icm.train` (2 bad input, 3 diverged, 4 a write failed, 5 a collective failed, 75
stopped by a signal with a checkpoint), the launcher exits with that code and adds nothing.
Any other failure (a crash, a signal, a bug's traceback) is reported as Accelerate reports
it, with the agent's table, and exits 1.

A signal to the launcher itself (SIGTERM, Ctrl-C), with several processes: torch's agent passes
it on to them, waits for them, and raises; Accelerate would then print a traceback and exit 1.
Here the launcher exits with its processes' own code when they all ended with the same
documented one (75: each stopped with a checkpoint); otherwise with 128 + the signal's number
and one line naming their codes. Each process tells its code through a file in a folder the
launcher names (``DIST_ICM_EXIT_DIR``; :func:`tell_exit_code`, from
:func:`dist_icm.train.leave`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KNOWN_EXITS = (2, 3, 4, 5, 75)  # dist_icm.train's *_EXIT codes and PREEMPTED_EXIT
EXIT_DIR_ENV = "DIST_ICM_EXIT_DIR"  # where each process of the job writes its exit code


def _quiet_agent() -> None:
    """Silence torch's elastic agent's own log lines ("failed (exitcode: 2)", "Sending
    process ... closing signal SIGTERM"): a failure it reports is re-reported below."""
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = launch_command_parser()
    parser.prog = "dist-icm-launch"
    parser.description = __doc__.split("\n\n")[0].replace("``", "")  # what it is
    parser.epilog = "exit codes: the job's own (2, 3, 4, 5, 75; see dist_icm.train), else 1"
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    _quiet_agent()
    exits = tempfile.TemporaryDirectory(prefix="dist_icm_exits_")
    os.environ[EXIT_DIR_ENV] = exits.name  # the processes inherit it
    try:
        launch_command(args)
    except SignalException as stop:  # passed on to the processes, which have ended
        sys.exit(_after_signal(stop.sigval, Path(exits.name)))
    except ChildFailedError as failed:  # several processes (torch's elastic agent)
        _, first = failed.get_first_failure()
        if first.exitcode in KNOWN_EXITS:
            sys.exit(first.exitcode)
        print(failed.format_msg(), file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as failed:  # one process
        sys.exit(failed.returncode if failed.returncode > 0 else 1)


def tell_exit_code(code: int) -> None:
    """In a process of a job under ``dist-icm-launch``: write its exit code where the launcher
    reads it after a signal it passed on (:func:`exit_codes`); nothing elsewhere."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    rank, local = os.environ.get("LOCAL_RANK", "0"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        Path(folder, f"rank-{rank}").write_text(f"{code} {local}\n")
    except OSError:  # the launcher is gone, or its folder: nobody to tell
        pass


def exit_codes(folder: Path) -> tuple[dict[int, int], int | None]:
    """The exit codes the job's processes on this machine wrote to ``folder`` ({local rank:
    code}) and how many processes there are on this machine (None if none wrote)."""
    codes, local = {}, None
    for path in folder.glob("rank-*"):
        try:
            code, local = (int(word) for word in path.read_text().split())
            codes[int(path.name.removeprefix("rank-"))] = code
        except (OSError, ValueError):  # cut short: the process was killed while writing
            continue
    return codes, local


def _after_signal(sig: int, folder: Path) -> int:
    """The launcher's exit code after a signal it passed on: the processes' own, where every
    one of this machine's ended with the same documented code (it printed its line); else
    128 + ``sig``, with one line."""
    codes, local = exit_codes(folder)
    if local is not None and len(codes) == local and len(set(codes.values())) == 1:
        (code,) = set(codes.values())
        if code in KNOWN_EXITS:
            return code
    ended = ", ".join(f"rank {r}: {c}" for r, c in sorted(codes.items())) or "none told its code"
    print(
        f"dist_icm: error: the launcher got signal {sig} and passed it on; the processes "
        f"ended so ({ended}; {local or '?'} on this machine)",
        file=sys.stderr,
        flush=True,
    )
    return 128 + int(sig)


if __name__ == "__main__":
    main()
