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
"""

from __future__ import annotations

import logging
import subprocess
import sys

KNOWN_EXITS = (2, 3, 4, 5, 75)  # dist_icm.train's *_EXIT codes and PREEMPTED_EXIT


def _quiet_agent() -> None:
    """Silence torch's elastic agent's own log lines ("failed (exitcode: 2)", "Sending
    process ... closing signal SIGTERM"): a failure it reports is re-reported below."""
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _quiet_agent()
    try:
        launch_command(args)
    except ChildFailedError as failed:  # several processes (torch's elastic agent)
        _, first = failed.get_first_failure()
        if first.exitcode in KNOWN_EXITS:
            sys.exit(first.exitcode)
        print(failed.format_msg(), file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as failed:  # one process
        sys.exit(failed.returncode if failed.returncode > 0 else 1)


if __name__ == "__main__":
    main()
