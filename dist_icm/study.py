"""Batch-size studies: ``python -m dist_icm.study RUN_DIR...`` collects finished runs into a table.

Every argument is a run folder, a sweep folder or a glob; every ``summary.json`` below it is a
run. Runs are grouped into rows of method x global batch x processes (the method is
``loss.name``, plus ``+dedup`` / ``+per_sample``); each row holds mean ± std over its runs (the
seeds; sample std, none for n=1) of the metrics (:mod:`dist_icm.study_table`, which also writes
the outputs) and of the duplicate share. The markdown table goes to stdout, ``study.csv`` and
the plots to ``--out`` (default: the runs' common folder, e.g. the sweep folder; the working
folder when they share none).

Wall time is ``session_wall_s`` (start to summary, evaluation included); a resumed run's last
session is only part of it, so there it is ``run_train_s`` (training time over every session)
and the row is marked ``†``.

Settings: each run's whole config, flattened, less paths (``run_dir``, ``data.root``,
``data.ffcv_cache``), ``resume``, derived values (interpolations in ``.hydra/config.yaml``) and
the loss options its loss does not read (compared only between runs whose losses read them).
A setting that differs between runs splits them into separate rows, never averaged together.
It is *swept* when it is a method, batch or seed key, in a config's ``sweep_keys``, or set on
the command line of every run with more than one value (a group override such as ``loss=ce``
sweeps the whole ``loss.*`` section); a swept setting other than those joins the row label
(``icm_mixup optim.lr=0.1``). A setting that differs but is not swept is FLAGGED: a warning
names it and its values, and the ``flagged`` column holds the row's ``key=value``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import yaml

from dist_icm.compose import PAPER_RESULTS
from dist_icm.objectives import unread_options
from dist_icm.study_table import CSV_KEYS, METRICS, markdown, plot, write_csv

NEEDED = (
    "top1 nll ece global_batch world_size run_images_per_sec session_wall_s run_train_s".split()
)
NEEDED += ["resumed_at_step", "config"]
IGNORED = {"run_dir", "resume", "resume_force", "data.root", "data.ffcv_cache"}
METHOD_KEYS = ("loss.name", "loss.dedup", "loss.per_sample")
BATCH_KEY, SEED_KEY = "data.global_batch", "train.seed"


class StudyError(Exception):
    """Bad input: one line, exit 2."""


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def find_runs(patterns: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Run folders (holding summary.json) and skipped ones (a run folder without it), with why."""
    runs, skipped = set(), {}
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
        if not paths:
            raise StudyError(f"{pattern}: no such file, folder or glob match")
        for path in map(Path, paths):
            if path.name == "summary.json" and path.is_file():
                runs.add(path.parent.resolve())
                continue
            for here, dirs, files in os.walk(path):
                if "summary.json" in files:
                    runs.add(Path(here).resolve())
                elif ".hydra" in dirs or "metrics.jsonl" in files:
                    skipped[Path(here).resolve()] = why_unfinished(Path(here))
                else:
                    dirs.sort()
                    continue
                dirs.clear()  # a run folder: its checkpoints/ and tb/ hold no runs
    return sorted(runs), sorted(skipped.items())


def why_unfinished(run_dir: Path) -> str:
    marker, note = run_dir / "preempted.json", ""
    if marker.is_file():
        try:
            mark = json.loads(marker.read_text())
            stopped = f"stopped at step {mark['step']} ({mark['signal']})"
            return f"no summary.json: {stopped}; resume=auto"
        except (OSError, ValueError, KeyError, TypeError):  # cut short, or not the trainer's
            note = "unreadable preempted.json, "
    steps = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                pass
    last = f", last logged step {max(steps)}" if steps else ", nothing logged"
    return f"no summary.json ({note}unfinished or crashed{last})"


