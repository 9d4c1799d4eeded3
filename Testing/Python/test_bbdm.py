"""The mathematics of HiDiff's binary Bernoulli diffusion (MedSegSuiteLib.networks.bbdm)."""

from __future__ import annotations

import math

import pytest
import torch

from MedSegSuiteLib.networks.bbdm import (
    BBDM,
    BernoulliSchedule,
    bernoulli_kl,
    labels_from_probabilities,
    mask_to_channels,
    prior_from_logits,
    soften_prior,
)

# specs/hidiff.md §1.6, alpha-bar for T = 10 (4 decimals)
SPEC_ALPHA_BARS = {
    "cosine": [0.9859, 0.9480, 0.8871, 0.8047, 0.7027, 0.5838, 0.4507, 0.3067, 0.1552, 0.0002],
    "cosine2": [0.9721, 0.8987, 0.7869, 0.6475, 0.4938, 0.3408, 0.2031, 0.0940, 0.0241, 0.0],
}


def _within_standard_errors(mean: torch.Tensor, prob: torch.Tensor, n: int, n_se: float = 5.0) -> bool:
    """|empirical - expected| <= n_se standard errors of a Bernoulli mean over n draws (plus float slack)."""
    se = torch.sqrt(prob * (1 - prob) / n)
    return bool(((mean - prob).abs() <= n_se * se + 1e-6).all())


@pytest.mark.parametrize("kind", ["cosine", "cosine2"])
def test_schedule_alpha_bars_match_spec_table_to_4_decimals(kind):
    sched = BernoulliSchedule(kind, num_steps=10)
    assert sched.alpha_bars.dtype == torch.float64
    got = [round(float(v), 4) for v in sched.alpha_bars]
    assert got == pytest.approx(SPEC_ALPHA_BARS[kind], abs=1e-12)
    assert torch.allclose(sched.alpha_bars, torch.cumprod(1 - sched.betas, 0))
    assert float(sched.alpha_bars_prev[0]) == 1.0
    assert float(sched.betas.max()) <= 0.999


def test_schedule_kind_must_be_chosen_explicitly():
    with pytest.raises(TypeError):
        BernoulliSchedule()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="kind"):
        BernoulliSchedule("linear")
    with pytest.raises(ValueError):
        BernoulliSchedule("cosine", num_steps=0)


def test_cosine_is_unsquared_and_cosine2_is_squared():
    s = 0.008
    f = math.cos((0.1 + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)
    assert float(BernoulliSchedule("cosine").alpha_bars[0]) == pytest.approx(f, rel=1e-12)
    assert float(BernoulliSchedule("cosine2").alpha_bars[0]) == pytest.approx(f**2, rel=1e-12)


@pytest.mark.parametrize("kind", ["cosine", "cosine2"])
def test_closed_form_marginal_equals_iterated_one_step_chain(kind):
    bbdm = BBDM(BernoulliSchedule(kind))
    gen = torch.Generator().manual_seed(0)
    n = 20000
    y0 = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]).view(1, 6, 1).expand(1, 6, n).contiguous()
    p = torch.tensor([0.1, 0.5, 0.9, 0.1, 0.5, 0.9]).view(1, 6, 1).expand(1, 6, n).contiguous()
    y = y0.clone()
    for k in range(bbdm.num_steps):
        y = bbdm.step_sample(y, p, k, gen)  # y_k from y_{k-1} (y_{-1} = y0)
        expected = bbdm.q_prob(y0, p, k)[..., 0]
        assert _within_standard_errors(y.mean(-1), expected, n), (k, y.mean(-1), expected)


def test_forward_marginal_ends_near_the_prior():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    y0 = torch.ones(1, 1, 4)
    p = torch.full((1, 1, 4), 0.3)
    assert torch.allclose(bbdm.q_prob(y0, p, 9), p, atol=2e-4)


