"""Objectives by name: each composes mixing and a loss, and the IC variants use icm_loss."""

import pytest
import torch
import torch.nn.functional as F

from dist_icm import graphs
from dist_icm.graphs import GraphedLoss
from dist_icm.loss import icm_loss
from dist_icm.mixing import MixContext, Mixed, mixup, remix_lam
from dist_icm.objectives import OBJECTIVES, Objective, ObjectiveConfig, soft_ce


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 5
    return model, x, y


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_gives_a_finite_differentiable_loss(name):
    model, x, y = _setup()
    objective = Objective(ObjectiveConfig(name=name), class_counts=torch.tensor([5, 1, 9, 2, 3]))
    loss, _ = objective(model, x, y, MixContext(seed=0, step=0))
    loss.backward()
    assert torch.isfinite(loss) and model[1].weight.grad.abs().sum() > 0


def test_ce_is_cross_entropy():
    model, x, y = _setup()
    loss, _ = Objective(ObjectiveConfig(name="ce"))(model, x, y, MixContext(0, 0))
    assert torch.equal(loss, F.cross_entropy(model(x), y))


def test_icm_objective_is_icm_loss_of_the_mixed_batch():
    model, x, y = _setup()
    cfg = ObjectiveConfig(name="icm_mixup", alpha=0.4, axis="pair", dedup=True)
    objective = Objective(cfg)
    loss, stats = objective(model, x, y, MixContext(3, 1))
    mixed = objective.mix(x, y, MixContext(3, 1))
    ref = icm_loss(model(mixed.x), mixed.a, mixed.b, mixed.lam, axis="pair", dedup=True)
    assert torch.equal(loss, ref) and torch.equal(stats["lam"], mixed.lam)


def test_soft_ce_interpolates_the_two_cross_entropies():
    logits, a, b = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5])
    expected = (
        lam * F.cross_entropy(logits, a, reduction="none")
        + (1 - lam) * F.cross_entropy(logits, b, reduction="none")
    ).mean()
    assert torch.allclose(soft_ce(logits, Mixed(logits, a, b, lam)), expected)


def test_regmixup_adds_clean_ce_and_uses_alpha_20():
    model, x, y = _setup()
    cfg = ObjectiveConfig(name="regmixup")
    assert cfg.mix_alpha == 20.0
    objective = Objective(cfg)
    ctx = MixContext(0, 0)
    loss, _ = objective(model, x, y, ctx)
    mixed = objective.mix(x, y, ctx)
    expected = F.cross_entropy(model(x), y) + soft_ce(model(mixed.x), mixed)
    assert torch.allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["regmixup", "icm_regmixup"])
def test_regmix_weight_scales_the_mixed_term(name):
    # loss(w) = CE(clean) + w * mixed: linear in w. Without the factor every weight gives
    # loss(1), and loss.regmix_weight would be read and silently ignored
    model, x, y = _setup()
    ctx = MixContext(4, 2)

    def loss(weight):
        cfg = ObjectiveConfig(name=name, regmix_weight=weight)
        return Objective(cfg)(model, x, y, ctx)[0].double().item()

    base, one = loss(0.0), loss(1.0)
    # weight 0 leaves the clean cross-entropy alone (and the linearity below is not 0 = 0)
    assert base == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    assert abs(one - base) > 1e-2
    for w in (0.25, 3.0):
        assert loss(w) - base == pytest.approx(w * (one - base), rel=1e-5)


