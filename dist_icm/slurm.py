"""What one Slurm task runs: ``accelerate launch`` for its node, built from Slurm's variables.

``launch/slurm.sbatch`` starts one task per node (``srun --ntasks-per-node=1``); each task runs
``python -m dist_icm.slurm launch -- OVERRIDES...``, which reads *its own* ``SLURM_NODEID`` (so
the machine rank is expanded per task, not once in the batch script) and replaces itself with::

    python -m dist_icm.launch --multi_gpu --num_machines $SLURM_NNODES
        --machine_rank $SLURM_NODEID --main_process_ip <first node> --main_process_port <port>
        --num_processes <nodes x processes per node> -m dist_icm.train run_dir=$RUN_DIR
        resume=auto OVERRIDES...

* processes per node: ``PROCS_PER_NODE`` if set, else the GPUs Slurm gives each node (the count
  in ``SLURM_GPUS_PER_NODE``, such as ``gpu:a100:8``, which ``--gpus-per-node`` sets alike for
  every node), else the GPUs it gave this node (``SLURM_GPUS_ON_NODE``: every node must have as
  many, as Accelerate starts ``num_processes / num_machines`` on each), else 1 (a CPU process;
  several CPU processes need ``PROCS_PER_NODE``);
* the rendezvous: ``MAIN_ADDR`` if set, else the first host of ``SLURM_JOB_NODELIST``; port
  ``MAIN_PORT`` if set, else 20000 + job id mod 10000 (the same on every node of a job; jobs
  whose ids differ by a multiple of 10000 get the same one, so set ``MAIN_PORT`` where such
  jobs may share a node);
* the run folder: ``RUN_DIR`` (the batch script sets it to ``$RUN_ROOT/$SLURM_JOB_ID``, so a
  requeued job finds its own checkpoints) with ``resume=auto``, quoted for Hydra (a folder
  name may hold ``=``, ``,`` or brackets);
* Hydra's flags among the arguments (``--config-dir DIR``, ``-cn NAME``, ...) go before
  ``run_dir``, where Hydra wants them; the overrides after it.

``dist_icm.launch`` is ``accelerate launch`` that exits with the job's own exit code (75 for a
stop with a checkpoint, which the batch script answers with a requeue). ``python -m
dist_icm.slurm print -- OVERRIDES...`` prints the command instead (``DRY_RUN=1``).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping

__all__ = ["expand_nodelist", "node_command", "main"]


def _split_top(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compact host list (``gpu[01-03,07],login1``) as host names, in order."""
    hosts = []
    for item in _split_top(text.strip()):
        match = re.match(r"^(.*?)\[([^\]]+)\](.*)$", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, rest = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for number in range(int(lo), int(hi or lo) + 1):
                hosts += [
                    prefix + str(number).zfill(width) + tail
                    for tail in expand_nodelist(rest) or [""]
                ]
    return hosts


def _int(key: str, value: str, low: int, high: int | None = None) -> int:
    """``value`` of variable ``key`` as an integer in [low, high]; ValueError naming ``key``."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{key}={value!r} must be an integer {span}")
    return number


def _procs_per_node(env: Mapping[str, str]) -> int:
    for key in ("PROCS_PER_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        value = env.get(key, "").strip()
        if value:  # "8", "gpu:8", "gpu:a100:8", "gpu:8(S:0-1)": the count, socket list left out
            return _int(key, re.sub(r"\(.*\)$", "", value).split(":")[-1], 1)
    return 1


def hydra_quoted(value: str) -> str:
    """``value`` as a Hydra override value that parses back to ``value`` itself: as it is where
    it holds only ASCII letters, digits, ``_``, ``/``, ``.`` and ``-``; else quoted, with ``'``
    escaped and the backslashes before a quote or at the end doubled."""
    if re.fullmatch(r"[A-Za-z0-9_/.-]+", value):
        return value
    body = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + body.replace("'", "\\'") + "'"


# Hydra's flags that take their value as the next argument
_FLAG_VALUES = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}


def _flags_first(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides) of the job's arguments, in order."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        if args[i].startswith("-"):
            takes = args[i] in _FLAG_VALUES and i + 1 < len(args)
            flags += args[i : i + 1 + takes]
            i += 1 + takes
        else:
            overrides.append(args[i])
            i += 1
    return flags, overrides


def node_command(env: Mapping[str, str], overrides: list[str]) -> list[str]:
    """The command the task on node ``SLURM_NODEID`` runs (see the module docstring)."""
    missing = [k for k in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID") if k not in env]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if missing or not nodelist:
        missing += [] if nodelist else ["SLURM_JOB_NODELIST"]
        raise ValueError(f"not inside a Slurm task: {', '.join(missing)} unset")
    nodes, node_id, job = (
        _int("SLURM_NNODES", env["SLURM_NNODES"], 1),
        _int("SLURM_NODEID", env["SLURM_NODEID"], 0),
        _int("SLURM_JOB_ID", env["SLURM_JOB_ID"], 0),
    )
    try:
        hosts = expand_nodelist(nodelist)
    except ValueError:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is no Slurm host list") from None
    if len(hosts) != nodes or not 0 <= node_id < nodes:
        raise ValueError(
            f"SLURM_JOB_NODELIST={nodelist!r} does not hold {nodes} nodes with node {node_id}"
        )
    procs = _procs_per_node(env)
    main_addr = env.get("MAIN_ADDR") or hosts[0]
    port = _int("MAIN_PORT", env.get("MAIN_PORT") or str(20000 + job % 10000), 1, 65535)
    run_dir = env.get("RUN_DIR") or f"outputs/slurm/{job}"
    flags, overrides = _flags_first(overrides)
    return [
        env.get("PYTHON", sys.executable), "-m", "dist_icm.launch", "--multi_gpu",
        "--num_machines", str(nodes), "--machine_rank", str(node_id),
        "--main_process_ip", main_addr, "--main_process_port", str(port),
        "--num_processes", str(nodes * procs),
        "-m", "dist_icm.train", *flags, f"run_dir={hydra_quoted(run_dir)}", "resume=auto",
        *overrides,
    ]  # fmt: skip


USAGE = "usage: python -m dist_icm.slurm {launch|print} -- [overrides...]"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):  # the module's docstring says it all
        print(f"{USAGE}\n\n{__doc__}", end="")
        return
    if not args or args[0] not in ("launch", "print"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    verb, overrides = args[0], [a for a in args[1:] if a != "--"]
    try:
        cmd = node_command(os.environ, overrides)
    except ValueError as e:  # bad input: one line and exit 2, as the trainer's
        print(f"dist_icm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if verb == "print":
        print(f"node {os.environ['SLURM_NODEID']}: {shlex.join(cmd)}", flush=True)
        return
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
