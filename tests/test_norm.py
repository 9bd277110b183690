"""Ghost batch norm (model.bn_group) on one process against torch's BatchNorm."""

import pytest
import torch
from torch import nn

from dist_icm.models import build_model
from dist_icm.norm import GhostBatchNorm, convert_ghost_bn, count_batch_norms


def _bn(group=None, channels=4, momentum=0.1):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    return bn if group is None else convert_ghost_bn(bn, group)


def test_one_group_of_the_whole_batch_is_batch_norm():
    x = torch.randn(16, 4, 5, 5, dtype=torch.float64) * 3 + 1
    bn, ghost = _bn().double(), _bn(16).double()
    assert isinstance(ghost, GhostBatchNorm) and ghost.group == 16
    for _ in range(3):
        assert torch.allclose(ghost(x), bn(x), rtol=1e-12, atol=1e-12)
    assert torch.allclose(ghost.running_mean, bn.running_mean, rtol=1e-12)
    assert torch.allclose(ghost.running_var, bn.running_var, rtol=1e-12)
    bn.eval(), ghost.eval()
    assert torch.allclose(ghost(x), bn(x), rtol=1e-12, atol=1e-12)


def test_groups_are_normalised_on_their_own():
    # a batch of 4 groups gives what each group gives alone, in any split: the reason BN
    # models become world-size invariant (a rank holds whole groups of the global batch)
    x = torch.randn(16, 4, 3, 3, dtype=torch.float64)
    whole = _bn(4).double()
    out = whole(x)
    halves = _bn(4).double()
    split = torch.cat([halves(x[:8]), halves(x[8:])])
    assert torch.allclose(out, split, rtol=1e-12, atol=1e-12)
    for k in range(4):
        alone = _bn().double()(x[4 * k : 4 * k + 4])
        assert torch.allclose(out[4 * k : 4 * k + 4], alone, rtol=1e-12, atol=1e-12)
    # negative control: plain BN normalises the whole batch, which a split changes
    plain = _bn().double()
    assert not torch.allclose(plain(x), torch.cat([plain(x[:8]), plain(x[8:])]), atol=1e-3)


def test_without_running_statistics_eval_normalises_the_groups_as_training_does():
    x = torch.randn(12, 4, 3, 3, dtype=torch.float64)
    ghost = GhostBatchNorm(4, 3, track_running_stats=False).double()
    trained = ghost(x)
    ghost.eval()
    assert torch.equal(ghost(x), trained)
    with pytest.raises(ValueError, match="must divide the batch"):
        ghost(x[:5])
    # with them (the usual), eval is BatchNorm's with the running statistics
    tracked = _bn(3).double().eval()
    plain = _bn().double().eval()
    assert torch.equal(tracked(x), plain(x))


def test_running_statistics_are_the_mean_over_groups():
    x = torch.randn(12, 4, 3, 3, dtype=torch.float64)
    ghost = _bn(3, momentum=1.0).double()  # momentum 1: the running stats are the last batch's
    ghost(x)
    groups = x.view(4, 3, 4, 3, 3)
    mean = groups.mean(dim=(1, 3, 4)).mean(0)
    var = groups.var(dim=(1, 3, 4), unbiased=True).mean(0)
    assert torch.allclose(ghost.running_mean, mean, rtol=1e-12)
    assert torch.allclose(ghost.running_var, var, rtol=1e-12)
    assert int(ghost.num_batches_tracked) == 1


def test_gradients_flow_and_low_precision_comes_back_in_kind():
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    ghost = _bn(2)
    ghost(x).square().sum().backward()
    assert x.grad is not None and ghost.weight.grad is not None
    assert ghost(x.detach().bfloat16()).dtype == torch.bfloat16
    gc = convert_ghost_bn(nn.BatchNorm2d(2), 2).double()
    inp = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gc, (inp,))


def test_conversion_keeps_weights_and_replaces_every_batch_norm():
    torch.manual_seed(1)
    model = build_model("cifar_resnet18", 10, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = count_batch_norms(model)
    model = convert_ghost_bn(model, 8)
    ghosts = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == n_bn == 20
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_group_that_does_not_divide_the_batch_is_refused():
    ghost = _bn(3)
    with pytest.raises(ValueError, match="bn_group=3 must divide"):
        ghost(torch.randn(8, 4, 2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        GhostBatchNorm(4, 0)
    ghost.eval()
    assert ghost(torch.randn(8, 4, 2, 2)).shape == (8, 4, 2, 2)  # eval: running statistics


def test_cumulative_running_statistics_match_batch_norm_over_several_steps():
    # momentum=None: BatchNorm's cumulative average, weight 1/t on the t-th batch; a weight of
    # 1/(t + 1) would keep part of the initial statistics (0 and 1) for good
    bn, ghost = _bn(momentum=None).double(), _bn(8, momentum=None).double()
    g = torch.Generator().manual_seed(3)
    for step in range(4):  # a different batch each step, or any average would agree
        x = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * (step + 1) + step
        assert torch.allclose(ghost(x), bn(x), rtol=1e-12, atol=1e-12)
        assert torch.allclose(ghost.running_mean, bn.running_mean, rtol=1e-12, atol=1e-14)
        assert torch.allclose(ghost.running_var, bn.running_var, rtol=1e-12)
    assert int(ghost.num_batches_tracked) == int(bn.num_batches_tracked) == 4


def test_bf16_input_is_normalised_with_float32_statistics():
    # bf16 activations far from zero (~N(20, 0.5)): the mean and variance are taken in float32,
    # so the output is the float64 result rounded once to bf16 (measured: max error 0.0075 at
    # outputs up to ~3.4, bf16's half spacing there). Statistics taken in bf16 itself, whose
    # spacing at 20 is 0.125, were off by 0.05-0.14 and the running mean lost its digits.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 4, 6, 6, generator=g, dtype=torch.float64) * 0.5 + 20).bfloat16()
    ghost = GhostBatchNorm(4, 8)
    out = ghost(x)
    assert out.dtype == torch.bfloat16
    groups = x.double().view(2, 8, 4, 6, 6)
    var, mean = torch.var_mean(groups, dim=(1, 3, 4), keepdim=True, correction=0)
    ref = ((groups - mean) / torch.sqrt(var + ghost.eps)).view(x.shape)
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=2**-10)
    torch.testing.assert_close(
        ghost.running_mean.double(), 0.1 * mean.mean(dim=(0, 1, 3, 4)), rtol=1e-5, atol=0
    )


def test_converting_a_model_in_eval_mode_keeps_it_in_eval_mode():
    # a converted layer starts out in training mode unless it takes the original's mode: it
    # would then normalise with the batch's statistics (and update the running ones) in eval
    bn = _bn()
    bn(torch.randn(8, 4, 3, 3) * 2 + 1)  # running statistics away from (0, 1)
    model = torch.nn.Sequential(torch.nn.Identity(), bn).eval()
    x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    ghost = convert_ghost_bn(model, 4)
    assert isinstance(ghost[1], GhostBatchNorm)
    assert not ghost.training and not ghost[1].training
    assert torch.equal(ghost(x), expected)
    assert torch.equal(ghost[1].running_mean, stats[0])
    assert torch.equal(ghost[1].running_var, stats[1])
    assert not convert_ghost_bn(_bn().eval(), 4).training  # a BN layer converted itself too
    assert convert_ghost_bn(_bn().train(), 4).training  # a training layer stays in training
