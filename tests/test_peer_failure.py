"""A peer that dies (SIGKILL) or hangs (SIGSTOP) mid-training: the other rank does not hang; it
exits with code 5 and one line within ``runtime.timeout_s`` (passed to the process groups).

The two ranks are started as two separate programs with a launcher's environment, as on two
nodes (each node's launcher watches only its own processes), so nothing but dist_icm itself
stops the surviving rank.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import REPO, launcher

from dist_icm.train import PEER_EXIT

pytestmark = pytest.mark.multiproc
TIMEOUT_S = 15
ARGS = ["experiment=quickstart", "train.epochs=1000", "train.log_every=1", "runtime.threads=1",
        "train.progress=false", "train.tensorboard=false",
        f"runtime.timeout_s={TIMEOUT_S}"]  # fmt: skip


def _start(run_dir: Path, *extra: str) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        cmd = [sys.executable, "-m", "dist_icm.train", *ARGS, *extra]
        cmd += [f"hydra.run.dir={run_dir}"] if rank == 0 else []
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


def _wait_for_steps(run_dir: Path, procs, steps: int) -> None:
    deadline = time.monotonic() + 120
    path = run_dir / "metrics.jsonl"
    while not path.exists() or len(path.read_text().splitlines()) < steps:
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_the_surviving_rank_stops_with_one_line(tmp_path, fault):
    run = tmp_path / "run"
    procs = _start(run)
    try:
        _wait_for_steps(run, procs, 5)
        os.kill(procs[1].pid, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    print(f"\n{fault}: exit {procs[0].returncode} after {took:.1f} s: {last}")
    assert procs[0].returncode == PEER_EXIT, err[-3000:]
    assert "Traceback" not in err
    assert last.startswith("dist_icm: error: rank 0: a collective failed (")
    why = f"another process died, or waited longer than runtime.timeout_s={TIMEOUT_S}"
    assert last.endswith(why)
    if fault == "dies":  # the connection drops at once
        assert took < TIMEOUT_S, took
    else:  # a hung peer is waited for timeout_s, not for torch's default of minutes
        assert "timed out" in last.lower() and TIMEOUT_S - 1 < took < TIMEOUT_S + 45, took


_UNGUARDED_JOB = """
from dist_icm import train
train._die_with_launcher = lambda: None  # the negative control: no PR_SET_PDEATHSIG
train.main()
"""


@pytest.mark.parametrize(
    "guarded, via",
    [(True, "accelerate.commands.launch"), (True, "dist_icm.launch"),
     (False, "accelerate.commands.launch")],
    ids=["deathsig", "deathsig-dist-icm-launch", "negative-control"],
)  # fmt: skip
def test_the_ranks_die_with_their_launcher(tmp_path, guarded, via):
    """``accelerate launch`` (or ``dist-icm-launch``, which runs it in its own process) killed
    outright (SIGKILL, nothing forwarded): its ranks, each in its own session, must not train
    on and write checkpoints for nobody (and without the kernel's death signal they do)."""
    psutil = pytest.importorskip("psutil")
    run = tmp_path / "run"
    job = ["-m", "dist_icm.train"]
    if not guarded:
        (tmp_path / "job.py").write_text(_UNGUARDED_JOB)
        job = [str(tmp_path / "job.py")]
    cmd = [*launcher(2, via), *job, *ARGS, f"hydra.run.dir={run}"]
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    family = []  # the launcher's processes: killed at the end, as orphans too (not pytest's own
    try:  # other children, such as multiprocessing's resource tracker, which killing broke)
        _wait_for_steps(run, [agent], 3)
        family = psutil.Process(agent.pid).children(recursive=True)
        ranks = [p for p in family if job[-1] in " ".join(p.cmdline())]
        assert len(ranks) == 2
        agent.kill()
        agent.wait()
        logged = len((run / "metrics.jsonl").read_text().splitlines())
        gone, alive = psutil.wait_procs(ranks, timeout=15)
        trained_on = len((run / "metrics.jsonl").read_text().splitlines()) - logged
    finally:
        agent.kill()
        for p in family:  # the negative control's ranks train on, orphaned, until killed
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    if guarded:
        assert not alive, [p.pid for p in alive]
    else:
        assert len(alive) == 2 and trained_on > 10, (len(alive), trained_on)


@pytest.mark.parametrize("signalled", [0, 1])
def test_a_signal_to_one_rank_stops_every_rank_at_one_step(tmp_path, signalled):
    # a scheduler may signal one process (not the launcher): its flag reaches the others
    # through the stop flags' all-reduce, and all of them checkpoint the same step and exit 75
    import json

    from dist_icm.checkpoint import list_checkpoints
    from dist_icm.preempt import PREEMPTED_EXIT

    run = tmp_path / "run"
    procs = _start(run)
    try:
        _wait_for_steps(run, procs, 5)
        os.kill(procs[signalled].pid, signal.SIGTERM)
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT] * 2, errs[signalled][-3000:]
    stopped = json.loads((run / "preempted.json").read_text())["step"]
    assert list_checkpoints(run / "checkpoints")[-1].name == f"ckpt-{stopped:09d}.pt"
    why = "SIGTERM" if signalled == 0 else "a signal to another rank"  # rank 0 tells
    assert f"stopped at step {stopped} on {why}: checkpoint written" in errs[0]
    assert not errs[1].strip(), errs[1][-2000:]  # rank 1 adds nothing
