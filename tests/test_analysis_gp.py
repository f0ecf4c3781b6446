"""GP fit and optimal-lambda density (dualjax/analysis/gp.py) against NumPy re-derivations."""

import numpy as np
import pytest

from dualjax.analysis import gp
import analysis_fixtures as fx


def _grid(lams=np.linspace(0, 1, 9), rs=fx.R_GRID):
  x, l = np.meshgrid(np.log2(rs), lams, indexing="ij")
  return x.ravel(), l.ravel()


@pytest.fixture(scope="module")
def small_fit() -> gp.Fit:
  x, l = _grid(lams=np.array([0, 0.25, 0.5, 0.75, 1.0]), rs=(1, 4, 16, 64))
  y = fx.score(x, l) + np.random.default_rng(1).normal(0, 0.3, x.shape)
  return gp.fit(x, l, y, target="avg/ar", restarts=1, seed=0)


def _matern52(a: np.ndarray, b: np.ndarray, ls: np.ndarray) -> np.ndarray:
  d = np.sqrt((((a[:, None, :] - b[None, :, :]) / ls) ** 2).sum(-1))
  return (1 + np.sqrt(5) * d + 5 * d ** 2 / 3) * np.exp(-np.sqrt(5) * d)


def test_latent_posterior_matches_numpy_reference(small_fit):
  f = small_fit
  p = f.gp.kernel_.get_params()
  amp, ls, noise = p["k1__k1__constant_value"], np.asarray(p["k1__k2__length_scale"]), p["k2__noise_level"]
  xs = np.stack([f.log2r, f.lam], 1)
  mu_x, sd_x = xs.mean(0), xs.std(0)  # standardised inputs, population std
  z = (xs - mu_x) / sd_x
  my, sy = f.y.mean(), f.y.std()
  q = np.stack([np.full(7, 3.0), np.linspace(0.1, 0.9, 7)], 1)  # r = 8, between the data's r
  zq = (q - mu_x) / sd_x
  k = amp * _matern52(z, z, ls) + noise * np.eye(len(z))
  kq = amp * _matern52(zq, z, ls)
  kqq = amp * _matern52(zq, zq, ls)
  mean_ref = my + sy * kq @ np.linalg.solve(k, (f.y - my) / sy)
  cov_ref = sy ** 2 * (kqq - kq @ np.linalg.solve(k, kq.T))
  mean, cov = f.latent_mean_cov(q[:, 0], q[:, 1])
  np.testing.assert_allclose(mean, mean_ref, rtol=1e-7, atol=1e-7)
  np.testing.assert_allclose(cov, cov_ref, rtol=1e-6, atol=1e-8 * sy ** 2)
  m2, sd2 = f.predict(q[:, 0], q[:, 1])
  np.testing.assert_allclose(m2, mean_ref, rtol=1e-7)
  np.testing.assert_allclose(sd2, np.sqrt(np.clip(np.diag(cov_ref), 0, None)), rtol=1e-5, atol=1e-6)


def test_loo_r2_matches_brute_force(small_fit):
  f = small_fit
  x = f.inputs(f.log2r, f.lam)
  k = f.gp.kernel_(x)
  my, sy = f.y.mean(), f.y.std()
  yn = (f.y - my) / sy
  pred = np.empty_like(f.y)
  for i in range(len(yn)):
    m = np.arange(len(yn)) != i
    pred[i] = my + sy * k[i, m] @ np.linalg.solve(k[np.ix_(m, m)], yn[m])
  ref = 1 - np.sum((f.y - pred) ** 2) / np.sum((f.y - my) ** 2)
  assert f.r2_loo == pytest.approx(ref, rel=1e-8)
  ref_in = 1 - np.sum((f.y - f.gp.predict(x)) ** 2) / np.sum((f.y - my) ** 2)
  assert f.r2 == pytest.approx(ref_in, rel=1e-10)
  assert f.r2_loo < f.r2


