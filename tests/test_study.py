"""``python -m dist_icm.study`` (issue 12) on real runs: a small Hydra multirun on digits
(loss=ce,icm_mixup x train.seed=0,1 x data.global_batch=32,64, 3 steps each), one more run with a
weight decay the sweep does not set, and copies of run folders made unfinished or damaged.

The table is checked cell by cell against means and sample stds computed here from the
runs' summary.json files; the CSV against the same numbers at full precision.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from cli import REPO, run_train

COMMON = ("experiment=quickstart", "train.max_steps=3", "train.log_every=1")
COMMON += ("train.progress=false", "train.tensorboard=false")
# markdown heading: (what the run's summary gives, format)
COLUMNS = {
    "top-1 %": (lambda s: s["top1"], ".2f"),
    "NLL": (lambda s: s["nll"], ".4f"),
    "ECE": (lambda s: s["ece"], ".4f"),
    "images/s": (lambda s: s["run_images_per_sec"], ".0f"),
    "wall s": (lambda s: s["session_wall_s"], ".1f"),  # none of these runs is resumed
    "dup share": (lambda s: s["dup_share"], ".3f"),
}
CSV_NAMES = dict(
    zip(COLUMNS, ["top1", "nll", "ece", "images_per_sec", "wall_s", "dup_share"], strict=True)
)


def study(*args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dist_icm.study", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def study_here(capsys, *args) -> subprocess.CompletedProcess:
    """``study`` in this process (no start-up of its own): its exit code, stdout and stderr."""
    from dist_icm.study import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def copy_run(sweep: Path, to: Path, loss: str, seed: int = 0, batch: int = 32, edit=None) -> Path:
    """A copy of the sweep's run of ``loss``, seed and batch at ``to``; ``edit(summary)``, when
    given, changes its summary.json."""
    for path in sorted(sweep.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if (summary["config"]["loss"]["name"], summary["config"]["train"]["seed"],
                summary["global_batch"]) == (loss, seed, batch):  # fmt: skip
            break
    else:
        raise AssertionError(f"no {loss} run of seed {seed}, batch {batch} in {sweep}")
    shutil.copytree(path.parent, to)
    if edit is not None:
        edit(summary)
        (to / "summary.json").write_text(json.dumps(summary))
    return to


def table(stdout: str) -> list[dict]:
    """The markdown table's rows as dicts keyed by heading."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(split[0], row, strict=True)) for row in split[2:]]


def summaries(*run_dirs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for d in run_dirs for p in sorted(d.rglob("summary.json"))]


def expected(values: list[float], fmt: str) -> str:
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study") / "sweep"
    grid = ("loss=ce,icm_mixup", "train.seed=0,1", "data.global_batch=32,64")
    run_train(None, "-m", *COMMON, *grid, f"hydra.sweep.dir={root}")
    assert len(list(root.glob("*/summary.json"))) == 8
    return root


@pytest.fixture(scope="module")
def plain(sweep) -> subprocess.CompletedProcess:
    """The study of the sweep alone, with the default --out."""
    return study(sweep)


@pytest.fixture(scope="module")
def odd_run(sweep) -> Path:
    """One more icm_mixup run at batch 32, seed 0, with a weight decay the sweep does not set."""
    run_dir = sweep.parent / "odd" / "wd"
    overrides = ("loss=icm_mixup", "train.seed=0", "data.global_batch=32")
    run_train(None, *COMMON, *overrides, "optim.weight_decay=0.001", f"run_dir={run_dir}")
    return run_dir