def _bruteforce_posterior(sched: BernoulliSchedule, y0: float, yk: int, p: float, k: int) -> float:
    """P(y_{k-1}=1 | y_k, y0 ~ B(y0), p) by enumerating y0 and y_{k-1} over {0, 1}."""
    a = float(sched.alphas[k])
    ab_prev = 1.0 if k == 0 else float(sched.alpha_bars[k - 1])
    joint = {0: 0.0, 1: 0.0}
    for y0_bit, w in ((1, y0), (0, 1.0 - y0)):
        for prev in (0, 1):
            p_prev1 = ab_prev * y0_bit + (1 - ab_prev) * p
            p_prev = p_prev1 if prev == 1 else 1 - p_prev1
            p_k1 = a * prev + (1 - a) * p
            p_k = p_k1 if yk == 1 else 1 - p_k1
            joint[prev] += w * p_prev * p_k
    return joint[1] / (joint[0] + joint[1])


@pytest.mark.parametrize("kind", ["cosine", "cosine2"])
def test_posterior_equals_bayes_rule_by_brute_force(kind):
    sched = BernoulliSchedule(kind)
    bbdm = BBDM(sched)
    cases = [(y0, yk, p) for y0 in (0.0, 0.3, 1.0) for yk in (0, 1) for p in (0.05, 0.5, 0.95)]
    y0 = torch.tensor([c[0] for c in cases], dtype=torch.float64).view(1, -1, 1)
    yk = torch.tensor([c[1] for c in cases], dtype=torch.float64).view(1, -1, 1)
    p = torch.tensor([c[2] for c in cases], dtype=torch.float64).view(1, -1, 1)
    for k in range(sched.num_steps):
        got = bbdm.posterior(y0, yk, p, k).flatten()
        want = torch.tensor([_bruteforce_posterior(sched, *c, k) for c in cases], dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-12, rtol=0), k
        # same values when k is given per sample as a long tensor
        got_t = bbdm.posterior(y0, yk, p, torch.tensor([k])).flatten()
        assert torch.allclose(got_t, want, atol=1e-12, rtol=0)


def test_posterior_sums_to_one_and_marginalises_to_the_forward_marginal():
    bbdm = BBDM(BernoulliSchedule("cosine2"))
    g = torch.Generator().manual_seed(1)
    y0 = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    p = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    for k in range(1, bbdm.num_steps):
        for yk_val in (0.0, 1.0):
            yk = torch.full_like(y0, yk_val)
            post1 = bbdm.posterior(y0, yk, p, k)
            post0 = bbdm.posterior(1 - y0, 1 - yk, 1 - p, k)  # P(y_{k-1}=0) from the bit-flipped problem
            assert torch.allclose(post1 + post0, torch.ones_like(post1), atol=1e-12)
            assert bool(((post1 >= 0) & (post1 <= 1)).all())
        # sum over y_k of q(y_k | y0) q(y_{k-1}=1 | y_k, y0) = q(y_{k-1}=1 | y0)
        qk = bbdm.q_prob(y0, p, k)
        total = qk * bbdm.posterior(y0, torch.ones_like(y0), p, k) + (1 - qk) * bbdm.posterior(
            y0, torch.zeros_like(y0), p, k
        )
        assert torch.allclose(total, bbdm.q_prob(y0, p, k - 1), atol=1e-12)


def test_posterior_at_step_zero_is_the_clean_mask_without_wraparound():
    sched = BernoulliSchedule("cosine")
    bbdm = BBDM(sched)
    y0 = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1)
    yk = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 4, 1)
    p = torch.full_like(y0, 0.5)
    assert torch.equal(bbdm.posterior(y0, yk, p, 0), y0)
    # a wrap-around to alpha_bar[T-1] (~0) would mix in the prior instead
    soft = torch.full_like(y0, 0.3)
    assert float(bbdm.posterior(soft, yk, p, 0)[0, 0, 0]) == pytest.approx(
        _bruteforce_posterior(sched, 0.3, 1, 0.5, 0), abs=1e-6
    )


