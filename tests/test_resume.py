"""Resuming: rank 0 chooses one checkpoint for all ranks, a changed config is refused, and the
run's logs hold each step once."""

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli import losses, records, run_train, summary
from multiproc import run_group

from dist_icm import checkpoint
from dist_icm.checkpoint import CheckpointError
from dist_icm.config import ConfigError
from dist_icm.resume import choose
from dist_icm.same_run import GUARDED, changed_keys, check_config

QUICK = ["experiment=quickstart", "train.progress=false"]


def _views(root: Path, case: str) -> list[Path]:
    """Two ranks' views of one run's checkpoints (node-local copies), differing by ``case``."""
    folders = [root / "rank0", root / "rank1"]
    for folder in folders:
        for step in (3, 6):
            checkpoint.save(folder, step, {"step": step, "w": torch.full((3,), float(step))})
    newest = folders[1] / "ckpt-000000006.pt"
    if case == "torn":  # a read error on one node
        newest.write_bytes(newest.read_bytes()[:100])
    elif case == "missing":  # the file has not reached rank 1's disk yet
        newest.unlink()
    elif case == "stale":  # rank 1's file of that name holds another step
        checkpoint.save(folders[1], 6, {"step": 5, "w": torch.zeros(3)})
    return folders


def _choose_worker(rank, world, folders, per_rank):
    import warnings

    warnings.simplefilter("ignore")  # the torn file's warning on rank 1 (per-rank control)
    if per_rank:  # the old way: every rank looks for itself
        return checkpoint.latest(folders[rank])[1]["step"]
    try:
        found = choose(Path(folders[rank]), "auto", torch.distributed.group.WORLD)
        return found.step
    except CheckpointError as e:
        return f"error: {e}"


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["same", "torn", "missing", "stale"])
def test_rank_zero_chooses_and_all_ranks_agree(tmp_path, case):
    folders = [str(f) for f in _views(tmp_path, case)]
    got = run_group(_choose_worker, 2, folders, False)
    if case == "same":
        assert got == [6, 6]
    else:
        assert got[0] == got[1] and got[0].startswith("error: ")
        why = "different steps" if case == "stale" else "rank 1 cannot read"
        assert why in got[0] and "\n" not in got[0]
    if case == "torn":  # negative control: ranks that choose for themselves disagree
        assert run_group(_choose_worker, 2, folders, True) == [6, 3]


def _choose_noting(rank, world, folder):
    skipped = []
    found = choose(Path(folder), "auto", torch.distributed.group.WORLD, skipped)
    return found.step, skipped


@pytest.mark.multiproc
def test_every_rank_learns_which_files_rank_zero_skipped(tmp_path):
    for step in (3, 6):
        checkpoint.save(tmp_path, step, {"step": step})
    newest = tmp_path / "ckpt-000000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    got = run_group(_choose_noting, 2, str(tmp_path))
    line = f"checkpoint {newest} is unreadable (no zip index: truncated, or not written by "
    assert got[0] == got[1] and got[0][0] == 3
    assert len(got[0][1]) == 1 and got[0][1][0].startswith(line)


def test_choose_on_one_process(tmp_path):
    assert choose(tmp_path, None, None) is None
    assert choose(tmp_path, "auto", None) is None  # nothing there yet
    checkpoint.save(tmp_path, 4, {"step": 4})
    assert choose(tmp_path, "auto", None).step == 4
    assert choose(tmp_path, str(tmp_path / "ckpt-000000004.pt"), None).step == 4
    with pytest.raises(ConfigError, match="no such checkpoint"):
        choose(tmp_path, str(tmp_path / "nope.pt"), None)
    torn = tmp_path / "torn.pt"  # rank 0 cannot read it: a ConfigError too, naming the file
    torn.write_bytes((tmp_path / "ckpt-000000004.pt").read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"checkpoint {torn} is unreadable"):
        choose(tmp_path, str(torn), None)


