"""World-size invariance of the main job under a real `accelerate launch` (gloo, CPU).

With the same seed and global batch, 1, 2 and 3 processes must log the same per-step global
loss (float32; the only differences are summation order, bounded here at 1e-5 relative), and
evaluate to the same test metrics. Negative control: without a fixed mixing group size the
partners depend on the per-device batch, and the same comparison tells the runs apart.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from cli import REPO, records, records_but, run_train, summary

pytestmark = pytest.mark.multiproc

ARGS = [
    "experiment=quickstart",
    "train.max_steps=6",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "runtime.threads=1",
]


def _run(run_dir: Path, world: int, *overrides: str, cwd: Path | None = None) -> list[dict]:
    if cwd is None:
        run_train(run_dir, *ARGS, *overrides, world=world)
    else:  # the user's way to name the folder; ranks > 0 then run in cwd, which must stay empty
        run_train(None, *ARGS, *overrides, f"run_dir={run_dir}", world=world, cwd=cwd)
    return records(run_dir)


def _losses(records):
    return [r["train/loss"] for r in records if "train/loss" in r]


def _close(a, b, rel=1e-5):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b, strict=True))


# 2-64-2 covers 2-64-1; 2-64-2 and 3-48-1 also run NCHW (runtime.channels_last=false)
@pytest.mark.parametrize(
    "world, batch, accum, nhwc",
    [
        pytest.param(2, 64, 1, True, marks=pytest.mark.slow),
        (3, 48, 1, True),
        (2, 64, 2, False),
        (3, 48, 1, False),
    ],
)
def test_same_losses_on_one_and_several_processes(tmp_path, world, batch, accum, nhwc):
    overrides = [f"data.global_batch={batch}", f"runtime.grad_accum={accum}"]
    overrides += [f"runtime.channels_last={str(nhwc).lower()}"]
    one = _run(tmp_path / "one", 1, *overrides)
    cwd = tmp_path / "cwd"  # where the launcher runs: relative paths of any rank land here
    cwd.mkdir()
    many = _run(tmp_path / "many", world, *overrides, cwd=cwd)
    assert len(_losses(one)) == 6
    assert _close(_losses(many), _losses(one)), (_losses(many), _losses(one))
    top1 = [r["test/top1"] for r in (one[-1], many[-1])]
    assert abs(top1[0] - top1[1]) <= 100 / 450  # at most one test image flips
    assert summary(tmp_path / "many")["world_size"] == world
    # side effects on rank 0 only: its run folder holds what one process writes, and nothing
    # was written anywhere else (not in the launcher's working folder, not by other ranks)
    assert list(cwd.iterdir()) == []
    assert _tree(tmp_path / "many") == _tree(tmp_path / "one")


def _tree(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def test_negative_control_per_device_groups_break_invariance(tmp_path):
    one = _run(tmp_path / "one", 1, "loss.group_size=null")
    two = _run(tmp_path / "two", 2, "loss.group_size=null")
    assert not _close(_losses(two), _losses(one))


def test_dropout_ties_the_losses_to_the_world_size(tmp_path):
    # its masks are drawn per (step, rank): 2 ranks' masks are not one process's
    # (tests/test_train.py: with it, a resumed run still equals an uninterrupted one)
    one = _run(tmp_path / "one", 1, "model.dropout=0.3")
    two = _run(tmp_path / "two", 2, "model.dropout=0.3")
    assert len(_losses(one)) == len(_losses(two)) == 6
    assert not _close(_losses(two), _losses(one))


def test_sync_bn_on_cpu_processes_stops_at_start(tmp_path):
    out = run_train(tmp_path / "run", *ARGS, "model.sync_bn=true", world=2, check=False)
    # rank 0 says the one line (every rank knows it), every rank exits 2 (plain accelerate
    # launch then adds its own report; dist-icm-launch would not)
    assert out.returncode != 0
    assert out.stderr.count("dist_icm: error: model.sync_bn=true needs GPUs") == 1
    assert "exitcode  : 2" in out.stderr


BN = ["model=cifar_resnet18", "optim.lr=1e-4", "optim.momentum=0"]


def _nll(records):
    return [r["test/nll"] for r in records if "test/nll" in r]


def test_ghost_batch_norm_makes_a_resnet_world_size_invariant(tmp_path):
    # small steps: float32 rounding (1e-6 in a summed gradient) grows quickly through a
    # BatchNorm ResNet at larger learning rates; the float64 contract is in test_norm_dist.py
    ghost = [*BN, "model.bn_group=16"]
    one, two = _run(tmp_path / "g1", 1, *ghost), _run(tmp_path / "g2", 2, *ghost)
    assert _close(_losses(two), _losses(one)), (_losses(two), _losses(one))
    assert _close(_nll(two), _nll(one))  # the averaged running statistics are one process's
    # negative control: plain BatchNorm normalises per device, and the runs differ
    one, two = _run(tmp_path / "p1", 1, *BN), _run(tmp_path / "p2", 2, *BN)
    assert not _close(_losses(two), _losses(one))


def test_reported_metrics_are_those_of_the_saved_model(tmp_path):
    # plain BatchNorm on 2 processes: each rank's running statistics differ; the report and
    # the checkpoint must both come from the one (rank-averaged) model
    run = tmp_path / "run"
    _run(run, 2, "model=cifar_resnet18")
    reported = summary(run)
    run_train(run, *ARGS, "model=cifar_resnet18", "resume=auto")  # 1 process re-evaluates it
    again = summary(run)
    assert again["resumed_at_step"] == again["steps"] == reported["steps"] == 6
    for key in ("nll", "top1", "ece"):
        assert abs(again[key] - reported[key]) <= 1e-5 * abs(reported[key]), key


def test_torchrun_runs_the_job_as_accelerate_launch_does(tmp_path):
    # README: `torchrun --nproc_per_node N -m dist_icm.train ...` works too
    one = _run(tmp_path / "one", 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dist_icm.train", *ARGS, f"hydra.run.dir={tmp_path / 'two'}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert summary(tmp_path / "two")["world_size"] == 2
    assert _close(_losses(records(tmp_path / "two")), _losses(one))


def test_accelerate_s_cpu_flag_starts_one_process_whatever_the_count(tmp_path):
    # README: `accelerate launch --cpu --num_processes N` starts a single process (Accelerate
    # 1.x sends --cpu to its one-process launcher); --multi_gpu is the way to several
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "-m", "dist_icm.train", *ARGS, f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert summary(tmp_path / "run")["world_size"] == 1


def test_a_run_resumes_on_another_number_of_processes(tmp_path):
    # 6 steps on 1 process, then 6 more on 2 from its checkpoint: the losses of one 12-step run
    # (the quickstart is world-size invariant), and the run's figures cover both sessions
    whole = _run(tmp_path / "whole", 1, "train.max_steps=12")
    _run(tmp_path / "moved", 1, "train.ckpt_every_steps=6")
    moved = _run(tmp_path / "moved", 2, "train.max_steps=12", "resume=auto")
    assert len(_losses(moved)) == 12
    assert _close(_losses(moved), _losses(whole))
    s = summary(tmp_path / "moved")
    assert s["world_size"] == 2 and s["resumed_at_step"] == 6 and s["steps"] == 12
    assert s["run_train_s"] > s["session_train_s"] > 0
    images = s["run_images_per_sec"] * s["run_train_s"]  # every session's images: 12 steps
    assert images == pytest.approx(12 * 64, rel=1e-9)
    assert s["session_images_per_sec"] * s["session_train_s"] == pytest.approx(6 * 64, rel=1e-9)
    assert "the checkpoint's run had" not in (tmp_path / "moved" / "train.log").read_text()


def test_a_run_moved_to_another_number_of_processes_says_what_depends_on_it(tmp_path):
    # mixing groups of the per-device batch and per-rank dropout masks: the resumed steps are
    # a 2-process run's, which the run says at start (it used to go on without a word)
    tied = ["loss.group_size=null", "model.dropout=0.3"]
    _run(tmp_path / "moved", 1, *tied, "train.max_steps=2", "train.ckpt_every_steps=2")
    _run(tmp_path / "moved", 2, *tied, "train.max_steps=3", "resume=auto")
    log = (tmp_path / "moved" / "train.log").read_text()
    assert (
        "resumed on 2 processes, the checkpoint's run had 1: the mixing groups "
        "(loss.group_size=null: each device's batch); dropout's masks (drawn per rank) depend "
        "on it, so the steps from here are a 2-process run's, not the whole run's"
    ) in log, log[-2000:]


@pytest.mark.parametrize("bn_group", ["null", "2"], ids=["batchnorm", "ghost batchnorm"])
def test_a_cut_run_with_batchnorm_on_two_processes_resumes_exactly(tmp_path, bn_group):
    # each rank keeps its own running statistics; their average is what an evaluation scores
    # and a checkpoint's model holds. That average used to replace them for good, so one more
    # checkpoint (the cut) rounded the statistics differently from the whole run (1e-8 in nll)
    common = ["model=tiny_cnn", f"model.bn_group={bn_group}", "train.ckpt_every=100"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_train(whole, *ARGS, *common, "train.max_steps=44", world=2)
    run_train(cut, *ARGS, *common, "train.max_steps=30", world=2)
    run_train(cut, *ARGS, *common, "train.max_steps=44", "resume=auto", world=2)
    assert records_but(cut, 30) == records_but(whole, 30)
    keys = ("top1", "nll", "ece")
    assert [summary(cut)[k] for k in keys] == [summary(whole)[k] for k in keys]
