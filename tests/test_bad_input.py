"""Bad input (issue 11): every bad value or input file stops the main job with exit code 2 and
exactly one line on stderr, ``dist_icm: error: ...``, naming the key or file and what is
allowed; no traceback, and no run folder left behind by a run that failed at start.

``CLI_CASES`` is the table the README's "Bad input" section shows (a test keeps the two
equal): each runs the real command line (``python -m dist_icm.train``) from an empty folder and
must print exactly its line. ``CONFIG_CASES`` sweeps a bad value of every config key in-process
(Hydra's compose API + ``to_config``, what the entry point runs first); the same sweep through
the command line is ``slow``. ``dist-icm-data`` has its own table.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import REPO, last_logged, launcher, run_train

from dist_icm.compose import SECTIONS, register_schema, to_config
from dist_icm.config import Config, ConfigError
from dist_icm.models import MODEL_NAMES

README = REPO / "README.md"
QUICK = ("experiment=quickstart", "train.max_steps=1", "train.progress=false")
TRAIN_KEYS = (
    "epochs, max_steps, log_every, eval_every, ckpt_every, ckpt_every_steps, ckpt_every_min, "
    "keep_ckpts, max_skipped, seed, progress, tensorboard"
)
# from the code, so that the README's table (compared below, in the default run) cannot go stale
MODELS = ", ".join(sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml")))
RUN_DIR_HINT = "run_dir (or hydra.run.dir) must name a folder that can be made"

# (overrides, the exact line). Placeholders: {file} a plain file, {empty} an empty folder,
# {garbage} a file that is no checkpoint, {cfgdir} a config folder with a broken YAML file,
# {missing} a path that does not exist, {firstbad} an ImageFolder tree whose first image is
# not an image, {badtree} one with random bytes for a JPEG, {ckpt} a quickstart checkpoint.
CLI_CASES = [
    (
        "train.epochz=3",
        f"unknown config key train.epochz (keys of train: {TRAIN_KEYS})",
    ),
    (
        "model=nosuch",
        f"unknown model option 'nosuch' (model options: {MODELS}; "
        "or model.name=<a torchvision/timm model>)",
    ),
    (
        "model.name=nosuch",
        f"unknown model 'nosuch': use one of {', '.join(MODEL_NAMES)} or a torchvision/timm "
        "model name",
    ),
    ("loss.axis=foo", "loss.axis must be one of class, pair, both, got 'foo'"),
    ("loss.gather=foo", "loss.gather must be one of triples, scores, got 'foo'"),
    (
        "loss.group_size=0",
        "loss.group_size must be >= 1 (null: the per-device batch), got 0",
    ),
    ("runtime.threads=-1", "runtime.threads must be >= 1 (or null: torch's), got -1"),
    ("train.epochs=abc", "train.epochs must be an integer: 'abc' could not be converted"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.progress=2", "train.progress must be true or false, got 2"),
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    (
        "train.epochs=[",
        "cannot parse the override 'train.epochs=[' (no viable alternative at input '['): "
        "write key=value, quoting values with brackets or spaces (see Hydra's override grammar)",
    ),
    (
        "hydra.run.dir={file}/run",
        f"cannot create the run folder {{file}}/run (Not a directory): {RUN_DIR_HINT}",
    ),
    (
        "hydra.run.dir=/proc/dist_icm_run",
        f"cannot create the run folder /proc/dist_icm_run (No such file or directory): "
        f"{RUN_DIR_HINT}",
    ),
    (
        "data=imagefolder data.root={missing}",
        "data.root '{missing}' is not a folder (data=imagefolder needs one)",
    ),
    (
        "data=imagefolder data.root={empty}",
        "imagefolder root '{empty}' must hold train/<class>/*.jpg and test/<class>/*.jpg "
        "(or val/ instead of test/): point data.root at such a folder",
    ),
    (
        "data=imagefolder data.root={firstbad}",
        "cannot read image {firstbad}/train/a/0.jpg (not an image file PIL can decode): "
        "fix or remove it",
    ),
    (
        "data.global_batch=100000",
        "data.global_batch: a micro-step's global batch of 100000 exceeds the 1347 training "
        "samples (after data.fraction and data.long_tail): lower data.global_batch "
        "(or raise runtime.grad_accum)",
    ),
    (
        "data.loader=ffcv data.ffcv_cache={file}/cache",
        "data.ffcv_cache={file}/cache: cannot create {file}/cache/digits-71e1eb13a2dd "
        "(Not a directory): set data.ffcv_cache to a folder that can be written",
    ),
    (
        "--config-dir={cfgdir} data=broken",
        "cannot parse the config file {cfgdir}/data/broken.yaml (line 2: while parsing a flow "
        "sequence expected ',' or ']', but got '<stream end>')",
    ),
    (
        "--bogus",
        "unrecognized arguments: --bogus (Hydra's flags come first, then the key=value "
        "overrides); see --help",
    ),
    (
        "resume={missing}",
        "resume='{missing}': no such checkpoint file (or use resume=auto)",
    ),
    (
        "resume={empty}",
        "resume={empty} is a folder: name a checkpoint file (its checkpoints/ckpt-*.pt), or "
        "resume=auto with run_dir={empty}",
    ),
    (
        "resume={garbage}",
        "checkpoint {garbage} is unreadable (no zip index: truncated, or not written by "
        "torch.save): delete it or pass another",
    ),
    (
        "resume={ckpt} resume_force=true model=cifar_resnet18",
        "resume={ckpt}: the checkpoint's weights do not fit model.name=cifar_resnet18 "
        '(Missing key(s) in state_dict: "conv1.weight", "bn1.weight", "bn1.bias", '
        '"bn1.running_mean", "bn1.running_var", "layer...); resume_force=true cannot change '
        "the model or optimizer: resume with the checkpoint's settings, or start a new run "
        "folder",
    ),
    (
        "resume={ckpt} resume_force=true optim=lars optim.no_decay_norm_bias=false",
        "the checkpoint at step 2 holds the optimizer state of optim.lr_scaling='none' (now "
        "'linear'), optim.name='sgd' (now 'lars'): the optimizer's settings cannot change on "
        "resume (not even with resume_force); resume with them, or start a new run folder",
    ),
]
# the same corrupt file met mid-training (on the torch loader's worker processes)
CORRUPT_JPEG = (
    "data=imagefolder data.root={badtree} data.num_workers=2 data.global_batch=8 loss.group_size=8",
    "cannot read image {badtree}/train/b/5.jpg (not an image file PIL can decode): "
    "fix or remove it",
)


def _env() -> dict:
    """The repository on the path (the tests run the job from other folders)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {"PYTHONPATH": path}


