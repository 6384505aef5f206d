"""Numerical proofs of ddpm.py against the paper's derivations, checked with scipy.

Every reference value here is computed independently (numpy/scipy) from the
paper's formulas; ddpm.py's tables are never used to check themselves. All math
is float64. Monte Carlo tests use fixed seeds and tolerances of a few standard errors.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st
from scipy import integrate, optimize, stats

from ddpm import Diffusion, discretized_gaussian_log_likelihood, linear_betas, normal_kl, rate_distortion

F64 = torch.float64


@st.composite
def schedules(draw, min_T=1, max_T=1000):
    """A random valid schedule: increasing betas in (0, 1), returned as numpy float64."""
    T = draw(st.integers(min_T, max_T))
    lo = draw(st.floats(1e-5, 0.05))
    hi = draw(st.floats(lo, 0.9))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.sort(np.random.default_rng(seed).uniform(lo, hi, T))


def ref_alpha_bar(betas):
    """alpha_bar_0..alpha_bar_T straight from Eq. 4, in numpy."""
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)])


def t64(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def const_eps(value):
    """An eps_model that ignores its input (lets a test choose eps_theta)."""
    return lambda x, t: torch.full_like(x, value)


# 1. Closed form vs iterated noising (Eq. 2 iterated == Eq. 4) ------------------------------
@given(schedules(), st.floats(-3, 3))
def test_eq4_equals_iterated_eq2_moments(betas, x0):
    """Iterating Eq. 2: m_t = sqrt(alpha_t) m_{t-1}, v_t = alpha_t v_{t-1} + beta_t, from (x0, 0)."""
    d = Diffusion(betas)
    m, v = x0, 0.0
    for t, beta in enumerate(betas, start=1):
        m, v = math.sqrt(1 - beta) * m, (1 - beta) * v + beta
        mean, var = d.q_mean_var(t64([x0]), t)
        assert abs(mean.item() - m) < 1e-12 and abs(var.item() - v) < 1e-12


@given(schedules(min_T=2))
def test_variance_identity_and_the_false_one(betas):
    a_bar = d_a_bar = Diffusion(betas).alpha_bar.numpy()
    assert np.allclose(d_a_bar, ref_alpha_bar(betas), rtol=1e-13, atol=0)
    alpha = 1 - betas
    lhs = 1 - a_bar[1:]
    assert np.abs(lhs - (alpha * (1 - a_bar[:-1]) + betas)).max() < 1e-13
    # A seed note's 1 - a_bar_t = (1 - a_bar_{t-1}) + beta_t is off by beta_t (1 - a_bar_{t-1}).
    assert np.abs(lhs - ((1 - a_bar[:-1]) + betas)).max() > 1e-11


@pytest.mark.parametrize("betas", [linear_betas(1000).numpy(), np.linspace(0.01, 0.3, 20)])
def test_iterated_noising_matches_eq4_statistically(betas):
    """Chains noised step by step with the code's Eq. 2 follow Eq. 4 (KS test) with Cov(x_s, x_t) right."""
    d, a_bar, n, x0 = Diffusion(betas), ref_alpha_bar(betas), 20000, 0.7
    T, s = len(betas), len(betas) // 3
    g = torch.Generator().manual_seed(0)
    x, x_s = torch.full((n,), x0, dtype=F64), None
    for t in range(1, T + 1):
        x = d.q_step_sample(x, t, torch.randn(n, generator=g, dtype=F64))
        if t == s:
            x_s = x.clone()
    x, x_s = x.numpy(), x_s.numpy()
    for sample, t in ((x_s, s), (x, T)):
        p = stats.kstest(sample, stats.norm(math.sqrt(a_bar[t]) * x0, math.sqrt(1 - a_bar[t])).cdf).pvalue
        assert p > 1e-3, (t, p)
    # Cov(x_s, x_t) = sqrt(a_bar_t / a_bar_s) (1 - a_bar_s) for s < t.
    cov = np.cov(x_s, x)[0, 1]
    expected = math.sqrt(a_bar[T] / a_bar[s]) * (1 - a_bar[s])
    se = math.sqrt(((x_s - x_s.mean()) ** 2 * (x - x.mean()) ** 2).mean() / n)
    assert abs(cov - expected) < 4 * se


# 2. Posterior (Eqs. 6-7) vs the normalised product q(x_t|x_{t-1}) q(x_{t-1}|x_0) -----------
@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@given(schedules(min_T=2), st.data(), st.floats(-1, 1), st.floats(-3, 3))
def test_posterior_is_normalised_gaussian_product(betas, data, x0, xt):
    t = data.draw(st.integers(2, len(betas)))
    a_bar, beta = ref_alpha_bar(betas), betas[t - 1]

    def log_f(y):  # unnormalised log q(x_t | x_{t-1}=y) + log q(x_{t-1}=y | x_0)
        return (stats.norm.logpdf(xt, math.sqrt(1 - beta) * y, math.sqrt(beta))
                + stats.norm.logpdf(y, math.sqrt(a_bar[t - 1]) * x0, math.sqrt(1 - a_bar[t - 1])))

    y_star = optimize.minimize_scalar(lambda y: -log_f(y), bracket=(-5, 5), tol=1e-12).x
    width = 40 * min(math.sqrt(beta / (1 - beta)), math.sqrt(1 - a_bar[t - 1]))
    moment = lambda k: integrate.quad(lambda y: y**k * math.exp(log_f(y) - log_f(y_star)),
                                      y_star - width, y_star + width, points=[y_star],
                                      epsabs=0, epsrel=1e-12, limit=200)[0]
    z = moment(0)
    mean = moment(1) / z
    var = moment(2) / z - mean**2
    mu, v, _ = Diffusion(betas).q_posterior(t64([x0]), t64([xt]), t)
    assert mu.item() == pytest.approx(mean, abs=1e-8 * width)
    assert v.item() == pytest.approx(var, rel=1e-5, abs=1e-12)


