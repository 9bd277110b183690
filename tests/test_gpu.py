"""GPU checks: the loss on CUDA against float64 on the CPU, the CUDA-graphed loss and model
against the eager ones, and bf16 training runs.

Marked ``gpu``: skipped without a CUDA device (conftest.py); run them on a GPU machine with
``python -m pytest -m gpu``.
"""

import json
import subprocess
import sys

import pytest
import torch
from cli import losses, run_train, summary

from dist_icm import graphs
from dist_icm.loss import icm_loss
from dist_icm.mixing import MixContext
from dist_icm.models import build_model
from dist_icm.objectives import OBJECTIVES, Objective, ObjectiveConfig

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


def _problem_cuda(n, c, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=g) * 4).to("cuda", dtype)
    a, b = (torch.randint(0, c, (n,), generator=g).cuda() for _ in range(2))
    return x, a, b, torch.rand(n, generator=g).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dedup", [False, True])
def test_tiled_loss_on_cuda_equals_untiled(dtype, dedup):
    x, a, b, lam = _problem_cuda(3000, 100, dtype)
    out = {}
    for tile in (0, 512):
        xx = x.detach().clone().requires_grad_()
        loss = icm_loss(xx, a, b, lam, dedup=dedup, tile=tile)
        loss.backward()
        out[tile] = (loss.item(), xx.grad.float())
    assert abs(out[512][0] - out[0][0]) <= 1e-5 * abs(out[0][0])
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is returned in bf16
    assert (out[512][1] - out[0][1]).norm() <= tol * out[0][1].norm()


def test_tiled_loss_extra_memory_is_a_tenth_of_untiled_at_16k():
    """The issue's target at N = 16,384, C = 100, one process (memory, not time); the fused
    kernels (``loss.fused``) hold no (n x N) block either."""
    x, a, b, lam = _problem_cuda(16384, 100)
    extra = {}
    for form in ({"tile": 0}, {"tile": 1024}, {"fused": True}):
        xx = x.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        icm_loss(xx, a, b, lam, validate=False, **form).backward()
        torch.cuda.synchronize()
        extra[str(form)] = torch.cuda.max_memory_allocated() - base
    untiled = extra[str({"tile": 0})]
    assert extra[str({"tile": 1024})] <= untiled / 10, extra
    assert extra[str({"fused": True})] <= untiled / 10, extra


def _objective_steps(cfg_kw, steps, n=256, c=10, dtype=torch.bfloat16, graph=True):
    """(loss, logits' gradient) of ``steps`` steps of the ICM objective's loss on fresh logits
    and fresh mixing triples each step (so the graphs' input buffers must be refilled)."""
    obj = Objective(ObjectiveConfig(name="icm_mixup", cuda_graph=graph, **cfg_kw), validate=False)
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        logits = (torch.randn(n, c, generator=g) * 3).to("cuda", dtype).requires_grad_()
        y = torch.randint(0, c, (n,), generator=g).cuda()
        mixed = obj.mix(torch.randn(n, 3, 4, 4, generator=g).cuda(), y, MixContext(0, step))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = obj.mixed_loss(logits, mixed)
        loss.backward()
        out.append((loss, logits.grad))
    return obj, out


