"""A start-up error on several processes: one line, printed once, and exit code 2 on every rank.

* A bad value (every rank finds it alike): rank 0 prints it, the others exit silently.
* Bad data on one node only (each rank reads its own copy, as with node-local disks): the rank
  that finds it shares it, rank 0 prints it once, naming that rank's file, and every rank exits 2.
* Through ``dist-icm-launch`` the launcher adds nothing and exits 2 as well (and 3 for a run
  that diverges); plain ``accelerate launch`` (the negative control) adds a traceback and the
  elastic agent's failure table.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli import REPO, launcher
from multiproc import free_port
from PIL import Image
from sklearn.datasets import load_digits

pytestmark = pytest.mark.multiproc
ARGS = ["experiment=quickstart", "runtime.threads=1", "train.progress=false",
        "train.tensorboard=false", "train.max_steps=2"]  # fmt: skip


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _launch(cwd: Path, *overrides: str, via: str = "dist_icm.launch", multirun=False):
    cmd = [*launcher(2, via), "-m", "dist_icm.train",
           *(["-m"] if multirun else []), *ARGS, *overrides]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _digit_tree(folder: Path, per_class: int = 8, classes: int = 3, test_offset: int = 500):
    """A small ImageFolder of real (sklearn digits) images as JPEG files, ``classes`` classes,
    ``per_class`` training and 2 test images a class."""
    digits = load_digits()
    for split, offset, n in (("train", 0, per_class), ("test", test_offset, 2)):
        for label in range(classes):
            (folder / split / str(label)).mkdir(parents=True)
            picks = np.flatnonzero(digits.target == label)[offset // 50 : offset // 50 + n]
            for i in picks:
                pixels = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert("RGB").resize((32, 32)).save(
                    folder / split / str(label) / f"{i}.jpg"
                )


def test_a_bad_value_is_one_line_from_the_launcher_too(tmp_path):
    out = _launch(tmp_path, "data.global_batch=0")
    assert out.returncode == 2, out.stderr[-3000:]
    assert _lines(out.stderr) == ["dist_icm: error: data.global_batch must be >= 1, got 0"]
    assert not (tmp_path / "outputs").exists()


def test_a_diverging_run_s_code_from_the_launcher_too(tmp_path):
    # not a start-up error: exit code 3, decided on every rank alike, printed by rank 0 alone
    out = _launch(tmp_path, "train.max_steps=6", "optim.lr=1e10", "train.max_skipped=0",
                  "run_dir=run")  # fmt: skip
    assert out.returncode == 3, out.stderr[-3000:]
    (line,) = [ln for ln in _lines(out.stderr) if ln.startswith("dist_icm")]
    assert line.startswith("dist_icm: error: training diverged: step 3: 1 non-finite steps")
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr


def test_a_multirun_on_two_processes_checks_each_cell_for_that_world(tmp_path):
    # every rank composes the sweep alike: a cell whose batch plan only 2 processes break
    # (16 images a rank cannot hold mixing groups of 16 on 2 x 8) stops the sweep before cell 0
    # trains, one line printed once; the same sweep on 2 processes with a plan that fits runs
    # each cell on both ranks, in a folder of its own
    out = _launch(tmp_path, "data.global_batch=64,16", "hydra.sweep.dir=bad", multirun=True)
    assert out.returncode == 2, out.stderr[-3000:]
    assert _lines(out.stderr) == [
        "dist_icm: error: sweep cell 1 (data.global_batch=16): loss.group_size=16 must divide "
        "the per-device batch 8 (global 16 / world 2 / accumulation 1)"
    ]
    assert not (tmp_path / "bad").exists()
    out = _launch(tmp_path, "data.global_batch=64,32", "hydra.sweep.dir=ok", multirun=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads((tmp_path / "ok" / c / "summary.json").read_text()) for c in "01"]
    assert [(s["world_size"], s["global_batch"]) for s in summaries] == [(2, 64), (2, 32)]


def test_a_multirun_s_hydra_files_are_rank_0_s_alone(tmp_path):
    # rank 1 starting later (as on another node) wrote its multirun.yaml (with its own Hydra
    # flags) over rank 0's, and made the cells' folders of a sweep folder of its own
    port, sweep, procs = free_port(), tmp_path / "sweep", []
    for rank in range(2):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO),
        }  # fmt: skip
        cmd = [sys.executable, "-m", "dist_icm.train", "-m", *ARGS, "train.seed=0,1"]
        procs.append(subprocess.Popen([*cmd, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                                      env=env, stderr=subprocess.PIPE, text=True))  # fmt: skip
        deadline = time.monotonic() + 60
        while rank == 0 and not (sweep / "multirun.yaml").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None
            time.sleep(0.05)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    written = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["overrides"]
    assert f"hydra.sweep.dir={sweep}" in written["hydra"], written  # rank 0's, not rank 1's
    assert "hydra/job_logging=disabled" not in written["hydra"], written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    assert all((sweep / c / "summary.json").is_file() for c in "01")


def test_negative_control_plain_accelerate_launch_adds_its_report(tmp_path):
    out = _launch(tmp_path, "data.global_batch=0", via="accelerate.commands.launch")
    assert out.returncode == 1
    assert "ChildFailedError" in out.stderr and "Traceback" in out.stderr
    assert out.stderr.count("dist_icm: error: data.global_batch must be >= 1, got 0") == 1


@pytest.fixture(params=[pytest.param("empty class", marks=pytest.mark.slow), "missing"])
def nodes(tmp_path, request):
    """node0: a good image tree; node1: the same tree with one class folder emptied, or none."""
    _digit_tree(tmp_path / "node0")
    if request.param == "empty class":
        _digit_tree(tmp_path / "node1")
        for image in (tmp_path / "node1" / "train" / "2").iterdir():
            image.unlink()
    return _node_roots(tmp_path)


def _node_roots(tmp_path: Path) -> list[str]:
    root = f"data.root={tmp_path}/node${{oc.env:RANK}}"  # each rank its own copy of the data
    return [root, "data=imagefolder", "data.global_batch=12", "loss.group_size=null",
            "data.num_workers=0"]  # fmt: skip


def _two_programs(tmp_path: Path, *overrides: str, envs=({}, {})) -> list:
    """Ranks 0 and 1 started as two programs, as on two nodes (``envs``: each one's extra
    environment); their exit codes and stderr."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO),
        } | envs[rank]  # fmt: skip
        cmd = [sys.executable, "-m", "dist_icm.train", *ARGS, *overrides]
        cmd.append(f"hydra.run.dir={tmp_path}/run")
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    errs = [p.communicate(timeout=300)[1] for p in procs]
    return [p.returncode for p in procs], errs


