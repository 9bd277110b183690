"""Crashes: a SIGKILL at any moment, a torn or corrupt newest checkpoint, a full disk.

* **SIGKILL** (the whole process tree, at a moment seen from outside: a logged step, a
  checkpoint file appearing, a checkpoint being written), then ``resume=auto``: the run resumes
  from the newest complete checkpoint (mid-epoch: checkpoints come every 4 steps of a 21-step
  epoch) or, with none yet, from step 0, and ends with exactly the uninterrupted run's
  metrics.jsonl (every loss, lr and evaluation, each once; CPU: identical), on 1 and 2 processes
  and with the torch and FFCV loaders.
* **A bad newest checkpoint** (cut short, overwritten, damaged inside) is named in one line of
  the run's output and the one before is used.
* **A full disk** (a small tmpfs) while saving: earlier checkpoints stay, no partial file is
  left, and every rank stops with one line and exit code 4 (``dist_icm.train.WRITE_EXIT``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli import REPO, launcher, records
from multiproc import free_port

from dist_icm import checkpoint
from dist_icm.checkpoint import CheckpointWriteError
from dist_icm.train import WRITE_EXIT

SPE = 21  # optimizer steps per epoch: digits' 1347 training images, global batch 64
STEPS = 50
EVERY = 4  # a checkpoint every 4 steps: never at an epoch's end (21, 42), so always mid-epoch
ARGS = ["experiment=quickstart", f"train.max_steps={STEPS}", "train.log_every=1",
        "train.progress=false", "train.tensorboard=false", "runtime.threads=1",
        f"train.ckpt_every_steps={EVERY}", "train.keep_ckpts=2"]  # fmt: skip
TIMING = ("train/images_per_sec",)  # the only values that differ between two identical runs


def _command(run_dir: Path, world: int, loader: str, cache: Path, *extra: str) -> list[str]:
    data = [f"data.loader={loader}"] + ([f"data.ffcv_cache={cache}"] if loader == "ffcv" else [])
    job = ["-m", "dist_icm.train", *ARGS, *data, *extra, f"hydra.run.dir={run_dir}"]
    return [*launcher(world), *job]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"train failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def _comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing figures: what an exact resume must reproduce."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records(run_dir)]


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return max(steps)


@pytest.fixture(scope="module")
def ffcv_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ffcv")


def _need(loader: str) -> None:
    if loader != "ffcv":
        return
    from dist_icm.data.datasets import DataError
    from dist_icm.data.write import require_ffcv

    try:
        require_ffcv()
    except DataError as e:
        if os.environ.get("DIST_ICM_REQUIRE_FFCV"):  # CI sets it: there these tests must run
            raise
        pytest.skip(f"ffcv is not importable: {e}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ffcv_cache):
    """The uninterrupted run's folder for (world, loader), made once per module."""
    runs = {}

    def get(world: int, loader: str) -> Path:
        if (world, loader) not in runs:
            run_dir = tmp_path_factory.mktemp(f"whole{world}{loader}")
            _run(_command(run_dir, world, loader, ffcv_cache))
            runs[world, loader] = run_dir
        return runs[world, loader]

    return get