def test_table_holds_mean_and_std_over_seeds_of_every_cell(sweep, plain):
    assert plain.returncode == 0, plain.stderr
    rows = table(plain.stdout)
    assert [(r["method"], r["global batch"]) for r in rows] == [
        ("ce", "32"), ("ce", "64"), ("icm_mixup", "32"), ("icm_mixup", "64"),
    ]  # fmt: skip
    runs = summaries(sweep)
    for row in rows:
        cell = [s for s in runs if s["config"]["loss"]["name"] == row["method"]]
        cell = [s for s in cell if s["global_batch"] == int(row["global batch"])]
        assert len(cell) == 2 and row["n"] == "2" and row["processes"] == "1"
        assert row["seeds"] == "0,1"
        for heading, (get, fmt) in COLUMNS.items():
            assert row[heading] == expected([get(s) for s in cell], fmt), heading
    # negative control: the same runs, nothing set apart from the sweep, nothing flagged
    assert "flagged" not in rows[0] and "warning" not in plain.stderr
    assert "one world size (1 process): no images/s-vs-processes plot" in plain.stderr


def test_csv_beside_the_runs_holds_the_same_numbers(sweep, plain):
    assert (
        f"wrote {sweep.resolve() / 'study.csv'}" in plain.stderr
    )  # default --out: the sweep folder
    with (sweep / "study.csv").open() as f:
        rows = list(csv.DictReader(f))
    runs = summaries(sweep)
    assert len(rows) == 4
    for row in rows:
        cell = [s for s in runs if s["config"]["loss"]["name"] == row["method"]]
        cell = [s for s in cell if s["global_batch"] == int(row["global_batch"])]
        assert row["n"] == "2" and row["seeds"] == "0,1" and row["flagged"] == ""
        for heading, (get, _) in COLUMNS.items():
            name, values = CSV_NAMES[heading], [get(s) for s in cell]
            assert float(row[f"{name}_mean"]) == pytest.approx(statistics.mean(values), rel=1e-12)
            assert float(row[f"{name}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-9)
            assert row[f"{name}_n"] == "2"


def test_plots_are_png_files(sweep, plain, tmp_path):
    import matplotlib.image

    for name in ("top1_vs_batch.png", "dup_share_vs_batch.png"):
        assert matplotlib.image.imread(sweep / name).ndim == 3
    out = study(sweep, "--metric", "nll", "--out", tmp_path / "nll")
    assert out.returncode == 0, out.stderr
    assert matplotlib.image.imread(tmp_path / "nll" / "nll_vs_batch.png").ndim == 3
    assert not (tmp_path / "nll" / "images_per_sec_vs_processes.png").exists()


@pytest.mark.slow  # one more run (about 10-20 s here); the file's default share is ~60 s
def test_a_setting_not_swept_is_flagged_and_kept_apart(sweep, odd_run, tmp_path):
    out = study(sweep, odd_run, "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: runs differ in optim.weight_decay, which is not swept: 0.0005 (8 runs), "
        "0.001 (1 runs); kept in separate rows (column 'flagged')"
    ]
    rows = table(out.stdout)
    assert len(rows) == 5 and all(r["flagged"].startswith("optim.weight_decay=") for r in rows)
    apart = [r for r in rows if r["method"] == "icm_mixup" and r["global batch"] == "32"]
    assert [(r["flagged"], r["n"]) for r in apart] == [
        ("optim.weight_decay=0.0005", "2"), ("optim.weight_decay=0.001", "1"),
    ]  # fmt: skip
    (odd,) = summaries(odd_run)
    assert apart[1]["top-1 %"] == f"{odd['top1']:.2f}"  # n=1: the run's own number, no std


@pytest.mark.slow
@pytest.mark.multiproc
def test_several_world_sizes_get_their_own_rows_and_a_plot(sweep, tmp_path):
    run_dir = tmp_path / "two"
    overrides = ("loss=icm_mixup", "train.seed=0", "data.global_batch=32")
    run_train(None, *COMMON, *overrides, f"run_dir={run_dir}", world=2)
    out = study(sweep, run_dir, "--out", tmp_path / "out")
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    rows = [(r["method"], r["global batch"], r["processes"], r["n"]) for r in table(out.stdout)]
    assert ("icm_mixup", "32", "2", "1") in rows and ("icm_mixup", "32", "1", "2") in rows
    assert len(rows) == 5
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "out" / "images_per_sec_vs_processes.png").ndim == 3


@pytest.mark.slow  # two runs
def test_a_resumed_runs_wall_time_is_its_training_time_over_all_sessions(tmp_path):
    run_dir, base = tmp_path / "run", [o for o in COMMON if not o.startswith("train.max_steps")]
    base += ["train.ckpt_every_steps=1", f"run_dir={run_dir}", "loss=icm_mixup_dedup"]
    base += ["loss.per_sample=true"]  # and the method's label, with both options
    run_train(None, *base, "train.max_steps=2")  # stopped after step 2, then resumed to 3
    run_train(None, *base, "train.max_steps=3", "resume=auto")
    (summary,) = summaries(run_dir)
    assert summary["resumed_at_step"] == 2
    out = study(run_dir)
    (row,) = table(out.stdout)
    assert row["wall s"] == f"{summary['run_train_s']:.1f} †" and row["n"] == "1"
    assert row["method"] == "icm_mixup+dedup+per_sample"
    assert "† resumed runs: wall time is run_train_s" in out.stdout


def test_an_option_a_run_s_loss_does_not_read_neither_labels_nor_flags_it(sweep, tmp_path):
    # a sweep over losses sets loss.dedup (and a Remix option) for its CE cells too: they stay
    # "ce", in the rows of the other CE runs, and no warning names the options
    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    for path in runs.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary["config"]["loss"]["name"] == "ce" and summary["config"]["train"]["seed"] == 1:
            summary["config"]["loss"] |= {"dedup": True, "tau": 0.7}
            path.write_text(json.dumps(summary))
    out = study(runs)
    assert out.returncode == 0, out.stderr
    assert sorted({r["method"] for r in table(out.stdout)}) == ["ce", "icm_mixup"]
    assert all(r["n"] == "2" for r in table(out.stdout)) and "warning" not in out.stderr


def test_runs_told_apart_by_their_loss_alone_flag_nothing_only_one_loss_reads(
    sweep, tmp_path, capsys
):
    # `loss=ce` on one command line and the default icm_mixup on the others: the options that
    # only ICM reads (loss.axis, loss.gather, ...) are no difference between them. A difference
    # between the two ICM runs in one of these is still flagged, and on their rows alone
    def default_loss(summary):  # as if started without a loss= override
        summary["overrides"] = [o for o in summary["overrides"] if not o.startswith("loss=")]

    runs = tmp_path / "runs"
    copy_run(sweep, runs / "ce", "ce")
    copy_run(sweep, runs / "icm", "icm_mixup", edit=default_loss)
    out = study_here(capsys, runs)
    assert out.returncode == 0, out.stderr
    assert [r["method"] for r in table(out.stdout)] == ["ce", "icm_mixup"]
    assert "warning" not in out.stderr and "flagged" not in table(out.stdout)[0]

    def other_axis(summary):
        default_loss(summary)
        summary["config"]["loss"]["axis"] = "class"

    copy_run(sweep, runs / "icm_rows", "icm_mixup", seed=1, edit=other_axis)
    out = study_here(capsys, runs)
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: runs differ in loss.axis, which is not swept: both (1 runs), class (1 runs); "
        "kept in separate rows (column 'flagged')"
    ]
    rows = {(r["method"], r["flagged"]) for r in table(out.stdout)}
    assert rows == {("ce", ""), ("icm_mixup", "loss.axis=both"), ("icm_mixup", "loss.axis=class")}