def test_changed_keys_name_what_defines_a_step():
    saved = {
        "data": {"name": "digits", "global_batch": 64, "root": "/a", "num_workers": 0},
        "loss": {"name": "icm_mixup", "group_size": 16},
        "train": {"seed": 0, "epochs": 15},
        "runtime": {"grad_accum": 1, "threads": None},
        "model": {"name": "small_cnn"},
    }
    same = {**saved, "train": {"seed": 0, "epochs": 30}, "runtime": {"grad_accum": 1, "threads": 2}}
    same["data"] = {**saved["data"], "root": "/b", "num_workers": 4}
    assert changed_keys(saved, same) == []  # epochs, paths and workers are free to change
    eager = {**same, "loss": {**saved["loss"], "cuda_graph": False}}
    assert changed_keys({**saved, "loss": {**saved["loss"], "cuda_graph": True}}, eager) == []
    other = {**same, "loss": {"name": "icm_mixup", "group_size": 8}}
    other["data"] = {**same["data"], "global_batch": 128}
    assert [k for k, _, _ in changed_keys(saved, other)] == ["data.global_batch", "loss.group_size"]
    with pytest.raises(ConfigError, match=r"data.global_batch=64 \(now 128\), loss.group_size"):
        check_config(saved, other, force=False, step=9)
    note = check_config(saved, other, force=True, step=9)
    assert note.startswith("resume_force=true: resuming step 9")


# one change per guarded key or section (a key left out of GUARDED fails here), and the ones
# a resumed run may make
GUARDED_CHANGES = {
    "data.name": "cifar10",
    "data.fraction": 0.5,
    "data.long_tail": 0.1,
    "data.global_batch": 32,
    "data.augment": "none",
    "data.drop_last": False,
    "runtime.grad_accum": 2,
    "runtime.zero_stage": 2,
    "train.seed": 1,
    "model.name": "tiny_cnn",
    "model.dropout": 0.3,
    "loss.name": "icm_cutmix",
    "loss.alpha": 1.0,
    "optim.grad_clip": 1.0,  # the one optim key its state does not hold
}
FREE_CHANGES = {
    "train.epochs": 30,
    "schedule.name": "cosine",
    "schedule.epochs": 30,
    "data.loader": "ffcv",
    "data.root": "/elsewhere",
    "data.num_workers": 4,
    "runtime.channels_last": False,
    "runtime.cuda_graph": False,
    "runtime.precision": "bf16",
    "loss.cuda_graph": False,
    "loss.tile": 1024,
    "loss.fused": True,
}
HELD_CHANGES = {"optim.name": "lars", "optim.lr": 0.01, "optim.no_decay_norm_bias": True}


def _with(cfg: dict, key: str, value) -> dict:
    section, name = key.split(".")
    return {**cfg, section: {**cfg[section], name: value}}


def test_every_guarded_key_is_named_and_the_free_ones_are_not():
    from dataclasses import asdict

    from dist_icm.config import Config

    saved = asdict(Config())
    for key, value in GUARDED_CHANGES.items():
        assert [k for k, _, _ in changed_keys(saved, _with(saved, key, value))] == [key], key
    covered = {g for g in GUARDED if any(k == g or k.startswith(g + ".") for k in GUARDED_CHANGES)}
    assert covered == set(GUARDED)
    for key, value in FREE_CHANGES.items():
        assert changed_keys(saved, _with(saved, key, value)) == [], key