def test_sample_mvn_moments_and_rank_deficient_cov():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 2))
  cov = a @ a.T  # rank 2: a plain Cholesky would fail
  mean = np.array([1.0, -2.0, 0.5])
  s = gp.sample_mvn(mean, cov, 200_000, rng)
  np.testing.assert_allclose(s.mean(0), mean, atol=0.02)
  np.testing.assert_allclose(np.cov(s.T), cov, atol=0.03 * np.abs(cov).max())


def test_recovers_known_optimum_within_grid_spacing():
  """The paper's grid r = 1..128 and lambda in steps of 1/8, smooth score plus small noise."""
  lams = np.linspace(0, 1, 9)
  x, l = _grid(lams)
  y = fx.score(x, l) + np.random.default_rng(0).normal(0, 0.05, x.shape)
  f = gp.fit(x, l, y, target="avg/ar", restarts=2, seed=0)
  assert f.r2 > 0.99 and f.r2_loo > 0.99
  o = gp.optimum(f, np.log2(fx.R_GRID), np.linspace(0, 1, 129), samples=500, seed=0)
  truth = fx.lam_opt(np.log2(fx.R_GRID))
  spacing = lams[1] - lams[0]
  assert np.all(np.abs(o.lam_best - truth) <= spacing), (o.lam_best, truth)
  assert np.all(np.abs(o.lam_mode - truth) <= spacing), (o.lam_mode, truth)
  assert np.all((o.ci_Rx2[:, 0] <= o.lam_best) & (o.lam_best <= o.ci_Rx2[:, 1]))
  step = o.lam_grid[1] - o.lam_grid[0]
  np.testing.assert_allclose(o.density_RxG.sum(1) * step, 1.0)
  # A loss is minimised: the same surface negated and named as a loss gives the same optimum.
  g = gp.fit(x, l, -y, target="final_val_ar_loss", restarts=0, seed=0)
  assert g.minimise
  o2 = gp.optimum(g, np.log2(fx.R_GRID), np.linspace(0, 1, 129), samples=200, seed=0)
  assert np.all(np.abs(o2.lam_best - truth) <= spacing)


def test_density_is_flat_where_the_data_say_nothing():
  """A pure-noise target: the optimal lambda is spread over the grid, not piled on one value."""
  x, l = _grid(np.linspace(0, 1, 5), rs=(1, 8, 64))
  y = np.random.default_rng(3).normal(0, 1.0, x.shape)
  f = gp.fit(x, l, y, restarts=1, seed=0)
  o = gp.optimum(f, np.array([3.0]), np.linspace(0, 1, 33), samples=2000, seed=0)
  assert o.ci_Rx2[0, 1] - o.ci_Rx2[0, 0] > 0.5


def test_unfittable_reasons():
  assert gp.n_hyperparameters() == 4
  msg = gp.unfittable_reason(np.array([1.0, 2, 4]), np.array([0.0, 0.5, 1]))
  assert "3 points" in msg and "at least 4" in msg
  assert "single lam" in gp.unfittable_reason(np.array([1.0, 2, 4, 8]), np.full(4, 0.5))
  assert "single r" in gp.unfittable_reason(np.full(4, 8.0), np.array([0, 0.2, 0.4, 1]))
  assert gp.unfittable_reason(np.array([1.0, 2, 4, 8]), np.array([0, 0.2, 0.4, 1])) is None
  with pytest.raises(ValueError, match="avg/ar: 2 points"):
    gp.fit(np.array([0.0, 1]), np.array([0.0, 1]), np.array([1.0, 2]), target="avg/ar")


def test_bound_warnings_become_readable_notes():
  x, l = _grid(np.array([0.0, 0.5, 1.0]), rs=(1, 2, 4))
  f = gp.fit(x, l, 2.0 * x + l, restarts=0, seed=0)  # exact, noise-free data
  assert any("noise level at its lower bound" in n for n in f.notes), f.notes
