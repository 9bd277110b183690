"""Across nodes: the batch script's per-node commands, two "nodes" on loopback without Slurm,
and a real two-node Slurm cluster on this machine (training, preemption and requeue, a sweep)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from cli import REPO, losses, records, run_train
from multiproc import free_port

from dist_icm.checkpoint import list_checkpoints
from dist_icm.slurm import expand_nodelist, node_command

SBATCH = REPO / "launch" / "slurm.sbatch"
QUICK = ["experiment=quickstart", "train.log_every=1", "train.progress=false",
         "train.tensorboard=false", "runtime.threads=1"]  # fmt: skip


def test_nodelists_expand_like_slurm():
    assert expand_nodelist("gpu[01-02]") == ["gpu01", "gpu02"]
    assert expand_nodelist("a[1-3,7],login1,b[09-10]-ib") == [
        "a1", "a2", "a3", "a7", "login1", "b09-ib", "b10-ib"
    ]  # fmt: skip
    assert expand_nodelist("node7") == ["node7"]


def test_dry_run_prints_each_node_s_command():
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "8",
           "PYTHON": sys.executable}  # fmt: skip
    env.pop("RUN_DIR", None)
    out = subprocess.run(["bash", str(SBATCH), "experiment=paper_cifar100", "data.root=/d c"],
                         env=env, capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    common = ("-m dist_icm.launch --multi_gpu --num_machines 2 --machine_rank {r} "
              "--main_process_ip gpu01 --main_process_port 24242 --num_processes 16 "
              "-m dist_icm.train run_dir=outputs/slurm/4242 resume=auto "
              "experiment=paper_cifar100 'data.root=/d c'")  # fmt: skip
    assert lines == [f"node {r}: {sys.executable} " + common.format(r=r) for r in (0, 1)]


def test_the_task_command_has_help_and_refuses_other_verbs():
    run = [sys.executable, "-m", "dist_icm.slurm"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "PROCS_PER_NODE" in out.stdout and "MAIN_PORT" in out.stdout
    out = subprocess.run([*run, "start"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.strip() == (
        "usage: python -m dist_icm.slurm {launch|print} -- [overrides...]"
    )


def test_node_commands_take_slurm_s_gpu_counts_and_refuse_outside_a_task():
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_PER_NODE": "gpu:a100:4"}  # fmt: skip
    cmd = node_command(env, [])
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--main_process_port") + 1] == "20007"
    # MAIN_PORT and PROCS_PER_NODE, where set, come before what Slurm says
    cmd = node_command(env | {"MAIN_PORT": "29555", "PROCS_PER_NODE": "2"}, [])
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--main_process_port") + 1] == "29555"
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        node_command({k: v for k, v in env.items() if k != "SLURM_NODEID"}, [])
    with pytest.raises(ValueError, match="does not hold 2 nodes"):
        node_command(env | {"SLURM_NNODES": "2"}, [])
    # a socket list after the count, as some Slurm versions write it
    cmd = node_command(env | {"SLURM_GPUS_PER_NODE": "gpu:8(S:0-1)"}, [])
    assert cmd[cmd.index("--num_processes") + 1] == "8"


@pytest.mark.parametrize(
    "folder",
    ["outputs/slurm/7", "/runs/lr=0.1,b", "/runs/a b [x] (y) #z", "~/runs", "/runs/it's",
     "/runs/back\\slash\\", "/runs/été"],
)  # fmt: skip
def test_the_run_folder_reaches_the_job_as_it_is(folder):
    # pasted unquoted into run_dir=..., a folder with "=", ",", brackets, "#" or "~" failed
    # every job with Hydra's parse error
    from hydra.core.override_parser.overrides_parser import OverridesParser

    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "n1", "RUN_DIR": folder}  # fmt: skip
    cmd = node_command(env, ["train.seed=1"])
    given = next(a for a in cmd if a.startswith("run_dir="))
    (parsed,) = OverridesParser.create().parse_overrides([given])
    assert parsed.value() == folder


def test_hydra_s_flags_go_before_the_overrides_and_gpu_counts_are_per_node():
    # after run_dir=..., Hydra refused its own flags ("Hydra's flags come first")
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_PER_NODE": "gpu:4",
           "SLURM_GPUS_ON_NODE": "2"}  # fmt: skip
    cmd = node_command(env, ["--config-dir", "/my/configs", "+tweak=t", "-cn", "mine", "x=1"])
    job = cmd[cmd.index("dist_icm.train") + 1 :]
    assert job == ["--config-dir", "/my/configs", "-cn", "mine", "run_dir=outputs/slurm/7",
                   "resume=auto", "+tweak=t", "x=1"]  # fmt: skip
    # --gpus-per-node (the same on every node) before this node's own count, which could
    # differ between nodes and so give them different world sizes
    assert cmd[cmd.index("--num_processes") + 1] == "8"


@pytest.mark.parametrize(
    "key, value, line",
    [("MAIN_PORT", "abc", "MAIN_PORT='abc' must be an integer in [1, 65535]"),
     ("MAIN_PORT", "99999", "MAIN_PORT='99999' must be an integer in [1, 65535]"),
     ("PROCS_PER_NODE", "abc", "PROCS_PER_NODE='abc' must be an integer >= 1"),
     ("PROCS_PER_NODE", "0", "PROCS_PER_NODE='0' must be an integer >= 1"),
     ("SLURM_NNODES", "two", "SLURM_NNODES='two' must be an integer >= 1"),
     ("SLURM_JOB_NODELIST", "gpu[01-x]", "SLURM_JOB_NODELIST='gpu[01-x]' is no Slurm host list")],
)  # fmt: skip
def test_a_bad_variable_is_one_line_naming_it_and_exit_2(key, value, line):
    env = os.environ | {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
                        "SLURM_JOB_NODELIST": "gpu[01-02]", key: value}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "dist_icm.slurm", "print"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and out.stderr.splitlines() == [f"dist_icm: error: {line}"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """40 steps on 2 processes of one machine: what 2 nodes of 1 process each must repeat bit
    for bit (the same 2-rank reductions). 1 and 2 processes agree to rounding
    (test_train_dist.py); over 40 steps training can amplify that rounding past any tolerance
    after a harmless change, so the nodes are held to the exact 2-process run instead."""
    run = tmp_path_factory.mktemp("two")
    run_train(run, *QUICK, "train.max_steps=40", "train.ckpt_every_steps=1000", world=2)
    assert len(losses(run)) == 40  # every step logged: equal losses are not two empty logs
    return losses(run)


@pytest.mark.multiproc
def test_two_nodes_without_slurm_train_like_two_local_processes(tmp_path, two_processes):
    # two launcher groups, as on two machines, meeting on 127.0.0.1
    port, run = free_port(), tmp_path / "run"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--num_processes",
                "2",
                "-m",
                "dist_icm.train",
                *QUICK,
                "train.max_steps=40",
                f"run_dir={run}",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert losses(run) == two_processes  # bit for bit
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


# --- a real Slurm: two nodes on this machine -------------------------------------------------

WHY_NOT = slurm_cluster.available()
needs_slurm = pytest.mark.skipif(
    WHY_NOT is not None and not os.environ.get("DIST_ICM_REQUIRE_SLURM"),
    reason=WHY_NOT or "",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if WHY_NOT:  # CI sets DIST_ICM_REQUIRE_SLURM: there the cluster must run
        raise RuntimeError(WHY_NOT)
    with slurm_cluster.local_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def _submit(env, tmp_path, *overrides, extra_env=None) -> str:
    job_env = {**env, "MAIN_ADDR": "127.0.0.1", "RUN_ROOT": str(tmp_path / "runs"),
               "PYTHON": sys.executable, **(extra_env or {})}  # fmt: skip
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", f"--output={tmp_path}/job-%j.out", str(SBATCH),
         *QUICK, *overrides],
        env=job_env, capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    return out.stdout.strip().split(";")[0]


@needs_slurm
@pytest.mark.multiproc
def test_slurm_two_nodes_train_like_two_local_processes(tmp_path, cluster, two_processes):
    job = _submit(cluster, tmp_path, "train.max_steps=40")
    assert slurm_cluster.wait_for(job, cluster) == "COMPLETED", (
        tmp_path / f"job-{job}.out"
    ).read_text()
    run = tmp_path / "runs" / job
    assert losses(run) == two_processes  # bit for bit
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


@needs_slurm
@pytest.mark.multiproc
@pytest.mark.parametrize("sig", ["USR1", "TERM"])  # the warning before the limit; preemption
def test_slurm_warning_signal_checkpoints_requeues_and_resumes_exactly(tmp_path, cluster, sig):
    cut = _submit(cluster, tmp_path, "train.max_steps=120")
    metrics = tmp_path / "runs" / cut / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 20):
        assert time.monotonic() < deadline, "the second job did not get going"
        time.sleep(0.1)
    # what Slurm does before the time limit (USR1 to the batch script: --signal=B:USR1@...),
    # or a SIGTERM to it
    subprocess.run(["scancel", f"--signal={sig}", "--batch", cut], env=cluster, check=True)
    whole = _submit(cluster, tmp_path, "train.max_steps=120")  # the same job, left alone
    assert slurm_cluster.wait_for(cut, cluster) == "COMPLETED"
    assert slurm_cluster.wait_for(whole, cluster) == "COMPLETED"
    log = (tmp_path / f"job-{cut}.out").read_text()
    stopped = int(log.split("dist_icm: stopped at step ")[1].split()[0])
    assert 20 <= stopped < 120 and f"requeueing job {cut}" in log
    assert f"resumed at step {stopped}" in log
    assert slurm_cluster.job_fields(cut, cluster)["Restarts"] == "1"
    a, b = tmp_path / "runs" / whole, tmp_path / "runs" / cut
    assert losses(b) == losses(a) and records(b)[-1] == records(a)[-1]  # exactly


def _logged(run: Path, steps: int, timeout: float = 120) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"{run} did not log {steps} steps"
        time.sleep(0.1)


@needs_slurm
@pytest.mark.multiproc
@pytest.mark.parametrize("before", ["fresh", "stopped"])
def test_a_run_that_fails_is_not_requeued(tmp_path, cluster, before):
    # the negative of the above: only a run that stopped with a checkpoint is requeued; also
    # where an earlier session stopped (its preempted.json stays until a run resumes): such a
    # job that failed on restart used to be requeued over and over
    extra = None
    if before == "stopped":
        run = tmp_path / "runs" / "requeued"
        run.mkdir(parents=True)
        (run / "preempted.json").write_text('{"step": 5, "signal": "SIGUSR1"}\n')
        os.utime(run / "preempted.json", (time.time() - 600,) * 2)  # the earlier session's
        extra = {"RUN_DIR": str(run)}
    job = _submit(cluster, tmp_path, "data.global_batch=0", extra_env=extra)
    assert slurm_cluster.wait_for(job, cluster) == "FAILED"
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "dist_icm: error: data.global_batch must be >= 1, got 0" in log
    assert "requeueing" not in log and slurm_cluster.job_fields(job, cluster)["Restarts"] == "0"


@needs_slurm
@pytest.mark.multiproc
def test_a_job_its_user_cancels_checkpoints_and_is_not_requeued(tmp_path, cluster):
    # `scancel JOB` sends SIGTERM, as a preemption does: the run checkpoints and stops (exit
    # 75), but the job stays cancelled; it used to requeue itself and train on
    job = _submit(cluster, tmp_path, "train.epochs=1000")  # runs until it is stopped
    run = tmp_path / "runs" / job
    _logged(run, 20)
    subprocess.run(["scancel", job], env=cluster, check=True)
    assert slurm_cluster.wait_for(job, cluster) == "CANCELLED"
    log = (tmp_path / f"job-{job}.out").read_text()
    assert f"dist_icm: job {job} was cancelled: stopped with a checkpoint, not requeued" in log
    assert "requeueing" not in log and slurm_cluster.job_fields(job, cluster)["Restarts"] == "0"
    stopped = int(log.split("dist_icm: stopped at step ")[1].split()[0])
    assert list_checkpoints(run / "checkpoints")[-1].name == f"ckpt-{stopped:09d}.pt"


@needs_slurm
@pytest.mark.multiproc
def test_a_sweep_through_hydra_s_submitit_launcher(tmp_path, cluster):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "dist_icm.train", "-m", "hydra/launcher=submitit_slurm",
         f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=debug",
         "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
         *QUICK, "train.max_steps=5", "data.global_batch=32,64"],
        env=cluster, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    done = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [(s["global_batch"], s["steps"]) for s in done] == [(32, 5), (64, 5)]
    assert list((sweep / ".submitit").glob("*_0"))  # it went through Slurm's job array
