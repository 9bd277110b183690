"""Checkpoints: round trips, pruning, torn/stray files, RNG state, and a real SIGKILL mid-save."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dist_icm import checkpoint as ckpt

REPO_ROOT = Path(__file__).resolve().parents[1]


def _assert_same(a, b) -> None:
    """Exact equality of nested dict/list/tuple structures holding tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, strict=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _training_state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    for _ in range(2):
        nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}


def test_round_trip_model_optimizer_scheduler(tmp_path: Path) -> None:
    state = _training_state()
    assert all("momentum_buffer" in s for s in state["optim"]["state"].values())
    path = ckpt.save(tmp_path, 7, state)
    assert path == ckpt.checkpoint_path(tmp_path, 7) == tmp_path / "ckpt-000000007.pt"
    loaded = ckpt.load(path)
    _assert_same(state, loaded)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 1 and raw["step"] == 7
    assert ckpt.latest(tmp_path)[0] == path


def test_save_refuses_what_weights_only_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['metrics'\]\['acc'\] is a numpy.float64"):
        ckpt.save(tmp_path, 1, {"metrics": {"acc": np.float64(0.5)}})
    with pytest.raises(ValueError, match="keep"):
        ckpt.save(tmp_path, 1, {}, keep=0)
    assert list(tmp_path.iterdir()) == []


def test_keep_last_prunes_by_step(tmp_path: Path) -> None:
    for step in range(1, 6):
        ckpt.save(tmp_path, step, {"step": step}, keep=2)
    assert ckpt.list_checkpoints(tmp_path) == [ckpt.checkpoint_path(tmp_path, s) for s in (4, 5)]
    other = tmp_path / "order"
    ckpt.save(other, 10, {"step": 10})
    ckpt.save(other, 9, {"step": 9})  # newer mtime, older step
    path, state = ckpt.latest(other)
    assert path.name == "ckpt-000000010.pt" and state == {"step": 10}
    ckpt.save(other, 8, {"step": 8}, keep=1)  # the older step itself is the one pruned
    assert ckpt.list_checkpoints(other) == [ckpt.checkpoint_path(other, 10)]


def _shards(folder: Path, step: int) -> Path:
    """What the trainer does under DeepSpeed: shards into the temporary folder, renamed into
    place before the checkpoint file is saved."""
    tmp = ckpt.engine_tmp(folder, step)
    tmp.mkdir(parents=True)
    (tmp / "shard-rank0.pt").write_bytes(b"shard")
    os.replace(tmp, ckpt.engine_dir(folder, step))
    return ckpt.engine_dir(folder, step)


def _companions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_shard_folders_are_pruned_with_their_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 5):
        _shards(tmp_path, step)
        ckpt.save(tmp_path, step, {"step": step}, keep=2)
    assert _companions(tmp_path) == ["ckpt-000000003.zero", "ckpt-000000004.zero"]
    assert (ckpt.engine_dir(tmp_path, 4) / "shard-rank0.pt").read_bytes() == b"shard"
    # a crash between the shards' rename and the file (an orphan), one while the shards were
    # written (a temporary folder): the next save clears both, and keeps what is listed
    _shards(tmp_path, 7)
    ckpt.engine_tmp(tmp_path, 8).mkdir()
    ckpt.save(tmp_path, 5, {"step": 5}, keep=2)
    assert _companions(tmp_path) == ["ckpt-000000004.zero"]  # step 5 had no shards


def test_truncated_newest_is_skipped_with_warning(tmp_path: Path) -> None:
    good = ckpt.save(tmp_path, 3, {"w": torch.arange(10_000.0)})
    data = good.read_bytes()
    torn = ckpt.checkpoint_path(tmp_path, 4)
    torn.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=f"checkpoint {torn} is unreadable .*truncated"):
        path, state = ckpt.latest(tmp_path)
    assert path == good and torch.equal(state["w"], torch.arange(10_000.0))
    torn.write_bytes(data[:40])  # also torn just after the zip header
    with pytest.warns(UserWarning, match="ckpt-000000004.pt is unreadable"):
        assert ckpt.latest(tmp_path)[0] == good


