"""Count models for the efficacy analysis: NB2 regression, Poisson with overdispersion tests, and
a negative-binomial mixed model with a random patient intercept.

NB2 means ``Var(y) = mu + alpha * mu**2``; R's MASS::glm.nb reports ``theta = 1 / alpha``.
:func:`fit_nb2` follows glm.nb's estimator: theta by maximum likelihood (alternating with the
regression), coefficients by IRLS at that theta, and standard errors from the expected information
of the coefficients *at the estimated theta* (as ``summary.glm.nb`` prints them). For the log link
the expected information is block-diagonal between coefficients and theta, so these are the usual
ML standard errors.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = np.repeat([0.0, 1.0], 200)
>>> mu = np.exp(1.0 + np.log(0.5) * x)
>>> y = rng.negative_binomial(1 / 0.8, 1 / (1 + 0.8 * mu))
>>> fit = fit_nb2(y, np.column_stack([np.ones_like(x), x]), names=['const', 'x'])
>>> bool(abs(np.exp(fit.params['x']) - 0.5) < 0.15), bool(0.4 < fit.alpha < 1.3)
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

#: theta above THETA_MAX / 10 is reported as "no overdispersion" (alpha = 0)
THETA_MAX = 1e8


class ModelError(RuntimeError):
    """A model could not be fitted (no convergence, singular design)."""


_SINGULAR = ("the model cannot be estimated: its information matrix is singular (a covariate is "
             "constant or collinear with another, or a group of patients has only zero counts)")


# ============================================================================================
# NB2 log-likelihood and theta given the means
# ============================================================================================
def nb2_loglik(y: np.ndarray, mu: np.ndarray, theta: float) -> float:
    """Sum of NB2 log-probabilities of counts ``y`` with means ``mu`` and size ``theta``.

    >>> round(nb2_loglik(np.array([0, 3]), np.array([1.0, 2.0]), 1e12), 6) == round(
    ...     float(stats.poisson.logpmf([0, 3], [1.0, 2.0]).sum()), 6)
    True
    """
    y = np.asarray(y, float)
    mu = np.asarray(mu, float)
    if not np.isfinite(theta) or theta >= 1e12:
        return float(stats.poisson.logpmf(y, mu).sum())
    return float(np.sum(special.gammaln(theta + y) - special.gammaln(theta) - special.gammaln(y + 1)
                        + theta * np.log(theta) + special.xlogy(y, mu)
                        - (theta + y) * np.log(theta + mu)))


def _theta_score_info(y, mu, theta):
    score = np.sum(special.digamma(theta + y) - special.digamma(theta) + np.log(theta) + 1
                   - np.log(theta + mu) - (y + theta) / (mu + theta))
    info = np.sum(-special.polygamma(1, theta + y) + special.polygamma(1, theta) - 1 / theta
                  + 2 / (mu + theta) - (y + theta) / (mu + theta) ** 2)
    return float(score), float(info)


def theta_ml(y: np.ndarray, mu: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood theta for fixed means, and its standard error (observed information).

    Returns ``(inf, nan)`` when the likelihood keeps increasing with theta (no overdispersion).

    >>> rng = np.random.default_rng(1)
    >>> y = rng.negative_binomial(2.0, 2.0 / (2.0 + 5.0), size=4000)
    >>> th, se = theta_ml(y, np.full(y.shape, y.mean()))
    >>> bool(abs(th - 2.0) < 0.2), bool(0 < se < 0.2)
    (True, True)
    """
    y = np.asarray(y, float)
    mu = np.asarray(mu, float)

    def negll(log_t):
        return -nb2_loglik(y, mu, math.exp(log_t))

    lo, hi = math.log(1e-6), math.log(THETA_MAX)
    res = optimize.minimize_scalar(negll, bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-10, "maxiter": 500})
    theta = math.exp(res.x)
    if res.x > hi - 1.0:
        return math.inf, math.nan
    for _ in range(20):  # Newton polish: brings theta to full precision
        score, info = _theta_score_info(y, mu, theta)
        if info <= 0:
            break
        step = score / info
        new = theta + step
        if new <= 0:
            new = theta / 2
        if abs(new - theta) < 1e-12 * max(1.0, theta):
            theta = new
            break
        theta = new
    if theta > THETA_MAX / 10:
        return math.inf, math.nan
    _, info = _theta_score_info(y, mu, theta)
    se = 1 / math.sqrt(info) if info > 0 else math.nan
    return theta, se