def _image_tree(root: Path, per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """What the placeholders of the tables stand for."""
    base = tmp_path_factory.mktemp("bad_input")
    (base / "file").write_text("a file, not a folder\n")
    (base / "empty").mkdir()
    (base / "garbage.pt").write_bytes(b"not a checkpoint")
    (base / "configs" / "data").mkdir(parents=True)
    (base / "configs" / "data" / "broken.yaml").write_text("global_batch: [1\n")
    firstbad = _image_tree(base / "firstbad")
    (firstbad / "train" / "a" / "0.jpg").write_bytes(b"not a jpeg")
    badtree = _image_tree(base / "badtree")
    noise = np.random.default_rng(1).integers(0, 255, 300, dtype=np.uint8).tobytes()
    (badtree / "train" / "b" / "5.jpg").write_bytes(noise)  # random bytes for a JPEG
    return {
        "file": str(base / "file"),
        "empty": str(base / "empty"),
        "garbage": str(base / "garbage.pt"),
        "cfgdir": str(base / "configs"),
        "missing": str(base / "missing"),
        "firstbad": str(firstbad),
        "badtree": str(badtree),
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A quickstart checkpoint after 2 steps (small_cnn)."""
    run_dir = tmp_path_factory.mktemp("ckpt_run")
    run_train(run_dir, *QUICK[:1], "train.max_steps=2", env=_env())
    (path,) = (run_dir / "checkpoints").glob("ckpt-*.pt")
    return str(path)


def _fill(text: str, places: dict[str, str]) -> str:
    return text.format(**places) if "{" in text else text


def _error_line(out: subprocess.CompletedProcess) -> str:
    """The one stderr line, checked to be the only one, with no traceback."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("dist_icm: error: "), lines[0]
    return lines[0].removeprefix("dist_icm: error: ")


def _nothing_left(cwd: Path) -> None:
    assert not (cwd / "outputs").exists(), sorted(p.name for p in (cwd / "outputs").rglob("*"))


# the default run takes one case of each kind (a subprocess costs 5-15 s on 2 busy cores);
# the others run with -m slow
REPRESENTATIVE = {
    "train.epochz=3",  # Hydra's composition
    "loss.axis=foo",  # a dataclass check, after Hydra made the run folder
    "hydra.run.dir={file}/run",  # a run folder that cannot be made
    "data=imagefolder data.root={firstbad}",  # an image that is not one, at start
    "resume={garbage}",  # a file that is no checkpoint
    "resume={ckpt} resume_force=true model=cifar_resnet18",  # another model's checkpoint
    # another optimizer's (whose state torch loads, and the first step then failed on)
    "resume={ckpt} resume_force=true optim=lars optim.no_decay_norm_bias=false",
}


def _cli_params():
    for args, line in CLI_CASES:
        marks = () if args in REPRESENTATIVE else (pytest.mark.slow,)
        yield pytest.param(args, line, id=args, marks=marks)


@pytest.mark.parametrize("args, line", list(_cli_params()))
def test_bad_input_is_one_line_and_exit_2(args, line, places, request, tmp_path):
    if "{ckpt}" in args:
        places = places | {"ckpt": request.getfixturevalue("ckpt")}
    if "data.loader=ffcv" in args:
        pytest.importorskip("ffcv", reason="data.loader=ffcv says it needs ffcv instead")
    overrides = [_fill(a, places) for a in args.split()]
    flags = [a for a in overrides if a.startswith("-")]  # Hydra's flags come first
    overrides = [a for a in overrides if not a.startswith("-")]
    env = _env() | {"DIST_ICM_CACHE": str(tmp_path / "cache")}
    out = run_train(None, *flags, *QUICK, *overrides, check=False, cwd=tmp_path, env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert _error_line(out) == _fill(line, places)
    _nothing_left(tmp_path)


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.multiproc)])
def test_a_corrupt_jpeg_found_mid_training_is_one_line_and_exit_2(places, tmp_path, world):
    # met by a DataLoader worker in the first step: the run had started (its folder stays). On
    # 2 processes (through dist-icm-launch) one rank meets it, and the other, whose collective
    # its exit fails, stops without a line of its own: the line is printed once
    args, line = CORRUPT_JPEG
    overrides = [_fill(a, places) for a in args.split()]
    if world > 1:  # mixing groups within a rank's 4 images
        overrides = [a.replace("group_size=8", "group_size=4") for a in overrides]
    job = ["-m", "dist_icm.train", "experiment=quickstart", "train.max_steps=2",  # one epoch:
           "train.progress=false", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    cmd = [*launcher(world, "dist_icm.launch"), *job]  # several: every training image is read
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("dist_icm: error:")]
    assert errors == [f"dist_icm: error: {_fill(line, places)}"], out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == errors[0]  # the run's last word
    # the run's own lines (on stderr off a terminal) are the only others
    others = [x for x in out.stderr.splitlines() if x.strip() and x not in errors]
    assert all(x.startswith("global batch ") for x in others), others
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()  # the run's folder stays
    assert last_logged(tmp_path / "run") == errors[0]  # and its log ends with the line