@given(schedules(min_T=2), st.data(), st.floats(-1, 1), st.floats(-3, 3), st.floats(-3, 3))
def test_posterior_is_bayes_rule_pointwise(betas, data, x0, xt, x_prev):
    t = data.draw(st.integers(2, len(betas)))
    a_bar, beta = ref_alpha_bar(betas), betas[t - 1]
    bayes = (stats.norm.logpdf(xt, math.sqrt(1 - beta) * x_prev, math.sqrt(beta))
             + stats.norm.logpdf(x_prev, math.sqrt(a_bar[t - 1]) * x0, math.sqrt(1 - a_bar[t - 1]))
             - stats.norm.logpdf(xt, math.sqrt(a_bar[t]) * x0, math.sqrt(1 - a_bar[t])))
    mu, var, log_var = Diffusion(betas).q_posterior(t64([x0]), t64([xt]), t)
    assert log_var.item() == pytest.approx(math.log(var.item()), abs=1e-12)
    assert stats.norm.logpdf(x_prev, mu.item(), math.sqrt(var.item())) == pytest.approx(bayes, abs=1e-6)


# 3. The bound: Eq. 3 (one sum) == Eq. 5 (telescoped) trajectory by trajectory --------------
def bound_along_trajectories(betas, seed, n):
    """Sample forward trajectories x_0..x_T (numpy) and an arbitrary linear eps_theta; return
    Eq. 3's single sum, Eq. 5's decomposition, and (Monte Carlo term, code's KL) pairs, in nats."""
    T, d = len(betas), Diffusion(betas)
    rng = np.random.default_rng(seed)
    a, b = t64(rng.normal(size=T + 1)), t64(rng.normal(size=T + 1))
    eps_model = lambda x, t: a[t][:, None] * x + b[t][:, None]  # any linear eps_theta
    x = [np.full(n, rng.uniform(-1, 1))]
    for beta in betas:
        x.append(math.sqrt(1 - beta) * x[-1] + math.sqrt(beta) * rng.normal(size=n))
    X = [t64(xi)[:, None] for xi in x]

    def log_p(t):  # log p_theta(x_{t-1} | x_t) with the code's mean and variance
        mean, log_var, _ = d.p_mean_var(eps_model, X[t], t)
        return stats.norm.logpdf(x[t - 1], mean[:, 0].numpy(), np.exp(0.5 * log_var[:, 0].numpy()))

    def log_q_post(t):
        mean, var, _ = d.q_posterior(X[0], X[t], t)
        return stats.norm.logpdf(x[t - 1], mean[:, 0].numpy(), np.sqrt(var[:, 0].numpy()))

    a_bar = ref_alpha_bar(betas)
    log_q_step = [None] + [stats.norm.logpdf(x[t], math.sqrt(1 - betas[t - 1]) * x[t - 1], math.sqrt(betas[t - 1]))
                           for t in range(1, T + 1)]
    log_pT = stats.norm.logpdf(x[T])
    eq3 = -log_pT - sum(log_p(t) - log_q_step[t] for t in range(1, T + 1))
    L_T = -(log_pT - stats.norm.logpdf(x[T], math.sqrt(a_bar[T]) * x[0], math.sqrt(1 - a_bar[T])))
    L_mid = [log_q_post(t) - log_p(t) for t in range(2, T + 1)]
    eq5 = L_T + sum(L_mid) - log_p(1)
    ln2 = math.log(2)
    pairs = [(L_T, d.prior_bpd(X[0]).numpy() * ln2)]
    pairs += [(L_mid[t - 2], d.vb_term_bpd(eps_model, X[0], X[t], t).numpy() * ln2) for t in range(2, T + 1)]
    return eq3, eq5, pairs