def test_xor_form_has_the_predicted_flip_rate():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    g = torch.Generator().manual_seed(2)
    n = 40000
    y0 = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 4, 1).expand(1, 4, n).contiguous()
    p = torch.tensor([0.8, 0.2, 0.9, 0.05]).view(1, 4, 1).expand(1, 4, n).contiguous()
    for k in (0, 4, 9):
        yk = bbdm.q_sample(y0, p, k, g)
        flips = (yk != y0).float().mean(-1)
        expected = bbdm.flip_prob(y0, p, k)[..., 0]
        assert torch.allclose(expected, (1 - bbdm.schedule.abar(k)) * (p - y0).abs()[..., 0])
        assert _within_standard_errors(flips, expected, n), (k, flips, expected)


def test_calibration_is_the_soft_xor_and_the_logit_form_agrees():
    yk = torch.tensor([0.0, 1.0, 0.0, 1.0])
    logits = torch.tensor([-3.0, -3.0, 2.0, 2.0])
    eps = torch.sigmoid(logits)
    assert torch.allclose(BBDM.calibrate(yk, eps), (yk - eps).abs())
    assert torch.allclose(BBDM.calibrate_logits(yk, logits), (yk - eps).abs(), atol=1e-7)
    # no cancellation for a confident flip prediction
    assert float(BBDM.calibrate_logits(torch.tensor([1.0]), torch.tensor([-40.0]))) == 1.0
    assert float(BBDM.calibrate_logits(torch.tensor([1.0]), torch.tensor([40.0]))) > 0


def _zero_model(calls: list):
    def fn(yk, k):
        calls.append(k.clone())
        return torch.zeros_like(yk)

    return fn


def test_loss_at_zero_initialised_output_has_the_known_values():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    g = torch.Generator().manual_seed(3)
    y0 = (torch.rand(2, 3, 8, 8, generator=g) > 0.5).float()
    p = torch.rand(2, 3, 8, 8, generator=g)
    calls: list = []
    out = bbdm.training_losses(_zero_model(calls), y0, p, torch.tensor([0, 0]), generator=g)
    assert len(calls) == 1  # one refiner call per loss
    assert set(out) == {"vb", "focal", "total"}
    assert float(out["vb"]) == pytest.approx(1.0, abs=1e-6)
    assert float(out["focal"]) == pytest.approx(0.25, abs=1e-6)
    assert float(out["total"]) == pytest.approx(1.25, abs=1e-6)
    # focal is 0.25 bit at every step when eps_hat = 0.5
    out = bbdm.training_losses(_zero_model(calls), y0, p, torch.tensor([3, 9]), generator=g, reduction="none")
    assert out["focal"].shape == (2,)
    assert torch.allclose(out["focal"], torch.full((2,), 0.25), atol=1e-6)
    assert torch.allclose(out["total"], out["vb"] + out["focal"])


def test_loss_vb_for_k_positive_is_the_bernoulli_kl_of_the_posteriors_in_bits():
    bbdm = BBDM(BernoulliSchedule("cosine2"))
    g = torch.Generator().manual_seed(4)
    y0 = (torch.rand(1, 2, 6, 6, generator=g) > 0.5).float()
    p = torch.rand(1, 2, 6, 6, generator=g)
    seen = {}

    def model(yk, k):
        seen["yk"] = yk
        return torch.zeros_like(yk)

    k = torch.tensor([5])
    out = bbdm.training_losses(model, y0, p, k, generator=g)
    yk = seen["yk"]
    kl = bernoulli_kl(bbdm.posterior(y0, yk, p, 5), bbdm.posterior(torch.full_like(yk, 0.5), yk, p, 5))
    assert float(out["vb"]) == pytest.approx(float(kl.mean()) / math.log(2), rel=1e-5)