def test_a_multirun_stops_at_the_first_cell_that_fails(tmp_path):
    # a data error shows when its cell starts: that cell's folder stays, no later cell runs
    sweep, empty = tmp_path / "sweep", tmp_path / "empty"
    empty.mkdir()
    out = run_train(None, "-m", *QUICK, "data=imagefolder", f"data.root={empty},{tmp_path}",
                    f"hydra.sweep.dir={sweep}", check=False, cwd=tmp_path, env=_env())  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert _error_line(out).startswith(f"imagefolder root '{empty}' must hold train/")
    assert (sweep / "0" / ".hydra").is_dir() and not (sweep / "1").exists()


@pytest.mark.parametrize(
    "sweep_args, line",
    [(("loss.alpha=0.2,-1", "train.epochs=1,2"), "sweep cell 2 (loss.alpha=-1 train.epochs=1): "
      "loss.alpha must be > 0 (null: the method's), got -1.0"),
     (("loss=mixup,nosuch",), "sweep cell 1 (loss=nosuch): unknown loss option 'nosuch' (loss "
      "options: ce, cutmix, icm_cutmix"),
     (("data.global_batch=64,1",), "sweep cell 1 (data.global_batch=1): loss.group_size=16 must "
      "divide the per-device batch 1")],
    ids=["value", "group", "batch"],
)  # fmt: skip
def test_a_multirun_checks_every_cell_before_the_first_runs(sweep_args, line, tmp_path):
    # a bad value, group option or batch plan in a later cell stops the sweep before cell 0
    # trains, in one line naming the cell
    sweep = tmp_path / "sweep"
    out = run_train(None, "-m", *QUICK, *sweep_args, f"hydra.sweep.dir={sweep}", check=False,
                    cwd=tmp_path, env=_env())  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert _error_line(out).startswith(line)
    assert not sweep.exists() and out.stderr.strip().count("\n") == 0, out.stderr