@pytest.mark.parametrize("axis", ["both", "class", "pair"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_loss_is_the_eager_loss_bit_for_bit(axis, dtype):
    """CUDA graphs replay the eager kernels: every step's loss and gradient are identical, and
    a loss or a leaf's gradient kept from an earlier step is not overwritten by later replays."""
    obj, graphed = _objective_steps({"axis": axis}, 4, dtype=dtype)
    assert obj.loss_fn.captured == 1
    _, eager = _objective_steps({"axis": axis}, 4, dtype=dtype, graph=False)
    for (gl, gg), (el, eg) in zip(graphed, eager, strict=True):
        assert torch.equal(gl, el) and torch.equal(gg, eg)
    assert len({loss.item() for loss, _ in graphed}) == 4
    # distinct gradients (their plain sums are all 0 up to rounding, as rows of Ỹ sum to 1)
    assert len({grad.float().square().sum().item() for _, grad in graphed}) == 4


def test_graphed_loss_at_1000_classes_is_the_eager_loss_bit_for_bit():
    """Above the CPU's switch to gathers (900 classes) CUDA keeps the dense Ỹ, so the default
    loss still replays from graphs, bit for bit."""
    obj, graphed = _objective_steps({}, 4, c=1000)
    assert obj.loss_fn.captured == 1
    _, eager = _objective_steps({}, 4, c=1000, graph=False)
    for (gl, gg), (el, eg) in zip(graphed, eager, strict=True):
        assert torch.equal(gl, el) and torch.equal(gg, eg)


@pytest.mark.parametrize("why", ["dedup", "too_big", "no_grad"])
def test_graphed_loss_runs_eagerly_where_graphs_do_not_fit(why, monkeypatch):
    cfg = {"dedup": True} if why == "dedup" else {}
    if why == "too_big":
        monkeypatch.setattr(graphs, "MAX_ENTRIES", 255 * 255)
    obj = Objective(ObjectiveConfig(name="icm_mixup", **cfg), validate=False)
    logits = torch.randn(256, 10, device="cuda", requires_grad=why != "no_grad")
    y = torch.randint(0, 10, (256,), device="cuda")
    mixed = obj.mix(torch.randn(256, 3, 4, 4, device="cuda"), y, MixContext(0, 0))
    loss = obj.mixed_loss(logits, mixed)
    assert obj.loss_fn.captured == 0
    assert torch.equal(loss, obj._icm_loss(logits, mixed.a, mixed.b, mixed.lam))


@pytest.mark.parametrize("c", [10, 100, 1000])
def test_fused_stats_on_cuda_equal_the_float64_torch_form(c):
    """The compiled kernels (``loss.fused``): rows, columns, diagonal and the gradient against
    ``dense_stats`` in float64 on the CPU, at a rank's offset in a larger S̃."""
    from dist_icm.fused import fused_stats
    from dist_icm.loss import mixing_matrix
    from dist_icm.tiled import dense_stats

    x, a, b, lam = _problem_cuda(1000, c)
    x, a, b, lam = x[:300], a, b, lam  # 300 images owning mixed classes 500 ... 799 of 1000
    weights = [torch.randn(k, device="cuda") for k in (300, 1000, 300)]
    xf = x.detach().clone().requires_grad_()
    got = fused_stats(xf, a, b, lam, 500)
    sum((w * t).sum() for w, t in zip(weights, got, strict=True)).backward()
    x64 = x.detach().cpu().double().requires_grad_()
    ref = dense_stats(x64, mixing_matrix(a.cpu(), b.cpu(), lam.cpu().double(), c), 500)
    sum((w.cpu().double() * t).sum() for w, t in zip(weights, ref, strict=True)).backward()
    for o, r in [*zip(got, ref, strict=True), (xf.grad, x64.grad)]:
        assert (o.detach().cpu().double() - r.detach()).norm() <= 1e-5 * r.detach().norm()


def test_fused_stats_on_cuda_are_the_same_bits_on_every_call():
    """fused.py: no atomics, so the statistics and the gradient do not depend on how the GPU
    schedules the kernels' blocks: two calls on the same inputs agree bit for bit."""
    from dist_icm.fused import fused_stats

    x, a, b, lam = _problem_cuda(4096, 1000)
    weights = [torch.randn(k, device="cuda") for k in (4096, 4096, 4096)]
    runs = []
    for _ in range(2):
        xf = x.detach().clone().requires_grad_()
        got = fused_stats(xf, a, b, lam, 0)
        sum((w * t).sum() for w, t in zip(weights, got, strict=True)).backward()
        runs.append([t.detach() for t in got] + [xf.grad])
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_blend_on_cuda_is_torch_s_blend_bit_for_bit(channels_last):
    """The compiled blend kernel (``loss.fused``'s Mixup) against torch's CUDA kernels for
    ``w * x + (1 - w) * x[perm]``: the same bits, in the same memory format."""
    from dist_icm.fused import fused_blend

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 3, 32, 32, device="cuda", generator=g) * 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    perm = torch.randperm(512, device="cuda", generator=g)
    lam = torch.rand(512, device="cuda", generator=g)
    w = lam.view(-1, 1, 1, 1)
    ref = w * x + (1 - w) * x[perm]
    got = fused_blend(x, perm, lam)
    assert torch.equal(got, ref) and got.stride() == ref.stride()


@pytest.mark.parametrize("c", [10, 1000])
def test_graphed_fused_loss_is_the_eager_fused_loss_bit_for_bit(c):
    """The fused loss replays from CUDA graphs at 1000 classes too (as the torch form now does):
    every step's loss and gradient are the eager fused ones, which track the torch form's."""
    cfg = {"fused": True}
    obj, graphed = _objective_steps(cfg, 4, c=c)
    assert obj.loss_fn.captured == 1
    _, eager = _objective_steps(cfg, 4, c=c, graph=False)
    _, torch_form = _objective_steps({}, 4, c=c, graph=False)
    for (gl, gg), (el, eg), (tl, tg) in zip(graphed, eager, torch_form, strict=True):
        assert torch.equal(gl, el) and torch.equal(gg, eg)
        assert abs(gl.item() - tl.item()) <= 1e-5 * abs(tl.item())
        assert (gg.float() - tg.float()).norm() <= 1e-2 * tg.float().norm()  # bf16 gradients


def test_trainer_with_the_fused_loss_tracks_the_torch_loss(tmp_path):
    runs = {}
    for flag in ("true", "false"):
        run_train(tmp_path / flag, "experiment=quickstart", "runtime=bf16", "runtime.device=cuda",
                  "train.max_steps=10", "train.log_every=1", "train.progress=false",
                  f"loss.fused={flag}")  # fmt: skip
        runs[flag] = losses(tmp_path / flag)
    assert sorted(runs["true"]) == sorted(runs["false"]) == list(range(1, 11))
    # bf16 training: the two losses' float32 roundings reach the model's bf16 gradients
    assert all(abs(runs["true"][s] - v) <= 1e-2 * v for s, v in runs["false"].items())


def y_of(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=g).cuda()


class _Unguarded(graphs.GraphedModel):
    """GraphedModel without its check that every .grad is None (the negative control)."""

    def usable(self, x):
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            return super().usable(x)
        finally:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g


def _resnet_steps(graphed, steps: int = 4, n: int = 64, micro: int = 1):
    """``steps`` bf16 ICM steps (``micro`` accumulated micro-steps each) of a channels-last
    ResNet-18 (BatchNorm), its model called through ``graphed`` (a GraphedModel class) or
    itself (False): (the call, the losses, the final state dict)."""
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", 10, 3).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    obj = Objective(ObjectiveConfig(name="icm_mixup"), validate=False)
    call = (graphs.GraphedModel if graphed is True else graphed)(model) if graphed else model
    out = []
    for step in range(steps):
        for m in range(micro):
            g = torch.Generator().manual_seed(step * micro + m)
            x = torch.randn(n, 3, 32, 32, generator=g).cuda()
            x, y = x.contiguous(memory_format=torch.channels_last), y_of(g, n)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = obj(call, x, y, MixContext(0, step * micro + m))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return call, out, {k: v.clone() for k, v in model.state_dict().items()}


def test_graphed_model_trains_bit_for_bit_like_the_model():
    """Losses, weights and BatchNorm statistics after 4 steps: identical (the capture's warm-up
    runs leave no trace in the statistics)."""
    call, graphed, g_state = _resnet_steps(graphed=True)
    assert call.captured
    _, eager, e_state = _resnet_steps(graphed=False)
    assert graphed == eager and len(set(eager)) == 4
    assert all(torch.equal(g_state[k], e_state[k]) for k in e_state)
    _, _, shorter = _resnet_steps(graphed=False, steps=3)  # the comparison can fail
    assert not all(torch.equal(shorter[k], e_state[k]) for k in e_state)


def test_graphed_model_accumulates_gradients_like_the_model():
    """With 2 micro-steps a step, the first replays the graphs and the second runs the model
    itself (a replay would overwrite the first's gradient, which autograd keeps in the graph's
    buffer): the same weights bit for bit. Without that check they differ."""
    call, _, g_state = _resnet_steps(graphed=True, steps=3, micro=2)
    assert call.captured
    _, _, e_state = _resnet_steps(graphed=False, steps=3, micro=2)
    assert all(torch.equal(g_state[k], e_state[k]) for k in e_state)
    _, _, unguarded = _resnet_steps(graphed=_Unguarded, steps=3, micro=2)
    assert not all(torch.equal(unguarded[k], e_state[k]) for k in e_state)


def test_graphed_model_runs_the_model_where_the_capture_fails(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("injected capture failure")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fail)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3).cuda()
    call = graphs.GraphedModel(model)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with pytest.warns(RuntimeWarning, match="injected capture failure"):
        out = call(x)
    assert call.failed and not call.captured
    assert torch.equal(out, model(x)) and torch.equal(call(x), model(x))  # no second try


