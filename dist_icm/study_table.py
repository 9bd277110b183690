"""The outputs of a batch-size study (:mod:`dist_icm.study`): the markdown table, ``study.csv`` and
the plots, from the rows that ``study.make_rows`` builds (mean, std and n per metric)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

CSV_KEYS = ["method", "flagged", "global_batch", "world_size", "n", "seeds", "resumed"]
# metric: (summary key, markdown heading, format); wall_s and dup_share are chosen per run
METRICS = {
    "top1": ("top1", "top-1 %", ".2f"),
    "nll": ("nll", "NLL", ".4f"),
    "ece": ("ece", "ECE", ".4f"),
    "images_per_sec": ("run_images_per_sec", "images/s", ".0f"),
    "wall_s": (None, "wall s", ".1f"),
    "dup_share": ("dup_share", "dup share", ".3f"),
}


def cell(value, fmt: str, n: int) -> str:
    if value is None:
        return "–"
    mean, std, k = value
    text = f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")
    return text + (f" (n={k})" if k < n else "")


def markdown(rows: list[dict], metric: str) -> str:
    flag, paper = any(r["flagged"] for r in rows), any(r["paper"] is not None for r in rows)
    head = ["method", "global batch", "processes", "n", "seeds"] + [
        h for _, h, _ in METRICS.values()
    ]
    head += ["flagged"] * flag + [f"paper {METRICS[metric][1]}"] * paper
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out = [r["method"], str(r["global_batch"]), str(r["world_size"]), str(r["n"]), r["seeds"]]
        out += [cell(r[m], f, r["n"]) for m, (_, _, f) in METRICS.items()]
        out[-2] += " †" if r["resumed"] else ""
        out += [r["flagged"]] * flag
        out += [cell(None if r["paper"] is None else (r["paper"], None, 1), ".4g", 1)] * paper
        lines.append("| " + " | ".join(out) + " |")
    if any(r["resumed"] for r in rows):
        lines.append(
            "\n† resumed runs: wall time is run_train_s (training time over all sessions)."
        )
    if flag:
        lines.append(
            "\n⚠ flagged: these runs differ in settings that were not swept (see warnings)."
        )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per row: the table's numbers at full precision (mean, std, n per metric)."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        stat_names = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n")]
        out.writerow([*CSV_KEYS, *stat_names, "paper"])
        for r in rows:
            stat = [v for m in METRICS for v in (r[m] or (None, None, 0))]
            cells = [*(r[k] for k in CSV_KEYS), *stat, r["paper"]]
            out.writerow(["" if v is None else v for v in cells])


def plot(rows: list[dict], x: str, y: str, path: Path, line_keys: tuple, ylabel: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for r in rows:
        if r[y] is not None:
            names = {"global_batch": "batch {}", "world_size": "{} proc"}
            label = [names.get(k, "{}").format(r[k]) for k in line_keys if r[k] != ""]
            lines[" ".join(label)].append(r)
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, members in sorted(lines.items()):
        members.sort(key=lambda r: r[x])
        xs, ys, err = zip(*((r[x], r[y][0], r[y][1] or 0.0) for r in members), strict=True)
        ax.errorbar(xs, ys, yerr=err, capsize=3, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel({"global_batch": "global batch", "world_size": "processes"}[x])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
