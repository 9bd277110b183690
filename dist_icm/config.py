"""Typed, validated run configuration: one dataclass per section, each checking its own values.

Hydra composes the YAML groups under ``configs/``; :func:`dist_icm.compose.to_config` merges
every group onto these dataclasses (unknown keys and wrong types fail there) and their own checks
run. Checks that need the world size or the data (the global batch against world size x
accumulation, the class count against the data set) are :func:`plan_batches` and
:func:`check_against_data`. Every failure is a :class:`ConfigError` whose message is one line,
which the entry point prints before exiting with code 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_icm.data.datasets import DATASET_NAMES
from dist_icm.models import MODEL_NAMES
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
    drop_last: bool = True  # False: pad the epoch's short last step (wrapping around)
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
    dropout: float = 0.0  # built-in models: dropout on the pooled features before the classifier

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if self.dropout and self.name not in MODEL_NAMES:
            raise ConfigError(
                f"model.dropout applies to the built-in models ({', '.join(MODEL_NAMES)}); "
                f"{self.name!r} is not one of them"
            )
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
    # the model's training forward and backward replayed from CUDA graphs where they apply
    # (graphs.GraphedModel): CUDA, one process, no DeepSpeed, no compile, no dropout; with
    # grad_accum > 1, the first micro-step of each step (the others run the model itself)
    cuda_graph: bool = True
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
        # at least 5: the process group's start, too, must fit in it; at most 1e8 (3 years):
        # datetime's and torch's store's deadlines overflow from about 9e9
        if not 5 <= self.timeout_s <= 1e8:
            raise ConfigError(
                f"runtime.timeout_s must lie in [5, 1e8] (seconds), got {self.timeout_s}"
            )
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
    paper: str | None = None  # the paper result this run reproduces: a key of paper_results.json


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
    loss = cfg.loss
    if loss.icm and plan.micro_global < 2:  # a 1 x 1 score matrix: the loss is 0
        raise ConfigError(
            f"loss.name={loss.name} needs a micro-step of 2 or more samples over all devices "
            f"(its negatives), got {plan.micro_global} {split}"
        )
    mixing = loss.group_size if loss.group_size is not None else plan.per_device
    if loss.method != "ce" and mixing < 2:  # each sample's partner would be itself
        what = "loss.group_size=1" if loss.group_size is not None else "a per-device batch of 1"
        raise ConfigError(
            f"loss.name={loss.name} draws each sample's partner from its mixing group, which "
            f"needs 2 or more samples: got {what} {split}"
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
