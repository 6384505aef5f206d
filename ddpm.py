"""The mathematics of DDPM (Ho, Jain & Abbeel 2020), Sections 2-3 and Appendix A.

Read this file beside the paper: every function names the equation it implements.
It knows nothing of neural networks: the model is any callable model(x_t, t) that
returns a tensor shaped like x_t: the noise epsilon (the paper's choice, Eq. 11), or
x_0, or the reverse mean itself (Sec. 3.2's alternatives); with a learned variance,
twice x_t's channels, the second half a log-variance.

Time convention. Public functions take the PAPER's t in {1, ..., T}: x_0 is data,
x_T is (almost) pure noise, and t = 1 is the last reverse step. Every table below
is indexed by that t directly, with an entry for t = 0 (alpha_bar_0 = 1) so that
alpha_bar[t - 1] needs no special case. The authors' code uses 0-based steps
i = t - 1 in {0, ..., T-1}: their `alphas_cumprod[i]` is our `alpha_bar[t]`, and
their networks were fed i. Only unet.py's pretrained loader needs to know that.

Constants are computed in float64 (as the authors did, "for accuracy") and
converted to the data's dtype and device when they are gathered.
"""
import math

import torch
from tqdm import tqdm

LOG2 = math.log(2.0)


def linear_betas(T=1000, beta_1=1e-4, beta_T=0.02):
    """The paper's linear schedule (Sec. 4): beta_t from 1e-4 to 0.02 over T = 1000.

    For T != 1000 both ends are scaled by 1000 / T (as Nichol & Dhariwal 2021 do),
    which keeps sum(beta) ~ -log(alpha_bar_T) ~ 10, so x_T stays close to N(0, I)
    for any T. For T <= 20 the scaled beta_T = 20 / T reaches 1; it is capped at
    0.999 so that it remains a variance.
    """
    if T < 1:
        raise ValueError(f"T must be a positive integer, got {T}")
    scale = 1000.0 / T
    betas = torch.linspace(beta_1 * scale, beta_T * scale, T, dtype=torch.float64)
    return betas.clamp(max=0.999)


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per dimension, in nats.

    The closed form behind Eq. 5 and Eq. 8; it is zero only when both are equal.
    """
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x0, mean, log_var, levels=256):
    """log p(x0) per dimension under Eq. 13: N(mean, var) integrated over x0's bin.

    Data take `levels` evenly spaced values in [-1, 1] (256 for 8-bit images,
    17 for the digits data), so bins are 2 / (levels - 1) wide; the first and
    last bins extend to -inf and +inf, so the probabilities sum to one.
    """
    half_width = 1.0 / (levels - 1)
    inv_std = torch.exp(-0.5 * log_var)
    lower = (x0 - half_width - mean) * inv_std
    upper = (x0 + half_width - mean) * inv_std
    lower = torch.where(x0 < -1 + half_width, -math.inf, lower)
    upper = torch.where(x0 > 1 - half_width, math.inf, upper)
    # log(Phi(upper) - Phi(lower)) without cancellation: mirror the bin so that it
    # lies mostly left of 0, where Phi is small and its log is accurate.
    flip = lower > 0
    lo = torch.where(flip, -upper, lower)
    hi = torch.where(flip, -lower, upper)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))


PREDICT = ("eps", "x0", "mean")         # what the network outputs (Sec. 3.2; eps is the paper's)
SIGMA = ("beta", "beta_tilde", "learned")  # the reverse variance sigma_t^2 (Sec. 3.2, Table 2)
OBJECTIVES = ("simple", "vlb")          # Table 2's objectives: unweighted MSE, or the true bound L


class Diffusion:
    """Schedule constants (Eqs. 2, 4, 7) and the processes built on them.

    betas: float tensor [T] of beta_1..beta_T in (0, 1); defaults to linear_betas().
    sigma: the reverse-process variance of Sec. 3.2: "beta" (sigma_t^2 = beta_t; the
      authors' CIFAR-10 setting), "beta_tilde" (their 256x256 setting), or "learned"
      (Table 2's learned diagonal Sigma: the network outputs a raw log-variance, as in the
      authors' code, so Table 2's rows mean what they meant; Nichol & Dhariwal's later
      interpolation between log beta and log beta~ is not implemented).
    predict: what the network outputs: "eps" (Eq. 11), "x0", or "mean" (mu_theta itself).
    """

    def __init__(self, betas=None, sigma="beta", predict="eps"):
        betas = linear_betas() if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a non-empty 1-D sequence of values in (0, 1)")
        if sigma not in SIGMA:
            raise ValueError(f"sigma must be one of {', '.join(SIGMA)}, got {sigma!r}")
        if predict not in PREDICT:
            raise ValueError(f"predict must be one of {', '.join(PREDICT)}, got {predict!r}")
        self.T, self.sigma, self.predict = len(betas), sigma, predict
        zero = torch.zeros(1, dtype=torch.float64)
        self.beta = torch.cat([zero, betas])                    # beta[0] = 0 is unused
        self.alpha = 1.0 - self.beta                            # Eq. 4: alpha_t = 1 - beta_t
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)       # Eq. 4: alpha_bar_0 = 1
        a_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        one_minus = (1.0 - self.alpha_bar).clamp(min=1e-300)
        # Eq. 7. beta_tilde[1] = 0 exactly: given x_1 and x_0, x_0 is known.
        self.beta_tilde = (1.0 - a_bar_prev) / one_minus * self.beta
        self.beta_tilde[0] = 0.0
        self.mu_tilde_coef_x0 = a_bar_prev.sqrt() * self.beta / one_minus
        self.mu_tilde_coef_xt = self.alpha.sqrt() * (1.0 - a_bar_prev) / one_minus
        # log beta~_1 = -inf would poison the t = 1 terms. The authors use log beta~_2 there, for
        # sigma^2 = beta~ AND for sigma^2 = beta ("to get a better decoder log likelihood"), so only
        # the decoder L_0 sees it: no noise is added at t = 1, so sampling is unaffected.
        log_var_t1 = torch.log(self.beta_tilde[2]) if self.T > 1 else torch.log(self.beta[1])
        self.log_beta_tilde = torch.log(self.beta_tilde.clamp(min=1e-300))
        self.log_beta_tilde[1] = log_var_t1
        log_beta = torch.log(self.beta.clamp(min=1e-300))
        log_beta[1] = log_var_t1
        # sigma2 is the paper's sigma_t^2 (Eq. 12 uses it); log_sigma2 is what the reverse process uses.
        self.sigma2 = {"beta": self.beta, "beta_tilde": self.beta_tilde}.get(sigma)
        self.log_sigma2 = {"beta": log_beta, "beta_tilde": self.log_beta_tilde}.get(sigma)
        self._cache = {}

    def gather(self, name, t, x):
        """Table `name` at timesteps t, cast to x's dtype/device, shaped to broadcast with x."""
        key = (name, x.dtype, x.device)
        if key not in self._cache:  # float64 tables cannot go to every device (MPS), so cast first
            self._cache[key] = getattr(self, name).to(x.dtype).to(x.device)
        # A python int indexes directly: copying it to a GPU first would stall the host.
        t = t if isinstance(t, int) else torch.as_tensor(t, device=x.device).long().reshape(-1)
        return self._cache[key][t].reshape(-1, *([1] * (x.ndim - 1)))

    # ---- forward process q (Sec. 2) -------------------------------------------
    def q_step_sample(self, x_prev, t, noise):
        """Eq. 2: one forward step, x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
        return self.gather("alpha", t, x_prev).sqrt() * x_prev + self.gather("beta", t, x_prev).sqrt() * noise

    def q_mean_var(self, x0, t):
        """Eq. 4: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I); returns (mean, var)."""
        a_bar = self.gather("alpha_bar", t, x0)
        return a_bar.sqrt() * x0, (1.0 - a_bar).expand_as(x0)

    def q_sample(self, x0, t, noise):
        """Eq. 4 sampled by reparameterisation: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        a_bar = self.gather("alpha_bar", t, x0)
        return a_bar.sqrt() * x0 + (1.0 - a_bar).sqrt() * noise

    def q_posterior(self, x0, xt, t):
        """Eqs. 6-7: q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I); returns (mu_tilde, var, log_var).

        At t = 1 the pair does not match: var is beta~_1 = 0 but log_var is log beta~_2 (see
        __init__), so that the KL and decoder formulas stay finite; no caller uses that KL.
        """
        mean = self.gather("mu_tilde_coef_x0", t, xt) * x0 + self.gather("mu_tilde_coef_xt", t, xt) * xt
        return mean, self.gather("beta_tilde", t, xt).expand_as(xt), self.gather("log_beta_tilde", t, xt).expand_as(xt)

    # ---- reverse process p_theta (Sec. 3.2) -------------------------------------
    def predict_x0(self, xt, t, eps):
        """Eq. 15: x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        a_bar = self.gather("alpha_bar", t, xt)
        return (xt - (1.0 - a_bar).sqrt() * eps) / a_bar.sqrt()

    def mean_from_output(self, output, xt, t, clip=False):
        """Sec. 3.2: the reverse mean mu_theta(x_t, t) and x0_hat from the network's output.

        eps:  x0_hat by Eq. 15, mu_theta = mu_tilde_t(x_t, x0_hat) (Eq. 11).
        x0:   x0_hat = output, mu_theta = mu_tilde_t(x_t, x0_hat) (Eq. 7).
        mean: mu_theta = output ("mu~ prediction"); x0_hat by solving Eq. 7 for x_0.
        clip clamps x0_hat to [-1, 1] BEFORE the mean is formed (the authors' sampler); for
        "mean" it clamps only the reported x0_hat: the mean is the network's, as in their code.
        """
        if self.predict == "mean":
            c0, ct = self.gather("mu_tilde_coef_x0", t, xt), self.gather("mu_tilde_coef_xt", t, xt)
            x0_hat = (output - ct * xt) / c0
            return output, x0_hat.clamp(-1.0, 1.0) if clip else x0_hat
        x0_hat = self.predict_x0(xt, t, output) if self.predict == "eps" else output
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        return self.q_posterior(x0_hat, xt, t)[0], x0_hat

    def p_mean_var(self, model, xt, t, clip=False):
        """Eq. 1: p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I); returns (mean, log_var, x0_hat).

        For eps, unclipped, the mean is (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t),
        the form in Algorithm 2 (test_math checks it). A learned log sigma_t^2 is the second half
        of the output's channels.
        """
        if isinstance(t, int):
            t = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        output = model(xt, t)
        if self.sigma == "learned":
            output, log_var = output.chunk(2, dim=1)
        else:
            log_var = self.gather("log_sigma2", t, xt).expand_as(xt)
        mean, x0_hat = self.mean_from_output(output, xt, t, clip)
        return mean, log_var, x0_hat

    def p_sample_step(self, model, xt, t, clip=False, generator=None, z=None):
        """Algorithm 2, lines 3-4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at t = 1.

        t is a python int (the whole batch is at one step). z ~ N(0, I) is drawn from generator
        unless given (figures share one z across a batch). Returns (x_{t-1}, x0_hat).
        """
        mean, log_var, x0_hat = self.p_mean_var(model, xt, t, clip)
        if t == 1:  # "At the end of sampling, we display mu_theta(x_1, 1) noiselessly."
            return mean, x0_hat
        if z is None:
            z = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
        return mean + torch.exp(0.5 * log_var) * z, x0_hat

    @torch.no_grad()
    def p_sample_loop(self, model, shape, clip=False, generator=None, device="cpu", callback=None, xt=None,
                      t_start=None):
        """Algorithm 2: x_T ~ N(0, I), then t = T, ..., 1; returns x_0.

        generator: a torch.Generator on `device`, for reproducible samples.
        callback(t, x_t, x0_hat) is called after each step (x_t is x_{t-1}'s input),
        to record the reverse process for figures. xt, t_start: start from this x_t at step
        t_start instead (the shared latents of Sec. 4.3).
        """
        x = torch.randn(shape, generator=generator, device=device) if xt is None else xt
        for t in range(self.T if t_start is None else t_start, 0, -1):
            x_prev, x0_hat = self.p_sample_step(model, x, t, clip, generator)
            if callback is not None:
                callback(t, x, x0_hat)
            x = x_prev
        return x

    # ---- training (Sec. 3.4, Table 2) -----------------------------------------------
    def sample_t(self, n, generator=None, device="cpu"):
        """Algorithm 1, line 3: t ~ Uniform({1, ..., T}), n of them."""
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=device)

    def training_loss(self, model, x0, t=None, noise=None, generator=None, objective="simple", levels=256,
                      per_example=False):
        """Algorithm 1 with Table 2's objectives, for t ~ Uniform{1..T} and eps ~ N(0, I) unless given.

        simple: the unweighted MSE of the output against its own target: eps (Eq. 14, L_simple),
          x_0, or mu_tilde_t(x_t, x_0) (Table 2's "||mu~ - mu~_theta||^2"). Averaged over
          dimensions, as the authors did (a constant factor). No row of the paper pairs it with
          a learned variance, which it would leave untrained: refused.
        vlb: T * L_{t-1} in bits/dim (T * L_0 at t = 1): an unbiased estimate of the bound of
          Eq. 5 without L_T, which has no parameters. levels: the data's grey levels, for L_0.
        Returns the mean over the batch, or with per_example the loss of each example [B].
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "simple" and self.sigma == "learned":
            raise ValueError("a learned variance needs the bound as its objective (objective='vlb')")
        if t is None:
            t = self.sample_t(x0.shape[0], generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt = self.q_sample(x0, t, noise)
        if objective == "vlb":
            terms = self.vb_term_bpd(model, x0, xt, t, levels)
            return self.T * (terms if per_example else terms.mean())
        target = {"eps": noise, "x0": x0}.get(self.predict)
        if target is None:
            target = self.q_posterior(x0, xt, t)[0]
        error = (target - model(xt, t)).pow(2)
        return error.flatten(1).mean(1) if per_example else error.mean()

    def eq12_weight(self, t):
        """Eq. 12: lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)), float64.

        L_{t-1} = lambda_t ||eps - eps_theta||^2 + C for t > 1; L_simple sets it to 1. At t = 1
        it is no KL weight (L_0 is the decoder), and with sigma^2 = beta~ it is infinite there.
        """
        if self.sigma2 is None:
            raise ValueError("Eq. 12 needs a fixed sigma_t^2 (beta or beta_tilde), not a learned one")
        t = torch.as_tensor(t).long()
        return self.beta[t] ** 2 / (2 * self.sigma2[t] * self.alpha[t] * (1 - self.alpha_bar[t]))

    # ---- the variational bound (Eq. 5), in bits per dimension ------------------------
    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)), per example, in bits/dim."""
        mean, var = self.q_mean_var(x0, self.T)
        kl = normal_kl(mean, torch.log(var), torch.zeros_like(x0), torch.zeros_like(x0))
        return kl.flatten(1).mean(1) / LOG2

    def vb_term_bpd(self, model, x0, xt, t, levels=256, clip=False):
        """One term of Eq. 5 at timestep t (an int, or one per example), per example, in bits/dim.

        t > 1: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (Eq. 8, exact).
        t = 1: L_0 = -log p_theta(x_0 | x_1), the discretised decoder of Eq. 13.
        """
        return self._vb_term(model, x0, xt, t, levels, clip)[0]

    def _vb_term(self, model, x0, xt, t, levels, clip):
        """vb_term_bpd and the x0_hat it used."""
        mean, log_var, x0_hat = self.p_mean_var(model, xt, t, clip)
        if isinstance(t, int) and t == 1:
            nats = -discretized_gaussian_log_likelihood(x0, mean, log_var, levels)
        else:
            q_mean, _, q_log_var = self.q_posterior(x0, xt, t)
            nats = normal_kl(q_mean, q_log_var, mean, log_var)
            if not isinstance(t, int):  # the decoder where t = 1, chosen on the device (no host read)
                first = (torch.as_tensor(t, device=x0.device).reshape(-1) == 1).reshape(-1, *[1] * (x0.ndim - 1))
                # the decoder of the other examples is never used: give it harmless inputs, so that no
                # infinity there can turn into a NaN gradient through torch.where
                decoder = -discretized_gaussian_log_likelihood(
                    x0, torch.where(first, mean, x0), torch.where(first, log_var, torch.zeros_like(log_var)), levels)
                nats = torch.where(first, decoder, nats)
        return nats.flatten(1).mean(1) / LOG2, x0_hat

    @torch.no_grad()
    def bound_bpd(self, model, x0, levels=256, clip=False, generator=None, progress=None):
        """The whole bound of Eq. 5 for a batch: L_T + sum_{t>1} L_{t-1} + L_0, in bits/dim.

        Evaluates all T terms (none skipped), each at one x_t ~ q(x_t | x_0), so
        the total is an unbiased estimate of the bound for each example.
        Returns a dict: "total" [B], "prior" (L_T) [B], "terms" [B, T] where
        terms[:, t-1] is L_{t-1} (terms[:, 0] is the decoder L_0), and "mse" [B, T], the mean
        squared error of the x0_hat(x_t) that term used (clipped iff clip), for Sec. 4.3's distortion.
        progress: optional callable wrapping the range of t (e.g. tqdm).
        """
        steps = range(self.T, 0, -1)
        terms = torch.zeros(x0.shape[0], self.T, dtype=x0.dtype, device=x0.device)
        mse = torch.zeros_like(terms)
        for t in (progress(steps) if progress else steps):
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            xt = self.q_sample(x0, t, noise)
            terms[:, t - 1], x0_hat = self._vb_term(model, x0, xt, t, levels, clip)
            mse[:, t - 1] = (x0_hat - x0).pow(2).flatten(1).mean(1)
        prior = self.prior_bpd(x0)
        return {"total": prior + terms.sum(1), "prior": prior, "terms": terms, "mse": mse}


def rate_distortion(terms, prior, mse, scale):
    """Sec. 4.3, Table 4: the bound read as progressive coding, from one evaluation of it.

    Rate at t: the bits/dim received once x_t is known, L_T + sum_{s=t}^{T-1} L_s (L_0 is never
    rate). Distortion at t: the RMSE of x0_hat(x_t) (Eq. 15), on the data's scale (127.5 for
    [0, 255]), as the root of the mean squared error over all images and dimensions.
    terms, mse [B, T] and prior [B] from bound_bpd -> (rate [T], distortion [T]), index t - 1.
    """
    tail = terms.flip(1).cumsum(1).flip(1)  # tail[:, j] = sum of terms[:, j:]
    rate = prior[:, None] + torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], 1)
    return rate.mean(0), scale * mse.mean(0).sqrt()


# ---- Algorithm 2 for many images, reproducibly -----------------------------------------------------
GROUP = 1000  # images per run of Algorithm 2: bounds the memory x_t takes when n is large (FID: 50,000)


def derive_seed(seed, k):
    """The seed of the k-th independent stream of a run seeded `seed` (an epoch's order, a group of samples)."""
    return seed * 1_000_003 + k


@torch.inference_mode()
def generate(model, diffusion, n, seed=0, *, batch_size=None, clip=True, amp=None, callback=None, progress=False):
    """Algorithm 2 for n images, as every program draws them; returns x_0 [n, C, H, W] on the CPU.

    Randomness: the images come in groups of GROUP, each group from its own generator on the model's
    device, seeded with derive_seed(seed, group index), which draws x_T for the whole group and then each
    step's z, in order. The network sees a group in chunks of batch_size (default: all of it), which bounds
    memory without changing the images (up to float rounding in batched convolutions).
    amp: the network's autocast dtype (None: float32); the sampler's own arithmetic stays float32.
    callback(t, x_t, x0_hat) is called at each step of the first group; progress shows a bar.
    """
    device = next(model.parameters()).device
    shape = (model.in_channels, model.image_size, model.image_size)

    def chunked(x, t):
        size = batch_size or len(x)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return torch.cat([model(xb, tb) for xb, tb in zip(x.split(size), t.split(size))]).float()

    def step(t, x_t, x0_hat):
        bar.update()  # reads no tensor, so a GPU never waits for the host
        if callback is not None and g == 0:
            callback(t, x_t, x0_hat)
    groups = range(0, n, GROUP)
    bar = tqdm(total=len(groups) * diffusion.T, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    out = []
    for g, start in enumerate(groups):  # step() sees the group g being drawn
        gen = torch.Generator(device).manual_seed(derive_seed(seed, g))
        out.append(diffusion.p_sample_loop(chunked, (min(GROUP, n - start), *shape), clip, gen, device, step).cpu())
    bar.close()
    return torch.cat(out)
