"""DeepSpeed ZeRO 1, 2 and 3 through Accelerate on 2 CPU processes (gloo), under the same
`accelerate launch` as DDP: the DDP run's losses, an exact resume, world size 2, a plain state
dict in every checkpoint, and bf16 through the DeepSpeed config."""

import importlib.util
import os

import pytest
import torch
from cli import losses, records, run_train, summary

from dist_icm.checkpoint import latest
from dist_icm.metrics import evaluate_sums, finalize

pytestmark = pytest.mark.multiproc

if importlib.util.find_spec("deepspeed") is None:
    if os.environ.get("DIST_ICM_REQUIRE_DEEPSPEED"):  # CI sets it: there these tests must run
        raise RuntimeError("deepspeed is not installed: pip install -e '.[deepspeed]'")
    pytest.skip(
        "deepspeed is not installed: pip install -e '.[deepspeed]'", allow_module_level=True
    )

ARGS = ["experiment=quickstart", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "runtime.threads=1"]  # fmt: skip


def _close(a: dict, b: dict, rel: float) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rel * abs(b[k]) for k in b)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp")
    run_train(run, *ARGS, "train.max_steps=12", world=2)
    return run


# ZeRO-3 (parameters partitioned too) by default; stages 1 and 2 in the slow run. Without
# transformers installed (as CI installs the project), ZeRO-3 runs without it too
@pytest.mark.parametrize(
    "stage", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3]
)
def test_zero_gives_the_ddp_run_s_losses_and_resumes_exactly(tmp_path, ddp, stage):
    zero = [f"runtime=deepspeed_zero{stage}"]
    run_train(tmp_path / "cut", *ARGS, *zero, "train.max_steps=6", world=2)
    run_train(tmp_path / "cut", *ARGS, *zero, "train.max_steps=12", "resume=auto", world=2)
    run = tmp_path / "cut"
    # the same arithmetic as DDP up to summation order: 1e-6 relative
    assert _close(losses(run), losses(ddp), rel=1e-6), (losses(run), losses(ddp))
    assert summary(run)["world_size"] == 2 and summary(run)["resumed_at_step"] == 6
    # every checkpoint file has its shard folder, holding both ranks' optimizer shards, and no
    # folder outlives its file (nor a temporary one its save)
    ckpts = run / "checkpoints"
    assert {p.stem for p in ckpts.glob("*.zero")} == {p.stem for p in ckpts.glob("*.pt")}
    assert (ckpts / "ckpt-000000012.zero").is_dir() and not list(ckpts.glob(".*"))
    shards = sorted(p.name for p in (ckpts / "ckpt-000000012.zero" / "state").iterdir())
    assert [s for s in shards if "optim_states" in s] == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ], shards
    # and the resumed half equals an uninterrupted ZeRO run exactly
    run_train(tmp_path / "whole", *ARGS, *zero, "train.max_steps=12", world=2)
    assert losses(run) == losses(tmp_path / "whole")
    assert records(run)[-1] == records(tmp_path / "whole")[-1]


def test_gradient_clipping_is_the_project_s_own_on_both_paths(tmp_path, ddp):
    clip = ["optim.grad_clip=0.05", "train.max_steps=6"]
    run_train(tmp_path / "ddp", *ARGS, *clip, world=2)
    run_train(tmp_path / "zero", *ARGS, *clip, "runtime=deepspeed_zero2", world=2)
    clipped = losses(tmp_path / "ddp")
    assert _close(losses(tmp_path / "zero"), clipped, rel=1e-6)  # the same clipping...
    unclipped = {s: v for s, v in losses(ddp).items() if s <= 6}
    assert not _close(clipped, unclipped, rel=1e-3)  # ...which really clips


def test_a_forced_resume_clips_at_its_own_optim_grad_clip(tmp_path, ddp):
    # ZeRO-1/2 loaded the clipping their checkpoint was saved with (none): the resumed steps
    # went on unclipped, as the unclipped DDP run (the ddp fixture) does
    zero = ["runtime=deepspeed_zero2"]
    run_train(tmp_path, *ARGS, *zero, "train.max_steps=2", world=2)
    run_train(tmp_path, *ARGS, *zero, "train.max_steps=4", "resume=auto", "resume_force=true",
              "optim.grad_clip=0.05", world=2)  # fmt: skip
    got, unclipped = losses(tmp_path), {s: v for s, v in losses(ddp).items() if s <= 4}
    # steps 1-3 are the weights of unclipped updates; step 4 follows the first clipped one
    assert _close({s: got[s] for s in (1, 2, 3)}, {s: unclipped[s] for s in (1, 2, 3)}, 1e-6)
    assert abs(got[4] - unclipped[4]) > 1e-3 * unclipped[4], (got, unclipped)


def test_accumulation_comes_from_the_batch_plan(tmp_path, ddp):
    # 2 micro-steps of 16 per rank: the engine accumulates as DDP does, and the same global
    # batch of 64 in one micro-step is the negative control (another mixing, other losses)
    accum = ["runtime.grad_accum=2", "train.max_steps=6"]
    run_train(tmp_path / "ddp", *ARGS, *accum, world=2)
    run_train(tmp_path / "zero", *ARGS, *accum, "runtime=deepspeed_zero2", world=2)
    assert "2 processes x 16 x 2 micro-steps" in (tmp_path / "zero" / "train.log").read_text()
    assert _close(losses(tmp_path / "zero"), losses(tmp_path / "ddp"), rel=1e-6)
    one_micro_step = {s: v for s, v in losses(ddp).items() if s <= 6}
    assert not _close(losses(tmp_path / "ddp"), one_micro_step, rel=1e-3)


