"""The main job end to end through its real command line (Hydra, Accelerate, digits data)."""

import json
import math
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli import REPO, losses, records, records_but, run_train, setup_job, summary

from dist_icm import tiled

QUICK = ["experiment=quickstart", "train.progress=false", "train.tensorboard=false"]


def train(run_dir: Path, *overrides: str, check: bool = True):
    return run_train(run_dir, *QUICK, *overrides, check=check)


SUMMARY_KEYS = (
    "top1",
    "top5",
    "nll",
    "ece",
    "epochs",
    "steps",
    "global_batch",
    "world_size",
    "cuda_graphs",
    "skipped_steps",
    "resumed_at_step",
    "session_wall_s",
    "session_train_s",
    "session_images_per_sec",
    "run_train_s",
    "run_images_per_sec",
    # what the run was, for dist_icm.study (tests/test_scaling.py checks their values)
    "dup_share",
    "peak_lr",
    "config",
    "overrides",
    "sweep_keys",
    "multirun",
)


def _strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_short_run_writes_its_run_dir(tmp_path):
    # a deep folder: its path is longer than the 80 columns a non-terminal console assumes
    run = tmp_path / ("a-long-folder-name-" * 4) / "run"
    out = train(run, "train.max_steps=12", "train.log_every=4", "train.tensorboard=true")
    summary = _strict_json(run / "summary.json")
    assert set(summary) == set(SUMMARY_KEYS)
    assert summary["steps"] == 12 and summary["world_size"] == 1
    assert summary["cuda_graphs"] is False  # on the CPU (tests/test_gpu.py: True on CUDA)
    assert summary["global_batch"] == 64 and 0 <= summary["ece"] <= 1
    assert summary["resumed_at_step"] is None
    assert summary["run_train_s"] == summary["session_train_s"] > 0
    assert summary["session_wall_s"] > summary["session_train_s"]
    logged = records(run)
    assert sorted(losses(run)) == [4, 8, 12]
    assert all({"step", "epoch"} <= r.keys() for r in logged)
    assert any("test/top1" in r for r in logged)
    assert (run / ".hydra" / "config.yaml").exists()
    assert (run / "lr_schedule.png").stat().st_size > 1000
    assert list((run / "tb").iterdir())  # TensorBoard events
    assert list((run / "checkpoints").glob("ckpt-*.pt"))
    # off a terminal: whole lines, never wrapped, so paths and numbers stay greppable
    start = [ln for ln in out.stderr.splitlines() if ln.startswith("global batch 64")]
    assert len(start) == 1 and start[0].endswith(f"run dir {run}")
    assert f"top1 {summary['top1']:.4g}" in out.stdout.splitlines()
    # off a terminal stdout holds the results alone, as `key value` lines (no stray warning:
    # Accelerate's unwrap_model imported DeepSpeed, whose import warned on CPU machines)
    results = out.stdout.splitlines()
    assert results[0] == "dist_icm results", out.stdout[:500]
    assert all(re.fullmatch(r"\S+ \S+", line) for line in results[1:]), out.stdout[:500]
    step12 = [ln for ln in out.stderr.splitlines() if ln.startswith("step 12 ")]
    assert len(step12) == 2 and all("\n" not in ln for ln in step12)
    # train.log holds what was shown, with time stamps
    log = (run / "train.log").read_text()
    assert start[0] in log and "step 12 " in log and "top1 " in log


def test_run_dir_is_honoured(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_train(None, *QUICK, "train.max_steps=2", f"run_dir={tmp_path / 'mine'}", cwd=cwd)
    assert (tmp_path / "mine" / "summary.json").is_file()
    out = run_train(None, "-m", *QUICK, "run_dir=somewhere", "train.seed=0,1", check=False,
                    cwd=cwd)  # fmt: skip
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "dist_icm: error: run_dir names one run's folder: with -m set hydra.sweep.dir instead"
    ]  # before the sweep starts: it used to launch, and leave multirun/.../0/ in cwd
    assert not any(cwd.iterdir())


