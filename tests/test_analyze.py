"""The Section 4.3 analysis (``python -m dist_icm.analyze``) on two real digits runs.

Two short runs (Mixup and IC-Mixup, 10 steps each) are trained once through the real entry point,
side by side; the analysis command then runs on both. Its numbers are checked against a
computation made here without dist_icm's data or hooks, and its formulas against a linear model
worked out by hand.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from cli import REPO
from PIL import Image
from torch import nn

from dist_icm import analyze, checkpoint, interpolation

QUICK = ["experiment=quickstart", "train.progress=false", "train.tensorboard=false"]
LOSSES = ("mixup", "icm_mixup")
LAMBDAS = [k / 10 for k in range(11)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{loss: checkpoint path} of two real 10-step digits runs, trained concurrently."""
    root = tmp_path_factory.mktemp("analyze_runs")
    procs = {}
    for loss in LOSSES:
        cmd = [sys.executable, "-m", "dist_icm.train", *QUICK, f"loss={loss}"]
        cmd += ["train.max_steps=10", f"hydra.run.dir={root / loss}"]
        procs[loss] = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    found = {}
    for loss, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        (path,) = (root / loss / "checkpoints").glob("ckpt-*.pt")
        found[loss] = path
    return found


@pytest.fixture(scope="module")
def analysed(runs, tmp_path_factory):
    """The command's output folder and stderr: the Mixup run given as a checkpoint file, the
    IC-Mixup run as its run folder (its newest checkpoint)."""
    out = tmp_path_factory.mktemp("analysis")
    cmd = [sys.executable, "-m", "dist_icm.analyze", str(runs["mixup"])]
    cmd += [str(runs["icm_mixup"].parent.parent), "--out", str(out), "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def read_rows(out):
    with open(out / "analysis.csv", newline="") as f:
        return list(csv.DictReader(f))


def by_label(rows):
    table = {}
    for row in rows:
        table.setdefault(row["label"], []).append(row)
    return table


def test_csv_has_eleven_lambdas_per_checkpoint_in_range(analysed, runs):
    out, stderr = analysed
    rows = read_rows(out)
    assert list(rows[0]) == list(analyze.COLUMNS)
    table = by_label(rows)
    assert list(table) == list(LOSSES)  # labelled by the runs' loss, in the order given
    for loss, group in table.items():
        assert [float(r["lambda"]) for r in group] == LAMBDAS
        assert {r["checkpoint"] for r in group} == {str(runs[loss])}
        assert {(r["loss"], r["data"], r["classes"], r["pairs"], r["step"]) for r in group} == {
            (loss, "digits", "10", "90", "10")
        }
        for r in group:
            values = [float(r[k]) for k in analyze.COLUMNS[-4:]]
            assert all(np.isfinite(values))
            assert float(r["confidence_mean"]) > 0 and float(r["confidence_std"]) >= 0
            assert float(r["dot_diff_std"]) >= 0
    # progress on stderr: what is analysed, and where it was written
    assert stderr.count("90 ordered pairs x 11 λ = 990 images on cpu") == 2
    assert "(the first of each class)" in stderr
    assert f"wrote {out / 'analysis.csv'}" in stderr


def _digits_test_images():
    """The first test image of each digit, normalised, computed here from scikit-learn alone
    (the split and statistics the trainer uses for train.seed=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    tr, te = train_test_split(
        np.arange(len(x)), test_size=0.25, stratify=digits.target, random_state=0
    )
    mean, std = x[tr].mean(), x[tr].std()
    labels = digits.target[te]
    first = [te[np.flatnonzero(labels == c)[0]] for c in range(10)]
    return (x[first] - mean) / std


def _small_cnn(path, channels=1):
    from dist_icm.models import build_model

    model = build_model("small_cnn", 10, channels)
    model.load_state_dict(torch.load(path, weights_only=True)["state"]["model"])
    return model.eval()


@pytest.mark.parametrize("loss", LOSSES)
def test_pure_images_match_a_direct_computation(analysed, runs, loss):
    # at λ = 1 the pair (a, b) is image a, at λ = 0 image b: no mixing, so the numbers follow
    # from the ten pure images' features r_c = the classifier's input (SmallCNN's pooled maps)
    out, _ = analysed
    group = by_label(read_rows(out))[loss]
    model = _small_cnn(runs[loss])
    with torch.no_grad():
        r = torch.flatten(model.pool(model.features(_digits_test_images())), 1).double()
    conf = (r * r).sum(1)  # per class
    dots = r @ model.fc.weight.double().T  # dots[i, c] = r_i · w_c
    off = ~torch.eye(10, dtype=torch.bool)
    at_one = (dots.diag()[:, None] - dots)[off]  # image a, pairs (a, b): r_a·w_a − r_a·w_b
    at_zero = (dots - dots.diag()[:, None]).T[off]  # image b, pairs (a, b): r_b·w_a − r_b·w_b
    conf_pairs = conf.repeat_interleave(9)  # a-major ordered pairs: class a, 9 times
    for row, diff in ((group[-1], at_one), (group[0], at_zero)):
        got = {k: float(row[k]) for k in analyze.COLUMNS[-4:]}
        want = {
            "confidence_mean": conf_pairs.mean().item(),
            "confidence_std": conf_pairs.std(unbiased=False).item(),
            "dot_diff_mean": diff.mean().item(),
            "dot_diff_std": diff.std(unbiased=False).item(),
        }
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(group[-1]["dot_diff_mean"]) > 0  # a trained model prefers the image's class


def test_dot_difference_is_antisymmetric_in_the_pair_order(analysed, runs):
    # the pair (b, a) at 1 − λ is the image of (a, b) at λ: same features, opposite difference
    model = _small_cnn(runs["icm_mixup"])
    scores = interpolation.score_pairs(model, _digits_test_images(), batch_size=128)
    index = {tuple(p): i for i, p in enumerate(scores.pairs.tolist())}
    assert len(index) == 90 and all(a != b for a, b in index)
    swapped = [index[(b, a)] for a, b in scores.pairs.tolist()]
    flipped = scores.dot_diff[::-1][:, swapped]  # [k, p] = diff of (b, a) at step 10 − k
    assert np.allclose(scores.dot_diff, -flipped, atol=1e-5)
    assert np.allclose(scores.confidence, scores.confidence[::-1][:, swapped], rtol=1e-6)
    assert np.abs(scores.dot_diff).max() > 0.1  # not antisymmetric by being zero
    # hence over all pairs: the mean is odd about λ = 0.5, the std and the confidence even
    for group in by_label(read_rows(analysed[0])).values():
        mean = np.array([float(r["dot_diff_mean"]) for r in group])
        std = np.array([float(r["dot_diff_std"]) for r in group])
        conf = np.array([float(r["confidence_mean"]) for r in group])
        assert np.allclose(mean, -mean[::-1], atol=1e-5) and abs(mean[5]) < 1e-5
        assert np.allclose(std, std[::-1], rtol=1e-5) and np.allclose(conf, conf[::-1], rtol=1e-6)


def test_plots_are_png_images(analysed):
    out, _ = analysed
    for name in ("confidence.png", "dot_difference.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 300
            image.verify()
    # two checkpoints' curves (and a band) are drawn: the plots are not the same empty axes
    a = np.asarray(Image.open(out / "confidence.png").convert("L"))
    b = np.asarray(Image.open(out / "dot_difference.png").convert("L"))
    assert (a < 250).mean() > 0.02 and (b < 250).mean() > 0.05


class _Linear(nn.Module):
    """r = the image's two pixels; logits = W r + bias."""

    def __init__(self, weight, bias):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(weight))
            self.fc.bias.copy_(torch.tensor(bias))

        self.drop = nn.Dropout(0.5)  # in eval mode (the analysis's) a no-op

    def forward(self, x):
        return self.fc(self.drop(x.flatten(1)))


