"""The one module that talks to Accelerate and DeepSpeed: devices, processes, precision, wrapping.

``accelerate launch`` (or torchrun) starts the processes; :class:`Runtime` turns the run's
``runtime`` config into an ``Accelerator`` and hands the rest of the trainer plain facts (rank,
world size, device, the process group for the loss) and a few verbs (prepare, backward, no_sync,
unwrap, full_state_dict, save_engine/load_engine). On CPU, several processes need
``accelerate launch --multi_gpu --num_processes N``: Accelerate's ``--cpu`` flag always starts a
single process; the program then runs on the CPU with gloo because ``runtime.device`` is cpu or
no GPU is visible.

``runtime.zero_stage=1|2|3`` (``runtime=deepspeed_zero1`` ...) trains through DeepSpeed's ZeRO
(Accelerate's ``DeepSpeedPlugin``), under the same launch command. What it takes to be right:

* without a GPU, Accelerate leaves the backend unset (and then reports one process on every
  rank); it is set to gloo here. ``Accelerator(cpu=True)`` would silently turn DeepSpeed off,
  so the CPU is reached with ``device=auto`` on a machine without a visible GPU;
* DeepSpeed clips gradients at 1.0 unless told, and Accelerate drops a plugin argument of 0.0:
  ``gradient_clipping`` is written into the DeepSpeed config from ``optim.grad_clip`` (0.0, no
  clipping, unless it is set; DDP clips the same norm through Accelerate);
* the micro-batch and accumulation come from the trainer's batch plan (the FFCV loader is not a
  torch DataLoader that Accelerate could read "auto" values from);
* accumulation: DeepSpeed divides the loss by its accumulation steps itself and steps at the
  boundary the trainer marks, so :meth:`backward` drives the engine directly;
* Accelerate's plugin keeps a reference for ``transformers`` (so its ``from_pretrained`` can see
  ZeRO-3); dist_icm builds its own models, so without transformers installed that reference is
  skipped instead of requiring the package.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

from dist_icm import checkpoint, dist
from dist_icm.config import ConfigError, ModelConfig, RuntimeConfig


def _deepspeed_plugin(stage: int):
    """Accelerate's DeepSpeedPlugin for ZeRO ``stage`` (batch sizes are set in ``prepare``)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"runtime.zero_stage={stage} needs deepspeed: pip install -e '.[deepspeed]'"
        )
    from accelerate import DeepSpeedPlugin

    class Plugin(DeepSpeedPlugin):
        def set_deepspeed_weakref(self):  # only transformers reads it (see the module docstring)
            if importlib.util.find_spec("transformers") is not None:
                super().set_deepspeed_weakref()

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "steps_per_print": 2**31 - 1,
    }
    return Plugin(hf_ds_config=config, zero3_init_flag=False)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of ``grads`` (a 0-d tensor; inf or nan if any entry is), computed in
    float32 with one fused kernel per device and dtype where torch has it."""
    if not grads:
        return torch.zeros(())
    norms = (
        torch._foreach_norm(grads)
        if hasattr(torch, "_foreach_norm")
        else [torch.linalg.vector_norm(g) for g in grads]
    )
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


class Runtime:
    def __init__(self, cfg: RuntimeConfig) -> None:
        has_cuda = torch.cuda.is_available()
        if cfg.device == "cuda" and not has_cuda:
            raise ConfigError("runtime.device=cuda but no CUDA device is visible")
        cpu = cfg.device == "cpu" or not has_cuda
        if cfg.precision == "fp16" and cpu:
            raise ConfigError("runtime.precision=fp16 needs a GPU: use bf16 on the CPU")
        if cfg.zero_stage and cfg.device == "cpu":
            raise ConfigError(
                "runtime.zero_stage needs runtime.device=auto (Accelerate's CPU mode turns "
                "DeepSpeed off; without a visible GPU, auto runs on the CPU)"
            )
        if cfg.zero_stage and "LOCAL_RANK" not in os.environ:
            raise ConfigError(
                "runtime.zero_stage needs the processes started by a launcher: "
                "accelerate launch --multi_gpu --num_processes N -m dist_icm.train ..."
            )
        if cfg.zero_stage and cfg.compile:
            raise ConfigError("runtime.compile is not supported with runtime.zero_stage")
        self.cfg, self.engine = cfg, None
        # Each rank keeps its own BatchNorm running statistics (DDP would otherwise overwrite
        # them with rank 0's at every forward); the trainer averages them over ranks before
        # every evaluation and save (dist.average_buffers).
        handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        plugin, backend = None, None
        if cfg.zero_stage:
            plugin = _deepspeed_plugin(cfg.zero_stage)
            backend = None if has_cuda else "gloo"
        # a collective that waits longer than timeout_s for a peer (dead or hung) raises
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
        with warnings.catch_warnings():  # several CPU processes without OMP_NUM_THREADS:
            # Accelerate sets torch's threads to the cores per process, and says so each time
            warnings.filterwarnings("ignore", message="OMP_NUM_THREADS/MKL_NUM_THREADS unset")
            self.accelerator = Accelerator(
                cpu=cpu and not cfg.zero_stage,
                mixed_precision=cfg.precision,
                deepspeed_plugin=plugin,
                kwargs_handlers=handlers,
            )
        if cfg.threads is not None:  # after Accelerate, which may have set its own count;
            # no more than the machine's cores (job.setup says so, and caps to this process's)
            torch.set_num_threads(min(cfg.threads, os.cpu_count() or 1))

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

    def prepare(self, model: torch.nn.Module, optimizer, model_cfg: ModelConfig, plan, *,
                grad_clip: float | None = None):  # fmt: skip
        """Move and wrap model and optimizer (SyncBatchNorm, channels_last, DDP or a DeepSpeed
        engine sized by the batch ``plan`` and clipping at ``grad_clip``, compile)."""
        if model_cfg.sync_bn and self.world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.cfg.nhwc:
            model = model.to(memory_format=torch.channels_last)
        if self.cfg.zero_stage:
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = plan.per_device
            ds["gradient_accumulation_steps"] = plan.grad_accum
            ds["train_batch_size"] = plan.global_batch
            ds["gradient_clipping"] = float(grad_clip or 0.0)  # 0.0: none (DeepSpeed's is 1.0)
        with warnings.catch_warnings():  # torch >= 2.14 renames it forward_sync_buffers, which
            # Accelerate's DDP kwargs cannot pass yet; broadcast_buffers=False is still honoured
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
            model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.cfg.zero_stage:
            self.engine = model
            # skip a step with non-finite gradients in every precision, as DDP does (DeepSpeed
            # checks only fp16 by default and would apply a NaN step in fp32 or bf16)
            if hasattr(model.optimizer, "check_grad_overflow"):
                model.optimizer.check_grad_overflow = True
        if self.cfg.compile:
            model = torch.compile(model)
        return model, optimizer

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs on the device (channels_last if asked); under DeepSpeed's bf16/fp16, whose
        engine holds the model in that dtype, in that dtype too."""
        x = x.to(self.device, non_blocking=True)
        if self.engine is not None and self.cfg.precision != "no" and x.is_floating_point():
            x = x.to(torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16)
        if self.cfg.nhwc and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def backward(self, loss: torch.Tensor, *, last: bool, accum: int) -> None:
        """Back-propagate one micro-step's loss; ``last`` marks the accumulation boundary.

        DDP: the loss is divided by ``accum`` here. DeepSpeed divides it by its own
        accumulation steps (and reduces the gradients at the boundary).
        """
        if self.engine is None:
            self.accelerator.backward(loss / accum)
            return
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self, model, optimizer, max_norm: float | None) -> tuple[bool, str]:
        """The optimizer step on the accumulated (all-reduced) gradients, unless any of them
        is non-finite; returns ``(applied, why not)``, the same on every rank.

        * DDP or one process, fp32/bf16: the gradients' global norm is read (one host sync per
          optimizer step); after DDP's all-reduce every rank holds the same gradients, so every
          rank decides alike without a collective of its own. Then clipping to ``max_norm``.
        * fp16: the gradient scaler decides (and lowers its scale); Accelerate reports its skip.
        * DeepSpeed: its ZeRO optimizer checks the gradients itself (an all-reduce of its own;
          switched on for every precision at :meth:`prepare`) and reports whether it stepped.
        Gradients are dropped either way.
        """
        if self.engine is not None:
            self.engine.step()  # zeroes the gradients
            applied = self.engine.was_step_applied()
            return applied, "" if applied else "non-finite gradients"
        if self.cfg.precision != "fp16":
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = grad_norm(grads)
            if not torch.isfinite(norm).item():
                optimizer.zero_grad(set_to_none=True)
                return False, f"gradient norm {norm.item()}"
        if max_norm is not None:
            self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        applied = not getattr(optimizer, "step_was_skipped", False)  # fp16: the scaler's call
        return applied, "" if applied else "fp16 gradient overflow (the loss scale is lowered)"

    def no_sync(self, model, skip: bool):
        """Skip DDP's gradient all-reduce (accumulation micro-steps) when ``skip``."""
        if skip and self.engine is None:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The bare model under its wrappers (DDP, ``torch.compile``, DeepSpeed's engine).
        Without an engine this unwraps by itself: Accelerate's ``unwrap_model`` imports
        deepspeed wherever it is installed (to recognise its engine), and that import prints
        a warning on every run of a machine without a GPU."""
        if self.engine is not None:
            return self.accelerator.unwrap_model(model)
        while True:
            if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
                model = model.module
            elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # compiled
                model = model._orig_mod
            else:
                return model

    @property
    def sharded_params(self) -> bool:
        """True under ZeRO-3: each rank holds only a shard of the parameters."""
        return self.cfg.zero_stage == 3

    def held_tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The model's parameters and buffers as this rank holds them, without a collective:
        under ZeRO-3 its shard of each parameter (DeepSpeed's ``ds_tensor``; the parameters
        themselves are empty there), so that the ranks' lists together cover every weight."""
        module = self.unwrap(model)
        if not self.sharded_params:
            return list(module.state_dict().values())
        return [getattr(p, "ds_tensor", p) for p in module.parameters()] + list(module.buffers())

    def full_state_dict(self, model: torch.nn.Module) -> dict:
        """The whole model's state dict on every rank (gathered from the ranks' shards under
        ZeRO-3, a collective every rank calls): CPU tensors, loadable into a model built with
        ``build_model``."""
        module = self.unwrap(model)
        gathered = contextlib.nullcontext()
        if self.sharded_params:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
        with gathered:
            state = module.state_dict()
        # float32 like the model a one-process run trains (DeepSpeed's bf16/fp16 engine holds
        # the module in that dtype), so it loads into build_model's model as it is
        return {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in state.items()}  # fmt: skip

    def save_engine(self, folder: Path) -> None:
        """Every rank writes its DeepSpeed shards (model, optimizer) into ``folder``; a write
        that fails is a :class:`~dist_icm.checkpoint.CheckpointWriteError` naming the OS's
        reason (torch's zip writer reports a full disk as "unexpected pos ...")."""
        try:
            self.engine.save_checkpoint(str(folder), tag="state")
        except (RuntimeError, OSError) as e:
            why = e.strerror if isinstance(e, OSError) else checkpoint.why_unwritable(folder)
            if not why:
                raise
            # a failed torch.save is past every collective of DeepSpeed's save but its last
            # barrier, which the ranks that wrote wait at: meet them there
            dist.barrier()
            raise checkpoint.CheckpointWriteError(
                f"cannot write checkpoint {folder}: {why}", path=folder, reason=why
            ) from e

    def load_engine(self, folder: Path) -> None:
        """Every rank reads its DeepSpeed shards back from ``folder``."""
        path, _ = self.engine.load_checkpoint(str(folder), tag="state")
        if path is None:
            raise ConfigError(f"no DeepSpeed state in {folder}")
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "clip_grad"):  # ZeRO-1/2 bring back the clipping they were saved
            optimizer.clip_grad = self.engine.gradient_clipping()  # with: this run's instead

    def scaler_state(self) -> dict | None:
        scaler = self.accelerator.scaler
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        if state is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state)
