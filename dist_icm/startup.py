"""The start of the main job (:mod:`dist_icm.train`): Hydra's errors as one line, and the run
folder a failed start leaves behind.

Hydra raises (or prints) its composition errors before the job's own checks run;
:func:`hydra_error_message` turns them into the one line the job prints. Hydra also makes the
run folder before the job starts; :class:`RunDirWatch` notes which of its folders existed before,
so that :func:`remove_unused_run_dir` removes only what a failed start made. In a multirun,
:class:`SweepCheck` checks every cell's config before the first cell runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dist_icm.compose import to_config, unknown_key_message
from dist_icm.config import ConfigError
from dist_icm.folders import missing_top, remove_empty

# Hydra's config groups: the copy an installed wheel holds (dist_icm/configs), else the
# checkout's configs/ beside the package (a source tree, an editable install)
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = next(
    (d for d in (_HERE / "configs", _HERE.parent / "configs") if (d / "train.yaml").is_file()),
    _HERE.parent / "configs",
)


def _group_options(group: str) -> list[str]:
    """The options of config group ``group`` (its folder under ``configs/``), sorted."""
    return sorted(f.stem for f in (CONFIG_DIR / group).glob("*.yaml"))


def hydra_error_message(error: BaseException, overrides: list[str] | tuple = ()) -> str:
    """One line for an error Hydra raises before the job starts (composition, the run folder);
    ``overrides`` (the command line's) name the group of a group override that is no name."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = error.__cause__
    if str(error).startswith("Config group override must be a string"):  # e.g. data=5
        for override in overrides:
            group, _, value = override.partition("=")
            options = _group_options(group) if group else []
            if options and re.fullmatch(r"[-+.\deE]+|true|false|null", value):  # not a name
                return f"unknown {group} option {value} ({group} options: {', '.join(options)})"
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None and getattr(mark, "name", None):  # yaml's MarkedYAMLError
        what = " ".join(str(x) for x in (error.context, error.problem) if x)
        return f"cannot parse the config file {mark.name} (line {mark.line + 1}: {what})"
    if isinstance(error, OverrideParseException):
        reason = str(error.message).splitlines()[0]
        return (
            f"cannot parse the override {error.override!r} ({reason}): write key=value, "
            "quoting values with brackets or spaces (see Hydra's override grammar)"
        )
    if isinstance(error, MissingConfigException) and error.options is not None:
        group, _, option = str(error.missing_cfg_file or "").rpartition("/")
        # Hydra lists a nested group's parent's options (experiment/paper/x: experiment's); its
        # own groups (hydra/...) have options elsewhere too, which it lists right
        ours = group and not group.startswith("hydra/")
        found = _group_options(group) if ours else []
        options = ", ".join(found or sorted(error.options))
        more = "; or model.name=<a torchvision/timm model>" if group == "model" else ""
        return f"unknown {group} option {option!r} ({group} options: {options}{more})"
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and getattr(
        cause, "full_key", None
    ):
        key = str(cause.full_key)
        if key.startswith("hydra."):
            return f"unknown Hydra key {key} (see python -m dist_icm.train --hydra-help)"
        return unknown_key_message(key)
    if isinstance(error, OSError) and error.filename is not None:
        reason = error.strerror or type(error).__name__
        return (
            f"cannot create the run folder {error.filename} ({reason}): "
            "run_dir (or hydra.run.dir) must name a folder that can be made"
        )
    lines = [line.strip() for line in str(error).splitlines() if line.strip()][:1]
    if isinstance(cause, OmegaConfBaseException):
        lines += [line.strip() for line in str(cause).splitlines() if line.strip()][:1]
    return ": ".join(lines) or type(error).__name__


class RunDirWatch(Callback):
    """Hydra callback (``hydra.callbacks``, set by :func:`register_schema`): before Hydra makes
    the run folder, note which of its folders do not exist yet, so that a run that fails at
    start can remove what it made (:func:`remove_unused_run_dir`) and nothing else."""

    run_dir: Path | None = None
    created: Path | None = None  # the top-most folder this run creates (None: all existed)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:  # a callback's exception would become a warning: never raise
            run_dir = Path(str(config.hydra.run.dir)).absolute()
            RunDirWatch.run_dir, RunDirWatch.created = run_dir, missing_top(run_dir)
        except Exception:
            RunDirWatch.run_dir = RunDirWatch.created = None


HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def remove_unused_run_dir() -> bool:
    """Remove the run folder (and the parents it made) when this run made it and it holds
    nothing but Hydra's ``.hydra/`` files and empty ``*.log`` files; True if removed."""
    import shutil

    run_dir, top = RunDirWatch.run_dir, RunDirWatch.created
    if run_dir is None or top is None or not run_dir.is_dir():
        return False
    if run_dir != top and top not in run_dir.parents:
        return False
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir)
        if path.is_symlink():
            return False
        if path.is_dir():
            if rel != Path(".hydra"):
                return False
        elif rel.parent == Path(".hydra"):
            if rel.name not in HYDRA_FILES:
                return False
        elif not (rel.parent == Path(".") and rel.suffix == ".log" and path.stat().st_size == 0):
            return False
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_empty(run_dir.parent, top)  # the parents it made
    RunDirWatch.run_dir = RunDirWatch.created = None
    return not run_dir.exists()