# ============================================================================================
# IRLS for a log-link GLM with NB2 (fixed theta) or Poisson variance
# ============================================================================================
def _irls(y, X, offset, theta, beta0=None, tol=1e-12, maxiter=100):
    """Fisher scoring for log link; ``theta = inf`` gives Poisson. Returns beta, cov, mu, iters."""
    n, p = X.shape
    if beta0 is None:
        beta = np.linalg.lstsq(X, np.log(y + 0.5) - offset, rcond=None)[0]
    else:
        beta = np.asarray(beta0, float).copy()
    dev_old = math.inf
    for it in range(1, maxiter + 1):
        eta = X @ beta + offset
        eta = np.clip(eta, -700, 700)
        mu = np.exp(eta)
        var_factor = 1.0 if not np.isfinite(theta) else 1.0 / (1.0 + mu / theta)
        w = mu * var_factor  # working weights (dmu/deta)^2 / V(mu)
        z = eta - offset + (y - mu) / mu
        sw = np.sqrt(w)
        beta_new, *_ = np.linalg.lstsq(X * sw[:, None], z * sw, rcond=None)
        mu_new = np.exp(np.clip(X @ beta_new + offset, -700, 700))
        dev = -2 * nb2_loglik(y, mu_new, theta if np.isfinite(theta) else 1e13)
        change = float(np.max(np.abs(beta_new - beta)))
        beta = beta_new
        if abs(dev - dev_old) <= tol * (abs(dev) + 0.1) and change < 1e-9:
            break
        dev_old = dev
    eta = X @ beta + offset
    mu = np.exp(eta)
    w = mu * (1.0 if not np.isfinite(theta) else 1.0 / (1.0 + mu / theta))
    xtwx = X.T @ (X * w[:, None])
    try:
        cov = np.linalg.inv(xtwx)
    except np.linalg.LinAlgError:
        raise ModelError(_SINGULAR) from None
    if np.linalg.cond(xtwx) > 1e13:
        raise ModelError(_SINGULAR)
    return beta, cov, mu, it


# ============================================================================================
# NB2 regression (glm.nb equivalent)
# ============================================================================================
@dataclass
class CountFit:
    """Result of :func:`fit_nb2` or :func:`fit_poisson`."""

    family: str
    params: pd.Series
    bse: pd.Series
    cov: pd.DataFrame
    llf: float
    n: int
    mu: np.ndarray = field(repr=False)
    theta: float = math.inf
    se_theta: float = math.nan
    iterations: int = 0

    @property
    def alpha(self) -> float:
        """NB2 dispersion ``alpha = 1/theta`` (0 = Poisson)."""
        return 0.0 if not np.isfinite(self.theta) else 1.0 / self.theta

    @property
    def se_alpha(self) -> float:
        """Delta-method standard error of alpha."""
        if not np.isfinite(self.theta):
            return math.nan
        return self.se_theta / self.theta ** 2

    @property
    def df_model(self) -> int:
        return len(self.params) + (1 if self.family == "nb2" else 0)

    def wald(self, name: str, level: float = 0.95) -> dict:
        """Estimate, SE, z, two-sided p and CI of one coefficient, on the log and ratio scales."""
        b, se = float(self.params[name]), float(self.bse[name])
        z = b / se
        q = stats.norm.ppf(0.5 + level / 2)
        return {"log_estimate": b, "se": se, "z": z, "p_value": float(2 * stats.norm.sf(abs(z))),
                "ratio": math.exp(b), "ci": [math.exp(b - q * se), math.exp(b + q * se)]}


def _as_design(X, names):
    X = np.asarray(X, float)
    if X.ndim != 2:
        raise ValueError("design matrix must be 2-D")
    if names is None:
        names = [f"x{i}" for i in range(X.shape[1])]
    if len(names) != X.shape[1]:
        raise ValueError("names do not match the design matrix columns")
    return X, list(names)


def fit_poisson(y, X, offset=None, names=None) -> CountFit:
    """Poisson log-linear regression (maximum likelihood)."""
    X, names = _as_design(X, names)
    y = np.asarray(y, float)
    offset = np.zeros(len(y)) if offset is None else np.asarray(offset, float)
    beta, cov, mu, it = _irls(y, X, offset, math.inf)
    return CountFit("poisson", pd.Series(beta, names), pd.Series(np.sqrt(np.diag(cov)), names),
                    pd.DataFrame(cov, names, names), nb2_loglik(y, mu, math.inf), len(y), mu,
                    iterations=it)