def test_a_folder_that_existed_is_never_removed(tmp_path):
    # a run that fails at start in a folder that was there before leaves the folder (and what
    # Hydra wrote into it: the folder is the user's)
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    out = run_train(run_dir, *QUICK, "loss.axis=foo", check=False, cwd=tmp_path, env=_env())
    assert out.returncode == 2 and run_dir.is_dir()
    # (a new one is removed with the parents it made: every CLI case checks outputs/ is gone)


@pytest.mark.parametrize(
    "stray", [None, "notes.txt", ".hydra/extra.yaml", "train.log", "sub/"], ids=str
)
def test_a_new_run_folder_is_removed_only_when_it_holds_hydra_s_files(stray, tmp_path):
    # the folder a failed start made is removed with the parents it made, unless something
    # other than Hydra's .hydra/ files and empty logs is in it (None: nothing else, removed)
    from dist_icm.startup import RunDirWatch, remove_unused_run_dir

    top = tmp_path / "outputs"
    run_dir = top / "2026-11-28" / "00-00-00"
    RunDirWatch.run_dir, RunDirWatch.created = run_dir, top
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text("{}\n")
    (run_dir / "train.log").touch()  # an empty log is Hydra's too
    if stray == "train.log":
        (run_dir / stray).write_text("a line\n")
    elif stray is not None and stray.endswith("/"):
        (run_dir / stray).mkdir()
    elif stray is not None:
        (run_dir / stray).write_text("mine\n")
    try:
        removed = remove_unused_run_dir()
    finally:
        RunDirWatch.run_dir = RunDirWatch.created = None
    assert removed == (stray is None)
    assert top.exists() == (stray is not None)  # the parents it made go with it
    assert tmp_path.is_dir()  # and nothing above them


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    env = _env() | {"HYDRA_FULL_ERROR": "1"}
    out = run_train(None, *QUICK, "train.epochz=3", check=False, cwd=tmp_path, env=env)
    assert out.returncode == 2 and "Traceback" in out.stderr


# ------------------------------------------------------------------ every key, in-process


def _bad_values(kinds: str) -> list[str]:
    if "bool" in kinds:
        return ["maybe", "2"]
    if "tuple" in kinds:
        return ["abc", "[a]"]
    if "int" in kinds:
        return ["abc", "1.5", "[1]"]
    if "float" in kinds:
        return ["abc", "nan", "inf"]
    return ["''", "[1,2]"]


