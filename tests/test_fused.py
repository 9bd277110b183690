"""The fused statistics (``dist_icm.fused``, ``loss.fused``): Triton kernels, checked without a GPU
(compiled on CUDA in ``test_gpu.py``).

* Their numerical cases (``tests/fused_cases.py``) run in Triton's interpreter on CPU tensors, in
  a pytest process of their own (see that file for why).
* Both kernels compile to sm_80 and sm_90 machine code here, which the interpreter does not check.
* The trainer with ``loss.fused=true`` (interpreted) tracks the torch form, and without a way to
  run the kernels it stops at start in one line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli import losses, run_train

pytest.importorskip("triton", reason="dist_icm.fused needs Triton (torch's CUDA wheels bring it)")

from dist_icm import graphs  # noqa: E402
from dist_icm.bench.__main__ import _MALLOC  # noqa: E402

CASES = Path(__file__).with_name("fused_cases.py")
INTERPRET = os.environ | {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize(
    "marks",
    [
        "not multiproc",
        pytest.param("multiproc", marks=pytest.mark.multiproc),  # 2 gloo processes
    ],
)
def test_the_interpreted_cases_pass(marks):
    """The cases of ``fused_cases.py`` (its ``multiproc`` ones under that marker here too)."""
    cmd = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-m", marks]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=INTERPRET, cwd=CASES.parent, timeout=900
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    "change,expected",
    [
        ({}, True),
        ({"classes": 5000}, True),  # no atomics at any number of classes
        ({"rows": 8192}, True),  # and no (n x N) block held
        ({"tile": 256}, False),
        ({"dedup": True}, False),
        ({"world": 2}, False),
        ({"itemsize": 8}, False),  # float64: the torch form, under its own rules
    ],
)
def test_fused_loss_graphs_where_its_kernels_apply(change, expected):
    config = {"world": 1, "dedup": False, "tile": 0, "rows": 512, "classes": 5000, "fused": True}
    config |= change
    # the same sizes without fused: no graphs past 4,096 classes (CUDA) or 2^24 entries of S̃
    assert graphs.eligible(**config | {"fused": False}) is False
    assert graphs.eligible(**config) is expected


QUICK = ["experiment=quickstart", "train.progress=false", "train.tensorboard=false"]


def test_the_trainer_with_loss_fused_tracks_the_torch_loss(tmp_path):
    """Six logged quickstart steps: the same run to float32's rounding (the logged losses, and
    the weights after the last step), but not the same bits (the kernels really ran)."""
    common = [*QUICK, "train.max_steps=6", "train.log_every=1"]
    run_train(tmp_path / "torch", *common)
    out = run_train(tmp_path / "fused", *common, "loss.fused=true", env=INTERPRET)
    assert "loss.fused=true off CUDA: Triton's interpreter" in out.stderr
    plain, fused = losses(tmp_path / "torch"), losses(tmp_path / "fused")
    assert sorted(plain) == sorted(fused) == list(range(1, 7))
    assert max(abs(fused[s] - plain[s]) / plain[s] for s in plain) <= 1e-5
    weights = [
        torch.cat([t.flatten() for t in _last_checkpoint(tmp_path / run).values()])
        for run in ("torch", "fused")
    ]
    assert 0 < _rel(weights[1], weights[0].double()) <= 1e-5


def _last_checkpoint(run_dir):
    path = max((run_dir / "checkpoints").glob("ckpt-*.pt"), key=lambda p: int(p.stem[5:]))
    return torch.load(path, weights_only=False)["state"]["model"]


def test_loss_fused_without_a_way_to_run_stops_at_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # and no GPU, wherever this runs
    out = run_train(tmp_path, *QUICK, "loss.fused=true", env=env, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "loss.fused runs on CUDA" in out.stderr and "Traceback" not in out.stderr


_COMPILE = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dist_icm import fused_kernels as fused

ptr, i32, const = "*fp32", "i32", "constexpr"
common = {"x_ptr": ptr, "a_ptr": "*i64", "b_ptr": "*i64", "lam_ptr": ptr, "rows_ptr": ptr,
          "cols_ptr": ptr}
forward = common | {"diag_ptr": ptr, "m": i32, "k": i32, "C": i32, "offset": i32,
                    "row_programs": i32, "BM": const, "BN": const}
backward = common | {"g_rows_ptr": ptr, "g_cols_ptr": ptr, "g_diag_ptr": ptr,
                     "g_rows_step": i32, "g_cols_step": i32, "g_diag_step": i32, "dx_ptr": ptr,
                     "m": i32, "k": i32, "C": i32, "offset": i32, "BM": const, "BN": const,
                     "BC": const}
blocks = {"BM": fused.BLOCK_ROWS, "BN": fused.BLOCK_COLS, "BC": fused.BLOCK_CLASSES}
for arch in (80, 90):
    for kernel, signature in ((fused._forward, forward), (fused._backward, backward)):
        constexprs = {k: v for k, v in blocks.items() if k in signature}
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
        )
        assert compiled.asm["cubin"] and ".local" not in compiled.asm["ptx"], "spills"
        print("compiled", kernel.fn.__name__, arch)
    # the blend as fused.fused_blend launches it: every product and sum rounded (no fma), as
    # torch's kernels round them; with contraction on (the negative control) it fuses them
    blend = {"x_ptr": ptr, "perm_ptr": "*i64", "lam_ptr": ptr, "out_ptr": ptr, "D": i32,
             "BLOCK": const}
    for contract in (False, True):
        compiled = triton.compile(
            ASTSource(fused._blend, blend, constexprs={"BLOCK": fused.BLOCK_BLEND}),
            target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": contract},
        )
        assert compiled.asm["cubin"] and ".local" not in compiled.asm["ptx"], "spills"
        assert ("fma" in compiled.asm["ptx"]) is contract
        print("compiled", fused._blend.fn.__name__, arch, "contract" if contract else "")


@triton.jit
def _two_shapes(out_ptr, flag):  # the negative control: what the interpreter runs
    if flag > 0:
        v = tl.zeros((32,), tl.float32)
    else:
        v = tl.zeros((64,), tl.float32)
    tl.store(out_ptr + tl.arange(0, 32), tl.sum(v, 0))


try:
    triton.compile(
        ASTSource(_two_shapes, {"out_ptr": ptr, "flag": i32}), target=GPUTarget("cuda", 90, 32)
    )
except triton.compiler.errors.CompilationError as err:
    print("refused:", str(err).strip().splitlines()[-1])
"""