def test_a_linear_model_worked_out_by_hand():
    # x_0 = (1, 0), x_1 = (0, 2); w_0 = (1, 0), w_1 = (0, 1); biases 5 and −5.
    # pair (0, 1): r = (λ, 2(1−λ)),  ‖r‖² = λ² + 4(1−λ)²,  r·w_0 − r·w_1 = 3λ − 2
    # pair (1, 0): r = (1−λ, 2λ),    ‖r‖² = (1−λ)² + 4λ²,  r·w_1 − r·w_0 = 3λ − 1
    # mean ‖r‖² = 2.5(λ² + (1−λ)²); mean difference 3λ − 1.5; std over the two pairs 0.5
    images = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])  # (C=2, 1, 1, 2)
    model = _Linear([[1.0, 0.0], [0.0, 1.0]], [5.0, -5.0]).train()  # dropout active
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    scores = interpolation.score_pairs(model, images, batch_size=5)  # batches across λ boundaries
    assert not model.training  # scored in eval mode, left in it
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == tf32
    lam = np.array(LAMBDAS)
    assert scores.pairs.tolist() == [[0, 1], [1, 0]]
    assert np.allclose(scores.lambdas, lam, rtol=0, atol=0)
    assert np.allclose(scores.confidence[:, 0], lam**2 + 4 * (1 - lam) ** 2, atol=1e-6)
    assert np.allclose(scores.dot_diff[:, 1], 3 * lam - 1, atol=1e-6)
    rows = scores.summary()
    got = np.array([[r["confidence_mean"], r["dot_diff_mean"], r["dot_diff_std"]] for r in rows])
    want = np.stack([2.5 * (lam**2 + (1 - lam) ** 2), 3 * lam - 1.5, np.full(11, 0.5)], 1)
    assert np.allclose(got, want, atol=1e-6)
    assert all(r["pairs"] == 2 for r in rows)

    # negative controls: formulas one might have written instead give other numbers here
    x0, x1 = images[0].flatten(), images[1].flatten()
    controls = {"confidence": {}, "dot_diff": {}}
    for lm in LAMBDAS:
        logits = [model(m[None])[0].detach() for m in (lm * x0 + (1 - lm) * x1,
                                                       lm * x1 + (1 - lm) * x0)]  # fmt: skip
        for name, per_pair in (
            ("softmax", [torch.softmax(lg, 0).max().item() for lg in logits]),
            ("logits' squared norm", [(lg * lg).sum().item() for lg in logits]),
        ):
            controls["confidence"].setdefault(name, []).append(np.mean(per_pair))
        with_bias = [(logits[0][0] - logits[0][1]).item(), (logits[1][1] - logits[1][0]).item()]
        controls["dot_diff"].setdefault("logits (bias in): std", []).append(np.std(with_bias))
        controls["dot_diff"].setdefault("λ on the second: mean", []).append(3 * (1 - lm) - 1.5)
    for name, values in controls["confidence"].items():
        assert not np.allclose(values, want[:, 0], atol=1e-3), name
    bias_std, swapped_mean = controls["dot_diff"].values()
    assert not np.allclose(bias_std, want[:, 2], atol=1e-3)  # 9.5, not 0.5
    assert not np.allclose(swapped_mean, want[:, 1], atol=1e-3)