@given(schedules(min_T=2, max_T=30), st.integers(0, 2**31))
def test_elbo_telescopes(betas, seed):
    eq3, eq5, _ = bound_along_trajectories(betas, seed, 200)
    assert np.allclose(eq3, eq5, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("betas, seed", [(linear_betas(10).numpy(), 0), (np.linspace(0.01, 0.2, 20), 1),
                                         (np.array([0.03125, 0.03125]), 2)])
def test_bound_terms_average_to_their_closed_form_kl(betas, seed):
    """Each Monte Carlo term of Eq. 5 averages to the code's closed-form KL at the same x_t
    (fixed seeds; 4 standard errors, not searched by hypothesis, which would hunt the tails)."""
    _, _, pairs = bound_along_trajectories(betas, seed, 20000)
    for sample, closed in pairs:
        diff = sample - closed
        assert abs(diff.mean()) <= 4 * diff.std() / math.sqrt(len(diff)) + 1e-12


# 4. Gaussian KL ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@given(st.floats(-3, 3), st.floats(-4, 2), st.floats(-3, 3), st.floats(-4, 2))
def test_normal_kl_against_integration(m1, lv1, m2, lv2):
    p, q = stats.norm(m1, math.exp(lv1 / 2)), stats.norm(m2, math.exp(lv2 / 2))
    s1 = math.exp(lv1 / 2)
    numeric = integrate.quad(lambda y: p.pdf(y) * (p.logpdf(y) - q.logpdf(y)),
                             m1 - 30 * s1, m1 + 30 * s1, points=[m1], limit=200, epsabs=1e-13)[0]
    kl = normal_kl(*map(lambda v: t64([v]), (m1, lv1, m2, lv2))).item()
    assert kl >= 0
    assert kl == pytest.approx(numeric, rel=1e-7, abs=1e-10)
    if abs(m1 - m2) > 1e-3 or abs(lv1 - lv2) > 1e-3:
        assert kl > 1e-8
    assert normal_kl(*map(lambda v: t64([v]), (m1, lv1, m1, lv1))).item() == 0.0


# 5. Eq. 12: the KL is lambda_t ||eps - eps_theta||^2 + C ----------------------------------------
@given(schedules(min_T=2), st.data(), st.sampled_from(["beta", "beta_tilde"]),
       st.floats(-1, 1), st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3))
def test_eq12_weight(betas, data, sigma, x0, eps, e1, e2):
    assume(abs(e1 - e2) > 1e-2)
    t = data.draw(st.integers(2, len(betas)))
    d = Diffusion(betas, sigma)
    xt = d.q_sample(t64([[x0]]), t, t64([[eps]]))
    kl = lambda e: d.vb_term_bpd(const_eps(e), t64([[x0]]), xt, t).item() * math.log(2)
    a_bar, beta = ref_alpha_bar(betas), betas[t - 1]
    sigma2 = beta if sigma == "beta" else (1 - a_bar[t - 1]) / (1 - a_bar[t]) * beta
    lam = beta**2 / (2 * sigma2 * (1 - beta) * (1 - a_bar[t]))
    assert d.eq12_weight(t).item() == pytest.approx(lam, rel=1e-12)
    observed = kl(e1) - kl(e2)  # the constant C cancels
    scale = abs(lam * ((eps - e1) ** 2 + (eps - e2) ** 2)) + 1e-12
    assert observed == pytest.approx(lam * ((eps - e1) ** 2 - (eps - e2) ** 2), abs=1e-6 * scale)
    # The blog form beta_t / (2 sigma^2 alpha_t (1 - a_bar_{t-1})) does not fit.
    wrong = beta / (2 * sigma2 * (1 - beta) * (1 - a_bar[t - 1]))
    assert abs(observed - wrong * ((eps - e1) ** 2 - (eps - e2) ** 2)) > 1e-4 * scale


# 6. Eq. 11 / Eq. 15 with the true epsilon ---------------------------------------------------
@given(schedules(), st.data(), st.floats(-1, 1), st.floats(-3, 3))
def test_true_eps_gives_posterior_mean_and_recovers_x0(betas, data, x0, eps):
    t = data.draw(st.integers(1, len(betas)))
    d = Diffusion(betas)
    X0, E = t64([[x0]]), t64([[eps]])
    xt = d.q_sample(X0, t, E)
    a_bar, beta = ref_alpha_bar(betas), betas[t - 1]
    assert xt.item() == pytest.approx(math.sqrt(a_bar[t]) * x0 + math.sqrt(1 - a_bar[t]) * eps, abs=1e-12)
    assert d.predict_x0(xt, t, E).item() == pytest.approx(x0, abs=1e-9 / math.sqrt(a_bar[t]))
    mean, _, _ = d.p_mean_var(const_eps(eps), xt, t)
    mu_tilde, _, _ = d.q_posterior(X0, xt, t)
    assert mean.item() == pytest.approx(mu_tilde.item(), abs=1e-9)
    # Algorithm 2's form of Eq. 11.
    alg2 = (xt.item() - beta / math.sqrt(1 - a_bar[t]) * eps) / math.sqrt(1 - beta)
    assert mean.item() == pytest.approx(alg2, abs=1e-9)