def _kill_point(seed: int) -> tuple[str, int]:
    """(trigger, k), drawn from the seed: kill once step k is logged ("line"), once the
    checkpoint of step k exists ("ckpt"), or while a checkpoint is being written at or after
    step k ("write"); never next to an epoch's end."""
    rng = random.Random(seed)
    trigger = ["write", "line", "ckpt"][seed % 3]  # each kind, whatever the draws
    if trigger == "ckpt":
        return trigger, EVERY * rng.randint(1, (STEPS - 3) // EVERY)
    k = rng.choice([s for s in range(1, STEPS - 2) if min(s % SPE, SPE - s % SPE) > 1])
    return trigger, k


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux: /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants at one instant: all are stopped first, so no
    launcher sees a rank die and signals the others (which would make it a clean preemption).
    Not ``killpg``: torch's elastic launcher starts every rank in a session of its own, so a
    SIGKILL to the launcher's process group leaves the ranks training on, orphaned."""
    tree = _descendants(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in tree[1:]):  # the ranks, reaped by init once orphaned
        assert time.monotonic() < deadline, "a rank survived SIGKILL"
        time.sleep(0.01)


def _kill(cmd: list[str], run_dir: Path, trigger: str, k: int) -> dict:
    """Start ``cmd`` and SIGKILL it with every process it started (the launcher and every rank:
    SIGKILL cannot be forwarded) when ``trigger`` fires; what the kill left."""
    ckpts = run_dir / "checkpoints"
    err = open(run_dir.parent / f"{run_dir.name}.killed.err", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                err.close()
                tail = (run_dir.parent / f"{run_dir.name}.killed.err").read_text()[-2000:]
                raise AssertionError(f"the run ended before {trigger} {k}: {tail}")
            assert time.monotonic() < deadline, f"no {trigger} {k} within 300 s"
            if trigger == "ckpt" and checkpoint.checkpoint_path(ckpts, k).exists():
                break
            if trigger != "ckpt" and _last_step(run_dir) >= k:
                if trigger == "line" or any(ckpts.glob(".ckpt-*.tmp")):
                    break
                if _last_step(run_dir) >= STEPS - 2:  # missed every write: kill anyway
                    break
            time.sleep(0.0005)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
        err.close()
    return {
        "logged": _last_step(run_dir),
        "mid_write": sorted(p.name for p in ckpts.glob(".ckpt-*.tmp")),
        "checkpoints": checkpoint.list_checkpoints(ckpts),
    }


def _kill_and_resume(
    tmp_path, reference, ffcv_cache, world, loader, trigger, k, extra=(), mid_epoch=True
):
    """Kill a run at (trigger, k), resume it, and compare with the uninterrupted run (whose
    metrics do not depend on when checkpoints are written: ``extra`` may change that)."""
    _need(loader)
    whole = reference(world, loader)
    run = tmp_path / "run"
    left = _kill(_command(run, world, loader, ffcv_cache, *extra), run, trigger, k)
    # every checkpoint file in sight is whole (atomic writes), so the newest is the one to use
    for path in left["checkpoints"]:
        assert checkpoint.load(path)["step"] == int(path.name[5:-3])
    newest = int(left["checkpoints"][-1].name[5:-3]) if left["checkpoints"] else None
    assert newest is None or (newest % SPE != 0 or not mid_epoch) and newest <= left["logged"]
    out = _run(_command(run, world, loader, ffcv_cache, *extra, "resume=auto"))
    if newest is None:
        assert "resume=auto: no checkpoint in" in out.stderr and "starting at step 0" in out.stderr
    else:
        assert f"resumed at step {newest}" in out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_at_step"] == newest and summary["steps"] == STEPS
    assert _comparable(run) == _comparable(whole)  # every step and evaluation once, exactly
    assert not list((run / "checkpoints").glob(".ckpt-*.tmp"))  # the killed write's leftover
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr
    print(f"world {world} {loader}: {trigger} {k}: killed at step {left['logged']}, "
          f"mid-write {left['mid_write']}, resumed at {newest}")  # fmt: skip


SLOW = pytest.mark.slow  # 2 processes cost ~75 s a case here (20-50 s more than one)


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=SLOW)])
def test_a_kill_mid_write_resumes_exactly(tmp_path, reference, ffcv_cache, world):
    """The default run's case: torch loader, killed while a mid-epoch checkpoint is written."""
    _kill_and_resume(tmp_path, reference, ffcv_cache, world, "torch", "write", 10)


def test_a_kill_before_the_first_checkpoint_restarts_from_zero(tmp_path, reference, ffcv_cache):
    _kill_and_resume(tmp_path, reference, ffcv_cache, 1, "torch", "line", 1)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("loader", ["torch", "ffcv"])
@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_at_a_random_step_resumes_exactly(
    tmp_path, reference, ffcv_cache, world, loader, seed
):
    _kill_and_resume(tmp_path, reference, ffcv_cache, world, loader, *_kill_point(seed))


