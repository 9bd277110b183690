"""A trained run back from its checkpoint, for analysis: the config it was trained with, its model
holding the checkpoint's weights, and one test image per class.

``load_run`` takes a ``ckpt-*.pt`` file or a run folder (its newest checkpoint that loads; a
line for each newer one that does not in ``Run.skipped``); the config comes from the checkpoint,
else from the run folder (``summary.json``, then Hydra's ``.hydra/config.yaml``). Every way this
can fail raises :class:`AnalysisError` with one line (or the checkpoint module's
``CheckpointError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dist_icm import checkpoint
from dist_icm.config import Config, ConfigError
from dist_icm.data.bundle import normalization
from dist_icm.data.datasets import DatasetSpec, build_datasets
from dist_icm.interpolation import AnalysisError, first_of_each_class


@dataclass
class Run:
    """One checkpoint to analyse, with the config it was trained with."""

    path: Path
    state: dict
    cfg: Config
    skipped: list[str] = field(default_factory=list)  # newer checkpoints that did not load

    @property
    def step(self) -> int:
        return int(self.state.get("step", -1))


def _config_from(saved: dict, where: str) -> Config:
    from omegaconf import OmegaConf

    from dist_icm.compose import to_config

    try:
        return to_config(OmegaConf.create(saved))
    except ConfigError as e:
        raise AnalysisError(f"{where}: its config is not valid here ({e})") from None


def _run_folder_config(ckpt: Path) -> Config | None:
    """The config in the run folder of ``ckpt`` (``<run>/checkpoints/ckpt-*.pt``): the
    validated config in summary.json's ``config``, else Hydra's ``.hydra/config.yaml``."""
    import json

    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    run = ckpt.resolve().parent.parent
    summary = run / "summary.json"
    if summary.is_file():
        try:
            saved = json.loads(summary.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            saved = None
        if isinstance(saved, dict):
            return _config_from(saved, str(summary))
    hydra = run / ".hydra" / "config.yaml"
    if hydra.is_file():
        try:
            raw = OmegaConf.to_container(OmegaConf.load(hydra), resolve=False)
        except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:  # cut short
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise AnalysisError(f"{hydra}: unreadable ({why})") from None
        if not isinstance(raw, dict) or not raw:  # empty: not even the defaults' sections
            raise AnalysisError(f"{hydra}: unreadable (not a mapping of config sections)")
        return _config_from(raw, str(hydra))
    return None


def load_run(path: str | Path) -> Run:
    """The checkpoint at ``path`` (a ``ckpt-*.pt`` file, or a run folder / its checkpoints/
    folder: the newest checkpoint there that loads) and its config."""
    path, skipped = Path(path), []
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = checkpoint.latest(folder, skipped=skipped)
        if found is None:
            raise AnalysisError(f"{path} is a folder without a readable checkpoint (ckpt-*.pt)")
        path, state = found
    elif not path.exists():
        raise AnalysisError(f"{path}: no such checkpoint file")
    else:
        state = checkpoint.load(path)  # CheckpointError: unreadable, damaged, not ours
    if not isinstance(state.get("model"), dict):
        raise AnalysisError(f"checkpoint {path} holds no model weights")
    saved = state.get("config")
    if isinstance(saved, dict):
        cfg = _config_from(saved, f"checkpoint {path}")
    else:
        cfg = _run_folder_config(path)
        if cfg is None:
            raise AnalysisError(
                f"checkpoint {path} holds no config, nor does its run folder "
                "(summary.json, .hydra/config.yaml): cannot rebuild its model and data"
            )
    return Run(path, state, cfg, skipped)


def _strip_prefixes(state: dict) -> dict:
    """Weights saved from a compiled or wrapped model, with their wrapper prefixes removed."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def build_model_for(run: Run, spec: DatasetSpec) -> nn.Module:
    """The run's architecture (as the trainer builds it) holding the checkpoint's weights."""
    from dist_icm.models import build_model
    from dist_icm.norm import convert_ghost_bn

    cfg = run.cfg
    try:
        model = build_model(cfg.model.name, spec.num_classes, spec.in_channels, cfg.model.dropout)
    except ValueError as e:
        raise AnalysisError(f"checkpoint {run.path}: {str(e).splitlines()[0]}") from None
    if cfg.model.bn_group is not None:
        model = convert_ghost_bn(model, cfg.model.bn_group)
    try:
        model.load_state_dict(_strip_prefixes(run.state["model"]))
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        detail = (lines[0] if lines else str(e).splitlines()[0])[:160]
        raise AnalysisError(
            f"checkpoint {run.path}: its weights do not fit model.name={cfg.model.name} ({detail})"
        ) from None
    return model.eval()


@dataclass
class TestImages:
    """One normalised test image per class (row c: class c) and where they came from."""

    images: torch.Tensor  # (C, channels, H, W), normalised as in training
    indices: list[int]  # their indices in the test set
    spec: DatasetSpec


def test_images(cfg: Config, data_root: str | None = None) -> TestImages:
    """The first test image of each class of the run's data set, normalised as the trainer's
    test loader normalises them (the data set's statistics, or the paper code's under
    ``data.augment=cifar_rot15``: :func:`~dist_icm.data.bundle.normalization`)."""
    data = cfg.data
    root = data_root if data_root is not None else data.root
    _, test, spec = build_datasets(data.name, root, download=data.download, seed=cfg.train.seed)
    indices = first_of_each_class(test.targets, spec.num_classes)
    raw = torch.stack([test[i][0] for i in indices]).float()
    mean, std = normalization(data.name, data.augment, spec)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return TestImages(((raw - mean) / std).contiguous(), indices, spec)