@pytest.mark.parametrize("where", ["study.csv", "top1_vs_batch.png"])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(sweep, tmp_path, capsys, where):
    (tmp_path / "out" / where).mkdir(parents=True)  # a folder where the file goes
    out = study_here(capsys, sweep / "0", "--out", tmp_path / "out")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"dist_icm.study: error: {tmp_path / 'out' / where}: Is a directory"
    ]


def test_a_plot_without_numbers_is_not_listed_as_written(sweep, tmp_path, capsys):
    # two world sizes, but no run has images/s: no such plot, and "wrote" does not name it
    def no_rate(world):
        def edit(summary):
            summary |= {"world_size": world, "run_images_per_sec": None}

        return edit

    runs = tmp_path / "runs"
    copy_run(sweep, runs / "one", "icm_mixup", edit=no_rate(1))
    copy_run(sweep, runs / "two", "icm_mixup", seed=1, edit=no_rate(2))
    out = study_here(capsys, runs, "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "out" / "images_per_sec_vs_processes.png").exists()
    (wrote,) = [line for line in out.stderr.splitlines() if line.startswith("wrote ")]
    assert wrote == f"wrote {tmp_path / 'out' / 'study.csv'}, " + ", ".join(
        str(tmp_path / "out" / f"{n}_vs_batch.png") for n in ("top1", "dup_share")
    )
    assert "no run has run_images_per_sec: no images/s-vs-processes plot" in out.stderr


def test_a_damaged_preemption_marker_is_listed_as_skipped(sweep, tmp_path, capsys):
    # a run stopped by a signal, its preempted.json cut short or not the trainer's: skipped,
    # with why, beside one whose marker reads
    markers = {"empty": "", "cut": '{"step": 5', "nosignal": '{"step": 5}', "list": "[5]"}
    markers["good"] = '{"step": 5, "signal": "SIGTERM"}'
    for name, text in markers.items():
        run = copy_run(sweep, tmp_path / "runs" / name, "ce")
        (run / "summary.json").unlink()
        (run / "preempted.json").write_text(text)
    out = study_here(capsys, sweep / "0", tmp_path / "runs", "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    skipped = {line.split(":")[0]: line for line in out.stderr.splitlines() if "skipped" in line}
    for name in markers:
        line = skipped[f"skipped {(tmp_path / 'runs' / name).resolve()}"]
        if name == "good":
            assert line.endswith(": no summary.json: stopped at step 5 (SIGTERM); resume=auto")
        else:
            assert (
                ": no summary.json (unreadable preempted.json, unfinished or crashed, last "
                "logged step 3)" in line
            ), line


def test_unfinished_run_is_listed_as_skipped(sweep, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(sweep / "0", unfinished)  # a run killed after its first logged step
    (unfinished / "summary.json").unlink()
    metrics = unfinished / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    out = study(sweep, unfinished, "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    why = "no summary.json (unfinished or crashed, last logged step 1)"
    assert f"skipped {unfinished.resolve()}: {why}" in out.stderr.splitlines()
    assert [r["n"] for r in table(out.stdout)] == ["2"] * 4


def test_paper_column_when_a_run_names_an_entry(sweep, tmp_path):
    runs = tmp_path / "runs"
    for name in ("0", "2"):  # ce, batch 32, seeds 0 and 1
        shutil.copytree(sweep / name, runs / name)
        summary = json.loads((runs / name / "summary.json").read_text())
        summary["config"]["paper"] = "digits_ce"
        (runs / name / "summary.json").write_text(json.dumps(summary))
    results = tmp_path / "paper_results.json"
    results.write_text(json.dumps({"digits_ce": {"top1": 97.5}}))  # the entries alone
    (row,) = table(study(runs, "--paper-results", results).stdout)
    assert row["paper top-1 %"] == "97.5"
    # the shipped file nests its entries under "results": its Table 1 number reaches the row
    for name in ("0", "2"):
        summary = json.loads((runs / name / "summary.json").read_text())
        summary["config"]["paper"] = "table1_left/class/batch_64"
        (runs / name / "summary.json").write_text(json.dumps(summary))
    (row,) = table(study(runs).stdout)
    assert row["paper top-1 %"] == "74.9"


@pytest.mark.parametrize("case", ["missing", "garbage", "list"])
def test_a_paper_results_file_that_cannot_be_read_is_one_line_and_exit_2(sweep, tmp_path, case):
    results = tmp_path / "paper.json"
    if case == "garbage":
        results.write_text("{not json")
    elif case == "list":
        results.write_text("[1, 2]")
    out = study(sweep / "0", "--paper-results", results)
    assert out.returncode == 2
    why = {"missing": "no such file", "garbage": "unreadable (Expecting property name",
           "list": "expected a JSON object of entries"}[case]  # fmt: skip
    assert out.stderr.splitlines()[-1].startswith(
        f"dist_icm.study: error: --paper-results {results}: {why}"
    ), out.stderr


def test_an_out_folder_that_cannot_be_made_is_one_line_and_exit_2(sweep, tmp_path):
    (tmp_path / "afile").write_text("")
    out = study(sweep / "0", "--out", tmp_path / "afile" / "x")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"dist_icm.study: error: --out {tmp_path / 'afile' / 'x'}: cannot create the folder "
        "(Not a directory)"
    )


WRONG_TYPES = {  # a summary.json whose keys are there, but hold what the study cannot use
    "loss_a_string": (lambda s: s["config"].update(loss="ce"), "config.loss"),
    "top1_a_string": (lambda s: s.update(top1="abc"), "top1"),
    "batch_null": (lambda s: s.update(global_batch=None), "global_batch"),
}


@pytest.mark.parametrize("case", ["missing", "empty", "damaged", "incomplete", *WRONG_TYPES])
def test_bad_input_is_one_line_and_exit_2(sweep, tmp_path, case):
    arg, run = tmp_path / "runs", tmp_path / "runs" / "run"
    if case == "missing":
        arg = tmp_path / "nosuch*"
        line = f"{arg}: no such file, folder or glob match"
    elif case == "empty":
        arg.mkdir()
        line = f"no run found (no summary.json under {arg})"
    else:
        shutil.copytree(sweep / "0", run)
        text = (run / "summary.json").read_text()
        if case == "damaged":  # cut short, as by a full disk
            (run / "summary.json").write_text(text[: len(text) // 2])
            line = f"{run / 'summary.json'}: damaged summary.json ("
        elif case == "incomplete":
            (run / "summary.json").write_text(json.dumps({"top1": 1.0}))
            line = f"{run / 'summary.json'}: damaged summary.json (missing nll, ece, global_batch"
        else:
            summary, (edit, key) = json.loads(text), WRONG_TYPES[case]
            edit(summary)
            (run / "summary.json").write_text(json.dumps(summary))
            line = f"{run / 'summary.json'}: damaged summary.json (wrong type: {key})"
    out = study(arg, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"dist_icm.study: error: {line}"), out.stderr


def test_a_config_s_sweep_keys_are_recorded_and_split_rows(tmp_path):
    # a config that sweeps a key itself (hydra.sweeper.params, as the paper's overlays do):
    # every run's summary names it, and the study splits rows on it instead of flagging it
    overlay = tmp_path / "cfg" / "sweep" / "wd.yaml"
    overlay.parent.mkdir(parents=True)
    overlay.write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n"
        "      optim.weight_decay: 0.0005,0.001\n"
    )
    root = tmp_path / "wd"
    run_train(None, "-m", f"--config-dir={overlay.parents[1]}", *COMMON, "+sweep=wd",
              f"hydra.sweep.dir={root}")  # fmt: skip
    made = summaries(root)
    assert [s["sweep_keys"] for s in made] == [["optim.weight_decay"]] * 2
    assert sorted(s["config"]["optim"]["weight_decay"] for s in made) == [0.0005, 0.001]
    out = study(root)
    assert "flagged" not in out.stderr.lower(), out.stderr
    labels = sorted(row["method"] for row in table(out.stdout))
    assert labels == ["icm_mixup optim.weight_decay=0.0005", "icm_mixup optim.weight_decay=0.001"]
    # negative control: the same two runs with the weight decay neither in a config's sweep nor
    # on their command lines are kept apart too, but flagged
    runs = tmp_path / "unswept"
    for i, s in enumerate(made):
        folder = runs / str(i)
        shutil.copytree(Path(s["config"]["run_dir"]), folder)
        s = s | {"sweep_keys": [], "overrides": [o for o in s["overrides"] if "weight" not in o]}
        (folder / "summary.json").write_text(json.dumps(s))
    out = study(runs)
    assert "optim.weight_decay" in out.stderr and "flagged" in out.stdout.lower(), out.stderr
