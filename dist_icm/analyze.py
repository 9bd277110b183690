"""Section 4.3 of the paper: what a trained network does between two classes.

``python -m dist_icm.analyze CHECKPOINT... --out DIR`` rebuilds each checkpoint's model and test
set from the config the checkpoint holds, takes **the first test image of each class** (in the
test set's order), and mixes every **ordered** pair of classes (a, b), a != b, as the paper does
(C(C-1) pairs: 9900 for CIFAR-100) at λ = 0, 0.1, ..., 1::

    x̃ = λ·x_a + (1 - λ)·x_b        (the paper's Eq. 1: λ weighs the first class)

Each mixed image goes through the network in eval mode, and with r̃ the representation the
classifier W receives (the input of the model's last ``nn.Linear``):

* **confidence** = ‖r̃‖², the class-independent squared norm (the paper's Figure 4, left);
* **dot difference** = r̃·w_a - r̃·w_b, the dot product with the first class's classifier minus
  the one with the other's (Figure 4, right); the classifier's bias is no part of it.

Per checkpoint and λ: the mean and the (population) standard deviation over the pairs. Ordered
pairs make the dot difference's mean antisymmetric about λ = 0.5 (the pair (b, a) at 1 - λ is
the same image with the sign flipped) and the confidence's symmetric.

Written to ``--out``: ``analysis.csv`` (one row per checkpoint x λ), ``confidence.png`` and
``dot_difference.png`` (the checkpoints overlaid, labelled by their loss or ``--labels``).
Bad input (a missing or damaged file, a checkpoint without a config, weights that do not fit
the model, checkpoints of different data sets, missing data) ends with one line
``dist_icm: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dist_icm import checkpoint
from dist_icm.checkpoint import CheckpointError
from dist_icm.config import Config, ConfigError
from dist_icm.data.datasets import DataError, DatasetSpec, build_datasets

BAD_INPUT_EXIT = 2
STEPS = 10  # λ = k / STEPS, k = 0..STEPS: the paper's step of 0.1
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


class AnalysisError(ValueError):
    """Input the analysis cannot use; the message is the one line the user sees."""


# ---------------------------------------------------------------------------------------------
# The computation


@dataclass
class PairScores:
    """Per λ and ordered pair: the squared feature norm and the dot-product difference."""

    lambdas: np.ndarray  # (L,) float64: k / steps
    pairs: np.ndarray  # (P, 2) int64: (a, b), the class weighted by λ first
    confidence: np.ndarray  # (L, P) float64: ‖r̃‖²
    dot_diff: np.ndarray  # (L, P) float64: r̃·w_a - r̃·w_b

    def summary(self) -> list[dict]:
        """One dict per λ: the mean and population std over the pairs of both measures."""
        return [
            {
                "lambda": float(lam),
                "pairs": int(self.pairs.shape[0]),
                "confidence_mean": float(self.confidence[i].mean()),
                "confidence_std": float(self.confidence[i].std()),
                "dot_diff_mean": float(self.dot_diff[i].mean()),
                "dot_diff_std": float(self.dot_diff[i].std()),
            }
            for i, lam in enumerate(self.lambdas)
        ]


def ordered_pairs(num_classes: int) -> np.ndarray:
    """Every (a, b) with a != b, a-major: (0, 1), (0, 2), ..., (C-1, C-2)."""
    a, b = np.meshgrid(np.arange(num_classes), np.arange(num_classes), indexing="ij")
    keep = a != b
    return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)


def last_linear(model: nn.Module) -> nn.Linear:
    """The layer whose weight rows are the class classifiers w_c (the model's last Linear)."""
    from dist_icm.models import classifier

    return classifier(model)


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    images: torch.Tensor,
    *,
    steps: int = STEPS,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> PairScores:
    """Mix ``images[a]`` and ``images[b]`` (one image per class, class c at row c, as the model
    takes them: normalised) for every ordered pair at λ = k / steps, and score them.

    The mixed image of (a, b, k) is ``(k/steps)·x_a + ((steps-k)/steps)·x_b``, so the pair
    (b, a) at step steps - k is the same image, bit for bit. The model runs in eval mode (it is
    left in eval mode), in float32, in batches of ``batch_size`` images; ``progress(n)`` is
    called after each batch with the number of images it held.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    num_classes = images.shape[0]
    fc = last_linear(model)
    if fc.out_features != num_classes:
        raise AnalysisError(
            f"the model's classifier has {fc.out_features} classes, the images {num_classes}"
        )
    device = torch.device(device)
    model = model.to(device).float().eval()
    x = images.to(device, torch.float32)
    w = fc.weight.detach().to(device, torch.float64)  # (C, D): row c is w_c
    pairs = ordered_pairs(num_classes)
    n_pairs, n_lam = len(pairs), steps + 1
    # every (λ index, pair) triple, λ-major
    k_all = np.repeat(np.arange(n_lam), n_pairs)
    p_all = np.tile(np.arange(n_pairs), n_lam)
    confidence = np.empty(n_lam * n_pairs, dtype=np.float64)
    dot_diff = np.empty(n_lam * n_pairs, dtype=np.float64)
    captured: list[torch.Tensor] = []
    hook = fc.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with _full_float32():
            for start in range(0, len(k_all), batch_size):
                sl = slice(start, start + batch_size)
                k = torch.as_tensor(k_all[sl], device=device)
                a = torch.as_tensor(pairs[p_all[sl], 0], device=device)
                b = torch.as_tensor(pairs[p_all[sl], 1], device=device)
                shape = (-1,) + (1,) * (x.dim() - 1)
                lam = (k.to(torch.float32) / steps).view(shape)
                rest = ((steps - k).to(torch.float32) / steps).view(shape)
                mixed = lam * x[a] + rest * x[b]
                captured.clear()
                model(mixed)
                if len(captured) != 1:
                    raise AnalysisError(
                        f"{type(model).__name__} called its last Linear {len(captured)} times in "
                        "one forward pass: cannot tell its representation r"
                    )
                r = captured[0].flatten(1).to(torch.float64)
                confidence[sl] = (r * r).sum(1).cpu().numpy()
                dot_diff[sl] = ((r * w[a]).sum(1) - (r * w[b]).sum(1)).cpu().numpy()
                if progress is not None:
                    progress(len(k))
    finally:
        hook.remove()
    return PairScores(
        lambdas=np.arange(n_lam, dtype=np.float64) / steps,
        pairs=pairs,
        confidence=confidence.reshape(n_lam, n_pairs),
        dot_diff=dot_diff.reshape(n_lam, n_pairs),
    )


@contextlib.contextmanager
def _full_float32():
    """No TF32 in CUDA convolutions and matrix products while scoring (each is on by default
    for convolutions), so a GPU gives the CPU's numbers to float32 rounding."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def first_of_each_class(targets: Sequence[int], num_classes: int) -> list[int]:
    """The index of the first sample of each class (class order); AnalysisError if one has none."""
    first: dict[int, int] = {}
    for i, t in enumerate(np.asarray(targets).tolist()):
        first.setdefault(int(t), i)
        if len(first) == num_classes:
            break
    missing = [c for c in range(num_classes) if c not in first]
    if missing:
        raise AnalysisError(f"the test set has no image of class(es) {missing[:10]}")
    return [first[c] for c in range(num_classes)]


# ---------------------------------------------------------------------------------------------
# Checkpoints, models and test sets


@dataclass
class Run:
    """One checkpoint to analyse, with the config it was trained with."""

    path: Path
    state: dict
    cfg: Config

    @property
    def step(self) -> int:
        return int(self.state.get("step", -1))


def _config_from(saved: dict, where: str) -> Config:
    from omegaconf import OmegaConf

    from dist_icm.config import to_config

    try:
        return to_config(OmegaConf.create(saved))
    except ConfigError as e:
        raise AnalysisError(f"{where}: its config is not valid here ({e})") from None


def _run_folder_config(ckpt: Path) -> Config | None:
    """The config in the run folder of ``ckpt`` (``<run>/checkpoints/ckpt-*.pt``): the
    validated config in summary.json's ``config``, else Hydra's ``.hydra/config.yaml``."""
    import json

    from omegaconf import OmegaConf

    run = ckpt.resolve().parent.parent
    summary = run / "summary.json"
    if summary.is_file():
        try:
            saved = json.loads(summary.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            saved = None
        if isinstance(saved, dict):
            return _config_from(saved, str(summary))
    hydra = run / ".hydra" / "config.yaml"
    if hydra.is_file():
        raw = OmegaConf.to_container(OmegaConf.load(hydra), resolve=False)
        return _config_from(raw, str(hydra))
    return None


def load_run(path: str | Path) -> Run:
    """The checkpoint at ``path`` (a ``ckpt-*.pt`` file, or a run folder / its checkpoints/
    folder: the newest checkpoint there that loads) and its config."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = checkpoint.latest(folder)
        if found is None:
            raise AnalysisError(f"{path} is a folder without a readable checkpoint (ckpt-*.pt)")
        path, state = found
    elif not path.exists():
        raise AnalysisError(f"{path}: no such checkpoint file")
    else:
        state = checkpoint.load(path)  # CheckpointError: unreadable, damaged, not ours
    if not isinstance(state.get("model"), dict):
        raise AnalysisError(f"checkpoint {path} holds no model weights")
    saved = state.get("config")
    if isinstance(saved, dict):
        cfg = _config_from(saved, f"checkpoint {path}")
    else:
        cfg = _run_folder_config(path)
        if cfg is None:
            raise AnalysisError(
                f"checkpoint {path} holds no config, nor does its run folder "
                "(summary.json, .hydra/config.yaml): cannot rebuild its model and data"
            )
    return Run(path, state, cfg)


def _strip_prefixes(state: dict) -> dict:
    """Weights saved from a compiled or wrapped model, with their wrapper prefixes removed."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def build_model_for(run: Run, spec: DatasetSpec) -> nn.Module:
    """The run's architecture (as the trainer builds it) holding the checkpoint's weights."""
    from dist_icm.models import build_model
    from dist_icm.norm import convert_ghost_bn

    cfg = run.cfg
    try:
        model = build_model(cfg.model.name, spec.num_classes, spec.in_channels)
    except ValueError as e:
        raise AnalysisError(f"checkpoint {run.path}: {str(e).splitlines()[0]}") from None
    if cfg.model.bn_group is not None:
        model = convert_ghost_bn(model, cfg.model.bn_group)
    try:
        model.load_state_dict(_strip_prefixes(run.state["model"]))
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        detail = (lines[0] if lines else str(e).splitlines()[0])[:160]
        raise AnalysisError(
            f"checkpoint {run.path}: its weights do not fit model.name={cfg.model.name} ({detail})"
        ) from None
    return model.eval()


@dataclass
class TestImages:
    """One normalised test image per class (row c: class c) and where they came from."""

    images: torch.Tensor  # (C, channels, H, W), normalised as in training
    indices: list[int]  # their indices in the test set
    spec: DatasetSpec


def test_images(cfg: Config, data_root: str | None = None) -> TestImages:
    """The first test image of each class of the run's data set, normalised with the data
    set's statistics (what the trainer's test loader feeds the model)."""
    data = cfg.data
    root = data_root if data_root is not None else data.root
    _, test, spec = build_datasets(data.name, root, download=data.download, seed=cfg.train.seed)
    indices = first_of_each_class(test.targets, spec.num_classes)
    raw = torch.stack([test[i][0] for i in indices]).float()
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return TestImages(((raw - mean) / std).contiguous(), indices, spec)


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
        what = ", ".join(f"{run.path.name}: data.name={run.cfg.data.name}" for run in runs)
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
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=1024, help="images per forward pass")
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
    runs = [load_run(p) for p in args.checkpoints]
    check_same_data(runs)
    labels = list(args.labels) if args.labels is not None else default_labels(runs)
    report = _Progress()
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