def test_the_optimizer_s_settings_never_change_on_resume():
    from dataclasses import asdict

    from dist_icm.config import Config

    saved = asdict(Config())
    for key, value in HELD_CHANGES.items():
        for force in (False, True):
            with pytest.raises(ConfigError, match=f"holds the optimizer state of {key}="):
                check_config(saved, _with(saved, key, value), force=force, step=5)
    note = check_config(saved, _with(saved, "optim.grad_clip", 1.0), force=True, step=5)
    assert "optim.grad_clip=None (now 1.0)" in note
    # nor does ZeRO's stage (DDP: 0), whose shards lay the optimizer state out, but 1 <-> 2:
    # forced, these died in DeepSpeed or accelerate with a traceback
    for old, new in ((0, 2), (2, 0), (2, 3), (3, 1)):
        with pytest.raises(ConfigError, match=f"runtime.zero_stage={old} \\(now {new}\\)"):
            check_config(_with(saved, "runtime.zero_stage", old),
                         _with(saved, "runtime.zero_stage", new), force=True, step=5)  # fmt: skip
    one = _with(saved, "runtime.zero_stage", 1)
    note = check_config(one, _with(saved, "runtime.zero_stage", 2), force=True, step=5)
    assert "runtime.zero_stage=1 (now 2)" in note  # (a forced 1 -> 2 resumes exactly)


def test_a_changed_config_is_refused_unless_forced(tmp_path):
    run = tmp_path / "run"
    run_train(run, *QUICK, "train.max_steps=3")
    out = run_train(
        run, *QUICK, "train.max_steps=6", "resume=auto", "data.global_batch=32", check=False
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("dist_icm: error:")]
    assert len(line) == 1 and "data.global_batch=64 (now 32)" in line[0]
    forced = run_train(
        run, *QUICK, "train.max_steps=6", "resume=auto", "data.global_batch=32", "resume_force=true"
    )
    assert "resume_force=true: resuming step 3" in forced.stderr


def test_a_run_resumes_across_memory_layouts(tmp_path):
    """``runtime.channels_last`` and ``runtime.cuda_graph`` define no step: a run saved in NCHW
    (the default before NHWC) without the model's graphs resumes under the defaults, its
    weights loaded into channels-last tensors."""
    run = tmp_path / "run"
    run_train(
        run, *QUICK, "train.max_steps=3", "runtime.channels_last=false", "runtime.cuda_graph=false"
    )
    run_train(run, *QUICK, "train.max_steps=6", "resume=auto")
    done = summary(run)
    assert done["resumed_at_step"] == 3 and done["steps"] == 6
    assert done["config"]["runtime"]["channels_last"] is None  # the default: NHWC here
    assert done["config"]["runtime"]["cuda_graph"] is True


def test_resume_auto_in_a_fresh_folder_says_so(tmp_path):
    out = run_train(tmp_path / "new", *QUICK, "train.max_steps=2", "resume=auto")
    assert "resume=auto: no checkpoint in" in out.stderr and "starting at step 0" in out.stderr