def test_kill_points_land_mid_epoch_and_vary():
    points = [_kill_point(seed) for seed in range(5)]
    assert len({t for t, _ in points}) == 3 and len(set(points)) == 5
    assert all(k % SPE not in (0, 1, SPE - 1) for _, k in points)


# --- a bad newest checkpoint -----------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    else:  # "flipped": a few bytes inside a tensor's data; the zip itself stays intact
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64])
                         + data[middle + 64 :])  # fmt: skip


REASONS = {
    "truncated": "(no zip index: truncated, or not written by torch.save)",
    "garbage": "(no zip index: truncated, or not written by torch.save)",
    "flipped": "fails its CRC-32 check: the file is corrupt)",
}


@pytest.fixture(scope="module")
def sixteen_steps(tmp_path_factory, ffcv_cache):
    """Runs of 16 steps with checkpoints at 4, 8, 12 and 16, by world size, made once."""
    runs = {}

    def get(world: int) -> Path:
        if world not in runs:
            run_dir = tmp_path_factory.mktemp(f"sixteen{world}")
            _run(_command(run_dir, world, "torch", ffcv_cache, "train.max_steps=16",
                          "train.keep_ckpts=10"))  # fmt: skip
            runs[world] = run_dir
        return runs[world]

    return get


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "world, how",
    [(1, "truncated"), pytest.param(1, "garbage", marks=SLOW), (1, "flipped"),
     pytest.param(2, "truncated", marks=SLOW), pytest.param(2, "garbage", marks=SLOW),
     pytest.param(2, "flipped", marks=SLOW)],
)  # fmt: skip
def test_a_bad_newest_checkpoint_is_named_in_one_line_and_skipped(
    tmp_path, sixteen_steps, ffcv_cache, world, how
):
    """A crash before the checkpoint of step 16, and the one of step 12 damaged: the resumed
    run says so in one line, resumes at step 8 and trains the same steps again."""
    whole = sixteen_steps(world)
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    (run / "checkpoints" / "ckpt-000000016.pt").unlink()
    (run / "summary.json").unlink()
    bad = run / "checkpoints" / "ckpt-000000012.pt"
    _damage(bad, how)
    extra = ("train.max_steps=16", "train.keep_ckpts=10", "resume=auto")
    out = _run(_command(run, world, "torch", ffcv_cache, *extra))
    lines = [ln for ln in out.stderr.splitlines() if "ckpt-000000012.pt" in ln]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"resume=auto: checkpoint {bad} is unreadable ("), lines[0]
    assert REASONS[how] in lines[0] and lines[0].endswith(
        "): skipped for an older one; set aside as ckpt-000000012.pt.unreadable"
    )
    assert "Warning" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "resumed at step 8" in out.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_at_step"] == 8
    assert _comparable(run) == _comparable(whole)


# --- a full disk -----------------------------------------------------------------------------


