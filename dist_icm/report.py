"""What a run shows and writes: progress bar, metrics.jsonl, TensorBoard, summary, final table.

Only the main process creates a :class:`Report` that writes; the others get a silent one
(``enabled=False``), so every call site stays the same and side effects happen on rank 0 only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class Report:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.enabled, self.run_dir = enabled, run_dir
        self.console = Console(stderr=True)
        self._bar = self._task = self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        if progress:
            self._bar = Progress(
                TextColumn("[bold]train"),
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
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])
        self.console.print(_line(record))

    def progress(self, step: int, info: dict) -> None:
        if self._bar is not None:
            text = "  ".join(f"{k} {v:.4g}" for k, v in info.items())
            self._bar.update(self._task, completed=step, info=text)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def summary(self, summary: dict) -> None:
        """Write summary.json and print the results table."""
        if not self.enabled:
            return
        if self._bar is not None:  # the bar ends before the table, not after it
            self._bar.stop()
            self._bar = None
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = Table(title="dist_icm results", caption=str(self.run_dir))
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in (
            "top1",
            "top5",
            "nll",
            "ece",
            "epochs",
            "steps",
            "global_batch",
            "world_size",
            "images_per_sec",
            "wall_s",
        ):
            value = summary.get(key)
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        Console().print(table)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def _line(record: dict) -> str:
    return "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
    )