@given(schedules(min_T=2, max_T=50), st.integers(0, 2**31))
def test_l_simple_is_zero_for_the_true_noise_and_t_is_uniform(betas, seed):
    """Algorithm 1 / Eq. 14: t ~ U{1..T}; an eps_theta that knows x_0 has zero loss."""
    d, g = Diffusion(betas), torch.Generator().manual_seed(seed)
    x0, seen = torch.rand(4000, 2, dtype=F64, generator=g) * 2 - 1, []

    def knows_x0(xt, t):
        seen.append(t)
        a_bar = d.gather("alpha_bar", t, xt)
        return (xt - a_bar.sqrt() * x0) / (1 - a_bar).sqrt()

    assert d.training_loss(knows_x0, x0, generator=g).item() < 1e-20
    counts = np.bincount(seen[0].numpy(), minlength=len(betas) + 1)
    assert counts[0] == 0 and counts.sum() == len(x0)
    assert stats.chisquare(counts[1:]).pvalue > 1e-6  # ~25 examples a run: a false alarm 1 run in 40,000
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    loss = d.training_loss(const_eps(0.0), x0, t=torch.ones(len(x0), dtype=torch.long), noise=noise)
    assert loss.item() == pytest.approx((noise**2).mean().item(), rel=1e-12)
    each = d.training_loss(const_eps(0.0), x0, t=torch.ones(len(x0), dtype=torch.long), noise=noise, per_example=True)
    assert torch.allclose(each, (noise**2).mean(1), rtol=1e-12) and each.mean().item() == pytest.approx(loss.item())
    t = d.sample_t(len(x0), torch.Generator().manual_seed(seed))  # the one place t is drawn (train.py's too)
    assert t.dtype == torch.long and t.min() >= 1 and t.max() <= len(betas)


# 7. The discretised decoder (Eq. 13) ----------------------------------------------------------
@given(st.sampled_from([256, 17, 2]), st.floats(-1.5, 1.5), st.floats(-12, 1))
def test_decoder_is_a_distribution_over_bins(levels, mean, log_var):
    bins = torch.linspace(-1, 1, levels, dtype=F64)
    logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_var), levels)
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-10)
    h, s = 1 / (levels - 1), math.exp(log_var / 2)
    edges = np.concatenate([[-np.inf], bins[:-1].numpy() + h, [np.inf]])  # edge bins reach +-inf
    lo, hi = edges[:-1], edges[1:]  # upper tail via sf: cdf differences near 1 cancel
    p = np.where(lo > mean, stats.norm.sf(lo, mean, s) - stats.norm.sf(hi, mean, s),
                 stats.norm.cdf(hi, mean, s) - stats.norm.cdf(lo, mean, s))
    ok = p > 1e-250
    assert np.allclose(logp.numpy()[ok], np.log(p[ok]), rtol=1e-6, atol=1e-9)


# 8. End-to-end oracle: data whose optimal eps_theta is known -----------------------------------
def gaussian_oracle(d, m, s):
    """E[eps | x_t] for x_0 ~ N(m, s^2): the minimiser of L_simple."""
    def eps_model(x, t):
        a_bar = d.gather("alpha_bar", t, x)
        return (1 - a_bar).sqrt() * (x - a_bar.sqrt() * m) / (a_bar * s**2 + 1 - a_bar)
    return eps_model


def gaussian_oracle_for(d, m, s):
    """The optimal output of each parameterisation for x_0 ~ N(m, s^2): E[eps | x_t], E[x_0 | x_t], or
    mu_tilde_t(x_t, E[x_0 | x_t]) (the mean of Eq. 7 is linear in x_0)."""
    def model(x, t):
        a_bar = d.gather("alpha_bar", t, x)
        x0 = m + s**2 * a_bar.sqrt() * (x - a_bar.sqrt() * m) / (a_bar * s**2 + 1 - a_bar)
        return {"eps": (x - a_bar.sqrt() * x0) / (1 - a_bar).sqrt(), "x0": x0,
                "mean": d.q_posterior(x0, x, t)[0]}[d.predict]
    return model


@pytest.mark.parametrize("sigma, predict", [("beta", "eps"), ("beta_tilde", "eps"), ("beta", "x0"), ("beta", "mean")])
def test_algorithm2_with_oracle_reproduces_gaussian_data(sigma, predict):
    d, m, s, n = Diffusion(sigma=sigma, predict=predict), 0.3, 0.5, 20000
    x = d.p_sample_loop(gaussian_oracle_for(d, m, s), (n, 1), generator=torch.Generator().manual_seed(1))
    x = x.double().squeeze(1).numpy()
    assert stats.kstest(x, stats.norm(m, s).cdf).pvalue > 1e-3
    assert abs(x.mean() - m) < 4 * s / math.sqrt(n)
    assert abs(x.var() / s**2 - 1) < 4 * math.sqrt(2 / n)