def fit_nb2(y, X, offset=None, names=None, *, tol: float = 1e-10, maxiter: int = 100) -> CountFit:
    """NB2 log-linear regression with theta by maximum likelihood (R's ``MASS::glm.nb``).

    Alternates a theta update at fixed means with IRLS at fixed theta until the
    log-likelihood and theta stop changing, then reports coefficients with their standard errors
    from the expected information at the final theta.
    """
    X, names = _as_design(X, names)
    y = np.asarray(y, float)
    if np.any(y < 0) or np.any(y != np.round(y)):
        raise ValueError("counts must be non-negative integers")
    offset = np.zeros(len(y)) if offset is None else np.asarray(offset, float)
    if len(y) <= X.shape[1]:
        raise ModelError(f"{len(y)} observations are too few for {X.shape[1]} coefficients")
    beta, _, mu, _ = _irls(y, X, offset, math.inf)
    # moment start as glm.nb does, then alternate
    theta = len(y) / max(np.sum((y / mu - 1) ** 2), 1e-8)
    ll_old = -math.inf
    for it in range(1, maxiter + 1):
        beta, cov, mu, _ = _irls(y, X, offset, theta, beta0=beta)
        theta_new, _ = theta_ml(y, mu)
        ll = nb2_loglik(y, mu, theta_new)
        done = (abs(ll - ll_old) < tol * (abs(ll) + 1)
                and (not np.isfinite(theta_new) and not np.isfinite(theta)
                     or abs(theta_new - theta) < 1e-9 * max(theta, 1.0)))
        theta, ll_old = theta_new, ll
        if done:
            break
    else:
        raise ModelError(f"negative-binomial fit did not converge in {maxiter} alternations")
    beta, cov, mu, _ = _irls(y, X, offset, theta, beta0=beta)
    se_theta = math.nan
    if np.isfinite(theta):
        theta, se_theta = theta_ml(y, mu)
    return CountFit("nb2", pd.Series(beta, names), pd.Series(np.sqrt(np.diag(cov)), names),
                    pd.DataFrame(cov, names, names), nb2_loglik(y, mu, theta), len(y), mu,
                    theta=theta, se_theta=se_theta, iterations=it)


def with_sandwich_se(fit: CountFit, y, X) -> CountFit:
    """A copy of ``fit`` with heteroskedasticity-robust (HC1 sandwich) standard errors."""
    import dataclasses

    y = np.asarray(y, float)
    X = np.asarray(X, float)
    mu = fit.mu
    a = fit.alpha
    w = mu / (1 + a * mu)
    bread = np.linalg.inv(X.T @ (X * w[:, None]))
    scores = X * ((y - mu) / (1 + a * mu))[:, None]
    n, p = X.shape
    cov = bread @ (scores.T @ scores) @ bread * n / (n - p)
    names = list(fit.params.index)
    return dataclasses.replace(fit, bse=pd.Series(np.sqrt(np.diag(cov)), names),
                               cov=pd.DataFrame(cov, names, names))


def lr_test(full: CountFit, reduced: CountFit) -> dict:
    """Likelihood-ratio test of nested fits of the same family."""
    stat = max(0.0, 2 * (full.llf - reduced.llf))
    df = full.df_model - reduced.df_model
    return {"statistic": stat, "df": df, "p_value": float(stats.chi2.sf(stat, df))}


def overdispersion_tests(y, poisson: CountFit, nb: CountFit | None = None) -> dict:
    """Evidence against the Poisson variance: Pearson dispersion, Cameron-Trivedi regression test
    (NB2 alternative, one-sided), and the boundary likelihood-ratio test of alpha = 0 against NB2.

    >>> rng = np.random.default_rng(3)
    >>> y = rng.poisson(4.0, 500)
    >>> X = np.ones((500, 1))
    >>> overdispersion_tests(y, fit_poisson(y, X))['cameron_trivedi']['p_value'] > 0.01
    True
    """
    y = np.asarray(y, float)
    mu = poisson.mu
    dof = poisson.n - len(poisson.params)
    pearson = float(np.sum((y - mu) ** 2 / mu))
    aux = ((y - mu) ** 2 - y) / mu  # E[aux] = alpha * mu under NB2
    c = float(np.sum(aux * mu) / np.sum(mu * mu))
    resid = aux - c * mu
    s2 = float(np.sum(resid ** 2) / (len(y) - 1))
    se_c = math.sqrt(s2 / np.sum(mu * mu))
    t = c / se_c if se_c > 0 else math.inf
    out = {
        "pearson_chi2": pearson, "df": dof,
        "pearson_dispersion": pearson / dof if dof else math.nan,
        "cameron_trivedi": {"alpha_estimate": c, "t": t,
                            "p_value": float(stats.t.sf(t, len(y) - 1))},
    }
    if nb is not None:
        lr = max(0.0, 2 * (nb.llf - poisson.llf))
        out["lr_nb_vs_poisson"] = {"statistic": lr, "p_value": float(0.5 * stats.chi2.sf(lr, 1)),
                                   "note": "boundary test: half the chi-square(1) tail"}
    return out