def test_a_full_disk_keeps_every_earlier_checkpoint(tmpfs):
    """checkpoint.save on a file system that fills: the error names the file and ENOSPC (which
    torch's zip writer would turn into "unexpected pos ..."), nothing is pruned, no partial file
    stays, and a save that fits afterwards works."""
    folder = tmpfs(1_000 * 1024) / "checkpoints"
    state = {"w": torch.arange(100_000.0)}  # 400 kB: two fit, not a third beside them
    with pytest.raises(CheckpointWriteError) as info:
        for step in range(1, 10):
            checkpoint.save(folder, step, state | {"step": step}, keep=2)
    assert str(info.value) == (
        f"cannot write checkpoint {checkpoint.checkpoint_path(folder, 3)}: No space left on device"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-000000001.pt", "ckpt-000000002.pt"]
    for step in (1, 2):
        assert checkpoint.load(checkpoint.checkpoint_path(folder, step))["step"] == step
    checkpoint.save(folder, 3, {"step": 3}, keep=2)  # a small one fits, and prunes step 1
    assert [p.name for p in checkpoint.list_checkpoints(folder)] == [
        "ckpt-000000002.pt",
        "ckpt-000000003.pt",
    ]


def _ranks(run_dir: Path, world: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """The job on ``world`` processes started as a launcher starts them (one ``python -m
    dist_icm.train`` per rank, RANK etc. set), so that each rank's exit code and output can be
    seen; a rank still running after 300 s fails the test (a hang)."""
    cmd = [sys.executable, "-m", "dist_icm.train", *ARGS, *extra, f"hydra.run.dir={run_dir}"]
    port = free_port()
    procs = []
    for rank in range(world):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",  # as torchrun sets it
        } if world > 1 else dict(os.environ)  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} hung after the failed write") from None
        outs.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return outs


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=SLOW)])
def test_a_full_disk_stops_every_rank_with_one_line(tmpfs, reference, ffcv_cache, world):
    """The run folder on a tmpfs with room for two checkpoints and the run's other files: the
    third save fails; every rank exits 4 (no rank waits for the checkpoint), rank 0 says why in
    one line, and the two checkpoints stay, whole. With room again, resume=auto goes on from the
    second and ends like the uninterrupted run."""
    size = checkpoint.list_checkpoints(reference(1, "torch") / "checkpoints")[-1].stat().st_size
    mount = tmpfs(2 * size + 160 * 1024)  # measured: ~490 kB a checkpoint, ~60 kB the rest
    run = mount / "run"
    outs = _ranks(run, world)
    third = checkpoint.checkpoint_path(run / "checkpoints", 3 * EVERY)
    line = f"dist_icm: error: cannot write checkpoint {third}: No space left on device"
    for rank, out in enumerate(outs):
        assert out.returncode == WRITE_EXIT, (rank, out.stderr[-3000:])
        assert "Traceback" not in out.stderr and "Warning" not in out.stderr, out.stderr[-3000:]
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("dist_icm: error:")]
        assert errors == ([line] if rank == 0 else []), (rank, out.stderr[-3000:])
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        checkpoint.checkpoint_path(ckpts, s).name for s in (EVERY, 2 * EVERY)
    ]  # nothing pruned, no partial file
    assert _last_step(run) == 3 * EVERY  # the steps up to the failed save were logged
    subprocess.run(["mount", "-o", f"remount,size={8 * size}", str(mount)], check=True)
    resumed = _ranks(run, world, "resume=auto")
    assert [o.returncode for o in resumed] == [0] * world, resumed[0].stderr[-3000:]
    assert f"resumed at step {2 * EVERY}" in resumed[0].stderr
    assert _comparable(run) == _comparable(reference(world, "torch"))


def test_a_disk_filled_by_the_logs_is_one_line_too(tmpfs):
    """Room for the logs of a few steps only: train.log's handler fails first (Python's logging
    would print "--- Logging error ---" and a traceback for every line), then metrics.jsonl's
    write stops the run with exit 4 and one line."""
    run = tmpfs(60 * 1024) / "run"
    (out,) = _ranks(run, 1, "train.max_steps=300", "train.ckpt_every_steps=1000",
                    "train.ckpt_every=1000")  # fmt: skip
    assert out.returncode == WRITE_EXIT, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Logging error" not in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("dist_icm: error:")]
    assert errors == ["dist_icm: error: cannot write to the run folder: No space left on device"]


# --- a kill right after an epoch's step checkpoint ---------------------------


def test_a_kill_right_after_an_epoch_end_checkpoint(tmp_path, reference, ffcv_cache):
    """Killed as soon as the checkpoint of step 21 (an epoch's end) appears: the resumed run
    must still log that epoch's evaluation, once. (The trainer used to save a step checkpoint
    that fell on an epoch's end before that epoch's evaluation: this kill then landed between
    the two most times, and the resumed run went on past an evaluation it never logged.)"""
    _kill_and_resume(tmp_path, reference, ffcv_cache, 1, "torch", "ckpt", SPE,
                     extra=("train.ckpt_every_steps=7",), mid_epoch=False)  # fmt: skip