@pytest.mark.parametrize("T, margin", [(1000, 0.25), (4000, 0.08)])
def test_bound_with_oracle_is_above_entropy_and_close_to_it(T, margin):
    """Discrete data on 17 levels: Gibbs says the bound >= H(x_0); the optimal eps_theta gets close.

    The gap is the price of Gaussian reverse steps (measured with sigma^2 = beta_tilde:
    0.20 bits at T = 1000, 0.05 bits at T = 4000, above H = 3.69 bits); it shrinks as T grows.
    """
    levels, m, s, reps = 17, 0.1, 0.4, 40
    atoms = np.linspace(-1, 1, levels)
    edges = np.concatenate([[-np.inf], atoms[:-1] + 1 / (levels - 1), [np.inf]])
    probs = np.diff(stats.norm.cdf(edges, m, s))
    entropy_bits = stats.entropy(probs, base=2)
    d, A, logP = Diffusion(linear_betas(T), sigma="beta_tilde"), t64(atoms), t64(np.log(probs))

    def eps_model(x, t):  # E[eps | x_t] for the discrete data: a posterior over the 17 atoms
        a_bar = d.gather("alpha_bar", t, x)
        logw = logP - (x - a_bar.sqrt() * A) ** 2 / (2 * (1 - a_bar))
        x0_mean = (torch.softmax(logw, -1) * A).sum(-1, keepdim=True)
        return (x - a_bar.sqrt() * x0_mean) / (1 - a_bar).sqrt()

    x0 = A.repeat(reps)[:, None]
    bound = d.bound_bpd(eps_model, x0, levels=levels, generator=torch.Generator().manual_seed(2))
    per_atom = bound["total"].reshape(reps, levels)
    expected = (per_atom.mean(0).numpy() * probs).sum()
    se = math.sqrt(((per_atom.var(0).numpy() / reps) * probs**2).sum())
    assert expected >= entropy_bits - 4 * se
    assert expected - entropy_bits < margin
    assert torch.allclose(bound["total"], bound["prior"] + bound["terms"].sum(1))