def test_loss_is_low_for_an_oracle_and_gradients_flow():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    g = torch.Generator().manual_seed(5)
    y0 = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float()
    p = (0.6 * y0 + 0.2).clamp(0, 1)
    scale = torch.tensor(12.0, requires_grad=True)

    def oracle(yk, k):
        return scale * (2 * (yk - y0).abs() - 1)  # confident, correct flip logits

    out = bbdm.training_losses(oracle, y0, p, generator=g)
    assert float(out["total"].detach()) < 0.01
    out["total"].backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_prior_from_logits_uses_sigmoid_for_one_channel_and_softmax_otherwise():
    logits1 = torch.tensor([[[[-2.0, 0.0, 3.0]]]])
    assert torch.allclose(prior_from_logits(logits1), torch.sigmoid(logits1))
    assert not torch.allclose(prior_from_logits(logits1), torch.ones_like(logits1))
    logits3 = torch.randn(2, 3, 4, 4)
    prior = prior_from_logits(logits3)
    assert torch.allclose(prior.sum(1), torch.ones(2, 4, 4))
    assert torch.allclose(prior, torch.softmax(logits3, 1))


def test_ddim_step_with_an_oracle_preserves_the_forward_marginal():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    g = torch.Generator().manual_seed(6)
    n = 40000
    y0 = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1).expand(1, 3, n).contiguous()
    p = torch.tensor([0.7, 0.3, 0.5]).view(1, 3, 1).expand(1, 3, n).contiguous()
    for k, k_next in ((9, 5), (5, 4), (3, 0)):
        yk = bbdm.q_sample(y0, p, k, g)
        y_next = bbdm.ddim_step(yk, y0, k, k_next, g)
        assert set(y_next.unique().tolist()) <= {0.0, 1.0}
        assert _within_standard_errors(y_next.mean(-1), bbdm.q_prob(y0, p, k_next)[..., 0], n)


def test_ddim_final_step_returns_the_continuous_estimate_and_keep_resets():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    yk = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])
    y0_hat = torch.tensor([[[0.2, 0.9, 0.6, 0.1]]])
    assert torch.equal(bbdm.ddim_step(yk, y0_hat, 0, -1), y0_hat)
    keep = torch.tensor([[[True, False, True, False]]])
    mask = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    out = bbdm.ddim_step(yk, y0_hat, 0, -1, keep=keep, reset_to=mask)
    assert torch.equal(out, torch.tensor([[[1.0, 0.9, 0.0, 0.1]]]))
    with pytest.raises(ValueError):
        bbdm.ddim_step(yk, y0_hat, 3, 3)
    with pytest.raises(ValueError):
        bbdm.ddim_step(yk, y0_hat, 0, -1, keep=keep)


def test_ancestral_step_samples_the_model_posterior():
    bbdm = BBDM(BernoulliSchedule("cosine2"))
    g = torch.Generator().manual_seed(7)
    n = 40000
    yk = torch.ones(1, 2, n)
    y0_hat = torch.tensor([0.2, 0.8]).view(1, 2, 1).expand(1, 2, n).contiguous()
    p = torch.full_like(yk, 0.4)
    y = bbdm.ancestral_step(yk, y0_hat, p, 4, g)
    assert _within_standard_errors(y.mean(-1), bbdm.posterior(y0_hat, yk, p, 4)[..., 0], n)
    assert torch.equal(bbdm.ancestral_step(yk, y0_hat, p, 0, g), y0_hat)


def test_start_state_is_the_exact_forward_marginal_of_the_mask():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    g = torch.Generator().manual_seed(8)
    n = 40000
    mask = torch.tensor([0.0, 1.0]).view(1, 2, 1).expand(1, 2, n).contiguous()
    prior = torch.full_like(mask, 0.6)
    y = bbdm.start_state(prior, 3, mask=mask, generator=g)
    assert _within_standard_errors(y.mean(-1), bbdm.q_prob(mask, prior, 3)[..., 0], n)
    y = bbdm.start_state(prior, 9, generator=g)  # paper start: B(prior)
    assert _within_standard_errors(y.mean(-1), prior[..., 0], n)


def test_chain_indices():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    assert bbdm.chain_indices(3) == [2, 1, 0]
    assert bbdm.chain_indices(10) == list(range(9, -1, -1))
    idx = bbdm.chain_indices(4, start=9)
    assert idx[0] == 9 and idx[-1] == 0 and len(idx) == 4 and idx == sorted(idx, reverse=True)
    assert bbdm.chain_indices(1, start=0) == [0]
    with pytest.raises(ValueError):
        bbdm.chain_indices(11)
    with pytest.raises(ValueError):
        bbdm.chain_indices(5, start=2)


