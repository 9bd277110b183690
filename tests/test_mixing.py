"""Mixing: λ distribution, partners in groups, rank-free randomness, CutMix area, Remix rule."""

import numpy as np
import pytest
import torch
from scipy import stats

from dist_icm import streams
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


def test_remix_keeps_lambda_on_the_tau_boundary():
    # the rule is strict: λ = τ (a the majority) and 1 - λ = τ (b the majority) are not below
    # τ, so the label keeps λ; a rule with <= would hand these rows to the minority class
    counts = torch.tensor([300, 100, 10])
    a, b = torch.tensor([0, 1, 2, 1]), torch.tensor([1, 0, 0, 2])
    for tau, lam in ((0.5, [0.5, 0.5, 0.5, 0.5]), (0.25, [0.25, 0.75, 0.75, 0.25])):
        lam = torch.tensor(lam, dtype=torch.float64)  # dyadic: 1 - 0.75 == 0.25 exactly
        assert remix_lam(lam, a, b, counts, tau=tau, kappa=3.0).tolist() == lam.tolist()
    # just inside the boundary the rule does apply (rows 0 and 3: λ < τ; 1 and 2: 1 - λ < τ)
    lam = torch.tensor([0.24, 0.76, 0.76, 0.24], dtype=torch.float64)
    assert remix_lam(lam, a, b, counts, tau=0.25, kappa=3.0).tolist() == [0.0, 1.0, 1.0, 0.0]


def test_partners_and_per_sample_lambdas_change_from_step_to_step():
    # the group stream is keyed by the step: keyed by a constant, every step would pair the
    # same samples with the same weights
    ctx = [MixContext(seed=5, step=s, group_size=8) for s in (0, 1)]
    assert not np.array_equal(partners(16, ctx[0]), partners(16, ctx[1]))
    lam = [draw_lam(1.0, 16, c, per_sample=True) for c in ctx]
    assert not np.array_equal(lam[0], lam[1])
    assert np.array_equal(draw_lam(1.0, 16, ctx[1], per_sample=True), lam[1])  # yet seeded


def test_per_sample_lambdas_follow_their_group_s_permutation_in_its_stream():
    # the layout of the group stream, pinned: permutation first, then the group's λs, so the
    # λs (and with them every run's targets) stay as they were. Drawn straight after the
    # stream's start, the λs would be other numbers (the negative control below).
    ctx = MixContext(seed=2, step=3, group_size=4, first_group=5)
    lam = draw_lam(0.4, 12, ctx, per_sample=True)
    perm = partners(12, ctx)
    for k in range(3):
        rng = streams.rng("mix_group", 2, 3, 5 + k)
        assert np.array_equal(perm[4 * k : 4 * k + 4], rng.permutation(4) + 4 * k)
        assert np.array_equal(lam[4 * k : 4 * k + 4], rng.beta(0.4, 0.4, 4))
        fresh = streams.rng("mix_group", 2, 3, 5 + k).beta(0.4, 0.4, 4)
        assert not np.array_equal(lam[4 * k : 4 * k + 4], fresh)


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