RANGES = [  # values of the right type outside what a key allows
    "data.name=nosuch", "data.num_classes=1", "data.global_batch=0", "data.fraction=0",
    "data.fraction=1.5", "data.long_tail=0", "data.augment=nosuch", "data.loader=nosuch",
    "data.num_workers=-1", "data.eval_batch=0", "data.ffcv_write_mode=nosuch",
    "data.ffcv_max_side=4", "data.ffcv_quality=0", "data.ffcv_quality=101", "model.bn_group=0",
    "loss.name=nosuch", "loss.alpha=0", "loss.group_size=0", "loss.axis=nosuch",
    "loss.gather=nosuch", "loss.tile=-1", "loss.regmix_weight=-1", "loss.tau=2",
    "loss.kappa=0.5", "optim.name=nosuch", "optim.lr=0", "optim.momentum=1",
    "optim.weight_decay=-1", "optim.lr_scaling=nosuch", "optim.reference_batch=0",
    "optim.grad_clip=0", "schedule.name=nosuch", "schedule.epochs=0", "schedule.gamma=0",
    "schedule.warmup_epochs=-1", "schedule.warmup_start_factor=2", "schedule.min_factor=2",
    "runtime.device=nosuch", "runtime.precision=nosuch", "runtime.grad_accum=0",
    "runtime.threads=0", "runtime.zero_stage=4", "runtime.timeout_s=0", "train.epochs=0",
    "train.max_steps=0", "train.log_every=0", "train.eval_every=0", "train.ckpt_every=0",
    "train.ckpt_every_steps=0", "train.ckpt_every_min=0", "train.keep_ckpts=0",
    "train.max_skipped=-1", "train.seed=-1",
]  # fmt: skip
TOP = ["resume=true", "resume=[1]", "resume_force=maybe", "resume_force=3", "run_dir=[1]",
       "run_dir=''", "train.nosuch=1", "nosuch=1", "+data.nosuch=1", "model=nosuch",
       "data=nosuch", "loss=nosuch", "optim=nosuch", "schedule=nosuch", "runtime=nosuch",
       "train=nosuch", "data=5", "optim=1.5", "data=null", "experiment=paper/nosuch"]  # fmt: skip


def _config_cases() -> list[str]:
    cases = []
    for section in SECTIONS:
        schema = Config.__dataclass_fields__[section].default_factory
        for f in dataclasses.fields(schema):
            cases += [f"{section}.{f.name}={v}" for v in _bad_values(str(f.type))]
    return cases + RANGES + TOP


CONFIG_CASES = _config_cases()


def _key(override: str) -> str:
    return override.split("=")[0].lstrip("+")


@pytest.fixture(scope="module")
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        yield lambda *overrides: hydra_compose("train", overrides=list(overrides))


def test_every_config_key_has_bad_values_in_the_sweep():
    keys = {_key(case) for case in CONFIG_CASES}
    for section in SECTIONS:
        schema = Config.__dataclass_fields__[section].default_factory
        assert {f"{section}.{f.name}" for f in dataclasses.fields(schema)} <= keys


@pytest.mark.parametrize("override", CONFIG_CASES)
def test_a_bad_value_of_any_key_is_one_line_naming_it(override, compose):
    from dist_icm.startup import hydra_error_message

    try:
        cfg = compose("experiment=quickstart", override)
    except Exception as e:  # Hydra's errors: what main() turns into its line
        message = hydra_error_message(e, [override])
    else:
        with pytest.raises(ConfigError) as info:
            to_config(cfg)
        message = str(info.value)
    assert "\n" not in message
    assert _key(override) in message, message
    assert re.search(r"must|one of|unknown|keys of", message), message


@pytest.mark.parametrize(
    "override, options",
    [("data=null", "data options: cifair10, cifair100, cifar10, cifar100, digits, imagefolder"),
     ("experiment=paper/nosuch", "experiment/paper options: birds, figure3, figure4, "
      "table1_left, table1_right"),
     ("hydra/job_logging=nosuch", "hydra/job_logging options: default, disabled, dist_icm, "
      "none, stdout")],
)  # fmt: skip
def test_a_bad_group_option_lists_that_group_s_options(override, options, compose):
    # Hydra's own message for data=null names no group, and for a nested group it lists the
    # parent's options (experiment's quickstart ... for experiment/paper/nosuch)
    from dist_icm.startup import hydra_error_message

    with pytest.raises(Exception) as info:
        compose("experiment=quickstart", override)
    assert options in hydra_error_message(info.value, [override])