def test_run_folder_config_stands_in_for_a_checkpoint_without_one(runs, tmp_path):
    # a checkpoint without its config, in a run folder that has Hydra's config.yaml (or a
    # summary.json with the config): the analysis rebuilds model and data from that; --labels
    # names the curves
    state = checkpoint.load(runs["icm_mixup"])
    config = state.pop("config")
    hydra, summary = tmp_path / "hydra", tmp_path / "summary"
    shutil.copytree(runs["icm_mixup"].parent.parent / ".hydra", hydra / ".hydra")
    summary.mkdir()
    (summary / "summary.json").write_text(json.dumps({"top1": 1.0, "config": config}))
    for run in (hydra, summary):
        checkpoint.save(run / "checkpoints", 10, state)
    out = tmp_path / "out"
    paths = [str(hydra), str(summary), str(runs["icm_mixup"])]
    labels = ["config.yaml", "summary.json", "checkpoint"]
    analyze.main([*paths, "--out", str(out), "--device", "cpu", "--labels", *labels])
    table = by_label(read_rows(out))
    assert list(table) == labels
    numbers = [[r[k] for r in g for k in analyze.COLUMNS[-5:]] for g in table.values()]
    assert numbers[0] == numbers[1] == numbers[2]  # the same model and images, found each way