def test_a_new_run_in_the_folder_of_an_earlier_one_stops_in_one_line(tmp_path):
    # it used to start: its steps were logged after the old run's in one metrics.jsonl, and a
    # later resume=auto took the old run's newer checkpoint for its own
    run = tmp_path / "run"
    run_train(run, *QUICK, "train.max_steps=5", "train.ckpt_every_steps=5")
    out = run_train(run, *QUICK, "train.max_steps=2", "loss.alpha=0.4", check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert [x for x in out.stderr.splitlines() if x.startswith("dist_icm")] == [
        f"dist_icm: error: run_dir {run} holds an earlier run (its checkpoints up to "
        "ckpt-000000005.pt): resume=auto goes on from it; to start afresh, name another run_dir "
        "or remove that one"
    ]
    shutil.rmtree(run / "checkpoints")  # a run that ended before its first checkpoint
    out = run_train(run, *QUICK, "train.max_steps=2", check=False)
    assert out.returncode == 2 and "holds an earlier run (its metrics.jsonl)" in out.stderr
    assert len(losses(run)) == 1  # the old run's one logged step (5), untouched


def _scalars(tb: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resumed_runs_log_each_step_once(tmp_path):
    # a run that crashed after step 30 but before its checkpoint: the last one is at step 21
    common = ["train.max_steps=30", "train.log_every=3", "train.ckpt_every=1"]
    run_train(tmp_path / "full", *QUICK, *common)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    (crashed / "checkpoints" / "ckpt-000000030.pt").unlink()
    (crashed / "summary.json").unlink()
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "train/lo')  # and a line the crash cut short
    out = run_train(crashed, *QUICK, *common, "resume=auto")
    assert "resumed at step 21" in out.stderr
    steps = [r["step"] for r in records(crashed) if "train/loss" in r]
    assert steps == sorted(set(steps)) == list(range(3, 31, 3))  # each step once, in order
    assert losses(crashed) == losses(tmp_path / "full")  # and the very same values
    evals = Counter(r["step"] for r in records(crashed) if "test/top1" in r)
    assert evals == {21: 1, 30: 1}
    assert _scalars(crashed / "tb", "train/loss") == list(range(3, 31, 3))
    resumed = summary(crashed)  # this session's figures, and the whole run's
    assert resumed["resumed_at_step"] == 21 and resumed["steps"] == 30
    assert resumed["run_train_s"] > resumed["session_train_s"] > 0


def test_a_restart_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    # a run that crashed after logging steps 3 and 6, before any checkpoint: resume=auto starts
    # again at step 0 in the same folder, and its metrics and TensorBoard hold each step once
    common = ["train.max_steps=6", "train.log_every=3"]
    run_train(tmp_path / "full", *QUICK, *common)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "checkpoints")
    (crashed / "summary.json").unlink()
    assert _scalars(crashed / "tb", "train/loss") == [3, 6]
    out = run_train(crashed, *QUICK, *common, "resume=auto")
    assert "starting at step 0" in out.stderr
    assert [r["step"] for r in records(crashed) if "train/loss" in r] == [3, 6]
    assert _scalars(crashed / "tb", "train/loss") == [3, 6]  # was [3, 6, 3, 6]


def test_unreadable_newer_checkpoints_are_set_aside_not_kept_in_place_of_new_ones(tmp_path):
    # a torn ckpt-12 outranked, by step, every checkpoint the resumed run wrote after it:
    # keep_ckpts=1 pruned each one as it was written, and the next resume started at 0 again
    run, keep = tmp_path / "run", ["train.ckpt_every_steps=5", "train.keep_ckpts=1"]
    run_train(run, *QUICK, *keep, "train.max_steps=12")
    torn = run / "checkpoints" / "ckpt-000000012.pt"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    out = run_train(run, *QUICK, *keep, "train.max_steps=11", "resume=auto")
    assert "starting at step 0" in out.stderr
    assert "skipped for an older one; set aside as ckpt-000000012.pt.unreadable" in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-000000011.pt", "ckpt-000000012.pt.unreadable"
    ]  # fmt: skip
    run_train(run, *QUICK, *keep, "train.max_steps=11", "resume=auto")
    assert summary(run)["resumed_at_step"] == 11


def test_a_resume_at_the_end_reports_the_run_s_summary_again(tmp_path):
    # the run's end (step 25) lies off the log grid: its duplicate share entered the summary,
    # but not the checkpoint, and a resume there (nothing to train) reported another mean
    run, common = tmp_path / "run", ["train.max_steps=25", "train.log_every=10"]
    run_train(run, *QUICK, *common)
    first = summary(run)
    run_train(run, *QUICK, *common, "resume=auto")
    again = summary(run)
    assert again["resumed_at_step"] == again["steps"] == 25
    for key in ("dup_share", "top1", "nll", "ece", "steps", "skipped_steps"):
        assert again[key] == first[key], key
    # a lower train.max_steps trains nothing either, and says so (it said nothing)
    out = run_train(run, *QUICK, "train.max_steps=20", "train.log_every=10", "resume=auto")
    assert "the checkpoint's step 25 is past this run's 20 steps" in out.stderr
    assert summary(run)["steps"] == 25 and summary(run)["top1"] == first["top1"]


