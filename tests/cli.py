"""Run the main job through its real command line, and read what its run folder holds.

``run_train(run_dir, *overrides, world=N)`` starts ``python -m dist_icm.train`` (one process) or
``accelerate launch`` with ``launch/accelerate/cpu.yaml`` (N processes, gloo) with
``hydra.run.dir=run_dir`` (unless it is None), from ``cwd`` (default: the repository);
``check=True`` fails with the job's stderr when it does not exit 0. ``launcher(world)`` is
that command's start, for tests that run the job themselves; ``setup_job(overrides)`` builds the
trainer's job in this process instead, from the same configs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "launch" / "accelerate" / "cpu.yaml"


def launcher(world: int, via: str = "accelerate.commands.launch") -> list[str]:
    """The command that starts ``world`` processes (``python -m via``, gloo, with the CPU config)
    or one (plain ``python``), to which ``-m dist_icm.train ...`` is appended. Port 0: the
    launcher picks a free one, so that tests run beside each other never clash on its default
    port (on which accelerate also warns on stderr when it is taken)."""
    if world == 1:
        return [sys.executable]
    return [sys.executable, "-m", via, "--config_file", str(CPU_CONFIG),
            "--num_processes", str(world), "--main_process_port", "0"]  # fmt: skip


def run_train(
    run_dir: Path | None,
    *overrides: str,
    world: int = 1,
    env: dict | None = None,
    timeout: int = 600,
    check: bool = True,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    module = ["-m", "dist_icm.train", *overrides]
    module += [] if run_dir is None else [f"hydra.run.dir={run_dir}"]
    out = subprocess.run(
        launcher(world) + module, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )
    if check and out.returncode != 0:
        raise AssertionError(f"train failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def setup_job(overrides: list[str]):
    """The trainer's :class:`~dist_icm.job.Job` for ``overrides``, built in this process
    (Hydra's compose API over the repository's configs, then ``job.setup``)."""
    from hydra import compose, initialize_config_dir

    from dist_icm import job
    from dist_icm.compose import register_schema, to_config

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = to_config(compose("train", overrides=overrides))
    return job.setup(cfg)


def last_logged(run_dir: Path) -> str:
    """The last line of the run's train.log, without its time stamp."""
    last = (run_dir / "train.log").read_text().splitlines()[-1]
    stamp = re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] ", last)
    assert stamp, last
    return last[stamp.end() :]


def records(run_dir: Path) -> list[dict]:
    """The lines of the run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def records_but(run_dir: Path, step: int) -> list[dict]:
    """The run's records without its images/s (timing) and without those of ``step``: what a run
    cut at ``step`` and resumed must share with the uninterrupted one (the cut's end logged and
    evaluated once more)."""
    return [{k: v for k, v in r.items() if k != "train/images_per_sec"}
            for r in records(run_dir) if r["step"] != step]  # fmt: skip


def losses(run_dir: Path) -> dict[int, float]:
    """Logged training loss by optimizer step."""
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
