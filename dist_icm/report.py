"""What a run shows and writes: progress bar, metrics.jsonl, TensorBoard, train.log, summary.

Only the main process creates a :class:`Report` that writes; the others get a silent one
(``enabled=False``), so every call site stays the same and side effects happen on rank 0 only.

* On a terminal: a progress bar, metric lines and a results table. Off a terminal (a log file, a
  pipe, a Slurm output file): the same lines, plain and never wrapped, and the results as
  ``key value`` lines, so that numbers and paths stay whole for grep.
* Every line shown also goes to the ``dist_icm`` logger, which the run's Hydra logging config
  (``configs/hydra/job_logging/dist_icm.yaml``) writes to ``<run dir>/train.log``.
* Resuming at step s (or ``resume=auto`` starting at step 0 in a folder where an earlier
  session logged steps before a crash) drops what ``metrics.jsonl`` and TensorBoard hold past
  step s (the steps the run does again), so each step appears once.
* ``summary.json`` is strict JSON: a non-finite value is written as ``null``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

LOG = logging.getLogger("dist_icm")
RESULT_KEYS = (
    "top1",
    "top5",
    "nll",
    "ece",
    "epochs",
    "steps",
    "global_batch",
    "world_size",
    "run_images_per_sec",
    "session_wall_s",
)


class Report:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        redo: bool = False,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.enabled, self.run_dir = enabled, run_dir
        self.console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
        self._bar = self._task = self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if redo:  # an earlier session may have logged steps past start_step: they are redone
            drop_records_after(run_dir / "metrics.jsonl", start_step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = start_step + 1 if redo else None  # hides the events past start_step
            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
        if progress and self.console.is_terminal:
            self._bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._bar.start()

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl (and TensorBoard scalars), keyed by ``step``."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(_strict(record), allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])
        self.print(_line(record))

    def progress(self, step: int, info: dict) -> None:
        if self._bar is not None:
            text = "  ".join(f"{k} {v:.4g}" for k, v in info.items())
            self._bar.update(self._task, completed=step, info=text)

    def print(self, text: str) -> None:
        """A line on the console (stderr) and in train.log."""
        if self.enabled:
            self.console.print(text)
            LOG.info(text)

    def summary(self, summary: dict) -> None:
        """Write summary.json and show the results (a table on a terminal, lines off one)."""
        if not self.enabled:
            return
        if self._bar is not None:  # the bar ends before the results, not after them
            self._bar.stop()
            self._bar = None
        text = json.dumps(_strict(summary), indent=2, allow_nan=False) + "\n"
        (self.run_dir / "summary.json").write_text(text)
        rows = [(k, _fmt(summary.get(k))) for k in RESULT_KEYS]
        for key, value in rows:
            LOG.info("%s %s", key, value)
        out = Console(soft_wrap=True, markup=False, highlight=False)
        if out.is_terminal:
            table = Table(title="dist_icm results", caption=str(self.run_dir))
            table.add_column("metric")
            table.add_column("value", justify="right")
            for key, value in rows:
                table.add_row(key, value)
            out.print(table)
        else:
            print(
                "dist_icm results",
                *(f"{k} {v}" for k, v in rows),
                f"run_dir {self.run_dir}",
                sep="\n",
                file=sys.stdout,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def drop_records_after(path: Path, step: int) -> int:
    """Keep only the lines of a metrics.jsonl whose ``step`` is at most ``step`` (atomically);
    returns how many were dropped. A line a crash cut short is dropped too; a missing file is
    left missing."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _step_of(line, default=step + 1) <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
    return len(lines) - len(kept)


def _step_of(line: str, default: int) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return default


def _strict(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _line(record: dict) -> str:
    return "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
    )
