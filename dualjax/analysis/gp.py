"""Gaussian-process map of a score over (log2 r, lambda) and the density of the optimal lambda.

As in the paper's §5.2: inputs log2 r and lambda, standardised to zero mean and unit variance;
kernel Constant x anisotropic Matern(nu) + White; hyper-parameters by L-BFGS-B (scikit-learn's
default optimizer) with restarts; normalised outputs (normalize_y). The optimal-lambda density at
a given r comes from joint posterior samples of the noise-free function over a fine lambda grid:
each sample's argmax (argmin for a loss) is one draw of "the optimal lambda".
"""

import dataclasses
import re
import warnings

import numpy as np
import scipy.linalg
from sklearn import exceptions as sk_exceptions
from sklearn import gaussian_process
from sklearn import metrics as sk_metrics
from sklearn import preprocessing
from sklearn.gaussian_process import kernels
import threadpoolctl


def make_kernel(nu: float = 2.5) -> kernels.Kernel:
  """Constant x anisotropic Matern(nu) over the two inputs + White (observation noise)."""
  return (kernels.ConstantKernel(1.0, (1e-3, 1e5))
          * kernels.Matern(length_scale=[1.0, 1.0], length_scale_bounds=(1e-2, 1e3), nu=nu)
          + kernels.WhiteKernel(1e-2, (1e-10, 1e1)))


def n_hyperparameters(nu: float = 2.5) -> int:
  """How many hyper-parameters the kernel fits (constant, two length scales, noise): 4."""
  return make_kernel(nu).n_dims


def unfittable_reason(r: np.ndarray, lam: np.ndarray, nu: float = 2.5) -> str | None:
  """Why these points cannot support the map (too few, one lambda, one r), or None."""
  need = n_hyperparameters(nu)
  if len(r) < need:
    return (f"{len(r)} point{'s' if len(r) != 1 else ''} with r, lam and a value; the GP fits {need} "
            f"hyper-parameters, so at least {need} are needed")
  if len(np.unique(lam)) < 2:
    return (f"a single lam value ({lam[0]:g}) among its {len(lam)} points; the map over (r, lam) needs "
            "at least two")
  if len(np.unique(r)) < 2:
    return (f"a single r value ({r[0]:g}) among its {len(r)} points; the map over (r, lam) needs "
            "at least two")
  return None


def lower_is_better(target: str) -> bool:
  """Loss-like targets (a name containing 'loss') are minimised; scores are maximised."""
  return "loss" in target