def test_graphed_model_calls_the_model_itself_where_graphs_do_not_apply():
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", 10, 3).cuda()
    call = graphs.GraphedModel(model)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    model.eval()
    evaluated = call(x).detach()  # evaluation: not captured (no autograd graph kept alive)
    assert not call.captured
    model.train()
    trained = call(x)
    assert call.captured and not torch.equal(trained, evaluated)  # batch vs running statistics
    assert call(torch.randn(4, 3, 32, 32, device="cuda")).shape == (4, 10)  # another shape
    with torch.no_grad():
        assert torch.equal(call(x), model(x))  # no gradient: the model itself
    drop = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3072, 10))
    dropout = graphs.GraphedModel(drop.cuda())
    dropout(x).sum().backward()  # random masks: not captured
    assert dropout.random and not dropout.captured


# GroupNorm, BatchNorm, BatchNorm with 2 accumulated micro-steps
@pytest.mark.parametrize(
    "model,accum", [("small_cnn", 1), ("cifar_resnet18", 1), ("cifar_resnet18", 2)]
)
def test_trainer_with_cuda_graphs_logs_the_losses_of_the_eager_model(tmp_path, model, accum):
    runs = {}
    for flag in ("true", "false"):
        run = tmp_path / flag
        run_train(run, "experiment=quickstart", "runtime=bf16", "runtime.device=cuda",
                  f"model={model}", "train.max_steps=10", "train.log_every=1",
                  f"runtime.grad_accum={accum}", "train.progress=false",
                  f"runtime.cuda_graph={flag}")  # fmt: skip
        runs[flag] = (losses(run), summary(run))
    (graphed, on), (eager, off) = runs["true"], runs["false"]
    assert on["cuda_graphs"] and not off["cuda_graphs"]
    assert len(graphed) == 10 and graphed == eager and on["top1"] == off["top1"]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_an_objective_s_step_never_waits_for_the_device(name):
    # the Objective's docstring: nothing in a step (mixing, model, loss, backward) reads a value
    # back or waits for the GPU. Two warm steps (graph captures, the Remix counts' one copy),
    # then a third under CUDA's sync debug mode, which raises at any synchronising call
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", 10, 3).cuda().to(memory_format=torch.channels_last)
    counts = torch.arange(1, 11) * 10  # imbalanced, so Remix's rule moves labels
    obj = Objective(ObjectiveConfig(name=name), class_counts=counts, validate=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    y = y_of(g, 64)
    for step in range(3):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step == 2 else "default")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = obj(model, x, y, MixContext(0, step))
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss).item()