def test_the_kernels_compile_for_ampere_and_hopper(tmp_path):
    """The interpreter does not type-check as the compiler does (it ran a first version whose
    branches gave one name two shapes, which the compiler refuses), so the kernels are also
    compiled here, without a GPU, to sm_80 and sm_90 machine code (A100, H100/H200), with no
    register spills, the blend's without fused multiply-adds (what keeps it torch's bits).
    Negative control: a kernel of that kind is refused by the same compile."""
    script = tmp_path / "compile_kernels.py"  # a file: the compiler reads the kernels' source
    script.write_text(_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 8
    assert 'refused: AssertionError("Mismatched type for v' in out.stdout, out.stdout


STEP = ["step", "--model", "small_cnn", "--batch", "16", "--image", "8", "--steps", "1",
        "--repeats", "1", "--warmup", "1", "--device", "cpu"]  # fmt: skip
LOSS = ["loss", "--sizes", "96", "--classes", "10", "--tile", "32", "--repeats", "1"]
# the kernels made to fail, then the bench's own entry point
_BROKEN = """
import sys
from dist_icm import fused
from dist_icm.bench.__main__ import main

def fail(*args):
    raise RuntimeError("injected: the kernel did not launch")

fused._FusedLSE.forward = staticmethod(fail)
main(sys.argv[1:])
"""


def _bench(args, broken=False):
    head = ["-c", _BROKEN] if broken else ["-m", "dist_icm.bench"]
    env = (
        INTERPRET | _MALLOC
    )  # with these set, bench loss does not re-start itself without the fault
    out = subprocess.run(
        [sys.executable, *head, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_the_benches_time_the_fused_form_where_its_kernels_run():
    """``bench step`` and ``bench loss`` with the interpreter: the fused form is there (the
    timings mean nothing interpreted; on CUDA they are the point)."""
    step = _bench(STEP)
    assert set(step["queue"]) == {"ce", "icm", "icm_fused"} and step["icm_fused_over_ce"] > 0
    (row,) = _bench(LOSS)["rows"]
    assert row["fused_s"] > 0 and row["fused_over_dense_s"] > 0


def test_a_failing_fused_form_leaves_the_other_figures():
    """Kernels that fail on a GPU (they have not run on one yet) cost their own figures only."""
    step = _bench(STEP, broken=True)
    assert step["icm_fused_error"] == "injected: the kernel did not launch"
    assert "icm_fused_over_ce" not in step and step["icm_over_ce"] > 0
    assert set(step["queue"]) == {"ce", "icm"}
    loss = _bench(LOSS, broken=True)
    assert loss["fused_error"] == "injected: the kernel did not launch"
    (row,) = loss["rows"]
    assert "fused_s" not in row and row["tiled_s"] > 0
