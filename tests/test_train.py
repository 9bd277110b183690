"""The main job end to end through its real command line (Hydra, Accelerate, digits data)."""

import json
from pathlib import Path

import pytest
import torch
from cli import losses, records, run_train

QUICK = ["experiment=quickstart", "train.progress=false", "train.tensorboard=false"]


def train(run_dir: Path, *overrides: str, check: bool = True):
    return run_train(run_dir, *QUICK, *overrides, check=check)


def test_short_run_writes_its_run_dir(tmp_path):
    out = train(tmp_path, "train.max_steps=12", "train.log_every=4", "train.tensorboard=true")
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "top1",
        "top5",
        "nll",
        "ece",
        "epochs",
        "global_batch",
        "world_size",
        "images_per_sec",
        "wall_s",
    ):
        assert key in summary
    assert summary["steps"] == 12 and summary["world_size"] == 1
    assert summary["global_batch"] == 64 and 0 <= summary["ece"] <= 1
    logged = records(tmp_path)
    assert sorted(losses(tmp_path)) == [4, 8, 12]
    assert all({"step", "epoch"} <= r.keys() for r in logged)
    assert any("test/top1" in r for r in logged)
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "lr_schedule.png").stat().st_size > 1000
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events
    assert list((tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert "top1" in out.stdout  # the results table


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=foo", "unknown model 'foo'"),
        ("loss.alpha=0", "alpha must be > 0"),
        ("data.global_batch=100000", "exceeds the 1347 samples"),
        ("data.num_classes=100", "data.num_classes=100 but digits has 10 classes"),
        ("loss.group_size=7", "group_size=7 must divide"),
        ("resume=/no/such.pt", "no such checkpoint"),
        ("runtime.precision=fp16", "fp16 needs a GPU"),
        ("model=foo", "model/foo"),
    ],
)
def test_bad_values_stop_at_start_with_one_line_and_exit_2(tmp_path, override, message):
    out = train(tmp_path, override, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_resume_continues_exactly(tmp_path):
    # an uninterrupted run of 2k steps against k steps, stop, resume=auto, k more steps
    k = 9
    common = ["train.log_every=1", "train.ckpt_every=100"]
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


@pytest.mark.parametrize(
    "overrides",
    [
        ["runtime=bf16"],
        ["runtime.grad_accum=2", "loss=icm_cutmix", "loss.group_size=8"],
        ["loss=icm_regmixup", "loss.gather=scores", "loss.dedup=true", "data.fraction=0.5"],
        ["loss=icm_remix", "data.long_tail=0.1", "data.global_batch=32"],
        ["loss=mixup", "optim=lars", "schedule=linear_scaling", "train.epochs=200"],
        ["runtime=channels_last", "loss=ce", "optim=lamb"],
    ],
    ids=[
        "bf16",
        "accum-cutmix",
        "regmixup-scores-dedup-fraction",
        "remix-longtail",
        "lars",
        "channels_last-ce-lamb",
    ],
)
def test_runtime_and_objective_variants_train(tmp_path, overrides):
    train(tmp_path, "train.max_steps=4", "train.log_every=2", *overrides)
    loss = losses(tmp_path)
    assert sorted(loss) == [2, 4] and all(v == v and abs(v) < 1e3 for v in loss.values())


def test_trains_on_the_cifar10_jpeg_tree(tmp_path, cifar10_jpeg_root):
    train(
        tmp_path,
        "experiment=cifar10_jpeg",
        f"data.root={cifar10_jpeg_root}",
        "model=small_cnn",
        "data.global_batch=64",
        "data.num_workers=0",
        "train.max_steps=3",
        "train.log_every=1",
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["top1"] <= 100
    assert sorted(losses(tmp_path)) == [1, 2, 3]


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    train(tmp_path, "train.max_steps=3", "runtime.compile=true")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_quickstart_reaches_high_accuracy(tmp_path):
    train(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["top1"] > 90 and summary["epochs"] == 15


def test_unreadable_checkpoint_stops_at_start(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = train(tmp_path / "run", f"resume={bad}", check=False)
    assert out.returncode == 2 and "unreadable" in out.stderr and "Traceback" not in out.stderr
