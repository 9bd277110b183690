"""Typed, validated run configuration.

Hydra composes the YAML groups under ``configs/``; :func:`to_config` merges every group onto its
dataclass schema (unknown keys and wrong types fail there) and the dataclasses' own checks run.
Checks that need the world size or the data (the global batch against world size x
accumulation, the class count against the data set) live in :func:`check_against`. Every failure
is a :class:`ConfigError` whose message is one line, which the entry point prints before exiting
with code 2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dist_icm.data.datasets import DATASET_NAMES
from dist_icm.objectives import ObjectiveConfig
from dist_icm.optim import OptimConfig
from dist_icm.schedule import ScheduleConfig


class ConfigError(ValueError):
    """A bad configuration value, described in one line."""


LOADERS = ("torch", "ffcv")
AUGMENTS = ("auto", "cifar", "cifar_rot15", "imagenet", "none")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("no", "bf16", "fp16")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | imagefolder | cifair10 | cifair100
    root: str | None = None
    download: bool = True
    num_classes: int | None = None  # optional check against the data
    global_batch: int = 128  # THE batch knob: per-device batch and accumulation derive from it
    fraction: float = 1.0  # stratified fraction of the training set
    long_tail: float | None = None  # imbalance ratio rho (e.g. 0.01) for long-tailed subsets
    augment: str = "auto"
    loader: str = "torch"
    num_workers: int = 0  # torch: DataLoader processes; ffcv: decoding threads (0: all cores)
    eval_batch: int = 512
    # --- data.loader=ffcv (dist_icm/data/write.py, ffcv_loader.py) ---
    ffcv_cache: str | None = None  # .beton cache folder; None: $DIST_ICM_CACHE/ffcv or ~/.cache
    ffcv_os_cache: bool = True  # read through the OS page cache (False: ffcv's process cache)
    ffcv_write_mode: str = "auto"  # RGB storage: auto (raw up to 64 px, else jpg) | raw | jpg
    ffcv_max_side: int | None = None  # RGB: cap the longer side when writing (ImageNet-size data)
    ffcv_quality: int = 90  # JPEG quality when writing jpg

    def __post_init__(self) -> None:
        _one_of("data.name", self.name, DATASET_NAMES)
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2 (or null), got {self.num_classes}")
        _one_of("data.ffcv_write_mode", self.ffcv_write_mode, ("auto", "raw", "jpg"))
        if self.ffcv_max_side is not None and self.ffcv_max_side < 8:
            raise ConfigError(f"data.ffcv_max_side must be >= 8, got {self.ffcv_max_side}")
        if not 1 <= self.ffcv_quality <= 100:
            raise ConfigError(f"data.ffcv_quality must lie in [1, 100], got {self.ffcv_quality}")
        _one_of("data.loader", self.loader, LOADERS)
        _one_of("data.augment", self.augment, AUGMENTS)
        if self.global_batch < 1:
            raise ConfigError(f"data.global_batch must be >= 1, got {self.global_batch}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"data.fraction must lie in (0, 1], got {self.fraction}")
        if self.long_tail is not None and not 0 < self.long_tail <= 1:
            raise ConfigError(f"data.long_tail must lie in (0, 1], got {self.long_tail}")
        if self.name == "imagefolder" and not self.root:  # whether it exists: when it is read
            raise ConfigError(
                f"data.root {self.root!r} is not a folder (data=imagefolder needs one)"
            )
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.eval_batch < 1:
            raise ConfigError(f"data.eval_batch must be >= 1, got {self.eval_batch}")
        if self.ffcv_cache is not None and not self.ffcv_cache.strip():
            raise ConfigError("data.ffcv_cache must be a folder path (or null), got ''")


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under several processes (GPUs)
    bn_group: int | None = None  # ghost batch norm: BN statistics over groups of this many samples

    def __post_init__(self) -> None:
        if self.bn_group is not None and self.bn_group < 1:
            raise ConfigError(f"model.bn_group must be >= 1, got {self.bn_group}")
        if self.bn_group is not None and self.sync_bn:
            raise ConfigError("model.sync_bn and model.bn_group exclude each other: choose one")


@dataclass
class RuntimeConfig:
    device: str = "auto"
    precision: str = "no"
    grad_accum: int = 1  # micro-steps per optimizer step; the ICM score matrix spans one
    compile: bool = False
    # NHWC images and conv weights (runtime.py); false: NCHW; null: NHWC except under DeepSpeed
    channels_last: bool | None = None
    threads: int | None = None  # torch intra-op threads per process
    zero_stage: int = 0  # 0: DDP; 1, 2, 3: DeepSpeed ZeRO through Accelerate (runtime.py)
    timeout_s: float = 600.0  # a collective waiting longer (a peer died or hangs) fails the run

    def __post_init__(self) -> None:
        _one_of("runtime.device", self.device, DEVICES)
        _one_of("runtime.precision", self.precision, PRECISIONS)
        if self.grad_accum < 1:
            raise ConfigError(f"runtime.grad_accum must be >= 1, got {self.grad_accum}")
        _one_of("runtime.zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.threads is not None and self.threads < 1:
            raise ConfigError(
                f"runtime.threads must be >= 1 (or null: torch's), got {self.threads}"
            )
        if not self.timeout_s > 0:
            raise ConfigError(f"runtime.timeout_s must be > 0, got {self.timeout_s}")
        if self.channels_last and self.zero_stage:
            raise ConfigError(
                "runtime.channels_last=true does not work under DeepSpeed ZeRO (its engine "
                "broadcasts and flattens weights as contiguous memory): leave it null or false"
            )

    @property
    def nhwc(self) -> bool:
        """Whether images and conv weights are channels-last: ``channels_last``, where null
        NHWC except under DeepSpeed ZeRO."""
        return self.channels_last if self.channels_last is not None else self.zero_stage == 0


@dataclass
class TrainConfig:
    epochs: int = 200
    max_steps: int | None = None  # stop after this many optimizer steps (summary still written)
    log_every: int = 50
    eval_every: int = 1  # epochs
    ckpt_every: int = 10  # epochs; a checkpoint is also written at the end
    ckpt_every_steps: int | None = None  # also every this many optimizer steps
    ckpt_every_min: float | None = None  # also every this many minutes (rank 0's clock)
    keep_ckpts: int = 3
    max_skipped: int = 3  # non-finite steps in a row that are skipped before the run stops
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"train.seed must lie in [0, 2^32), got {self.seed}")
        if self.max_skipped < 0:
            raise ConfigError(f"train.max_skipped must be >= 0, got {self.max_skipped}")
        for key in ("log_every", "eval_every", "ckpt_every", "keep_ckpts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.ckpt_every_steps is not None and self.ckpt_every_steps < 1:
            raise ConfigError(f"train.ckpt_every_steps must be >= 1, got {self.ckpt_every_steps}")
        if self.ckpt_every_min is not None and not self.ckpt_every_min > 0:
            raise ConfigError(f"train.ckpt_every_min must be > 0, got {self.ckpt_every_min}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: str | None = None  # None | "auto" (newest valid checkpoint in the run dir) | a path
    resume_force: bool = False  # resume even where the checkpoint's config differs (see resume.py)
    run_dir: str | None = None  # the run folder (default: outputs/<date>/<time>)
    paper: str | None = None  # the paper result this run reproduces: a key of PAPER_RESULTS


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
    defaults["hydra"] = {"callbacks": {"dist_icm_run_dir": watch}}
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


def to_config(cfg: DictConfig) -> Config:
    """Validate a composed Hydra config into a :class:`Config` (raises :class:`ConfigError`)."""
    unknown = set(cfg.keys()) - set(SECTIONS) - {*TOP_LEVEL, "experiment"}
    if unknown:
        raise ConfigError(unknown_key_message(sorted(unknown)[0]))
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f"{key}: " if key else ""
        raise ConfigError(f"{where}{str(e).splitlines()[0]}") from None
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
        raise ConfigError(
            f"resume={resume} is a folder: name a checkpoint file (its checkpoints/ckpt-*.pt), "
            f"or resume=auto with run_dir={resume}"
        )
    return Config(**{name: parts[name] for name in SECTIONS}, **top)


@dataclass(frozen=True)
class BatchPlan:
    """The global batch split over devices and accumulation micro-steps."""

    global_batch: int
    world_size: int
    grad_accum: int

    @property
    def per_device(self) -> int:
        return self.global_batch // (self.world_size * self.grad_accum)

    @property
    def micro_global(self) -> int:
        """Samples in one micro-step across all devices: the span of the ICM score matrix."""
        return self.per_device * self.world_size


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """Derive per-device batch and accumulation from the global batch, or fail clearly."""
    plan = BatchPlan(cfg.data.global_batch, world_size, cfg.runtime.grad_accum)
    if cfg.data.global_batch % (world_size * cfg.runtime.grad_accum):
        raise ConfigError(
            f"data.global_batch={cfg.data.global_batch} is not divisible by world size "
            f"{world_size} x runtime.grad_accum {cfg.runtime.grad_accum}"
        )
    split = f"(global {plan.global_batch} / world {world_size} / accumulation {plan.grad_accum})"
    for key, group in (
        ("loss.group_size", cfg.loss.group_size),
        ("model.bn_group", cfg.model.bn_group),
    ):
        if group is not None and plan.per_device % group:
            raise ConfigError(
                f"{key}={group} must divide the per-device batch {plan.per_device} {split}"
            )
    return plan


def check_against_data(cfg: Config, num_classes: int, train_size: int) -> None:
    """Checks that need the data set: class count and batch size."""
    if cfg.data.num_classes is not None and cfg.data.num_classes != num_classes:
        raise ConfigError(
            f"data.num_classes={cfg.data.num_classes} but {cfg.data.name} has {num_classes} classes"
        )
    if cfg.data.global_batch > train_size:
        raise ConfigError(
            f"data.global_batch={cfg.data.global_batch} exceeds the {train_size} training samples"
        )