@dataclasses.dataclass
class Fit:
  """A fitted GP for one target."""
  target: str
  gp: gaussian_process.GaussianProcessRegressor
  scaler: preprocessing.StandardScaler
  log2r: np.ndarray  # training inputs
  lam: np.ndarray
  y: np.ndarray
  r2: float  # in-sample: posterior mean at the training points vs. their values
  r2_loo: float  # leave-one-out with the fitted hyper-parameters (closed form)
  minimise: bool
  notes: list[str]

  @property
  def n(self) -> int:
    return len(self.y)

  @property
  def noise_variance(self) -> float:
    """Observation-noise variance in the target's units (White level x Var(y))."""
    var_y = float(np.var(self.y))
    return float(self.gp.kernel_.k2.noise_level * (var_y if var_y > 0 else 1.0))

  def inputs(self, log2r: np.ndarray, lam: np.ndarray) -> np.ndarray:
    return self.scaler.transform(np.stack([np.ravel(log2r), np.ravel(lam)], axis=1))

  def predict(self, log2r: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and standard deviation of the noise-free function."""
    mean, std = self.gp.predict(self.inputs(log2r, lam), return_std=True)
    var = np.maximum(std ** 2 - self.noise_variance, 0.0)
    return mean, np.sqrt(var)

  def latent_mean_cov(self, log2r: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Joint posterior mean[M] and covariance[M, M] of the noise-free function at M inputs.

    scikit-learn's predictive covariance includes the White kernel's noise on the diagonal
    (k(X, X) of a Sum with WhiteKernel); the noise-free function excludes it.
    """
    mean, cov = self.gp.predict(self.inputs(log2r, lam), return_cov=True)
    cov = cov - self.noise_variance * np.eye(len(mean))
    return mean, cov


def fit(log2r: np.ndarray, lam: np.ndarray, y: np.ndarray, *, target: str = "y", nu: float = 2.5,
        restarts: int = 5, seed: int = 0) -> Fit:
  """Fits the GP (see module docstring); optimizer warnings become notes."""
  log2r, lam, y = (np.asarray(a, dtype=np.float64) for a in (log2r, lam, y))
  reason = unfittable_reason(np.exp2(log2r), lam, nu)
  if reason:
    raise ValueError(f"{target}: {reason}")
  scaler = preprocessing.StandardScaler().fit(np.stack([log2r, lam], axis=1))
  x = scaler.transform(np.stack([log2r, lam], axis=1))
  gp = gaussian_process.GaussianProcessRegressor(
      kernel=make_kernel(nu), normalize_y=True, n_restarts_optimizer=restarts,
      random_state=np.random.RandomState(seed))
  # Small matrices: BLAS threads only contend (measured 10x slower on a busy 2-core machine).
  with warnings.catch_warnings(record=True) as caught, threadpoolctl.threadpool_limits(1):
    warnings.simplefilter("always", sk_exceptions.ConvergenceWarning)
    gp.fit(x, y)
    r2 = float(sk_metrics.r2_score(y, gp.predict(x)))
    r2_loo = _r2_loo(gp, x, y)
  messages = [str(w.message) for w in caught if issubclass(w.category, sk_exceptions.ConvergenceWarning)]
  stopped = [m for m in messages if "failed to converge" in m]
  notes = sorted({f"{target}: {_describe_warning(m)}" for m in messages if m not in stopped})
  if stopped:
    notes.append(f"{target}: L-BFGS-B stopped before converging in {len(stopped)} of {restarts + 1} starts "
                 "(the start with the best marginal likelihood is kept)")
  return Fit(target, gp, scaler, log2r, lam, y, r2, r2_loo, lower_is_better(target), notes)


_PARAMS = {("k1__k1__constant_value", "0"): "signal variance",
           ("k1__k2__length_scale", "0"): "log2 r length scale",
           ("k1__k2__length_scale", "1"): "λ length scale",
           ("k2__noise_level", "0"): "noise level"}
_INTERPOLATES = "the surface interpolates the points along {} and says little between them"
_CONSEQUENCE = {"λ length scale/lower": _INTERPOLATES.format("λ"),
                "log2 r length scale/lower": _INTERPOLATES.format("r"),
                "noise level/lower": "the fit treats the points as nearly noise-free",
                "noise level/upper": "the fit explains the points mostly as noise"}


def _describe_warning(message: str) -> str:
  """scikit-learn's hyper-parameter-at-bound warning in the problem's own words."""
  m = re.search(r"dimension (\d+) of parameter (\w+) is close to the specified (lower|upper) bound "
                r"([0-9.e+-]*[0-9])", message)
  if not m or (m.group(2), m.group(1)) not in _PARAMS:
    return " ".join(message.split())
  name = _PARAMS[(m.group(2), m.group(1))]
  unit = "standardised input units" if "length" in name else "units of Var(y)"
  text = f"{name} at its {m.group(3)} bound ({float(m.group(4)):g}, {unit})"
  consequence = _CONSEQUENCE.get(f"{name}/{m.group(3)}")
  return text + (f": {consequence}" if consequence else "")


def _r2_loo(gp: gaussian_process.GaussianProcessRegressor, x: np.ndarray, y: np.ndarray) -> float:
  """Leave-one-out R^2 with fixed hyper-parameters: residual_i = [K^-1 y]_i / [K^-1]_ii."""
  mu, sd = y.mean(), y.std()
  sd = sd if sd > 0 else 1.0
  k = gp.kernel_(x)  # includes the White noise on the diagonal
  c = scipy.linalg.cho_factor(k, lower=True)
  kinv = scipy.linalg.cho_solve(c, np.eye(len(y)))
  resid = (kinv @ ((y - mu) / sd)) / np.diag(kinv) * sd
  return float(1.0 - np.sum(resid ** 2) / max(np.sum((y - mu) ** 2), 1e-300))


@dataclasses.dataclass
class Optimum:
  """Optimal-lambda statistics at R values of r over a lambda grid of G points."""
  log2r: np.ndarray  # [R]
  lam_grid: np.ndarray  # [G]
  mean_RxG: np.ndarray  # posterior mean of the target
  density_RxG: np.ndarray  # density of "lambda is optimal" (integrates to 1 over the grid)
  lam_best: np.ndarray  # [R] argmax (argmin for a loss) of the posterior mean
  lam_mode: np.ndarray  # [R] mode of the density
  ci_Rx2: np.ndarray  # central credible interval of the optimal lambda (quantiles of the draws)
  samples_RxS: np.ndarray  # the optimal-lambda draws

  @property
  def r(self) -> np.ndarray:
    return np.exp2(self.log2r)


def optimum(fit_: Fit, log2r: np.ndarray, lam_grid: np.ndarray, *, samples: int = 1000,
            seed: int = 0, level: float = 0.9) -> Optimum:
  """Density and credible interval of the optimal lambda at each r (see module docstring)."""
  log2r, lam_grid = np.asarray(log2r, np.float64), np.asarray(lam_grid, np.float64)
  rng = np.random.default_rng(seed)
  g = len(lam_grid)
  step = (lam_grid[-1] - lam_grid[0]) / (g - 1) if g > 1 else 1.0
  sign = -1.0 if fit_.minimise else 1.0
  means, dens, best, mode, ci, draws = [], [], [], [], [], []
  for x in log2r:
    with threadpoolctl.threadpool_limits(1):  # small matrices: BLAS threads only contend
      mean, cov = fit_.latent_mean_cov(np.full(g, x), lam_grid)
      f_SxG = sample_mvn(mean, cov, samples, rng)
    idx = np.argmax(sign * f_SxG, axis=1)
    counts = np.bincount(idx, minlength=g)
    lam_draws = lam_grid[idx]
    means.append(mean)
    dens.append(counts / (samples * step))
    best.append(lam_grid[np.argmax(sign * mean)])
    mode.append(lam_grid[np.argmax(counts)])
    ci.append(np.quantile(lam_draws, [(1 - level) / 2, (1 + level) / 2]))
    draws.append(lam_draws)
  return Optimum(log2r, lam_grid, np.array(means), np.array(dens), np.array(best), np.array(mode),
                 np.array(ci), np.array(draws))


def sample_mvn(mean: np.ndarray, cov: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """n draws [n, M] from N(mean, cov) via a symmetric eigendecomposition (PSD-clipped)."""
  w, v = np.linalg.eigh(0.5 * (cov + cov.T))
  z = rng.standard_normal((n, len(mean)))
  return mean + (z * np.sqrt(np.clip(w, 0.0, None))) @ v.T