def test_a_diverged_run_still_writes_strict_json(tmp_path):
    train(tmp_path, "train.max_steps=3", "optim.lr=1e10")
    summary = _strict_json(tmp_path / "summary.json")
    assert summary["nll"] is None  # NaN, written as null
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=foo", "unknown model 'foo'"),
        ("loss.alpha=0", "alpha must be > 0"),
        ("data.global_batch=100000", "exceeds the 1347 training samples"),
        ("data.num_classes=100", "data.num_classes=100 but digits has 10 classes"),
        ("loss.group_size=7", "group_size=7 must divide"),
        ("resume=/no/such.pt", "no such checkpoint"),
        ("runtime.precision=fp16", "fp16 needs a GPU"),
        ("model=foo", "unknown model option 'foo'"),
    ],
)
def test_bad_values_stop_at_start_with_one_line_and_exit_2(tmp_path, override, message):
    out = train(tmp_path, override, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_resume_continues_exactly(tmp_path, dropout):
    # an uninterrupted run of 2k steps against k steps, stop, resume=auto, k more steps; with
    # dropout, whose masks come from a stream keyed by (seed, step, rank), too
    k = 9
    common = ["train.log_every=1", "train.ckpt_every=100", f"model.dropout={dropout}"]
    train(tmp_path / "full", f"train.max_steps={2 * k}", *common)
    train(tmp_path / "cut", f"train.max_steps={k}", *common)
    train(tmp_path / "cut", f"train.max_steps={2 * k}", "resume=auto", *common)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 2 * k + 1))
    assert all(cut[s] == full[s] for s in full), (full, cut)
    a = torch.load(next((tmp_path / "full" / "checkpoints").glob("*18.pt")), weights_only=False)
    b = torch.load(next((tmp_path / "cut" / "checkpoints").glob("*18.pt")), weights_only=False)
    for name, tensor in a["state"]["model"].items():
        assert torch.equal(tensor, b["state"]["model"][name]), name


def _same_run(whole: Path, cut: Path, at: int) -> None:
    """``cut`` (stopped by train.max_steps at step ``at``, resumed) logged what ``whole`` did,
    but for the records its end at ``at`` added, and ends with the same summary."""
    assert records_but(cut, at) == records_but(whole, at)
    a, b = summary(whole), summary(cut)
    assert [a[k] for k in ("top1", "nll", "ece", "dup_share", "skipped_steps")] == [
        b[k] for k in ("top1", "nll", "ece", "dup_share", "skipped_steps")
    ]


def test_resume_off_the_log_grid_continues_the_logged_means_exactly(tmp_path):
    # train.log_every=10: a cut at step 25 logs its end, and the checkpoint keeps the loss
    # window 21-25 (and leaves step 25's duplicate share out of the run's totals), so the
    # resumed run logs at step 30 the mean over 21-30, as the whole run does (it logged 26-30)
    common = ["train.log_every=10", "train.ckpt_every=100"]
    train(tmp_path / "whole", "train.max_steps=63", *common)
    train(tmp_path / "cut", "train.max_steps=25", *common)
    train(tmp_path / "cut", "train.max_steps=63", "resume=auto", *common)
    assert 25 in losses(tmp_path / "cut") and 30 in losses(tmp_path / "whole")
    _same_run(tmp_path / "whole", tmp_path / "cut", 25)


def test_resume_keeps_the_count_of_non_finite_steps_in_a_row(tmp_path):
    # every step non-finite (lr 1e30 on the second): a run allowed 3 in a row stops at the 4th,
    # also when cut after 2 of them (the count used to start again at 0 on resume)
    common = ["optim.lr=1e30", "train.max_skipped=3", "train.log_every=1"]
    whole = train(tmp_path / "whole", "train.max_steps=20", *common, check=False)
    cut = train(tmp_path / "cut", "train.max_steps=3", *common, check=False)
    assert cut.returncode == 0, cut.stderr[-2000:]
    resumed = train(tmp_path / "cut", "train.max_steps=20", "resume=auto", *common, check=False)
    line = [x for x in whole.stderr.splitlines() if x.startswith("dist_icm: error:")]
    assert whole.returncode == resumed.returncode == 3, resumed.stderr[-2000:]
    assert line and line == [x for x in resumed.stderr.splitlines() if x.startswith("dist_icm")]