def test_bf16_through_the_deepspeed_config_and_a_plain_state_dict(tmp_path, ddp):
    run = tmp_path / "bf16"
    run_train(run, *ARGS, "runtime=deepspeed_zero2", "runtime.precision=bf16",
              "train.max_steps=12", world=2)  # fmt: skip
    assert _close(losses(run), losses(ddp), rel=2e-2)  # bf16's precision...
    assert not _close(losses(run), losses(ddp), rel=1e-7)  # ...and bf16 it is
    # every checkpoint holds the whole model as a plain state dict: evaluate it here
    from dist_icm.config import DataConfig
    from dist_icm.data.pipeline import build_data
    from dist_icm.models import build_model

    state = latest(run / "checkpoints")[1]["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    model = build_model("small_cnn", 10, 1)
    model.load_state_dict(state)
    data = build_data(DataConfig(global_batch=64), seed=0, micro_global=64, rank=0, world_size=1)
    mine = finalize(evaluate_sums(model, data.test_loader, "cpu"))
    assert mine["top1"] == pytest.approx(summary(run)["top1"], abs=1e-9)
    assert mine["nll"] == pytest.approx(summary(run)["nll"], rel=1e-5)


def test_zero_without_a_launcher_stops_with_one_line(tmp_path):
    out = run_train(tmp_path, *ARGS, "runtime=deepspeed_zero1", "train.max_steps=2", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "dist_icm: error: runtime.zero_stage needs the processes started by a launcher"
        in out.stderr
    )


def test_zero_shards_resumed_on_another_number_of_processes_stop_in_one_line(tmp_path):
    # DeepSpeed's own check raised a traceback on every rank (exit 1)
    import subprocess
    import sys

    from cli import CPU_CONFIG, REPO

    run_train(tmp_path / "run", *ARGS, "runtime=deepspeed_zero2", "train.max_steps=2", world=2)
    cmd = [sys.executable, "-m", "dist_icm.launch", "--config_file", str(CPU_CONFIG),
           "--num_processes", "1", "--main_process_port", "0", "-m", "dist_icm.train", *ARGS,
           "runtime=deepspeed_zero2", "train.max_steps=4", "resume=auto",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.startswith("dist_icm")]
    assert lines == [
        "dist_icm: error: resume: the checkpoint of step 2 holds ZeRO shards of 2 processes, "
        "this run has 1: resume on 2 (DeepSpeed's ds_to_universal can reshard)"
    ], out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "damage", ["flipped", pytest.param("truncated", marks=pytest.mark.slow), "missing", "file_gone"]
)
def test_a_damaged_shard_folder_is_skipped_for_an_older_checkpoint(tmp_path, damage):
    # the weights and optimizer state come from the shards: a flipped byte used to load as it
    # was (a silently different run), a truncated or missing one to die in DeepSpeed (exit 1)
    import shutil

    zero = ["runtime=deepspeed_zero2", "train.ckpt_every_steps=2"]
    run = tmp_path / "run"
    run_train(run, *ARGS, *zero, "train.max_steps=4", world=2)
    newest = run / "checkpoints" / "ckpt-000000004.zero"
    shard = newest / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "missing":
        shutil.rmtree(newest)
    elif damage == "file_gone":  # one file of several: DeepSpeed's assert, or a hang on ZeRO-3
        (newest / "state" / "mp_rank_00_model_states.pt").unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:  # one byte in the middle of the file: inside a member's data
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    out = run_train(run, *ARGS, *zero, "train.max_steps=6", "resume=auto", world=2)
    skipped = [x for x in out.stderr.splitlines() if "skipped for an older one" in x]
    assert len(skipped) == 1 and "ckpt-000000004.pt" in skipped[0], out.stderr[-3000:]
    why = {"missing": "its ZeRO shards' folder ckpt-000000004.zero is missing",
           "truncated": "shard state/zero_pp_rank_1_mp_rank_00_optim_states.pt is unreadable",
           "flipped": "fails its CRC-32 check",
           "file_gone": "shard state/mp_rank_00_model_states.pt is missing"}[damage]  # fmt: skip
    assert why in skipped[0], skipped[0]
    assert summary(run)["resumed_at_step"] == 2


def test_a_full_disk_while_writing_the_shards_stops_every_rank_with_one_line(tmpfs):
    # torch's zip writer reports ENOSPC as "unexpected pos ...": it was a traceback and exit 1
    import subprocess

    from cli import launcher

    run = tmpfs(600 * 1024) / "run"  # room for the run's logs, not for its first shards
    cmd = [*launcher(2, via="dist_icm.launch"), "-m", "dist_icm.train", *ARGS,
           "runtime=deepspeed_zero2", "train.max_steps=4", "runtime.timeout_s=120",
           f"hydra.run.dir={run}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stderr[-3000:]  # dist_icm.train.WRITE_EXIT
    tmp = run / "checkpoints" / ".ckpt-000000004.zero.tmp"
    errors = [x for x in out.stderr.splitlines() if x.startswith("dist_icm: error:")]
    assert errors == [f"dist_icm: error: cannot write checkpoint {tmp}: No space left on device"]
    assert "Traceback" not in out.stderr and not list(run.glob("checkpoints/*.pt"))