@pytest.mark.slow
@pytest.mark.parametrize("override", CONFIG_CASES)
def test_a_bad_value_of_any_key_through_the_command_line(override, tmp_path):
    out = run_train(None, *QUICK, override, check=False, cwd=tmp_path, env=_env())
    assert out.returncode == 2, out.stderr[-3000:]
    assert _key(override) in _error_line(out)
    _nothing_left(tmp_path)


# ------------------------------------------------------------------ dist-icm-data

DATA_CASES = [
    ("digits --workers -3", "argument --workers: must be >= 0 (0: all cores), got -3 "
     "(see dist-icm-data --help)"),
    ("digits --quality 0", "--quality must lie in [1, 100], got 0"),
    ("digits --seed -1", "argument --seed: must lie in [0, 2^32), got -1 (see dist-icm-data "
     "--help)"),
    ("digits --seed 4294967296", "argument --seed: must lie in [0, 2^32), got 4294967296 "
     "(see dist-icm-data --help)"),
    ("digits --max-side 3", "--max-side must be >= 8, got 3"),
    ("cifar10", "CIFAR-10 needs a root folder: set --root to where it is (or goes)"),
    ("imagefolder --root {missing}", "--root '{missing}' is not a folder (dist-icm-data "
     "imagefolder needs one)"),
    ("digits --bogus", "unrecognized arguments: --bogus (see dist-icm-data --help)"),
]  # fmt: skip


@pytest.mark.parametrize("args, line", DATA_CASES, ids=[a for a, _ in DATA_CASES])
def test_dist_icm_data_bad_input_is_one_line_and_exit_2(args, line, places, capsys):
    from dist_icm.data.cli import main

    with pytest.raises(SystemExit) as info:  # main() itself, as dist-icm-data runs it
        main(_fill(args, places).split())
    assert info.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines == [f"dist_icm: error: {_fill(line, places)}"]


def test_dist_icm_data_exits_2_from_the_command_line(tmp_path):
    cmd = [sys.executable, "-m", "dist_icm.data.write", "digits", "--workers", "-3"]
    env = _env() | {"DIST_ICM_CACHE": str(tmp_path)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert _error_line(out).startswith("argument --workers: must be >= 0")
    assert not any(tmp_path.iterdir())


def test_dist_icm_data_help_describes_every_option():
    from dist_icm.data.cli import CLI_NAMES, build_parser
    from dist_icm.data.write import TRAINER_NAMES

    parser = build_parser()
    assert all(action.help for action in parser._actions), [
        action.dest for action in parser._actions if not action.help
    ]
    assert CLI_NAMES.keys() == TRAINER_NAMES.keys()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert {name for name in CLI_NAMES.values() if name.startswith("--")} <= flags


# ------------------------------------------------------------------ README


def _readme_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]*)` \| `dist_icm: error: (.*)` \|$", section, re.M)
    assert rows, "README's Bad input section has no table rows"
    return rows


def _readme_form(text: str) -> str:
    """How the README writes a table entry: placeholders as <name>."""
    return re.sub(r"\{(\w+)\}", r"<\1>", text)


def test_the_readme_table_is_the_tested_table():
    tested = {_readme_form(a): _readme_form(line) for a, line in [*CLI_CASES, CORRUPT_JPEG]}
    rows = dict(_readme_rows())
    assert rows == tested


def test_zero_stage_without_deepspeed_says_what_to_install(tmp_path):
    # the real check, run where importing deepspeed fails (None in sys.modules blocks it)
    code = (
        "import sys; sys.modules['deepspeed'] = None; from dist_icm.train import main; "
        "sys.argv = ['train', 'experiment=quickstart', 'runtime.device=auto', "
        f"'runtime.zero_stage=1', 'hydra.run.dir={tmp_path}/run']; main()"
    )
    env = os.environ | {"LOCAL_RANK": "0"}  # as a launcher sets it (ZeRO needs one)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=env)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "dist_icm: error: runtime.zero_stage=1 needs deepspeed: pip install -e '.[deepspeed]'"
    ]
