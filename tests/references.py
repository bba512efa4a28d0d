"""Independent float64 numpy references for the forward process, written from SPEC §1 and DDPM, not from the
package's code."""

import numpy as np


def ddpm_reference(betas):
    """DDPM (Ho et al. 2020) quantities in float64, indexed t = 0..T (0 = clean)."""
    alphas = 1.0 - betas
    alpha_bar = np.concatenate([[1.0], np.cumprod(alphas)])
    betas_full = np.concatenate([[0.0], betas])
    alphas_full = np.concatenate([[1.0], alphas])
    t = np.arange(1, len(betas) + 1)
    post_var = np.zeros(len(betas) + 1)
    coef_x0 = np.zeros(len(betas) + 1)
    coef_xt = np.zeros(len(betas) + 1)
    post_var[t] = betas_full[t] * (1.0 - alpha_bar[t - 1]) / (1.0 - alpha_bar[t])
    coef_x0[t] = betas_full[t] * np.sqrt(alpha_bar[t - 1]) / (1.0 - alpha_bar[t])
    coef_xt[t] = (1.0 - alpha_bar[t - 1]) * np.sqrt(alphas_full[t]) / (1.0 - alpha_bar[t])
    return dict(alpha_bar=alpha_bar, betas=betas_full, alphas=alphas_full, post_var=post_var,
                coef_x0=coef_x0, coef_xt=coef_xt)


def marginals_by_iteration(a, b, sigma2):
    """Moments of q(z_t | z_0, X) by propagating mean and variance one transition at a time.

    Returns functions of (t, z0 [*S], enc [N, *S]) -> (mean, var); a [T], b [T, N], sigma2 [T] in float64.
    """

    def marginal(t, z0, enc):
        mean, var = np.array(z0, dtype=np.float64), 0.0
        for s in range(t):
            mean = a[s] * mean + np.tensordot(b[s], enc, axes=(0, 0))
            var = a[s] ** 2 * var + sigma2[s]
        return mean, var

    return marginal


def gaussian_product_posterior(t, zt, z0, enc, a, b, sigma2):
    """q(z_{t-1} | z_t, z_0, X) ∝ N(z_t; a_t z_{t-1} + b_t·e, sigma_t^2) N(z_{t-1}; m_{t-1}, v_{t-1}), in float64."""
    m_prev, v_prev = marginals_by_iteration(a, b, sigma2)(t - 1, z0, enc)
    a_t, sig2_t = a[t - 1], sigma2[t - 1]
    shifted = zt - np.tensordot(b[t - 1], enc, axes=(0, 0))
    precision = a_t**2 / sig2_t + 1.0 / v_prev
    var = 1.0 / precision
    mean = var * (a_t * shifted / sig2_t + m_prev / v_prev)
    return mean, var


def gaussian_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) summed over the last axes, float64."""
    kl = 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)
    return kl.reshape(kl.shape[0], -1).sum(axis=1)


def adm_learned_range(betas, t, v):
    """guided-diffusion's LEARNED_RANGE variance in float64 (gaussian_diffusion.py, p_mean_variance), our t = 1..T
    being its t - 1: frac = (v + 1) / 2 between log posterior_variance_clipped and log beta. Returns log-variance."""
    ref = ddpm_reference(betas)
    post = ref["post_var"][1:]  # its posterior_variance, index 0..T-1
    clipped = np.log(np.append(post[1], post[1:]))
    frac = (v + 1.0) / 2.0
    return frac * np.log(betas)[t - 1] + (1.0 - frac) * clipped[t - 1]


def adm_vb_terms_bpd(betas, t, x0, xt, eps_hat, v, bin_width):
    """guided-diffusion's `_vb_terms_bpd` (float64) for an ε-predicting model with a learned range: the KL of the
    posterior to the model's step in bits per dimension for t >= 2 (its t >= 1), the discretized-Gaussian decoder NLL
    of 8-bit-like data at t = 1 (its t = 0). x0, xt, eps_hat, v [D]; a float."""
    from scipy.stats import norm

    ref = ddpm_reference(betas)
    abar = ref["alpha_bar"]
    x0_hat = (xt - np.sqrt(1.0 - abar[t]) * eps_hat) / np.sqrt(abar[t])
    model_mean = ref["coef_x0"][t] * x0_hat + ref["coef_xt"][t] * xt
    model_log_var = adm_learned_range(betas, t, v)
    if t == 1:  # its decoder: the data's bins under N(model_mean = x0_hat, exp(model_log_var)), edges open
        std = np.exp(0.5 * model_log_var)
        upper = norm.cdf((x0 + bin_width / 2 - model_mean) / std)
        lower = norm.cdf((x0 - bin_width / 2 - model_mean) / std)
        prob = np.where(x0 < -0.999, upper, np.where(x0 > 0.999, 1.0 - lower, upper - lower))
        return float(np.mean(-np.log(prob)) / np.log(2.0))
    true_mean = ref["coef_x0"][t] * x0 + ref["coef_xt"][t] * xt
    true_log_var = np.log(ref["post_var"][t])
    kl = 0.5 * (-1.0 + model_log_var - true_log_var + np.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * np.exp(-model_log_var))
    return float(np.mean(kl) / np.log(2.0))
