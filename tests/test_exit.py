"""A rank's process ends with its own exit code, not with SIGABRT from the interpreter's teardown.

The trap, seen in CI once Triton was loaded: a process group's thread finishes a collective
while the interpreter tears itself down (a peer's exit has just failed the collective), needs
the interpreter's lock for a Python object, cannot have it, and the process aborts ("terminate
called ...", exit -6) in place of its exit code. Here that moment is made to happen every time:
rank 0 leaves with a collective open that rank 1 never joins, holding a Python callback; rank 1
exits when rank 0's ``atexit`` handlers run, which fails the collective; and an object whose
finalizer sleeps holds rank 0's teardown open while the collective's thread runs the callback.

``dist_icm.train.main`` leaves through ``leave``, which has no teardown; ``sys.exit`` and the
job without ``main``'s exit are the negative controls.
"""

import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch.distributed as dist
from cli import REPO

pytestmark = pytest.mark.multiproc

RANK_SCRIPT = r"""
import atexit, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist

port, how = int(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
store = dist.TCPStore("127.0.0.1", port, 3, False, timeout=timedelta(seconds=60))
group = dist.ProcessGroupGloo(dist.PrefixStore("pg", store), rank, 2, timedelta(seconds=60))
if rank == 1:
    store.wait(["leaving"])
    os._exit(0)

from dist_icm import train

pending = group.allreduce([torch.ones(4)]).get_future().then(lambda f: None)
atexit.register(store.set, "leaving", "1")  # rank 1 exits, which fails the collective


class SlowFinalizer:
    def __del__(self):
        time.sleep(3)


cycle = [SlowFinalizer()]
cycle.append(cycle)  # collected in the teardown, if there is one
del cycle
print("written, not flushed", end="")
sys.argv = ["dist_icm.train", "data.global_batch=0"]  # a bad value: exit code 2
{"leave": lambda: train.leave(2), "sys.exit": lambda: sys.exit(2), "main": train.main,
 "job without main's exit": train._main}[how]()
"""


def _ranks(how: str, cwd) -> tuple[list[int], list[str], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 3, True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", RANK_SCRIPT, str(port), how]
    procs = []
    for rank in range(2):
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env | {"RANK": str(rank)}, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    del store
    return [p.returncode for p in procs], [err for _, err in outs], outs[0][0]


@pytest.mark.parametrize("how", ["main", "leave"])
def test_the_exit_code_survives_a_collective_failing_on_the_way_out(how, tmp_path):
    codes, errs, out = _ranks(how, tmp_path)
    assert codes == [2, 0], errs  # rank 1 exits 0 only if rank 0's atexit handler ran
    assert out == "written, not flushed"  # stdout (a pipe, so block-buffered) was flushed
    if how == "main":
        assert errs[0].strip() == "dist_icm: error: data.global_batch must be >= 1, got 0"


@pytest.mark.parametrize("how", ["sys.exit", "job without main's exit"])
def test_negative_control_a_plain_exit_aborts(how, tmp_path):
    codes, errs, _ = _ranks(how, tmp_path)
    assert codes == [-6, 0], errs
    assert "terminate called" in errs[0]
