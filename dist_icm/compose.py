r"""From Hydra's composed config to the typed :class:`~dist_icm.config.Config`.

:func:`register_schema` stores every key's default as Hydra's ``schema`` (so the YAML groups say
only what differs); :func:`to_config` merges each section onto its dataclass, turning unknown
keys, wrong kinds (a number for a bool, an empty name), non-finite numbers and the dataclasses'
own checks into one-line :class:`~dist_icm.config.ConfigError`\ s.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dist_icm.config import Config, ConfigError

SECTIONS = ("data", "model", "loss", "optim", "schedule", "runtime", "train")
TOP_LEVEL = ("resume", "resume_force", "run_dir", "paper")
# the paper's numbers (Tables 1-2, Figure 3), keyed by what configs/experiment/paper/ set as paper
PAPER_RESULTS = Path(__file__).resolve().parent / "paper_results.json"


def paper_entries() -> dict:
    """The entries of :data:`PAPER_RESULTS` (key -> {"top1": ..., "source": ..., ...})."""
    import json

    return json.loads(PAPER_RESULTS.read_text())["results"]


def register_schema() -> None:
    """Store every key's default (from the dataclasses) as the config ``schema`` for Hydra.

    ``configs/train.yaml`` lists it first, so the YAML groups only say what differs and any
    key can be overridden from the command line without a ``+``.
    """
    from hydra.core.config_store import ConfigStore

    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    # notes which folders of the run dir exist before Hydra makes it (see dist_icm.startup)
    watch = {"_target_": "dist_icm.startup.RunDirWatch"}
    # and validates every cell of a multirun before the first one runs
    check = {"_target_": "dist_icm.startup.SweepCheck"}
    defaults["hydra"] = {"callbacks": {"dist_icm_run_dir": watch, "dist_icm_sweep": check}}
    ConfigStore.instance().store(name="schema", node=defaults)
    # hydra.run.dir in configs/train.yaml: run_dir when given, else the timestamped default
    if not OmegaConf.has_resolver("dist_icm_or"):
        OmegaConf.register_new_resolver("dist_icm_or", lambda value, default: value or default)


def section_keys(section: str | None) -> list[str]:
    """The keys of a config section (``None``: the top level), from the dataclasses."""
    if section is None:
        return [*SECTIONS, *TOP_LEVEL]
    cls = Config.__dataclass_fields__[section].default_factory
    return [f.name for f in dataclasses.fields(cls)]


def unknown_key_message(key: str) -> str:
    """``unknown config key train.epochz (keys of train: ...)`` for a dotted key."""
    section, _, rest = key.partition(".")
    if rest and section in SECTIONS:
        keys = ", ".join(section_keys(section))
        return f"unknown config key {key} (keys of {section}: {keys})"
    top = ", ".join(section_keys(None))
    return f"unknown config key {key} (top-level keys: {top})"


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _expected(section: str, key: str) -> str | None:
    """What a field of a section holds, in words (from its annotation), or None."""
    cls = Config.__dataclass_fields__[section].default_factory
    field_ = {f.name: f for f in dataclasses.fields(cls)}.get(key)
    if field_ is None:
        return None
    kinds = [k.strip() for k in str(field_.type).split("|")]
    nullable = "None" in kinds
    kinds = [k for k in kinds if k != "None"]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    words = _KINDS.get(kind) or ("a list of integers" if kind.startswith("tuple[int") else None)
    if words is None:
        return None
    return words + (" (or null)" if nullable else "")


def _plain(value):
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value)
    return value


def _merge_error(section: str, e: OmegaConfBaseException) -> ConfigError:
    """One line naming ``section.key`` and what it takes, for an OmegaConf merge error."""
    key = str(getattr(e, "full_key", None) or getattr(e, "key", None) or "")
    key = key.split("[")[0]  # a list element: name the list
    if isinstance(e, ConfigKeyError) and key:
        return ConfigError(unknown_key_message(f"{section}.{key}"))
    expected = _expected(section, key.split(".")[0]) if key else None
    if expected is not None:
        value = _plain(getattr(e, "value", None))
        return ConfigError(f"{section}.{key} must be {expected}: {value!r} could not be converted")
    where = f"{section}.{key}" if key else section
    return ConfigError(f"{where}: {str(e).splitlines()[0]}")


def _field_kinds(section: str) -> dict[str, list[str]]:
    cls = Config.__dataclass_fields__[section].default_factory
    return {f.name: [k.strip() for k in str(f.type).split("|")] for f in dataclasses.fields(cls)}


def _check_kinds(section: str, given: DictConfig | None) -> None:
    """What OmegaConf would convert silently: a number or a word for a bool (2 -> true), an
    empty string for a name or path."""
    if given is None:
        return
    for key, kinds in _field_kinds(section).items():
        if key not in given or OmegaConf.is_missing(given, key):
            continue
        value = given[key]
        if value is None:
            continue
        if kinds[0] == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} must be true or false, got {_plain(value)!r}")
        if kinds[0] == "str" and isinstance(value, str) and not value.strip():
            null = " (or null)" if "None" in kinds else ""
            raise ConfigError(f"{section}.{key} must not be empty{null}")


def _check_finite(section: str, merged: DictConfig) -> None:
    for key, kinds in _field_kinds(section).items():
        value = merged.get(key)
        if "float" in kinds and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{key} must be a finite number, got {value}")


# validated first: schedule.epochs is ${train.epochs} in configs/schedule/, so a bad
# train.epochs must be reported as train's, not as the schedule's
_ORDER = ("train", "data", "model", "loss", "optim", "schedule", "runtime")


def _resume_folder(resume: str) -> str:
    """The line for ``resume=<a folder>``: a ZeRO shards' folder names its checkpoint file, a
    run's checkpoints/ folder the run folder, any other folder is taken for a run folder."""
    folder = Path(resume.rstrip("/") or "/")
    if folder.suffix == ".zero":  # ckpt-<step>.zero beside ckpt-<step>.pt
        hint = f"resume={folder.with_suffix('.pt')} (the checkpoint those shards belong to)"
    else:
        run = folder.parent if folder.name == "checkpoints" else folder
        hint = f"a checkpoint file (its checkpoints/ckpt-*.pt), or resume=auto with run_dir={run}"
    return f"resume={resume} is a folder: name {hint}"