# ============================================================================================
# NB2 mixed model, random intercept per cluster, adaptive Gauss-Hermite quadrature
# ============================================================================================
@dataclass
class MixedFit:
    params: pd.Series
    bse: pd.Series
    alpha: float
    sigma: float
    llf: float
    n_obs: int
    n_groups: int
    n_quad: int
    converged: bool
    #: True when alpha sits at its lower bound (no overdispersion beyond the random intercept)
    alpha_at_bound: bool = False

    def wald(self, name: str, level: float = 0.95) -> dict:
        b, se = float(self.params[name]), float(self.bse[name])
        z = b / se
        q = stats.norm.ppf(0.5 + level / 2)
        return {"log_estimate": b, "se": se, "z": z, "p_value": float(2 * stats.norm.sf(abs(z))),
                "ratio": math.exp(b), "ci": [math.exp(b - q * se), math.exp(b + q * se)]}


def _nb_terms(y, eta, theta):
    mu = np.exp(np.clip(eta, -700, 700))
    ll = (special.gammaln(theta + y) - special.gammaln(theta) - special.gammaln(y + 1)
          + theta * np.log(theta) + y * eta - (theta + y) * np.log(theta + mu))
    share = theta / (mu + theta)
    d1 = (y - mu) * share
    d2 = -(y + theta) * share * (mu / (mu + theta))
    return ll, d1, d2


def mixed_loglik(beta, log_alpha, log_sigma, y, X, offset, group, n_groups, n_quad=15):
    """Marginal log-likelihood of the NB2 random-intercept model by adaptive Gauss-Hermite
    quadrature around each group's mode (``n_quad = 1`` is the Laplace approximation)."""
    return _mixed(beta, log_alpha, log_sigma, y, X, offset, group, n_groups, n_quad)[0]


def _mixed(beta, log_alpha, log_sigma, y, X, offset, group, n_groups, n_quad, grad=False):
    """Log-likelihood and (optionally) its gradient in (beta, log alpha, log sigma).

    The gradient holds the quadrature nodes fixed at their adaptive positions: the integral does
    not depend on where the nodes sit, so this is the derivative of the integral up to the
    quadrature error.
    """
    theta = math.exp(-log_alpha)
    sigma = math.exp(log_sigma)
    eta0 = X @ beta + offset
    b = np.zeros(n_groups)
    for _ in range(100):  # Newton on a concave function, steps capped for robustness
        _, d1, d2 = _nb_terms(y, eta0 + b[group], theta)
        g = np.bincount(group, d1, n_groups) - b / sigma ** 2
        h = np.bincount(group, d2, n_groups) - 1 / sigma ** 2
        step = np.clip(g / h, -1.0, 1.0)
        b = b - step
        if np.max(np.abs(step)) < 1e-11:
            break
    _, _, d2 = _nb_terms(y, eta0 + b[group], theta)
    h = np.bincount(group, d2, n_groups) - 1 / sigma ** 2
    s = 1 / np.sqrt(-h)
    x, w = np.polynomial.hermite.hermgauss(n_quad)
    total = np.empty((n_quad, n_groups))
    nodes = []
    for k in range(n_quad):
        bk = b + math.sqrt(2) * s * x[k]
        nodes.append(bk)
        ll, _, _ = _nb_terms(y, eta0 + bk[group], theta)
        total[k] = (np.bincount(group, ll, n_groups) - 0.5 * bk ** 2 / sigma ** 2
                    + math.log(w[k]) + x[k] ** 2)
    log_int = special.logsumexp(total, axis=0) + np.log(math.sqrt(2) * s)
    value = float(np.sum(log_int - 0.5 * math.log(2 * math.pi) - log_sigma))
    if not grad:
        return value, None
    post = np.exp(total - special.logsumexp(total, axis=0))  # node weights per group
    p = X.shape[1]
    gr = np.zeros(p + 2)
    for k in range(n_quad):
        bk = nodes[k]
        eta = eta0 + bk[group]
        mu = np.exp(np.clip(eta, -700, 700))
        share = theta / (mu + theta)
        d1 = (y - mu) * share
        dtheta = (special.digamma(theta + y) - special.digamma(theta) + np.log(share) + 1
                  - (y + theta) / (mu + theta))
        wk = post[k][group]
        gr[:p] += X.T @ (wk * d1)
        gr[p] += np.sum(wk * dtheta) * (-theta)
        gr[p + 1] += np.sum(post[k] * (bk ** 2 / sigma ** 2))
    gr[p + 1] -= n_groups
    return value, gr