def test_soft_ce_of_bf16_logits_is_computed_in_float32():
    # log_softmax on the bf16 logits themselves would give a bf16 loss ~1e-3 off
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 10, generator=g) * 4).bfloat16()
    a, b = torch.randint(0, 10, (64,), generator=g), torch.randint(0, 10, (64,), generator=g)
    lam = torch.rand(64, generator=g)
    out = soft_ce(logits, Mixed(logits, a, b, lam))
    assert out.dtype == torch.float32
    logp = F.log_softmax(logits.double(), dim=1)  # float64, from the same bf16 values
    lam64 = lam.double()
    ref = -(lam64 * logp[range(64), a] + (1 - lam64) * logp[range(64), b]).mean()
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["ce", "mixup", "icm_cutmix", "icm_remix"])
def test_last_targets_are_the_mixed_batch_s_triples(name):
    # what the trainer's duplicate share reads between steps: the very (a, b, lam) the loss got
    model, x, y = _setup()
    objective = Objective(ObjectiveConfig(name=name), class_counts=torch.tensor([5, 1, 9, 2, 3]))
    assert objective.last_targets is None and objective.duplicate_share() is None
    ctx = MixContext(6, 1, group_size=4)
    objective(model, x, y, ctx)
    a, b, lam = objective.last_targets
    if name == "ce":
        expected = (y, y, torch.ones(8))
    else:
        mixed = objective.mix(x, y, ctx)
        expected = (mixed.a, mixed.b, mixed.lam)
        assert not torch.equal(mixed.b, y)  # partners were drawn
    for got, want in zip((a, b, lam), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["cutmix", "regmixup", "remix"])
def test_each_ic_variant_is_icm_loss_of_its_method_s_batch(method):
    # the paper's IC-CutMix, IC-RegMixup and IC-Remix: the method's mixing (and RegMixup's clean
    # cross-entropy), with icm_loss in place of the soft-label cross-entropy
    model, x, y = _setup()
    counts = torch.tensor([1000, 1, 1, 1, 1])
    ic = Objective(ObjectiveConfig(name=f"icm_{method}", group_size=4), class_counts=counts)
    plain = Objective(ObjectiveConfig(name=method, group_size=4), class_counts=counts)
    ctx = MixContext(2, 3, group_size=4)
    loss, _ = ic(model, x, y, ctx)
    mixed = ic.mix(x, y, ctx)
    assert torch.equal(mixed.x, plain.mix(x, y, ctx).x)  # the method's own mixing
    if method == "cutmix":
        assert 0 < mixed.lam[0] < 1 and (mixed.x != x).any()  # a real box was pasted
    expected = icm_loss(model(mixed.x), mixed.a, mixed.b, mixed.lam)
    if method == "regmixup":
        expected = F.cross_entropy(model(x), y) + expected
    assert torch.allclose(loss, expected, rtol=1e-6)
    # negative control: the non-IC method's loss on the same batch is another number
    assert not torch.allclose(plain(model, x, y, ctx)[0], loss, rtol=1e-3)


def test_remix_uses_the_decoupled_label_weight():
    model, x, y = _setup()
    counts = torch.tensor([1000, 1, 1, 1, 1])
    objective = Objective(ObjectiveConfig(name="icm_remix", alpha=0.2), class_counts=counts)
    mixed = objective.mix(x, y, MixContext(0, 0))
    plain = mixup(x, y, alpha=0.2, ctx=MixContext(0, 0))
    assert torch.equal(mixed.x, plain.x)  # inputs mixed with λ ...
    assert torch.equal(mixed.lam, remix_lam(plain.lam, plain.a, plain.b, counts))  # labels not
    assert not torch.equal(mixed.lam, plain.lam)


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="unknown loss 'mixupp'"):
        ObjectiveConfig(name="mixupp")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ObjectiveConfig(alpha=-1.0)
    with pytest.raises(ValueError, match="class counts"):
        Objective(ObjectiveConfig(name="remix"))


def test_cuda_graph_option_is_the_eager_loss_off_cuda():
    """``loss.cuda_graph`` (default on) changes nothing where graphs cannot run: on the CPU the
    objective's loss is the eager one and nothing is captured (the CUDA side: test_gpu.py)."""
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 5, (16,))
    obj = Objective(ObjectiveConfig(name="icm_mixup"), validate=False)
    assert isinstance(obj.loss_fn, GraphedLoss)
    mixed = obj.mix(x, y, MixContext(seed=0, step=0))
    logits = torch.randn(16, 5, requires_grad=True)
    loss = obj.mixed_loss(logits, mixed)
    assert obj.loss_fn.captured == 0
    assert torch.equal(loss, icm_loss(logits, mixed.a, mixed.b, mixed.lam))
    checked = Objective(ObjectiveConfig(name="icm_mixup"))  # validate=True: never graphed
    assert not isinstance(checked.loss_fn, GraphedLoss)


