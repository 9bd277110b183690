"""A real two-node Slurm cluster on this one machine, for the tests (loopback only).

``local_cluster(folder)`` starts munged, slurmctld and two slurmd (``node1``, ``node2``, each with
``CPUS`` CPUs, both on this host's loopback address) from Debian's ``slurm-wlm`` and ``munge``,
with every file in ``folder`` and free ports, and yields the environment for the client commands
(``SLURM_CONF``). On exit it stops every daemon it started, by pid. Needs root (SlurmUser=root),
as on the project's CI machines; ``available()`` says why not where it cannot run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CPUS = 2
# Slurm holds a requeued job back until the old run's credentials have expired (120 s unless
# told); started earlier it fails ("Job credential revoked"). A short lifetime keeps the requeue
# test short: the requeued job starts about this many seconds after its requeue.
CRED_EXPIRE_S = 10
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def available() -> str | None:
    """None where a local cluster can run here, else the reason it cannot."""
    missing = [d for d in DAEMONS if not (shutil.which(d) or Path(f"/usr/sbin/{d}").exists())]
    if missing:
        install = "apt-get install slurm-wlm munge"
        return f"Slurm is not installed ({', '.join(missing)} missing): {install}"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _config(folder: Path, ports: list[int]) -> str:
    host = socket.gethostname()
    nodes = "\n".join(
        f"NodeName=node{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS} "
        "State=UNKNOWN"
        for i, port in enumerate(ports[1:], start=1)
    )
    return f"""ClusterName=dist_icm_test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge/sock,cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
{nodes}
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def local_cluster(folder: Path):
    folder = Path(folder)
    for sub in ("state", "log", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, _free_ports(3)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    logs = open(folder / "log" / "daemons.out", "ab")  # noqa: SIM115
    munge = ["--socket", f"{folder}/munge/sock", "--key-file", str(key), "--force",
             "--pid-file", f"{folder}/munge/pid", "--seed-file", f"{folder}/munge/seed",
             "--log-file", f"{folder}/munge/log", "--foreground"]  # fmt: skip
    commands = [
        [_sbin("munged"), *munge],
        [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)],
        [_sbin("slurmd"), "-D", "-f", str(conf), "-N", "node1"],
        [_sbin("slurmd"), "-D", "-f", str(conf), "-N", "node2"],
    ]
    procs = []
    try:
        for cmd in commands:
            procs.append(subprocess.Popen(cmd, env=env, stdout=logs, stderr=logs))
            time.sleep(0.5)  # munge before slurmctld before the slurmd
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True,
                                 text=True)  # fmt: skip
            if out.stdout.split() == ["idle", "2"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the local Slurm cluster did not come up: {out.stdout}{out.stderr}"
                )
            time.sleep(0.3)
        yield env
    finally:
        if procs:
            _drain(env)
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logs.close()


def _drain(env: dict, timeout: float = 60) -> None:
    """Let the queue empty before the daemons stop, cancelling what is left after ``timeout``:
    a job's ``srun`` can outlive the result its caller waited for (submitit's), and with the
    daemons gone it would wait for them forever."""

    def queued() -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True,
                             text=True)  # fmt: skip
        return out.stdout.split() if out.returncode == 0 else []

    deadline = time.monotonic() + timeout
    while (jobs := queued()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if jobs:
        subprocess.run(["scancel", *jobs], env=env, capture_output=True)
        deadline = time.monotonic() + 15
        while queued() and time.monotonic() < deadline:
            time.sleep(0.5)


def wait_for(job: str, env: dict, timeout: float = 300) -> str:
    """Wait until ``job`` leaves the queue (requeues included); returns its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        if not out.stdout.strip():
            break
        time.sleep(0.5)
    else:
        raise TimeoutError(f"Slurm job {job} still queued after {timeout} s")
    return job_fields(job, env).get("JobState", "?")


def job_fields(job: str, env: dict) -> dict:
    show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    return dict(f.split("=", 1) for f in show.stdout.split() if "=" in f)
