"""GPU checks: the loss on CUDA against float64 on the CPU, and a bf16 training run.

Marked ``gpu``: skipped without a CUDA device (conftest.py); run them on a GPU machine with
``python -m pytest -m gpu``.
"""

import json
import subprocess
import sys

import pytest
import torch

from dist_icm.loss import icm_loss

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [100, 1000])
def test_loss_on_cuda_matches_cpu_float64(dtype, c):
    g = torch.Generator().manual_seed(0)
    n = 2048
    logits = torch.randn(n, c, generator=g) * 4
    a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
    lam = torch.rand(n, generator=g)
    ref = icm_loss(logits.double(), a, b, lam.double(), dedup=True)
    cuda = [t.cuda() for t in (logits.to(dtype), a, b, lam)]
    out = icm_loss(*cuda, dedup=True)
    assert out.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(out.item() - ref.item()) <= tol * abs(ref.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_under_cuda_autocast_is_the_float32_loss(dtype):
    g = torch.Generator().manual_seed(0)
    n, c = 4096, 100
    logits = (torch.randn(n, c, generator=g) * 4).cuda()
    a, b = (
        torch.randint(0, c, (n,), generator=g).cuda(),
        torch.randint(0, c, (n,), generator=g).cuda(),
    )
    lam = torch.rand(n, generator=g).cuda()
    ref = icm_loss(logits, a, b, lam, dedup=True)
    with torch.autocast("cuda", dtype=dtype):
        out = icm_loss(logits, a, b, lam, dedup=True)
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) <= 1e-6 * abs(ref.item())


def test_bf16_training_run_on_gpu(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dist_icm.train",
        "experiment=quickstart",
        "runtime=bf16",
        "runtime.device=cuda",
        "train.max_steps=20",
        "train.progress=false",
        f"hydra.run.dir={tmp_path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["top1"] > 20
