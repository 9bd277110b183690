"""Stopping on a signal: the run checkpoints the step it stopped at, exits with code 75, and the
resumed run ends exactly like an uninterrupted one (CPU: identical metrics and losses)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli import REPO, last_logged, launcher, losses, records, run_train, summary
from multiproc import run_group

from dist_icm import preempt
from dist_icm.checkpoint import list_checkpoints
from dist_icm.preempt import PREEMPTED_EXIT, StopFlags

ARGS = ["experiment=quickstart", "train.max_steps=200", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "runtime.threads=1"]  # fmt: skip


def _launch(run_dir: Path, world: int, *extra: str, via: str = "accelerate.commands.launch"):
    cmd = [*launcher(world, via), "-m", "dist_icm.train", *ARGS, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(  # a session of its own: a signal to its process group is to it
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _interrupt(run_dir: Path, world: int, sig: signal.Signals, after: int = 25, extra=(),
               group=False, **launch):  # fmt: skip
    proc = _launch(run_dir, world, *extra, **launch)
    deadline = time.monotonic() + 120
    while _logged_steps(run_dir) < after:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.02)
    if group:  # every process of the run, DataLoader workers too, as Slurm signals a job step
        os.killpg(proc.pid, sig)
    else:  # the launcher's pid under accelerate launch: it forwards the signal
        os.kill(proc.pid, sig)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.monotonic() - t0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}
    for world in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"whole{world}")
        run_train(run_dir, *ARGS, world=world)
        runs[world] = run_dir
    return runs


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "world, sig, workers",
    [
        (1, signal.SIGTERM, 0),
        pytest.param(1, signal.SIGUSR1, 0, marks=pytest.mark.slow),  # Slurm's: test_slurm too
        pytest.param(1, signal.SIGINT, 0, marks=pytest.mark.slow),  # the same handler
        # 2 processes stopping at one step: also test_slurm's 2-node warning-signal test
        pytest.param(2, signal.SIGTERM, 0, marks=pytest.mark.slow),
        # to every process, DataLoader workers too (Slurm's preemption), and a resume mid-epoch
        # with workers (the whole run, with none, is the same run)
        (1, signal.SIGTERM, 2),
        pytest.param(1, signal.SIGUSR1, 2, marks=pytest.mark.slow),
    ],
)
def test_a_signal_checkpoints_the_step_and_the_resumed_run_is_exact(
    tmp_path, uninterrupted, world, sig, workers
):
    run = tmp_path / "run"
    loader = [f"data.num_workers={workers}"]
    code, err, took = _interrupt(run, world, sig, extra=loader, group=workers > 0)
    # one process exits with the documented code; accelerate's launcher reports its own failure
    assert code == PREEMPTED_EXIT if world == 1 else code != 0, err[-2000:]
    assert took < 30
    marker = json.loads((run / "preempted.json").read_text())
    stopped = marker["step"]
    assert 25 <= stopped < 200 and marker["signal"] == sig.name
    assert list_checkpoints(run / "checkpoints")[-1].name == f"ckpt-{stopped:09d}.pt"
    assert max(losses(run)) == stopped  # nothing was trained past the checkpoint
    assert f"stopped at step {stopped} on {sig.name}: checkpoint written" in err
    assert f"stopped at step {stopped} on {sig.name}: checkpoint written" in last_logged(run)
    run_train(run, *ARGS, *loader, "resume=auto", world=world)
    assert not (run / "preempted.json").exists()
    whole = uninterrupted[world]
    assert losses(run) == losses(whole)
    assert records(run)[-1] == records(whole)[-1]  # the final test metrics, exactly
    evals = [[r for r in records(d) if "test/top1" in r] for d in (run, whole)]
    assert evals[0] == evals[1]  # every epoch's evaluation, once, as in the whole run
    assert summary(run)["resumed_at_step"] == stopped


@pytest.mark.multiproc
def test_dist_icm_launch_passes_a_signal_on_and_exits_with_the_jobs_code(tmp_path):
    """SIGTERM to ``dist-icm-launch`` (2 processes): both stop with a checkpoint, and the
    launcher exits 75 with no traceback (plain accelerate: 1 and a traceback, as the slow
    2-process case above shows)."""
    run = tmp_path / "run"
    code, err, took = _interrupt(run, 2, signal.SIGTERM, via="dist_icm.launch")
    assert code == PREEMPTED_EXIT and took < 30, err[-2000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("dist_icm:")] == [
        f"dist_icm: stopped at step {json.loads((run / 'preempted.json').read_text())['step']} "
        f"on SIGTERM: checkpoint written; resume with resume=auto (exit code 75)"
    ]


@pytest.mark.parametrize(
    "written, expected, line",
    [
        ({"rank-0": "75 2", "rank-1": "75 2"}, 75, None),
        ({"rank-0": "75 2"}, 128 + 15, "rank 0: 75; 2 on this machine"),  # one was killed
        ({"rank-0": "75 2", "rank-1": "5 2"}, 128 + 15, "rank 0: 75, rank 1: 5; 2 on this"),
        ({"rank-0": "1 1"}, 128 + 15, "rank 0: 1; 1 on this machine"),  # not a documented code
        ({"rank-0": "7"}, 128 + 15, "none told its code; ? on this machine"),  # cut short
        ({}, 128 + 15, "none told its code"),
    ],
)
def test_the_launcher_s_code_after_a_signal(tmp_path, capsys, written, expected, line):
    from dist_icm.launch import _after_signal

    for name, text in written.items():
        (tmp_path / name).write_text(text)
    assert _after_signal(signal.SIGTERM, tmp_path) == expected
    err = capsys.readouterr().err
    if line is None:
        assert err == ""
    else:
        assert err.startswith("dist_icm: error: the launcher got signal 15") and line in err


def test_what_a_process_tells_is_what_the_launcher_reads(tmp_path, monkeypatch):
    from dist_icm.launch import EXIT_DIR_ENV, exit_codes, tell_exit_code

    tell_exit_code(75)  # no launcher's folder: nothing written anywhere
    monkeypatch.setenv(EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, code in ((0, 75), (1, 5)):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        tell_exit_code(code)
    assert exit_codes(tmp_path) == ({0: 75, 1: 5}, 2)


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT asks for a checkpoint and a stop; the second raises KeyboardInterrupt
    there and then, and gives the signals back to their previous handlers."""
    before = signal.getsignal(signal.SIGINT)
    flags = StopFlags().join(None, is_main=True, ckpt_every_min=None)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in this (the main) thread, at its next instruction
        assert flags.received == "SIGINT" and flags.poll().stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        flags.close()


