"""The benchmarks run end to end at small sizes and print what they promise (one JSON object);
their figures at full size are in the README's performance section."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from dist_icm.bench.__main__ import _parser


def _bench(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "dist_icm.bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout)


def tiny_tree(root):
    """A JPEG ImageFolder tree of two classes: 8 training and 4 test images each (32 x 32)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("test", 4)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.jpg")
    return root


def test_every_option_has_help():
    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"loss", "comm", "step", "trainer", "data"}
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help, f"bench {name}: {action.option_strings} has no help"


def test_loss_bench_tiled_memory_is_a_fraction_of_untiled():
    out = _bench("loss", "--sizes", "1024", "--classes", "10", "--tile", "128", "--repeats", "1")
    (row,) = out["rows"]
    assert row["N"] == 1024 and out["tile"] == 128
    # the untiled forms hold (1024 x 1024) float32 blocks (4 MiB each); the tiled one 64 KiB
    assert row["dense_mib"] > 8 and row["tiled_mib"] < row["dense_mib"] / 4


@pytest.mark.multiproc
def test_comm_bench_counts_the_triples_path_under_20_bytes():
    out = _bench("comm", "--batch", "24", "--classes", "6", "--worlds", "2", "--repeats", "1")
    # W = 2: half of 8 (triples) + 4 (all-to-all) + 4 (its backward); the limit is 16
    assert out["triples_bytes_per_sample"] == 8.0
    assert out["triples_bytes_per_sample_limit"] == 16.0 <= 20
    assert out["scores_bytes_per_sample"] == (8 + 2 * 4 * 6) / 2
    assert out["worlds"]["2"]["triples_dedup"]["total"] == 12.0


def test_step_bench_reports_icm_over_ce():
    out = _bench(
        "step",
        "--model",
        "small_cnn",
        "--batch",
        "16",
        "--image",
        "8",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",  # none: straight to the timed blocks (the profile's test warms up)
        "--device",
        "cpu",
    )
    # rates are rounded to 0.1 image/s: at the few dozen images/s of a loaded 2-core machine, 1e-3
    rates = out["ce_images_per_s"] / out["icm_images_per_s"]
    assert out["icm_over_ce"] == pytest.approx(rates, rel=1e-2)
    assert out["steps"] == 2 and out["repeats"] == 1 and out["eval_images_per_s"] > 0
    assert out["channels_last"] is True  # the trainer's default layout
    assert set(out["queue"]) == {"ce", "icm"}  # icm_eager only on CUDA
    for form in out["queue"].values():  # on the CPU, queueing a step is running it
        assert 0 < form["host_ms"] <= form["step_ms"]
    assert "profile" not in out  # only with --profile


def test_step_bench_profile_lists_where_icm_spends_more_than_ce():
    out = _bench("step", "--model", "small_cnn", "--batch", "16", "--image", "8", "--steps", "2",
                 "--repeats", "1", "--warmup", "1", "--device", "cpu", "--profile")  # fmt: skip
    prof = out["profile"]
    assert prof["what"] == "CPU operators (self time)"
    # the mixing and the loss add operators to the step: more calls per step than CE's
    assert prof["icm"]["calls_per_step"] > prof["ce"]["calls_per_step"] > 0
    extra = prof["icm_over_ce"]
    assert 0 < len(extra) <= 15 and {"name", "extra_calls", "extra_us"} == set(extra[0])
    assert [e["extra_us"] for e in extra] == sorted((e["extra_us"] for e in extra), reverse=True)


BAD = [
    ("loss --sizes 0", "loss: error: argument --sizes: 0 is less than 1"),
    ("loss --tile 0", "loss: error: argument --tile: 0 is less than 1"),
    ("loss --classes 1", "loss: error: argument --classes: 1 is less than 2"),
    ("comm --worlds 1", "comm: error: argument --worlds: 1 is less than 2"),
    ("comm --batch 31 --worlds 2", "comm: error: --batch 31 is not divisible by world size 2"),
    ("step --batch x", "step: error: argument --batch: 'x' is not an integer"),
    ("step --model nosuch", "step: error: --model: unknown model 'nosuch': use one of "),
    ("data --step nosuch", "data: error: --step: unknown model 'nosuch': use one of "),
    ("data --root {empty}", "data: error: --root {empty} holds no train/ folder: point it at "
     "a JPEG ImageFolder tree"),
    ("data --batches 1", "data: error: argument --batches: 1 is less than 2"),
    ("data --root {tiny} --batch 12 --workers 0", "data: error: --root {tiny} holds 1 batch of "
     "--batch 12 per epoch; timing needs 3 (the first untimed): pass a smaller --batch"),
    ("trainer --root {tree} model=nosuch", "trainer: error: unknown model option 'nosuch' "),
    ("trainer --root {tree} train.epochz=1", "trainer: error: unknown config key train.epochz "),
]  # fmt: skip
if not torch.cuda.is_available():
    BAD.append(("step --device cuda", "step: error: --device cuda: no CUDA device is visible"))


@pytest.mark.parametrize("args, line", BAD, ids=[a for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, line):
    places = {"empty": tmp_path / "empty", "tree": tmp_path / "tree", "tiny": tmp_path / "tiny"}
    places["empty"].mkdir()
    if "{tiny}" in args:  # 16 training images: one batch of 12 per epoch
        tiny_tree(places["tiny"])
    (places["tree"] / "train").mkdir(parents=True)  # a tree to name; the config fails first
    argv = [a.format(**places) for a in args.split()]
    out = subprocess.run([sys.executable, "-m", "dist_icm.bench", *argv], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    (got,) = out.stderr.strip().splitlines()
    assert got.startswith("python -m dist_icm.bench " + line.format(**places)), got


def test_help_shows_every_default():
    out = subprocess.run([sys.executable, "-m", "dist_icm.bench", "step", "--help"],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    text = " ".join(out.stdout.split())
    assert "batch size (default: 512)" in text and "(default: cifar_resnet18)" in text


def test_trainer_bench_runs_the_trainer_and_a_bare_loop(cifar10_jpeg_root):
    out = _bench(
        "trainer",
        "--root",
        str(cifar10_jpeg_root),
        "--steps",
        "2",
        "--repeats",
        "1",
        "--profile",
        "model=small_cnn",
        "data.global_batch=32",
    )
    assert out["batch"] == 32 and out["trainer_over_bare"] > 0
    assert {"trainer", "bare"} == set(out["top_ops"])
    assert any("convolution" in row["op"] for row in out["top_ops"]["bare"])


def test_trainer_bench_takes_the_batches_of_a_short_epoch_in_turn(tmp_path):
    # 5 steps a block, an epoch of 4 batches: the 4 are taken, the fifth step reuses the first
    tree = tiny_tree(tmp_path / "tiny")
    out = _bench("trainer", "--root", str(tree), "--steps", "5", "--repeats", "1",
                 "model=small_cnn", "data.global_batch=4")  # fmt: skip
    assert (out["steps"], out["batches"], out["batch"]) == (5, 4, 4)
    assert out["trainer_s"] > 0 and out["bare_s"] > 0
