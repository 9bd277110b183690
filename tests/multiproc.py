"""Run a function on a real gloo process group of P CPU processes and collect what each returns.

``run_group(fn, world_size, *args)`` spawns P processes, initialises the default process group
through a file in a temporary folder (no ports to collide), calls ``fn(rank, world_size, *args)``
in each and returns the list of the ranks' return values (anything torch.save can write). An
exception on any rank fails the call with that rank's traceback.

``free_port()`` is a port for tests that start ranks themselves.
``run_launched(fn, world_size, *args)`` instead sets the environment a launcher (torchrun,
``accelerate launch``) sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and leaves the
process group to the code under test, e.g. the trainer's Accelerate runtime.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def _worker(rank: int, world_size: int, folder: str, fn, args, port: int | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out = Path(folder) / f"rank{rank}.pt"
    try:
        if port is None:
            dist.init_process_group(
                "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size
            )
        else:
            os.environ.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        result = {"ok": fn(rank, world_size, *args)}
    except BaseException:  # reported to the parent, which fails the test with it
        result = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, out)


def run_group(fn, world_size: int, *args) -> list:
    """Call ``fn(rank, world_size, *args)`` on each of ``world_size`` gloo processes."""
    return _run(fn, world_size, args, None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launched(fn, world_size: int, *args) -> list:
    """Like :func:`run_group`, with a launcher's environment and no process group yet."""
    return _run(fn, world_size, args, free_port())


def _run(fn, world_size: int, args, port: int | None) -> list:
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, folder, fn, args, port))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(TIMEOUT_S)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"a rank of the {world_size}-process group hung")
        results = []
        for r in range(world_size):
            path = Path(folder) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} died without a result (exit {procs[r].exitcode})")
            res = torch.load(path, weights_only=False)
            if "error" in res:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
            results.append(res["ok"])
        return results
