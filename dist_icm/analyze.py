"""Section 4.3 of the paper: the command line of the analysis (the math: ``interpolation``; the
checkpoints, models and test images: ``reload``).

``python -m dist_icm.analyze CHECKPOINT... --out DIR`` rebuilds each checkpoint's model and test
set from the config the checkpoint holds, takes **the first test image of each class** (in the
test set's order), and scores every ordered pair of classes mixed at λ = 0, 0.1, ..., 1 with
``dist_icm.interpolation.score_pairs``: the **confidence** ‖r̃‖² and the **dot difference**
r̃·w_a - r̃·w_b of the paper's Figure 4, per checkpoint and λ their mean and (population)
standard deviation over the pairs.

Written to ``--out``: ``analysis.csv`` (one row per checkpoint x λ), ``confidence.png`` and
``dot_difference.png`` (the checkpoints overlaid, labelled by their loss or ``--labels``).
Bad input (a missing or damaged file, a checkpoint without a config, weights that do not fit
the model, checkpoints of different data sets, missing data) ends with one line
``dist_icm: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dist_icm.checkpoint import CheckpointError
from dist_icm.config import ConfigError
from dist_icm.data.datasets import DataError
from dist_icm.folders import missing_top
from dist_icm.interpolation import STEPS, AnalysisError, score_pairs
from dist_icm.reload import Run, TestImages, build_model_for, load_run, test_images

BAD_INPUT_EXIT = 2
COLUMNS = (
    "label",
    "checkpoint",
    "step",
    "loss",
    "data",
    "classes",
    "pairs",
    "lambda",
    "confidence_mean",
    "confidence_std",
    "dot_diff_mean",
    "dot_diff_std",
)


def default_labels(runs: Sequence[Run]) -> list[str]:
    """Each run's loss name; where two share one, the run folder's name is added."""
    losses = [run.cfg.loss.name for run in runs]
    labels = []
    for run, loss in zip(runs, losses, strict=True):
        label = loss
        if losses.count(loss) > 1:
            label = f"{loss} ({run.path.resolve().parent.parent.name}, step {run.step})"
        labels.append(label)
    for i, label in enumerate(labels):  # still the same: number them
        if labels.count(label) > 1:
            labels[i] = f"{label} #{i + 1}"
    return labels


def check_same_data(runs: Sequence[Run]) -> None:
    """The checkpoints must come from one data set (checked before any data is read)."""
    names = {run.cfg.data.name for run in runs}
    if len(names) > 1:
        what = ", ".join(f"{run.path}: data.name={run.cfg.data.name}" for run in runs)
        raise AnalysisError(f"the checkpoints were trained on different data sets ({what})")


# ---------------------------------------------------------------------------------------------
# Output


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row[k]) for k in COLUMNS})


def _fmt(value) -> str:
    if isinstance(value, float):
        # + 0.0: a mean of exactly opposite numbers may come out as -0.0
        return repr(round(value, 12) + 0.0) if math.isfinite(value) else str(value)
    return str(value)


def plot(out: Path, results: list[tuple[str, list[dict]]], title: str) -> list[Path]:
    """confidence.png (mean vs λ) and dot_difference.png (mean ± std vs λ), runs overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, key, ylabel in (
        ("confidence.png", "confidence", "mean confidence  ‖r‖² (squared feature norm)"),
        ("dot_difference.png", "dot_diff", "r·w_a − r·w_b  (mean ± std)"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
        for label, rows in results:
            lam = [r["lambda"] for r in rows]
            mean = np.array([r[f"{key}_mean"] for r in rows])
            (line,) = ax.plot(lam, mean, marker="o", markersize=3, label=label)
            if key == "dot_diff":
                std = np.array([r[f"{key}_std"] for r in rows])
                ax.fill_between(lam, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        if key == "dot_diff":
            ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_xlabel("λ  (x̃ = λ·x_a + (1 − λ)·x_b)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dist_icm.analyze",
        description="Section 4.3 of the Infinite Class Mixup paper: confidence and dot-product "
        "difference of mixed test images as λ goes from 0 to 1, for one or more checkpoints.",
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT",
        help="ckpt-*.pt files, or run folders (their newest readable checkpoint)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder for analysis.csv and the two PNG plots")
    p.add_argument("--labels", nargs="+", help="one legend label per checkpoint (default: loss)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (auto: cuda where one is visible)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1024,
                   help="images per forward pass (default 1024)")  # fmt: skip
    p.add_argument("--data-root", help="the data set's folder, instead of the runs' data.root")
    return p


def _fail(message: str) -> None:
    print(f"dist_icm: error: {message.splitlines()[0]}", file=sys.stderr, flush=True)
    sys.exit(BAD_INPUT_EXIT)


class _Progress:
    """A bar on a terminal; off one (a pipe, a log), one line per checkpoint is all."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)

    def line(self, text: str) -> None:
        self.console.print(f"analyze: {text}")

    def bar(self, total: int, label: str):
        if not self.console.is_terminal:
            return _NoBar()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), console=self.console
        )
        return _Bar(progress, total)


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


class _Bar:
    def __init__(self, progress, total: int) -> None:
        self.progress, self.total = progress, total

    def __enter__(self):
        self.progress.start()
        task = self.progress.add_task("", total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def analyze(args: argparse.Namespace) -> list[dict]:
    """Everything the command does; raises AnalysisError (and the loaders' errors) on bad input."""
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        raise AnalysisError(
            f"--labels gives {len(args.labels)} labels for {len(args.checkpoints)} checkpoints"
        )
    if args.batch_size < 1:
        raise AnalysisError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("--device cuda: no CUDA device is visible")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )  # fmt: skip
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} is a file, not a folder")
    top = missing_top(out)  # the folder is made at the end: say now if it cannot be
    if top is not None and not top.parent.is_dir():
        raise AnalysisError(f"--out {out}: cannot create the folder ({top.parent} is a file)")
    runs = [load_run(p) for p in args.checkpoints]
    check_same_data(runs)
    labels = list(args.labels) if args.labels is not None else default_labels(runs)
    report = _Progress()
    for line in (line for run in runs for line in run.skipped):
        report.line(line)  # a newer checkpoint of a run folder that does not load
    cache: dict[tuple, TestImages] = {}
    classes = None
    rows, results = [], []
    for run, label in zip(runs, labels, strict=True):
        data = run.cfg.data
        key = (data.name, args.data_root or data.root, data.download, run.cfg.train.seed)
        if key not in cache:
            cache[key] = test_images(run.cfg, args.data_root)
        test = cache[key]
        if classes is None:
            classes = test.spec.class_names
        elif test.spec.class_names != classes:
            raise AnalysisError(
                f"checkpoint {run.path}: its test set's classes differ from the first "
                "checkpoint's: the checkpoints must share one data set"
            )
        model = build_model_for(run, test.spec)
        n = test.spec.num_classes
        total = n * (n - 1) * (STEPS + 1)
        shown = ", ".join(map(str, test.indices[:12])) + (", ..." if n > 12 else "")
        report.line(
            f"{label}: {run.path} (step {run.step}); {data.name} test images {shown} "
            f"(the first of each class); {n * (n - 1)} ordered pairs x {STEPS + 1} λ = "
            f"{total} images on {device}"
        )
        with report.bar(total, label) as advance:
            scores = score_pairs(
                model, test.images, device=device, batch_size=args.batch_size, progress=advance
            )
        summary = scores.summary()
        results.append((label, summary))
        common = {
            "label": label,
            "checkpoint": str(run.path),
            "step": run.step,
            "loss": run.cfg.loss.name,
            "data": data.name,
            "classes": n,
        }
        rows += [common | row for row in summary]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "analysis.csv", rows)
    n = len(classes)
    title = f"{runs[0].cfg.data.name}: {n} test images, {n * (n - 1)} ordered pairs"
    for path in [out / "analysis.csv", *plot(out, results, title)]:
        report.line(f"wrote {path}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        analyze(args)
    except (AnalysisError, CheckpointError, ConfigError, DataError) as e:
        _fail(str(e))
    except OSError as e:  # e.g. --out cannot be made or written
        _fail(f"{e.filename or args.out}: {e.strerror or e}")


if __name__ == "__main__":
    main()
