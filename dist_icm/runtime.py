"""The one module that talks to Accelerate: devices, processes, mixed precision, wrapping.

``accelerate launch`` (or torchrun) starts the processes; :class:`Runtime` turns the run's
``runtime`` config into an ``Accelerator`` and hands the rest of the trainer plain facts (rank,
world size, device, the process group for the loss) and a few verbs (prepare, backward, no_sync,
unwrap). On CPU, several processes need ``accelerate launch --multi_gpu --num_processes N``:
Accelerate's ``--cpu`` flag always starts a single process; the program then runs on the CPU
with gloo because ``runtime.device`` is cpu or no GPU is visible.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from dist_icm import dist
from dist_icm.config import ConfigError, ModelConfig, RuntimeConfig
from dist_icm.norm import convert_ghost_bn


class Runtime:
    def __init__(self, cfg: RuntimeConfig) -> None:
        has_cuda = torch.cuda.is_available()
        if cfg.device == "cuda" and not has_cuda:
            raise ConfigError("runtime.device=cuda but no CUDA device is visible")
        cpu = cfg.device == "cpu" or not has_cuda
        if cfg.precision == "fp16" and cpu:
            raise ConfigError("runtime.precision=fp16 needs a GPU: use bf16 on the CPU")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        # Each rank keeps its own BatchNorm running statistics (DDP would otherwise overwrite
        # them with rank 0's at every forward); the trainer averages them over ranks before
        # every evaluation and save (dist.average_buffers).
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=cfg.precision, kwargs_handlers=[ddp]
        )

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def process_group(self) -> dist.Group:
        """The group the global-batch loss spans (None on one process)."""
        return dist.default_group() if self.world_size > 1 else None

    def check(self, model_cfg: ModelConfig) -> None:
        """Start-up checks that need the runtime (raises ConfigError)."""
        if model_cfg.sync_bn and self.world_size > 1 and self.device.type == "cpu":
            raise ConfigError(
                "model.sync_bn=true needs GPUs: torch's SyncBatchNorm has no CPU kernel"
            )

    def prepare(self, model: torch.nn.Module, optimizer, model_cfg: ModelConfig):
        """Move and wrap model and optimizer (ghost or SyncBatchNorm, channels_last, DDP,
        compile)."""
        if model_cfg.bn_group is not None:
            model = convert_ghost_bn(model, model_cfg.bn_group)
        if model_cfg.sync_bn and self.world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        with warnings.catch_warnings():  # torch >= 2.14 renames it forward_sync_buffers, which
            # Accelerate's DDP kwargs cannot pass yet; broadcast_buffers=False is still honoured
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
            model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.cfg.compile:
            model = torch.compile(model)
        return model, optimizer

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model, skip: bool):
        """Skip DDP's gradient all-reduce (accumulation micro-steps) when ``skip``."""
        return self.accelerator.no_sync(model) if skip else contextlib.nullcontext()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def scaler_state(self) -> dict | None:
        scaler = self.accelerator.scaler
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        if state is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state)
