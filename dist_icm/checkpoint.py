"""Checkpoints: atomic writes, keep-last-k pruning, and a resume that survives a torn file.

A checkpoint is ``<folder>/ckpt-<step:09d>.pt`` holding ``{"format": 1, "step": step, "state":
state}``. :func:`save` writes it to a hidden temporary file in the same folder, fsyncs it and
renames it into place, so a crash (even SIGKILL) leaves either the old set of checkpoints or the
new one, never a half-written ``ckpt-*.pt``. Only one process may write a folder (the trainer
calls :func:`save` on rank 0); every rank may read.

A file that was cut short, overwritten or damaged inside (each zip member's CRC-32 is checked
before loading) raises :class:`CheckpointError`; :func:`latest` then falls back to the one before.

Files are loaded with ``torch.load(weights_only=True)``: no pickled code runs on load, so a
checkpoint needs no more trust than a tensor file. The price is that ``state`` may hold only
tensors, plain python scalars/strings, dtypes/devices and dict/list/tuple/set containers;
:func:`save` checks this up front (a numpy scalar from a metric would otherwise make a file that
only fails at resume). :func:`rng_state` therefore stores the numpy RNG key as a list of ints.

A checkpoint may have a companion folder ``ckpt-<step:09d>.zero/`` (:func:`engine_dir`): the
DeepSpeed shards every rank wrote for that step. Writers fill ``.ckpt-<step>.zero.tmp/`` and
rename it into place before the ``.pt`` file is written, so a listed checkpoint's companion is
complete; pruning a checkpoint removes its companion, and a save clears companions (and
temporary folders) that no checkpoint lists.

A run resumed at an earlier step than its folder's newest checkpoint removes the newer ones
(:func:`drop_after`), the future of the timeline it left; ``resume=auto`` sets the newer ones
it could not read aside instead (:func:`set_aside`), so that they hold no place among the kept.

A save that fails (a full disk, no permission) removes its temporary file, leaves every
earlier checkpoint in place (pruning comes only after a successful write) and raises
:class:`CheckpointWriteError` with one line naming the file and the OS's reason (the entry point
stops with it and exit code 4, ``dist_icm.train.WRITE_EXIT``).

No ``torch.distributed`` here: the caller decides which rank writes.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_GLOB = "ckpt-*.pt"
FORMAT = 1
_NAME = re.compile(r"ckpt-(\d+)\.pt")
_TMP_GLOB = ".ckpt-*.tmp"
_ENGINE_SUFFIX = ".zero"
# What weights_only loading accepts; exact types, since e.g. np.float64 subclasses float.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_CONTAINERS = (dict, OrderedDict, list, tuple, set, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint file that is truncated, corrupt or not written by :func:`save`."""

    def __init__(self, message: str, *, path: Path | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.reason = path, reason

    def __reduce__(self):  # picklable with its keywords (it travels between ranks)
        return _rebuild, (type(self), str(self), self.path, self.reason)


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (e.g. no space left on the device); one line."""


def _rebuild(cls, message, path, reason):
    return cls(message, path=path, reason=reason)


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``folder``."""
    return Path(folder) / f"ckpt-{step:09d}.pt"


def engine_dir(folder: Path, step: int) -> Path:
    """Where the DeepSpeed shards of the checkpoint of ``step`` live."""
    return checkpoint_path(folder, step).with_suffix(_ENGINE_SUFFIX)


def engine_tmp(folder: Path, step: int) -> Path:
    """Where the shards of ``step`` are written before :func:`engine_dir` is renamed into place."""
    return Path(folder) / f".{engine_dir(folder, step).name}.tmp"


def _check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value in ``obj`` that weights_only loading refuses."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) not in _CONTAINERS:
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise TypeError(
            f"{where} is a {kind}, which a weights_only load refuses: store tensors or plain "
            "python values (e.g. float(x), x.tolist())"
        )
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
    else:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable, where the OS lets us open a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(folder: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``; keep only the newest ``keep``.

    Leftover temporary files of an earlier, crashed save are removed too.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    _check_plain(state)
    folder = Path(folder)
    final = checkpoint_path(folder, step)
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    sink = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            with _crc32_on():  # load() checks them
                torch.save({"format": FORMAT, "step": step, "state": state}, sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # never leave a partial file behind, nor prune anything
        cause = exc if isinstance(exc, OSError) else getattr(sink, "error", None)
        if cause is None or not isinstance(exc, Exception):
            raise
        why = cause.strerror or str(cause) or type(cause).__name__
        raise CheckpointWriteError(
            f"cannot write checkpoint {final}: {why}", path=final, reason=why
        ) from cause
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(_TMP_GLOB):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    listed = {p.with_suffix(_ENGINE_SUFFIX) for p in list_checkpoints(folder)}
    for companion in folder.glob(f"ckpt-*{_ENGINE_SUFFIX}"):
        if companion not in listed:
            shutil.rmtree(companion, ignore_errors=True)
    return final


@contextlib.contextmanager
def _crc32_on():
    """torch.save with the zip members' CRC-32s (torch's default; a user may have turned it off)."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    was = True if get is None else get()
    if not was:
        torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        if not was:
            torch.serialization.set_crc32_options(False)


class _Sink:
    """The file torch.save writes to, remembering the OSError a write raised: torch's zip writer
    turns it into an opaque RuntimeError ("unexpected pos ..."), losing e.g. ENOSPC."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def _remember(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self.error = self.error or e
            raise

    def write(self, data) -> int:
        return self._remember(self.file.write, data)

    def flush(self) -> None:
        self._remember(self.file.flush)


def _step_of(path: Path) -> int | None:
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest step first (temporary and other files ignored)."""
    steps = {p: _step_of(p) for p in Path(folder).glob(CKPT_GLOB) if p.is_file()}
    return sorted((p for p, step in steps.items() if step is not None), key=steps.__getitem__)


def drop_after(folder: str | Path, step: int) -> list[Path]:
    """Remove the checkpoints (and their shard folders) of steps after ``step``; returns the
    files removed. A run resumed at ``step`` makes them the future of a timeline it left:
    kept, they would outrank its own (keep-last pruning and ``latest`` go by step)."""
    dropped = [p for p in list_checkpoints(folder) if _step_of(p) > step]
    for path in dropped:
        path.unlink(missing_ok=True)
        shutil.rmtree(path.with_suffix(_ENGINE_SUFFIX), ignore_errors=True)
    return dropped


def set_aside(folder: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints of steps after ``step`` (``resume=auto`` could not read them) and
    their shard folders to ``<name>.unreadable``: kept for a look, but no longer listed, so they
    neither outrank nor crowd out (keep-last pruning) the checkpoints written from here on.
    Returns the new names."""
    moved = []
    for path in [p for p in list_checkpoints(folder) if _step_of(p) > step]:
        for old in (path, path.with_suffix(_ENGINE_SUFFIX)):
            if old.exists():
                new = old.with_name(old.name + ".unreadable")
                if new.is_dir():  # set aside before, from an earlier resume
                    shutil.rmtree(new, ignore_errors=True)
                os.replace(old, new)
                moved += [new] if old == path else []
    return moved


def why_unwritable(folder: Path) -> str | None:
    """The OS's reason why 1 MiB cannot be written into ``folder`` now (e.g. "No space left on
    device"), None if it can: what a failed write that hid its OSError met."""
    probe = Path(folder) / f".probe.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    finally:
        probe.unlink(missing_ok=True)
    return None


def write_manifest(shards: Path) -> None:
    """List the files of a complete shard folder (every rank has written) in its
    ``manifest.txt``, so that a file missing later is found before DeepSpeed reads the rest."""
    names = sorted(str(f.relative_to(shards)) for f in shards.rglob("*") if f.is_file())
    (shards / "manifest.txt").write_text("".join(f"{name}\n" for name in names))


def _reason(exc: BaseException) -> str:
    """One short line saying why torch could not read a file."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # torch wraps the cause in paragraphs of advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    paragraph = text.strip().split("\n\n")[0]
    line = " ".join(paragraph.split()).split(". ")[0].strip(" .")
    return line[:160] or type(exc).__name__


def load(path: str | Path, map_location: Any = "cpu") -> dict:
    """The ``state`` saved in the checkpoint at ``path``; CheckpointError if it is unreadable."""
    path = Path(path)
    with open(path, "rb") as f:  # a missing file is FileNotFoundError, not corruption
        try:
            if not zipfile.is_zipfile(f):  # torch.save writes a zip; its index is at the end
                raise ValueError("no zip index: truncated, or not written by torch.save")
            f.seek(0)
            # torch.load does not check the members' CRC-32s: a file damaged inside would load
            # wrong weights. Checking reads the file once more (~2 GB/s), from the page cache.
            bad = zipfile.ZipFile(f).testzip()
            if bad is not None:
                raise ValueError(f"{bad} fails its CRC-32 check: the file is corrupt")
            f.seek(0)
            payload = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as exc:
            reason = _reason(exc)
        else:
            ours = isinstance(payload, dict) and payload.get("format") == FORMAT
            if ours and isinstance(payload.get("state"), dict):
                state = payload["state"]
                reason = _shards_unreadable(path, state)  # ZeRO: the weights come from them
                if reason is None:
                    return state
            else:
                reason = f"not a dist_icm checkpoint of format {FORMAT}"
    raise CheckpointError(
        f"checkpoint {path} is unreadable ({reason}): delete it or pass another",
        path=path,
        reason=reason,
    )


def _shards_unreadable(path: Path, state: dict) -> str | None:
    """Why the DeepSpeed shards beside the checkpoint at ``path`` cannot be resumed from (a
    missing folder or rank's file, a truncated file, a member failing its CRC-32), None when
    they can or the run had none. torch.load would read a damaged shard as it is."""
    runtime = (state.get("config") or {}).get("runtime") or {}
    if not runtime.get("zero_stage"):
        return None
    folder = path.with_suffix(_ENGINE_SUFFIX)
    if not folder.is_dir():
        return f"its ZeRO shards' folder {folder.name} is missing"
    manifest = folder / "manifest.txt"  # (none: written before manifests were)
    listed = manifest.read_text().splitlines() if manifest.is_file() else []
    for name in listed:
        if not (folder / name).is_file():
            return f"shard {name} is missing"
    files = sorted(f for f in folder.rglob("*.pt") if f.is_file())
    ranks = range(int(state.get("world_size") or 0))
    for rank in ranks:
        if not any(f"zero_pp_rank_{rank}_" in f.name for f in files):  # (bf16: "bf16_zero_...")
            return f"{folder.name} holds no shard of rank {rank}"
    for f in files:
        name = f.relative_to(folder)
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"shard {name} is unreadable ({_reason(e)})"
        if bad is not None:
            return f"shard {name}: {bad} fails its CRC-32 check"
    return None


def latest(
    folder: str | Path, map_location: Any = "cpu", *, skipped: list[str] | None = None
) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder`` that loads, with its state; None when there is none.

    An unreadable one is skipped for the one before. Why is said in one line per file: appended
    to ``skipped`` when the caller passes a list (the trainer shows them in the run's report),
    else as a warning.
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path, map_location)
        except FileNotFoundError:  # pruned by the writer since we listed the folder
            continue
        except CheckpointError as exc:
            line = f"checkpoint {path} is unreadable ({exc.reason}): skipped for an older one"
            if skipped is None:
                warnings.warn(line, stacklevel=2)
            else:
                skipped.append(line)
    return None


def rng_state() -> dict:
    """The global RNG states: python ``random``, numpy, torch CPU and the current CUDA device.

    Only the current device: asking for every device's state would create a CUDA context on
    each GPU the process can see (one per rank per GPU on a multi-GPU node).
    """
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {
        "key": np_state["state"]["key"].tolist(),  # plain ints: loadable with weights_only
        "pos": int(np_state["state"]["pos"]),
    }
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA only if saved and available here)."""
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np_state["state"] = {"key": key, "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