def test_a_node_without_what_a_setting_needs_stops_every_rank_in_one_line(tmp_path):
    # loss.fused off CUDA needs Triton's interpreter: rank 0 has it, rank 1 (another node's
    # software) not; rank 0 used to go on into the data's collective and wait for rank 1
    interpret = {"TRITON_INTERPRET": "1"}
    codes, errs = _two_programs(tmp_path, "loss.fused=true", envs=(interpret, {}))
    assert codes == [2, 2] and _lines(errs[1]) == [], errs
    (line,) = _lines(errs[0])
    assert (
        line == "dist_icm: error: loss.fused runs on CUDA (or on the CPU in Triton's interpreter, "
        "TRITON_INTERPRET=1, for tests), not on cpu"
    )


def test_bad_data_on_one_node_is_one_line_from_rank_0(tmp_path, nodes):
    codes, errs = _two_programs(tmp_path, *nodes)
    assert codes == [2, 2], errs
    assert _lines(errs[1]) == []
    assert len(_lines(errs[0])) == 1, errs[0]
    (line,) = _lines(errs[0])
    assert line.startswith("dist_icm: error: ") and "node1" in line and "node0" not in line
    assert "Traceback" not in errs[0]


@pytest.mark.parametrize(
    "node1, difference",
    [({"per_class": 12}, "36 training and 6 test images"),  # 3 steps an epoch against 2
     ({"classes": 4}, "32 training and 8 test images, 4 classes"),  # what it trains differs
     pytest.param({"test_offset": 0}, None, marks=pytest.mark.slow)],  # the same sizes: runs
    ids=["more images", "a class more", "other test images"],
)  # fmt: skip
def test_nodes_with_other_data_stop_at_start_in_one_line(tmp_path, node1, difference):
    # each node's copy valid on its own: rank 1's steps per epoch (or classes) differed, and the
    # run hung in a collective until runtime.timeout_s or died in DDP with a traceback
    _digit_tree(tmp_path / "node0")
    _digit_tree(tmp_path / "node1", **node1)
    out = _launch(tmp_path, *_node_roots(tmp_path), "runtime.timeout_s=60")
    if difference is None:  # the same sizes and classes (which images, it cannot tell)
        assert out.returncode == 0, out.stderr[-3000:]
        return
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = _lines(out.stderr)
    assert line.startswith(f"dist_icm: error: rank 1 reads other data than rank 0 ({difference}")
    assert "against 24 training and 6 test images, 3 classes" in line


def test_bad_data_on_one_node_through_the_launcher(tmp_path, nodes):
    out = _launch(tmp_path, *nodes)
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = _lines(out.stderr)
    assert line.startswith("dist_icm: error: ") and "node1" in line