def test_algorithm2_loop_matches_numpy_reference():
    """Algorithm 2 for T = 3, replayed in numpy on the same normal draws: x_T ~ N(0, I),
    then t = T..1, noise at every step but the last. Exact up to float32 rounding."""
    betas = np.array([0.1, 0.2, 0.3])
    a_bar = np.cumprod(1 - betas)
    c, shape, seen = 0.4, (5, 2), []

    def eps_model(x, t):
        seen.append(t.tolist())
        return torch.full_like(x, c)

    x = Diffusion(betas).p_sample_loop(eps_model, shape, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert seen == [[t] * shape[0] for t in (3, 2, 1)]  # every t, in order, once
    g = torch.Generator().manual_seed(0)  # the same draws, in Algorithm 2's order
    ref = torch.randn(shape, generator=g).double().numpy()
    for t in (3, 2, 1):
        beta = betas[t - 1]
        ref = (ref - beta / math.sqrt(1 - a_bar[t - 1]) * c) / math.sqrt(1 - beta)
        if t > 1:
            ref = ref + math.sqrt(beta) * torch.randn(shape, generator=g).double().numpy()
    assert np.allclose(x, ref, rtol=0, atol=1e-6)  # float32 sampling: a few ulps of |x| ~ 1


def test_bound_includes_the_decoder_term():
    """terms[:, 0] is L_0 = -log2 P(bin of x_0 | N(mu_1, beta~_2)) (the authors' decoder variance
    for sigma^2 = beta). An eps_model chosen so that mu_theta(x_1, 1) = c for every x_1 makes L_0
    deterministic (scipy reference)."""
    betas, levels, c = np.linspace(0.1, 0.3, 5), 17, 0.05
    B, A_bar = t64(betas), t64(np.cumprod(1 - betas))

    def eps_model(x, t):  # solves (x - beta / sqrt(1 - a_bar) eps) / sqrt(alpha) = c for eps
        b, ab = B[t - 1].reshape(-1, 1), A_bar[t - 1].reshape(-1, 1)
        return (x - (1 - b).sqrt() * c) * (1 - ab).sqrt() / b

    atoms = np.linspace(-1, 1, levels)
    h, s = 1 / (levels - 1), math.sqrt(betas[1] * (1 - (1 - betas[0])) / (1 - (1 - betas[0]) * (1 - betas[1])))
    lo = np.where(atoms > -1 + h, atoms - h, -np.inf)
    hi = np.where(atoms < 1 - h, atoms + h, np.inf)
    p = np.where(lo > c, stats.norm.sf(lo, c, s) - stats.norm.sf(hi, c, s),
                 stats.norm.cdf(hi, c, s) - stats.norm.cdf(lo, c, s))
    bound = Diffusion(betas).bound_bpd(eps_model, t64(atoms)[:, None], levels=levels,
                                       generator=torch.Generator().manual_seed(0))
    assert np.allclose(bound["terms"][:, 0].numpy(), -np.log2(p), rtol=1e-9, atol=0)
    rest = (bound["total"] - bound["prior"] - bound["terms"][:, 1:].sum(1)).numpy()
    assert np.allclose(rest, -np.log2(p), rtol=1e-9, atol=1e-12)


# 9. The paper's numbers for the default schedule ----------------------------------------------
def test_default_schedule_numbers():
    d = Diffusion()
    assert d.T == 1000 and d.beta[1].item() == 1e-4 and d.beta[1000].item() == 0.02
    assert d.alpha_bar[1000].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert d.alpha_bar[500].item() == pytest.approx(0.078587, rel=1e-4)
    assert d.beta_tilde[1].item() == 0.0
    assert d.beta_tilde[2].item() == pytest.approx(5.4532e-5, rel=1e-4)
    assert d.beta_tilde[1000].item() == pytest.approx(0.0199999835, rel=1e-8)
    assert d.log_beta_tilde[1].item() == pytest.approx(-9.81673, abs=1e-5)
    assert d.prior_bpd(t64([[0.0]])).item() == pytest.approx(5.9e-10, rel=0.02)
    assert d.prior_bpd(t64([[1.0]])).item() == pytest.approx(2.91e-5, rel=0.01)
    x0 = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    assert 0.5e-5 < d.prior_bpd(x0).mean().item() < 2e-5  # paper Sec. 4: L_T ~ 1e-5 bits/dim
    beta_weights = {1: 0.50005, 2: 0.27269, 10: 0.07372, 100: 0.01008, 500: 0.005503, 1000: 0.010204}
    for t, w in beta_weights.items():
        assert d.eq12_weight(t).item() == pytest.approx(w, rel=5e-4)
    tilde = Diffusion(sigma="beta_tilde")
    for t, w in {2: 0.59967, 10: 0.08644, 100: 0.01027, 500: 0.005508, 1000: 0.010205}.items():
        assert tilde.eq12_weight(t).item() == pytest.approx(w, rel=5e-4)


# 10. Regression tests for mistakes published implementations made ------------------------------
def test_no_noise_at_last_step():
    d, xt = Diffusion(), torch.randn(8, 1, 4, 4)
    a, _ = d.p_sample_step(const_eps(0.3), xt, 1, generator=torch.Generator().manual_seed(0))
    b, _ = d.p_sample_step(const_eps(0.3), xt, 1, generator=torch.Generator().manual_seed(1))
    mean, _, _ = d.p_mean_var(const_eps(0.3), xt, 1)
    assert torch.equal(a, b) and torch.equal(a, mean)
    c, _ = d.p_sample_step(const_eps(0.3), xt, 2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(c, d.p_mean_var(const_eps(0.3), xt, 2)[0])


def test_clipping_happens_before_the_posterior_mean():
    d, t = Diffusion(), 500
    xt = torch.full((1, 1), 2.0, dtype=F64)
    mean, _, x0_raw = d.p_mean_var(const_eps(-1.0), xt, t)
    mean_c, _, x0_c = d.p_mean_var(const_eps(-1.0), xt, t, clip=True)
    assert x0_raw.item() > 1 and x0_c.item() == 1.0
    assert not torch.allclose(mean, mean_c)
    assert torch.allclose(mean_c, d.q_posterior(torch.ones_like(xt), xt, t)[0])


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_decoder_log_variance_is_the_authors_log_beta_tilde_2(sigma):
    """The authors' t = 1 log-variance is log beta~_2 for both fixed choices ("fixedlarge" too,
    "to get a better decoder log likelihood"): -9.81673 for the paper's schedule; never log beta_1."""
    d = Diffusion(sigma=sigma)
    assert d.log_sigma2[1].item() == pytest.approx(-9.81673, abs=1e-5)
    log_sigma2_2 = math.log(1e-4 + (0.02 - 1e-4) / 999) if sigma == "beta" else d.log_sigma2[1].item()
    assert d.log_sigma2[2].item() == pytest.approx(log_sigma2_2, abs=1e-12)  # t = 2 is sigma_2^2 itself
    betas = np.array([0.1, 0.2, 0.3])
    beta_tilde_2 = (1 - (1 - 0.1)) / (1 - 0.9 * 0.8) * 0.2
    xt = torch.ones(2, 1, dtype=F64)
    _, log_var, _ = Diffusion(betas, sigma).p_mean_var(const_eps(0.0), xt, 1)
    assert torch.allclose(log_var, t64([[math.log(beta_tilde_2)]] * 2), rtol=1e-14)
    assert Diffusion(betas, sigma).log_sigma2[0].item() != math.log(beta_tilde_2)


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_log_variance_at_t1_is_finite_and_decoder_nll_sane(sigma):
    d = Diffusion(sigma=sigma)
    assert math.isfinite(d.log_sigma2[1].item()) and math.isfinite(d.log_beta_tilde[1].item())
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (16, 3, 8, 8), generator=g) / 127.5 - 1).double()
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    nll = d.vb_term_bpd(lambda x, t: noise, x0, d.q_sample(x0, 1, noise), 1)  # a perfect eps_theta
    assert torch.isfinite(nll).all() and (nll > 0).all() and (nll < 2.5).all()  # uniform would be 8


@given(st.integers(10, 4000))
def test_linear_schedule_scales_with_T(T):
    expected = np.minimum(np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T), 0.999)
    assert np.allclose(linear_betas(T).numpy(), expected, rtol=1e-12, atol=0)
    d = Diffusion(linear_betas(T))
    assert (d.beta[1:] < 1).all() and (d.beta[2:] >= d.beta[1:-1]).all()
    assert d.prior_bpd(t64([[1.0], [-1.0]])).max().item() < 1e-4