def test_drop_records_after_keeps_the_checkpoint_s_past(tmp_path):
    from dist_icm.report import drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "x": 1}\n{"step": 3}\n{"step": 2, "y": 2}\n{"st')
    assert drop_records_after(path, 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2, "x": 1}\n{"step": 2, "y": 2}\n'
    assert drop_records_after(tmp_path / "missing.jsonl", 2) == 0


def test_resuming_an_earlier_checkpoint_removes_the_later_ones(tmp_path):
    # kept, step 6 of the timeline left behind would outrank the new run's own checkpoints:
    # pruning keeps the newest by step, and resume=auto would take it
    run = tmp_path / "run"
    run_train(run, *QUICK, "train.max_steps=6", "train.ckpt_every_steps=2")
    folder = run / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(folder)][-1] == "ckpt-000000006.pt"
    out = run_train(run, *QUICK, "train.max_steps=4", f"resume={folder / 'ckpt-000000002.pt'}")
    assert "resumed at step 2: removed the later ckpt-000000004.pt, ckpt-000000006.pt" in out.stderr
    assert [p.name for p in checkpoint.list_checkpoints(folder)] == [
        "ckpt-000000002.pt", "ckpt-000000004.pt"
    ]  # fmt: skip
    again = run_train(run, *QUICK, "train.max_steps=4", "resume=auto")
    assert summary(run)["resumed_at_step"] == 4 and "removed" not in again.stderr


def test_the_first_resumed_step_takes_the_lr_of_the_run_s_own_schedule(tmp_path):
    # train.epochs (and with it a cosine schedule) may change on resume: the step after the
    # checkpoint runs at the new schedule's lr for it, not at the lr the checkpoint's optimizer
    # state holds (the old schedule's), as every later step does
    from cli import setup_job

    from dist_icm.resume import restore
    from dist_icm.schedule import lr_factor

    common = [*QUICK, "schedule=cosine", "train.tensorboard=false", f"run_dir={tmp_path}"]
    run_train(tmp_path, *common, "train.max_steps=4", "train.ckpt_every_steps=4")
    held = checkpoint.load(tmp_path / "checkpoints" / "ckpt-000000004.pt")
    held = held["optimizer"]["param_groups"][0]["lr"]
    job = setup_job([*common, "train.epochs=3", "resume=auto"])
    step = restore(job, choose(job.ckpt_dir, "auto", None))
    peak = job.scheduler.base_lrs[0]
    new = peak * lr_factor(step, job.steps_per_epoch, job.cfg.schedule)
    assert step == 4 and abs(new - held) > 1e-4  # the two schedules differ at step 4
    assert job.optimizer.param_groups[0]["lr"] == new == job.scheduler.get_last_lr()[0]


@pytest.mark.parametrize(
    "overrides, tied",
    [
        ([], []),  # the quickstart: fixed mixing groups, no BatchNorm, no dropout
        (["loss.group_size=null"], ["the mixing groups"]),
        (["loss=ce", "loss.group_size=null"], []),  # CE mixes nothing
        (["model=tiny_cnn"], ["BatchNorm's statistics"]),
        (["model=tiny_cnn", "model.bn_group=4"], []),  # ghost BN: fixed groups of the batch
        (["model.dropout=0.3", "loss.group_size=null"], ["the mixing groups", "dropout's masks"]),
    ],
)
def test_a_run_moved_to_another_world_size_names_what_depends_on_it(overrides, tied):
    from cli import setup_job

    from dist_icm.same_run import moved_note

    job = setup_job([*QUICK, *overrides])
    assert moved_note(job, 1) is None and moved_note(job, None) is None  # same size, or unknown
    note = moved_note(job, 2) or ""
    assert [part for part in tied if part in note] == tied
    assert bool(note) == bool(tied), note
    assert not tied or note.startswith("resumed on 1 process, the checkpoint's run had 2: ")