def test_a_run_folder_gives_its_newest_readable_checkpoint(runs, tmp_path, capsys):
    from dist_icm.reload import load_run

    run = tmp_path / "run"
    shutil.copytree(runs["mixup"].parent.parent, run)
    good = runs["mixup"].name
    torn = run / "checkpoints" / "ckpt-000000099.pt"  # newer, and cut short
    torn.write_bytes((run / "checkpoints" / good).read_bytes()[:1000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skip is said in one line of the output, not warned
        found = load_run(run)
        analyze.main([str(run), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert found.path.name == good
    (line,) = found.skipped
    assert line.startswith(f"checkpoint {torn} is unreadable (") and line.endswith(
        "): skipped for an older one"
    )
    assert capsys.readouterr().err.splitlines()[0] == f"analyze: {line}"
    assert load_run(run / "checkpoints" / good).path.name == good  # a file: that one


def test_a_damaged_run_folder_config_is_one_line_and_exit_2(runs, tmp_path, capsys):
    # a checkpoint without its config, in a run folder whose .hydra/config.yaml is cut short
    state = checkpoint.load(runs["mixup"])
    del state["config"]
    shutil.copytree(runs["mixup"].parent.parent / ".hydra", tmp_path / "run" / ".hydra")
    checkpoint.save(tmp_path / "run" / "checkpoints", 10, state)
    hydra = tmp_path / "run" / ".hydra" / "config.yaml"
    hydra.write_text("a: [\n")
    _expect_exit_2(capsys, [str(tmp_path / "run"), "--out", str(tmp_path / "out")],
                   f"{hydra}: unreadable (while parsing a flow node)")  # fmt: skip


@pytest.mark.gpu
def test_cuda_gives_the_cpu_numbers(analysed, runs, tmp_path):
    # float32 on both, no TF32: the same numbers to float32 rounding (measured on an H200:
    # 3.7e-7 relative; 1.3e-4 with cuDNN's default TF32 convolutions)
    out = tmp_path / "cuda"
    analyze.main(
        [str(runs["mixup"]), str(runs["icm_mixup"]), "--out", str(out), "--device", "cuda"]
    )
    for cpu, gpu in zip(read_rows(analysed[0]), read_rows(out), strict=True):
        for key in analyze.COLUMNS[-4:]:
            assert float(gpu[key]) == pytest.approx(float(cpu[key]), rel=1e-5, abs=1e-6), key


def _expect_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        analyze.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dist_icm: error: "), err
    assert message in err[0], err[0]


def _saved_with(runs, tmp_path, name, edit):
    state = checkpoint.load(runs["mixup"])
    edit(state)
    return checkpoint.save(tmp_path / name, 10, state)


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    good = str(runs["mixup"])
    out = ["--out", str(tmp_path / "out"), "--device", "cpu"]
    _expect_exit_2(capsys, [str(tmp_path / "nope.pt"), *out], "no such checkpoint file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _expect_exit_2(capsys, [str(junk), *out], "is unreadable")
    data = runs["mixup"].read_bytes()
    torn = tmp_path / "torn.pt"
    torn.write_bytes(data[: len(data) // 2])  # cut short, as by a crash
    _expect_exit_2(capsys, [str(torn), *out], "is unreadable")
    flipped = bytearray(data)
    middle = len(data) // 2
    flipped[middle] ^= 0xFF  # damaged inside: a zip member fails its CRC-32
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(flipped))
    _expect_exit_2(capsys, [str(damaged), *out], "is unreadable")
    _expect_exit_2(capsys, [str(tmp_path), *out], "without a readable checkpoint")
    under_a_file = ["--out", str(junk / "x"), "--device", "cpu"]  # said before any work
    _expect_exit_2(capsys, [good, *under_a_file], f"cannot create the folder ({junk} is a file)")

    def other_data(state):
        state["config"]["data"]["name"] = "cifar10"

    cifar = _saved_with(runs, tmp_path, "cifar", other_data)
    _expect_exit_2(capsys, [good, str(cifar), *out], "trained on different data sets "
                   f"({good}: data.name=digits, {cifar}: data.name=cifar10)")  # fmt: skip

    def other_model(state):
        state["config"]["model"]["name"] = "cifar_resnet18"

    resnet = _saved_with(runs, tmp_path, "resnet", other_model)
    _expect_exit_2(capsys, [str(resnet), *out], "weights do not fit model.name=cifar_resnet18")

    no_config = _saved_with(runs, tmp_path, "bare", lambda s: s.pop("config"))
    _expect_exit_2(capsys, [str(no_config), *out], "holds no config")
    _expect_exit_2(capsys, [good, *out, "--labels", "a", "b"], "--labels gives 2 labels for 1")

    def cifar_offline(state):
        state["config"]["data"] |= {"name": "cifar10", "root": "/run/s/data", "download": False}

    offline = _saved_with(runs, tmp_path, "offline", cifar_offline)
    elsewhere = tmp_path / "moved"  # --data-root is read instead of the run's data.root
    _expect_exit_2(capsys, [str(offline), *out, "--data-root", str(elsewhere)],
                   f"CIFAR-10 not found under '{elsewhere}'")  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_bad_input_through_the_command_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\0" * 100)
    cmd = [sys.executable, "-m", "dist_icm.analyze", str(junk), "--out", str(tmp_path / "o")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"dist_icm: error: checkpoint {junk} is unreadable (no zip index: truncated, or not "
        "written by torch.save): delete it or pass another"
    ]


@pytest.mark.slow
def test_a_cifar10_jpeg_run(tmp_path, cifar10_jpeg_root):
    # the ImageFolder path: a 3-step run on the real CIFAR-10 JPEG tree, its data given anew
    from cli import run_train
    from torchvision import datasets, transforms

    from dist_icm.data.datasets import CIFAR10_MEAN, CIFAR10_STD

    run = tmp_path / "run"
    run_train(run, *QUICK, "experiment=cifar10_jpeg", f"data.root={cifar10_jpeg_root}",
              "model=small_cnn", "data.global_batch=64", "train.max_steps=3")  # fmt: skip
    out = tmp_path / "out"
    analyze.main([str(run), "--out", str(out), "--device", "cpu",
                  "--data-root", str(cifar10_jpeg_root)])  # fmt: skip
    rows = read_rows(out)
    assert [float(r["lambda"]) for r in rows] == LAMBDAS
    assert {(r["data"], r["classes"], r["pairs"]) for r in rows} == {("imagefolder", "10", "90")}
    # λ = 1: the first test JPEG of each class, read here with torchvision
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    )
    test = datasets.ImageFolder(str(cifar10_jpeg_root / "test"), transform=tf)
    first = [test.targets.index(c) for c in range(10)]
    x = torch.stack([test[i][0] for i in first])
    (ckpt,) = (run / "checkpoints").glob("ckpt-*.pt")
    model = _small_cnn(ckpt, channels=3)
    with torch.no_grad():
        r = torch.flatten(model.pool(model.features(x)), 1).double()
    conf = (r * r).sum(1).mean().item()
    assert float(rows[-1]["confidence_mean"]) == pytest.approx(conf, rel=1e-5)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("augment", ["cifar", "cifar_rot15"])
def test_analysis_images_are_normalised_as_the_trainer_s_test_loader(
    name, augment, cifar10_jpeg_root, monkeypatch
):
    # the analysis feeds each class's first test image normalised as training's test loader
    # normalised it: under cifar_rot15 the paper code's CIFAR-10 statistics, not the data set's.
    # Real CIFAR-10 JPEGs stand in for torchvision's files (the statistics go by data.name)
    import dataclasses

    from dist_icm import reload
    from dist_icm.config import Config
    from dist_icm.data import pipeline
    from dist_icm.data.datasets import build_datasets

    def jpegs(_name, _root, **kw):
        return build_datasets("imagefolder", str(cifar10_jpeg_root), seed=kw.get("seed", 0))

    monkeypatch.setattr(pipeline, "build_datasets", jpegs)
    monkeypatch.setattr(reload, "build_datasets", jpegs)
    cfg = Config()
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, name=name, augment=augment, num_workers=0)
    )
    seen = reload.test_images(cfg)
    bundle = pipeline.build_data(cfg.data, seed=0, micro_global=64, rank=0, world_size=1)
    fed = torch.stack([bundle.test_loader.dataset[i][0] for i in seen.indices])
    assert torch.equal(seen.images, fed)