def test_float32_constants_close_to_float64_at_T():
    """Tolerance: half a float32 ulp (2^-24 relative), i.e. the float64 value correctly rounded."""
    d, x32 = Diffusion(), torch.zeros(1, dtype=torch.float32)
    for name in ("alpha_bar", "beta_tilde", "mu_tilde_coef_x0", "mu_tilde_coef_xt", "log_beta_tilde", "sigma2"):
        v64, v32 = getattr(d, name)[1000].item(), d.gather(name, 1000, x32).item()
        assert abs(v32 / v64 - 1) <= 2.0**-24, name


# 11. Table 2: the parameterisations of Sec. 3.2, a learned variance, and the objectives ----------
def ref_posterior(betas, t, x0, xt):
    """Eq. 7 in numpy: (mu_tilde_t(x_t, x_0), beta_tilde_t)."""
    a_bar, beta = ref_alpha_bar(betas), betas[t - 1]
    mu = (math.sqrt(a_bar[t - 1]) * beta * x0 + math.sqrt(1 - beta) * (1 - a_bar[t - 1]) * xt) / (1 - a_bar[t])
    return mu, (1 - a_bar[t - 1]) / (1 - a_bar[t]) * beta


@given(schedules(min_T=2), st.data(), st.sampled_from(["eps", "x0", "mean"]), st.booleans(),
       st.floats(-1, 1), st.floats(-3, 3))
def test_true_target_gives_the_posterior_mean_and_zero_kl(betas, data, predict, learned, x0, eps):
    """Each parameterisation's true target (eps, x_0 or mu_tilde_t) gives mu_theta = mu_tilde_t,
    x0_hat = x_0, zero KL at every t > 1 with the variance beta~_t, and zero simple loss."""
    t = data.draw(st.integers(2, len(betas)))
    d = Diffusion(betas, "learned" if learned else "beta_tilde", predict)
    X0, E = t64([[x0]]), t64([[eps]])
    xt = d.q_sample(X0, t, E)
    mu, beta_tilde = ref_posterior(betas, t, x0, xt.item())
    target = t64([[{"eps": eps, "x0": x0, "mean": mu}[predict]]])
    out = torch.cat([target, t64([[math.log(beta_tilde)]])], 1) if learned else target
    model = lambda x, s: out
    mean, log_var, x0_hat = d.p_mean_var(model, xt, t)
    assert mean.item() == pytest.approx(mu, abs=1e-9) and log_var.item() == pytest.approx(math.log(beta_tilde))
    assert x0_hat.item() == pytest.approx(x0, abs=1e-7 / math.sqrt(ref_alpha_bar(betas)[t]))
    assert abs(d.vb_term_bpd(model, X0, xt, t).item()) < 1e-9
    if not learned:
        t_batch = torch.tensor([t])
        assert d.training_loss(model, X0, t=t_batch, noise=E).item() < 1e-18