def _random_model(seed: int):
    g = torch.Generator().manual_seed(seed)

    def fn(yk, k):
        return torch.randn(yk.shape, generator=g) * 2

    return fn


def test_sampling_is_reproducible_with_a_seed_and_keeps_edited_voxels():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    prior = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(9))
    mask = (prior > 0.5).float()
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[..., :3, :] = True
    seen = []

    def recording(seed):
        inner = _random_model(seed)

        def fn(yk, k):
            seen.append(yk.clone())
            return inner(yk, k)

        return fn

    idx = bbdm.chain_indices(4)
    a = bbdm.sample_ensemble(
        recording(0),
        prior,
        idx,
        mask=mask,
        keep=keep,
        ensemble=3,
        generator=torch.Generator().manual_seed(42),
        return_members=True,
    )
    b = bbdm.sample_ensemble(
        _random_model(0), prior, idx, mask=mask, keep=keep, ensemble=3, generator=torch.Generator().manual_seed(42)
    )
    c = bbdm.sample_ensemble(
        _random_model(0), prior, idx, mask=mask, keep=keep, ensemble=3, generator=torch.Generator().manual_seed(43)
    )
    assert torch.equal(a.prob, b.prob)
    assert not torch.equal(a.prob, c.prob)
    assert len(seen) == 3 * len(idx)
    for y in seen:  # every refiner input has the kept voxels at the mask
        assert torch.equal(y[keep], mask[keep])
    assert torch.equal(a.prob[keep], mask[keep])
    assert a.members.shape == (3, 1, 2, 8, 8)
    assert bool(((a.uncertainty >= 0) & (a.uncertainty <= 0.5)).all())
    assert torch.allclose(a.uncertainty, a.members.std(0, unbiased=False))
    single = bbdm.sample_ensemble(
        _random_model(0), prior, idx, mask=mask, ensemble=1, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(single.uncertainty, torch.zeros_like(single.prob))


def test_sample_reports_progress_and_rejects_bad_indices():
    bbdm = BBDM(BernoulliSchedule("cosine"))
    prior = torch.full((1, 1, 4, 4), 0.5)
    done = []
    bbdm.sample_ensemble(_random_model(1), prior, [2, 1, 0], ensemble=2, callback=lambda d, t: done.append((d, t)))
    assert done == [(i, 6) for i in range(1, 7)]
    y = torch.zeros_like(prior)
    with pytest.raises(ValueError):
        bbdm.sample(_random_model(1), prior, [2, 1], y)
    with pytest.raises(ValueError):
        bbdm.sample(_random_model(1), prior, [3, 1, 0], y, sampler="ancestral")


def test_helpers_soften_prior_mask_channels_and_labels():
    prior = torch.tensor([[[[0.9, 0.1]]]])
    mask = torch.tensor([[[[0.0, 1.0]]]])
    soft = soften_prior(prior, mask, weight=0.5, eps=0.02)
    assert torch.allclose(soft, torch.tensor([[[[0.5 * 0.9 + 0.5 * 0.02, 0.5 * 0.1 + 0.5 * 0.98]]]]))
    assert bool(((soft > 0) & (soft < 1)).all())
    labels = torch.tensor([[[0, 2], [1, 0]]])
    onehot = mask_to_channels(labels, 3)
    assert onehot.shape == (1, 3, 2, 2) and torch.equal(onehot.argmax(1), labels)
    assert torch.equal(mask_to_channels(labels, 1)[:, 0], (labels > 0).float())
    with pytest.raises(ValueError):
        mask_to_channels(labels, 2)
    assert torch.equal(labels_from_probabilities(onehot), labels)
    assert torch.equal(labels_from_probabilities(torch.tensor([[[[0.2, 0.7]]]])), torch.tensor([[[0, 1]]]))