@pytest.mark.parametrize(
    "overrides, optimizer",
    [
        (["runtime.grad_accum=2", "loss=icm_cutmix", "loss.group_size=8"], "SGD"),
        (
            ["loss=icm_regmixup", "loss.gather=scores", "loss.dedup=true", "data.fraction=0.5"],
            "SGD",
        ),
        (["loss=icm_remix", "data.long_tail=0.1", "data.global_batch=32"], "SGD"),
        (["loss=mixup", "optim=lars", "schedule=linear_scaling", "train.epochs=200"], "Lars"),
        (["runtime.channels_last=false", "loss=ce", "optim=lamb"], "Lamb"),
    ],
    ids=["accum-cutmix", "regmixup-scores-dedup-fraction", "remix-longtail", "lars", "ce-lamb"],
)
def test_runtime_and_objective_variants_train(tmp_path, overrides, optimizer):
    out = train(tmp_path, "train.max_steps=20", "train.log_every=10", *overrides)
    assert f"; optimizer {optimizer};" in out.stderr  # the optimizer asked for is the one built
    loss = losses(tmp_path)
    assert sorted(loss) == [10, 20] and all(math.isfinite(v) for v in loss.values())
    assert loss[20] < loss[10]  # and it trains: the loss goes down


def test_bf16_autocast_tracks_float32(tmp_path):
    common = ["train.max_steps=6", "train.log_every=1"]
    full, half = (
        train(tmp_path / "fp32", *common),
        train(tmp_path / "bf16", *common, "runtime=bf16"),
    )
    assert full.returncode == half.returncode == 0
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    rel = [abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32]
    assert max(rel) < 2e-2  # the same run, to bf16's precision
    assert max(rel) > 1e-6  # and not float32 under another name: autocast really ran