RUN_DIR_IN_SWEEP = "run_dir names one run's folder: with -m set hydra.sweep.dir instead"


class BadSweep(BaseException):
    """A sweep cell's config is bad. A BaseException: Hydra turns a callback's Exception into a
    warning, and this must reach the job's start (:mod:`dist_icm.train`), which prints it."""


class SweepCheck(Callback):
    """Hydra callback (set by :func:`register_schema`): before the first cell of a multirun
    runs, compose every cell's config as Hydra's basic sweeper will (``hydra.sweeper.params``,
    then the command line) and validate it as the job will (:func:`to_config`), so that a bad
    value in a later cell stops the sweep at once, naming the cell, instead of after the
    cells before it have trained. Other sweepers are left alone."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.get("run_dir") is not None:  # every cell would stop on it, leaving folders
            raise BadSweep(RUN_DIR_IN_SWEEP)
        try:
            cells, swept = self._cells(config)
        except Exception:  # a sweep this cannot read: Hydra's sweeper reports it as before
            return
        for n, cell in enumerate(cells):
            line = _check_cell(config, cell)
            if line is not None:
                values = " ".join(o for o in cell if o.partition("=")[0] in swept)
                raise BadSweep(f"sweep cell {n} ({values or 'no swept values'}): {line}")

    @staticmethod
    def _cells(config: DictConfig) -> tuple[list[list[str]], set[str]]:
        """The basic sweeper's cells (each a list of overrides) and the swept keys; none for
        another sweeper."""
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return [], set()
        loader = GlobalHydra.instance().config_loader()
        sweeper = BasicSweeper(max_batch_size=None, params=config.hydra.sweeper.get("params"))
        given = sweeper._parse_config() + list(config.hydra.overrides.task)
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(given)
        (cells,) = BasicSweeper.split_arguments(parsed, None)
        return cells, {o.get_key_element() for o in parsed if o.is_sweep_override()}


def _check_cell(config: DictConfig, cell: list[str]) -> str | None:
    """Why this cell cannot start, as the job would say it (None: it may): its composition,
    its config's values and its batch plan for this world size."""
    import os

    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from dist_icm.config import plan_batches

    loader = GlobalHydra.instance().config_loader()
    try:
        cfg = loader.load_sweep_config(master_config=config, sweep_overrides=list(cell))
        with read_write(cfg), open_dict(cfg):  # what the job gets: no hydra node
            del cfg["hydra"]
        plan_batches(to_config(cfg), int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        return str(e)
    except (HydraException, OmegaConfBaseException) as e:
        return hydra_error_message(e, list(cell))
    except Exception:  # anything else: the cell reports it when it starts, as before
        return None
    return None