def test_checkpoints_every_few_steps_and_minutes(tmp_path):
    run_train(tmp_path / "steps", *ARGS, "train.max_steps=20", "train.ckpt_every_steps=7",
              "train.keep_ckpts=10")  # fmt: skip
    names = [p.name for p in list_checkpoints(tmp_path / "steps" / "checkpoints")]
    assert names == [f"ckpt-{s:09d}.pt" for s in (7, 14, 20)]
    run_train(tmp_path / "clock", *ARGS, "train.max_steps=12", "train.ckpt_every_min=1e-6",
              "train.keep_ckpts=20")  # fmt: skip
    steps = [int(p.name[5:-3]) for p in list_checkpoints(tmp_path / "clock" / "checkpoints")]
    assert steps == list(range(1, 13))  # due at every step: the clock is always past due


@pytest.mark.multiproc
def test_the_clock_s_checkpoints_on_two_processes(tmp_path):
    # rank 0's clock decides and the stop flags carry its decision (one step late): every rank
    # joins each save, and the run ends normally with a checkpoint at every step from step 2
    run_train(tmp_path, *ARGS, "train.max_steps=8", "train.ckpt_every_min=1e-6",
              "train.keep_ckpts=20", world=2)  # fmt: skip
    steps = [int(p.name[5:-3]) for p in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == list(range(2, 9)), steps


def _clock_checkpoint_steps(rank: int, world_size: int, steps: int) -> list[int]:
    """Poll the stop flags once a step on a clock that advances 1 s a step, with checkpoints due
    every 5 s, and write (restart the clock) wherever the agreed flags ask: the steps written."""
    from types import SimpleNamespace

    from dist_icm import dist, preempt

    now, real = [0.0], preempt.time
    preempt.time = SimpleNamespace(monotonic=lambda: now[0])  # put back below
    group = dist.default_group() if world_size > 1 else None
    written = []
    try:
        flags = StopFlags().join(group, is_main=rank == 0, ckpt_every_min=5 / 60)
        try:
            for step in range(1, steps + 1):
                now[0] = float(step)
                if flags.poll().checkpoint:
                    written.append(step)
                    flags.checkpoint_written()
        finally:
            flags.close()
    finally:
        preempt.time = real
    return written


@pytest.mark.multiproc
def test_a_clock_s_checkpoint_is_written_once_on_two_processes():
    # due every 5 s; one process writes at once, two one step late (the flags' reduction), but
    # each due checkpoint once: rank 0 asking again at the step the save comes wrote a second one
    assert _clock_checkpoint_steps(0, 1, 24) == [5, 10, 15, 20]
    assert preempt.time is time  # the fake clock was this call's alone
    assert run_group(_clock_checkpoint_steps, 2, 24) == [[6, 12, 18, 24]] * 2


def test_checkpoints_every_few_epochs_and_the_newest_kept(tmp_path):
    # the defaults the README states, then the job: every epoch here, 5 epochs, the newest 3 kept
    from omegaconf import OmegaConf

    from dist_icm.config import TrainConfig

    shipped = OmegaConf.load(REPO / "configs" / "train" / "default.yaml")
    for defaults in (TrainConfig(), shipped):  # and max_skipped's (tests/test_nonfinite.py)
        assert (defaults.ckpt_every, defaults.keep_ckpts, defaults.max_skipped) == (10, 3, 3)
    run_train(tmp_path, *ARGS, "train.max_steps=null", "train.epochs=5", "train.ckpt_every=1")
    per_epoch = summary(tmp_path)["steps"] // 5
    steps = [int(p.name[5:-3]) for p in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [3 * per_epoch, 4 * per_epoch, 5 * per_epoch]


def test_a_reduction_a_dead_peer_failed_is_raised_once_and_the_handlers_come_back():
    # the trainer closes the flags, then the main job: the second close waited on the failed
    # reduction again and raised past the run's exit 5 (a traceback, exit 1; seen in CI)
    class Failed:
        def wait(self):
            raise RuntimeError("Connection reset by peer")

    before = signal.getsignal(signal.SIGTERM)
    flags = StopFlags()
    assert signal.getsignal(signal.SIGTERM) is not before
    flags._pending = (Failed(), None)  # as poll() leaves the reduction it started
    with pytest.raises(RuntimeError, match="reset by peer"):
        flags.close()
    assert signal.getsignal(signal.SIGTERM) is before  # restored all the same
    flags.close()  # nothing left to wait for


class _Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        time.sleep(0.01)
        return i


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet_worker", "negative_control"])
def test_a_loader_s_workers_leave_the_stop_signals_to_the_trainer(quiet):
    # Slurm signals every process of a step: a worker killed by another process's SIGTERM (or
    # USR1) made the trainer raise; with quiet_worker only its own trainer's SIGTERM ends it
    init = preempt.quiet_worker if quiet else None
    loader = torch.utils.data.DataLoader(_Slow(), batch_size=4, num_workers=2, worker_init_fn=init)
    batches = iter(loader)
    first = next(batches)
    worker = batches._workers[0]

    def signal_and_drain() -> list:
        for sig in ("TERM", "USR1", "INT"):  # sent by another process, as Slurm's are
            subprocess.run(["kill", f"-{sig}", str(worker.pid)], capture_output=True)
        time.sleep(0.5)
        return list(batches)

    if not quiet:  # (torch's SIGCHLD handler may raise it as soon as the worker dies)
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            signal_and_drain()
        return
    rest = signal_and_drain()  # every batch: the worker lived on
    assert torch.cat([first, *rest]).tolist() == list(range(64))
    it = iter(loader)  # new workers: the trainer's own SIGTERM (multiprocessing's terminate)
    next(it)
    worker = it._workers[0]
    worker.terminate()
    worker.join(timeout=10)
    assert worker.exitcode == 0


_SIGNAL_IN_SETUP = """
import os, signal, sys
import dist_icm.train as main_job
real, sig = main_job.setup, getattr(signal, sys.argv.pop(1))
def setup(cfg):  # the signal reaches the run while it is being set up
    os.kill(os.getpid(), sig)
    return real(cfg)
main_job.setup = setup
main_job.main()
"""


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_a_signal_while_the_run_is_set_up_stops_it_at_its_first_step(tmp_path, uninterrupted, sig):
    # setting a run up may take minutes (FFCV files): a stop there used to kill the process
    # (exit 143 / 138), which the batch script does not requeue
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", _SIGNAL_IN_SETUP, sig, *ARGS, f"hydra.run.dir={run}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == PREEMPTED_EXIT, out.stderr[-2000:]
    assert f"stopped at step 1 on {sig}: checkpoint written" in out.stderr
    assert json.loads((run / "preempted.json").read_text())["step"] == 1
    run_train(run, *ARGS, "resume=auto")
    assert losses(run) == losses(uninterrupted[1])


def test_a_ctrl_c_while_the_run_is_set_up_stops_it_at_once(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", _SIGNAL_IN_SETUP, "SIGINT", *ARGS, f"hydra.run.dir={run}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode not in (0, PREEMPTED_EXIT) and "KeyboardInterrupt" in out.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