def _hessian_from_gradient(grad, x, h=1e-5):
    """Symmetrised central-difference Jacobian of ``grad`` at ``x``."""
    n = len(x)
    H = np.empty((n, n))
    for i in range(n):
        e = np.zeros(n)
        e[i] = h
        H[:, i] = (grad(x + e) - grad(x - e)) / (2 * h)
    return (H + H.T) / 2


def fit_nb_mixed(y, X, group, offset=None, names=None, *, n_quad: int = 15) -> MixedFit:
    """NB2 GLMM with a normal random intercept per ``group``, by maximum likelihood.

    Standard errors come from the Hessian of the marginal log-likelihood (central differences
    of its gradient).
    """
    X, names = _as_design(X, names)
    y = np.asarray(y, float)
    offset = np.zeros(len(y)) if offset is None else np.asarray(offset, float)
    codes, uniques = pd.factorize(pd.Series(group))
    n_groups = len(uniques)
    start_fit = fit_nb2(y, X, offset, names)
    p = X.shape[1]
    alpha0 = max(start_fit.alpha, 0.05)
    x0 = np.concatenate([start_fit.params.to_numpy(), [math.log(alpha0 / 2), math.log(0.7)]])

    bounds = [(None, None)] * p + [(-12.0, 6.0), (-8.0, 3.0)]

    def negll(v):
        v = np.asarray(v, float)
        with np.errstate(all="ignore"):
            ll, _ = _mixed(v[:p], v[p], v[p + 1], y, X, offset, codes, n_groups, n_quad)
        return -ll if math.isfinite(ll) else 1e300

    def negll_grad(v):
        v = np.asarray(v, float)
        with np.errstate(all="ignore"):
            ll, g = _mixed(v[:p], v[p], v[p + 1], y, X, offset, codes, n_groups, n_quad, True)
        if not (math.isfinite(ll) and np.all(np.isfinite(g))):
            return 1e300, np.zeros_like(v)
        return -ll, -g

    res = optimize.minimize(negll_grad, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"ftol": 1e-14, "gtol": 1e-8, "maxiter": 2000})
    best = res
    if not res.success:  # the approximate gradient can stop L-BFGS-B early: polish without it
        res2 = optimize.minimize(negll, res.x, method="Nelder-Mead", bounds=bounds,
                                 options={"xatol": 1e-7, "fatol": 1e-10, "maxiter": 3000})
        best = res2 if res2.fun <= res.fun else res
    v = best.x
    # A variance parameter at (or drifting towards) its bound, e.g. no overdispersion beyond the
    # random intercept, leaves the likelihood flat in that direction: it is then held fixed and
    # the standard errors come from the Hessian of the remaining parameters.
    inside = [i for i in (p, p + 1) if bounds[i][0] + 0.05 < v[i] < bounds[i][1] - 0.05]
    candidates = [list(range(p)) + inside]
    if p in inside:
        candidates.append([i for i in candidates[0] if i != p])
    candidates.append(list(range(p)))
    se = np.full(len(v), np.nan)
    free: list[int] = []
    for free in candidates:
        def grad_free(w, free=free):
            full = v.copy()
            full[free] = w
            return negll_grad(full)[1][free]

        H = _hessian_from_gradient(grad_free, v[free])
        if np.all(np.isfinite(H)) and np.all(np.linalg.eigvalsh(H) > 0):
            se[free] = np.sqrt(np.diag(np.linalg.inv(H)))
            break
    if not np.all(np.isfinite(se[:p])):
        raise ModelError("the mixed model's information matrix is singular; its standard errors "
                         "cannot be computed")
    return MixedFit(pd.Series(v[:p], names), pd.Series(se[:p], names), math.exp(v[p]),
                    math.exp(v[p + 1]), -float(best.fun), len(y), n_groups, n_quad,
                    bool(best.success), alpha_at_bound=p not in free)