def test_skipped_files_are_listed_in_one_line_each_instead_of_warned(tmp_path: Path) -> None:
    good = ckpt.save(tmp_path, 3, {"w": torch.arange(10_000.0)})
    data = good.read_bytes()
    torn = ckpt.checkpoint_path(tmp_path, 4)
    torn.write_bytes(data[: len(data) // 2])
    flipped = ckpt.checkpoint_path(tmp_path, 5)
    middle = len(data) // 2  # inside the tensor's bytes: the zip's index stays intact
    flipped.write_bytes(
        data[:middle] + bytes(b ^ 1 for b in data[middle : middle + 8]) + data[middle + 8 :]
    )
    skipped: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, state = ckpt.latest(tmp_path, skipped=skipped)
    assert path == good and torch.equal(state["w"], torch.arange(10_000.0))
    assert skipped == [
        f"checkpoint {flipped} is unreadable (archive/data/0 fails its CRC-32 check: the file is "
        "corrupt): skipped for an older one",
        f"checkpoint {torn} is unreadable (no zip index: truncated, or not written by "
        "torch.save): skipped for an older one",
    ]


def test_a_file_damaged_inside_fails_its_crc_check(tmp_path: Path) -> None:
    path = ckpt.save(tmp_path, 1, {"w": torch.arange(10_000.0)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit of one weight
    path.write_bytes(bytes(data))
    raw = torch.load(path, weights_only=True)  # torch alone loads it: a wrong weight, silently
    assert not torch.equal(raw["state"]["w"], torch.arange(10_000.0))
    with pytest.raises(ckpt.CheckpointError, match=r"data/0 fails its CRC-32 check") as info:
        ckpt.load(path)
    assert info.value.path == path and "\n" not in str(info.value)


def test_saves_check_sums_even_when_torch_s_are_off(tmp_path: Path) -> None:
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch always writes CRC-32s")
    torch.serialization.set_crc32_options(False)
    try:
        path = ckpt.save(tmp_path, 1, {"w": torch.ones(3)})
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(ckpt.load(path)["w"], torch.ones(3))


def test_a_failed_write_leaves_no_partial_file_and_prunes_nothing(tmp_path: Path) -> None:
    for step in (1, 2):
        ckpt.save(tmp_path, step, {"step": step}, keep=2)
    before = sorted(p.name for p in tmp_path.iterdir())
    tmp_path.chmod(0o500)  # no new files (root ignores this: then the test is moot, skipped)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (test_crash uses a tmpfs)")
        with pytest.raises(
            ckpt.CheckpointWriteError,
            match=r"cannot write checkpoint .*ckpt-000000003.pt: Permission denied$",
        ):
            ckpt.save(tmp_path, 3, {"step": 3}, keep=2)
    finally:
        tmp_path.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_stray_temp_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    assert ckpt.list_checkpoints(tmp_path / "missing") == []
    assert ckpt.latest(tmp_path) is None
    good = ckpt.save(tmp_path, 5, {"a": 1})
    (tmp_path / ".ckpt-000000007.pt.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "ckpt-latest.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert ckpt.list_checkpoints(tmp_path) == [good]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.latest(tmp_path) == (good, {"a": 1})
    ckpt.save(tmp_path, 6, {"a": 2})  # the next save clears the crashed one's leftover
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_garbage_raises_checkpoint_error(tmp_path: Path) -> None:
    garbage = tmp_path / "ckpt-000000001.pt"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(garbage)
    message = str(info.value)
    assert message.startswith(f"checkpoint {garbage} is unreadable (")
    assert message.endswith("): delete it or pass another") and "\n" not in message
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.ones(2)}, foreign)  # a valid torch file, not ours
    with pytest.raises(ckpt.CheckpointError, match="not a dist_icm checkpoint"):
        ckpt.load(foreign)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"unreadable \(.+\)"):
        ckpt.load(empty)
    with pytest.raises(FileNotFoundError):
        ckpt.load(tmp_path / "nope.pt")


def _draws() -> tuple:
    return random.random(), np.random.rand(4), np.random.randn(3), torch.rand(4), torch.randn(3)


def test_rng_state_round_trip_through_a_file(tmp_path: Path) -> None:
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    saved = ckpt.rng_state()
    expected = _draws()
    path = ckpt.save(tmp_path, 1, {"rng": saved})
    _draws()
    ckpt.set_rng_state(ckpt.load(path)["rng"])
    _assert_same(expected, _draws())
    ckpt.set_rng_state(saved)  # the in-memory capture works the same
    _assert_same(expected, _draws())


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from dist_icm import checkpoint as ckpt
    folder = sys.argv[1]
    step = 0
    while True:
        step += 1
        # ~20 MB, every value = step, so a loaded file can be checked against its own name
        ckpt.save(folder, step, {"w": torch.full((5_000_000,), float(step)), "step": step}, keep=2)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path: Path, seed: int) -> None:
    """SIGKILL a writer a random while after its first save, at a moment it is mid-write."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ckpt.list_checkpoints(tmp_path):
            assert proc.poll() is None, "writer died before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        delay = random.Random(seed).uniform(0.05, 1.5)
        time.sleep(delay)
        while not list(tmp_path.glob(".*.tmp")):  # then strike while a file is being written
            assert proc.poll() is None, "writer exited on its own"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn ckpt-*.pt may ever be visible
        found = ckpt.latest(tmp_path)
    assert found is not None, f"killed after {delay:.2f} s, folder: {names}"
    path, state = found
    assert state["step"] == int(path.name[5:-3]) and state["w"].shape == (5_000_000,)
    assert torch.equal(state["w"], torch.full((5_000_000,), float(state["step"])))
    assert len(ckpt.list_checkpoints(tmp_path)) <= 2, names


def test_set_aside_moves_only_later_steps(tmp_path: Path) -> None:
    # without it the checkpoint resumed from (step 4 here) would be set aside with the newer ones
    for step in (2, 4, 6):
        _shards(tmp_path, step)
        ckpt.save(tmp_path, step, {"step": step}, keep=5)
    moved = ckpt.set_aside(tmp_path, 4)
    aside = tmp_path / "ckpt-000000006.pt.unreadable"
    assert moved == [aside] and aside.is_file()
    assert ckpt.list_checkpoints(tmp_path) == [ckpt.checkpoint_path(tmp_path, s) for s in (2, 4)]
    assert _companions(tmp_path) == [
        "ckpt-000000002.zero",
        "ckpt-000000004.zero",
        "ckpt-000000006.zero.unreadable",
    ]


def test_load_refuses_another_format(tmp_path: Path) -> None:
    # without it a file of another format with a dict "state" would load as if it were ours
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"format": 2, "step": 1, "state": {"a": 1}}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a dist_icm checkpoint of format 1"):
        ckpt.load(path)


def test_zero_checkpoint_without_its_shards_is_unreadable(tmp_path: Path) -> None:
    # without it a ZeRO run would resume from a checkpoint whose weights (the shards) are gone
    state = {"config": {"runtime": {"zero_stage": 2}}, "world_size": 2, "step": 3}
    path = ckpt.save(tmp_path, 3, state)
    with pytest.raises(ckpt.CheckpointError, match=r"ZeRO shards' folder ckpt-000000003\.zero"):
        ckpt.load(path)
    plain = ckpt.save(tmp_path, 4, {"config": {"runtime": {"zero_stage": 0}}, "world_size": 2})
    assert ckpt.load(plain)["world_size"] == 2