def test_graphed_loss_hands_back_a_gradient_of_its_own():
    """The gradient leaving a graphed loss is a copy, not a buffer the next replay overwrites:
    the identity in front of the graphs passes a clone back (checked on the CPU here; the
    replays themselves in test_gpu.py)."""
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    arriving = []  # where the gradient arriving at the identity lives (a leaf could keep it)
    out = graphs._OwnGradient.apply(x)
    out.register_hook(lambda g: arriving.append(g.data_ptr()))
    (out * w).sum().backward()
    assert torch.equal(x.grad, w)
    assert x.grad.data_ptr() != arriving[0]


def test_graphed_loss_runs_eagerly_after_a_failed_capture(monkeypatch):
    """A capture that raises (as one did once on an H200, see graphs.py) warns once and leaves
    that shape to the eager loss instead of ending the run. The failure is injected here: the
    CPU cannot capture; the replays themselves are in test_gpu.py."""
    calls = []

    def fail(fn, samples):
        calls.append(samples[0].shape)
        raise torch.AcceleratorError("CUDA error: operation failed due to a previous error")

    monkeypatch.setattr(graphs, "usable", lambda logits, **config: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fail)
    obj = Objective(ObjectiveConfig(name="icm_mixup"), validate=False)
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 5, (16,))
    for step in range(3):
        mixed = obj.mix(x, y, MixContext(seed=0, step=step))
        logits = torch.randn(16, 5, requires_grad=True)
        if step == 0:
            with pytest.warns(RuntimeWarning, match="CUDA graphs failed .* eager loss"):
                loss = obj.mixed_loss(logits, mixed)
        else:
            loss = obj.mixed_loss(logits, mixed)
        assert torch.equal(loss, icm_loss(logits, mixed.a, mixed.b, mixed.lam))
        loss.backward()
        assert logits.grad is not None
    assert calls == [(16, 5)] and obj.loss_fn.captured == 0  # tried once, not every step


@pytest.mark.parametrize(
    "change,expected",
    [
        ({}, True),  # the default ICM loss on one process: the configuration the gpu tests check
        ({"world": 2}, False),  # collectives are not captured
        ({"dedup": True}, False),  # its grouping reads a size back from the device
        ({"tile": 256}, False),
        ({"tile": "auto"}, True),  # 3 x 512 x 512 floats: untiled
        ({"classes": 4096}, True),  # on CUDA "auto" keeps the dense Ỹ up to 4,096 classes
        ({"classes": 4097}, False),  # the gather form: its backward adds up with atomics
        ({"rows": 4097}, False),  # more than 2^24 entries of S̃ would stay allocated
        ({"rows": 4096}, True),
    ],
)
def test_graphs_only_for_the_configurations_they_replay_exactly(change, expected):
    config = {"world": 1, "dedup": False, "tile": 0, "rows": 512, "classes": 10} | change
    assert graphs.eligible(**config) is expected


@pytest.mark.parametrize(
    "change,expected",
    [
        ({}, True),  # one GPU: what the gpu tests check
        ({"device": "cpu"}, False),
        ({"world": 2}, False),  # DDP's gradient hooks are collectives
        ({"zero_stage": 2}, False),
        ({"compile": True}, False),
    ],
)
def test_the_model_is_graphed_only_on_one_gpu_without_zero_or_compile(change, expected):
    where = {"device": "cuda", "world": 1, "zero_stage": 0, "compile": False} | change
    assert graphs.model_eligible(**where) is expected


def test_no_collection_collects_first_and_holds_the_collector_off_during_a_capture():
    # graphs._no_collection: a dead cycle holding an old CUDA graph must not be collected
    # mid-capture (that invalidated the second capture of a process on an H200)
    import gc
    import weakref

    from dist_icm.graphs import _no_collection

    class Cycle:
        pass

    dead = Cycle()
    dead.me = dead
    alive = weakref.ref(dead)
    del dead
    was = gc.isenabled()
    gc.enable()
    try:
        with _no_collection():
            assert alive() is None  # collected before the capture
            assert not gc.isenabled()  # and no collection during it
        assert gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()
