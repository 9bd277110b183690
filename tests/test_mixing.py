"""Mixing: λ distribution, partners in groups, rank-free randomness, CutMix area, Remix rule."""

import numpy as np
import pytest
import torch
from scipy import stats

from dist_icm.mixing import MixContext, cutmix, draw_lam, mixup, partners, remix_lam


def test_per_batch_lambda_follows_beta():
    alpha = 0.2
    lams = np.array([draw_lam(alpha, 4, MixContext(seed=1, step=s))[0] for s in range(3000)])
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 1e-6  # the test can fail


def test_per_sample_lambda_follows_beta_and_varies():
    lam = draw_lam(20.0, 4000, MixContext(seed=0, step=0, group_size=40), per_sample=True)
    assert len(np.unique(lam)) == 4000
    assert stats.kstest(lam, stats.beta(20.0, 20.0).cdf).pvalue > 1e-3


def test_partners_permute_within_groups():
    perm = partners(12, MixContext(seed=3, step=5, group_size=4))
    for k in range(3):
        assert sorted(perm[4 * k : 4 * k + 4]) == list(range(4 * k, 4 * k + 4))


@pytest.mark.parametrize("per_sample", [False, True])
def test_global_batch_is_the_same_on_one_or_three_ranks(per_sample):
    x = torch.randn(12, 3, 4, 4)
    y = torch.arange(12) % 5
    one = mixup(x, y, alpha=1.0, ctx=MixContext(7, 2, group_size=2), per_sample=per_sample)
    parts = [
        mixup(
            x[4 * r : 4 * r + 4],
            y[4 * r : 4 * r + 4],
            alpha=1.0,
            ctx=MixContext(7, 2, group_size=2, first_group=2 * r),
            per_sample=per_sample,
        )
        for r in range(3)
    ]
    for field in ("x", "a", "b", "lam"):
        assert torch.equal(getattr(one, field), torch.cat([getattr(p, field) for p in parts]))


def test_cutmix_s_global_batch_is_the_same_on_one_or_three_ranks():
    # the box, λ and partners too are drawn from the step and the group, not from the rank
    x = torch.randn(12, 3, 8, 8)
    y = torch.arange(12) % 5
    one = cutmix(x, y, alpha=1.0, ctx=MixContext(7, 2, group_size=2))
    parts = [
        cutmix(x[4 * r : 4 * r + 4], y[4 * r : 4 * r + 4], alpha=1.0,
               ctx=MixContext(7, 2, group_size=2, first_group=2 * r))
        for r in range(3)
    ]  # fmt: skip
    assert not torch.equal(one.x, x)  # a box was pasted
    for field in ("x", "a", "b", "lam"):
        assert torch.equal(getattr(one, field), torch.cat([getattr(p, field) for p in parts]))
    # negative control: ranks that all count their groups from 0 draw other partners
    alike = [cutmix(x[4 * r : 4 * r + 4], y[4 * r : 4 * r + 4], alpha=1.0,
                    ctx=MixContext(7, 2, group_size=2)) for r in range(3)]  # fmt: skip
    assert not torch.equal(one.x, torch.cat([p.x for p in alike]))


def test_mixup_is_deterministic_under_a_seed_and_mixes_inputs():
    x, y = torch.randn(8, 2), torch.arange(8)
    m1 = mixup(x, y, alpha=0.4, ctx=MixContext(0, 9))
    m2 = mixup(x, y, alpha=0.4, ctx=MixContext(0, 9))
    m3 = mixup(x, y, alpha=0.4, ctx=MixContext(1, 9))
    assert torch.equal(m1.x, m2.x) and torch.equal(m1.b, m2.b)
    assert not torch.equal(m1.b, m3.b)
    lam = m1.lam[:, None]
    assert torch.allclose(m1.x, lam * x + (1 - lam) * x[m1.b], atol=1e-6)  # b = y[perm] = perm
    assert torch.equal(m1.a, y)


@pytest.mark.parametrize("step", range(20))
def test_cutmix_pasted_area_is_one_minus_lam(step):
    n, h, w = 6, 13, 11
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    y = torch.arange(n)
    m = cutmix(x, y, alpha=1.0, ctx=MixContext(4, step))
    for i in range(n):
        if m.b[i] == i:
            continue  # paired with itself: nothing visible changes
        pasted = (m.x[i, 0] == m.b[i].float()).sum().item()
        assert pasted == pytest.approx((1 - m.lam[i].item()) * h * w, abs=1e-3)
        assert torch.all((m.x[i, 0] == i) | (m.x[i, 0] == m.b[i].float()))


def test_remix_rule_table():
    counts = torch.tensor([300, 100, 90, 10])
    a = torch.tensor([0, 0, 1, 1, 3, 3, 0, 1])
    b = torch.tensor([1, 1, 2, 2, 0, 0, 3, 0])
    lam = torch.tensor([0.3, 0.7, 0.3, 0.7, 0.8, 0.3, 0.49, 0.8], dtype=torch.float64)
    out = remix_lam(lam, a, b, counts, tau=0.5, kappa=3.0)
    # 0/1: ratio 3 >= κ and λ < τ -> 0; λ >= τ -> λ; 1/2: ratio 1.1 -> λ;
    # 3/0: ratio 1/30 <= 1/κ and 1-λ < τ -> 1, else λ; 0/3: ratio 30, λ .49 < τ -> 0;
    # 1/0: ratio 1/3 <= 1/κ and 1 - .8 < τ -> 1
    assert out.tolist() == [0.0, 0.7, 0.3, 0.7, 1.0, 0.3, 0.0, 1.0]


def test_bad_values_fail_clearly():
    x, y = torch.randn(6, 2), torch.arange(6)
    with pytest.raises(ValueError, match="must divide"):
        mixup(x, y, alpha=1.0, ctx=MixContext(0, 0, group_size=4))
    with pytest.raises(ValueError, match="α must be > 0"):
        mixup(x, y, alpha=0.0, ctx=MixContext(0, 0))
    with pytest.raises(ValueError, match="image batches"):
        cutmix(x, y, alpha=1.0, ctx=MixContext(0, 0))
    with pytest.raises(ValueError, match="κ >= 1"):
        remix_lam(torch.rand(2), y[:2], y[:2], torch.ones(6), kappa=0.5)


def test_bf16_images_and_their_targets_take_the_same_lambda():
    # DeepSpeed's bf16 inputs: the images were mixed with λ rounded to bf16, the targets (soft
    # CE, the ICM triples) with the float32 λ: 0.5830550 against 0.5820312
    x = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)]).to(torch.bfloat16)
    mixed = mixup(x, torch.tensor([0, 1]), alpha=20.0, ctx=MixContext(0, 0, 2))
    assert mixed.lam.dtype == torch.float32
    assert mixed.x[0].float().mean().item() == mixed.lam[0].item()  # row 0: ones over zeros
    assert mixed.lam[0].item() == pytest.approx(0.5820312, abs=1e-7)  # the draw, rounded