def linear_model(T, channels, seed):
    """An arbitrary network: output = a_t x + b_t per channel (a learned log-variance in [-6, -1])."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(T + 1, channels, generator=g, dtype=F64), torch.randn(T + 1, channels, generator=g, dtype=F64)
    b[:, 1:] = -6 + 5 * torch.rand(T + 1, channels - 1, generator=g, dtype=F64)
    a[:, 1:] *= 0.1
    return lambda x, t: 0.5 * a[t] * x.expand(-1, channels) + 0.3 * b[t]


@pytest.mark.parametrize("predict, sigma", [(p, s) for p in ("eps", "x0", "mean") for s in ("beta", "beta_tilde")]
                         + [("eps", "learned"), ("mean", "learned")])
def test_vlb_objective_is_an_unbiased_estimate_of_the_bound(predict, sigma):
    """E_t[T L_{t-1}] over t ~ U{1..T} (the vlb loss) = the bound of Eq. 5 minus L_T, all T terms."""
    T, levels, n, k = 10, 17, 4000, 40
    d = Diffusion(linear_betas(T), sigma, predict)
    model = linear_model(T, 2 if sigma == "learned" else 1, seed=3)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, levels, (n, 1), generator=g) * (2 / (levels - 1)) - 1).double()
    exact = d.bound_bpd(model, x0, levels, generator=g)
    exact = (exact["total"] - exact["prior"]).reshape(k, -1).mean(1)
    vlb = torch.stack([d.training_loss(model, x, generator=g, objective="vlb", levels=levels)
                       for x in x0.split(n // k)])
    se = math.sqrt(exact.var().item() / k + vlb.var().item() / k)
    assert abs(vlb.mean().item() - exact.mean().item()) < 4 * se, (vlb.mean(), exact.mean(), se)


@pytest.mark.parametrize("sigma", ["beta", "learned"])
def test_a_term_per_example_equals_the_term_at_each_t(sigma):
    """vb_term_bpd with one t per example (as the vlb loss calls it) == one call per int t: the decoder L_0
    where t = 1, the KL elsewhere."""
    T, levels = 10, 17
    d = Diffusion(linear_betas(T), sigma, "x0")
    model = linear_model(T, 2 if sigma == "learned" else 1, seed=1)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 2, 1, 7, 10, 1, 3, 2])
    x0 = (torch.randint(0, levels, (8, 1), generator=g) * (2 / (levels - 1)) - 1).double()
    xt = d.q_sample(x0, t, torch.randn(8, 1, generator=g, dtype=F64))
    per_int = torch.cat([d.vb_term_bpd(model, x0[i:i + 1], xt[i:i + 1], int(t[i]), levels) for i in range(8)])
    assert torch.allclose(d.vb_term_bpd(model, x0, xt, t, levels), per_int, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_vlb_objective_for_eps_is_eq12_through_the_loss(sigma):
    """At one t > 1, the vlb loss = T (lambda_t mean (eps - eps_theta)^2 + C_t) / ln 2 per dimension,
    C_t = (log(sigma^2 / beta~) + beta~ / sigma^2 - 1) / 2 (numpy, from Eqs. 7 and 12)."""
    T, t = 50, 17
    betas = linear_betas(T).numpy()
    d = Diffusion(betas, sigma)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(64, 3, generator=g, dtype=F64) * 2 - 1, torch.randn(64, 3, generator=g, dtype=F64)
    eps_theta = torch.randn(64, 3, generator=g, dtype=F64)
    loss = d.training_loss(lambda x, s: eps_theta, x0, t=torch.full((64,), t), noise=noise, objective="vlb")
    a_bar, beta = ref_alpha_bar(betas), betas[t - 1]
    beta_tilde = (1 - a_bar[t - 1]) / (1 - a_bar[t]) * beta
    s2 = beta if sigma == "beta" else beta_tilde
    lam = beta**2 / (2 * s2 * (1 - beta) * (1 - a_bar[t]))
    c = 0.5 * (math.log(s2 / beta_tilde) + beta_tilde / s2 - 1)
    expected = T * (lam * ((noise - eps_theta) ** 2).mean().item() + c) / math.log(2)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@given(schedules(min_T=2), st.data(), st.floats(-1, 1), st.floats(-3, 3))
def test_learned_variance_kl_is_minimised_at_beta_tilde(betas, data, x0, eps):
    """With the mean exact, the KL as a function of the raw log-variance output has its minimum
    exactly at log beta~_t (scipy's bounded minimiser)."""
    t = data.draw(st.integers(2, len(betas)))
    d = Diffusion(betas, "learned", "x0")
    X0 = t64([[x0]])
    xt = d.q_sample(X0, t, t64([[eps]]))
    kl = lambda v: d.vb_term_bpd(lambda x, s: t64([[x0, v]]), X0, xt, t).item()
    _, beta_tilde = ref_posterior(betas, t, x0, xt.item())
    found = optimize.minimize_scalar(kl, bounds=(math.log(beta_tilde) - 5, math.log(beta_tilde) + 5),
                                     method="bounded", options={"xatol": 1e-10})
    assert found.x == pytest.approx(math.log(beta_tilde), abs=1e-4)
    assert kl(found.x) == pytest.approx(0.0, abs=1e-12)


def test_objective_and_variance_combinations():
    d = Diffusion(linear_betas(10), "learned")
    with pytest.raises(ValueError, match="learned variance"):
        d.training_loss(const_eps(0.0), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="objective"):
        Diffusion(linear_betas(10)).training_loss(const_eps(0.0), torch.zeros(2, 1), objective="kl")
    with pytest.raises(ValueError, match="predict"):
        Diffusion(predict="xprev")
    with pytest.raises(ValueError, match="fixed"):
        d.eq12_weight(5)


# 12. Sec. 4.3: the bound read as rate and distortion -----------------------------------------------
def test_rate_distortion_bookkeeping_and_the_gaussian_mmse():
    """The rate at t = 1 plus L_0 is the whole bound; the rate never falls along reverse time; with the
    optimal denoiser for x_0 ~ N(m, s^2) the distortion is the MMSE s^2 (1 - a) / (a s^2 + 1 - a), a = alpha_bar_t."""
    T, m, s, n = 50, 0.3, 0.5, 4000
    d, g = Diffusion(linear_betas(T)), torch.Generator().manual_seed(0)
    x0 = m + s * torch.randn(n, 1, generator=g, dtype=F64)
    b = d.bound_bpd(gaussian_oracle(d, m, s), x0, generator=g)
    rate, distortion = rate_distortion(b["terms"], b["prior"], b["mse"], scale=1.0)
    assert rate[0].item() + b["terms"][:, 0].mean().item() == pytest.approx(b["total"].mean().item(), rel=1e-12)
    assert rate[-1].item() == pytest.approx(b["prior"].mean().item(), rel=1e-12)  # at t = T: L_T alone
    assert (rate[:-1] >= rate[1:]).all()
    a_bar = ref_alpha_bar(linear_betas(T).numpy())[1:]
    mmse = s**2 * (1 - a_bar) / (a_bar * s**2 + 1 - a_bar)
    # mse[:, t-1] are squared Gaussian errors: the mean has relative standard error sqrt(2 / n).
    assert np.all(np.abs(distortion.numpy() ** 2 / mmse - 1) < 4 * math.sqrt(2 / n))
    assert rate_distortion(b["terms"], b["prior"], b["mse"], 127.5)[1][0].item() == pytest.approx(
        127.5 * distortion[0].item(), rel=1e-12)