def wrong_types(summary: dict) -> list[str]:
    """The keys of a summary whose values the study cannot use: metrics that are not numbers
    (or null), sizes that are not integers, a loss that is not a section with a string name."""

    def number(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def strings(value) -> bool:
        return value is None or isinstance(value, list) and all(isinstance(v, str) for v in value)

    metrics = [key for key, _, _ in METRICS.values() if key] + ["session_wall_s", "run_train_s"]
    wrong = [k for k in metrics if summary.get(k) is not None and not number(summary[k])]
    wrong += [k for k in ("global_batch", "world_size") if not integer(summary[k])]
    step = summary["resumed_at_step"]
    wrong += ["resumed_at_step"] * (step is not None and not integer(step))
    wrong += [k for k in ("overrides", "sweep_keys") if not strings(summary.get(k))]
    loss, paper = summary["config"].get("loss", {}), summary["config"].get("paper")
    if not isinstance(loss, dict):
        wrong.append("config.loss")
    elif not isinstance(loss.get("name", "?"), str):
        wrong.append("config.loss.name")
    wrong += ["config.paper"] * (paper is not None and not isinstance(paper, str))
    return wrong


def load_run(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: damaged summary.json ({e})") from None
    missing = [k for k in NEEDED if not isinstance(summary, dict) or k not in summary]
    if missing or not isinstance(summary["config"], dict):
        raise StudyError(
            f"{path}: damaged summary.json (missing {', '.join(missing or ['config'])})"
        )
    wrong = wrong_types(summary)
    if wrong:
        raise StudyError(f"{path}: damaged summary.json (wrong type: {', '.join(wrong)})")
    flat = flatten(summary["config"])
    derived = set()
    if (run_dir / ".hydra" / "config.yaml").is_file():
        raw = flatten(yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {})
        derived = {k for k, v in raw.items() if isinstance(v, str) and "${" in v}
    loss = summary["config"].get("loss", {})
    unused = {f"loss.{k}" for k in unread_options(loss.get("name"))}  # Remix's tau for CE
    method = loss.get("name", "?")
    for key in ("dedup", "per_sample"):  # the ICM variants, where the loss reads them
        method += f"+{key}" * bool(loss.get(key) and f"loss.{key}" not in unused)
    resumed = summary["resumed_at_step"] is not None
    overrides = {}
    for item in summary.get("overrides") or []:
        key, _, value = item.partition("=")
        if not key.lstrip("+~").startswith("hydra"):
            overrides[key.lstrip("+~")] = value
    return {
        "dir": run_dir,
        "summary": summary,
        "method": method,
        "batch": summary["global_batch"],
        "world": summary["world_size"],
        "seed": flat.get(SEED_KEY),
        "resumed": resumed,
        "overrides": overrides,
        "sweep_keys": set(summary.get("sweep_keys") or []),
        "unread": unused,
        "settings": {
            k: v
            for k, v in flat.items()
            if k not in IGNORED | derived | unused | {*METHOD_KEYS, BATCH_KEY, SEED_KEY}
        },
        "wall_s": summary["run_train_s"] if resumed else summary["session_wall_s"],
    }


def values(runs: list[dict], key: str) -> list:
    """``key``'s value in each run whose loss reads it (a CE run has no ``loss.axis``: that
    tells it apart from no ICM run)."""
    return [r["settings"].get(key) for r in runs if key not in r["unread"]]


def labelled(run: dict, keys: list[str]) -> list[str]:
    """``key=value`` of the run for each of ``keys`` that its loss reads."""
    return [f"{k}={run['settings'].get(k)}" for k in keys if k not in run["unread"]]


def _differs(runs: list[dict], key: str) -> bool:
    """Whether the runs that read ``key`` hold more than one value of it."""
    return len({repr(v) for v in values(runs, key)}) > 1


def classify(runs: list[dict]) -> tuple[list[str], list[str]]:
    """Settings that differ between runs: (swept ones that split a method, flagged ones)."""
    swept = set().union(*(r["sweep_keys"] for r in runs))
    for key in set.intersection(*(set(r["overrides"]) for r in runs)):
        if len({r["overrides"][key] for r in runs}) > 1:
            swept.add(key)
    keys = set().union(*(r["settings"] for r in runs))
    differ = sorted(k for k in keys if _differs(runs, k))
    flagged = [k for k in differ if not any(k == s or k.startswith(s + ".") for s in swept)]
    by_method = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    split = [
        k
        for k in differ
        if k not in flagged and any(_differs(group, k) for group in by_method.values())
    ]
    return split, flagged


def stats(values: list) -> tuple[float, float | None, int] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std, len(values)


def paper_results(path: Path) -> dict:
    """The paper's numbers by ``config.paper`` key: the ``results`` of a file laid out as
    ``dist_icm/paper_results.json`` (or a file that is that mapping alone); raises StudyError
    for a missing or unreadable file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"--paper-results {path}: no such file") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        why = str(e).splitlines()[0][:200]
        raise StudyError(f"--paper-results {path}: unreadable ({why})") from None
    results = data.get("results", data) if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise StudyError(f"--paper-results {path}: expected a JSON object of entries")
    return results


def paper_number(name, metric: str, results: dict):
    """The paper's published number for this run's config.paper, or None (no entry, or no
    number in it)."""
    entry = results.get(name) if name else None
    value = entry.get(metric) if isinstance(entry, dict) else None
    return float(value) if isinstance(value, int | float) else None


def make_rows(runs: list[dict], split: list[str], flagged: list[str], paper: dict, metric):
    cells = defaultdict(list)
    for r in runs:
        label = " ".join([r["method"], *labelled(r, split)])
        flag = " ".join(labelled(r, flagged))
        cells[(label, flag, r["world"], r["batch"])].append(r)
    rows = []
    for (label, flag, world, batch), members in sorted(cells.items(), key=lambda c: str(c[0])):
        seeds, resumed = (
            ",".join(str(r["seed"]) for r in members),
            sum(r["resumed"] for r in members),
        )
        row = dict(
            zip(CSV_KEYS, (label, flag, batch, world, len(members), seeds, resumed), strict=True)
        )
        for name, (key, _, _) in METRICS.items():
            row[name] = stats([r["summary"].get(key) if key else r[name] for r in members])
        papers = {paper_number(r["summary"]["config"].get("paper"), metric, paper) for r in members}
        row["paper"] = papers.pop() if len(papers) == 1 else None
        rows.append(row)
    return sorted(
        rows, key=lambda r: (r["method"], r["flagged"], r["world_size"], r["global_batch"])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        "python -m dist_icm.study",
        description="Collect finished runs into a table of method x global batch, and plots.",
    )
    add = parser.add_argument
    add("runs", nargs="+", metavar="RUN_DIR", help="run folders, sweep folders or globs; "
        "every summary.json below each counts")  # fmt: skip
    add("--out", type=Path, help="folder for study.csv and the plots (default: the runs' common"
        " folder, e.g. the sweep folder; the working folder when they share none)")  # fmt: skip
    add("--metric", choices=["top1", "nll", "ece"], default="top1",
        help="what the plot against global batch shows (default: top1)")  # fmt: skip
    add("--paper-results", type=Path, default=PAPER_RESULTS, help="the paper's numbers by "
        "config.paper: a column when a run names an entry (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        dirs, skipped = find_runs(args.runs)
        for path, why in skipped:
            print(f"skipped {path}: {why}", file=sys.stderr)
        if not dirs:
            raise StudyError(f"no run found (no summary.json under {' '.join(args.runs)})")
        runs = [load_run(d) for d in dirs]
        paper = paper_results(args.paper_results)
        common = Path(os.path.commonpath([str(d) for d in dirs]))
        out = args.out or (common if common != Path(common.anchor) else Path.cwd())
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StudyError(f"--out {out}: cannot create the folder ({e.strerror})") from None
        split, flagged = classify(runs)
        rows = make_rows(runs, split, flagged, paper, args.metric)
        wrote = write_outputs(rows, out, args.metric)
    except StudyError as e:
        print(f"dist_icm.study: error: {e}", file=sys.stderr)
        return 2
    for key in flagged:
        counts = Counter(map(str, values(runs, key)))
        listed = ", ".join(f"{v} ({n} runs)" for v, n in counts.most_common())
        print(
            f"warning: runs differ in {key}, which is not swept: {listed}; "
            "kept in separate rows (column 'flagged')",
            file=sys.stderr,
        )
    print(markdown(rows, args.metric))
    worlds = sorted({r["world_size"] for r in rows})
    if len(worlds) == 1:
        print(
            f"one world size ({worlds[0]} process{'es' if worlds[0] != 1 else ''}): "
            "no images/s-vs-processes plot",
            file=sys.stderr,
        )
    elif all(r["images_per_sec"] is None for r in rows):
        print("no run has run_images_per_sec: no images/s-vs-processes plot", file=sys.stderr)
    print("wrote " + ", ".join(map(str, wrote)), file=sys.stderr)
    return 0


def write_outputs(rows: list[dict], out: Path, metric: str) -> list[Path]:
    """study.csv and the plots into ``out``; the files written (a plot with no number to show
    is not). Raises StudyError when one cannot be written."""
    wrote = [out / "study.csv"]
    keys = ("method", "flagged") + ("world_size",) * (len({r["world_size"] for r in rows}) > 1)
    plots = [
        ("global_batch", metric, f"{metric}_vs_batch", keys, METRICS[metric][1]),
        ("global_batch", "dup_share", "dup_share_vs_batch", keys, "duplicate share"),
    ]
    if len({r["world_size"] for r in rows}) > 1:
        keys = ("method", "flagged", "global_batch")
        plots.append(("world_size", "images_per_sec", "images_per_sec_vs_processes", keys,
                      "images/s"))  # fmt: skip
    try:
        write_csv(rows, wrote[0])
        for x, y, stem, line_keys, label in plots:
            if plot(rows, x, y, out / f"{stem}.png", line_keys, label):
                wrote.append(out / f"{stem}.png")
    except OSError as e:  # --out holds a folder of that name, or cannot be written
        raise StudyError(f"{e.filename or out}: {e.strerror or e}") from None
    return wrote


if __name__ == "__main__":
    sys.exit(main())