def test_trains_on_the_cifar10_jpeg_tree(tmp_path, cifar10_jpeg_root):
    train(
        tmp_path,
        "experiment=cifar10_jpeg",
        f"data.root={cifar10_jpeg_root}",
        "model=tiny_cnn",  # the fastest CIFAR net: the 10k test images are read twice
        "data.global_batch=64",
        "data.num_workers=0",
        "train.max_steps=3",
        "train.log_every=1",
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and sorted(losses(tmp_path)) == [1, 2, 3]
    # the reported metrics are those of the saved model on the real test JPEGs, read here
    # independently with torchvision (class folders in order, the CIFAR-10 normalisation)
    from torchvision import datasets, transforms

    from dist_icm.checkpoint import latest
    from dist_icm.data.datasets import CIFAR10_MEAN, CIFAR10_STD
    from dist_icm.metrics import evaluate_sums, finalize
    from dist_icm.models import build_model

    model = build_model("tiny_cnn", 10, 3)
    model.load_state_dict(latest(tmp_path / "checkpoints")[1]["model"])
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    )
    test = datasets.ImageFolder(str(cifar10_jpeg_root / "test"), transform=tf)
    loader = torch.utils.data.DataLoader(test, batch_size=1000)
    mine = finalize(evaluate_sums(model, loader, "cpu"))
    assert mine["count"] == 10_000
    assert mine["top1"] == pytest.approx(summary["top1"], abs=1e-9)
    assert mine["nll"] == pytest.approx(summary["nll"], rel=1e-5)


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    train(tmp_path, "train.max_steps=3", "runtime.compile=true")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_quickstart_reaches_high_accuracy(tmp_path):
    # the README's quickstart claim (top-1 99-100%), in the default run: about 10 s
    train(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["top1"] >= 99 and summary["epochs"] == 15


def test_unreadable_checkpoint_stops_at_start(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = train(tmp_path / "run", f"resume={bad}", check=False)
    assert out.returncode == 2 and "unreadable" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("nhwc", [True, False])
def test_channels_last_is_the_default_and_can_be_turned_off(nhwc):
    overrides = [*QUICK, "model=cifar_resnet18", "data.global_batch=16"]
    overrides += [] if nhwc else ["runtime.channels_last=false"]
    job = setup_job(overrides)
    convs = [p for p in job.model.parameters() if p.ndim == 4]
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
    x = job.rt.to_device(torch.randn(8, 3, 32, 32))
    assert x.is_contiguous(memory_format=fmt) and not x.is_contiguous(
        memory_format=torch.contiguous_format if nhwc else torch.channels_last
    )


def test_the_run_says_what_loss_tile_auto_picks(monkeypatch, tmp_path):
    """The start-up note names the form ``loss.tile=auto`` resolves to for a micro-step's block
    of S̃, from the same rule the loss applies (here past a budget made small)."""
    overrides = [*QUICK, "loss.tile=auto", "data.global_batch=128", f"run_dir={tmp_path}"]
    assert "loss.tile=auto: untiled (128 x 128)" in setup_job(overrides).notes
    assert not any("loss.tile" in note for note in setup_job(overrides[:-3]).notes)  # tile 0
    monkeypatch.setattr(tiled, "AUTO_BUDGET", 3 * 128 * 128 * 4 - 1)
    assert "loss.tile=auto: tiles of 4096 (128 x 128)" in setup_job(overrides).notes


def _on_a_terminal(*overrides: str) -> str:
    """What the job shows when its stdout and stderr are a terminal (a pseudo-terminal here)."""
    main, child = pty.openpty()
    env = os.environ | {"TERM": "xterm-256color", "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "dist_icm.train", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                            env=env)  # fmt: skip
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the job closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=300) == 0, b"".join(chunks)[-3000:]
    shown = b"".join(chunks).decode("utf-8", "replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)  # without colours and cursor moves


def test_on_a_terminal_a_progress_bar_and_a_results_table(tmp_path):
    # README, "What a run shows": on a terminal a progress bar, metric lines and a results
    # table; off one (every other test) the results as `key value` lines
    shown = _on_a_terminal("experiment=quickstart", "train.max_steps=20", "train.log_every=10",
                           "train.tensorboard=false", f"run_dir={tmp_path / 'run'}")  # fmt: skip
    assert "20/20" in shown and "━" in shown  # the bar, complete
    assert "step 10  epoch" in shown and "train/loss" in shown  # the metric lines
    assert "dist_icm results" in shown and "┃ metric" in shown  # the table's title and header
    assert "\ntop1 " not in shown.replace("\r", "")  # not the off-terminal lines
    off = run_train(tmp_path / "off", *QUICK, "train.max_steps=20").stdout
    assert "\ntop1 " in off and "┃" not in off  # the negative control: a pipe


def test_more_loader_workers_than_cores_are_capped_with_a_note(tmp_path):
    # torch's DataLoader warns that so many workers "might get DataLoader running slow or even
    # freeze"; the run takes as many as there are cores and says so
    from dist_icm.job import available_cores

    cores = available_cores()
    out = train(tmp_path, "train.max_steps=2", f"data.num_workers={cores + 2}")
    assert f"data.num_workers={cores + 2}: {cores} cores here, {cores} workers" in out.stderr
    assert "worker processes in total" not in out.stderr, out.stderr[-2000:]
    assert summary(tmp_path)["config"]["data"]["num_workers"] == cores + 2  # what was asked


def test_more_threads_than_cores_are_capped_with_a_note():
    # 1,000 threads on 2 cores ran at 0.1% of the speed; the run takes as many as there are cores
    from cli import setup_job

    from dist_icm.job import available_cores

    cores, before = available_cores(), torch.get_num_threads()
    try:
        job = setup_job(["experiment=quickstart", f"runtime.threads={cores + 5}"])
        assert torch.get_num_threads() == cores
        assert f"runtime.threads={cores + 5}: {cores} cores here, {cores} threads" in job.notes
        many = 10**20  # overflowed torch.set_num_threads (one line, but naming no key)
        job = setup_job(["experiment=quickstart", f"runtime.threads={many}"])
        assert f"runtime.threads={many}: {cores} cores here, {cores} threads" in job.notes
        setup_job(["experiment=quickstart", "runtime.threads=1"])  # fewer: as asked, no note
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