def _where(cfg: DictConfig, key: str | None) -> str:
    """``key: `` for a resolution error there, with the interpolation the key holds (``schedule
    .epochs (= ${train.epochs})``): the error may be in the key it names, set elsewhere."""
    if not key:
        return ""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return f"{key} (= {raw}): " if isinstance(raw, str) and "${" in raw else f"{key}: "


def to_config(cfg: DictConfig) -> Config:
    """Validate a composed Hydra config into a :class:`Config` (raises :class:`ConfigError`)."""
    unknown = set(cfg.keys()) - set(SECTIONS) - {*TOP_LEVEL, "experiment"}
    if unknown:
        raise ConfigError(unknown_key_message(sorted(unknown)[0]))
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{_where(cfg, key)}{str(e).splitlines()[0]}") from None
    parts = {}
    for name in _ORDER:
        schema = OmegaConf.structured(Config.__dataclass_fields__[name].default_factory)
        OmegaConf.set_readonly(schema, False)  # frozen dataclasses: merge, then instantiate
        given = cfg.get(name)
        if given is not None and not isinstance(given, DictConfig):
            keys = ", ".join(section_keys(name))
            raise ConfigError(f"{name} is a section (keys: {keys}), got {_plain(given)!r}")
        try:
            _check_kinds(name, given)
            merged = OmegaConf.merge(schema, given or {})
            _check_finite(name, merged)
            parts[name] = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            raise _merge_error(name, e) from None
        except ValueError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        except TypeError as e:  # e.g. a dict where the dataclass compares numbers
            raise ConfigError(f"{name}: {str(e).splitlines()[0]}") from None
    top = {key: cfg.get(key) for key in TOP_LEVEL if cfg.get(key) is not None}
    if not isinstance(top.get("resume_force", False), bool):
        value = _plain(top["resume_force"])
        raise ConfigError(f"resume_force must be true or false, got {value!r}")
    for key in ("resume", "run_dir"):
        value = top.get(key)
        if isinstance(value, bool) or isinstance(value, DictConfig | ListConfig):
            what = "auto or a checkpoint path (or null)" if key == "resume" else "a folder path"
            raise ConfigError(f"{key} must be {what}, got {_plain(value)!r}")
        if value is not None:
            top[key] = str(value)
            if not top[key].strip():
                raise ConfigError(f"{key} must not be empty (leave it out, or null)")
    paper = top.get("paper")
    if paper is not None:
        if not isinstance(paper, str) or not paper.strip():
            raise ConfigError(
                f"paper must be a key of {PAPER_RESULTS.name} (or null), got {paper!r}"
            )
        if paper not in paper_entries():
            raise ConfigError(
                f"paper={paper} is no entry of dist_icm/{PAPER_RESULTS.name}: "
                "set a key it has (or null)"
            )
    resume = top.get("resume")
    if resume not in (None, "auto") and Path(resume).expanduser().is_dir():
        raise ConfigError(_resume_folder(resume))
    schedule, train = parts["schedule"], parts["train"]
    # cosine's lr reaches its floor at schedule.epochs (step's milestones are epochs of their
    # own, constant has no end); a longer schedule is a run trained in parts
    if schedule.name == "cosine" and schedule.epochs < train.epochs:
        raise ConfigError(
            f"schedule.epochs={schedule.epochs} is shorter than train.epochs={train.epochs}: "
            f"the lr would stay at the schedule's end for the last "
            f"{train.epochs - schedule.epochs} epochs (leave schedule.epochs to follow "
            "train.epochs)"
        )
    optim, runtime = parts["optim"], parts["runtime"]
    # ZeRO hands the optimizer each rank's flat shard of a parameter group, so a per-layer
    # trust ratio (LARS, LAMB) would be one rank's shard's: it trains, but not as on DDP
    if optim.name in ("lars", "lamb") and runtime.zero_stage:
        raise ConfigError(
            f"optim.name={optim.name} with runtime.zero_stage={runtime.zero_stage}: under ZeRO "
            f"its per-layer trust ratio would come from each rank's shard of the parameters, "
            f"not from each layer (use plain DDP, the default runtime, or sgd/adamw)"
        )
    return Config(**{name: parts[name] for name in SECTIONS}, **top)
